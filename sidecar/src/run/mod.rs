//! Process wiring: a standalone proxy from a `proxy.yaml` ([`proxy`]), the proxy of an
//! injected pod ([`cluster`]), the zero-setup [`demo`] with its [`echo`] app, shutdown on
//! a signal ([`drain`]), and the pod's init steps ([`init`]). The binary's subcommands
//! are thin calls into these.

pub mod cluster;
pub mod demo;
pub mod drain;
pub mod echo;
pub mod init;
pub mod proxy;
