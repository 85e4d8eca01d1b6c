//! Cookie and query-string handling on arbitrary input: the token is always removed.
#![no_main]

use http::header::{HeaderMap, HeaderValue, COOKIE};
use libfuzzer_sys::fuzz_target;
use sandgate::proxy::headers::{find_cookie, query_has_token, remove_cookie, split_query_token};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (token, rest) = split_query_token(text);
    assert!(
        !query_has_token(&rest),
        "the query still carries a token: {rest:?}"
    );
    if query_has_token(text) {
        let _ = token;
    }
    if let Ok(value) = HeaderValue::from_str(text) {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, value);
        let _ = find_cookie(&headers);
        remove_cookie(&mut headers);
        assert!(
            find_cookie(&headers).is_none(),
            "our cookie survived removal"
        );
    }
});
