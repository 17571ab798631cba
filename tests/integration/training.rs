//! Fine-tuning as a tenant uses it: a dataset of support messages in, a job trained and evaluated in
//! the background, the model deployed and called through `classify` and `/v2`, exported, billed; and
//! as an attacker tries it: bad datasets, quotas, another tenant's ids, cancellation, deletion, a
//! replica that dies mid-job.

use std::time::Duration;

use plinth_sdk::{ErrorCode, Micros, Plan, PlanIsolation};
use plinth_tests::{TestApp, TestTenant};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

/// The hand-written support set shipped with the built-in model (`text,sentiment`), as a dataset.
fn support_csv() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../platform/inference/builtin/data/support.csv"
    );
    let csv = std::fs::read_to_string(path).unwrap();
    let (header, rows) = csv.split_once('\n').unwrap();
    assert_eq!(header.trim(), "text,sentiment");
    format!("text,label\n{rows}")
}

/// A plan that charges for training, with room to spare unless `isolation` says otherwise.
async fn training_plan(app: &TestApp, tenant: &TestTenant, isolation: PlanIsolation) {
    let plan = Plan {
        id: "trainer".into(),
        name: "Trainer".into(),
        currency: "usd".into(),
        monthly_fee_micros: Micros(0),
        included_calls: 1_000,
        price_per_call_micros: Micros(100),
        hard_cap: false,
        training_price_micros: Micros(2_000),
        rate_limit_per_minute: 60_000,
        burst: 1_000,
        isolation,
    };
    app.store().upsert_plan(&plan).await.unwrap();
    app.set_plan(&tenant.session.tenant.id, "trainer").await;
}

