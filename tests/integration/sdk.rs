//! The SDK against the real server: the README's quick start, typed errors, and retry behaviour.

use std::time::{Duration, Instant};

use plinth_sdk::{
    Client, CreateApiKeyRequest, Error, ErrorCode, RetryPolicy, Scope, SignupRequest, UsageGrouping,
    UsageQuery,
};
use plinth_tests::{PASSWORD, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_works_through_the_sdk() {
    let app = TestApp::spawn().await;
    let session = app
        .client()
        .signup(&SignupRequest {
            email: "quick@example.com".into(),
            password: PASSWORD.into(),
            tenant_name: "Quick".into(),
        })
        .await
        .unwrap();
    let owner = app.client().with_token(&session.token);
    let key = owner
        .create_api_key(&CreateApiKeyRequest {
            name: "backend".into(),
            scopes: Some(vec![Scope::Inference, Scope::BillingRead]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();
    assert!(key.secret.starts_with("plk_live_"));
    assert_eq!(key.key.scopes, vec![Scope::Inference, Scope::BillingRead]);

    let client = app.client().with_token(&key.secret);
    let plans = client.plans().await.unwrap();
    assert_eq!(
        plans.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        ["free", "pro", "enterprise"]
    );
    assert_eq!(client.subscription().await.unwrap().plan, plans[0]);
    let echoed = client.echo(&json!({"hello": "world"})).await.unwrap();
    assert_eq!(echoed.echo, json!({"hello": "world"}));
    let usage = client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_arrive_typed() {
    let app = TestApp::spawn().await;
    let err = app
        .client()
        .with_token("plk_live_bogus")
        .tenant()
        .await
        .unwrap_err();
    let Error::Api {
        status,
        code,
        request_id,
        retry_after,
        ..
    } = err
    else {
        panic!("expected an API error, got {err:?}");
    };
    assert_eq!((status, code), (401, ErrorCode::InvalidCredentials));
    assert!(request_id.starts_with("req_"));
    assert_eq!(retry_after, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_are_retried_then_reported() {
    // A port nobody listens on.
    let port = plinth_tests::unshared_port();
    let client = Client::new(&format!("http://127.0.0.1:{port}"))
        .unwrap()
        .with_retry(RetryPolicy {
            max_retries: 2,
            initial_backoff: Duration::from_millis(50),
            max_wait: Duration::from_secs(1),
        });
    let started = Instant::now();
    let err = client.plans().await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    // Two retries after 50 ms and 100 ms of back-off.
    assert!(started.elapsed() >= Duration::from_millis(150));
}

/// The Open Inference Protocol through the SDK: the server's metadata and liveness without
/// credentials, a model's readiness, and every version-pinned route answering as the unpinned one
/// for the version that serves (a version that does not exist: a typed 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_protocol_is_typed_version_pinned_routes_included() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let anonymous = app.client();
    let server = anonymous.server_metadata().await.unwrap();
    assert_eq!(server.name, "plinth");
    assert!(server.extensions.iter().any(|e| e == "binary_tensor_data"));
    assert!(anonymous.live().await.unwrap());

    let client = &tenant.client;
    assert!(client.model_ready("sentiment").await.unwrap());
    let metadata = client.model_metadata("sentiment").await.unwrap();
    let version: u32 = metadata.versions[0].parse().unwrap();
    assert_eq!(
        client.model_version_metadata("sentiment", version).await.unwrap(),
        metadata
    );
    assert!(client.model_version_ready("sentiment", version).await.unwrap());
    let missing = client
        .model_version_ready("sentiment", version + 1)
        .await
        .unwrap_err();
    assert_eq!(missing.status(), Some(404), "{missing:?}");

    // "[CLS] love this [SEP]" in the model's vocabulary.
    let input = |name: &str, data: [i64; 4]| plinth_sdk::InferInput {
        name: name.into(),
        shape: vec![1, 4],
        datatype: "INT64".into(),
        parameters: None,
        data: json!([data]),
    };
    let request = plinth_sdk::InferRequest {
        id: Some("pinned".into()),
        inputs: vec![
            input("input_ids", [101, 2293, 2023, 102]),
            input("attention_mask", [1, 1, 1, 1]),
            input("token_type_ids", [0, 0, 0, 0]),
        ],
        outputs: None,
        parameters: None,
    };
    let pinned = client
        .infer_version("sentiment", version, &request)
        .await
        .unwrap();
    let latest = client.infer("sentiment", &request).await.unwrap();
    assert_eq!(pinned.model_version, version.to_string());
    assert_eq!(pinned.id.as_deref(), Some("pinned"));
    assert_eq!(pinned.outputs[0].data, latest.outputs[0].data);
    let statistics = client
        .model_version_statistics("sentiment", version)
        .await
        .unwrap();
    assert!(statistics.success_count >= 2, "{statistics:?}");
}

/// A key the application chooses makes a call it may send again count once: the repeat gets the first
/// answer and is not billed; the same key with another request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_chosen_idempotency_key_bills_a_repeated_call_once() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let keyed = tenant.client.idempotent("order-1234-classification");
    let first = keyed
        .classify("sentiment", &["Where is my parcel?"])
        .await
        .unwrap();
    let again = keyed
        .classify("sentiment", &["Where is my parcel?"])
        .await
        .unwrap();
    assert_eq!(first, again);
    // Without it, each call is its own.
    tenant
        .client
        .classify("sentiment", &["Where is my parcel?"])
        .await
        .unwrap();
    let usage = tenant
        .owner
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..UsageQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 2, "{usage:?}");
    let reused = keyed
        .classify("sentiment", &["something else"])
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Some(ErrorCode::IdempotencyKeyReused));
}

/// An upload reports its progress as its files are sent, in pieces, up to every byte of them; the
/// model it uploads is the same as without progress reporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_report_their_progress_up_to_every_byte() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let builtin = plinth_server::config::cache_dir().join("models");
    let model = std::fs::read(builtin.join("sentiment.onnx")).unwrap();
    let tokenizer = std::fs::read(builtin.join("tokenizer.json")).unwrap();
    let total = (model.len() + tokenizer.len()) as u64;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = tenant.owner.clone().with_upload_progress(std::sync::Arc::new({
        let seen = seen.clone();
        move |sent, of| seen.lock().unwrap().push((sent, of))
    }));
    let uploaded = client
        .upload_model(
            &json!({ "name": "tracked", "task": "text-classification", "labels": ["neg", "neu", "pos"] }),
            model,
            Some(tokenizer),
        )
        .await
        .unwrap();
    assert_eq!(uploaded.version, 1);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 10, "reported in pieces: {}", seen.len());
    assert!(
        seen.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "it only goes forward"
    );
    assert!(seen.iter().all(|(_, of)| *of == total));
    assert_eq!(seen.last().map(|(sent, _)| *sent), Some(total));
    let answer = tenant
        .client
        .classify("tracked", &["I love this product"])
        .await
        .unwrap();
    assert_eq!(answer.results[0].label, "pos");
}
