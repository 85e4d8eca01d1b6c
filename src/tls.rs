//! TLS for the gateway: the one crypto provider, development certificates, a certificate
//! resolver that can be reloaded while connections stay up, and the rustls server and client
//! configurations.
//!
//! Everything here uses aws-lc-rs through [`provider()`]; nothing in sandgate should build a
//! rustls config with another provider, so that only one crypto library is compiled and audited
//! (the same one jsonwebtoken and rcgen use).
//!
//! PEM is parsed with `rustls::pki_types::pem` (the parser `rustls-pemfile` 2 itself wraps), so
//! the errors here can say exactly which file lacks what.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::aws_lc_rs::{self as aws_lc, cipher_suite};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocols the gateway offers, in preference order: HTTP/2 first so browsers and agents
/// multiplex over one connection, HTTP/1.1 for everything else (and for WebSocket upgrades
/// from clients that do not speak RFC 8441).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Server-side session cache size. Each entry is a few hundred bytes, so 20 000 entries bound the
/// memory to a few MiB while covering the TLS 1.2 clients that do not use tickets.
const SESSION_CACHE_ENTRIES: usize = 20_000;

/// A dev server certificate is re-issued when it expires within this window, so that a gateway
/// started today keeps a valid certificate for at least this long without a restart.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Lifetime of a dev server certificate. 397 days stays under the 398-day limit that Apple
/// platforms and browsers apply to TLS server certificates.
const SERVER_CERT_DAYS: i64 = 397;

/// Lifetime of the dev CA: long, because re-creating it means every user has to trust it again.
const CA_DAYS: i64 = 3650;

/// Back-date new certificates by this much so a client whose clock is slightly behind still
/// accepts them.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// The one crypto provider: aws-lc-rs, with its suite list written out so the choice is visible
/// here rather than inherited from a default.
///
/// Only AEAD suites exist in the list: TLS 1.3's three, and for TLS 1.2 only ECDHE key exchange
/// (forward secrecy) with AES-GCM or ChaCha20-Poly1305. rustls has no CBC, RC4, 3DES or static
/// RSA key exchange at all, so nothing weaker can be negotiated.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                    cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                ],
                ..aws_lc::default_provider()
            })
        })
        .clone()
}

