//! The cluster relay: how a node reaches an isolated sandbox that runs on another node.
//!
//! An isolated sandbox listens only inside its own network namespace, on the node that runs
//! it, so no other node can dial it. A request for it that arrives at another node (the
//! *entry* node) has its token checked there as usual; the entry node's connector then opens a
//! relay connection to the *owning* node and speaks HTTP to the sandbox through it, exactly as
//! it would over a local socket. Pooling, WebSocket upgrades and revocation (closing the
//! client's connection drops the relay connection under it) all work unchanged.
//!
//! A relay connection is TLS to the owning node's gateway listener with ALPN
//! [`ALPN`] (`sandgate-relay/1`), then one line each way before the stream becomes a plain
//! byte pipe to `127.0.0.1:<port>` inside the sandbox:
//!
//! ```text
//! entry → owner   {"v":1,"from":"node-a","to":"node-b","sandbox":"<id>","port":8000,"proof":"<hex>"}
//! owner → entry   ok <hex>            (or: error <reason>, and the owner closes)
//! ```
//!
//! **Authentication** is mutual and needs no certificate set-up: both proofs are HMAC-SHA256
//! under the *relay key*, a key derived (HKDF) from the cluster's key-encryption key, which
//! every node already has and nothing else does. Each proof covers the TLS session's exported
//! keying material (RFC 5705/8446 exporter), so a proof is good for that one TLS session only:
//! it cannot be replayed, and a machine in the middle (which necessarily runs two TLS sessions
//! with different exporters) can neither pass the owner's check nor forge the owner's answer.
//! That is why the entry node accepts any certificate on a relay connection: the owner proves
//! itself with the key, and the entry node sends nothing of the client's before it has. A
//! relay hello without a valid proof is refused, logged at warn and counted
//! (`sandgate_relay_refused_total`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_lc_rs::hmac;
use dashmap::DashMap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;

use crate::store::NodeRecord;

/// The ALPN protocol of relay connections. Browsers never offer it, so adding it to the
/// gateway's list changes nothing for them.
pub const ALPN: &[u8] = b"sandgate-relay/1";

/// The TLS exporter label both proofs cover.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-sandgate-relay-v1";

/// What [`crate::store::postgres::Kek::derive`] is asked for: the relay key's purpose.
pub const KEY_LABEL: &[u8] = b"sandgate cluster relay v1";

/// The longest hello line the owner reads; a real one is under 300 bytes.
const MAX_LINE: usize = 1024;

/// The hello an entry node sends.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    v: u32,
    from: String,
    to: String,
    sandbox: String,
    port: u16,
    proof: String,
}

/// This node's side of the relay: its key, its name, and where the other nodes are.
pub struct Relay {
    node: String,
    /// `None` outside cluster mode: no relay is offered or admitted.
    key: Option<hmac::Key>,
    /// Other nodes' relay addresses, from their heartbeats.
    nodes: DashMap<String, String>,
    /// The nodes' advertised IP addresses: connections from them are relays (or the
    /// nodes' own health checks), held to the total connection cap but not the per-IP one.
    node_ips: DashMap<std::net::IpAddr, ()>,
    /// This node's gateway port, once bound (published in its heartbeat).
    listen_port: OnceLock<u16>,
    advertise_addr: String,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("node", &self.node)
            .field("enabled", &self.key.is_some())
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Why a relay connection failed, as the entry node's log and the owner's refusal say it.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("this node is not in a cluster: there is no relay key")]
    NoKey,
    #[error("node {0} has published no relay address (not started yet, or too old)")]
    UnknownNode(String),
    #[error("the relay to node {node} failed: {source}")]
    Io {
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("node {node} refused the relay: {reason}")]
    Refused { node: String, reason: String },
    #[error("node {0} answered without a valid proof: it is not a node of this cluster")]
    Impostor(String),
}

impl From<RelayError> for io::Error {
    fn from(e: RelayError) -> io::Error {
        let kind = match &e {
            RelayError::Io { source, .. } => source.kind(),
            RelayError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            _ => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e.to_string())
    }
}

