use std::time::Duration;

use plinth_sdk::{CreateApiKeyRequest, ErrorCode, RetryPolicy, Scope};
use plinth_tests::{Backend, TestApp};
use serde_json::json;

fn header(response: &reqwest::Response, name: &str) -> u64 {
    response.headers()[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_burst_is_enforced_then_recovers() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let http = app.http();
    let echo = || {
        http.post(app.url("/v1/echo"))
            .bearer_auth(&tenant.key.secret)
            .json(&json!({}))
    };

    // The free plan: 60 per minute, bursts of 10.
    for expected_remaining in (0..10).rev() {
        let response = echo().send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "ratelimit-limit"), 60);
        assert!(header(&response, "ratelimit-remaining") <= expected_remaining);
    }
    let refused = echo().send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after = header(&refused, "retry-after");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header(&refused, "ratelimit-remaining"), 0);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(echo().send().await.unwrap().status(), 200);
    // Only the served calls were metered.
    assert_eq!(
        tenant
            .client
            .usage(&Default::default())
            .await
            .unwrap()
            .total
            .calls,
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_can_carry_its_own_lower_limit() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let slow = tenant
        .owner
        .create_api_key(&CreateApiKeyRequest {
            name: "slow".into(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: Some(6),
            expires_at: None,
        })
        .await
        .unwrap();
    assert_eq!(slow.key.rate_limit_per_minute, Some(6));
    let slow = app.client().with_token(&slow.secret).with_retry(RetryPolicy {
        max_retries: 0,
        ..Default::default()
    });
    slow.echo(&json!({})).await.unwrap();
    let err = slow.echo(&json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    // The tenant's other key is unaffected.
    tenant.client.echo(&json!({})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_waits_out_retry_after() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    for _ in 0..10 {
        tenant.client.echo(&json!({})).await.unwrap();
    }
    // The 11th call is refused once, then retried by the SDK after Retry-After, with the same key.
    let reply = tenant.client.echo(&json!({"n": 11})).await.unwrap();
    assert!(!reply.replayed);
    assert_eq!(
        tenant
            .client
            .usage(&Default::default())
            .await
            .unwrap()
            .total
            .calls,
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_replicas_sharing_redis() {
    let app = TestApp::spawn().await;
    if app.backend != Backend::PostgresRedis {
        // The in-process limiter is per replica by design; the shared one is exercised on Redis.
        return;
    }
    let replica = app.replica().await;
    let tenant = app.tenant().await;
    let no_retry = RetryPolicy {
        max_retries: 0,
        ..Default::default()
    };
    let first = tenant.client.clone().with_retry(no_retry);
    let second = replica
        .client()
        .with_token(&tenant.key.secret)
        .with_retry(no_retry);
    for i in 0..10 {
        let client = if i % 2 == 0 { &first } else { &second };
        client.echo(&json!({})).await.unwrap();
    }
    assert_eq!(
        second.echo(&json!({})).await.unwrap_err().code(),
        Some(ErrorCode::RateLimited)
    );
    assert_eq!(
        first.echo(&json!({})).await.unwrap_err().code(),
        Some(ErrorCode::RateLimited)
    );
}
