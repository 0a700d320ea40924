//! Client-supplied callback URLs, and why one may be refused (SSRF protection).
//!
//! A callback URL comes from a client, so sending to it must never reach into the cluster:
//! loopback, private, link-local (the cloud metadata address 169.254.169.254 among them),
//! unique-local, multicast, unspecified, reserved and documentation ranges are refused, and
//! so are addresses that embed an IPv4 one (IPv4-mapped and -compatible IPv6, 6to4, Teredo,
//! NAT64), because the IPv4 inside could be any of the above. Numeric spellings of hosts
//! (`2130706433`, `0x7f.1`, `0177.0.0.1`) are normalised by the URL parser to the address
//! they mean before the check. Only http and https, no credentials in the URL.
//!
//! The URL is checked when the upload is created and again at every delivery
//! ([`CallbackPolicy::check_url`]: scheme, credentials, allowlist, literal addresses). The
//! addresses a host name resolves to are checked each time the delivery client opens a
//! connection ([`CallbackPolicy::resolve_host`] is its DNS resolver), so the addresses checked
//! are the ones connected to: DNS cannot answer differently between the check and the
//! connection, and a name that later resolves somewhere refused (DNS rebinding) is refused
//! then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use url::{Host, Url};

/// Why a callback is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("is not a valid absolute URL")]
    Invalid,
    #[error("must use http or https")]
    Scheme,
    #[error("must not carry credentials")]
    Credentials,
    #[error("host {0} is not on the operator's allowlist")]
    NotAllowed(String),
    #[error("address {0} is {1}")]
    Address(IpAddr, &'static str),
    #[error("host {0} does not resolve")]
    Unresolvable(String),
}

/// The operator's rules for client callbacks.
#[derive(Clone, Debug, Default)]
pub struct CallbackPolicy {
    /// Host patterns (`hooks.example.com`, `*.example.org`); empty: any host.
    allowlist: Vec<String>,
    /// Networks allowed even though they are not public.
    allow_networks: Vec<IpNet>,
}

/// Resolves host names; the system's resolver in production, a table in tests.
#[async_trait::async_trait]
pub trait Resolve: Send + Sync {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver.
pub struct SystemResolver;

#[async_trait::async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

impl CallbackPolicy {
    /// From configuration; a malformed network is an error naming it.
    pub fn new(allowlist: &[String], allow_networks: &[String]) -> Result<Self, String> {
        let allow_networks = allow_networks
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{n:?} is not a network such as 10.1.0.0/16"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allowlist: allowlist.iter().map(|h| h.to_ascii_lowercase()).collect(),
            allow_networks,
        })
    }

    /// Checks the URL itself: scheme, credentials, allowlist, and the address when the host
    /// is one.
    pub fn check_url(&self, raw: &str) -> Result<Url, Refusal> {
        let url = Url::parse(raw).map_err(|_| Refusal::Invalid)?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(Refusal::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal::Credentials);
        }
        let host = url.host().ok_or(Refusal::Invalid)?;
        let name = match &host {
            Host::Domain(d) => d.to_ascii_lowercase(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => ip.to_string(),
        };
        if !self.allowlist.is_empty() && !self.allowlist.iter().any(|p| matches_pattern(p, &name)) {
            return Err(Refusal::NotAllowed(name));
        }
        match host {
            Host::Ipv4(ip) => self.check_addr(IpAddr::V4(ip))?,
            Host::Ipv6(ip) => self.check_addr(IpAddr::V6(ip))?,
            Host::Domain(_) => {}
        }
        Ok(url)
    }

    /// Resolves a callback's host name and checks every address it resolves to; returns
    /// them all, the only ones a connection may then go to. All must pass: a name that
    /// resolves to one public and one private address is refused. A name that does not
    /// resolve is refused too. Literal addresses are not resolved: [`Self::check_url`]
    /// checks those.
    pub async fn resolve_host(
        &self,
        host: &str,
        port: u16,
        resolver: &dyn Resolve,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let addrs = resolver
            .resolve(host, port)
            .await
            .map_err(|_| Refusal::Unresolvable(host.to_owned()))?;
        if addrs.is_empty() {
            return Err(Refusal::Unresolvable(host.to_owned()));
        }
        for addr in &addrs {
            self.check_addr(addr.ip())?;
        }
        Ok(addrs)
    }

    /// Refuses an address that is not public, unless the operator allowed its network.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.allow_networks.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match non_public(ip) {
            Some(why) => Err(Refusal::Address(ip, why)),
            None => Ok(()),
        }
    }
}

/// `*.example.org` matches subdomains of example.org (not example.org itself); anything
/// else matches exactly.
fn matches_pattern(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => pattern == host,
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(ip) & mask) == (u128::from(Ipv6Addr::from(net)) & mask)
}

