//! The client address and IP allowlists. The client is the TCP peer, unless that peer
//! is a configured trusted proxy: then `X-Forwarded-For` is read right to left and the
//! first hop that is not a trusted proxy is the client. A client can prepend anything
//! to the header, so hops left of the first untrusted one are never believed.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::listener::deny::{Denial, Reason};

/// The header proxies append client addresses to.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&ip))
}

fn parse_hop(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    // Tolerate "ip:port" and "[v6]:port" from proxies that include ports.
    text.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The address a request comes from.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &[IpNet],
) -> Result<IpAddr, Denial> {
    let peer = peer.to_canonical();
    if !trusted(peer, trusted_proxies) {
        return Ok(peer);
    }
    let mut hops = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let text = value.to_str().map_err(|_| malformed())?;
        hops.extend(text.split(',').map(str::to_owned));
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        let ip = parse_hop(hop).ok_or_else(malformed)?;
        client = ip;
        if !trusted(ip, trusted_proxies) {
            break;
        }
    }
    Ok(client)
}

fn malformed() -> Denial {
    Denial::new(
        Reason::BadRequest,
        "X-Forwarded-For from a trusted proxy holds something that is not an IP address; fix the proxy in front",
    )
}

/// Whether `ip` may pass a list (an empty list lets every address pass).
pub fn permits(list: &[IpNet], ip: IpAddr) -> bool {
    list.is_empty() || list.iter().any(|net| net.contains(&ip))
}

/// The tenant's allowlist step.
pub fn check_tenant(list: &[IpNet], ip: IpAddr) -> Result<(), Denial> {
    if permits(list, ip) {
        return Ok(());
    }
    Err(Denial::new(
        Reason::IpNotAllowed,
        format!("requests from {ip} are not allowed for this tenant; call from an allowed network"),
    ))
}

/// The API key's allowlist step.
pub fn check_key(list: &[IpNet], ip: IpAddr) -> Result<(), Denial> {
    if permits(list, ip) {
        return Ok(());
    }
    Err(Denial::new(
        Reason::IpNotAllowedForKey,
        format!(
            "this API key may not be used from {ip}; call from a network on the key's allowlist"
        ),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peers_cannot_spoof_their_address() {
        let ip = client_ip(
            "203.0.113.9".parse().unwrap(),
            &xff(&["10.1.1.1"]),
            &nets(&["10.0.0.0/8"]),
        )
        .unwrap();
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn right_most_untrusted_hop_is_the_client() {
        let proxies = nets(&["10.0.0.0/8", "fd00::/8"]);
        let headers = xff(&["1.2.3.4, 198.51.100.7", "10.0.0.5"]);
        let ip = client_ip("10.0.0.9".parse().unwrap(), &headers, &proxies).unwrap();
        assert_eq!(ip.to_string(), "198.51.100.7");
        let v6 = client_ip(
            "fd00::1".parse().unwrap(),
            &xff(&["2001:db8::5, fd00::2"]),
            &proxies,
        )
        .unwrap();
        assert_eq!(v6.to_string(), "2001:db8::5");
        // All hops trusted: the left-most is as far as we can see.
        let all = client_ip("10.0.0.9".parse().unwrap(), &xff(&["10.9.9.9"]), &proxies).unwrap();
        assert_eq!(all.to_string(), "10.9.9.9");
        // No header: the trusted peer itself.
        let none = client_ip("10.0.0.9".parse().unwrap(), &HeaderMap::new(), &proxies).unwrap();
        assert_eq!(none.to_string(), "10.0.0.9");
    }

    #[test]
    fn garbage_from_a_trusted_proxy_is_refused_and_mapped_v4_is_canonical() {
        let proxies = nets(&["10.0.0.0/8"]);
        assert!(client_ip("10.0.0.9".parse().unwrap(), &xff(&["nope"]), &proxies).is_err());
        let mapped = client_ip(
            "::ffff:192.0.2.1".parse().unwrap(),
            &HeaderMap::new(),
            &proxies,
        )
        .unwrap();
        assert_eq!(mapped.to_string(), "192.0.2.1");
    }

    #[test]
    fn allowlists_cover_v4_and_v6() {
        let list = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(permits(&list, "10.2.3.4".parse().unwrap()));
        assert!(permits(&list, "2001:db8::1".parse().unwrap()));
        assert!(!permits(&list, "192.168.1.1".parse().unwrap()));
        assert!(permits(&[], "192.168.1.1".parse().unwrap()));
    }
}
