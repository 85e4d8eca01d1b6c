//! Admin API keys (credentials): scopes, secret generation and hashing.
//!
//! Pure domain: no HTTP or storage types. The control API turns a presented
//! `Authorization: Bearer sgk_...` into a [`SecretHash`] with [`hash_secret`], looks the hash up
//! in the store, and checks the needed [`Scope`] with [`allows`].

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::{constant_time, digest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::{Rng as _, RngCore as _};
use serde::{Deserialize, Serialize};

/// What a credential may do. The wire names (`"sandboxes:read"`, ...) are the ones the control
/// API accepts and returns, so they are part of the public contract and must never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// Everything, including managing credentials and reading the audit log.
    #[serde(rename = "admin")]
    Admin,
    /// List and inspect sandboxes (only its own unless admin), read their logs.
    #[serde(rename = "sandboxes:read")]
    SandboxesRead,
    /// Create, exec in and terminate sandboxes.
    #[serde(rename = "sandboxes:write")]
    SandboxesWrite,
    /// Register `upstream` sandboxes (with `sandboxes:write`): an upstream points the proxy at
    /// the network, so it is granted apart from creating `command` sandboxes.
    #[serde(rename = "upstreams:write")]
    UpstreamsWrite,
    /// Mint connect tokens for sandboxes.
    #[serde(rename = "tokens:issue")]
    TokensIssue,
    /// Revoke connect tokens by `jti`.
    #[serde(rename = "tokens:revoke")]
    TokensRevoke,
}

impl Scope {
    /// Every scope, in the order they are documented.
    pub const ALL: [Scope; 6] = [
        Scope::Admin,
        Scope::SandboxesRead,
        Scope::SandboxesWrite,
        Scope::UpstreamsWrite,
        Scope::TokensIssue,
        Scope::TokensRevoke,
    ];

    /// Parses a wire name exactly (case-sensitive, no trimming): scopes are security-relevant,
    /// so a near-miss such as `"Admin "` is an error rather than a guess.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    /// The wire name, as accepted by [`Scope::parse`] and used in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::SandboxesRead => "sandboxes:read",
            Scope::SandboxesWrite => "sandboxes:write",
            Scope::UpstreamsWrite => "upstreams:write",
            Scope::TokensIssue => "tokens:issue",
            Scope::TokensRevoke => "tokens:revoke",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scope `{0}`; expected one of admin, sandboxes:read, sandboxes:write, upstreams:write, tokens:issue, tokens:revoke"
)]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s).ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// Whether a credential holding `scopes` may do something that needs `needed`.
///
/// `admin` implies every scope, so an admin key never has to list the others.
pub fn allows(scopes: &[Scope], needed: Scope) -> bool {
    scopes
        .iter()
        .any(|&held| held == Scope::Admin || held == needed)
}

/// Every API key secret starts with this, so secret scanners (GitHub, gitleaks) can recognise a
/// leaked sandgate key, and so a human can tell an API key from a connect token at a glance.
pub const SECRET_PREFIX: &str = "sgk_";

/// Random bytes in a secret: 256 bits, which is what makes a fast hash safe (see [`SecretHash`]).
const SECRET_BYTES: usize = 32;

/// A freshly generated API key secret: `"sgk_"` + base64url (no padding) of 32 random bytes.
///
/// It exists in clear only between generation and the one response (or `admin.key` file) that
/// hands it to its owner; only its [`SecretHash`] is stored. `Debug` and `Display` print a
/// placeholder so that a stray `{:?}` in a log line cannot leak it; use [`Secret::expose`]
/// where the clear text is really meant to leave the process.
pub struct Secret(String);

impl Secret {
    /// Generates a new secret from the thread-local CSPRNG (ChaCha, seeded from the OS).
    pub fn generate() -> Secret {
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        let mut s = String::with_capacity(SECRET_PREFIX.len() + 43);
        s.push_str(SECRET_PREFIX);
        URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
        Secret(s)
    }

    /// The clear text. Call only where the secret is deliberately handed out.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash to store and to look the credential up by.
    pub fn hash(&self) -> SecretHash {
        hash_secret(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a secret's full string (prefix included).
///
/// A fast, unsalted hash is the right tool here, unlike for passwords: secrets are 256 bits
/// of uniform randomness, so even a leaked hash cannot be brute-forced, and a slow KDF
/// (argon2, bcrypt) would only add latency to every API call and hand attackers a CPU
/// denial-of-service lever. Being deterministic, the hash also serves as the lookup key, so
/// authentication is a single indexed lookup; looking up by hash leaks nothing through timing
/// because an attacker cannot choose inputs that hash close to a stored value.
#[derive(Clone, Copy)]
pub struct SecretHash(pub [u8; 32]);

/// Hashes a secret as presented by a client (it need not be well-formed: garbage simply hashes
/// to something no credential has).
pub fn hash_secret(presented: &str) -> SecretHash {
    let digest = digest::digest(&digest::SHA256, presented.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    SecretHash(out)
}

impl SecretHash {
    /// Constant-time equality, so comparing a presented hash with a stored one reveals nothing
    /// through timing.
    pub fn matches(&self, other: &SecretHash) -> bool {
        constant_time::verify_slices_are_equal(&self.0, &other.0).is_ok()
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }

    /// Parses exactly 64 hex digits (either case); anything else is `None`.
    pub fn from_hex(s: &str) -> Option<Self> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        }
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *slot = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(SecretHash(out))
    }
}

/// Equality is [`SecretHash::matches`], so deriving `PartialEq` on records that hold a hash
/// cannot introduce a timing leak.
impl PartialEq for SecretHash {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other)
    }
}