/// Why an address is not a public unicast one, if it is not.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            let ranges: [([u16; 8], u8, &'static str); 12] = [
                ([0; 8], 128, "unspecified"),
                ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
                ([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "an IPv4-mapped address"),
                ([0; 8], 96, "an IPv4-compatible address"),
                ([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "a NAT64 address"),
                ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "a Teredo address"),
                ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "a 6to4 address"),
                ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
                ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique-local"),
                ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
                ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
                ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
            ];
            ranges
                .into_iter()
                .find(|(net, prefix, _)| in_v6(v6, *net, *prefix))
                .map(|(_, _, why)| why)
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let ranges: [([u8; 4], u8, &'static str); 16] = [
        ([0, 0, 0, 0], 8, "unspecified (this network)"),
        ([10, 0, 0, 0], 8, "private"),
        ([100, 64, 0, 0], 10, "shared address space (CGNAT)"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 0, 0], 16, "link-local (cloud metadata)"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 0, 0, 0], 24, "IETF protocol assignments"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([192, 88, 99, 0], 24, "6to4 relay anycast"),
        ([192, 168, 0, 0], 16, "private"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
        ([255, 255, 255, 255], 32, "broadcast"),
    ];
    ranges
        .into_iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| why)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A resolver from a table: nothing leaves the machine.
    struct Table(HashMap<&'static str, Vec<IpAddr>>);

    #[async_trait::async_trait]
    impl Resolve for Table {
        async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            self.0
                .get(host)
                .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
                .ok_or_else(|| std::io::Error::other("no such host"))
        }
    }

    fn table() -> Table {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        Table(HashMap::from([
            ("public.example", vec![ip("93.184.216.34")]),
            (
                "public6.example",
                vec![ip("2606:2800:220:1:248:1893:25c8:1946")],
            ),
            ("metadata.example", vec![ip("169.254.169.254")]),
            ("loop.example", vec![ip("127.0.0.1")]),
            ("mixed.example", vec![ip("93.184.216.34"), ip("10.0.0.1")]),
            ("mapped.example", vec![ip("::ffff:127.0.0.1")]),
            ("ula.example", vec![ip("fd00::1")]),
            ("partner.example", vec![ip("10.20.0.5")]),
            ("empty.example", vec![]),
        ]))
    }

    /// What a delivery checks: the URL, then, for a host name, every address it resolves to
    /// (the delivery client's resolver); the addresses a connection may go to.
    async fn admit(
        policy: &CallbackPolicy,
        raw: &str,
        resolver: &dyn Resolve,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let url = policy.check_url(raw)?;
        let port = url.port_or_known_default().ok_or(Refusal::Invalid)?;
        match url.host().ok_or(Refusal::Invalid)? {
            Host::Domain(name) => policy.resolve_host(name, port, resolver).await,
            Host::Ipv4(ip) => Ok(vec![SocketAddr::new(ip.into(), port)]),
            Host::Ipv6(ip) => Ok(vec![SocketAddr::new(ip.into(), port)]),
        }
    }

    #[tokio::test]
    async fn the_refusal_table() {
        let policy = CallbackPolicy::default();
        let resolver = table();
        let refused = [
            "ftp://public.example/",
            "file:///etc/passwd",
            "http://user:pw@public.example/",
            "not a url",
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.0.0.1/",
            "http://017700000001/",
            "http://0177.0.0.1/",
            "http://localhost.localdomain./",
            "http://[::1]/",
            "http://[::]/",
            "http://0.0.0.0/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:7f00:1::]/",
            "http://metadata.example/",
            "http://loop.example:8080/",
            "http://mixed.example/",
            "http://mapped.example/",
            "http://ula.example/",
            "http://partner.example/",
            "http://nowhere.example/",
            "http://empty.example/",
        ];
        for raw in refused {
            assert!(
                admit(&policy, raw, &resolver).await.is_err(),
                "{raw} was allowed"
            );
        }
        let ok = admit(&policy, "https://public.example/hook?x=1", &resolver)
            .await
            .unwrap();
        assert_eq!(ok, vec!["93.184.216.34:443".parse().unwrap()]);
        assert!(
            admit(&policy, "http://public6.example:8080/", &resolver)
                .await
                .is_ok()
        );
        assert!(
            admit(&policy, "http://93.184.216.34/", &resolver)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_name_with_one_refused_address_among_public_ones_is_refused_for_that_address() {
        let refusal = CallbackPolicy::default()
            .resolve_host("mixed.example", 80, &table())
            .await
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Address("10.0.0.1".parse().unwrap(), "private")
        );
    }

    /// Answers a public address first and loopback afterwards, as a rebinding name does.
    struct Rebinding(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl Resolve for Rebinding {
        async fn resolve(&self, _host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ip: IpAddr = if n == 0 {
                "93.184.216.34".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            };
            Ok(vec![SocketAddr::new(ip, port)])
        }
    }

    #[tokio::test]
    async fn every_resolution_is_checked_anew() {
        let policy = CallbackPolicy::default();
        let resolver = Rebinding(Default::default());
        assert!(
            policy
                .resolve_host("rebind.example", 80, &resolver)
                .await
                .is_ok()
        );
        assert!(matches!(
            policy.resolve_host("rebind.example", 80, &resolver).await,
            Err(Refusal::Address(_, "loopback"))
        ));
    }

    #[tokio::test]
    async fn the_operator_can_allow_hosts_and_networks() {
        let resolver = table();
        let policy = CallbackPolicy::new(&["*.example".into()], &["10.20.0.0/16".into()]).unwrap();
        assert!(
            admit(&policy, "http://partner.example/", &resolver)
                .await
                .is_ok()
        );
        assert!(
            admit(&policy, "http://loop.example/", &resolver)
                .await
                .is_err(),
            "other private ranges stay refused"
        );
        assert!(matches!(
            policy.check_url("http://evil.test/"),
            Err(Refusal::NotAllowed(_))
        ));
        assert!(
            policy.check_url("http://example/").is_err(),
            "the wildcard needs a subdomain"
        );
        assert!(CallbackPolicy::new(&[], &["nonsense".into()]).is_err());
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2001:4860:4860::8888",
            "93.184.216.34",
        ] {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
    }
}
