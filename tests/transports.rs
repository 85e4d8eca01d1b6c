//! Each token transport admits; the upstream never sees our token and does see identity headers.

mod common;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn header_transport_admits_and_strips() {
    let echo = Echo::start().await;
    let gw = TestGateway::start().await;
    let id = gw.create_sandbox(&[echo.port()]).await;
    let minted = gw
        .mint(&id, echo.port(), json!({"user_metadata": {"user": "ada"}}))
        .await;
    let token = minted["token"].as_str().unwrap();
    let host = sandbox_host(echo.port(), &id);

    let resp = gw
        .tls()
        .get(
            &host,
            "/hello?x=1",
            &[
                ("x-sandgate-token", token),
                ("x-sandgate-subject", "forged"),
                ("x-forwarded-for", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = echo.last();
    assert_eq!(seen.uri, "/hello?x=1");
    assert!(seen.headers.get("x-sandgate-token").is_none());
    assert_eq!(
        seen.headers["x-sandgate-token-id"],
        minted["jti"].as_str().unwrap()
    );
    assert!(seen.headers["x-sandgate-subject"]
        .to_str()
        .unwrap()
        .starts_with("cred_"));
    assert_eq!(
        seen.headers["x-sandgate-user-metadata"],
        r#"{"user":"ada"}"#
    );
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], host.as_str());
}
