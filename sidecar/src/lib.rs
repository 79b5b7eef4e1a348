//! The Portcullis sidecar proxy: TLS 1.3 in front of an app, mTLS peers and scoped API
//! keys, IP allowlists, per-key rate limits, audit of every request, hot-swapped
//! certificates and policy. One module per step of the inbound path (see `inbound`).

pub mod accept;
pub mod admin;
pub mod allowlist;
pub mod app_exit;
pub mod app_health;
pub mod audit;
pub mod authn;
pub mod authorize;
pub mod authorize_peer;
pub mod body;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod deny;
pub mod drain;
pub mod echo;
pub mod headers;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod operator_client;
pub mod outbound;
pub mod path;
pub mod per_source;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod serving_certificate;
pub mod tls;
pub mod upstream;
