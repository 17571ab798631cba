//! The authentication and authorisation matrix.

use std::time::Duration;

use plinth_sdk::{CreateApiKeyRequest, ErrorCode, Scope};
use plinth_tests::TestApp;
use serde_json::json;

async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_unknown_credentials_are_refused() {
    let app = TestApp::spawn().await;
    let http = app.http();
    let url = app.url("/v1/tenant");

    let (status, code) = status_and_code(http.get(&url).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));
    let (status, code) = status_and_code(
        http.get(&url)
            .header("authorization", "Basic abc")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));

    // Right shape, wrong checksum; then right checksum, unknown key.
    let tenant = app.tenant().await;
    let mut typo = tenant.key.secret.clone().into_bytes();
    typo[12] = if typo[12] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    for token in [typo.as_str(), "plk_live_nothing", "pls_unknown"] {
        let (status, code) = status_and_code(http.get(&url).bearer_auth(token).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (401, "invalid_credentials"), "{token}");
    }
    tenant.client.tenant().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_replica_within_a_second() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    let tenant = app.tenant().await;
    let on_replica = replica.client().with_token(&tenant.key.secret);
    on_replica.echo(&json!({})).await.unwrap();
    tenant.client.echo(&json!({})).await.unwrap();

    let revoked = tenant.owner.revoke_api_key(&tenant.key.key.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    // On the replica that handled the revocation: at once.
    let err = tenant.client.echo(&json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ApiKeyRevoked));
    // On the other replica: once its credential cache entry (TTL 1 s) expires.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let err = on_replica.echo(&json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ApiKeyRevoked));
    // Revoking again is harmless.
    tenant.owner.revoke_api_key(&tenant.key.key.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_act_only_within_their_scopes() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant_with_scopes(&[Scope::Inference]).await;
    // Metered calls and the tenant are open to any key of the tenant.
    tenant.client.echo(&json!({"x": 1})).await.unwrap();
    tenant.client.tenant().await.unwrap();
    // Reading usage needs billing:read; managing keys needs admin.
    let err = tenant.client.usage(&Default::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InsufficientScope));
    let err = tenant.client.api_keys().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InsufficientScope));

    // An admin key cannot mint a key with a scope it lacks.
    let admin_only = tenant
        .owner
        .create_api_key(&CreateApiKeyRequest {
            name: "admin".into(),
            scopes: Some(vec![Scope::Admin]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let admin = app.client().with_token(&admin_only.secret);
    let err = admin
        .create_api_key(&CreateApiKeyRequest {
            name: "x".into(),
            scopes: Some(vec![Scope::BillingRead]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InsufficientScope));
    let listed = admin.api_keys().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|key| key.redacted.contains('…')));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_resources_are_not_found() {
    let app = TestApp::spawn().await;
    let alice = app.tenant().await;
    let bob = app.tenant().await;
    let err = bob.owner.revoke_api_key(&alice.key.key.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = bob.owner.remove_member(&alice.session.user.id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(
        bob.owner
            .api_keys()
            .await
            .unwrap()
            .iter()
            .all(|key| key.id != alice.key.key.id)
    );
    // Alice's key still works: Bob's attempt changed nothing.
    alice.client.echo(&json!({})).await.unwrap();
    // Each tenant sees only its own usage.
    let usage = bob.client.usage(&Default::default()).await.unwrap();
    assert_eq!(usage.total.calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_refused() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let expiring = tenant
        .owner
        .create_api_key(&CreateApiKeyRequest {
            name: "short-lived".into(),
            scopes: None,
            rate_limit_per_minute: None,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::milliseconds(1_500)),
        })
        .await
        .unwrap();
    let client = app.client().with_token(&expiring.secret);
    client.echo(&json!({})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    let err = client.echo(&json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidCredentials));
    let past = tenant
        .owner
        .create_api_key(&CreateApiKeyRequest {
            name: "past".into(),
            scopes: None,
            rate_limit_per_minute: None,
            expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Some(ErrorCode::ValidationFailed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_use_is_recorded() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    assert!(tenant.key.key.last_used_at.is_none());
    tenant.client.echo(&json!({})).await.unwrap();
    let mut seen = None;
    for _ in 0..50 {
        let keys = tenant.owner.api_keys().await.unwrap();
        seen = keys
            .iter()
            .find(|key| key.id == tenant.key.key.id)
            .and_then(|key| key.last_used_at);
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "last_used_at was never set");
}
