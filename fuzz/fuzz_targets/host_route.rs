//! Host canonicalisation and sandbox-host parsing on arbitrary input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::proxy::{canonical_host, parse_sandbox_label};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(host) = canonical_host(text) {
        assert!(!host.is_empty());
        assert_eq!(host, host.to_ascii_lowercase());
        assert!(!host.ends_with('.') || host == ".");
    }
    if let Some((port, id)) = parse_sandbox_label(text) {
        assert!(port > 0);
        assert!(sandgate::sandbox::is_valid_id(id));
        assert_eq!(format!("{port}-{id}"), text);
    }
});
