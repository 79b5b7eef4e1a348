//! The Portcullis API (group `portcullis.dev`, version `v1alpha1`).
//!
//! - [`Tenant`], [`Role`] and [`ApiKey`]: the custom resources users apply.
//! - [`PolicyBundle`]: what the operator compiles and streams to each sidecar.
//! - [`token`]: the API-key format `ak_<keyid>_<secret><checksum>`.
//!
//! Fields that users type (durations, CIDRs, scope names) are newtypes that keep the
//! text as written, so one bad object can never stop a watch; their `validate`/`parse`
//! methods give typed values and field-path errors.

pub mod annotations;
pub mod apikey;
pub mod cidr;
pub mod conditions;
pub mod duration;
pub mod peers;
pub mod policy;
pub mod role;
pub mod scope;
pub mod tenant;
pub mod token;
pub mod validation;

pub use apikey::{ApiKey, ApiKeySpec, ApiKeyStatus, KeyState};
pub use cidr::Cidr;
pub use duration::DurationSpec;
pub use peers::{AllowedPeer, RevokedCertificate};
pub use policy::{InboundMode, KeyPolicy, PolicyBundle, RateLimitPolicy};
pub use role::{Permission, Role, RoleSpec, RoleStatus, Subject, SubjectKind};
pub use scope::{HttpMethod, RouteRule, ScopeMap, ScopeName};
pub use tenant::{DataClassification, RateLimit, SealAnchor, Tenant, TenantSpec, TenantStatus};
pub use token::{ApiToken, KeyId, TokenError};
pub use validation::{FieldError, FieldErrors};

/// API group of every Portcullis resource.
pub const GROUP: &str = "portcullis.dev";
/// API version of every Portcullis resource.
pub const VERSION: &str = "v1alpha1";
