//! Splunk HTTP Event Collector: `POST {url}/services/collector/event`, header
//! `Authorization: Splunk <token>`, body of newline-separated event objects
//! `{"time":<epoch seconds>,"host":…,"source":"portcullis","sourcetype":"portcullis:audit","index"?:…,"event":<entry>}`.

use super::http::HttpEndpoint;
use super::{Deliver, DeliveryError, SinkFuture};
use crate::entry::Entry;
use crate::error::Error;
use crate::secret::Secret;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// HEC settings. `Debug` redacts the token.
#[derive(Debug, Clone)]
pub struct SplunkHecConfig {
    /// Base URL, e.g. `https://splunk.example:8088`.
    pub url: String,
    /// HEC token.
    pub token: Secret,
    /// `host` field of each event (the pod name).
    pub host: String,
    /// Target index; Splunk's default when `None`.
    pub index: Option<String>,
    /// CAs for an `https` URL.
    pub tls_roots: Option<rustls::RootCertStore>,
    /// Timeout for one request.
    pub timeout: Duration,
}

/// Delivers batches to Splunk HEC.
#[derive(Debug)]
pub struct SplunkHec {
    endpoint: HttpEndpoint,
    token: Secret,
    host: String,
    index: Option<String>,
}

impl SplunkHec {
    /// Checks the settings.
    pub fn new(config: SplunkHecConfig) -> Result<Self, Error> {
        Ok(SplunkHec {
            endpoint: HttpEndpoint::new(&config.url, config.tls_roots, config.timeout)?,
            token: config.token,
            host: config.host,
            index: config.index,
        })
    }

    /// The request body for `entries`.
    pub fn body(&self, entries: &[Entry]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        for entry in entries {
            let mut event = Map::new();
            let millis = entry.timestamp().as_millisecond();
            event.insert("time".into(), json!(millis as f64 / 1000.0));
            event.insert("host".into(), Value::String(self.host.clone()));
            event.insert("source".into(), json!("portcullis"));
            event.insert("sourcetype".into(), json!("portcullis:audit"));
            if let Some(index) = &self.index {
                event.insert("index".into(), Value::String(index.clone()));
            }
            event.insert("event".into(), entry.to_value()?);
            let line = serde_json::to_vec(&Value::Object(event))
                .map_err(|e| Error::Serialize(e.to_string()))?;
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        Ok(out)
    }
}

impl Deliver for SplunkHec {
    fn name(&self) -> &str {
        "splunk_hec"
    }

    fn deliver<'a>(&'a self, entries: &'a [Entry]) -> SinkFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let body = self
                .body(entries)
                .map_err(|e| DeliveryError::Transient(e.to_string()))?;
            let auth = format!("Splunk {}", self.token.expose());
            self.endpoint
                .post(
                    "/services/collector/event",
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from(body),
                )
                .await
        })
    }
}
