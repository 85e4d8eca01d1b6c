//! Connect tokens: claims, Ed25519 signing keys, issuing, verifying, the JWKS, revocation and
//! single-use bookkeeping.
//!
//! A connect token is a compact JWS (`header.payload.signature`) signed with EdDSA (Ed25519).
//! Its header carries exactly `alg`, `typ: connect+jwt` and `kid`; its payload is [`Claims`].
//!
//! Verification is deliberately paranoid (RFC 8725, OWASP JWT cheat sheet): the header is parsed
//! here, strictly, before the JWT library sees the token, so `alg` confusion, attacker-chosen keys
//! (`jku`, `x5u`, `jwk`, `x5c`), `crit` extensions and path-like `kid`s are refused before any
//! key is looked up. The signature and the registered claims are then checked by `jsonwebtoken`
//! with every setting spelled out, and the claims are checked again here against the caller's
//! clock so that time is injectable and the rules do not depend on library defaults.
//!
//! Verification is the gateway's hot path: every proxied request carries a token. A bounded cache
//! of verified tokens lets a repeat presentation skip the signature check; a cache hit still
//! re-checks expiry and revocation, because those change while the token sits in the cache.
//!
//! This module is pure domain: no HTTP types. Mapping [`TokenError`] to responses is `error.rs`'s
//! job, through [`TokenError::code`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use dashmap::DashMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quick_cache::sync::Cache;
use quick_cache::UnitWeighter;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// The `typ` header of every connect token. It is what tells our Bearer tokens apart from an
/// app's own `Authorization` values (see [`looks_like_ours`]), and pinning it stops a JWT minted
/// for another purpose with the same key from being accepted as a connect token.
pub const TOKEN_TYPE: &str = "connect+jwt";

/// Longest token accepted, in bytes. A real token is a few hundred bytes (about 6 KiB with the
/// largest metadata); refusing anything longer before decoding bounds the work an attacker can
/// make us do per request.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Largest `md` claim, in bytes of serialized JSON. Metadata is forwarded upstream in a header
/// (`X-Sandgate-User-Metadata`), so it must stay well under common header-size limits.
pub const MAX_METADATA_LEN: usize = 4096;

/// Largest leeway allowed for clock skew. More would let expired tokens live noticeably longer.
pub const MAX_LEEWAY_SECS: i64 = 30;

/// The only algorithm we sign with and accept (RFC 8725 §3.1: pin the algorithm).
const ALG: Algorithm = Algorithm::EdDSA;
/// `alg` as it must appear, byte for byte, in a header.
const ALG_NAME: &str = "EdDSA";
/// Claims `jsonwebtoken` must find before it even looks at their values. `sbx`, `port` and `jti`
/// are not "spec claims" the library knows; [`Claims`] deserialization requires them instead.
const REQUIRED_SPEC_CLAIMS: [&str; 6] = ["exp", "nbf", "iat", "iss", "aud", "sub"];
/// Base64url length of a 64-byte Ed25519 signature, unpadded. Anything else cannot verify, so it
/// is refused before any crypto runs.
const SIGNATURE_B64_LEN: usize = 86;
/// Longest header segment decoded. Our headers are about 80 characters; the cap lets the header
/// be decoded into a stack buffer, with no allocation and no attacker-sized work.
const MAX_HEADER_B64_LEN: usize = 512;
/// Decoded size of a [`MAX_HEADER_B64_LEN`]-character segment.
const HEADER_BUF_LEN: usize = MAX_HEADER_B64_LEN / 4 * 3;
/// Longest `kid`, and longest `sub`/`sbx` accepted when issuing: these end up in headers and logs.
const MAX_KID_LEN: usize = 64;
const MAX_ID_LEN: usize = 256;

type FastState = foldhash::fast::RandomState;

use crate::front::{Epoch, Front};
use std::cell::RefCell;

/// Claims of a connect token.
///
/// Deserialization is strict: unknown fields, duplicate fields, and wrongly typed values (such as
/// `"exp": "9999999999"`, the GHSA-h395-gr6q-cpjc bypass) are errors, so what was signed is
/// exactly what is checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Issuer: this gateway; a token from another deployment sharing a key is refused.
    pub iss: String,
    /// Audience: the data plane of this gateway.
    pub aud: String,
    /// Subject: the id of the credential that minted the token, forwarded as
    /// `X-Sandgate-Subject` so the app can tell callers apart.
    pub sub: String,
    /// The sandbox the token opens; a token for another sandbox is refused by the proxy.
    pub sbx: String,
    /// The sandbox port the token opens.
    pub port: u16,
    /// Issued at (Unix seconds). Bounds the lifetime: `exp - iat` may not exceed the maximum TTL.
    pub iat: i64,
    /// Not before (Unix seconds).
    pub nbf: i64,
    /// Expiry (Unix seconds).
    pub exp: i64,
    /// Token id: the handle for revocation and single-use bookkeeping, forwarded as
    /// `X-Sandgate-Token-Id`.
    pub jti: String,
    /// User metadata, forwarded verbatim as `X-Sandgate-User-Metadata`; at most
    /// [`MAX_METADATA_LEN`] bytes serialized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md: Option<serde_json::Map<String, serde_json::Value>>,
    /// Single-use token: the caller must [`Authority::mark_used`] its `jti` when it is
    /// exchanged, and refuse it when that returns `false`. [`Authority::verify`] does not do this
    /// itself, because only the caller knows what counts as "one use" (a query-parameter exchange
    /// or one request).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub once: bool,
}

/// Why a token could not be issued or verified.
///
/// Messages never contain the token or claim values: errors end up in logs and response bodies.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is longer than [`MAX_TOKEN_LEN`]; refused before any decoding.
    #[error("token is too long")]
    TooLong,
    /// Not three non-empty base64url segments, or a segment does not decode.
    #[error("token is malformed")]
    Malformed,
    /// The JOSE header is not exactly `{alg: EdDSA, typ: connect+jwt, kid}`; names what is wrong.
    #[error("token header is not acceptable: {0}")]
    BadHeader(&'static str),
    /// The `kid` names no key in our key set (never a path, never fetched from anywhere).
    #[error("token is signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify with the key named by `kid`.
    #[error("token signature is invalid")]
    BadSignature,
    /// The claims are missing, mistyped or inconsistent; says which rule failed.
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    /// `exp` has passed, beyond the leeway.
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future, beyond the leeway.
    #[error("token is not yet valid")]
    NotYetValid,
    /// The token's `jti` has been revoked.
    #[error("token has been revoked")]
    Revoked,
    /// A single-use token presented again (returned by callers when
    /// [`Authority::mark_used`] says `false`).
    #[error("single-use token has already been used")]
    AlreadyUsed,
    /// Issue: the requested lifetime is not in `1..=max` seconds.
    #[error("ttl_secs must be between 1 and {max}")]
    TtlOutOfRange {
        /// The largest lifetime allowed, to tell the caller.
        max: i64,
    },
    /// Issue: `md` serializes to more than [`MAX_METADATA_LEN`] bytes.
    #[error("metadata exceeds {MAX_METADATA_LEN} bytes")]
    MetadataTooLarge,
    /// Issue: a field of the request is unusable; names the field.
    #[error("invalid token request: {0}")]
    InvalidRequest(&'static str),
    /// A signing key (or the key set) is unusable: bad PKCS#8, bad `kid`, empty or duplicated.
    #[error("invalid signing key: {0}")]
    InvalidKey(&'static str),
    /// [`TokenSettings`] are inconsistent; names the setting.
    #[error("invalid token settings: {0}")]
    InvalidSettings(&'static str),
    /// The crypto library failed (key generation, signing, or a key it refuses).
    #[error("token crypto failed: {0}")]
    Crypto(String),
}

impl TokenError {
    /// The stable, public error code for this error: what `error.rs` puts in a response.
    ///
    /// Every verification failure other than expiry and revocation is one code on purpose:
    /// telling an attacker which check failed helps them, not legitimate clients.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLong
            | TokenError::Malformed
            | TokenError::BadHeader(_)
            | TokenError::UnknownKey
            | TokenError::BadSignature
            | TokenError::InvalidClaims(_)
            | TokenError::NotYetValid => "token_invalid",
            TokenError::Expired => "token_expired",
            TokenError::Revoked | TokenError::AlreadyUsed => "token_revoked",
            TokenError::TtlOutOfRange { .. }
            | TokenError::MetadataTooLarge
            | TokenError::InvalidRequest(_) => "invalid_argument",
            TokenError::InvalidKey(_) | TokenError::InvalidSettings(_) | TokenError::Crypto(_) => {
                "internal"
            }
        }
    }
}

/// An Ed25519 signing key with its key id and creation time.
///
/// Kept as PKCS#8 DER so it can be persisted and reloaded as is; the raw public key is derived
/// once, on construction, for the JWKS and for verification.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    created_at: i64,
    pkcs8: Vec<u8>,
    public: [u8; 32],
}

