//! The `audit:` section of `proxy.yaml`: where the tamper-evident audit trail goes when
//! the proxy runs without Kubernetes. Each sink is one single-key map:
//!
//! ```yaml
//! audit:
//!   pod: edge-1                      # `pod` of every record (default: $HOSTNAME)
//!   checkpointEvery: 60s             # signed checkpoint at least this often...
//!   checkpointEveryRecords: 1000     # ...and after this many records
//!   sinks:
//!     - stdout: {}
//!     - file: {dir: /var/lib/portcullis/audit, keyFile: /etc/portcullis/audit.key}
//!     - splunkHec: {url: "https://splunk:8088", tokenFile: /etc/portcullis/hec-token,
//!                   caFile: /etc/portcullis/splunk-ca.pem, spoolDir: /var/lib/portcullis/spool/hec}
//!     - datadog: {url: "https://http-intake.logs.datadoghq.eu", apiKeyFile: /etc/portcullis/dd-key,
//!                 caFile: /etc/ssl/certs/ca-certificates.crt, spoolDir: /var/lib/portcullis/spool/dd}
//!     - collector: {url: "https://audit.example:8443", caFile: /etc/portcullis/ca.pem,
//!                   certFile: /etc/portcullis/workload.pem, keyFile: /etc/portcullis/workload-key.pem,
//!                   spoolDir: /var/lib/portcullis/spool/collector}
//! ```
//!
//! Secrets (the DEK, tokens, the client key) are named by file and read when the proxy
//! starts (the collector's client certificate and key again for every batch, so a renewed
//! pair is used at once); the configuration itself never holds them.

use std::{path::PathBuf, time::Duration};

use portcullis_audit::CheckpointPolicy;
use serde::Deserialize;

use super::Problems;

/// The audit trail of a standalone proxy.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The `pod` field of every record and the prefix of the chain id.
    pub pod: String,
    /// Where records go; at least one.
    pub sinks: Vec<AuditSink>,
    /// When signed checkpoints are written.
    pub checkpoint: CheckpointPolicy,
}

/// One destination of the audit trail.
#[derive(Clone, Debug)]
pub enum AuditSink {
    /// JSON lines on stdout.
    Stdout,
    /// Rotating segments encrypted with a data-encryption key (AES-256-GCM).
    File(FileAudit),
    /// Splunk HTTP Event Collector, behind a disk spool.
    SplunkHec(SplunkAudit),
    /// Datadog logs intake, behind a disk spool.
    Datadog(DatadogAudit),
    /// A Portcullis audit collector over mutual TLS, behind a disk spool.
    Collector(CollectorAudit),
}

/// The encrypted file sink.
#[derive(Clone, Debug)]
pub struct FileAudit {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// The DEK: 32 raw bytes, or their base64 or hex.
    pub key_file: PathBuf,
    /// The DEK's version, written into each segment header.
    pub key_version: u32,
    /// Closed segments are deleted this many days after their last record.
    pub retention_days: u32,
    /// A segment is closed at this size.
    pub max_segment_bytes: u64,
    /// A segment is closed at this age.
    pub max_segment_age: Duration,
}

/// Where a network sink keeps undelivered batches.
#[derive(Clone, Debug)]
pub struct Spool {
    /// The spool directory (one per sink).
    pub dir: PathBuf,
    /// Most bytes spooled; beyond, the sink stops taking records (fail-closed tenants
    /// then refuse requests).
    pub max_bytes: u64,
}

/// The Splunk HEC sink.
#[derive(Clone, Debug)]
pub struct SplunkAudit {
    /// Base URL, e.g. `https://splunk.example:8088`.
    pub url: String,
    /// File holding the HEC token.
    pub token_file: PathBuf,
    /// Target index (Splunk's default when absent).
    pub index: Option<String>,
    /// CA bundle for an `https` URL.
    pub ca_file: Option<PathBuf>,
    /// The disk spool.
    pub spool: Spool,
    /// Timeout of one delivery.
    pub timeout: Duration,
}

/// The Datadog logs sink.
#[derive(Clone, Debug)]
pub struct DatadogAudit {
    /// Intake base URL, e.g. `https://http-intake.logs.datadoghq.eu`.
    pub url: String,
    /// File holding the API key.
    pub api_key_file: PathBuf,
    /// `service` of each log.
    pub service: String,
    /// `ddtags` of each log.
    pub tags: String,
    /// CA bundle for an `https` URL.
    pub ca_file: Option<PathBuf>,
    /// The disk spool.
    pub spool: Spool,
    /// Timeout of one delivery.
    pub timeout: Duration,
}

