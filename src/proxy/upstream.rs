//! The upstream policy: which addresses an API caller's `upstream` may point the proxy at.
//!
//! An `upstream` sandbox aims the proxy at the network, so without a policy any credential
//! that may register one could read, through the gateway, whatever the gateway itself can
//! reach: the cloud metadata service at 169.254.169.254, the telemetry listener, databases on
//! loopback (SSRF). [`UpstreamPolicy`] is the one rule book, applied twice:
//!
//! - when the sandbox is registered (the control API answers 422 with the reason), and
//! - at every new upstream connection, by [`PolicedConnector`]: a host name is resolved again
//!   each time and every address it resolves to is held to the same rules, so a name that
//!   passed at registration and is later pointed at a refused address (DNS rebinding) is still
//!   refused before a single packet goes to it.
//!
//! Process (`command`) sandboxes are reached at addresses the orchestrator chose itself
//! (127.0.0.1 host ports, a node's `advertise_addr`), so the policy never applies to them:
//! their routes keep the plain connector and pay nothing for it.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A network in `[gateway] upstream_allow`, such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`)
    /// reaches the IPv4 host, so it is matched as that IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, unmap(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Parses `address/prefix` strictly: the address bits past the prefix must be zero, so a
    /// typo such as `10.0.0.1/8` is an error rather than a silently wider network.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(format!(
                "`{s}` is not a network such as 10.0.0.0/8 or fd00::/8 (the /prefix is required)"
            ));
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{s}`: the prefix must be a number from 0 to {max}"))?;
        let cidr = Cidr { network, prefix };
        let canonical = match network {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if canonical != network {
            return Err(format!(
                "`{s}` has bits set past its /{prefix} prefix; write {canonical}/{prefix}"
            ));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One of the gateway's own listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `[gateway] listen`: the control API and every sandbox host.
    Tls,
    /// `[telemetry] listen`: metrics and health.
    Telemetry,
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// 169.254.0.0/16 or fe80::/10: where cloud metadata services answer.
    LinkLocal,
    /// 224.0.0.0/4 or ff00::/8.
    Multicast,
    /// 0.0.0.0/8 or `::`: connecting there reaches this host.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// The gateway's own listener: the proxy would call itself (the telemetry listener, or the
    /// control API with a sandbox's identity headers).
    OwnListener(Listener),
    /// Outside every network `[gateway] upstream_allow` lists.
    NotAllowed,
}

/// An address the upstream policy refuses, and why. The message names the address and
/// `upstream_allow`, and carries nothing secret: it is shown to the API caller who named it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Refused {
    /// The address as it was given or resolved (an IPv4-mapped form stays as written).
    pub address: SocketAddr,
    pub reason: Reason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.address.ip();
        match self.reason {
            Reason::LinkLocal => write!(
                f,
                "`{ip}` is link-local (169.254.0.0/16, fe80::/10: where cloud metadata services answer)"
            )?,
            Reason::Multicast => write!(f, "`{ip}` is a multicast address")?,
            Reason::Unspecified => write!(
                f,
                "`{ip}` is an unspecified address (0.0.0.0/8, ::), which reaches this host"
            )?,
            Reason::Broadcast => write!(f, "`{ip}` is the broadcast address")?,
            Reason::OwnListener(which) => write!(
                f,
                "`{}` is this gateway's own {} listener",
                self.address,
                match which {
                    Listener::Tls => "TLS",
                    Listener::Telemetry => "telemetry",
                }
            )?,
            Reason::NotAllowed => {
                return write!(
                    f,
                    "`{ip}` is outside every network in `[gateway] upstream_allow`; the operator can add its network there"
                )
            }
        }
        f.write_str(", which no upstream may be, whatever `[gateway] upstream_allow` lists")
    }
}

/// The rules for `upstream` addresses (see the module documentation).
#[derive(Debug)]
pub struct UpstreamPolicy {
    /// `[gateway] upstream_allow`; empty: every address the fixed rules let through.
    allow: Vec<Cidr>,
    /// The listeners as configured, until [`UpstreamPolicy::set_listeners`] says where they
    /// were really bound (a configured port 0 becomes a real port only then).
    configured: [(SocketAddr, Listener); 2],
    bound: OnceLock<[(SocketAddr, Listener); 2]>,
}

impl UpstreamPolicy {
    pub fn new(allow: Vec<Cidr>, tls: SocketAddr, telemetry: SocketAddr) -> UpstreamPolicy {
        UpstreamPolicy {
            allow,
            configured: [(tls, Listener::Tls), (telemetry, Listener::Telemetry)],
            bound: OnceLock::new(),
        }
    }

    /// Built from `[gateway] upstream_allow` and the two listen addresses.
    pub fn from_config(config: &crate::config::Config) -> UpstreamPolicy {
        UpstreamPolicy::new(
            config.gateway.upstream_allow.clone(),
            config.gateway.listen,
            config.telemetry.listen,
        )
    }

    /// Records the addresses the listeners were actually bound to. Only the first call counts:
    /// one gateway serves one set of listeners.
    pub fn set_listeners(&self, tls: SocketAddr, telemetry: SocketAddr) {
        let _ = self
            .bound
            .set([(tls, Listener::Tls), (telemetry, Listener::Telemetry)]);
    }

    fn listeners(&self) -> &[(SocketAddr, Listener); 2] {
        self.bound.get().unwrap_or(&self.configured)
    }

    /// Whether the proxy may connect to `address`. Costs a few comparisons, plus one `bind`
    /// system call only when the port is that of a listener bound to an unspecified address.
    pub fn check(&self, address: SocketAddr) -> Result<(), Refused> {
        let refuse = |reason| Err(Refused { address, reason });
        let ip = unmap(address.ip());
        if let Some(reason) = fixed_reason(ip) {
            return refuse(reason);
        }
        for &(listener, which) in self.listeners() {
            if listener.port() != address.port() {
                continue;
            }
            let listener_ip = unmap(listener.ip());
            if listener_ip == ip || (listener_ip.is_unspecified() && is_local(ip)) {
                return refuse(Reason::OwnListener(which));
            }
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(ip)) {
            return refuse(Reason::NotAllowed);
        }
        Ok(())
    }
}

/// The refusals that hold whatever `upstream_allow` says.
fn fixed_reason(ip: IpAddr) -> Option<Reason> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some(Reason::Unspecified)
            } else if v6.is_multicast() {
                Some(Reason::Multicast)
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some(Reason::LinkLocal)
            } else {
                // NAT64's well-known prefix (RFC 6052) carries an IPv4 address that a
                // translator would connect to: hold it to the IPv4 rules too.
                nat64_embedded(v6).and_then(v4_reason)
            }
        }
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<Reason> {
    if ip.octets()[0] == 0 {
        Some(Reason::Unspecified)
    } else if ip.is_broadcast() {
        Some(Reason::Broadcast)
    } else if ip.is_link_local() {
        Some(Reason::LinkLocal)
    } else if ip.is_multicast() {
        Some(Reason::Multicast)
    } else {
        None
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it reaches.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address inside `64:ff9b::/96`, if that is what `ip` is.
fn nat64_embedded(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
        let o = ip.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    })
}

/// Whether `ip` is one of this host's addresses, which is what a listener bound to an
/// unspecified address answers on: binding a socket to it succeeds only then.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Why the policed connector did not hand back a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The upstream policy refused an address the host is or resolves to.
    #[error("upstream `{host}`: {refused}")]
    Refused { host: Box<str>, refused: Refused },
    /// The host name did not resolve.
    #[error("upstream `{host}` does not resolve: {source}")]
    Resolve {
        host: Box<str>,
        #[source]
        source: std::io::Error,
    },
    /// Every address refused the connection.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// Resolution and connection took longer than `[gateway] upstream_connect_timeout_secs`.
    #[error("connect timed out")]
    Timeout,
    /// The target URI has no host.
    #[error("the upstream target has no host")]
    NoHost,
}

/// Connects `upstream` sandboxes' traffic, holding every address to the [`UpstreamPolicy`]
/// before connecting to it: an IP literal with no resolution at all, a host name resolved
/// afresh on every connect (never cached here), each of its addresses checked.
///
/// A hyper-util `HttpConnector` with a custom resolver cannot do this alone: its resolver is
/// given the host name only, never the port, and the own-listener rule is about the port.
#[derive(Debug, Clone)]
pub struct PolicedConnector {
    policy: Arc<UpstreamPolicy>,
    timeout: Duration,
}

impl PolicedConnector {
    pub fn new(policy: Arc<UpstreamPolicy>, timeout: Duration) -> PolicedConnector {
        PolicedConnector { policy, timeout }
    }

    /// A TCP connection to `host:port` (`host` an IP literal, bracketed or not, or a name).
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        self.connect_with(host, port, |host, port| async move {
            tokio::net::lookup_host((host, port))
                .await
                .map(Iterator::collect)
        })
        .await
    }

    /// [`PolicedConnector::connect`] with the name resolution supplied (tests substitute it).
    async fn connect_with<F, Fut>(
        &self,
        host: &str,
        port: u16,
        resolve: F,
    ) -> Result<TcpStream, ConnectError>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let refused = |refused| ConnectError::Refused {
            host: host.into(),
            refused,
        };
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let address = SocketAddr::new(ip, port);
            self.policy.check(address).map_err(refused)?;
            return connect_one(address, deadline).await;
        }
        let addrs = match tokio::time::timeout_at(deadline, resolve(bare.to_owned(), port)).await {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(source)) => {
                return Err(ConnectError::Resolve {
                    host: host.into(),
                    source,
                })
            }
            Ok(Ok(addrs)) if addrs.is_empty() => {
                return Err(ConnectError::Resolve {
                    host: host.into(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
                })
            }
            Ok(Ok(addrs)) => addrs,
        };
        // Every address, not just the first: a name that mixes an allowed address with a
        // refused one is refused outright rather than connected to in part.
        for &address in &addrs {
            self.policy
                .check(SocketAddr::new(address.ip(), port))
                .map_err(refused)?;
        }
        let mut last = ConnectError::Timeout;
        for (i, &address) in addrs.iter().enumerate() {
            // Each remaining address gets an equal share of the time left, as HttpConnector
            // does, so one black-holed address cannot use up the whole budget.
            let left = u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            let now = tokio::time::Instant::now();
            let share = deadline.saturating_duration_since(now) / left;
            match connect_one(SocketAddr::new(address.ip(), port), now + share).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn connect_one(
    address: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Err(e)) => Err(ConnectError::Connect(e)),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// The connector as hyper's client pool uses it: one call per new pooled connection.
impl tower::Service<Uri> for PolicedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = dst.host().ok_or(ConnectError::NoHost)?;
            let port = dst.port_u16().unwrap_or(80);
            this.connect(host, port).await.map(TokioIo::new)
        })
    }
}

/// The policy refusal in an error's source chain (as hyper's client wraps connector errors),
/// with the host it was for.
pub fn refusal<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<(&'e str, &'e Refused)> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(ConnectError::Refused { host, refused }) = e.downcast_ref::<ConnectError>() {
            return Some((host, refused));
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy(allow: &[&str]) -> UpstreamPolicy {
        UpstreamPolicy::new(
            allow.iter().map(|c| c.parse().unwrap()).collect(),
            sa("127.0.0.1:8443"),
            sa("127.0.0.1:9464"),
        )
    }

    fn reason(p: &UpstreamPolicy, addr: &str) -> Option<Reason> {
        p.check(sa(addr)).err().map(|r| r.reason)
    }

    #[test]
    fn cidrs_parse_strictly() {
        for good in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "10.1.2.3/32",
            "fd00::/8",
            "::/0",
            "::1/128",
        ] {
            let c: Cidr = good.parse().unwrap();
            assert_eq!(c.to_string(), good);
        }
        for (bad, says) in [
            ("10.0.0.0", "prefix is required"),
            ("10.0.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.0.0.0/-1", "0 to 32"),
            ("10.0.0.0/", "0 to 32"),
            ("ten/8", "not an IP address"),
            ("10.0.0.1/8", "write 10.0.0.0/8"),
            ("fd00::1/8", "write fd00::/8"),
            ("", "prefix is required"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.255.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12:3456::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let host: Cidr = "127.0.0.2/32".parse().unwrap();
        assert!(host.contains("127.0.0.2".parse().unwrap()));
        assert!(!host.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn every_fixed_class_is_refused_whatever_the_allow_list() {
        let cases = [
            ("169.254.169.254:80", Reason::LinkLocal),
            ("169.254.0.1:8000", Reason::LinkLocal),
            ("[fe80::1]:80", Reason::LinkLocal),
            ("[febf::1]:80", Reason::LinkLocal),
            ("224.0.0.1:80", Reason::Multicast),
            ("239.255.255.250:1900", Reason::Multicast),
            ("[ff02::1]:80", Reason::Multicast),
            ("0.0.0.0:80", Reason::Unspecified),
            ("0.1.2.3:80", Reason::Unspecified),
            ("[::]:80", Reason::Unspecified),
            ("255.255.255.255:80", Reason::Broadcast),
            // IPv4-mapped IPv6 reaches the IPv4 host, and NAT64 would.
            ("[::ffff:169.254.169.254]:80", Reason::LinkLocal),
            ("[::ffff:224.0.0.1]:80", Reason::Multicast),
            ("[::ffff:0.0.0.0]:80", Reason::Unspecified),
            ("[::ffff:255.255.255.255]:80", Reason::Broadcast),
            ("[64:ff9b::a9fe:a9fe]:80", Reason::LinkLocal),
        ];
        for allow in [&[][..], &["0.0.0.0/0", "::/0"][..]] {
            let p = policy(allow);
            for (addr, want) in cases {
                assert_eq!(reason(&p, addr), Some(want), "{addr} with {allow:?}");
            }
        }
    }

    #[test]
    fn ordinary_addresses_pass_by_default() {
        let p = policy(&[]);
        for addr in [
            "127.0.0.1:8000",
            "127.0.0.2:8443",
            "[::1]:8000",
            "10.0.3.7:80",
            "192.168.1.1:443",
            "[fd00::7]:80",
            "[::ffff:10.0.3.7]:80",
            "203.0.113.9:8443",
            "[64:ff9b::a00:307]:80",
        ] {
            assert_eq!(reason(&p, addr), None, "{addr}");
        }
    }

    #[test]
    fn the_gateways_own_listeners_are_refused_by_port() {
        let p = policy(&[]);
        assert_eq!(
            reason(&p, "127.0.0.1:8443"),
            Some(Reason::OwnListener(Listener::Tls))
        );
        assert_eq!(
            reason(&p, "127.0.0.1:9464"),
            Some(Reason::OwnListener(Listener::Telemetry))
        );
        assert_eq!(
            reason(&p, "[::ffff:127.0.0.1]:9464"),
            Some(Reason::OwnListener(Listener::Telemetry))
        );
        // Another port of the same address, or the same port elsewhere, is someone else.
        assert_eq!(reason(&p, "127.0.0.1:8444"), None);
        assert_eq!(reason(&p, "10.0.3.7:8443"), None);

        // Once bound, the real addresses count, not the configured ones.
        p.set_listeners(sa("127.0.0.1:40001"), sa("127.0.0.1:40002"));
        assert_eq!(reason(&p, "127.0.0.1:8443"), None);
        assert_eq!(
            reason(&p, "127.0.0.1:40001"),
            Some(Reason::OwnListener(Listener::Tls))
        );

        // A listener on an unspecified address answers on every local address.
        let wide = UpstreamPolicy::new(Vec::new(), sa("0.0.0.0:443"), sa("[::]:9464"));
        for addr in [
            "127.0.0.1:443",
            "127.8.9.10:443",
            "[::1]:443",
            "127.0.0.1:9464",
        ] {
            assert!(
                matches!(reason(&wide, addr), Some(Reason::OwnListener(_))),
                "{addr}"
            );
        }
        // 203.0.113.0/24 (TEST-NET-3) is never one of this host's addresses.
        assert_eq!(reason(&wide, "203.0.113.9:443"), None);
        assert_eq!(reason(&wide, "127.0.0.1:444"), None);
    }

    #[test]
    fn the_allow_list_narrows() {
        let p = policy(&["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(reason(&p, "10.1.2.3:80"), None);
        assert_eq!(reason(&p, "[::ffff:10.1.2.3]:80"), None);
        assert_eq!(reason(&p, "[fd00::1]:80"), None);
        assert_eq!(reason(&p, "127.0.0.1:80"), Some(Reason::NotAllowed));
        assert_eq!(reason(&p, "[::1]:80"), Some(Reason::NotAllowed));
        assert_eq!(reason(&p, "11.0.0.1:80"), Some(Reason::NotAllowed));
        // The fixed rules come first, so the answer names the real problem.
        assert_eq!(reason(&p, "169.254.169.254:80"), Some(Reason::LinkLocal));
    }

    #[test]
    fn refusals_name_the_address_and_upstream_allow() {
        let p = policy(&["10.0.0.0/8"]);
        for addr in [
            "169.254.169.254:80",
            "[::ffff:169.254.169.254]:80",
            "[ff02::1]:80",
            "127.0.0.1:8443",
            "127.0.0.1:80",
        ] {
            let refused = p.check(sa(addr)).unwrap_err();
            let msg = refused.to_string();
            let ip = sa(addr).ip().to_string();
            assert!(msg.contains(&ip), "{msg}");
            assert!(msg.contains("upstream_allow"), "{msg}");
        }
        let msg = p.check(sa("127.0.0.1:8443")).unwrap_err().to_string();
        assert!(
            msg.contains("127.0.0.1:8443") && msg.contains("TLS"),
            "{msg}"
        );
    }

    /// A listener the policy calls the gateway's own, and a policy around it.
    async fn own_listener() -> (tokio::net::TcpListener, PolicedConnector) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = policy(&[]);
        p.set_listeners(l.local_addr().unwrap(), sa("127.0.0.1:9"));
        (
            l,
            PolicedConnector::new(Arc::new(p), Duration::from_secs(5)),
        )
    }

    /// Nothing connected to `l` within a moment.
    async fn untouched(l: &tokio::net::TcpListener) {
        let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(accepted.is_err(), "the refused address was connected to");
    }

    /// A resolver for IP literals: there must be no call to it.
    async fn never(_: String, _: u16) -> std::io::Result<Vec<SocketAddr>> {
        panic!("an IP literal was resolved")
    }

    #[tokio::test]
    async fn a_name_is_checked_at_every_connect_against_what_it_resolves_to_now() {
        let (l, connector) = own_listener().await;
        let port = l.local_addr().unwrap().port();
        // An innocent service on the same port of another loopback address.
        let innocent = tokio::net::TcpListener::bind(("127.0.0.2", port))
            .await
            .unwrap();
        // The name first resolves to the innocent address, then (rebound) to the gateway's
        // own listener: the second connect must be refused before any packet goes there.
        let answers = std::sync::Mutex::new(vec![vec![sa("127.0.0.1:0")], vec![sa("127.0.0.2:0")]]);
        let resolve = |_: String, _: u16| {
            let next = answers.lock().unwrap().pop().unwrap();
            async move { Ok(next) }
        };
        let first = connector.connect_with("box.internal", port, resolve).await;
        assert!(first.is_ok(), "{first:?}");
        innocent.accept().await.unwrap();
        let second = connector.connect_with("box.internal", port, resolve).await;
        match second {
            Err(ConnectError::Refused { host, refused }) => {
                assert_eq!(&*host, "box.internal");
                assert_eq!(
                    refused.address,
                    SocketAddr::new([127, 0, 0, 1].into(), port)
                );
                assert_eq!(refused.reason, Reason::OwnListener(Listener::Tls));
            }
            other => panic!("not refused: {other:?}"),
        }
        untouched(&l).await;
    }

    #[tokio::test]
    async fn one_refused_address_among_several_refuses_the_name() {
        let (l, connector) = own_listener().await;
        let port = l.local_addr().unwrap().port();
        let both = || async { Ok(vec![sa("127.0.0.2:0"), sa("127.0.0.1:0")]) };
        let result = connector
            .connect_with("box.internal", port, |_, _| both())
            .await;
        assert!(
            matches!(result, Err(ConnectError::Refused { .. })),
            "{result:?}"
        );
        untouched(&l).await;
    }

    #[tokio::test]
    async fn ip_literals_are_checked_without_resolving_and_allowed_ones_connect() {
        let (l, connector) = own_listener().await;
        let port = l.local_addr().unwrap().port();
        for host in ["127.0.0.1", "[::ffff:127.0.0.1]"] {
            let result = connector.connect_with(host, port, never).await;
            assert!(
                matches!(result, Err(ConnectError::Refused { .. })),
                "{host}: {result:?}"
            );
        }
        untouched(&l).await;

        // An address the policy lets through connects (another listener, same address).
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_port = other.local_addr().unwrap().port();
        let stream = connector.connect_with("127.0.0.1", other_port, never).await;
        assert!(stream.is_ok(), "{stream:?}");
        other.accept().await.unwrap();
        let resolved = |_: String, _: u16| async { Ok(vec![sa("127.0.0.1:0")]) };
        let stream = connector
            .connect_with("box.internal", other_port, resolved)
            .await;
        assert!(stream.is_ok(), "{stream:?}");
        other.accept().await.unwrap();
    }

    #[tokio::test]
    async fn refusals_are_found_through_hypers_error_chain() {
        let (l, connector) = own_listener().await;
        let port = l.local_addr().unwrap().port();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
        let err = client
            .get(format!("http://127.0.0.1:{port}/").parse().unwrap())
            .await
            .unwrap_err();
        let (host, refused) = refusal(&err).expect("the refusal is in the chain");
        assert_eq!(host, "127.0.0.1");
        assert_eq!(refused.reason, Reason::OwnListener(Listener::Tls));
        untouched(&l).await;
    }
}