impl Relay {
    /// `relay_key` is `None` outside cluster mode.
    pub fn new(node: &str, advertise_addr: &str, relay_key: Option<[u8; 32]>) -> Relay {
        Relay {
            node: node.to_string(),
            key: relay_key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, &k)),
            nodes: DashMap::new(),
            node_ips: DashMap::new(),
            listen_port: OnceLock::new(),
            advertise_addr: advertise_addr.to_string(),
        }
    }

    /// Whether `node` is this node's name.
    pub fn is_self(&self, node: &str) -> bool {
        node == self.node
    }

    /// Whether this node offers and admits relay connections.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Records the gateway listener's real port (a configured port 0 is known only once bound).
    pub fn set_listen_port(&self, port: u16) {
        let _ = self.listen_port.set(port);
    }

    /// `host:port` where other nodes reach this node's relay; `None` before the listener is
    /// bound or outside cluster mode.
    pub fn advertised(&self) -> Option<String> {
        let port = *self.listen_port.get()?;
        self.key.as_ref()?;
        let host = &self.advertise_addr;
        Some(if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        })
    }

    /// Whether `ip` is another cluster node's advertised address. Always false outside
    /// cluster mode.
    pub fn is_node_ip(&self, ip: std::net::IpAddr) -> bool {
        !self.node_ips.is_empty() && self.node_ips.contains_key(&ip)
    }

    /// Takes in the nodes' relay addresses as the store lists them.
    pub fn learn(&self, nodes: &[NodeRecord]) {
        if self.key.is_none() {
            return;
        }
        for node in nodes {
            if node.name != self.node {
                if let Ok(ip) = node.advertise_addr.trim_matches(['[', ']']).parse() {
                    self.node_ips.insert(ip, ());
                }
            }
            match &node.relay_addr {
                Some(addr) => {
                    self.nodes.insert(node.name.clone(), addr.clone());
                }
                None => {
                    self.nodes.remove(&node.name);
                }
            }
        }
    }

    fn proof(&self, key: &hmac::Key, role: &str, exporter: &[u8], fields: &[&str]) -> String {
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(role.as_bytes());
        ctx.update(&[0]);
        ctx.update(exporter);
        for f in fields {
            ctx.update(&[0]);
            ctx.update(f.as_bytes());
        }
        hex(ctx.sign().as_ref())
    }

    fn check(key: &hmac::Key, role: &str, exporter: &[u8], fields: &[&str], proof: &str) -> bool {
        let Some(tag) = unhex(proof) else {
            return false;
        };
        let mut msg = Vec::with_capacity(128);
        msg.extend_from_slice(role.as_bytes());
        msg.push(0);
        msg.extend_from_slice(exporter);
        for f in fields {
            msg.push(0);
            msg.extend_from_slice(f.as_bytes());
        }
        hmac::verify(key, &msg, &tag).is_ok()
    }

    /// Opens a relay connection to `port` of `sandbox` on node `node`: a stream that, once
    /// returned, carries bytes to and from that port. Bounded by `timeout` as a whole.
    pub async fn dial(
        &self,
        node: &str,
        sandbox: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<RelayStream, RelayError> {
        let key = self.key.as_ref().ok_or(RelayError::NoKey)?;
        let addr = self
            .nodes
            .get(node)
            .map(|a| a.value().clone())
            .ok_or_else(|| RelayError::UnknownNode(node.to_string()))?;
        let io_err = |source: io::Error| RelayError::Io {
            node: node.to_string(),
            source,
        };
        let work = async {
            let tcp = TcpStream::connect(&addr).await.map_err(io_err)?;
            let _ = tcp.set_nodelay(true);
            let host = addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let tls = tokio_rustls::TlsConnector::from(client_config())
                .connect(name, tcp)
                .await
                .map_err(io_err)?;
            let exporter = exporter_of(tls.get_ref().1).map_err(io_err)?;
            let port_text = port.to_string();
            let fields = [self.node.as_str(), node, sandbox, port_text.as_str()];
            let hello = Hello {
                v: 1,
                from: self.node.clone(),
                to: node.to_string(),
                sandbox: sandbox.to_string(),
                port,
                proof: self.proof(key, "entry", &exporter, &fields),
            };
            let mut line = serde_json::to_vec(&hello).map_err(|e| io_err(io::Error::other(e)))?;
            line.push(b'\n');
            let mut tls = BufReader::new(tls);
            tls.get_mut().write_all(&line).await.map_err(io_err)?;
            let answer = read_line(&mut tls).await.map_err(io_err)?;
            if let Some(reason) = answer.strip_prefix("error ") {
                return Err(RelayError::Refused {
                    node: node.to_string(),
                    reason: reason.to_string(),
                });
            }
            let proof = answer.strip_prefix("ok ").unwrap_or_default();
            if !Relay::check(key, "owner", &exporter, &[node], proof) {
                return Err(RelayError::Impostor(node.to_string()));
            }
            // The reader stays: it may already hold the sandbox's first bytes (a server that
            // speaks first).
            Ok(RelayStream(Box::new(tls)))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(io_err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }

    /// The owner's side: checks a relay hello and, when it is a cluster node's, pipes the
    /// connection into the sandbox until either side closes or `closed` fires.
    ///
    /// `connect` makes the socket into the sandbox (it gets the sandbox id and port, and says
    /// why it cannot); `admit` registers the connection under the sandbox so that ending the
    /// sandbox closes it.
    pub async fn serve<C, F>(
        &self,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        remote: SocketAddr,
        hello_timeout: Duration,
        connect: C,
        admit: impl FnOnce(&str),
        closed: &tokio_util::sync::CancellationToken,
    ) -> Result<(), String>
    where
        C: FnOnce(String, u16) -> F,
        F: Future<Output = Result<TcpStream, String>>,
    {
        let Some(key) = self.key.as_ref() else {
            return Err("relay connection to a node that is not in a cluster".into());
        };
        let exporter = exporter_of(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut tls = BufReader::new(tls);
        let line = match tokio::time::timeout(hello_timeout, read_line(&mut tls)).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(format!("no relay hello: {e}")),
            Err(_) => return Err("no relay hello in time".into()),
        };
        let refuse = |mut tls: BufReader<tokio_rustls::server::TlsStream<TcpStream>>,
                      reason: String| async move {
            let _ = tls
                .get_mut()
                .write_all(format!("error {reason}\n").as_bytes())
                .await;
            let _ = tls.get_mut().shutdown().await;
            Err::<(), String>(reason)
        };
        let hello: Hello = match serde_json::from_str(&line) {
            Ok(h) => h,
            Err(_) => return refuse(tls, "not a relay hello".into()).await,
        };
        let port_text = hello.port.to_string();
        let fields = [
            hello.from.as_str(),
            hello.to.as_str(),
            hello.sandbox.as_str(),
            port_text.as_str(),
        ];
        if hello.v != 1
            || hello.to != self.node
            || !Relay::check(key, "entry", &exporter, &fields, &hello.proof)
        {
            tracing::warn!(%remote, claimed = %hello.from, "refused a relay connection without a valid cluster proof");
            return refuse(tls, "not a node of this cluster".into()).await;
        }
        let upstream = match connect(hello.sandbox.clone(), hello.port).await {
            Ok(s) => s,
            Err(reason) => return refuse(tls, reason).await,
        };
        admit(&hello.sandbox);
        let answer = format!(
            "ok {}\n",
            self.proof(key, "owner", &exporter, &[&self.node])
        );
        tls.get_mut()
            .write_all(answer.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        tracing::debug!(%remote, from = %hello.from, sandbox = %hello.sandbox, port = hello.port, "relaying");
        // The reader stays: bytes the entry node sent after its hello are the sandbox's.
        let mut upstream = upstream;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => {}
            _ = closed.cancelled() => {}
        }
        Ok(())
    }
}

/// 32 bytes of the session's exported keying material.
fn exporter_of<D>(conn: &rustls::ConnectionCommon<D>) -> io::Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| io::Error::other(format!("no TLS exporter: {e}")))
}

