//! Value parsers of the `run` flags: each refuses a bad value with what it must be,
//! and clap puts the flag's name in front.

use portcullis_api::names::{is_dns_label, is_dns_subdomain};
use portcullis_api::spiffe::TrustDomain;
use portcullis_crds::DurationSpec;
use portcullis_operator::webhook::inject::ProxyResources;

pub(super) fn trust_domain(value: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(value).map_err(|e| e.to_string())
}

pub(super) fn positive_duration(value: &str) -> Result<DurationSpec, String> {
    let duration: DurationSpec = value
        .parse()
        .map_err(|e: portcullis_crds::duration::DurationError| e.to_string())?;
    if duration.get().is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

pub(super) fn dns_label(value: &str) -> Result<String, String> {
    if is_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err("must be a DNS label: lowercase letters, digits and '-', at most 63".into())
    }
}

pub(super) fn dns_subdomain(value: &str) -> Result<String, String> {
    if is_dns_subdomain(value) {
        Ok(value.to_owned())
    } else {
        Err("must be a DNS subdomain: dot-separated DNS labels".into())
    }
}

/// An IP address or a DNS name (a leading `*.` wildcard allowed).
pub(super) fn san(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.parse::<std::net::IpAddr>().is_ok() {
        return Ok(value.to_owned());
    }
    let name = value.strip_prefix("*.").unwrap_or(value);
    dns_subdomain(name)
        .map(|_| value.to_owned())
        .map_err(|_| format!("{value:?} is neither an IP address nor a DNS name"))
}

pub(super) fn https_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("must be an https:// URL".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query".into());
    }
    Ok(value.trim_end_matches('/').to_owned())
}

pub(super) fn proxy_resources(value: &str) -> Result<ProxyResources, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Amounts {
        cpu: Option<String>,
        memory: Option<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resources {
        requests: Option<Amounts>,
        limits: Option<Amounts>,
    }
    let parsed: Resources = serde_json::from_str(value).map_err(|e| {
        format!(r#"not {{"requests":{{"cpu":..,"memory":..}},"limits":{{..}}}}: {e}"#)
    })?;
    let quantity = |q: Option<String>, default: String| -> Result<String, String> {
        match q {
            None => Ok(default),
            Some(q)
                if !q.is_empty() && q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') =>
            {
                Ok(q)
            }
            Some(q) => Err(format!("{q:?} is not a Kubernetes quantity")),
        }
    };
    let defaults = ProxyResources::default();
    let requests = parsed.requests.unwrap_or(Amounts {
        cpu: None,
        memory: None,
    });
    let limits = parsed.limits.unwrap_or(Amounts {
        cpu: None,
        memory: None,
    });
    Ok(ProxyResources {
        cpu_request: quantity(requests.cpu, defaults.cpu_request)?,
        memory_request: quantity(requests.memory, defaults.memory_request)?,
        cpu_limit: quantity(limits.cpu, defaults.cpu_limit)?,
        memory_limit: quantity(limits.memory, defaults.memory_limit)?,
    })
}
