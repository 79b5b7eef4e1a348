//! The Portcullis operator: controllers for Tenant, Role and ApiKey, the certificate
//! authority and identity service, admission webhooks and the policy server.

pub mod access_review;
pub mod admin;
pub mod audit_cluster;
pub mod audit_keys;
pub mod audit_server;
pub mod audit_sinks;
pub mod audit_witness;
pub mod ca;
pub mod clock;
pub mod context;
pub mod controller;
pub mod crdgen;
pub mod dek;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod kek_custody;
pub mod kek_rotation;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod rbac;
pub mod run;
pub mod stores;
pub mod trust_bundle;
pub mod webhook;
