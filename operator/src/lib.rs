//! The Portcullis operator: controllers for Tenant, Role and ApiKey, the certificate
//! authority and identity service, admission webhooks and the policy server.

pub mod crdgen;