impl SigningKey {
    /// Generates a new key with a random 16-character `kid`, created now.
    pub fn generate() -> Result<SigningKey, TokenError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| TokenError::Crypto("Ed25519 key generation failed".into()))?;
        SigningKey::from_parts(
            random_id::<12>(),
            crate::unix_now(),
            pkcs8.as_ref().to_vec(),
        )
    }

    /// Rebuilds a key from what [`SigningKey::kid`], [`SigningKey::created_at`] and
    /// [`SigningKey::pkcs8_der`] returned. The PKCS#8 document is parsed and validated here, so a
    /// corrupt stored key fails at start-up rather than at the first issue.
    ///
    /// `kid` must be 1 to 64 characters of `[A-Za-z0-9._-]`: it is published in the JWKS and
    /// copied into headers, so it is kept boring.
    pub fn from_parts(
        kid: String,
        created_at: i64,
        pkcs8_der: Vec<u8>,
    ) -> Result<SigningKey, TokenError> {
        if kid.is_empty()
            || kid.len() > MAX_KID_LEN
            || !kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(TokenError::InvalidKey("kid must be 1-64 of [A-Za-z0-9._-]"));
        }
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8_der)
            .map_err(|_| TokenError::InvalidKey("not an Ed25519 PKCS#8 private key"))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| TokenError::InvalidKey("Ed25519 public key is not 32 bytes"))?;
        Ok(SigningKey {
            kid,
            created_at,
            pkcs8: pkcs8_der,
            public,
        })
    }

    /// The key id put in token headers and the JWKS.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Creation time (Unix seconds): the newest key signs.
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// The private key as PKCS#8 DER, to persist. Secret.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }
}

/// Shows the key id, creation time and public key; never the private key.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("public_key", &URL_SAFE_NO_PAD.encode(self.public))
            .field("pkcs8_der", &"<redacted>")
            .finish()
    }
}