/// Protocol versions for both directions. rustls cannot speak anything older than TLS 1.2, and
/// naming both here keeps a future rustls default from silently changing what we accept.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Everything that can go wrong setting up TLS. Messages name the file involved, because the
/// fix is almost always "look at that file".
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured file does not exist: usually a typo in `cert_file`/`key_file`, or a dev
    /// certificate directory that was never created.
    #[error("{what} file {} does not exist", path.display())]
    Missing {
        /// What the file should hold ("certificate", "private key", "CA certificate").
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
    },

    /// The file exists but cannot be read (permissions, a directory, an I/O error).
    #[error("cannot read {what} file {}", path.display())]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// The file is not well-formed PEM (a truncated block, bad base64).
    #[error("{what} file {} is not valid PEM", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// What the PEM parser found wrong.
        #[source]
        source: pem::Error,
    },

    /// The file holds no `CERTIFICATE` block: often the key and certificate paths are swapped.
    #[error("no certificate found in {} (expected a PEM `BEGIN CERTIFICATE` block)", path.display())]
    NoCertificate {
        /// The file that was searched.
        path: PathBuf,
    },

    /// A certificate block is present but is not a certificate rustls can parse.
    #[error("the certificate in {} is malformed", path.display())]
    InvalidCertificate {
        /// The certificate file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: rustls::Error,
    },

    /// The file holds no unencrypted private key. Encrypted keys are not supported because the
    /// gateway must be able to reload them unattended.
    #[error(
        "no private key found in {} (expected an unencrypted PEM `PRIVATE KEY`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)",
        path.display()
    )]
    NoPrivateKey {
        /// The file that was searched.
        path: PathBuf,
    },

    /// A private key is present but of a type or encoding the provider cannot sign with.
    #[error("the private key in {} cannot be used", path.display())]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// Why the provider rejected it.
        #[source]
        source: rustls::Error,
    },

    /// The key and the first certificate of the chain do not belong together: typically a key
    /// from a previous issuance next to a renewed certificate.
    #[error(
        "the private key in {} does not match the certificate in {}",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        /// The certificate file (its first certificate is the one checked).
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
    },

    /// A CA certificate was found but cannot serve as a trust anchor.
    #[error("the CA certificate in {} cannot be used as a trust anchor", path.display())]
    InvalidCa {
        /// The CA file.
        path: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },

    /// The client was given no CA to trust. sandgate bundles no public root store, so a client
    /// must be told which CA signed the gateway's certificate.
    #[error(
        "no CA certificate to trust: pass the gateway's CA file \
         (SANDGATE_CA_CERT, e.g. <data_dir>/certs/ca.pem for the dev certificate)"
    )]
    NoTrustAnchors,

    /// The base domain cannot be put in a certificate.
    #[error("base domain {domain:?} is not a valid DNS name")]
    InvalidBaseDomain {
        /// The domain as configured.
        domain: String,
    },

    /// The dev certificate directory cannot be created.
    #[error("cannot create directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// A generated file cannot be written (or its permissions set).
    #[error("cannot write {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// rcgen failed to generate a key or certificate.
    #[error("cannot generate the {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },

    /// The existing dev CA key cannot be used by rcgen to sign.
    #[error("cannot use the dev CA key in {} to sign certificates", path.display())]
    DevCaKey {
        /// `ca-key.pem`.
        path: PathBuf,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },

    /// The dev CA files exist but cannot issue a certificate that verifies against them: they
    /// were replaced by hand, or the CA itself is about to expire. sandgate does not overwrite a
    /// CA that users may have trusted; they have to move it away.
    #[error(
        "the dev CA in {} cannot issue a valid server certificate; move ca.pem and ca-key.pem \
         out of {} to have a new CA created (and trust the new one)",
        ca_cert.display(),
        dir.display()
    )]
    DevCaUnusable {
        /// `ca.pem`.
        ca_cert: PathBuf,
        /// The dev certificate directory.
        dir: PathBuf,
        /// Why the freshly issued certificate did not verify.
        #[source]
        source: rustls::Error,
    },

    /// rustls refused the configuration (for example, the ticketer could not be created).
    #[error("cannot build the TLS configuration")]
    Config {
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Reading PEM files
// ---------------------------------------------------------------------------------------------

/// Reads a whole file, telling "does not exist" apart from other failures because the fixes
/// differ.
fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing {
            what,
            path: path.to_owned(),
        },
        _ => TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        },
    })
}

