//! The Portcullis audit collector as a destination: `POST /v1/audit/records`
//! ([`portcullis_api::audit_ship`]), newline-delimited entries exactly as the chain wrote
//! them, over mutual TLS with the workload certificate. Wrapped in a
//! [`SpooledSink`](super::spooled::SpooledSink) like every network sink, a batch leaves
//! the proxy's spool only once the collector answers that it is durable; a lost answer
//! means a resend, which the collector recognises and does not store twice.

use std::time::Duration;

use bytes::Bytes;
use portcullis_api::audit_ship::{CONTENT_TYPE, RECORDS_PATH};

use super::http::{CurrentClientConfig, HttpEndpoint};
use super::{Deliver, DeliveryError, SinkFuture};
use crate::entry::Entry;
use crate::error::Error;

/// Ships batches to the collector.
#[derive(Debug)]
pub struct AuditCollector {
    endpoint: HttpEndpoint,
}

impl AuditCollector {
    /// The collector at `url` (`https://…`), reached with the client config in force
    /// when each batch starts.
    pub fn new(url: &str, tls: CurrentClientConfig, timeout: Duration) -> Result<Self, Error> {
        Ok(Self {
            endpoint: HttpEndpoint::with_client_tls(url, tls, timeout)?,
        })
    }

    /// The request body for `entries`: one chain line each.
    pub fn body(entries: &[Entry]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        crate::format::json::write_lines(entries, &mut out)?;
        Ok(out)
    }
}

impl Deliver for AuditCollector {
    fn name(&self) -> &str {
        "collector"
    }

    fn deliver<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let body = Self::body(entries).map_err(|e| DeliveryError::Transient(e.to_string()))?;
            self.deliver_lines(Bytes::from(body)).await
        })
    }

    // The spool holds the chain's lines exactly as the body carries them, and the
    // collector checks every line on arrival.
    fn takes_lines(&self) -> bool {
        true
    }

    fn deliver_lines(&self, lines: Bytes) -> SinkFuture<'_, Result<(), DeliveryError>> {
        Box::pin(async move {
            // A refusal (409 gap or fork, 403 wrong tenant) is permanent for this batch:
            // it stays spooled and is counted, never dropped.
            self.endpoint
                .post(RECORDS_PATH, &[("content-type", CONTENT_TYPE)], lines)
                .await
        })
    }
}
