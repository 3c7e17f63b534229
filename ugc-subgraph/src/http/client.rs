//! Who the client is: the peer address, or — only when the peer is a
//! trusted proxy (`UGC_TRUSTED_PROXIES`) — the right-most `X-Forwarded-For`
//! hop that is not itself a trusted proxy.
//!
//! Right-most, not left-most: every proxy appends the address it received
//! the request from, so the entries to the right of the last untrusted hop
//! were written by our own proxies, and everything to its left is whatever
//! the client chose to send. A header from an untrusted peer is ignored, so
//! it cannot be spoofed to take another client's budget or to escape one's own.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client address a request is limited and logged by; set on every
/// request by [`ClientResolver::resolve`] before any limit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

#[derive(Debug, Clone, Default)]
pub struct ClientResolver {
    trusted: Vec<IpNet>,
}

/// More hops than this are not looked at (a header is not a work list).
const MAX_HOPS: usize = 32;

impl ClientResolver {
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self { trusted }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that arrived from `peer`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        // Hops from right (nearest) to left; several headers are one list.
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|value| value.to_str().unwrap_or("").rsplit(','))
            .take(MAX_HOPS);
        let mut client = peer;
        for hop in hops {
            let Some(ip) = parse_hop(hop.trim()) else {
                // Garbage where an address should be: nothing to its left
                // can be believed; the last believable hop is the client.
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }

    /// Attaches [`ClientAddr`] to a request (from its connection's peer).
    pub fn resolve(&self, mut request: Request) -> Request {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([127, 0, 0, 1]), |ConnectInfo(addr)| addr.ip());
        let client = self.client(peer, request.headers());
        request.extensions_mut().insert(ClientAddr(client));
        request
    }
}

/// `1.2.3.4`, `[::1]:80`, `1.2.3.4:5678` → the address.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip())).map(canonical)
}

/// `::ffff:1.2.3.4` is `1.2.3.4`: one client, one key.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let r = ClientResolver::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(r.client(ip("203.0.113.9"), &xff(&["1.1.1.1"])), ip("203.0.113.9"));
        assert_eq!(ClientResolver::default().client(ip("127.0.0.1"), &xff(&["1.1.1.1"])), ip("127.0.0.1"));
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() {
        let r = ClientResolver::new(vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()]);
        // The client spoofs a left-most entry; our proxies appended the rest.
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.1.2.3"]);
        assert_eq!(r.client(ip("127.0.0.1"), &h), ip("198.51.100.7"));
        assert_eq!(r.client(ip("10.0.0.1"), &xff(&["198.51.100.7:4711"])), ip("198.51.100.7"));
        assert_eq!(r.client(ip("10.0.0.1"), &xff(&["[2001:db8::1]:80"])), ip("2001:db8::1"));
        // Only proxies in the header: the left-most of them is all we know.
        assert_eq!(r.client(ip("10.0.0.1"), &xff(&["10.9.9.9, 10.8.8.8"])), ip("10.9.9.9"));
        // No header: the proxy itself.
        assert_eq!(r.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        // Garbage stops the walk at the last believable hop.
        assert_eq!(r.client(ip("10.0.0.1"), &xff(&["1.2.3.4, not-an-ip, 10.7.7.7"])), ip("10.7.7.7"));
        // IPv4-mapped IPv6 peers are their IPv4 address.
        assert_eq!(r.client(ip("::ffff:10.0.0.1"), &xff(&["192.0.2.1"])), ip("192.0.2.1"));
    }
}
