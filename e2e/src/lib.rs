//! Portcullis end-to-end test tiers (DESIGN.md §7).
//!
//! - [`envtest`]: a real etcd + kube-apiserver (+ kube-controller-manager) started from
//!   `KUBEBUILDER_ASSETS`, shared by the tests of one binary.

pub mod envtest;
pub mod localcluster;
pub mod wait;
