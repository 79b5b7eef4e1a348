//! Datadog logs intake: `POST {url}/api/v2/logs`, headers `DD-API-KEY: <key>` and
//! `Content-Type: application/json`, body a JSON array of
//! `{"ddsource":"portcullis","service":…,"hostname":…,"ddtags":…,"message":"<entry JSON>"}`.

use super::http::HttpEndpoint;
use super::{Deliver, DeliveryError, SinkFuture};
use crate::entry::Entry;
use crate::error::Error;
use crate::secret::Secret;
use bytes::Bytes;
use serde_json::{Value, json};
use std::time::Duration;

/// Datadog settings. `Debug` redacts the API key.
#[derive(Debug, Clone)]
pub struct DatadogConfig {
    /// Intake base URL, e.g. `https://http-intake.logs.datadoghq.eu`.
    pub url: String,
    /// API key.
    pub api_key: Secret,
    /// `service` attribute.
    pub service: String,
    /// `hostname` attribute (the pod name).
    pub hostname: String,
    /// `ddtags`, comma-separated (`tenant:acme,env:prod`).
    pub tags: String,
    /// CAs for an `https` URL.
    pub tls_roots: Option<rustls::RootCertStore>,
    /// Timeout for one request.
    pub timeout: Duration,
}

/// Delivers batches to the Datadog logs intake.
#[derive(Debug)]
pub struct Datadog {
    endpoint: HttpEndpoint,
    api_key: Secret,
    service: String,
    hostname: String,
    tags: String,
}

impl Datadog {
    /// Checks the settings.
    pub fn new(config: DatadogConfig) -> Result<Self, Error> {
        Ok(Datadog {
            endpoint: HttpEndpoint::new(&config.url, config.tls_roots, config.timeout)?,
            api_key: config.api_key,
            service: config.service,
            hostname: config.hostname,
            tags: config.tags,
        })
    }

    /// The request body for `entries`.
    pub fn body(&self, entries: &[Entry]) -> Result<Vec<u8>, Error> {
        let items = entries
            .iter()
            .map(|entry| {
                Ok(json!({
                    "ddsource": "portcullis",
                    "service": self.service,
                    "hostname": self.hostname,
                    "ddtags": self.tags,
                    "message": entry.to_json_line()?,
                }))
            })
            .collect::<Result<Vec<Value>, Error>>()?;
        serde_json::to_vec(&items).map_err(|e| Error::Serialize(e.to_string()))
    }
}

impl Deliver for Datadog {
    fn name(&self) -> &str {
        "datadog"
    }

    fn deliver<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let body = self
                .body(entries)
                .map_err(|e| DeliveryError::Transient(e.to_string()))?;
            self.endpoint
                .post(
                    "/api/v2/logs",
                    &[
                        ("dd-api-key", self.api_key.expose()),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(body),
                )
                .await
        })
    }
}
