//! Kubernetes object names (RFC 1123), checked once for every crate: namespaces are DNS
//! labels; ServiceAccounts, tenants, pods and most other objects are DNS subdomains.

/// The longest DNS label (a namespace name, a scope name).
pub const MAX_DNS_LABEL_LEN: usize = 63;
/// The longest DNS subdomain (most object names).
pub const MAX_DNS_SUBDOMAIN_LEN: usize = 253;

/// Whether `text` is an RFC 1123 label: 1-63 of `[a-z0-9-]`, starting and ending
/// alphanumeric.
pub fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_DNS_LABEL_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// Whether `text` is an RFC 1123 subdomain: dot-separated labels, at most 253
/// characters.
pub fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= MAX_DNS_SUBDOMAIN_LEN && text.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for good in ["a", "acme-prod", "0", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("api.v1"));
        for bad in ["", ".a", "a..b", "a.", "a.-b"] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        let long = [
            "a".repeat(63),
            "a".repeat(63),
            "a".repeat(63),
            "a".repeat(62),
        ]
        .join(".");
        assert_eq!(long.len(), 254);
        assert!(!is_dns_subdomain(&long));
    }
}
