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
        for entry in entries {
            out.extend_from_slice(entry.to_json_line()?.as_bytes());
            out.push(b'\n');
        }
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
            // A refusal (409 gap or fork, 403 wrong tenant) is permanent for this batch:
            // it stays spooled and is counted, never dropped.
            self.endpoint
                .post(
                    RECORDS_PATH,
                    &[("content-type", CONTENT_TYPE)],
                    Bytes::from(body),
                )
                .await
        })
    }
}