fn roomy() -> PlanIsolation {
    PlanIsolation {
        max_datasets: 10,
        max_dataset_bytes: 64 << 20,
        training_jobs: 2,
        ..PlanIsolation::FREE
    }
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn upload(app: &TestApp, tenant: &TestTenant, file_name: &str, bytes: Vec<u8>) -> (u16, Value) {
    let form = Form::new()
        .part("file", Part::bytes(bytes).file_name(file_name.to_owned()))
        .part("name", Part::text("support tickets"));
    send(
        app.http()
            .post(app.url("/v1/datasets"))
            .bearer_auth(&tenant.key.secret)
            .multipart(form),
    )
    .await
}

async fn post(app: &TestApp, tenant: &TestTenant, path: &str, body: &Value) -> (u16, Value) {
    send(
        app.http()
            .post(app.url(path))
            .bearer_auth(&tenant.key.secret)
            .json(body),
    )
    .await
}

async fn get(app: &TestApp, tenant: &TestTenant, path: &str) -> (u16, Value) {
    send(app.http().get(app.url(path)).bearer_auth(&tenant.key.secret)).await
}

/// Polls a job until `done` says so (or two minutes pass).
async fn wait_for(app: &TestApp, tenant: &TestTenant, job: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (status, current) = get(app, tenant, &format!("/v1/training-jobs/{job}")).await;
        assert_eq!(status, 200, "{current}");
        if done(&current) {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not get there: {current}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn finished(job: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or_default())
}

/// The `probs` of an exported model for one text's tokens, as ONNX's reference implementation
/// computes them (in the virtual environment that assembles the built-in models).
fn reference_probs(app: &TestApp, onnx: &[u8], tokens: &[i64]) -> Vec<f64> {
    let python = app
        .config
        .models_dir
        .parent()
        .expect("the cache directory")
        .join("venv-models/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/fetch-models.sh installs it",
        python.display()
    );
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), onnx).expect("the exported model");
    let script = "import json, sys\n\
        import numpy as np\n\
        from onnx.reference import ReferenceEvaluator\n\
        ids = np.array([json.loads(sys.argv[2])], dtype=np.int64)\n\
        feeds = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'token_type_ids': np.zeros_like(ids)}\n\
        (probs,) = ReferenceEvaluator(sys.argv[1]).run(['probs'], feeds)\n\
        print(json.dumps(probs[0].tolist()))\n";
    let output = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(file.path())
        .arg(serde_json::to_string(tokens).expect("tokens"))
        .output()
        .expect("python");
    assert!(
        output.status.success(),
        "the reference implementation refused the export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("probabilities")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_trains_evaluates_deploys_exports_and_pays_for_a_private_classifier() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let rival = app.tenant().await;
    training_plan(&app, &acme, roomy()).await;

    let (status, dataset) = upload(&app, &acme, "support.csv", support_csv().into_bytes()).await;
    assert_eq!(status, 201, "{dataset}");
    let dataset_id = dataset["id"].as_str().unwrap().to_owned();
    assert_eq!(dataset["name"], "support tickets");
    assert_eq!(dataset["format"], "csv");
    let summary = &dataset["summary"];
    assert_eq!(summary["examples"], 396);
    let counts: Vec<(String, u64)> = summary["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["label"].as_str().unwrap().to_owned(),
                l["examples"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts.len(), 3);
    assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 396);
    // Sealed at rest: the stored examples are ciphertext.
    let stored = app
        .store()
        .dataset_examples(&acme.session.tenant.id, &dataset_id)
        .await
        .unwrap();
    assert!(
        stored.starts_with("k1:") && !stored.contains("refund"),
        "examples are sealed"
    );

    let (status, job) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "support-tone", "hyperparameters": { "seed": 1 } }),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let split = &job["split"];
    let train = split["train"].as_u64().unwrap();
    assert_eq!(
        train + split["validation"].as_u64().unwrap() + split["test"].as_u64().unwrap(),
        396
    );
    assert_eq!(job["hyperparameters"]["epochs"], 100, "defaults are filled in");

    let done = wait_for(&app, &acme, &job_id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["progress"]["embedded"], 396);
    let epochs = done["progress"]["epoch"].as_u64().unwrap();
    assert!(
        (1..100).contains(&epochs),
        "early stopping ended it at epoch {epochs}"
    );
    let evaluation = &done["evaluation"];
    assert_eq!(evaluation["examples"], split["test"]);
    let accuracy = evaluation["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.75, "held-out accuracy {accuracy}");
    assert!(evaluation["macro_f1"].as_f64().unwrap() > 0.7, "{evaluation}");
    assert_eq!(evaluation["labels"].as_array().unwrap().len(), 3);
    let confusion: u64 = evaluation["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(Some(confusion), split["test"].as_u64());
    let (_, events) = get(&app, &acme, &format!("/v1/training-jobs/{job_id}/events")).await;
    let messages: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages[..2], ["queued", "started"]);
    assert!(messages.last().unwrap().starts_with("succeeded"), "{messages:?}");

    // A replica that claimed the deployment and stopped (a crash) holds it only until the claim is
    // old: then another takes it over, and only the claim's holder can mark or release it.
    let tenant_id = &acme.session.tenant.id;
    let ten_minutes = std::time::Duration::from_secs(600);
    let stopped = app
        .store()
        .claim_training_deployment(tenant_id, &job_id, ten_minutes)
        .await
        .unwrap()
        .expect("a succeeded job is claimed");
    let deploy = format!("/v1/training-jobs/{job_id}/deploy");
    let (status, refused) = post(&app, &acme, &deploy, &json!({})).await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("being deployed"),
        "{refused}"
    );
    let store = app.store();
    assert_eq!(
        store
            .claim_training_deployment(tenant_id, &job_id, ten_minutes)
            .await
            .unwrap(),
        None,
        "a fresh claim is not taken over"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let took_over = store
        .claim_training_deployment(tenant_id, &job_id, std::time::Duration::from_millis(1))
        .await
        .unwrap()
        .expect("an old claim is taken over");
    store
        .release_training_deployment(tenant_id, &job_id, stopped)
        .await
        .unwrap();
    store
        .mark_training_job_deployed(tenant_id, &plinth_tests::operator(), &job_id, stopped, 7)
        .await
        .unwrap();
    assert_eq!(
        post(&app, &acme, &deploy, &json!({})).await.0,
        409,
        "released, and marked, by its holder only"
    );
    store
        .release_training_deployment(tenant_id, &job_id, took_over)
        .await
        .unwrap();

    // Deployed: a private model version, served like any model.
    let (status, model) = post(
        &app,
        &acme,
        &format!("/v1/training-jobs/{job_id}/deploy"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(
        (model["name"].as_str(), model["version"].as_u64()),
        (Some("support-tone"), Some(1))
    );
    let labels: Vec<String> = counts.iter().map(|c| c.0.clone()).collect();
    assert_eq!(model["labels"], json!(labels));
    let (status, again) = post(
        &app,
        &acme,
        &format!("/v1/training-jobs/{job_id}/deploy"),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("training_job_state"))
    );
    let reply = acme
        .client
        .classify(
            "support-tone",
            &[
                "I was charged twice and nobody answers my emails, this is unacceptable",
                "love this",
            ],
        )
        .await
        .unwrap();
    assert_eq!(reply.results[0].label, "negative", "{:?}", reply.results[0]);
    // The same model through the inference protocol: the probabilities `classify` gave.
    let (status, inferred) = post(
        &app,
        &acme,
        "/v2/models/support-tone/infer",
        &json!({ "inputs": [
            { "name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 2293, 2023, 102] },
            { "name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1] },
            { "name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0] }
        ], "outputs": [{ "name": "probs" }] }),
    )
    .await;
    assert_eq!(status, 200, "{inferred}");
    let probs: Vec<f64> = inferred["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (p, scored) in probs.iter().zip(&reply.results[1].scores) {
        assert!(
            (p - f64::from(scored.score)).abs() < 1e-4,
            "{probs:?} vs {:?}",
            reply.results[1].scores
        );
    }

    // Exported: one ONNX file that loads anywhere, here as an upload of its own.
    let exported = app
        .http()
        .get(app.url(&format!("/v1/training-jobs/{job_id}/model.onnx")))
        .bearer_auth(&acme.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(exported.status(), 200);
    let onnx = exported.bytes().await.unwrap().to_vec();
    // Standard operators only: ONNX's reference implementation (numpy) runs the file and gives the
    // probabilities Plinth served for the same tokens (a second or so, off the server's threads).
    let referenced = tokio::task::block_in_place(|| reference_probs(&app, &onnx, &[101, 2293, 2023, 102]));
    assert_eq!(referenced.len(), probs.len());
    for (p, r) in probs.iter().zip(&referenced) {
        assert!((p - r).abs() < 1e-4, "{probs:?} vs {referenced:?}");
    }
    let tokenizer = std::fs::read(app.config.models_dir.join("tokenizer.json")).unwrap();
    let form = Form::new()
        .part(
            "manifest",
            Part::text(
                json!({ "name": "support-copy", "task": "text-classification", "labels": labels })
                    .to_string(),
            ),
        )
        .part("model", Part::bytes(onnx).file_name("support-tone.onnx"))
        .part("tokenizer", Part::bytes(tokenizer).file_name("tokenizer.json"));
    let (status, copy) = send(
        app.http()
            .post(app.url("/v1/models"))
            .bearer_auth(&acme.key.secret)
            .multipart(form),
    )
    .await;
    assert_eq!(status, 201, "{copy}");
    let copied = acme
        .client
        .classify("support-copy", &["love this"])
        .await
        .unwrap();
    assert_eq!(copied.results[0].label, reply.results[1].label);

    // Private: every id of acme's is another tenant's 404.
    for path in [
        format!("/v1/datasets/{dataset_id}"),
        format!("/v1/training-jobs/{job_id}"),
        format!("/v1/training-jobs/{job_id}/events"),
        format!("/v1/training-jobs/{job_id}/model.onnx"),
    ] {
        let (status, body) = get(&app, &rival, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, _) = post(
        &app,
        &rival,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "stolen" }),
    )
    .await;
    assert_eq!(status, 404, "another tenant's dataset");
    for action in ["deploy", "cancel"] {
        let (status, _) = post(
            &app,
            &rival,
            &format!("/v1/training-jobs/{job_id}/{action}"),
            &json!({}),
        )
        .await;
        assert_eq!(status, 404, "{action}");
    }
    let stolen = rival
        .client
        .classify("support-tone", &["hello"])
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Some(ErrorCode::NotFound));
    let (_, rivals) = get(&app, &rival, "/v1/datasets").await;
    assert_eq!(rivals, json!([]));

    // Billed: training at the plan's price per 1,000 examples × epochs (embedding every text counts
    // as one), beside the calls.
    let statement = acme.owner.upcoming_invoice().await.unwrap();
    let units = (train * epochs + 396).div_ceil(1_000);
    let training = statement
        .items
        .iter()
        .find(|i| i.kind == "training")
        .expect("a training line");
    assert_eq!(
        (training.name.as_str(), training.units),
        ("support-tone", i64::try_from(units).unwrap())
    );
    assert_eq!(
        statement.training_micros,
        Micros(2_000 * i64::try_from(units).unwrap())
    );
    assert_eq!(done["billed_units"], units);
    assert!(
        statement
            .items
            .iter()
            .any(|i| i.kind == "model" && i.name == "support-tone")
    );

    // Deleted: the examples are gone from storage; the trained model stays.
    let deleted = app
        .http()
        .delete(app.url(&format!("/v1/datasets/{dataset_id}")))
        .bearer_auth(&acme.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = app
        .store()
        .dataset_examples(&acme.session.tenant.id, &dataset_id)
        .await;
    assert!(
        matches!(gone, Err(plinth_store::StoreError::NotFound(_))),
        "{gone:?}"
    );
    assert_eq!(
        get(&app, &acme, &format!("/v1/datasets/{dataset_id}")).await.0,
        404
    );
    let (_, after) = get(&app, &acme, &format!("/v1/training-jobs/{job_id}")).await;
    assert_eq!(after["dataset"], Value::Null);
    assert_eq!(
        acme.client
            .classify("support-tone", &["thanks, that fixed it"])
            .await
            .unwrap()
            .results
            .len(),
        1
    );

    let (_, audit) = send(
        app.http()
            .get(app.url("/v1/audit-log?limit=50"))
            .bearer_auth(&acme.session.token),
    )
    .await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "dataset.upload",
        "training_job.create",
        "training_job.deploy",
        "dataset.delete",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datasets_and_quotas_are_refused_with_clear_codes() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    training_plan(
        &app,
        &acme,
        PlanIsolation {
            max_datasets: 1,
            max_dataset_bytes: 64 << 10,
            training_jobs: 1,
            ..PlanIsolation::FREE
        },
    )
    .await;

    let lines = |label: &str, n: usize| -> String {
        (0..n)
            .map(|i| format!("{{\"text\": \"message {i}\", \"label\": \"{label}\"}}\n"))
            .collect()
    };
    let refused = |status: u16, body: &Value, code: &str, says: &str| {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some(code)),
            "{body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    };
    let (status, body) = upload(&app, &acme, "one.jsonl", lines("billing", 30).into_bytes()).await;
    refused(status, &body, "invalid_dataset", "at least two labels");
    let empty_text = format!(
        "{}{}{{\"text\": \" \", \"label\": \"bug\"}}\n",
        lines("billing", 12),
        lines("bug", 12)
    );
    let (status, body) = upload(&app, &acme, "gap.jsonl", empty_text.into_bytes()).await;
    refused(status, &body, "invalid_dataset", "line 25: the text is empty");
    let (status, body) = upload(
        &app,
        &acme,
        "sparse.jsonl",
        format!("{}{}", lines("a", 20), lines("b", 2)).into_bytes(),
    )
    .await;
    refused(status, &body, "invalid_dataset", "`b` (2)");
    let (status, body) = upload(&app, &acme, "latin1.csv", b"text,label\ncaf\xe9,a\n".to_vec()).await;
    refused(status, &body, "invalid_dataset", "not UTF-8");
    let (status, body) = upload(&app, &acme, "notes.txt", lines("a", 20).into_bytes()).await;
    refused(status, &body, "invalid_dataset", "JSON Lines");
    let (status, body) = upload(&app, &acme, "huge.jsonl", vec![b' '; 65 << 10]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );

    let good = format!("{}{}", lines("billing", 15), lines("bug", 15));
    let (status, dataset) = upload(&app, &acme, "good.jsonl", good.clone().into_bytes()).await;
    assert_eq!(status, 201, "{dataset}");
    let (status, body) = upload(&app, &acme, "second.jsonl", good.into_bytes()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("dataset_quota_exceeded")),
        "{body}"
    );

    let dataset_id = dataset["id"].as_str().unwrap();
    for (body, says) in [
        (json!({ "dataset": dataset_id, "model": "Bad Name" }), "model"),
        (
            json!({ "dataset": dataset_id, "model": "sentiment" }),
            "platform model",
        ),
        (
            json!({ "dataset": dataset_id, "model": "ok", "base_model": "gpt-9" }),
            "base_model",
        ),
        (
            json!({ "dataset": dataset_id, "model": "ok", "hyperparameters": { "epochs": 0 } }),
            "epochs",
        ),
        (
            json!({ "dataset": dataset_id, "model": "ok", "hyperparameters": { "learning_rate": 5.0 } }),
            "learning_rate",
        ),
    ] {
        let (status, reply) = post(&app, &acme, "/v1/training-jobs", &body).await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (422, Some("validation_failed")),
            "{body}: {reply}"
        );
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(says),
            "{reply}"
        );
    }
    let (status, reply) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "ok", "hyperparameters": { "epochs": 3, "surprise": 1 } }),
    )
    .await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(
        post(
            &app,
            &acme,
            "/v1/training-jobs",
            &json!({ "dataset": "ds_nope", "model": "ok" })
        )
        .await
        .0,
        404
    );

    // One job at a time on this plan: a second is refused until the first ends.
    let (status, first) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "tickets" }),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (status, body) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "tickets" }),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("training_jobs_exceeded")),
        "{body}"
    );
    let first = wait_for(&app, &acme, first["id"].as_str().unwrap(), finished).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    let (status, again) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset_id, "model": "tickets" }),
    )
    .await;
    assert_eq!(status, 201, "{again}");
    wait_for(&app, &acme, again["id"].as_str().unwrap(), finished).await;
    // A finished job cannot be cancelled; it can be deleted, events and all.
    let (status, body) = post(
        &app,
        &acme,
        &format!("/v1/training-jobs/{}/cancel", first["id"].as_str().unwrap()),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("training_job_state")),
        "{body}"
    );
    let deleted = app
        .http()
        .delete(app.url(&format!("/v1/training-jobs/{}", first["id"].as_str().unwrap())))
        .bearer_auth(&acme.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        get(
            &app,
            &acme,
            &format!("/v1/training-jobs/{}/events", first["id"].as_str().unwrap())
        )
        .await
        .0,
        404
    );
}

