//! Every error has the one JSON shape, a fitting status and code, and the request id.

use plinth_tests::TestApp;
use serde_json::{Value, json};

async fn expect_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status);
    let header_id = response
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(body["error"]["request_id"], header_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_errors_use_the_error_shape() {
    let app = TestApp::spawn().await;
    let http = app.http();
    expect_error(
        http.get(app.url("/v1/nothing-here")).send().await.unwrap(),
        404,
        "route_not_found",
    )
    .await;
    expect_error(
        http.put(app.url("/v1/plans")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        http.get(app.url("/v1/signup")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_clear_client_errors() {
    let app = TestApp::spawn().await;
    let http = app.http();
    let signup = app.url("/v1/signup");
    let json_post = |body: &'static str| {
        http.post(&signup)
            .header("content-type", "application/json")
            .body(body)
    };

    expect_error(
        json_post("{\"email\":").send().await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(json_post("[1, 2]").send().await.unwrap(), 422, "invalid_body").await;
    expect_error(
        json_post("{\"email\": 5, \"password\": \"x\", \"tenant_name\": \"y\"}")
            .send()
            .await
            .unwrap(),
        422,
        "invalid_body",
    )
    .await;
    expect_error(
        http.post(&signup)
            .header("content-type", "text/plain")
            .body("hi")
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let huge =
        json!({ "email": "a@example.com", "password": "x".repeat(2 * 1024 * 1024), "tenant_name": "y" });
    expect_error(
        http.post(&signup).json(&huge).send().await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_paths_and_headers_are_refused() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let http = app.http();
    let key = &tenant.key.secret;
    expect_error(
        http.get(app.url("/v1/usage?from=yesterday"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;
    expect_error(
        http.get(app.url("/v1/usage?group_by=week"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;
    // Dates chrono parses but no period can reach: the default start, 30 days before, would overflow.
    for query in ["to=-262143-01-01", "from=+262142-12-31", "to=0001-01-01"] {
        expect_error(
            http.get(app.url(&format!("/v1/usage?{query}")))
                .bearer_auth(key)
                .send()
                .await
                .unwrap(),
            400,
            "invalid_query",
        )
        .await;
        expect_error(
            http.get(app.url(&format!("/v1/author/earnings?{query}")))
                .bearer_auth(&tenant.session.token)
                .send()
                .await
                .unwrap(),
            400,
            "invalid_query",
        )
        .await;
    }
    expect_error(
        http.get(app.url("/v1/usage?from=2026-02-01&to=2026-01-01"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    expect_error(
        http.delete(app.url("/v1/api-keys/not-a-key-id"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    let too_long = "k".repeat(256);
    expect_error(
        http.post(app.url("/v1/echo"))
            .bearer_auth(key)
            .header("idempotency-key", too_long)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_header",
    )
    .await;
    // None of the refused calls was metered.
    assert_eq!(
        tenant
            .client
            .usage(&Default::default())
            .await
            .unwrap()
            .total
            .calls,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_request_id_is_kept() {
    let app = TestApp::spawn().await;
    let response = app
        .http()
        .get(app.url("/v1/tenant"))
        .header("x-request-id", "trace-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "trace-123");
}