impl Eq for SecretHash {}

/// Hashes the bytes, consistent with the constant-time `PartialEq` (equal bytes, equal hash), so
/// a hash can key a map of known credentials.
impl std::hash::Hash for SecretHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Shows only a short prefix: enough to tell hashes apart while debugging, while keeping full
/// lookup keys out of logs.
impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({}…)", &self.to_hex()[..8])
    }
}

/// Length of the random part of a credential id: 20 characters of 36 symbols ≈ 103 bits, so ids
/// are unguessable even though they are not secret.
const CREDENTIAL_ID_RANDOM_CHARS: usize = 20;

/// A new credential id: `"cred_"` + 20 random lowercase letters and digits. The prefix makes
/// ids self-describing in the audit log, next to sandbox ids and token `jti`s.
pub fn new_credential_id() -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(5 + CREDENTIAL_ID_RANDOM_CHARS);
    id.push_str("cred_");
    for _ in 0..CREDENTIAL_ID_RANDOM_CHARS {
        id.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    id
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "in tests a panic is the failure report")]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn scopes_parse_and_round_trip_through_str_and_json() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert_eq!(scope.to_string(), scope.as_str());
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(json, format!("\"{}\"", scope.as_str()));
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
        assert_eq!(Scope::parse("sandboxes:write"), Some(Scope::SandboxesWrite));
        assert_eq!(Scope::parse("upstreams:write"), Some(Scope::UpstreamsWrite));
    }

    #[test]
    fn unknown_or_near_miss_scopes_are_rejected() {
        for bad in [
            "",
            "Admin",
            "admin ",
            "sandboxes",
            "sandboxes:READ",
            "upstream:write",
            "upstreams",
            "tokens:*",
            "*",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad:?}");
            let err = bad.parse::<Scope>().unwrap_err();
            assert!(err.to_string().contains("unknown scope"));
            assert!(serde_json::from_str::<Scope>(&format!("{bad:?}")).is_err());
        }
    }

    #[test]
    fn admin_implies_every_scope() {
        for needed in Scope::ALL {
            assert!(allows(&[Scope::Admin], needed));
        }
    }

    #[test]
    fn other_scopes_allow_only_themselves() {
        for held in Scope::ALL.into_iter().filter(|s| *s != Scope::Admin) {
            for needed in Scope::ALL {
                assert_eq!(
                    allows(&[held], needed),
                    held == needed,
                    "{held} vs {needed}"
                );
            }
        }
        assert!(!allows(&[], Scope::SandboxesRead));
        assert!(allows(
            &[Scope::SandboxesRead, Scope::TokensIssue],
            Scope::TokensIssue
        ));
    }

    #[test]
    fn secrets_are_prefixed_base64url_of_32_bytes() {
        let secret = Secret::generate();
        let s = secret.expose();
        assert!(s.starts_with(SECRET_PREFIX));
        let body = &s[SECRET_PREFIX.len()..];
        assert_eq!(body.len(), 43);
        assert!(body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
    }

    #[test]
    fn secrets_are_random() {
        let secrets: HashSet<String> = (0..256)
            .map(|_| Secret::generate().expose().to_owned())
            .collect();
        assert_eq!(secrets.len(), 256);
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_display() {
        let secret = Secret::generate();
        let body = &secret.expose()[SECRET_PREFIX.len()..];
        for shown in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{secret:#?}"),
        ] {
            assert!(!shown.contains(body), "{shown}");
            assert!(shown.contains("redacted"));
        }
    }

    #[test]
    fn hashes_match_only_the_same_secret() {
        let secret = Secret::generate();
        let stored = secret.hash();
        assert!(stored.matches(&hash_secret(secret.expose())));
        assert_eq!(stored, hash_secret(secret.expose()));
        assert!(!stored.matches(&Secret::generate().hash()));
        assert!(!stored.matches(&hash_secret("")));
        // SHA-256("abc"), a published test vector.
        assert_eq!(
            hash_secret("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hash_hex_round_trips() {
        let hash = Secret::generate().hash();
        let hex = hash.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(SecretHash::from_hex(&hex), Some(hash));
        assert_eq!(SecretHash::from_hex(&hex.to_uppercase()), Some(hash));
    }

    #[test]
    fn from_hex_rejects_garbage() {
        let good = Secret::generate().hash().to_hex();
        let cases = [
            String::new(),
            good[..63].to_owned(),
            format!("{good}0"),
            format!("{}g", &good[..63]),
            format!(" {}", &good[..63]),
            format!("{}é", &good[..62]),
            "zz".repeat(32),
            format!("0x{}", &good[..62]),
        ];
        for bad in cases {
            assert_eq!(SecretHash::from_hex(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hash_debug_shows_only_a_prefix() {
        let hash = Secret::generate().hash();
        let shown = format!("{hash:?}");
        assert!(shown.contains(&hash.to_hex()[..8]));
        assert!(!shown.contains(&hash.to_hex()[..9]));
    }

    #[test]
    fn credential_ids_are_prefixed_random_lowercase_alnum() {
        let ids: HashSet<String> = (0..256).map(|_| new_credential_id()).collect();
        assert_eq!(ids.len(), 256);
        for id in &ids {
            let rest = id.strip_prefix("cred_").expect("prefix");
            assert_eq!(rest.len(), 20);
            assert!(rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        }
    }
}
