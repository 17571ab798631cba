//! Model serving through the API: built-in models, task endpoints, the v2 protocol, metering, batching.

use futures_util::future::join_all;
use plinth_sdk::{
    Classification, ErrorCode, InferInput, InferRequest, RequestedOutput, Scope, Task, UsageGrouping,
    UsageQuery,
};
use plinth_tests::TestApp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_models_are_served_to_every_tenant() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let models = tenant.client.models().await.unwrap();
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["minilm-embed", "sentiment"]);
    let sentiment = tenant.client.model("sentiment").await.unwrap();
    assert_eq!(sentiment.task, Task::TextClassification);
    assert_eq!(sentiment.labels, ["negative", "neutral", "positive"]);
    assert_eq!(sentiment.execution_provider, "cpu");
    assert!(sentiment.platform);
    assert_eq!(
        tenant.client.model("nope").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentiment_is_sensible() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let reply = tenant
        .client
        .classify("sentiment", &["I love this product", "this is terrible"])
        .await
        .unwrap();
    assert_eq!(reply.results[0].label, "positive");
    assert_eq!(reply.results[1].label, "negative");
    for result in &reply.results {
        let total: f32 = result.scores.iter().map(|s| s.score).sum();
        assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
        assert!(result.score > 0.8);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_normalised_and_similar_texts_are_close() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let reply = tenant
        .client
        .embed(
            "minilm-embed",
            &[
                "How do I reset my password?",
                "I forgot my password",
                "The weather is sunny",
            ],
        )
        .await
        .unwrap();
    assert_eq!(reply.dimensions, 384);
    let e = &reply.embeddings;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for v in e {
        assert!((dot(v, v) - 1.0).abs() < 1e-3);
    }
    assert!(
        dot(&e[0], &e[1]) > dot(&e[0], &e[2]) + 0.2,
        "paraphrases should be closer than unrelated text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_endpoints_refuse_what_they_cannot_do() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let wrong_task = tenant.client.classify("minilm-embed", &["hi"]).await.unwrap_err();
    assert_eq!(wrong_task.code(), Some(ErrorCode::UnsupportedTask));
    let empty = tenant.client.classify("sentiment", &[]).await.unwrap_err();
    assert_eq!(empty.code(), Some(ErrorCode::InvalidInput));
    let too_many: Vec<&str> = vec!["x"; 257];
    assert_eq!(
        tenant
            .client
            .embed("minilm-embed", &too_many)
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::InvalidInput)
    );
    // A key without the inference scope cannot call models.
    let billing = app
        .client()
        .with_token(&app.tenant_with_scopes(&[Scope::BillingRead]).await.key.secret);
    assert_eq!(
        billing.classify("sentiment", &["hi"]).await.unwrap_err().code(),
        Some(ErrorCode::InsufficientScope)
    );
    // None of the refused calls was billed.
    assert_eq!(
        tenant
            .client
            .usage(&UsageQuery::default())
            .await
            .unwrap()
            .total
            .calls,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_metered_once_with_units_equal_to_the_batch() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "pro").await;
    tenant
        .client
        .classify("sentiment", &["a", "b", "c"])
        .await
        .unwrap();
    tenant.client.embed("minilm-embed", &["d", "e"]).await.unwrap();
    let usage = tenant
        .client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..Default::default()
        })
        .await
        .unwrap();
    let row = |key: &str| usage.rows.iter().find(|r| r.key == key).cloned().unwrap();
    assert_eq!(
        (row("model:sentiment").calls, row("model:sentiment").units),
        (1, 3)
    );
    assert_eq!(
        (row("model:minilm-embed").calls, row("model:minilm-embed").units),
        (1, 2)
    );
    // The pro plan's list price (400 micro-dollars per unit) is on each event.
    assert_eq!(usage.total.amount_micros.0, 5 * 400);

    // A retried call with the same key is answered again but not billed again.
    let http = app.http();
    for _ in 0..2 {
        let response = http
            .post(app.url("/v1/models/sentiment/classify"))
            .bearer_auth(&tenant.key.secret)
            .header("idempotency-key", "batch-7")
            .json(&json!({ "inputs": ["fine", "great"] }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        app.store()
            .usage_event_count(&tenant.session.tenant.id)
            .await
            .unwrap(),
        3
    );
}

fn token_inputs() -> Vec<InferInput> {
    // "[CLS] love this [SEP]" in the MiniLM vocabulary.
    let tensor = |name: &str, data: Value| InferInput {
        name: name.into(),
        shape: vec![1, 4],
        datatype: "INT64".into(),
        parameters: None,
        data,
    };
    vec![
        tensor("input_ids", json!([[101, 2293, 2023, 102]])),
        tensor("attention_mask", json!([1, 1, 1, 1])),
        tensor("token_type_ids", json!([0, 0, 0, 0])),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_protocol_serves_metadata_and_tensors() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let metadata = tenant.client.model_metadata("sentiment").await.unwrap();
    assert_eq!(metadata.versions, ["1"]);
    assert_eq!(
        metadata
            .inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["input_ids", "attention_mask", "token_type_ids"]
    );
    assert!(
        metadata
            .outputs
            .iter()
            .any(|o| o.name == "probs" && o.shape == [-1, 3])
    );

    let reply = tenant
        .client
        .infer(
            "sentiment",
            &InferRequest {
                id: Some("req-1".into()),
                parameters: None,
                inputs: token_inputs(),
                outputs: Some(vec![RequestedOutput {
                    name: "probs".into(),
                    parameters: None,
                }]),
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.id.as_deref(), Some("req-1"));
    assert_eq!(reply.outputs.len(), 1);
    assert_eq!(reply.outputs[0].shape, [1, 3]);
    let probs: Vec<f64> = reply.outputs[0]
        .data
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);

    let http = app.http();
    let ready = http
        .get(app.url("/v2/models/sentiment/versions/1/ready"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let missing = http
        .get(app.url("/v2/models/sentiment/versions/9"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tensors_are_refused_clearly() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let infer = |mutate: fn(&mut Vec<InferInput>)| {
        let client = tenant.client.clone();
        async move {
            let mut inputs = token_inputs();
            mutate(&mut inputs);
            client
                .infer(
                    "sentiment",
                    &InferRequest {
                        id: None,
                        parameters: None,
                        inputs,
                        outputs: None,
                    },
                )
                .await
                .unwrap_err()
        }
    };
    type Mutation = fn(&mut Vec<InferInput>);
    let cases: [(Mutation, &str); 7] = [
        (|i| i[0].shape = vec![1, 5], "5 elements"),
        (
            |i| {
                let twice = i[0].clone();
                i.push(twice);
            },
            "given more than once",
        ),
        (|i| i[0].datatype = "FP32".into(), "datatype FP32"),
        (|i| i[0].datatype = "STRINGS".into(), "STRINGS"),
        (|i| i[0].data = json!(["a", "b", "c", "d"]), "integers"),
        (|i| drop(i.remove(2)), "missing input `token_type_ids`"),
        (
            |i| {
                let mut extra = i[2].clone();
                extra.name = "segment_ids".into();
                i.push(extra);
            },
            "no input `segment_ids`",
        ),
    ];
    for (mutate, expected) in cases {
        let err = infer(mutate).await;
        let plinth_sdk::Error::Api {
            status,
            code,
            message,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*status, *code), (400, ErrorCode::InvalidInput), "{message}");
        assert!(
            message.contains(expected),
            "`{message}` should mention `{expected}`"
        );
    }
    let unknown_output = tenant
        .client
        .infer(
            "sentiment",
            &InferRequest {
                id: None,
                parameters: None,
                inputs: token_inputs(),
                outputs: Some(vec![RequestedOutput {
                    name: "logits".into(),
                    parameters: None,
                }]),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(unknown_output.code(), Some(ErrorCode::InvalidInput));
    // An output asked for again and again would be copied out as often: refused, whatever the count.
    let repeated = tenant
        .client
        .infer(
            "sentiment",
            &InferRequest {
                id: None,
                parameters: None,
                inputs: token_inputs(),
                outputs: Some(vec![
                    RequestedOutput {
                        name: "probs".into(),
                        parameters: None,
                    };
                    10_000
                ]),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(repeated.code(), Some(ErrorCode::InvalidInput), "{repeated:?}");
    assert!(repeated.to_string().contains("more than once"), "{repeated}");
    assert_eq!(
        tenant
            .client
            .usage(&UsageQuery::default())
            .await
            .unwrap()
            .total
            .calls,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_batches_and_get_their_own_answers() {
    let app = TestApp::spawn_with(|config| config.max_queue_delay_us = 20_000).await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    // Of different lengths: in a shared run every text is padded to the longest, which must not
    // change its scores.
    let texts = [
        "I love this product",
        "this is terrible, the worst thing I have bought in years, and I want my money back",
    ];
    let mut alone = Vec::new();
    for text in texts {
        alone.push(
            tenant
                .client
                .classify("sentiment", &[text])
                .await
                .unwrap()
                .results[0]
                .clone(),
        );
    }
    let calls = (0..24).map(|i| {
        let client = tenant.client.clone();
        async move { (i, client.classify("sentiment", &[texts[i % 2]]).await.unwrap()) }
    });
    for (i, reply) in join_all(calls).await {
        assert_eq!(reply.results.len(), 1);
        let (batched, alone) = (&reply.results[0], &alone[i % 2]);
        assert_eq!(batched.label, if i % 2 == 0 { "positive" } else { "negative" });
        assert_scores_within(batched, alone, 1e-4, "in a run, then alone");
    }
    let stats = tenant.client.model_statistics("sentiment").await.unwrap();
    assert_eq!(
        (stats.success_count, stats.failure_count, stats.inference_count),
        (26, 0, 26)
    );
    assert!(
        stats.execution_count < 20,
        "24 calls ran in {} executions",
        stats.execution_count
    );
    let metrics = app.metrics().await;
    assert!(metrics.contains("nv_inference_exec_count{model=\"sentiment\"}"));
    assert!(metrics.contains("plinth_model_info{model=\"sentiment\",execution_provider=\"cpu\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_call_of_another_tenant_does_not_ride_in_a_light_tenants_run() {
    // One session whose runs wait four seconds for company, so that calls sent a second apart meet
    // in one run, in the order sent, on a busy machine too.
    let app = TestApp::spawn_with(|config| config.max_queue_delay_us = 4_000_000).await;
    let (light, other) = (app.tenant().await, app.tenant().await);
    let short = "Shares rose after the results";
    let long = format!("{} and the outlook was raised again", "word ".repeat(100));
    let meet = |first: plinth_sdk::Client,
                first_text: String,
                second: plinth_sdk::Client,
                second_text: String| async move {
        let leading = tokio::spawn(async move { first.classify("sentiment", &[first_text.as_str()]).await });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let joining = second
            .classify("sentiment", &[second_text.as_str()])
            .await
            .unwrap();
        (leading.await.unwrap().unwrap(), joining)
    };
    let executions = || async {
        light
            .client
            .model_statistics("sentiment")
            .await
            .unwrap()
            .execution_count
    };
    let before = executions().await;
    // A light tenant's short call leads; another tenant's longer call arrives while the run waits:
    // padded to it, the short text would cost as much as the long one, so the long call goes back
    // to the queue and runs on its own.
    let (short_reply, long_reply) = meet(
        light.client.clone(),
        short.to_owned(),
        other.client.clone(),
        long.clone(),
    )
    .await;
    assert_eq!((short_reply.results.len(), long_reply.results.len()), (1, 1));
    assert_eq!(executions().await - before, 2, "the longer call ran on its own");
    // The other way round, the shorter call rides along: one run.
    let before = executions().await;
    meet(other.client.clone(), long, light.client.clone(), short.to_owned()).await;
    assert_eq!(executions().await - before, 1, "the shorter call joined the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_calls_say_where_their_time_went_in_server_timing() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let call = |path: &str| {
        let body = if path.starts_with("/v2/") {
            json!({ "inputs": token_inputs() })
        } else {
            json!({ "inputs": ["Shares rose after the results"] })
        };
        app.http()
            .post(app.url(path))
            .bearer_auth(&tenant.key.secret)
            .json(&body)
            .send()
    };
    let stages = |response: &reqwest::Response| -> Vec<(String, f64)> {
        let header = response
            .headers()
            .get("server-timing")
            .map(|value| value.to_str().unwrap().to_owned());
        header
            .unwrap_or_default()
            .split(", ")
            .filter(|stage| !stage.is_empty())
            .map(|stage| {
                let (name, duration) = stage.split_once(";dur=").unwrap_or_else(|| panic!("{stage}"));
                (
                    name.to_owned(),
                    duration.parse().unwrap_or_else(|_| panic!("{stage}")),
                )
            })
            .collect()
    };
    for path in [
        "/v1/models/sentiment/classify",
        "/v1/models/minilm-embed/embed",
        "/v2/models/sentiment/infer",
    ] {
        let response = call(path).await.unwrap();
        assert_eq!(response.status(), 200);
        let timed = stages(&response);
        let names: Vec<&str> = timed.iter().map(|(name, _)| name.as_str()).collect();
        for stage in [
            "admit", "queue", "thread", "run", "wake", "model", "ledger", "total",
        ] {
            assert!(names.contains(&stage), "{path}: {names:?}");
        }
        let took = |stage: &str| timed.iter().find(|(name, _)| name == stage).unwrap().1;
        // The model's stages are parts of its call, and the call a part of the request.
        assert!(
            took("run") > 0.0
                && took("queue") + took("thread") + took("run") + took("wake") <= took("model") + 0.003,
            "{timed:?}"
        );
        assert!(
            took("model") <= took("total") && took("ledger") <= took("total"),
            "{timed:?}"
        );
    }
    // Requests that time nothing say nothing.
    let listed = app
        .http()
        .get(app.url("/v1/models"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    assert!(listed.headers().get("server-timing").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_text_scores_as_the_words_the_model_reads() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let sentence = "Shares plunged after the profit warning, and analysts cut their targets. ";
    let long = sentence.repeat(500)[..32 * 1024].to_owned();
    let start: String = long.split(' ').take(200).collect::<Vec<_>>().join(" ");
    let scores = |text: String| {
        let client = tenant.client.clone();
        async move {
            client
                .classify("sentiment", &[text.as_str()])
                .await
                .unwrap()
                .results[0]
                .clone()
        }
    };
    let (whole, first_words) = (scores(long).await, scores(start).await);
    assert_eq!(whole.label, first_words.label);
    assert_scores_within(&whole, &first_words, 1e-6, "for 32 KiB, then its first 200 words");
}

/// Every label's score in `a` within `tolerance` of the same label's in `b`.
fn assert_scores_within(a: &Classification, b: &Classification, tolerance: f32, what: &str) {
    for (a, b) in a.scores.iter().zip(&b.scores) {
        assert!(
            (a.score - b.score).abs() < tolerance,
            "{what}: {} and {}",
            a.score,
            b.score
        );
    }
}

/// The Python interpreter with `tritonclient[http]` and `schemathesis` (made by `scripts/test.sh`).
pub(crate) fn client_python() -> std::path::PathBuf {
    if let Some(python) = std::env::var_os("PLINTH_TEST_PYTHON") {
        return python.into();
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(".cache/plinth/venv-clients/bin/python");
    assert!(
        venv.is_file(),
        "no Python with tritonclient: run `make test` (scripts/test.sh makes {})",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_triton_client_works_unchanged() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/triton_infer.py");
    let output = tokio::process::Command::new(client_python())
        .arg(script)
        .arg(app.addr.to_string())
        .arg(&tenant.key.secret)
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "tritonclient failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected = json!(["positive", "negative"]);
    assert_eq!(reply, json!({ "json": expected, "binary": expected }));
    // Its inferences were metered like any other: two calls of two items.
    let usage = tenant.client.usage(&UsageQuery::default()).await.unwrap();
    assert_eq!((usage.total.calls, usage.total.units), (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_carry_a_string_message_for_protocol_clients() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let response = app
        .http()
        .post(app.url("/v2/models/sentiment/infer"))
        .bearer_auth(&tenant.key.secret)
        .json(&json!({ "inputs": [{ "name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1] }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("input_ids"), "{body}");
    assert_eq!(body["code"], "invalid_input");
    assert!(body["request_id"].as_str().unwrap().starts_with("req_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_answer_429_per_tenant_and_503_overall_with_retry_after_and_recover() {
    let app = TestApp::spawn_with(|config| {
        config.inference_queue = 2;
        config.inference_tenant_queue = 1;
        config.max_batch = 1;
    })
    .await;
    let mut tenants = Vec::new();
    for _ in 0..4 {
        let tenant = app.tenant().await;
        app.set_plan(&tenant.session.tenant.id, "enterprise").await;
        tenants.push(tenant);
    }
    let http = app.http();
    let texts = vec!["the market rallied on strong earnings ".repeat(12); 8];
    let calls = tenants.iter().flat_map(|tenant| {
        (0..6).map(|_| {
            http.post(app.url("/v1/models/sentiment/classify"))
                .bearer_auth(&tenant.key.secret)
                .json(&json!({ "inputs": texts }))
                .send()
        })
    });
    let responses: Vec<_> = join_all(calls).await.into_iter().map(Result::unwrap).collect();
    let count = |status: u16| responses.iter().filter(|r| r.status() == status).count();
    // Each tenant may have one call waiting; the queue holds two in all.
    assert!(count(429) > 0, "a tenant's second waiting call is refused");
    assert!(
        count(503) > 0,
        "the shared queue of two overflows under four tenants"
    );
    assert_eq!(count(200) + count(429) + count(503), responses.len());
    assert!(
        responses
            .iter()
            .filter(|r| r.status() != 200)
            .all(|r| r.headers().get("retry-after").is_some())
    );
    // Refused calls were not billed; the model serves again once the queue drains.
    let mut billed = 0;
    for tenant in &tenants {
        billed += tenant
            .client
            .usage(&UsageQuery::default())
            .await
            .unwrap()
            .total
            .calls;
    }
    assert_eq!(billed, i64::try_from(count(200)).unwrap());
    tenants[0]
        .client
        .classify("sentiment", &["fine again"])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_time_out_are_not_billed() {
    // The usage event is written while the model runs; a call that then fails must not keep it.
    let app = TestApp::spawn_with(|config| config.inference_timeout_ms = 1).await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let texts = vec!["the market rallied on strong earnings ".repeat(12); 32];
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let err = tenant.client.classify("sentiment", &texts).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InferenceTimeout));
    let usage = tenant.client.usage(&UsageQuery::default()).await.unwrap();
    assert_eq!(usage.total.calls, 0, "{usage:?}");
}