/// A dataset large enough that embedding it takes a while: the support set, many times over.
fn big_dataset() -> Vec<u8> {
    let csv = support_csv();
    let (header, rows) = csv.split_once('\n').unwrap();
    let mut out = format!("{header}\n");
    for _ in 0..12 {
        out.push_str(rows);
        if !rows.ends_with('\n') {
            out.push('\n');
        }
    }
    out.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_stops_when_cancelled_and_is_billed_for_what_it_did() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    training_plan(&app, &acme, roomy()).await;
    let (status, dataset) = upload(&app, &acme, "big.csv", big_dataset()).await;
    assert_eq!(status, 201, "{dataset}");
    let (_, job) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset["id"], "model": "big" }),
    )
    .await;
    let job_id = job["id"].as_str().unwrap().to_owned();
    let running = wait_for(&app, &acme, &job_id, |j| {
        j["status"] == "running" && j["progress"]["embedded"].as_u64() > Some(0)
    })
    .await;
    assert!(
        running["progress"]["embedded"].as_u64() < running["progress"]["examples"].as_u64(),
        "{running}"
    );
    let (status, cancelling) = post(
        &app,
        &acme,
        &format!("/v1/training-jobs/{job_id}/cancel"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{cancelling}");
    let ended = wait_for(&app, &acme, &job_id, finished).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    // Billed for the texts it embedded before it stopped: at most the whole set, once.
    let billed = ended["billed_units"].as_i64().unwrap();
    assert!((1..=5).contains(&billed), "{ended}");
    assert!(
        ended["progress"]["embedded"].as_u64() < ended["progress"]["examples"].as_u64(),
        "it stopped early: {ended}"
    );
    let (status, body) = post(
        &app,
        &acme,
        &format!("/v1/training-jobs/{job_id}/deploy"),
        &json!({}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("training_job_state")),
        "{body}"
    );
    let statement = acme.owner.upcoming_invoice().await.unwrap();
    let line = statement
        .items
        .iter()
        .find(|i| i.kind == "training")
        .expect("a training line");
    assert_eq!(line.units, billed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_replica_dies_is_resumed_by_another() {
    let app = TestApp::spawn_with(|config| config.training_stale_secs = 2).await;
    let acme = app.tenant().await;
    training_plan(&app, &acme, roomy()).await;
    let (_, dataset) = upload(&app, &acme, "big.csv", big_dataset()).await;
    let (_, job) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset["id"], "model": "resumed" }),
    )
    .await;
    let job_id = job["id"].as_str().unwrap().to_owned();
    wait_for(&app, &acme, &job_id, |j| {
        j["status"] == "running" && j["progress"]["embedded"].as_u64() > Some(0)
    })
    .await;

    // The replica running it goes away mid-job; another, on the same database, picks it up.
    let survivor = app.replica().await;
    app.stop().await;
    let done = wait_for(&survivor, &acme, &job_id, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, events) = get(&survivor, &acme, &format!("/v1/training-jobs/{job_id}/events")).await;
    let messages: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("queued again")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("restarted")),
        "{messages:?}"
    );
    // Billed once, for the whole run.
    let (status, statement) = send(
        survivor
            .http()
            .get(survivor.url("/v1/invoices/upcoming"))
            .bearer_auth(&acme.session.token),
    )
    .await;
    assert_eq!(status, 200, "{statement}");
    let lines: Vec<&Value> = statement["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "training")
        .collect();
    assert_eq!(lines.len(), 1, "{statement}");
    assert_eq!(lines[0]["units"], done["billed_units"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_stripe_mode_training_reaches_its_own_meter_once() {
    use plinth_tests::stripe_double::{Price, StripeDouble};
    const TRAINING_PRICE: &str = "price_training";
    const TRAINING_METER: &str = "plinth_training";
    let mut prices = crate::billing::stripe_prices();
    prices.insert(
        TRAINING_PRICE.to_owned(),
        Price::Metered {
            meter: TRAINING_METER.to_owned(),
            free_units: 0,
            unit_decimal: "0.0001".to_owned(),
        },
    );
    let double = StripeDouble::start(prices).await;
    let app = TestApp::spawn_with(|config| {
        double.configure(config, crate::billing::STRIPE_PLANS);
        config.stripe_training_price = Some(TRAINING_PRICE.to_owned());
        config.stripe_training_meter = TRAINING_METER.to_owned();
        config.billing_sync_bucket_secs = 1;
        config.billing_sync_settle_secs = 0;
        config.billing_sync_interval_secs = 3_600;
    })
    .await;
    let plan = Plan {
        training_price_micros: Micros(2_000),
        isolation: roomy(),
        ..crate::billing::metered_plan()
    };
    app.store().upsert_plan(&plan).await.unwrap();
    let acme = app.tenant().await;

    // On the free plan nothing is charged; subscribed through Checkout, the subscription carries
    // the training price.
    let (customer, _) = crate::billing::subscribe(&app, &double, &acme, "metered").await;
    let (status, dataset) = upload(&app, &acme, "support.csv", support_csv().into_bytes()).await;
    assert_eq!(status, 201, "{dataset}");
    let (status, job) = post(
        &app,
        &acme,
        "/v1/training-jobs",
        &json!({ "dataset": dataset["id"], "model": "billed" }),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let done = wait_for(&app, &acme, job["id"].as_str().unwrap(), finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let billed = done["billed_micros"].as_i64().unwrap();
    assert_eq!(billed, 2_000 * done["billed_units"].as_i64().unwrap());

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let admin = app.platform_admin().await;
    let report = admin.sync_usage().await.unwrap();
    assert_eq!(report.events_pending, 0, "{report:?}");
    assert_eq!(double.meter_total(TRAINING_METER, &customer), billed);
    admin.sync_usage().await.unwrap();
    assert_eq!(double.meter_total(TRAINING_METER, &customer), billed, "sent once");
    let reconciliation = admin.reconciliation().await.unwrap();
    assert!(reconciliation.balanced, "{reconciliation:?}");
    let row = reconciliation
        .rows
        .iter()
        .find(|r| r.meter == "training")
        .expect("a training row");
    assert_eq!((row.ledger, row.sent, row.pending), (billed, billed, 0));
}