/// All certificates in a PEM buffer, in file order (leaf first for a chain). Other block types
/// (a key in a combined file) are skipped.
fn parse_certs(
    what: &'static str,
    path: &Path,
    pem_bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM buffer.
fn parse_key(path: &Path, pem_bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem_bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

/// Loads a certificate chain and its key, and checks that they belong together, so a bad pair
/// is refused at load (or reload) time instead of failing every handshake.
fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certs(
        "certificate",
        cert_path,
        &read_file("certificate", cert_path)?,
    )?;
    let key = parse_key(key_path, &read_file("private key", key_path)?)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::UnsupportedKey {
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key type cannot report its public key; the handshake will still fail
        // loudly if the pair is wrong, so do not refuse a possibly valid pair.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        }),
        Err(source) => Err(TlsError::InvalidCertificate {
            path: cert_path.to_owned(),
            source,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The reloadable certificate resolver
// ---------------------------------------------------------------------------------------------

/// The gateway's server certificate, swappable at run time.
///
/// Existing connections keep the key they negotiated with; only new handshakes see a reload,
/// so certificate renewal (SIGHUP or a file watcher calling [`CertResolver::reload`]) never drops
/// a connection. Every handshake gets the same certificate, with or without SNI: the gateway
/// serves one name space (`<base_domain>` and `*.<base_domain>`), and clients that connect by IP
/// address send no SNI at all.
pub struct CertResolver {
    /// Re-read on every reload, so renewing the files in place is all an operator does.
    cert_path: PathBuf,
    key_path: PathBuf,
    /// A std lock, not tokio's: it is held only to clone an `Arc`, never across an `.await`,
    /// and rustls calls the resolver synchronously.
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// Loads the certificate chain (leaf first) and private key, failing with an error that
    /// names the file when either is missing, unreadable, empty or the two do not match.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertResolver>, TlsError> {
        let current = load_certified_key(cert_path, key_path)?;
        Ok(Arc::new(CertResolver {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(current),
        }))
    }

    /// Re-reads the same two files and switches new handshakes to them.
    ///
    /// On any error the previous certificate stays in service and the error is returned for the
    /// caller to log: a half-written renewal must never take the gateway off the air.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_certified_key(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// The certificate new handshakes get right now (for status output and tests).
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole `Arc` (the writer only assigns one), so the value
        // is safe to use.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The certificate file this resolver reads.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The private key file this resolver reads.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Paths only: the key material stays out of logs.
impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Server and client configurations
// ---------------------------------------------------------------------------------------------

/// The gateway's rustls server configuration.
///
/// - TLS 1.3 and 1.2 only, the AEAD suites of [`provider()`].
/// - ALPN `h2`, `http/1.1`: the HTTP server picks the protocol from the negotiated value.
/// - Resumption both ways: stateless tickets (keys rotated by the provider's ticketer) for
///   clients that support them, and a bounded in-memory session cache for TLS 1.2 clients that
///   only do session ids. Resumption saves a full handshake for browsers opening many
///   connections to sandbox hosts.
/// - No 0-RTT early data (rustls's default, kept on purpose): early data can be replayed, and
///   requests carrying connect tokens must not be.
/// - No client certificates: clients authenticate with tokens and API keys.
/// - With `relay`, ALPN also offers `sandgate-relay/1` last, for other nodes of the cluster
///   ([`crate::relay`]); clients never offer it, so nothing changes for them.
pub fn server_config(
    resolver: Arc<CertResolver>,
    relay: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Config { source })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    if relay {
        config.alpn_protocols.push(crate::relay::ALPN.to_vec());
    }
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.ticketer = aws_lc::Ticketer::new().map_err(|source| TlsError::Config { source })?;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CA certificate(s) in the PEM file `ca_pem`.
///
/// sandgate bundles no public root store, so `None` is an error
/// ([`TlsError::NoTrustAnchors`]) rather than a config that can verify nothing. ALPN is left
/// empty for the caller to set.
pub fn client_config(ca_pem: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let path = ca_pem.ok_or(TlsError::NoTrustAnchors)?;
    let pem_bytes = read_file("CA certificate", path)?;
    client_config_with_roots(root_store(path, &pem_bytes)?)
}

/// Like [`client_config`], with the CA PEM already in memory (tests, embedded CAs).
pub fn client_config_from_pem(ca_pem: &[u8]) -> Result<ClientConfig, TlsError> {
    client_config_with_roots(root_store(Path::new("<CA PEM in memory>"), ca_pem)?)
}

fn client_config_with_roots(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Config { source })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A root store holding every certificate in `pem_bytes`; `origin` names the source in errors.
fn root_store(origin: &Path, pem_bytes: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("CA certificate", origin, pem_bytes)? {
        roots.add(cert).map_err(|source| TlsError::InvalidCa {
            path: origin.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

// ---------------------------------------------------------------------------------------------
// Development certificates
// ---------------------------------------------------------------------------------------------

/// Where [`ensure_dev_certs`] keeps the dev CA and the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCertPaths {
    /// `ca.pem`: the file users add to their trust store (or pass to `curl --cacert`).
    pub ca_cert: PathBuf,
    /// `ca-key.pem`: signs server certificates; mode 0600, never leaves the machine.
    pub ca_key: PathBuf,
    /// `server.pem`: the gateway's certificate.
    pub cert: PathBuf,
    /// `server-key.pem`: the gateway's private key, mode 0600.
    pub key: PathBuf,
}

impl DevCertPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> DevCertPaths {
        DevCertPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// Makes sure `dir` holds a local CA and a server certificate it signed, valid for
/// `<base_domain>`, `*.<base_domain>`, `localhost`, `127.0.0.1` and `::1`.
///
/// Existing files are reused, so a CA that users already trust stays trusted across restarts.
/// The server certificate alone is re-issued (from the existing CA) when it is missing, does
/// not match its key, does not cover `base_domain`, or expires within 30 days. Private keys are
/// written with mode 0600 and a new directory with mode 0700. Returns the paths and whether
/// anything was created.
pub fn ensure_dev_certs(dir: &Path, base_domain: &str) -> Result<(DevCertPaths, bool), TlsError> {
    check_base_domain(base_domain)?;
    create_private_dir(dir)?;
    let paths = DevCertPaths::in_dir(dir);
    let mut created = false;

    let ca = match DevCa::load(&paths)? {
        Some(ca) => ca,
        None => {
            created = true;
            DevCa::create(&paths)?
        }
    };

    match current_server_cert_problem(&paths, &ca, base_domain) {
        None => tighten_key_mode(&paths.key)?,
        Some(reason) => {
            tracing::info!(
                cert = %paths.cert.display(),
                %reason,
                "issuing a dev server certificate for {base_domain}"
            );
            ca.issue_server_cert(&paths, base_domain)?;
            created = true;
            // Re-check what was just written: catches a CA that cannot sign for us (replaced by
            // hand, or itself near expiry) before the gateway serves a certificate nobody trusts.
            if let Some(problem) = verify_server_cert(&paths, &ca, base_domain) {
                return Err(TlsError::DevCaUnusable {
                    ca_cert: paths.ca_cert.clone(),
                    dir: dir.to_owned(),
                    source: problem,
                });
            }
        }
    }
    Ok((paths, created))
}

/// Rejects base domains that cannot be a certificate's DNS name (IP addresses, wildcards,
/// empty or malformed names) before anything is written.
fn check_base_domain(base_domain: &str) -> Result<(), TlsError> {
    match ServerName::try_from(base_domain) {
        Ok(ServerName::DnsName(_)) if !base_domain.contains('*') => Ok(()),
        _ => Err(TlsError::InvalidBaseDomain {
            domain: base_domain.to_owned(),
        }),
    }
}

/// The names every dev server certificate covers. `localhost` and the loopback addresses let
/// tools reach the gateway without the base domain (and without SNI, by IP).
fn dev_names(base_domain: &str) -> Vec<String> {
    let mut names = vec![
        base_domain.to_owned(),
        format!("*.{base_domain}"),
        "localhost".to_owned(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    names.dedup();
    names
}

/// The local certificate authority that signs dev server certificates.
struct DevCa {
    key: KeyPair,
    /// `ca.pem` as trusted by clients; server certificates are verified against it.
    cert: CertificateDer<'static>,
}

impl DevCa {
    /// Loads `ca.pem` and `ca-key.pem`.
    ///
    /// `None` when either is missing: a CA without its key cannot sign, and a key without its
    /// certificate (a crash between the two writes) has never been trusted by anyone, so a new
    /// CA is the right answer. Both present but unusable is an error: that CA may be in users'
    /// trust stores, so it is not silently replaced.
    fn load(paths: &DevCertPaths) -> Result<Option<DevCa>, TlsError> {
        match (paths.ca_cert.exists(), paths.ca_key.exists()) {
            (true, true) => {}
            (false, false) => return Ok(None),
            (cert_exists, _) => {
                let missing = if cert_exists {
                    &paths.ca_key
                } else {
                    &paths.ca_cert
                };
                tracing::warn!(
                    missing = %missing.display(),
                    "dev CA is incomplete; creating a new one (trust the new ca.pem)"
                );
                return Ok(None);
            }
        }
        // Verifies that the key signs for the certificate, with the same checks as the server
        // certificate, before anything is issued from it.
        let certified = load_certified_key(&paths.ca_cert, &paths.ca_key)?;
        let cert = certified
            .end_entity_cert()
            .map_err(|source| TlsError::InvalidCertificate {
                path: paths.ca_cert.clone(),
                source,
            })?
            .clone()
            .into_owned();
        let key_pem = read_file("private key", &paths.ca_key)?;
        let key = std::str::from_utf8(&key_pem)
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)
            .and_then(KeyPair::from_pem)
            .map_err(|source| TlsError::DevCaKey {
                path: paths.ca_key.clone(),
                source,
            })?;
        tighten_key_mode(&paths.ca_key)?;
        Ok(Some(DevCa { key, cert }))
    }

    /// Generates a new CA key and self-signed certificate and writes both.
    fn create(paths: &DevCertPaths) -> Result<DevCa, TlsError> {
        let key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: "dev CA key",
            source,
        })?;
        let mut params = ca_params(&key);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(CA_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "dev CA certificate",
                source,
            })?;
        // Key first: a crash before the certificate is written leaves no `ca.pem`, and the next
        // start creates a fresh CA instead of failing.
        write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(
            ca = %paths.ca_cert.display(),
            "created a dev CA; trust it to avoid certificate warnings (see certs/README.md)"
        );
        Ok(DevCa {
            key,
            cert: cert.der().clone(),
        })
    }

    /// Issues and writes a new server key and certificate for `base_domain`.
    fn issue_server_cert(&self, paths: &DevCertPaths, base_domain: &str) -> Result<(), TlsError> {
        let generate = |what| move |source| TlsError::Generate { what, source };
        let key = KeyPair::generate().map_err(generate("dev server key"))?;
        let mut params =
            CertificateParams::new(dev_names(base_domain)).map_err(generate("dev server cert"))?;
        // Clients match the SANs only; the CN is for humans reading the certificate.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, base_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(SERVER_CERT_DAYS);
        // serial_number stays None: rcgen then derives it from the (fresh, random) public key,
        // so every issuance gets a distinct, unpredictable serial.
        let issuer = Issuer::new(ca_params(&self.key), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(generate("dev server cert"))?;
        write_file(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&paths.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(())
    }
}

/// The parts of the CA's parameters an [`Issuer`] needs, rebuilt from the CA key alone.
///
/// rcgen (without its x509-parser feature) cannot read `ca.pem` back, and a signed certificate's
/// issuer name must equal the CA's subject byte for byte, so the subject is a pure function of
/// the key: a fixed name plus a fingerprint of the public key. The fingerprint also tells
/// several sandgate dev CAs apart in a trust store listing.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key_raw());
    let fingerprint: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sandgate");
    dn.push(
        DnType::CommonName,
        format!("sandgate development CA {fingerprint}"),
    );
    params.distinguished_name = dn;
    // Path length 0: the CA signs leaf certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Why the existing server certificate cannot be reused, or `None` when it can.
fn current_server_cert_problem(
    paths: &DevCertPaths,
    ca: &DevCa,
    base_domain: &str,
) -> Option<String> {
    if !paths.cert.exists() || !paths.key.exists() {
        return Some("no server certificate yet".to_owned());
    }
    if let Err(err) = load_certified_key(&paths.cert, &paths.key) {
        return Some(err.to_string());
    }
    verify_server_cert(paths, ca, base_domain).map(|err| format!("does not verify: {err}"))
}

/// Verifies `server.pem` against the CA exactly as a client would, for every name it must
/// cover, at a time [`RENEW_BEFORE`] from now; `None` when it passes.
///
/// Using the real verifier checks the chain to this CA, the names (including the wildcard) and
/// the expiry in one go, without an X.509 parser of our own.
fn verify_server_cert(
    paths: &DevCertPaths,
    ca: &DevCa,
    base_domain: &str,
) -> Option<rustls::Error> {
    let check = || -> Result<(), rustls::Error> {
        let pem_bytes = fs::read(&paths.cert).map_err(|e| rustls::Error::General(e.to_string()))?;
        let leaf = CertificateDer::from_pem_slice(&pem_bytes)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.clone())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = UnixTime::since_unix_epoch(since_epoch + RENEW_BEFORE);
        let probe = format!("sandgate-probe.{base_domain}");
        let names = [
            ServerName::try_from(base_domain.to_owned()),
            ServerName::try_from(probe),
            ServerName::try_from("localhost"),
        ];
        for name in names {
            let name = name.map_err(|e| rustls::Error::General(e.to_string()))?;
            verifier.verify_server_cert(&leaf, &[], &name, &[], at)?;
        }
        for ip in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            verifier.verify_server_cert(&leaf, &[], &ServerName::from(ip), &[], at)?;
        }
        Ok(())
    };
    check().err()
}

/// Creates `dir` (and missing parents) with mode 0700: it holds private keys.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` atomically (temporary file in the same directory, then rename),
/// so a crash never leaves a half-written PEM, and with `mode` from the first byte so a key is
/// never readable by others even briefly.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let result = options.open(&tmp).and_then(|mut file| {
        // An existing temporary file keeps its old mode; set it explicitly.
        #[cfg(unix)]
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(source) = result.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(err(source));
    }
    Ok(())
}

/// Restores mode 0600 on a reused private key that someone made readable by others.
fn tighten_key_mode(path: &Path) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path)
            .map_err(|source| TlsError::Read {
                what: "private key",
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(key = %path.display(), "private key was readable by others; setting mode 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
                TlsError::Write {
                    path: path.to_owned(),
                    source,
                }
            })?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const BASE: &str = "sandbox.localhost";

    fn dev_certs(dir: &Path) -> DevCertPaths {
        ensure_dev_certs(dir, BASE).expect("dev certs").0
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A TLS server on 127.0.0.1:0 that answers every connection with the SNI it saw, then
    /// closes. Aborted when dropped.
    struct TestServer {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        async fn start(config: Arc<ServerConfig>) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = TlsAcceptor::from(config);
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                        let _ = tls.write_all(sni.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
            TestServer { addr, task }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    struct Handshake {
        sni_seen: String,
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
        leaf: CertificateDer<'static>,
    }

    async fn connect(
        addr: SocketAddr,
        client: ClientConfig,
        name: ServerName<'static>,
    ) -> Result<Handshake, io::Error> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await?;
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let version = conn.protocol_version();
        let leaf = conn.peer_certificates().unwrap()[0].clone().into_owned();
        let mut sni_seen = String::new();
        tls.read_to_string(&mut sni_seen).await?;
        Ok(Handshake {
            sni_seen,
            alpn,
            version,
            leaf,
        })
    }

    fn dns(name: &str) -> ServerName<'static> {
        ServerName::try_from(name.to_owned()).unwrap()
    }

    fn first_cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn dev_certs_are_created_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data/certs");

        let (paths, created) = ensure_dev_certs(&dir, BASE).unwrap();
        assert!(created);
        assert_eq!(paths, DevCertPaths::in_dir(&dir));
        for file in [&paths.ca_cert, &paths.ca_key, &paths.cert, &paths.key] {
            assert!(file.is_file(), "{} missing", file.display());
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&paths.ca_key), 0o600);
            assert_eq!(mode(&paths.key), 0o600);
        }
        let ca_before = fs::read(&paths.ca_cert).unwrap();
        let cert_before = fs::read(&paths.cert).unwrap();

        let (again, created) = ensure_dev_certs(&dir, BASE).unwrap();
        assert!(!created, "second call must reuse the files");
        assert_eq!(again, paths);
        assert_eq!(fs::read(&paths.ca_cert).unwrap(), ca_before);
        assert_eq!(fs::read(&paths.cert).unwrap(), cert_before);

        // A new base domain re-issues the server certificate from the same CA.
        let (_, created) = ensure_dev_certs(&dir, "other.localhost").unwrap();
        assert!(created);
        assert_eq!(fs::read(&paths.ca_cert).unwrap(), ca_before);
        assert_ne!(fs::read(&paths.cert).unwrap(), cert_before);
    }

    #[test]
    fn dev_certs_reissue_a_server_cert_that_does_not_match_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let other = tempfile::tempdir().unwrap();
        let other_paths = dev_certs(other.path());
        fs::copy(&other_paths.key, &paths.key).unwrap();

        let (_, created) = ensure_dev_certs(tmp.path(), BASE).unwrap();
        assert!(created);
        CertResolver::load(&paths.cert, &paths.key).expect("a matching pair again");
    }

    #[test]
    fn dev_certs_replace_an_incomplete_ca_but_refuse_a_foreign_one() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let ca_before = fs::read(&paths.ca_cert).unwrap();

        // A CA key without its certificate was never trusted by anyone: start over.
        fs::remove_file(&paths.ca_cert).unwrap();
        let (_, created) = ensure_dev_certs(tmp.path(), BASE).unwrap();
        assert!(created);
        assert_ne!(fs::read(&paths.ca_cert).unwrap(), ca_before);

        // A complete CA that sandgate did not make (different subject) is not overwritten.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let foreign = params.self_signed(&key).unwrap();
        fs::write(&paths.ca_cert, foreign.pem()).unwrap();
        fs::write(&paths.ca_key, key.serialize_pem()).unwrap();
        fs::remove_file(&paths.cert).unwrap();
        let err = ensure_dev_certs(tmp.path(), BASE).unwrap_err();
        assert!(matches!(err, TlsError::DevCaUnusable { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(fs::read_to_string(&paths.ca_cert).unwrap(), foreign.pem());
    }

    #[cfg(unix)]
    #[test]
    fn dev_certs_tighten_a_reused_key_made_world_readable() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o644)).unwrap();
        let (_, created) = ensure_dev_certs(tmp.path(), BASE).unwrap();
        assert!(!created);
        assert_eq!(mode(&paths.key), 0o600);
    }

    #[test]
    fn dev_certs_refuse_a_bad_base_domain() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "127.0.0.1", "*.example.com", "bad domain"] {
            let err = ensure_dev_certs(tmp.path(), bad).unwrap_err();
            assert!(
                matches!(err, TlsError::InvalidBaseDomain { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn handshake_with_sni_negotiates_h2() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let resolver = CertResolver::load(&paths.cert, &paths.key).unwrap();
        let server = TestServer::start(server_config(resolver, false).unwrap()).await;

        for host in [
            "8080-abc.sandbox.localhost",
            "sandbox.localhost",
            "localhost",
        ] {
            let mut client = client_config(Some(&paths.ca_cert)).unwrap();
            client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let hs = connect(server.addr, client, dns(host)).await.unwrap();
            assert_eq!(hs.sni_seen, host);
            assert_eq!(hs.alpn.as_deref(), Some(&b"h2"[..]), "{host}");
            assert_eq!(hs.version, Some(rustls::ProtocolVersion::TLSv1_3));
        }

        // A client that offers only HTTP/1.1 gets HTTP/1.1.
        let mut client = client_config(Some(&paths.ca_cert)).unwrap();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let hs = connect(server.addr, client, dns(BASE)).await.unwrap();
        assert_eq!(hs.alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn handshake_without_sni_gets_the_default_cert() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let resolver = CertResolver::load(&paths.cert, &paths.key).unwrap();
        let server = TestServer::start(server_config(resolver, false).unwrap()).await;

        for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST)] {
            let client = client_config(Some(&paths.ca_cert)).unwrap();
            // rustls sends no SNI for an IP address.
            let hs = connect(server.addr, client, ServerName::from(ip))
                .await
                .unwrap();
            assert_eq!(hs.sni_seen, "-");
            assert_eq!(hs.leaf, first_cert(&paths.cert));
        }
    }

    #[tokio::test]
    async fn handshake_fails_for_names_outside_the_cert_and_untrusted_cas() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let resolver = CertResolver::load(&paths.cert, &paths.key).unwrap();
        let server = TestServer::start(server_config(resolver, false).unwrap()).await;

        let client = client_config(Some(&paths.ca_cert)).unwrap();
        // A wildcard covers one label only.
        assert!(connect(server.addr, client, dns("a.b.sandbox.localhost"))
            .await
            .is_err());

        let other = tempfile::tempdir().unwrap();
        let other_ca = dev_certs(other.path()).ca_cert;
        let client = client_config(Some(&other_ca)).unwrap();
        assert!(connect(server.addr, client, dns(BASE)).await.is_err());
    }

    #[tokio::test]
    async fn tls12_works_and_older_versions_are_impossible() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let resolver = CertResolver::load(&paths.cert, &paths.key).unwrap();
        let config = server_config(resolver, false).unwrap();

        // By construction: every suite the server can pick is TLS 1.2 or 1.3, and rustls knows
        // no older version at all.
        for suite in &config.crypto_provider().cipher_suites {
            assert!(matches!(
                suite.version().version,
                rustls::ProtocolVersion::TLSv1_2 | rustls::ProtocolVersion::TLSv1_3
            ));
        }
        assert!(rustls::ALL_VERSIONS
            .iter()
            .all(|v| v.version != rustls::ProtocolVersion::TLSv1_1));
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(config.ticketer.enabled());

        let server = TestServer::start(config).await;

        // TLS 1.2 handshakes.
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(
                root_store(&paths.ca_cert, &fs::read(&paths.ca_cert).unwrap()).unwrap(),
            )
            .with_no_client_auth();
        let hs = connect(server.addr, client, dns(BASE)).await.unwrap();
        assert_eq!(hs.version, Some(rustls::ProtocolVersion::TLSv1_2));

        // A TLS 1.1 ClientHello is answered with a fatal alert.
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(&tls11_client_hello()).await.unwrap();
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply).await;
        assert_eq!(
            reply.first(),
            Some(&0x15),
            "expected an alert record, got {reply:?}"
        );
        // Level fatal (2), description protocol_version (70).
        assert_eq!(reply.get(5..7), Some(&[2u8, 70][..]), "{reply:?}");
    }

    /// A minimal ClientHello whose highest version is TLS 1.1. It offers AEAD suites the server
    /// has, so the only reason to refuse it is the version.
    fn tls11_client_hello() -> Vec<u8> {
        let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
        body.extend_from_slice(&[0x42; 32]); // random
        body.push(0); // no session id
                      // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
        body.extend_from_slice(&[0x01, 0x00]); // compression: null
                                               // One extension, signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256),
                                               // which rustls checks before the version.
        body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04]);
        body.extend_from_slice(&[0x04, 0x03, 0x08, 0x04]);
        let mut handshake = vec![0x01, 0x00];
        handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x02];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[tokio::test]
    async fn reload_switches_cert_and_keeps_the_old_one_on_error() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let live = tempfile::tempdir().unwrap();
        let cert_path = live.path().join("fullchain.pem");
        let key_path = live.path().join("privkey.pem");
        fs::copy(&paths.cert, &cert_path).unwrap();
        fs::copy(&paths.key, &key_path).unwrap();

        let resolver = CertResolver::load(&cert_path, &key_path).unwrap();
        let server = TestServer::start(server_config(resolver.clone(), false).unwrap()).await;
        let client = || client_config(Some(&paths.ca_cert)).unwrap();
        let first = connect(server.addr, client(), dns(BASE)).await.unwrap();
        assert_eq!(first.leaf, first_cert(&paths.cert));

        // Renew in place: a new certificate from the same CA (dev certs for another domain
        // that also covers localhost; issued into a second dir sharing the CA).
        let renewed_dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "ca-key.pem"] {
            fs::copy(tmp.path().join(f), renewed_dir.path().join(f)).unwrap();
        }
        let renewed = dev_certs(renewed_dir.path());
        assert_ne!(first_cert(&renewed.cert), first.leaf);
        fs::copy(&renewed.cert, &cert_path).unwrap();
        fs::copy(&renewed.key, &key_path).unwrap();
        resolver.reload().unwrap();
        let second = connect(server.addr, client(), dns(BASE)).await.unwrap();
        assert_eq!(second.leaf, first_cert(&renewed.cert));

        // A broken renewal: the error names the file, the old certificate stays in service.
        fs::write(&cert_path, b"this is not a certificate\n").unwrap();
        let err = resolver.reload().unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("fullchain.pem"), "{err}");
        let third = connect(server.addr, client(), dns(BASE)).await.unwrap();
        assert_eq!(third.leaf, second.leaf);
        assert_eq!(resolver.current().end_entity_cert().unwrap(), &second.leaf);
    }

    #[test]
    fn load_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let missing = tmp.path().join("nope.pem");
        let garbage = tmp.path().join("garbage.pem");
        fs::write(&garbage, b"garbage\n").unwrap();
        let truncated = tmp.path().join("truncated.pem");
        fs::write(&truncated, b"-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();

        let cases: Vec<(PathBuf, PathBuf, &str, &str)> = vec![
            (
                missing.clone(),
                paths.key.clone(),
                "nope.pem",
                "does not exist",
            ),
            (
                paths.cert.clone(),
                missing.clone(),
                "nope.pem",
                "does not exist",
            ),
            (tmp.path().to_owned(), paths.key.clone(), "", "cannot read"),
            (
                garbage.clone(),
                paths.key.clone(),
                "garbage.pem",
                "no certificate found",
            ),
            (
                truncated.clone(),
                paths.key.clone(),
                "truncated.pem",
                "not valid PEM",
            ),
            // Swapped paths: the key file has no certificate.
            (
                paths.key.clone(),
                paths.cert.clone(),
                "server-key.pem",
                "no certificate",
            ),
            (
                paths.cert.clone(),
                garbage.clone(),
                "garbage.pem",
                "no private key",
            ),
            (
                paths.cert.clone(),
                paths.ca_key.clone(),
                "ca-key.pem",
                "does not match",
            ),
        ];
        for (cert, key, file, phrase) in cases {
            let err = CertResolver::load(&cert, &key).unwrap_err().to_string();
            assert!(err.contains(file), "{err:?} should name {file}");
            assert!(err.contains(phrase), "{err:?} should say {phrase}");
        }
    }

    #[test]
    fn client_config_needs_a_ca() {
        let err = client_config(None).unwrap_err();
        assert!(matches!(err, TlsError::NoTrustAnchors));
        assert!(err.to_string().contains("SANDGATE_CA_CERT"));

        let err = client_config_from_pem(b"").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        client_config_from_pem(&fs::read(&paths.ca_cert).unwrap()).unwrap();
    }

    #[test]
    fn resolver_debug_shows_paths_not_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = dev_certs(tmp.path());
        let resolver = CertResolver::load(&paths.cert, &paths.key).unwrap();
        let debug = format!("{resolver:?}");
        assert!(debug.contains("server.pem"));
        assert!(!debug.contains("PRIVATE"));
    }
}
