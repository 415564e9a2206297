//! The gateway's public base URL for a request: the one place every public URL starts from.
//!
//! A configured public base URL wins. Otherwise forwarding headers are honoured only when the TCP peer is a trusted
//! proxy (configured CIDRs; none by default): RFC 7239 `Forwarded` (walking hops from the nearest proxy back while
//! each hop's `for` is itself trusted), else `X-Forwarded-Proto/-Host/-Port/-Prefix` (the value nearest to us). From
//! anyone else they are ignored and the request's own Host is used over http.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Uri};
use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct PublicConfig {
    /// e.g. `https://fhir.example.org` or `https://api.example.org/gateway` (no trailing slash).
    pub base_url: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    /// The FHIR port itself serves TLS (`--tls-cert-file`): a request's own scheme is https.
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublicConfigError {
    #[error("public base URL `{0}` must be an absolute http(s) URL without query")]
    BaseUrl(String),
    #[error("`{0}` is not a CIDR or IP address")]
    Cidr(String),
}

impl PublicConfig {
    pub fn new(base_url: Option<&str>, trusted: &[String]) -> Result<Self, PublicConfigError> {
        let base_url = match base_url.filter(|s| !s.is_empty()) {
            None => None,
            Some(raw) => {
                let uri: Uri = raw.parse().map_err(|_| PublicConfigError::BaseUrl(raw.to_owned()))?;
                let ok = matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && uri.query().is_none();
                if !ok {
                    return Err(PublicConfigError::BaseUrl(raw.to_owned()));
                }
                Some(raw.trim_end_matches('/').to_owned())
            }
        };
        let mut trusted_proxies = Vec::new();
        for item in trusted.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| PublicConfigError::Cidr(item.to_owned()))?;
            trusted_proxies.push(net);
        }
        Ok(PublicConfig { base_url, trusted_proxies, tls: false })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The public FHIR base (no trailing slash) for a request from `peer` to a table at `base_path`.
    pub fn base(&self, peer: SocketAddr, uri: &Uri, headers: &HeaderMap, base_path: &str) -> String {
        if let Some(base) = &self.base_url {
            return [base.as_str(), base_path].concat();
        }
        // Borrowed from the request where it can be (this runs on every request): owned only what a trusted
        // proxy's headers change.
        let own_host = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header(headers, http::header::HOST))
            .filter(|h| valid_host(h));
        let mut scheme = Cow::Borrowed(if self.tls { "https" } else { "http" });
        let mut host = own_host.map(Cow::Borrowed);
        let mut prefix = Cow::Borrowed("");
        if self.trusts(peer.ip()) {
            if let Some(hop) = self.forwarded_hop(headers) {
                if let Some(p) = hop.proto {
                    scheme = Cow::Owned(p);
                }
                if let Some(h) = hop.host {
                    host = Some(Cow::Owned(h));
                }
            } else {
                if let Some(p) = last_value(headers, "x-forwarded-proto").filter(|p| p == "http" || p == "https") {
                    scheme = Cow::Owned(p);
                }
                if let Some(h) = last_value(headers, "x-forwarded-host").filter(|h| valid_host(h)) {
                    host = Some(Cow::Owned(h));
                }
                if let Some(port) = last_value(headers, "x-forwarded-port").filter(|p| p.parse::<u16>().is_ok())
                    && let Some(h) = host.as_mut()
                {
                    let hostname = strip_port(h).to_owned();
                    let default = (scheme == "https" && port == "443") || (scheme == "http" && port == "80");
                    *h = Cow::Owned(if default { hostname } else { format!("{hostname}:{port}") });
                }
                if let Some(p) = last_value(headers, "x-forwarded-prefix").filter(|p| valid_prefix(p)) {
                    prefix = Cow::Owned(p.trim_end_matches('/').to_owned());
                }
            }
        }
        let host = host.unwrap_or(Cow::Borrowed("localhost"));
        [&*scheme, "://", &*host, &*prefix, base_path].concat()
    }

    /// The caller's own network address: the TCP peer, or, when the peer is a trusted proxy, the address the
    /// outermost trusted proxy received the request from (RFC 7239 `for`, walked as for the base; else
    /// `X-Forwarded-For` from the right while each address is trusted). What cannot be read stops the walk at the
    /// last proxy known.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer = unmapped(peer.ip());
        if !self.trusts(peer) {
            return peer;
        }
        if headers.contains_key("forwarded") {
            return self.forwarded_hop(headers).and_then(|hop| hop.for_ip).map_or(peer, unmapped);
        }
        let chain: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in chain.iter().rev() {
            let Ok(ip) = hop.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else { break };
            client = unmapped(ip);
            if !self.trusts(client) {
                break;
            }
        }
        client
    }

    /// The `Forwarded` element added by the outermost trusted proxy: walk from the nearest hop back while the
    /// hop's `for` is trusted too.
    fn forwarded_hop(&self, headers: &HeaderMap) -> Option<Hop> {
        let elements: Vec<Hop> = headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| split_outside_quotes(v, ','))
            .map(|e| parse_element(&e))
            .collect();
        let mut chosen = None;
        for hop in elements.into_iter().rev() {
            let next_trusted = hop.for_ip.is_some_and(|ip| self.trusts(ip));
            chosen = Some(hop);
            if !next_trusted {
                break;
            }
        }
        chosen
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Hop {
    for_ip: Option<IpAddr>,
    proto: Option<String>,
    host: Option<String>,
}

