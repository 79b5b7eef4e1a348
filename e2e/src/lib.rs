//! Portcullis end-to-end test tiers (DESIGN.md §7).
//!
//! - [`envtest`]: a real etcd + kube-apiserver (+ kube-controller-manager) started from
//!   `KUBEBUILDER_ASSETS`, shared by the tests of one binary.
//! - [`localcluster`]: pods as processes in network namespaces, admitted by the real
//!   operator's webhooks.
//! - [`hec`]: a Splunk HTTP Event Collector stand-in, in-process or as a pod.
//! - [`scenarios`]: the scenario suite every cluster tier runs, written once against the
//!   [`scenarios::Cluster`] trait.
//! - [`softhsm`]: SoftHSM2 token directories for the pkcs11 KEK provider.

pub mod envtest;
pub mod hec;
pub mod localcluster;
pub mod scenarios;
pub mod softhsm;
pub mod wait;
