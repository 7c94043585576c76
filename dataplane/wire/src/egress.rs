//! Where backends may point: the admin's decision, not the tenant's.
//!
//! Checked twice: by the operator when it compiles a route (the URL's host, so the route
//! gets a condition a person can act on), and by a proxy that follows the operator when it
//! opens a connection (the addresses the host resolves to, so a name that resolves to a
//! refused address — DNS rebinding, `*.nip.io`-style names — is refused too).
//!
//! A tenant who may create a ModelRoute could otherwise point `url` at the cloud metadata
//! service, at the proxies' own loopback, or at cluster-internal Services, and have the
//! proxy send a credential there. Built-in denials: loopback, link-local (169.254.0.0/16,
//! fe80::/10, where cloud metadata lives), the unspecified address, `localhost` and the
//! metadata hostnames. Admins add denials (`--deny-upstream`, e.g. `--service-cidr`) and
//! may list what is allowed (`--allow-upstream`); an explicit allow wins over a built-in
//! denial, so a test or a deliberate in-cluster backend can be permitted by name.

use std::net::IpAddr;

/// One entry: a CIDR, an exact host, or `*.domain` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Cidr(IpAddr, u8),
    Host(String),
    Suffix(String),
}

impl Rule {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some((addr, len)) = s.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?;
            return Ok(Self::Cidr(addr, len));
        }
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(Self::Cidr(ip, if ip.is_ipv4() { 32 } else { 128 }));
        }
        if let Some(d) = s.strip_prefix("*.") {
            if d.is_empty() {
                return Err(format!("{s:?}: empty domain"));
            }
            return Ok(Self::Suffix(format!(".{d}")));
        }
        if s.is_empty() || s.contains(['/', ':', '*', ' ']) {
            return Err(format!("{s:?} is not a host, *.domain or CIDR"));
        }
        Ok(Self::Host(s))
    }

    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Self::Cidr(net, len), Host::Ip(ip)) => in_cidr(*ip, *net, *len),
            (Self::Host(h), Host::Name(n)) => h == n,
            (Self::Suffix(d), Host::Name(n)) => n.ends_with(d.as_str()),
            _ => false,
        }
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The IPv4 forms the C library accepts besides dotted quads: 1 to 4 parts, each decimal,
/// octal (leading 0) or hex (0x), the last part filling the remaining bytes.
fn inet_aton(s: &str) -> Option<IpAddr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let n = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            u64::from_str_radix(h, 16).ok()?
        } else if p.len() > 1 && p.starts_with('0') {
            u64::from_str_radix(&p[1..], 8).ok()?
        } else if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse().ok()?
        } else {
            return None;
        };
        nums.push(n);
    }
    let (last, head) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let room = 32 - 8 * head.len() as u32;
    if *last >= 1u64 << room {
        return None;
    }
    Some(IpAddr::V4(std::net::Ipv4Addr::from((value | last) as u32)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

const BUILT_IN_DENY: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "0.0.0.0/8",
    "::/128",
    "fd00:ec2::254/128",
    "localhost",
    "*.localhost",
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
];

#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        Self::new(&[], &[]).expect("built-in rules parse")
    }
}

impl UpstreamPolicy {
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |v: &[String]| {
            v.iter()
                .map(|s| Rule::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut all_deny = BUILT_IN_DENY
            .iter()
            .map(|s| Rule::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        all_deny.extend(parse(deny)?);
        Ok(Self {
            allow: parse(allow)?,
            deny: all_deny,
        })
    }

    /// May a connection to `ip`, resolved from `host`, be opened? An explicit allow (of the
    /// name or the address) wins; otherwise a refused address is refused, whatever the name.
    pub fn admits(&self, host: &str, ip: IpAddr) -> bool {
        let name = Host::Name(host.trim_end_matches('.').to_ascii_lowercase());
        let addr = Host::Ip(ip);
        if self
            .allow
            .iter()
            .any(|r| r.matches(&name) || r.matches(&addr))
        {
            return true;
        }
        !self.deny.iter().any(|r| r.matches(&addr))
    }

    /// Check a backend URL; the error says why, for a route condition.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("url {url:?} is not a valid URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!("url {url:?} must be http:// or https://"));
        }
        let raw = uri
            .host()
            .ok_or_else(|| format!("url {url:?} has no host"))?
            .trim_matches(['[', ']'])
            .trim_end_matches('.')
            .to_ascii_lowercase();
        // `getaddrinfo` also reads `2852039166`, `0xa9fea9fe` or `169.254.43518` as
        // addresses; judge them as the address they are.
        let host = match raw.parse::<IpAddr>().ok().or_else(|| inet_aton(&raw)) {
            Some(ip) => Host::Ip(ip),
            None => Host::Name(raw.clone()),
        };
        if self.allow.iter().any(|r| r.matches(&host)) {
            return Ok(());
        }
        if !self.allow.is_empty() {
            return Err(format!(
                "upstream host {raw:?} is not in the operator's allowed upstreams (--allow-upstream)"
            ));
        }
        if self.deny.iter().any(|r| r.matches(&host)) {
            return Err(format!(
                "upstream host {raw:?} is refused by the operator's upstream policy (loopback, link-local and cloud metadata addresses, the cluster's Service range and --deny-upstream entries are not allowed)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_denials_and_admin_allows() {
        let p = UpstreamPolicy::new(&[], &["10.96.0.0/12".into(), "*.svc.cluster.local".into()])
            .unwrap();
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:8000/v1",
            "http://[::1]/v1",
            "http://[::ffff:169.254.169.254]/",
            "http://localhost:11434/v1",
            "http://metadata.google.internal/",
            "http://10.96.0.10/v1",
            "http://2852039166/",
            "http://0xa9fea9fe/",
            "http://169.254.43518/",
            "http://0251.0376.0251.0376/",
            "http://127.1:8000/v1",
            "http://kubernetes.default.svc.cluster.local/",
            "file:///etc/passwd",
        ] {
            assert!(p.check(bad).is_err(), "{bad} should be refused");
        }
        for ok in [
            "https://api.openai.com/v1",
            "http://10.1.2.3:8000/v1",
            "http://vllm.models:8000/v1",
        ] {
            assert!(p.check(ok).is_ok(), "{ok} should pass");
        }
        let allow =
            UpstreamPolicy::new(&["127.0.0.1/32".into(), "*.openai.com".into()], &[]).unwrap();
        assert!(
            allow.check("http://127.0.0.1:9/v1").is_ok(),
            "explicit allow wins"
        );
        assert!(allow.check("https://api.openai.com/v1").is_ok());
        let e = allow.check("https://evil.example/v1").unwrap_err();
        assert!(
            e.contains("evil.example") && e.contains("--allow-upstream"),
            "{e}"
        );
        assert!(Rule::parse("10.0.0.0/33").is_err());
        assert!(Rule::parse("*.").is_err());
    }
}