/// Shipping to a Portcullis audit collector: the chain goes as it is, acknowledged only
/// once the collector has fsynced it, and files under the tenant the client
/// certificate names.
#[derive(Clone, Debug)]
pub struct CollectorAudit {
    /// The collector, `https://host:port`.
    pub url: String,
    /// CA bundle the collector's certificate chains to.
    pub ca_file: PathBuf,
    /// The workload certificate (PEM chain, with the SPIFFE workload and tenant URI
    /// SANs the collector files by).
    pub cert_file: PathBuf,
    /// Its PKCS#8 private key (PEM).
    pub key_file: PathBuf,
    /// The disk spool.
    pub spool: Spool,
    /// Timeout of one delivery.
    pub timeout: Duration,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawAudit {
    pod: Option<String>,
    checkpoint_every: Option<String>,
    checkpoint_every_records: Option<u64>,
    #[serde(default)]
    sinks: Vec<RawSink>,
}

// One of the four keys; a struct of options so a wrong shape gets a field-named error.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSink {
    stdout: Option<RawStdout>,
    file: Option<RawFile>,
    splunk_hec: Option<RawSplunk>,
    datadog: Option<RawDatadog>,
    collector: Option<RawCollector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCollector {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStdout {}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    key_version: Option<u32>,
    retention_days: Option<u32>,
    max_segment_bytes: Option<u64>,
    max_segment_age: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpool {
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSplunk {
    url: Option<String>,
    token_file: Option<PathBuf>,
    index: Option<String>,
    ca_file: Option<PathBuf>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDatadog {
    url: Option<String>,
    api_key_file: Option<PathBuf>,
    service: Option<String>,
    tags: Option<String>,
    ca_file: Option<PathBuf>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    timeout: Option<String>,
}

const DEFAULT_SPOOL_BYTES: u64 = 256 * 1024 * 1024;

/// The `pod` of records when none is configured: `$HOSTNAME`, else `portcullis-proxy`.
pub fn default_pod_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis-proxy".to_owned())
}

fn check_url(p: &mut Problems, field: &str, url: &str, ca_file: Option<&PathBuf>) {
    if url.starts_with("https://") {
        if ca_file.is_none() {
            p.add(
                &format!("{field}.caFile"),
                "is required for an https:// URL; give the PEM CA bundle that signs the service (e.g. /etc/ssl/certs/ca-certificates.crt)",
            );
        }
    } else if !url.starts_with("http://") {
        p.add(
            &format!("{field}.url"),
            format!("{url:?} must start with https:// (or http:// for a local collector)"),
        );
    }
}

fn spool(p: &mut Problems, field: &str, raw: RawSpool) -> Option<Spool> {
    let dir = p.required(
        &format!("{field}.spoolDir"),
        raw.spool_dir,
        "a writable directory where undelivered batches wait (one per sink)",
    )?;
    let max_bytes = match raw.spool_max_bytes {
        Some(0) => {
            p.add(&format!("{field}.spoolMaxBytes"), "must be at least 1");
            DEFAULT_SPOOL_BYTES
        }
        Some(n) => n,
        None => DEFAULT_SPOOL_BYTES,
    };
    Some(Spool { dir, max_bytes })
}

impl RawSink {
    fn validate(self, p: &mut Problems, field: &str) -> Option<AuditSink> {
        let given = [
            self.stdout.is_some(),
            self.file.is_some(),
            self.splunk_hec.is_some(),
            self.datadog.is_some(),
            self.collector.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if given != 1 {
            p.add(
                field,
                "each sink is exactly one of stdout, file, splunkHec, datadog or collector, e.g. `- stdout: {}`",
            );
            return None;
        }
        if self.stdout.is_some() {
            return Some(AuditSink::Stdout);
        }
        if let Some(raw) = self.file {
            let field = format!("{field}.file");
            let dir = p.required(
                &format!("{field}.dir"),
                raw.dir,
                "the directory for encrypted segments",
            );
            let key_file = p.required(
                &format!("{field}.keyFile"),
                raw.key_file,
                "a file holding the 32-byte data-encryption key (raw, base64 or hex)",
            );
            let retention_days = raw.retention_days.unwrap_or(365);
            if !(1..=2555).contains(&retention_days) {
                p.add(
                    &format!("{field}.retentionDays"),
                    format!("{retention_days} is out of range; use 1 to 2555 (7 years)"),
                );
            }
            let max_segment_bytes = raw.max_segment_bytes.unwrap_or(64 * 1024 * 1024);
            if max_segment_bytes == 0 {
                p.add(&format!("{field}.maxSegmentBytes"), "must be at least 1");
            }
            let max_segment_age = p.duration(
                &format!("{field}.maxSegmentAge"),
                raw.max_segment_age.as_ref(),
                Duration::from_secs(3600),
            );
            return Some(AuditSink::File(FileAudit {
                dir: dir?,
                key_file: key_file?,
                key_version: raw.key_version.unwrap_or(1),
                retention_days,
                max_segment_bytes,
                max_segment_age,
            }));
        }
        if let Some(raw) = self.splunk_hec {
            let field = format!("{field}.splunkHec");
            let url = p.required(
                &format!("{field}.url"),
                raw.url,
                "the HEC base URL, e.g. https://splunk.example:8088",
            );
            let token_file = p.required(
                &format!("{field}.tokenFile"),
                raw.token_file,
                "a file holding the HEC token",
            );
            if let Some(url) = &url {
                check_url(p, &field, url, raw.ca_file.as_ref());
            }
            let spool = spool(
                p,
                &field,
                RawSpool {
                    spool_dir: raw.spool_dir,
                    spool_max_bytes: raw.spool_max_bytes,
                },
            );
            let timeout = p.duration(
                &format!("{field}.timeout"),
                raw.timeout.as_ref(),
                Duration::from_secs(10),
            );
            return Some(AuditSink::SplunkHec(SplunkAudit {
                url: url?,
                token_file: token_file?,
                index: raw.index,
                ca_file: raw.ca_file,
                spool: spool?,
                timeout,
            }));
        }
        if let Some(raw) = self.collector {
            return raw.validate(p, &format!("{field}.collector"));
        }
        let raw = self.datadog?;
        let field = format!("{field}.datadog");
        let url = p.required(
            &format!("{field}.url"),
            raw.url,
            "the logs intake URL, e.g. https://http-intake.logs.datadoghq.com",
        );
        let api_key_file = p.required(
            &format!("{field}.apiKeyFile"),
            raw.api_key_file,
            "a file holding the Datadog API key",
        );
        if let Some(url) = &url {
            check_url(p, &field, url, raw.ca_file.as_ref());
        }
        let spool = spool(
            p,
            &field,
            RawSpool {
                spool_dir: raw.spool_dir,
                spool_max_bytes: raw.spool_max_bytes,
            },
        );
        let timeout = p.duration(
            &format!("{field}.timeout"),
            raw.timeout.as_ref(),
            Duration::from_secs(10),
        );
        Some(AuditSink::Datadog(DatadogAudit {
            url: url?,
            api_key_file: api_key_file?,
            service: raw.service.unwrap_or_else(|| "portcullis".to_owned()),
            tags: raw.tags.unwrap_or_default(),
            ca_file: raw.ca_file,
            spool: spool?,
            timeout,
        }))
    }
}

impl RawCollector {
    fn validate(self, p: &mut Problems, field: &str) -> Option<AuditSink> {
        let url = p.required(
            &format!("{field}.url"),
            self.url,
            "the collector's URL, e.g. https://portcullis-audit.portcullis-system.svc:8443",
        );
        if let Some(url) = url.as_ref().filter(|u| !u.starts_with("https://")) {
            p.add(
                &format!("{field}.url"),
                format!("{url:?} must start with https://: records travel over mutual TLS"),
            );
        }
        let ca_file = p.required(
            &format!("{field}.caFile"),
            self.ca_file,
            "the PEM CA bundle the collector's certificate chains to",
        );
        let cert_file = p.required(
            &format!("{field}.certFile"),
            self.cert_file,
            "the workload certificate (PEM) the collector files records by",
        );
        let key_file = p.required(
            &format!("{field}.keyFile"),
            self.key_file,
            "the workload certificate's PKCS#8 private key (PEM)",
        );
        let spool = spool(
            p,
            field,
            RawSpool {
                spool_dir: self.spool_dir,
                spool_max_bytes: self.spool_max_bytes,
            },
        );
        let timeout = p.duration(
            &format!("{field}.timeout"),
            self.timeout.as_ref(),
            Duration::from_secs(10),
        );
        Some(AuditSink::Collector(CollectorAudit {
            url: url?,
            ca_file: ca_file?,
            cert_file: cert_file?,
            key_file: key_file?,
            spool: spool?,
            timeout,
        }))
    }
}

impl RawAudit {
    pub(crate) fn validate(self, p: &mut Problems) -> AuditConfig {
        let defaults = CheckpointPolicy::default();
        let every = p.duration(
            "audit.checkpointEvery",
            self.checkpoint_every.as_ref(),
            defaults.every,
        );
        let every_records = match self.checkpoint_every_records {
            Some(0) => {
                p.add("audit.checkpointEveryRecords", "must be at least 1");
                defaults.every_records
            }
            Some(n) => n,
            None => defaults.every_records,
        };
        let mut sinks: Vec<AuditSink> = self
            .sinks
            .into_iter()
            .enumerate()
            .filter_map(|(i, raw)| raw.validate(p, &format!("audit.sinks[{i}]")))
            .collect();
        if sinks.is_empty() {
            sinks.push(AuditSink::Stdout);
        }
        AuditConfig {
            pod: self
                .pod
                .filter(|pod| !pod.is_empty())
                .unwrap_or_else(default_pod_name),
            sinks,
            checkpoint: CheckpointPolicy {
                every_records,
                every,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::ProxyConfig;

    use super::*;

    const BASE: &str = "
upstream: {appPort: 8080}
tls: {certificate: /c.pem, privateKey: /k.pem, trustBundle: /ca.pem}
policy: {file: /policy.json}
";

    #[test]
    fn every_sink_kind_parses() {
        let text = format!(
            "{BASE}audit:
  pod: edge-1
  checkpointEvery: 5s
  sinks:
    - stdout: {{}}
    - file: {{dir: /a, keyFile: /k, keyVersion: 3, retentionDays: 2555}}
    - splunkHec: {{url: \"https://s:8088\", tokenFile: /t, caFile: /ca, spoolDir: /sp}}
    - datadog: {{url: \"http://dd:8080\", apiKeyFile: /d, spoolDir: /sd, tags: \"env:prod\"}}
    - collector: {{url: \"https://audit:8443\", caFile: /ca, certFile: /w.pem, keyFile: /w-key.pem, spoolDir: /sc, timeout: 3s}}
"
        );
        let config = ProxyConfig::parse(&text, "p.yaml").unwrap();
        let audit = config.audit.unwrap();
        assert_eq!(audit.pod, "edge-1");
        assert_eq!(audit.checkpoint.every, Duration::from_secs(5));
        assert_eq!(audit.sinks.len(), 5);
        assert!(
            matches!(&audit.sinks[4], AuditSink::Collector(c) if c.spool.dir == std::path::Path::new("/sc") && c.timeout == Duration::from_secs(3))
        );
        assert!(matches!(audit.sinks[0], AuditSink::Stdout));
        assert!(matches!(&audit.sinks[1], AuditSink::File(f) if f.key_version == 3));
        assert!(
            matches!(&audit.sinks[2], AuditSink::SplunkHec(s) if s.spool.dir == std::path::Path::new("/sp"))
        );
        assert!(matches!(&audit.sinks[3], AuditSink::Datadog(d) if d.service == "portcullis"));
    }

    #[test]
    fn errors_name_the_sink_field_and_the_fix() {
        let text = format!(
            "{BASE}audit:
  sinks:
    - {{stdout: {{}}, file: {{dir: /a, keyFile: /k}}}}
    - file: {{dir: /a, retentionDays: 9000}}
    - splunkHec: {{url: \"https://s\", tokenFile: /t, spoolDir: /s}}
    - datadog: {{url: \"ftp://x\", apiKeyFile: /k}}
    - collector: {{url: \"http://audit:8443\", caFile: /ca, spoolDir: /sc}}
"
        );
        let err = ProxyConfig::parse(&text, "p.yaml").unwrap_err().to_string();
        for needle in [
            "audit.sinks[0]: each sink is exactly one",
            "audit.sinks[1].file.keyFile: is required",
            "audit.sinks[1].file.retentionDays",
            "audit.sinks[2].splunkHec.caFile: is required",
            "audit.sinks[3].datadog.url",
            "audit.sinks[3].datadog.spoolDir: is required",
            "audit.sinks[4].collector.url: \"http://audit:8443\" must start with https://",
            "audit.sinks[4].collector.certFile: is required",
            "audit.sinks[4].collector.keyFile: is required",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn an_empty_audit_section_means_stdout() {
        let config = ProxyConfig::parse(&format!("{BASE}audit: {{}}\n"), "p.yaml").unwrap();
        let audit = config.audit.unwrap();
        assert!(matches!(audit.sinks.as_slice(), [AuditSink::Stdout]));
        assert!(!audit.pod.is_empty());
        assert!(ProxyConfig::parse(BASE, "p.yaml").unwrap().audit.is_none());
    }
}
