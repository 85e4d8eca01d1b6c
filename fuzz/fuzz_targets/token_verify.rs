//! Token parsing and verification on arbitrary input: never a panic, never an accepted forgery.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sandgate::token::{self, Authority, IssueRequest, SigningKey, TokenSettings};

fn authority() -> &'static (Authority, String) {
    static A: OnceLock<(Authority, String)> = OnceLock::new();
    A.get_or_init(|| {
        let settings = TokenSettings {
            issuer: "https://sandbox.localhost".into(),
            audience: "sandgate".into(),
            default_ttl_secs: 600,
            max_ttl_secs: 86_400,
            leeway_secs: 30,
            cache_capacity: 1024,
        };
        let key = SigningKey::generate().expect("key");
        let a = Authority::new(settings, vec![key]).expect("authority");
        let (good, _) = a
            .issue(
                IssueRequest {
                    sub: "cred_fuzz".into(),
                    sbx: "abcdefghijklmnopqrstuvwx".into(),
                    port: 8000,
                    ttl_secs: Some(3600),
                    md: None,
                    once: false,
                },
                sandgate::unix_now(),
            )
            .expect("issue");
        (a, good)
    })
}

fuzz_target!(|data: &[u8]| {
    let (a, good) = authority();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = token::looks_like_ours(text);
    if let Ok(claims) = a.verify(text, sandgate::unix_now()) {
        // Only the one token we issued may verify.
        assert_eq!(text, good.as_str(), "a token we did not issue verified");
        assert_eq!(claims.port, 8000);
    }
    // Splice the input into the good token's segments: tampering must never verify.
    let parts: Vec<&str> = good.split('.').collect();
    for i in 0..3 {
        let mut p = parts.clone();
        p[i] = text;
        let forged = p.join(".");
        if forged != *good {
            assert!(
                a.verify(&forged, sandgate::unix_now()).is_err(),
                "a tampered token verified"
            );
        }
    }
});