/// How tokens are issued and checked; comes from `[tokens]` in the config.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// `iss` put in and required of every token.
    pub issuer: String,
    /// `aud` put in and required of every token.
    pub audience: String,
    /// Lifetime when a request names none.
    pub default_ttl_secs: i64,
    /// Longest lifetime a request may ask for, and longest `exp - iat` accepted.
    pub max_ttl_secs: i64,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`; at most [`MAX_LEEWAY_SECS`].
    pub leeway_secs: i64,
    /// How many verified tokens to remember; 0 disables the cache.
    pub cache_capacity: usize,
}

/// What a caller asks to be put in a new token.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    /// Id of the credential asking.
    pub sub: String,
    /// Sandbox id.
    pub sbx: String,
    /// Sandbox port.
    pub port: u16,
    /// Lifetime; the configured default when `None`.
    pub ttl_secs: Option<i64>,
    /// User metadata to forward upstream.
    pub md: Option<serde_json::Map<String, serde_json::Value>>,
    /// Single-use token.
    pub once: bool,
}

/// One generation of keys: replaced whole by [`Authority::set_keys`], so a reader sees either
/// the old set or the new one, never a mix.
struct KeySet {
    /// `kid` of the key that signs.
    signing_kid: String,
    /// The signing key, in the form `jsonwebtoken` signs with.
    signing_key: EncodingKey,
    /// Every key that verifies, by exact `kid`.
    verifying: HashMap<Box<str>, DecodingKey, FastState>,
    /// The public JWKS, built once per generation.
    jwks: serde_json::Value,
}

impl KeySet {
    fn new(mut keys: Vec<SigningKey>) -> Result<KeySet, TokenError> {
        // Newest first; ties broken by kid so the signing key is deterministic.
        keys.sort_by(|a, b| (b.created_at, &b.kid).cmp(&(a.created_at, &a.kid)));
        let newest = keys
            .first()
            .ok_or(TokenError::InvalidKey("the key set is empty"))?;
        let mut verifying = HashMap::with_capacity_and_hasher(keys.len(), FastState::default());
        let mut jwks = Vec::with_capacity(keys.len());
        for key in &keys {
            let x = URL_SAFE_NO_PAD.encode(key.public);
            let decoding = DecodingKey::from_ed_components(&x)
                .map_err(|e| TokenError::Crypto(format!("public key rejected: {e}")))?;
            if verifying
                .insert(key.kid.clone().into_boxed_str(), decoding)
                .is_some()
            {
                return Err(TokenError::InvalidKey("two keys share a kid"));
            }
            jwks.push(serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": x,
                "kid": key.kid,
                "alg": ALG_NAME,
                "use": "sig",
            }));
        }
        Ok(KeySet {
            signing_kid: newest.kid.clone(),
            signing_key: EncodingKey::from_ed_der(&newest.pkcs8),
            verifying,
            jwks: serde_json::json!({ "keys": jwks }),
        })
    }
}

/// Issues and verifies connect tokens, and remembers revocations and single uses.
///
/// One per gateway, shared through an `Arc`; every method takes `&self`.
pub struct Authority {
    settings: TokenSettings,
    /// Built once from the settings: the library's checks, every one set explicitly.
    validation: Validation,
    /// The current key generation. A `RwLock<Arc<_>>` so a verify clones the `Arc` and drops
    /// the lock at once; rotation is rare, reads are constant.
    keys: RwLock<Arc<KeySet>>,
    /// Verified tokens, by the exact token string (hashed with a randomly seeded foldhash; the
    /// full string is compared on a hit, so a hash collision cannot pass). `None` when the
    /// capacity is 0. Bounded by count: entries are tokens we issued, at most
    /// [`MAX_TOKEN_LEN`] bytes each.
    cache: Option<Cache<Box<str>, Arc<Claims>, UnitWeighter, FastState>>,
    /// Revoked `jti` → the token's `exp`, kept until [`Authority::prune`] sees it expire.
    revoked: DashMap<Box<str>, i64, FastState>,
    /// Used single-use `jti` → the token's `exp`, likewise.
    used: DashMap<Box<str>, i64, FastState>,
    /// Bumped after every revocation and key change: guards the per-thread front of `cache`
    /// (see [`crate::front`]).
    epoch: Epoch,
}

thread_local! {
    /// This thread's verified tokens, in front of the shared cache.
    static VERIFIED: RefCell<Front<Arc<Claims>>> = RefCell::new(Front::default());
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("settings", &self.settings)
            .field("signing_kid", &self.current_keys().signing_kid)
            .field("cache_len", &self.cache_len())
            .field("revoked", &self.revoked.len())
            .field("used", &self.used.len())
            .finish()
    }
}

impl Authority {
    /// Builds the authority. `keys` must not be empty; the newest `created_at` signs and every
    /// key verifies. Settings are checked here so a bad config cannot weaken verification.
    pub fn new(settings: TokenSettings, keys: Vec<SigningKey>) -> Result<Authority, TokenError> {
        if settings.issuer.is_empty() {
            return Err(TokenError::InvalidSettings("issuer is empty"));
        }
        if settings.audience.is_empty() {
            return Err(TokenError::InvalidSettings("audience is empty"));
        }
        if !(0..=MAX_LEEWAY_SECS).contains(&settings.leeway_secs) {
            return Err(TokenError::InvalidSettings("leeway_secs must be 0..=30"));
        }
        if settings.max_ttl_secs < 1 {
            return Err(TokenError::InvalidSettings("max_ttl_secs must be positive"));
        }
        if !(1..=settings.max_ttl_secs).contains(&settings.default_ttl_secs) {
            return Err(TokenError::InvalidSettings(
                "default_ttl_secs must be between 1 and max_ttl_secs",
            ));
        }
        let keys = KeySet::new(keys)?;

        // Every setting explicit: `Validation::new` alone would allow 60 s of leeway, check only
        // `exp`, and ignore `nbf`, `iss` and `sub`.
        let mut validation = Validation::new(ALG);
        validation.algorithms = vec![ALG];
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&REQUIRED_SPEC_CLAIMS);
        // 0..=30, checked above: the absolute value is the value itself.
        validation.leeway = settings.leeway_secs.unsigned_abs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.reject_tokens_expiring_in_less_than = 0;
        validation.sub = None;

        let cache = (settings.cache_capacity > 0).then(|| {
            Cache::with(
                settings.cache_capacity,
                settings.cache_capacity as u64,
                UnitWeighter,
                FastState::default(),
                Default::default(),
            )
        });

        Ok(Authority {
            settings,
            validation,
            keys: RwLock::new(Arc::new(keys)),
            cache,
            revoked: DashMap::with_hasher(FastState::default()),
            used: DashMap::with_hasher(FastState::default()),
            epoch: Epoch::default(),
        })
    }

    /// Replaces the key set after a rotation: the newest key signs, all verify. Tokens whose
    /// `kid` is no longer present stop verifying at once: the verified-token cache is cleared
    /// while the new set is installed.
    pub fn set_keys(&self, keys: Vec<SigningKey>) -> Result<(), TokenError> {
        let keys = Arc::new(KeySet::new(keys)?);
        let mut current = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        *current = keys;
        // Cleared under the write lock: a verify that started with the old set inserts into the
        // cache only under the read lock and only if its set is still current (see `verify`),
        // so no token checked against the old keys can be cached after this.
        if let Some(cache) = &self.cache {
            cache.clear();
        }
        self.epoch.bump();
        Ok(())
    }

    /// `kid` of the key that signs new tokens.
    pub fn signing_kid(&self) -> String {
        self.current_keys().signing_kid.clone()
    }

    /// The public JWKS, served at `/.well-known/jwks.json`: every verifying key, newest first.
    pub fn jwks(&self) -> serde_json::Value {
        self.current_keys().jwks.clone()
    }

    /// Issues a token for `req`, valid from `now` for `ttl_secs` (or the default). Returns the
    /// compact token and the claims it carries.
    pub fn issue(&self, req: IssueRequest, now: i64) -> Result<(String, Claims), TokenError> {
        let max = self.settings.max_ttl_secs;
        let ttl = req.ttl_secs.unwrap_or(self.settings.default_ttl_secs);
        if ttl <= 0 || ttl > max {
            return Err(TokenError::TtlOutOfRange { max });
        }
        check_id(&req.sub, "sub")?;
        check_id(&req.sbx, "sbx")?;
        if req.port == 0 {
            return Err(TokenError::InvalidRequest("port must be 1-65535"));
        }
        if let Some(md) = &req.md {
            if !metadata_fits(md) {
                return Err(TokenError::MetadataTooLarge);
            }
        }
        let exp = now
            .checked_add(ttl)
            .ok_or(TokenError::InvalidRequest("now + ttl overflows"))?;
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            aud: self.settings.audience.clone(),
            sub: req.sub,
            sbx: req.sbx,
            port: req.port,
            iat: now,
            nbf: now,
            exp,
            // 128 random bits: unguessable, so a jti cannot be pre-revoked or pre-used.
            jti: random_id::<16>(),
            md: req.md,
            once: req.once,
        };
        let token = self.sign(&claims)?;
        Ok((token, claims))
    }

    /// Signs claims this authority issued before, with the current key: the cookie that the
    /// link exchange sets for a single-use token is the same grant (same `jti`, same `exp`)
    /// without `once`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let keys = self.current_keys();
        let mut header = Header::new(ALG);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(keys.signing_kid.clone());
        let token = jsonwebtoken::encode(&header, claims, &keys.signing_key)
            .map_err(|e| TokenError::Crypto(format!("signing failed: {e}")))?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::InvalidRequest(
                "token would exceed the maximum length",
            ));
        }
        Ok(token)
    }

    /// How many keys verify (the signing key and older ones).
    pub fn key_count(&self) -> usize {
        self.current_keys().verifying.len()
    }

    /// Verifies `token` at time `now` and returns its claims.
    ///
    /// In order, failing closed at the first problem: length and shape; the header (exactly
    /// `alg: EdDSA`, `typ: connect+jwt`, a `kid` from our key set); signature, `iss`, `aud` and
    /// presence of the registered claims via `jsonwebtoken`; the claims against `now`; revocation.
    ///
    /// A token verified before is answered from the cache without re-parsing or signature work,
    /// but its expiry and revocation are checked again every time. Single use is not checked
    /// here: see [`Claims::once`].
    ///
    /// `now` should be [`crate::unix_now`]: `jsonwebtoken` also checks `exp` and `nbf` against
    /// the system clock on a full verify, so a `now` far from it can only make verification
    /// stricter, never looser.
    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<Claims>, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        // Read before anything else: an entry that a revocation could have made wrong is
        // cached under an older epoch and so never served from the front.
        let seen = self.epoch.current();
        if self.cache.is_some() {
            if let Some(claims) = Front::get(&VERIFIED, &self.epoch, seen, token) {
                self.check_time(&claims, now)?;
                return Ok(claims);
            }
        }
        if let Some(claims) = self.cache.as_ref().and_then(|cache| cache.get(token)) {
            self.check_time(&claims, now)?;
            self.check_revoked(&claims)?;
            // A copy of its own, so this thread's hits touch no shared reference count.
            let local = Arc::new((*claims).clone());
            Front::put(&VERIFIED, &self.epoch, seen, token, Arc::clone(&local));
            return Ok(local);
        }

        let keys = self.current_keys();
        let claims = Arc::new(self.verify_uncached(&keys, token, now)?);
        if let Some(cache) = &self.cache {
            // Insert only if the key set we verified against is still the current one, under
            // the read lock so `set_keys` (which clears the cache under the write lock) cannot
            // interleave: a token of a removed key never lands in the cache.
            let current = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            if Arc::ptr_eq(&current, &keys) {
                cache.insert(token.into(), Arc::clone(&claims));
            }
        }
        Ok(claims)
    }

    /// Revokes the token with id `jti`. `exp` must be the token's expiry: the entry is kept
    /// until then (plus leeway), after which the token is dead anyway.
    pub fn revoke(&self, jti: &str, exp: i64) {
        self.revoked
            .entry(jti.into())
            .and_modify(|e| *e = (*e).max(exp))
            .or_insert(exp);
        self.epoch.bump();
    }

    /// Whether `jti` has been revoked (and not yet pruned).
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains_key(jti)
    }

    /// The revocation epoch: read it before [`Authority::verify`], and pass it to
    /// [`Authority::revoked_since`] to ask cheaply whether the token was revoked since.
    pub fn epoch(&self) -> u64 {
        self.epoch.current()
    }

    /// Whether `jti` is revoked, where `seen` is an [`Authority::epoch`] read before the token
    /// was verified: while no revocation has happened since, no table is consulted.
    pub fn revoked_since(&self, jti: &str, seen: u64) -> bool {
        self.epoch.current() != seen && self.is_revoked(jti)
    }

    /// Records one use of the single-use token `jti`, expiring at `exp`. Returns `true` only
    /// the first time, atomically: of two concurrent presentations, exactly one wins.
    pub fn mark_used(&self, jti: &str, exp: i64) -> bool {
        match self.used.entry(jti.into()) {
            dashmap::mapref::entry::Entry::Occupied(_) => false,
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                slot.insert(exp);
                true
            }
        }
    }

    /// Forgets revocations, used single-use tokens and cached tokens whose `exp` plus leeway
    /// has passed: those tokens fail the expiry check on their own, so the entries only cost
    /// memory. Call periodically.
    pub fn prune(&self, now: i64) {
        let leeway = self.settings.leeway_secs;
        let live = |exp: i64| !expired(exp, now, leeway);
        self.revoked.retain(|_, exp| live(*exp));
        self.used.retain(|_, exp| live(*exp));
        if let Some(cache) = &self.cache {
            cache.retain(|_, claims| live(claims.exp));
        }
    }

    /// Number of verified tokens cached.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.len())
    }

    /// The current key generation; the lock is held only to clone the `Arc`.
    fn current_keys(&self) -> Arc<KeySet> {
        // A panic while holding the write lock cannot leave a half-written set: the `Arc` is
        // replaced in one assignment. So a poisoned lock is still consistent.
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Steps 1–5 of verification, without the cache.
    fn verify_uncached(&self, keys: &KeySet, token: &str, now: i64) -> Result<Claims, TokenError> {
        // 1. Shape: exactly three non-empty base64url segments.
        let (header_b64, payload_b64, signature_b64) =
            split_token(token).ok_or(TokenError::Malformed)?;
        if !token
            .bytes()
            .all(|b| b == b'.' || b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TokenError::Malformed);
        }
        // The payload must be a JSON object: serde would otherwise accept a JSON array for a
        // struct. Its first three bytes are decoded here; the library decodes the rest.
        let mut first = [0u8; 3];
        match payload_b64
            .get(..4)
            .map(|p| URL_SAFE_NO_PAD.decode_slice(p, &mut first))
        {
            Some(Ok(3)) if first[0] == b'{' => {}
            _ => return Err(TokenError::Malformed),
        }

        // 2. Header, parsed strictly here rather than trusting the library's lenient `Header`.
        let mut buf = [0u8; HEADER_BUF_LEN];
        let header = decode_header(header_b64, &mut buf).ok_or(TokenError::Malformed)?;
        let header: StrictHeader<'_> = serde_json::from_slice(header).map_err(|_| {
            TokenError::BadHeader("header must be exactly {alg, typ, kid} as strings")
        })?;
        if header.alg != ALG_NAME {
            return Err(TokenError::BadHeader("alg must be EdDSA"));
        }
        if header.typ != TOKEN_TYPE {
            return Err(TokenError::BadHeader("typ must be connect+jwt"));
        }
        let key = keys
            .verifying
            .get(header.kid)
            .ok_or(TokenError::UnknownKey)?;
        // A 64-byte Ed25519 signature or nothing: no crypto runs on anything else.
        if signature_b64.len() != SIGNATURE_B64_LEN {
            return Err(TokenError::BadSignature);
        }

        // 3. Signature and registered claims, by the library, with every setting explicit.
        //    It checks exp/nbf against the real clock; step 4 checks them against `now`.
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| map_jwt_error(e.into_kind()))?
            .claims;

        // 4. Claims.
        self.check_claims(&claims, now)?;

        // 5. Revocation.
        self.check_revoked(&claims)?;
        Ok(claims)
    }

    /// Everything about the claims that the library does not check, or checks against another
    /// clock.
    fn check_claims(&self, claims: &Claims, now: i64) -> Result<(), TokenError> {
        let invalid = |why: &str| Err(TokenError::InvalidClaims(why.to_owned()));
        if claims.iss != self.settings.issuer {
            return invalid("wrong issuer");
        }
        if claims.aud != self.settings.audience {
            return invalid("wrong audience");
        }
        if claims.sub.is_empty() {
            return invalid("sub is empty");
        }
        if claims.sbx.is_empty() {
            return invalid("sbx is empty");
        }
        if claims.jti.is_empty() {
            return invalid("jti is empty");
        }
        if claims.port == 0 {
            return invalid("port must be 1-65535");
        }
        let leeway = self.settings.leeway_secs;
        if claims.iat.saturating_sub(leeway) > now {
            return Err(TokenError::NotYetValid);
        }
        self.check_time(claims, now)?;
        match claims.exp.checked_sub(claims.iat) {
            Some(lifetime) if lifetime > 0 && lifetime <= self.settings.max_ttl_secs => {}
            _ => return invalid("lifetime exceeds the maximum"),
        }
        if let Some(md) = &claims.md {
            if !metadata_fits(md) {
                return invalid("md is too large");
            }
        }
        Ok(())
    }

    /// `nbf` and `exp` against `now`, with leeway: the part of the claims that changes with
    /// time, so it is re-checked on every cache hit.
    fn check_time(&self, claims: &Claims, now: i64) -> Result<(), TokenError> {
        let leeway = self.settings.leeway_secs;
        if claims.nbf.saturating_sub(leeway) > now {
            return Err(TokenError::NotYetValid);
        }
        if expired(claims.exp, now, leeway) {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), TokenError> {
        if self.is_revoked(&claims.jti) {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }
}

/// True when a token expiring at `exp` is dead at `now`: valid means `exp > now - leeway`.
/// Saturating, so no input can overflow.
fn expired(exp: i64, now: i64, leeway: i64) -> bool {
    exp.saturating_add(leeway) <= now
}

/// The JOSE header we accept: exactly these three string members. `deny_unknown_fields` refuses
/// `jku`, `x5u`, `jwk`, `x5c`, `crit` and anything else; serde refuses duplicates. Borrowed
/// `&str` refuses escaped strings too, which we never produce.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictHeader<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// Only `typ`, for [`looks_like_ours`]; other members are ignored there.
#[derive(Deserialize)]
struct TypOnly<'a> {
    #[serde(borrow, default)]
    typ: Option<std::borrow::Cow<'a, str>>,
}

/// Splits a compact JWS into its three segments; `None` unless there are exactly three, all
/// non-empty.
fn split_token(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    let header = parts.next()?;
    let payload = parts.next()?;
    let signature = parts.next()?;
    if parts.next().is_some() || header.is_empty() || payload.is_empty() || signature.is_empty() {
        return None;
    }
    Some((header, payload, signature))
}

/// Decodes a header segment into `buf` (no allocation) and returns the JSON bytes if they start
/// as an object: serde would otherwise accept a JSON array for a struct.
fn decode_header<'b>(segment: &str, buf: &'b mut [u8; HEADER_BUF_LEN]) -> Option<&'b [u8]> {
    if segment.len() > MAX_HEADER_B64_LEN {
        return None;
    }
    let len = URL_SAFE_NO_PAD.decode_slice(segment, buf).ok()?;
    let json = buf.get(..len)?;
    (json.first() == Some(&b'{')).then_some(json)
}

/// The base64url text that every JOSE header [`Authority::sign`] writes starts with, cut at a
/// whole number of 3-byte groups so it encodes the same whatever the `kid`. Empty (the fast
/// path off) unless that prefix already says `"typ":"connect+jwt"`.
static SIGNED_HEADER_PREFIX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut header = Header::new(ALG);
    header.typ = Some(TOKEN_TYPE.to_owned());
    header.kid = Some(String::new());
    let Ok(json) = serde_json::to_vec(&header) else {
        return String::new();
    };
    let Some(kid_at) = json.windows(7).position(|w| w == b"\"kid\":\"") else {
        return String::new();
    };
    let cut = (kid_at + 7) - (kid_at + 7) % 3;
    let typ = format!("\"typ\":\"{TOKEN_TYPE}\"");
    let prefix = &json[..cut];
    if !prefix.windows(typ.len()).any(|w| w == typ.as_bytes()) {
        return String::new();
    }
    URL_SAFE_NO_PAD.encode(prefix)
});

/// Cheap shape test for an `Authorization: Bearer <value>`: true when `value` is a three-part
/// JWS whose header says `"typ": "connect+jwt"`. Such a value is ours, verified, and refused
/// when bad; anything else belongs to the app and passes through. No signature work, no
/// allocation for headers of normal size, never panics.
pub fn looks_like_ours(value: &str) -> bool {
    if value.len() > MAX_TOKEN_LEN {
        return false;
    }
    // Exactly two dots (the searches are memchr-fast; counting bytes one by one was not).
    let Some((header, rest)) = value.split_once('.') else {
        return false;
    };
    if rest
        .split_once('.')
        .is_none_or(|(_, signature)| signature.contains('.'))
    {
        return false;
    }
    // Every header we sign starts with the same bytes: no need to decode ours.
    if !SIGNED_HEADER_PREFIX.is_empty() && header.starts_with(&**SIGNED_HEADER_PREFIX) {
        return true;
    }
    let mut buf = [0u8; HEADER_BUF_LEN];
    let Some(json) = decode_header(header, &mut buf) else {
        return false;
    };
    matches!(
        serde_json::from_slice::<TypOnly<'_>>(json),
        Ok(TypOnly { typ: Some(typ) }) if typ == TOKEN_TYPE
    )
}

/// Maps `jsonwebtoken`'s errors onto ours. Anything unexpected is a refusal, never a pass.
fn map_jwt_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::MissingRequiredClaim(claim) => {
            TokenError::InvalidClaims(format!("missing required claim {claim}"))
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            TokenError::InvalidClaims(format!("claim {claim} has the wrong type"))
        }
        ErrorKind::InvalidIssuer => TokenError::InvalidClaims("wrong issuer".into()),
        ErrorKind::InvalidAudience => TokenError::InvalidClaims("wrong audience".into()),
        ErrorKind::InvalidSubject => TokenError::InvalidClaims("wrong subject".into()),
        // The serde error would quote claim values; keep those out of logs.
        ErrorKind::Json(_) => {
            TokenError::InvalidClaims("claims do not match the connect-token schema".into())
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => TokenError::BadHeader("alg must be EdDSA"),
        ErrorKind::InvalidEddsaKey | ErrorKind::InvalidKeyFormat | ErrorKind::Provider(_) => {
            TokenError::Crypto("verifying key rejected by the crypto provider".into())
        }
        _ => TokenError::Malformed,
    }
}

/// Checks a `sub`/`sbx` for issuing: non-empty, bounded, no control characters (they are
/// forwarded in headers).
fn check_id(value: &str, field: &'static str) -> Result<(), TokenError> {
    if value.is_empty() || value.len() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(TokenError::InvalidRequest(field));
    }
    Ok(())
}

/// Whether `md` serializes to at most [`MAX_METADATA_LEN`] bytes. Counts without allocating and
/// stops as soon as the limit is passed.
fn metadata_fits(md: &serde_json::Map<String, serde_json::Value>) -> bool {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            if self.0 > MAX_METADATA_LEN {
                return Err(io::Error::other("metadata too large"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(&mut Counter(0), md).is_ok()
}

/// `N` random bytes from the thread-local CSPRNG, base64url-encoded.
fn random_id<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const ISSUER: &str = "https://sandgate.test";
    const AUDIENCE: &str = "sandgate.test";
    const TTL: i64 = 600;
    const MAX_TTL: i64 = 86_400;
    const LEEWAY: i64 = 30;

    fn settings(cache_capacity: usize) -> TokenSettings {
        TokenSettings {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            default_ttl_secs: TTL,
            max_ttl_secs: MAX_TTL,
            leeway_secs: LEEWAY,
            cache_capacity,
        }
    }

    fn key(kid: &str, created_at: i64) -> SigningKey {
        let generated = SigningKey::generate().unwrap();
        SigningKey::from_parts(kid.into(), created_at, generated.pkcs8_der().to_vec()).unwrap()
    }

    /// An authority with a cache and one key, "k1".
    fn authority() -> (Authority, SigningKey) {
        let k = key("k1", 1);
        (Authority::new(settings(1024), vec![k.clone()]).unwrap(), k)
    }

    /// The same without a cache, so every verify runs the full path.
    fn uncached() -> (Authority, SigningKey) {
        let k = key("k1", 1);
        (Authority::new(settings(0), vec![k.clone()]).unwrap(), k)
    }

    fn req() -> IssueRequest {
        IssueRequest {
            sub: "key_123".into(),
            sbx: "sbx_abc".into(),
            port: 8080,
            ..IssueRequest::default()
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs arbitrary header and payload text with `key`'s Ed25519 key: lets tests present
    /// correctly signed tokens whose header or claims are hostile, so only the checks under
    /// test can refuse them.
    fn sign_raw(key: &SigningKey, header: &str, payload: &str) -> String {
        let pair = Ed25519KeyPair::from_pkcs8(key.pkcs8_der()).unwrap();
        let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let sig = pair.sign(input.as_bytes());
        format!("{input}.{}", b64(sig.as_ref()))
    }

    fn header(kid: &str) -> String {
        json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid}).to_string()
    }

    fn claims_json(now: i64) -> Value {
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "key_123", "sbx": "sbx_abc", "port": 8080,
            "iat": now, "nbf": now, "exp": now + TTL, "jti": "jti-0123456789abcdef",
        })
    }

    fn signed_claims(key: &SigningKey, claims: &Value) -> String {
        sign_raw(key, &header(key.kid()), &claims.to_string())
    }

    fn decoded_header(token: &str) -> Value {
        let seg = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
    }

    #[track_caller]
    fn assert_refused(result: Result<Arc<Claims>, TokenError>, code: &str) -> TokenError {
        let err = result.expect_err("token must be refused");
        assert_eq!(err.code(), code, "{err:?}");
        err
    }

    #[test]
    fn issued_token_round_trips_and_is_cached() {
        let (auth, k) = authority();
        let now = crate::unix_now();
        let mut md = serde_json::Map::new();
        md.insert("user".into(), json!("alice"));
        let (token, claims) = auth
            .issue(
                IssueRequest {
                    md: Some(md),
                    ..req()
                },
                now,
            )
            .unwrap();
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!((claims.iat, claims.nbf, claims.exp), (now, now, now + TTL));
        assert!(URL_SAFE_NO_PAD.decode(&claims.jti).unwrap().len() >= 16);
        assert_eq!(
            decoded_header(&token),
            json!({"alg": "EdDSA", "typ": "connect+jwt", "kid": k.kid()})
        );
        assert!(looks_like_ours(&token));

        let first = auth.verify(&token, now).unwrap();
        assert_eq!(*first, claims);
        assert_eq!(auth.cache_len(), 1);
        // The second verify is a hit in the shared cache, which gives this thread a copy of
        // its own; the third is a hit in that per-thread copy.
        let second = auth.verify(&token, now).unwrap();
        assert_eq!(*second, claims);
        let third = auth.verify(&token, now).unwrap();
        assert!(
            Arc::ptr_eq(&second, &third),
            "third verify is a front-cache hit"
        );
    }

    #[test]
    fn revocation_and_rotation_reach_the_per_thread_cache() {
        let (auth, _) = authority();
        let now = crate::unix_now();
        let (token, claims) = auth.issue(req(), now).unwrap();
        for _ in 0..3 {
            auth.verify(&token, now).unwrap();
        }
        auth.revoke(&claims.jti, claims.exp);
        assert!(matches!(auth.verify(&token, now), Err(TokenError::Revoked)));

        // A key set without the signing key: the token no longer verifies, cached or not.
        let (other, _) = auth.issue(req(), now).unwrap();
        for _ in 0..3 {
            auth.verify(&other, now).unwrap();
        }
        auth.set_keys(vec![key("k9", 2)]).unwrap();
        assert!(auth.verify(&other, now).is_err());
    }

    #[test]
    fn jti_is_unique_and_once_is_carried() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        let (t1, c1) = auth.issue(req(), now).unwrap();
        let (t2, c2) = auth
            .issue(
                IssueRequest {
                    once: true,
                    ..req()
                },
                now,
            )
            .unwrap();
        assert_ne!(c1.jti, c2.jti);
        assert!(!auth.verify(&t1, now).unwrap().once);
        assert!(auth.verify(&t2, now).unwrap().once);
        // `once: false` and `md: None` are omitted from the payload.
        let payload = t1.split('.').nth(1).unwrap();
        let payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(payload.get("once").is_none() && payload.get("md").is_none());
    }

    #[test]
    fn hand_signed_baseline_verifies() {
        // Guards the helpers: the attacks below differ from this in one thing only.
        let (auth, k) = uncached();
        let now = crate::unix_now();
        assert!(auth
            .verify(&signed_claims(&k, &claims_json(now)), now)
            .is_ok());
    }

    #[test]
    fn alg_none_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let payload = b64(claims_json(now).to_string().as_bytes());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let h = json!({"alg": alg, "typ": TOKEN_TYPE, "kid": k.kid()}).to_string();
            let unsigned = format!("{}.{payload}.", b64(h.as_bytes()));
            assert!(matches!(
                assert_refused(auth.verify(&unsigned, now), "token_invalid"),
                TokenError::Malformed
            ));
            // Even with a genuine signature over it, the header alone refuses it.
            let signed = sign_raw(&k, &h, &claims_json(now).to_string());
            assert!(matches!(
                assert_refused(auth.verify(&signed, now), "token_invalid"),
                TokenError::BadHeader(_)
            ));
        }
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some(TOKEN_TYPE.into());
        h.kid = Some(k.kid().into());
        let key = EncodingKey::from_secret(k.public_key());
        let token = jsonwebtoken::encode(&h, &claims_json(now), &key).unwrap();
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_invalid"),
            TokenError::BadHeader(_)
        ));
        // Same again with the public key base64url-encoded as the secret.
        let key = EncodingKey::from_secret(b64(k.public_key()).as_bytes());
        let token = jsonwebtoken::encode(&h, &claims_json(now), &key).unwrap();
        assert_refused(auth.verify(&token, now), "token_invalid");
    }

    #[test]
    fn es256_is_refused() {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some(TOKEN_TYPE.into());
        h.kid = Some(k.kid().into());
        let token = jsonwebtoken::encode(
            &h,
            &claims_json(now),
            &EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
        .unwrap();
        // A P-256 signature is 64 bytes too, so it is the header check that refuses it.
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_invalid"),
            TokenError::BadHeader(_)
        ));
    }

    #[test]
    fn unknown_and_path_like_kids_are_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        for kid in [
            "k2",
            "K1",
            "",
            "../../etc/passwd",
            "/dev/zero",
            "k1\u{0}",
            "k1 ",
        ] {
            let h = json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid}).to_string();
            let token = sign_raw(&k, &h, &claims_json(now).to_string());
            let err = assert_refused(auth.verify(&token, now), "token_invalid");
            assert!(
                matches!(err, TokenError::UnknownKey | TokenError::BadHeader(_)),
                "{kid:?}: {err:?}"
            );
        }
    }

    #[test]
    fn extra_or_missing_header_members_are_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let payload = claims_json(now).to_string();
        let base = json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": k.kid()});
        for (name, value) in [
            ("jku", json!("https://evil.example/jwks.json")),
            ("x5u", json!("https://evil.example/cert.pem")),
            (
                "jwk",
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key())}),
            ),
            ("x5c", json!(["MIIB"])),
            ("crit", json!(["exp"])),
            ("cty", json!("JWT")),
            ("b64", json!(false)),
        ] {
            let mut h = base.clone();
            h[name] = value;
            let token = sign_raw(&k, &h.to_string(), &payload);
            assert!(
                matches!(
                    assert_refused(auth.verify(&token, now), "token_invalid"),
                    TokenError::BadHeader(_)
                ),
                "{name}"
            );
        }
        let kid = k.kid();
        for h in [
            format!(r#"{{"alg":"EdDSA","typ":"{TOKEN_TYPE}"}}"#),
            format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#),
            format!(r#"{{"typ":"{TOKEN_TYPE}","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"eddsa","typ":"{TOKEN_TYPE}","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"Ed25519","typ":"{TOKEN_TYPE}","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":1}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":null}}"#),
            // Duplicate member: the second `alg` would win in some parsers.
            format!(r#"{{"alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":"{kid}","alg":"none"}}"#),
            format!(r#"{{"alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":"{kid}","kid":"x"}}"#),
        ] {
            let token = sign_raw(&k, &h, &payload);
            assert_refused(auth.verify(&token, now), "token_invalid");
        }
        // A header that is a JSON array (serde would map it onto the struct) or not JSON.
        for h in [
            format!(r#"["EdDSA","{TOKEN_TYPE}","{kid}"]"#),
            " {}".into(),
            "not json".into(),
        ] {
            let token = sign_raw(&k, &h, &payload);
            assert_refused(auth.verify(&token, now), "token_invalid");
        }
    }

    #[test]
    fn each_missing_claim_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        for claim in [
            "iss", "aud", "sub", "sbx", "port", "iat", "nbf", "exp", "jti",
        ] {
            let mut c = claims_json(now);
            c.as_object_mut().unwrap().remove(claim);
            let err = assert_refused(auth.verify(&signed_claims(&k, &c), now), "token_invalid");
            assert!(
                matches!(err, TokenError::InvalidClaims(_)),
                "{claim}: {err:?}"
            );
        }
    }

    #[test]
    fn mistyped_or_empty_claims_are_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let cases: Vec<(&str, Value)> = vec![
            ("exp", json!((now + TTL).to_string())),
            ("nbf", json!(now.to_string())),
            ("iat", json!(now.to_string())),
            ("exp", json!((now + TTL) as f64 + 0.5)),
            ("exp", json!(-1)),
            ("exp", Value::Null),
            ("port", json!(0)),
            ("port", json!(70_000)),
            ("port", json!("8080")),
            ("sub", json!("")),
            ("sbx", json!("")),
            ("jti", json!("")),
            ("sub", json!(["key_123"])),
            ("aud", json!([AUDIENCE])),
            ("aud", json!("someone-else")),
            ("iss", json!("https://evil.example")),
            ("md", json!("not an object")),
            ("once", json!("yes")),
            ("admin", json!(true)),
        ];
        for (claim, value) in cases {
            let mut c = claims_json(now);
            c[claim] = value.clone();
            let err = assert_refused(auth.verify(&signed_claims(&k, &c), now), "token_invalid");
            assert!(
                matches!(err, TokenError::InvalidClaims(_)),
                "{claim}={value}: {err:?}"
            );
        }
    }

    #[test]
    fn duplicate_claim_keys_are_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let good = claims_json(now).to_string();
        for extra in [
            format!(r#","exp":{}}}"#, now + MAX_TTL * 10),
            r#","sbx":"sbx_other"}"#.to_string(),
            r#","port":22}"#.to_string(),
        ] {
            let dup = format!("{}{extra}", good.strip_suffix('}').unwrap());
            let token = sign_raw(&k, &header(k.kid()), &dup);
            assert!(matches!(
                assert_refused(auth.verify(&token, now), "token_invalid"),
                TokenError::InvalidClaims(_)
            ));
        }
    }

    #[test]
    fn payload_must_be_an_object() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let c = claims_json(now);
        let as_array = json!([
            c["iss"], c["aud"], c["sub"], c["sbx"], c["port"], c["iat"], c["nbf"], c["exp"],
            c["jti"]
        ]);
        let token = sign_raw(&k, &header(k.kid()), &as_array.to_string());
        assert_refused(auth.verify(&token, now), "token_invalid");
    }

    #[test]
    fn expiry_honours_the_leeway_exactly() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        // Expired 5 s ago: inside the 30 s leeway.
        let (token, _) = auth.issue(req(), now - TTL - 5).unwrap();
        assert!(auth.verify(&token, now).is_ok());
        // Expired 31 s ago: refused (by the library's clock and ours alike).
        let (token, _) = auth.issue(req(), now - TTL - LEEWAY - 1).unwrap();
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_expired"),
            TokenError::Expired
        ));
        // With an injected clock: the boundary is exp + leeway.
        let (token, c) = auth.issue(req(), now).unwrap();
        assert!(auth.verify(&token, c.exp + LEEWAY - 1).is_ok());
        assert!(matches!(
            auth.verify(&token, c.exp + LEEWAY),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn future_nbf_or_iat_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        for claim in ["nbf", "iat"] {
            let mut c = claims_json(now);
            c[claim] = json!(now + LEEWAY + 5);
            assert!(matches!(
                assert_refused(auth.verify(&signed_claims(&k, &c), now), "token_invalid"),
                TokenError::NotYetValid
            ));
            // Within the leeway is accepted.
            c[claim] = json!(now + LEEWAY - 5);
            assert!(auth.verify(&signed_claims(&k, &c), now).is_ok(), "{claim}");
        }
        // Issued for later, checked with the injected clock.
        let (token, _) = auth.issue(req(), now + 3600).unwrap();
        assert!(matches!(
            auth.verify(&token, now),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn lifetime_longer_than_the_maximum_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let mut c = claims_json(now);
        c["exp"] = json!(now + MAX_TTL + 1);
        assert!(matches!(
            assert_refused(auth.verify(&signed_claims(&k, &c), now), "token_invalid"),
            TokenError::InvalidClaims(_)
        ));
        // exp before iat, and extreme values that would overflow naive arithmetic.
        for (iat, exp) in [(now, now - 1), (i64::MIN, now + 10), (now, i64::MAX)] {
            let mut c = claims_json(now);
            c["iat"] = json!(iat);
            c["exp"] = json!(exp);
            assert_refused(auth.verify(&signed_claims(&k, &c), now), "token_invalid");
        }
        c["exp"] = json!(now + MAX_TTL);
        assert!(auth.verify(&signed_claims(&k, &c), now).is_ok());
    }

    #[test]
    fn oversized_metadata_in_a_signed_token_is_refused() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let mut c = claims_json(now);
        c["md"] = json!({ "blob": "x".repeat(MAX_METADATA_LEN) });
        let token = signed_claims(&k, &c);
        assert!(token.len() <= MAX_TOKEN_LEN);
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_invalid"),
            TokenError::InvalidClaims(_)
        ));
    }

    #[test]
    fn tampering_is_refused() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        let parts: Vec<&str> = token.split('.').collect();

        // Payload swapped for another sandbox, signature kept.
        let mut c = claims_json(now);
        c["sbx"] = json!("sbx_victim");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert!(matches!(
            assert_refused(auth.verify(&forged, now), "token_invalid"),
            TokenError::BadSignature
        ));

        // One signature character changed (not the last, whose low bits are padding).
        let mut sig = parts[2].to_string().into_bytes();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            String::from_utf8(sig).unwrap()
        );
        assert!(matches!(
            assert_refused(auth.verify(&forged, now), "token_invalid"),
            TokenError::BadSignature
        ));

        // Signature truncated or emptied.
        let forged = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]);
        assert_refused(auth.verify(&forged, now), "token_invalid");
        let forged = format!("{}.{}.", parts[0], parts[1]);
        assert_refused(auth.verify(&forged, now), "token_invalid");
    }

    #[test]
    fn no_single_character_change_is_accepted_and_none_panics() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        for i in 0..token.len() {
            for replacement in [b'A', b'z', b'-', b'.', b'=', b'+', b'\0', 0xff] {
                let mut bytes = token.clone().into_bytes();
                if bytes[i] == replacement {
                    continue;
                }
                bytes[i] = replacement;
                let mutated = String::from_utf8_lossy(&bytes);
                assert!(
                    auth.verify(&mutated, now).is_err(),
                    "accepted change at {i}"
                );
            }
        }
    }

    #[test]
    fn malformed_shapes_are_refused() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let (h, p, s) = (parts[0], parts[1], parts[2]);
        for bad in [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}.{p}.{s}."),
            format!(".{p}.{s}"),
            format!("{h}..{s}"),
            format!("{h}=.{p}.{s}"),
            format!("{h}.{p}=.{s}"),
            format!("{h}.{p}.{s}=="),
            format!("{h}.{p}*.{s}"),
            format!("{h}.{p}.{}", s.replace('-', "+").replace('_', "/") + "+/"),
            format!(" {token}"),
            format!("{token}\n"),
            format!("Bearer {token}"),
            "ééé.ééé.ééé".into(),
            "a.b.c".into(),
        ] {
            let err = assert_refused(auth.verify(&bad, now), "token_invalid");
            assert!(
                !matches!(err, TokenError::Crypto(_)),
                "{bad:?} must not look like an internal error"
            );
        }
    }

    #[test]
    fn huge_tokens_are_refused_before_decoding() {
        let (auth, _) = authority();
        let now = crate::unix_now();
        let huge = format!(
            "{}.{}.{}",
            "a".repeat(50_000),
            "b".repeat(50_000),
            "c".repeat(2_000)
        );
        assert!(matches!(
            assert_refused(auth.verify(&huge, now), "token_invalid"),
            TokenError::TooLong
        ));
        assert!(!looks_like_ours(&huge));
        let just_over = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            auth.verify(&just_over, now),
            Err(TokenError::TooLong)
        ));
    }

    #[test]
    fn another_key_with_the_same_kid_is_refused() {
        let (auth, k) = uncached();
        let impostor = key(k.kid(), 2);
        let rogue = Authority::new(settings(0), vec![impostor]).unwrap();
        let now = crate::unix_now();
        let (token, _) = rogue.issue(req(), now).unwrap();
        assert_eq!(decoded_header(&token)["kid"], k.kid());
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_invalid"),
            TokenError::BadSignature
        ));
    }

    #[test]
    fn wrong_issuer_or_audience_settings_refuse() {
        let (auth, k) = uncached();
        let now = crate::unix_now();
        let other = Authority::new(
            TokenSettings {
                audience: "other.test".into(),
                ..settings(0)
            },
            vec![k.clone()],
        )
        .unwrap();
        let (token, _) = other.issue(req(), now).unwrap();
        assert!(matches!(
            assert_refused(auth.verify(&token, now), "token_invalid"),
            TokenError::InvalidClaims(_)
        ));
    }

    #[test]
    fn revocation_applies_with_and_without_the_cache() {
        for (auth, _) in [authority(), uncached()] {
            let now = crate::unix_now();
            let (token, claims) = auth.issue(req(), now).unwrap();
            assert!(auth.verify(&token, now).is_ok());
            assert!(!auth.is_revoked(&claims.jti));
            auth.revoke(&claims.jti, claims.exp);
            assert!(auth.is_revoked(&claims.jti));
            assert!(matches!(
                assert_refused(auth.verify(&token, now), "token_revoked"),
                TokenError::Revoked
            ));
            // Other tokens are unaffected.
            let (other, _) = auth.issue(req(), now).unwrap();
            assert!(auth.verify(&other, now).is_ok());
        }
    }

    #[test]
    fn cached_tokens_still_expire() {
        let (auth, _) = authority();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        assert!(auth.verify(&token, now).is_ok());
        assert_eq!(auth.cache_len(), 1);
        assert!(auth.verify(&token, now + TTL + LEEWAY - 1).is_ok());
        assert!(matches!(
            assert_refused(auth.verify(&token, now + TTL + LEEWAY + 1), "token_expired"),
            TokenError::Expired
        ));
        // And a cached token presented with an earlier clock is not yet valid.
        assert!(matches!(
            auth.verify(&token, now - LEEWAY - 1),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn rotation_keeps_old_tokens_until_their_key_is_removed() {
        let (auth, old) = authority();
        let now = crate::unix_now();
        let (old_token, _) = auth.issue(req(), now).unwrap();
        assert!(auth.verify(&old_token, now).is_ok());

        let new = key("k2", 2);
        auth.set_keys(vec![old.clone(), new.clone()]).unwrap();
        assert_eq!(auth.signing_kid(), "k2");
        assert!(auth.verify(&old_token, now).is_ok());
        let (new_token, _) = auth.issue(req(), now).unwrap();
        assert_eq!(decoded_header(&new_token)["kid"], "k2");
        assert!(auth.verify(&new_token, now).is_ok());
        assert_eq!(auth.jwks()["keys"].as_array().unwrap().len(), 2);

        // The old key is retired: its tokens die at once, even though one was cached.
        auth.set_keys(vec![new]).unwrap();
        assert_eq!(auth.cache_len(), 0);
        assert!(matches!(
            assert_refused(auth.verify(&old_token, now), "token_invalid"),
            TokenError::UnknownKey
        ));
        assert!(auth.verify(&new_token, now).is_ok());
    }

    #[test]
    fn newest_key_signs_whatever_the_order() {
        let a = key("a", 100);
        let b = key("b", 300);
        let c = key("c", 200);
        let auth = Authority::new(settings(8), vec![a, b.clone(), c]).unwrap();
        assert_eq!(auth.signing_kid(), "b");
        let jwks = auth.jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(
            keys[0],
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64(b.public_key()), "kid": "b",
                   "alg": "EdDSA", "use": "sig"})
        );
    }

    #[test]
    fn key_sets_are_validated() {
        let k = key("k1", 1);
        assert!(matches!(
            Authority::new(settings(0), vec![]),
            Err(TokenError::InvalidKey(_))
        ));
        let twin = key("k1", 2);
        assert!(matches!(
            Authority::new(settings(0), vec![k.clone(), twin]),
            Err(TokenError::InvalidKey(_))
        ));
        let (auth, _) = authority();
        assert!(auth.set_keys(vec![]).is_err());
        assert_eq!(
            auth.signing_kid(),
            "k1",
            "a failed set_keys changes nothing"
        );
    }

    #[test]
    fn settings_are_validated() {
        let k = key("k1", 1);
        let bad = [
            TokenSettings {
                leeway_secs: 31,
                ..settings(0)
            },
            TokenSettings {
                leeway_secs: -1,
                ..settings(0)
            },
            TokenSettings {
                default_ttl_secs: 0,
                ..settings(0)
            },
            TokenSettings {
                default_ttl_secs: MAX_TTL + 1,
                ..settings(0)
            },
            TokenSettings {
                max_ttl_secs: 0,
                ..settings(0)
            },
            TokenSettings {
                issuer: String::new(),
                ..settings(0)
            },
            TokenSettings {
                audience: String::new(),
                ..settings(0)
            },
        ];
        for s in bad {
            let err = Authority::new(s.clone(), vec![k.clone()]).unwrap_err();
            assert!(matches!(err, TokenError::InvalidSettings(_)), "{s:?}");
            assert_eq!(err.code(), "internal");
        }
    }

    #[test]
    fn issue_enforces_ttl_metadata_and_fields() {
        let (auth, _) = uncached();
        let now = crate::unix_now();
        for ttl in [0, -1, MAX_TTL + 1, i64::MIN, i64::MAX] {
            let err = auth
                .issue(
                    IssueRequest {
                        ttl_secs: Some(ttl),
                        ..req()
                    },
                    now,
                )
                .unwrap_err();
            assert!(
                matches!(err, TokenError::TtlOutOfRange { max: MAX_TTL }),
                "{ttl}"
            );
            assert_eq!(err.code(), "invalid_argument");
        }
        let (_, c) = auth
            .issue(
                IssueRequest {
                    ttl_secs: Some(MAX_TTL),
                    ..req()
                },
                now,
            )
            .unwrap();
        assert_eq!(c.exp - c.iat, MAX_TTL);

        // {"b":"xxx..."} is 8 bytes of framing plus the string.
        let md = |n: usize| {
            let mut m = serde_json::Map::new();
            m.insert("b".into(), json!("x".repeat(n)));
            Some(m)
        };
        let (token, _) = auth
            .issue(
                IssueRequest {
                    md: md(MAX_METADATA_LEN - 8),
                    ..req()
                },
                now,
            )
            .unwrap();
        assert!(auth.verify(&token, now).is_ok());
        let err = auth
            .issue(
                IssueRequest {
                    md: md(MAX_METADATA_LEN - 7),
                    ..req()
                },
                now,
            )
            .unwrap_err();
        assert!(matches!(err, TokenError::MetadataTooLarge));
        assert_eq!(err.code(), "invalid_argument");

        for bad in [
            IssueRequest {
                sub: String::new(),
                ..req()
            },
            IssueRequest {
                sbx: String::new(),
                ..req()
            },
            IssueRequest {
                sbx: "a\r\nX-Evil: 1".into(),
                ..req()
            },
            IssueRequest {
                sub: "s".repeat(MAX_ID_LEN + 1),
                ..req()
            },
            IssueRequest { port: 0, ..req() },
        ] {
            let err = auth.issue(bad, now).unwrap_err();
            assert!(matches!(err, TokenError::InvalidRequest(_)));
            assert_eq!(err.code(), "invalid_argument");
        }
    }

    #[test]
    fn mark_used_is_true_exactly_once() {
        let (auth, _) = authority();
        assert!(auth.mark_used("j1", 100));
        assert!(!auth.mark_used("j1", 100));
        assert!(!auth.mark_used("j1", 999));
        assert!(auth.mark_used("j2", 100));

        // Concurrent presentations: exactly one wins.
        let auth = Arc::new(authority().0);
        let winners: usize = (0..8)
            .map(|_| {
                let auth = Arc::clone(&auth);
                std::thread::spawn(move || usize::from(auth.mark_used("race", 100)))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(winners, 1);
    }

    #[test]
    fn prune_forgets_only_what_has_expired() {
        let (auth, _) = authority();
        let now = crate::unix_now();
        let (token, claims) = auth.issue(req(), now).unwrap();
        auth.verify(&token, now).unwrap();
        auth.revoke("old", 1_000);
        auth.revoke(&claims.jti, claims.exp);
        assert!(auth.mark_used("old-once", 1_000));
        assert!(auth.mark_used("live-once", claims.exp));

        auth.prune(1_000 + LEEWAY - 1);
        assert!(auth.is_revoked("old"), "still inside the leeway");

        auth.prune(1_000 + LEEWAY);
        assert!(!auth.is_revoked("old"));
        assert!(
            auth.mark_used("old-once", 1_000),
            "forgotten, so usable again"
        );
        assert!(auth.is_revoked(&claims.jti));
        assert!(!auth.mark_used("live-once", claims.exp));
        assert_eq!(auth.cache_len(), 1);

        auth.prune(claims.exp + LEEWAY);
        assert!(!auth.is_revoked(&claims.jti));
        assert_eq!(auth.cache_len(), 0);
    }

    #[test]
    fn looks_like_ours_tells_our_tokens_from_others() {
        let (auth, k) = authority();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        assert!(looks_like_ours(&token));
        // The fast path is on, and every token we sign takes it.
        assert!(
            SIGNED_HEADER_PREFIX.len() >= 40,
            "{}",
            *SIGNED_HEADER_PREFIX
        );
        assert!(token.starts_with(&*SIGNED_HEADER_PREFIX));

        // An app's own JWT: typ JWT, or no typ at all.
        let generic = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "app-user"}),
            &EncodingKey::from_secret(b"app secret"),
        )
        .unwrap();
        assert!(!looks_like_ours(&generic));
        let no_typ = sign_raw(&k, r#"{"alg":"EdDSA"}"#, "{}");
        assert!(!looks_like_ours(&no_typ));

        // Ours in shape even when invalid: it is verified and refused rather than forwarded.
        let expired = auth.issue(req(), now - 10 * TTL).unwrap().0;
        assert!(looks_like_ours(&expired));
        let h = b64(header("k1").as_bytes());
        assert!(looks_like_ours(&format!("{h}.x.y")));
        assert!(!looks_like_ours(&format!("{h}.x")));
        assert!(!looks_like_ours(&format!("{h}.x.y.z")));

        for garbage in [
            "",
            "...",
            "opaque-api-key",
            "a.b.c",
            "Zm9v.YmFy.YmF6",
            "é.é.é",
            "W10.e30.e30",
        ] {
            assert!(!looks_like_ours(garbage), "{garbage:?}");
        }
        let huge_header = b64(json!({"typ": TOKEN_TYPE, "pad": "x".repeat(10_000)})
            .to_string()
            .as_bytes());
        assert!(!looks_like_ours(&format!("{huge_header}.x.y")));
        assert!(!looks_like_ours(&"a.".repeat(100_000)));
    }

    #[test]
    fn signing_keys_persist_and_never_print_their_secret() {
        let k = SigningKey::generate().unwrap();
        assert_eq!(k.kid().len(), 16);
        assert_eq!(k.public_key().len(), 32);
        assert!((k.created_at() - crate::unix_now()).abs() <= 5);

        let restored =
            SigningKey::from_parts(k.kid().into(), k.created_at(), k.pkcs8_der().to_vec()).unwrap();
        assert_eq!(restored.public_key(), k.public_key());

        let debug = format!("{k:?} {k:#?}");
        assert!(debug.contains(k.kid()));
        assert!(debug.contains("redacted"));
        let der = k.pkcs8_der();
        // PKCS#8 of Ed25519: 16 bytes of framing ending in OCTET STRING (0x04, 0x20), then
        // the 32-byte seed. (A v2 document ends with the public key, which may be shown.)
        assert_eq!(&der[14..16], &[0x04, 0x20]);
        let seed = &der[16..48];
        let hex: String = der.iter().map(|b| format!("{b:02x}")).collect();
        for secret in [
            b64(der),
            base64::engine::general_purpose::STANDARD.encode(der),
            format!("{der:?}"),
            hex,
            b64(seed),
        ] {
            assert!(!debug.contains(&secret));
        }

        assert!(matches!(
            SigningKey::from_parts("k".into(), 0, vec![1, 2, 3]),
            Err(TokenError::InvalidKey(_))
        ));
        for kid in ["", "../etc/passwd", "a b", &"k".repeat(65)] {
            assert!(matches!(
                SigningKey::from_parts(kid.into(), 0, k.pkcs8_der().to_vec()),
                Err(TokenError::InvalidKey(_))
            ));
        }
    }

    #[test]
    fn error_codes_are_stable() {
        use TokenError as E;
        for (err, code) in [
            (E::TooLong, "token_invalid"),
            (E::Malformed, "token_invalid"),
            (E::BadHeader("x"), "token_invalid"),
            (E::UnknownKey, "token_invalid"),
            (E::BadSignature, "token_invalid"),
            (E::InvalidClaims("x".into()), "token_invalid"),
            (E::NotYetValid, "token_invalid"),
            (E::Expired, "token_expired"),
            (E::Revoked, "token_revoked"),
            (E::AlreadyUsed, "token_revoked"),
            (E::TtlOutOfRange { max: 1 }, "invalid_argument"),
            (E::MetadataTooLarge, "invalid_argument"),
            (E::InvalidRequest("x"), "invalid_argument"),
            (E::InvalidKey("x"), "internal"),
            (E::InvalidSettings("x"), "internal"),
            (E::Crypto("x".into()), "internal"),
        ] {
            assert_eq!(err.code(), code, "{err:?}");
        }
    }

    #[test]
    fn authority_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authority>();
        assert_send_sync::<SigningKey>();
    }

    /// Not a benchmark (criterion lives in benches/), a smoke check of the hot path:
    /// `cargo test --release --lib token::tests::cache_hit_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn cache_hit_cost() {
        let (auth, _) = authority();
        let now = crate::unix_now();
        let (token, _) = auth.issue(req(), now).unwrap();
        auth.verify(&token, now).unwrap();
        let n = 1_000_000u32;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(auth.verify(std::hint::black_box(&token), now).unwrap());
        }
        let hit = start.elapsed() / n;
        let (auth, _) = uncached();
        let (token, _) = auth.issue(req(), now).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(auth.verify(std::hint::black_box(&token), now).unwrap());
        }
        let miss = start.elapsed() / 1000;
        println!("cache hit: {hit:?}/verify, full verify: {miss:?}/verify");
    }
}