fn header(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The last comma-separated value over all occurrences of a header: the one set by the nearest proxy.
fn last_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|v| !v.is_empty())
        .map(|v| v.to_ascii_lowercase())
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

fn valid_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 256
        && !p.contains("//")
        && p.split('/').all(|s| s != "." && s != "..")
        && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(host, |(h, _)| h)
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out
}

fn parse_element(element: &str) -> Hop {
    let mut hop = Hop::default();
    for pair in split_outside_quotes(element, ';') {
        let Some((key, value)) = pair.split_once('=') else { continue };
        let value = value.trim().trim_matches('"');
        match key.trim().to_ascii_lowercase().as_str() {
            "for" => {
                let addr = value.trim_start_matches('[');
                let addr = addr.split(']').next().unwrap_or(addr);
                hop.for_ip = addr
                    .parse::<IpAddr>()
                    .ok()
                    .or_else(|| addr.rsplit_once(':').and_then(|(ip, _)| ip.parse::<IpAddr>().ok()));
            }
            "proto" => {
                let v = value.to_ascii_lowercase();
                if v == "http" || v == "https" {
                    hop.proto = Some(v);
                }
            }
            "host" if valid_host(value) => hop.host = Some(value.to_owned()),
            _ => {}
        }
    }
    hop
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap_or(http::header::HOST),
                v.parse().unwrap_or(http::HeaderValue::from_static("")),
            );
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 40000)
    }

    /// (what, config, peer, headers, expected base)
    type Case<'a> = (&'a str, &'a PublicConfig, &'a str, Vec<(&'a str, &'a str)>, &'a str);

    #[test]
    fn client_address_table() {
        let trusted = PublicConfig::new(None, &["10.0.0.0/8".into()]).unwrap_or_default();
        let none = PublicConfig::default();
        let xff = |v: &'static str| vec![("x-forwarded-for", v)];
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("no proxy", &none, "203.0.113.9", vec![], "203.0.113.9"),
            ("untrusted peer's headers ignored", &none, "203.0.113.9", xff("198.51.100.1"), "203.0.113.9"),
            ("one trusted proxy", &trusted, "10.0.0.5", xff("198.51.100.1"), "198.51.100.1"),
            ("a client-forged hop before the real one", &trusted, "10.0.0.5", xff("1.2.3.4, 198.51.100.1"), "198.51.100.1"),
            ("trusted hops walked", &trusted, "10.0.0.5", xff("198.51.100.1, 10.0.0.9"), "198.51.100.1"),
            ("two headers", &trusted, "10.0.0.5", vec![("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "10.0.0.9")], "198.51.100.1"),
            ("garbage stops at the last proxy", &trusted, "10.0.0.5", xff("nonsense, 10.0.0.9"), "10.0.0.9"),
            ("no header", &trusted, "10.0.0.5", vec![], "10.0.0.5"),
            ("ipv4-mapped peer", &none, "::ffff:203.0.113.9", vec![], "203.0.113.9"),
            ("Forwarded wins", &trusted, "10.0.0.5", vec![("forwarded", "for=198.51.100.7;proto=https"), ("x-forwarded-for", "1.2.3.4")], "198.51.100.7"),
            ("Forwarded v6", &trusted, "10.0.0.5", vec![("forwarded", "for=\"[2001:db8::1]:4711\", for=10.0.0.9")], "2001:db8::1"),
            ("Forwarded obfuscated", &trusted, "10.0.0.5", vec![("forwarded", "for=_hidden")], "10.0.0.5"),
        ];
        for (what, config, from, hdrs, want) in cases {
            assert_eq!(config.client_ip(peer(from), &headers(&hdrs)).to_string(), want, "{what}");
        }
    }

    #[test]
    fn public_base_table() {
        let uri: Uri = "/fhir/Patient".parse().unwrap_or_default();
        let trusted = PublicConfig::new(None, &["10.0.0.0/8".into(), "127.0.0.1".into()]).unwrap_or_default();
        let none = PublicConfig::default();
        let fixed = PublicConfig::new(Some("https://fhir.example.org/gw/"), &["10.0.0.0/8".into()]).unwrap_or_default();
        let lb = [("host", "10.1.2.3:8080"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "fhir.example.org")];
        let cases: Vec<Case> = vec![
            ("no proxy", &none, "203.0.113.9", vec![("host", "gw.local:8080")], "http://gw.local:8080/fhir"),
            ("untrusted peer's headers ignored", &none, "203.0.113.9", lb.to_vec(), "http://10.1.2.3:8080/fhir"),
            ("trusted LB", &trusted, "10.9.9.9", lb.to_vec(), "https://fhir.example.org/fhir"),
            ("ipv4-mapped peer", &trusted, "::ffff:10.9.9.9", lb.to_vec(), "https://fhir.example.org/fhir"),
            ("configured base wins", &fixed, "10.9.9.9", lb.to_vec(), "https://fhir.example.org/gw/fhir"),
            (
                "port and prefix",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "api.example.org"),
                    ("x-forwarded-port", "8443"),
                    ("x-forwarded-prefix", "/tenant-gw/"),
                ],
                "https://api.example.org:8443/tenant-gw/fhir",
            ),
            (
                "default port dropped",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "api.example.org:443"),
                    ("x-forwarded-port", "443"),
                ],
                "https://api.example.org/fhir",
            ),
            (
                "appended lists: the nearest value counts",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    ("x-forwarded-host", "evil.example, fhir.example.org"),
                    ("x-forwarded-proto", "http, https"),
                ],
                "https://fhir.example.org/fhir",
            ),
            (
                "bad prefix ignored",
                &trusted,
                "10.9.9.9",
                vec![("host", "h"), ("x-forwarded-prefix", "/../admin")],
                "http://h/fhir",
            ),
            (
                "bad host ignored",
                &trusted,
                "10.9.9.9",
                vec![("host", "h"), ("x-forwarded-host", "evil.example/path")],
                "http://h/fhir",
            ),
            (
                "bad proto ignored",
                &trusted,
                "10.9.9.9",
                vec![("host", "h"), ("x-forwarded-proto", "javascript")],
                "http://h/fhir",
            ),
            (
                "Forwarded, one hop",
                &trusted,
                "10.9.9.9",
                vec![("host", "x"), ("forwarded", "for=203.0.113.9;proto=https;host=fhir.example.org")],
                "https://fhir.example.org/fhir",
            ),
            (
                "Forwarded, client-forged element before the edge's",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    (
                        "forwarded",
                        "for=1.2.3.4;host=evil.example;proto=http, for=203.0.113.9;proto=https;host=fhir.example.org",
                    ),
                ],
                "https://fhir.example.org/fhir",
            ),
            (
                "Forwarded, edge then internal proxy",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    (
                        "forwarded",
                        "for=203.0.113.9;proto=https;host=fhir.example.org, for=10.0.0.5;proto=http;host=internal:8080",
                    ),
                ],
                "https://fhir.example.org/fhir",
            ),
            (
                "Forwarded wins over X-Forwarded",
                &trusted,
                "10.9.9.9",
                vec![
                    ("host", "x"),
                    ("x-forwarded-host", "other.example"),
                    ("forwarded", "for=\"[2001:db8::1]:4711\";proto=https;host=\"fhir.example.org\""),
                ],
                "https://fhir.example.org/fhir",
            ),
            (
                "Forwarded from an untrusted peer",
                &trusted,
                "203.0.113.7",
                vec![("host", "h"), ("forwarded", "proto=https;host=evil.example")],
                "http://h/fhir",
            ),
            ("no host at all", &none, "203.0.113.9", vec![], "http://localhost/fhir"),
        ];
        for (what, cfg, ip, hs, want) in cases {
            assert_eq!(cfg.base(peer(ip), &uri, &headers(&hs), "/fhir"), want, "{what}");
        }
    }

    #[test]
    fn config_errors() {
        assert!(PublicConfig::new(Some("fhir.example.org"), &[]).is_err());
        assert!(PublicConfig::new(Some("https://x/?a=b"), &[]).is_err());
        assert!(PublicConfig::new(None, &["not-a-cidr".into()]).is_err());
        assert!(PublicConfig::new(None, &["10.0.0.0/8, 192.168.0.1".into(), "::1".into()]).is_ok());
    }
}