/// One line, without its newline, at most [`MAX_LINE`] bytes.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> io::Result<String> {
    let mut line = Vec::new();
    let mut limited = (&mut *r).take(MAX_LINE as u64);
    limited.read_until(b'\n', &mut line).await?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the relay peer closed or sent an over-long line",
        ));
    }
    line.pop();
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The entry node's TLS configuration for relay connections: TLS 1.3, ALPN
/// `sandgate-relay/1`, and any certificate (the owner proves itself with the relay key; see
/// the module documentation). Handshake signatures are still verified.
fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let provider = crate::tls::provider();
        let verifier = Arc::new(KeyProvesOwner(Arc::clone(&provider)));
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }))
}

/// Accepts the owner's certificate whatever it is: its identity is checked by the relay
/// proof, bound to this TLS session, instead.
#[derive(Debug)]
struct KeyProvesOwner(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for KeyProvesOwner {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A relay connection as the entry node's connector hands it to hyper.
pub struct RelayStream(Box<BufReader<tokio_rustls::client::TlsStream<TcpStream>>>);

impl std::fmt::Debug for RelayStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayStream")
    }
}

impl AsyncRead for RelayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RelayStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_session_and_fields() {
        let a = Relay::new("a", "127.0.0.1", Some([7; 32]));
        let key = a.key.as_ref().unwrap();
        let p = a.proof(key, "entry", &[1; 32], &["a", "b", "s", "80"]);
        assert!(Relay::check(
            key,
            "entry",
            &[1; 32],
            &["a", "b", "s", "80"],
            &p
        ));
        // Another session, field, role or key: refused.
        assert!(!Relay::check(
            key,
            "entry",
            &[2; 32],
            &["a", "b", "s", "80"],
            &p
        ));
        assert!(!Relay::check(
            key,
            "entry",
            &[1; 32],
            &["a", "b", "s", "81"],
            &p
        ));
        assert!(!Relay::check(
            key,
            "owner",
            &[1; 32],
            &["a", "b", "s", "80"],
            &p
        ));
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        assert!(!Relay::check(
            &other,
            "entry",
            &[1; 32],
            &["a", "b", "s", "80"],
            &p
        ));
        // Field boundaries count: ("ab", "") is not ("a", "b").
        let q = a.proof(key, "entry", &[1; 32], &["ab", ""]);
        assert!(!Relay::check(key, "entry", &[1; 32], &["a", "b"], &q));
        assert!(!Relay::check(key, "entry", &[1; 32], &["a"], "zz"));
    }

    #[test]
    fn nodes_are_learned_with_their_addresses() {
        let mut b = crate::store::conformance::node("b", 1);
        b.advertise_addr = "10.0.0.7".into();
        let mut me = crate::store::conformance::node("a", 1);
        me.advertise_addr = "10.0.0.1".into();
        let r = Relay::new("a", "10.0.0.1", Some([7; 32]));
        r.learn(&[me.clone(), b.clone()]);
        assert!(r.is_node_ip("10.0.0.7".parse().unwrap()));
        assert!(
            !r.is_node_ip("10.0.0.1".parse().unwrap()),
            "not this node itself"
        );
        assert!(!r.is_node_ip("10.0.0.8".parse().unwrap()));
        assert_eq!(r.nodes.get("b").unwrap().value(), "10.0.0.5:443");
        // Outside cluster mode nothing is learned: no connection is ever uncapped.
        let off = Relay::new("a", "10.0.0.1", None);
        off.learn(&[b]);
        assert!(!off.is_node_ip("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn advertised_address_needs_a_port_and_a_key() {
        let r = Relay::new("a", "fd00::5", Some([7; 32]));
        assert_eq!(r.advertised(), None);
        r.set_listen_port(8443);
        assert_eq!(r.advertised().as_deref(), Some("[fd00::5]:8443"));
        let off = Relay::new("a", "10.0.0.5", None);
        off.set_listen_port(8443);
        assert_eq!(off.advertised(), None);
    }
}
