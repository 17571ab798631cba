//! What one tenant sends, uploads or publishes never takes another tenant's calls down: absurd
//! tensors, plugins that hold on to their slot, floods of work. Each test is the attack of THREATS.md;
//! it passes when every other tenant is still served.

use plinth_tests::TestApp;
use serde_json::{Value, json};

const DATATYPES: [&str; 6] = ["FP32", "FP16", "INT64", "INT32", "BOOL", "BYTES"];

/// Shapes that ask for terabytes, overflow, or hide a huge dimension behind a zero.
fn absurd_shapes() -> [Value; 4] {
    [
        json!([1, 1_099_511_627_776_i64]),
        json!([0, 1_099_511_627_776_i64]),
        json!([2_147_483_648_i64, 2_147_483_648_i64, 2_147_483_648_i64]),
        json!([i64::MAX, 2]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_tensor_shapes_are_refused_and_the_server_keeps_serving() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let url = app.url("/v2/models/sentiment/infer");
    for datatype in DATATYPES {
        for shape in absurd_shapes() {
            let input = json!({ "name": "input_ids", "datatype": datatype, "shape": shape, "data": [] });
            let as_json = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .json(&json!({ "inputs": [input] }))
                .send()
                .await
                .unwrap();
            assert_eq!(as_json.status(), 400, "{datatype} {shape}");
            let body: Value = as_json.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap_or_default().contains("elements"),
                "{body}"
            );

            // The binary extension: the JSON header claims the shape, no bytes follow.
            let header = json!({ "inputs": [{
                "name": "input_ids", "datatype": datatype, "shape": shape,
                "parameters": { "binary_data_size": 0 },
            }]})
            .to_string();
            let as_binary = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .header("Inference-Header-Content-Length", header.len().to_string())
                .header("Content-Type", "application/octet-stream")
                .body(header)
                .send()
                .await
                .unwrap();
            assert_eq!(as_binary.status(), 400, "binary {datatype} {shape}");
        }
    }
    // Still serving, and nothing was billed for the refusals.
    let answer = tenant
        .client
        .classify("sentiment", &["still here"])
        .await
        .unwrap();
    assert_eq!(answer.results.len(), 1);
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 1);
}
