//! Tenants' own models: upload validation, versions, privacy, deletion, and survival across restarts.

use plinth_sdk::{ErrorCode, Task};
use plinth_tests::{TestApp, TestTenant};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn built_in(file: &str) -> Vec<u8> {
    let path = plinth_server::config::cache_dir().join("models").join(file);
    std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{}: {err} (run scripts/fetch-models.sh)", path.display()))
}

pub(crate) fn form(model: Vec<u8>, manifest: &Value, tokenizer: bool) -> Form {
    let mut form = Form::new()
        .part(
            "manifest",
            Part::text(manifest.to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part("model", Part::bytes(model).file_name("model.onnx"));
    if tokenizer {
        form = form.part(
            "tokenizer",
            Part::bytes(built_in("tokenizer.json")).file_name("tokenizer.json"),
        );
    }
    form
}

pub(crate) async fn upload(app: &TestApp, tenant: &TestTenant, form: Form) -> (u16, Value) {
    let response = app
        .http()
        .post(app.url("/v1/models"))
        .bearer_auth(&tenant.key.secret)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn sentiment_manifest(name: &str) -> Value {
    json!({ "name": name, "task": "text-classification", "labels": ["bad", "meh", "good"] })
}

/// Uploads the built-in sentiment model as the tenant's `name`: the status.
pub(crate) async fn upload_sentiment_copy(app: &TestApp, tenant: &TestTenant, name: &str) -> u16 {
    upload(
        app,
        tenant,
        form(built_in("sentiment.onnx"), &sentiment_manifest(name), true),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_serves_its_own_fine_tuned_model_privately() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let rival = app.tenant().await;

    let (status, model) = upload(
        &app,
        &acme,
        form(built_in("sentiment.onnx"), &sentiment_manifest("acme-tone"), true),
    )
    .await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["version"], 1);
    assert_eq!(model["platform"], false);
    let reply = acme
        .client
        .classify("acme-tone", &["I love this product"])
        .await
        .unwrap();
    assert_eq!(reply.results[0].label, "good");
    assert!(
        acme.client
            .models()
            .await
            .unwrap()
            .iter()
            .any(|m| m.name == "acme-tone" && m.task == Task::TextClassification)
    );

    // Invisible to another tenant, whatever the route.
    assert_eq!(
        rival
            .client
            .classify("acme-tone", &["hi"])
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        rival.client.model_metadata("acme-tone").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    assert!(
        rival
            .client
            .models()
            .await
            .unwrap()
            .iter()
            .all(|m| m.name != "acme-tone")
    );
    let (status, _) = (
        app.http()
            .delete(app.url("/v1/models/acme-tone"))
            .bearer_auth(&rival.key.secret)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        (),
    );
    assert_eq!(status, 404);

    // A second upload is version 2; a replica (or a restart) serves the newest version from the registry.
    let (status, model) = upload(
        &app,
        &acme,
        form(built_in("sentiment.onnx"), &sentiment_manifest("acme-tone"), true),
    )
    .await;
    assert_eq!((status, model["version"].clone()), (201, json!(2)));
    let replica = app.replica().await;
    let on_replica = replica.client().with_token(&acme.key.secret);
    assert_eq!(on_replica.model("acme-tone").await.unwrap().version, 2);

    // Deleted: gone at once.
    let deleted = app
        .http()
        .delete(app.url("/v1/models/acme-tone"))
        .bearer_auth(&acme.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        acme.client.model("acme-tone").await.unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_uploads_are_refused_with_a_reason() {
    let app = TestApp::spawn_with(|config| config.max_model_bytes = 30 * 1024 * 1024).await;
    let tenant = app.tenant().await;

    let garbage = form(
        b"this is not an onnx file".to_vec(),
        &sentiment_manifest("junk"),
        true,
    );
    let (status, body) = upload(&app, &tenant, garbage).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_model")),
        "{body}"
    );

    // An embedding model declared as a three-label classifier does not fit its task.
    let wrong_task = form(
        built_in("minilm-embed.onnx"),
        &sentiment_manifest("not-a-classifier"),
        true,
    );
    let (status, body) = upload(&app, &tenant, wrong_task).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_model")),
        "{body}"
    );

    let huge = form(vec![0u8; 31 * 1024 * 1024], &sentiment_manifest("huge"), true);
    let (status, body) = upload(&app, &tenant, huge).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );

    for (manifest, tokenizer) in [
        (
            json!({ "name": "sentiment", "task": "text-classification", "labels": ["a", "b"] }),
            true,
        ),
        (json!({ "name": "Bad Name!", "task": "embedding" }), true),
        (
            json!({ "name": "one-label", "task": "text-classification", "labels": ["only"] }),
            true,
        ),
        (json!({ "name": "no-tokenizer", "task": "embedding" }), false),
        (json!({ "name": "x", "task": "translation" }), true),
        // Every text's answer scores every label.
        (
            json!({ "name": "many-labels", "task": "text-classification",
                    "labels": (0..1_001).map(|i| i.to_string()).collect::<Vec<_>>() }),
            true,
        ),
    ] {
        let (status, body) = upload(
            &app,
            &tenant,
            form(built_in("minilm-embed.onnx"), &manifest, tokenizer),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("validation_failed")),
            "{manifest}: {body}"
        );
    }
    // Nothing was registered.
    assert!(tenant.client.models().await.unwrap().iter().all(|m| m.platform));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_stay_callable_by_number_until_deleted() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let manifest =
        |labels: [&str; 3]| json!({ "name": "tone", "task": "text-classification", "labels": labels });
    for labels in [["bad", "meh", "good"], ["neg", "neu", "pos"]] {
        let (status, model) = upload(
            &app,
            &acme,
            form(built_in("sentiment.onnx"), &manifest(labels), true),
        )
        .await;
        assert_eq!(status, 201, "{model}");
    }
    // The newest version answers unpinned calls.
    let reply = acme
        .client
        .classify("tone", &["I love this product"])
        .await
        .unwrap();
    assert_eq!(reply.results[0].label, "pos");

    let get = |path: String| {
        let request = app.http().get(app.url(&path)).bearer_auth(&acme.key.secret);
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, metadata) = get("/v2/models/tone".into()).await;
    assert_eq!((status, metadata["versions"].clone()), (200, json!(["1", "2"])));
    // Version 1 is loaded on first use and runs as version 1.
    let (status, ready) = get("/v2/models/tone/versions/1/ready".into()).await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
    let tokens = json!({ "inputs": [
        { "name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 2293, 2023, 102] },
        { "name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1] },
        { "name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0] },
    ]});
    for version in ["1", "2"] {
        let response = app
            .http()
            .post(app.url(&format!("/v2/models/tone/versions/{version}/infer")))
            .bearer_auth(&acme.key.secret)
            .json(&tokens)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["model_version"], version, "{body}");
    }
    for missing in ["3", "0", "one"] {
        let (status, body) = get(format!("/v2/models/tone/versions/{missing}")).await;
        assert_eq!(status, 404, "{body}");
        assert!(body["error"].as_str().unwrap().contains("no version"), "{body}");
    }

    // Deleting the model retires every version, pinned ones included.
    let deleted = app
        .http()
        .delete(app.url("/v1/models/tone"))
        .bearer_auth(&acme.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let (status, _) = get("/v2/models/tone/versions/1/ready".into()).await;
    assert_eq!(status, 404);
}

/// Calling many older versions at once cannot keep the loads every tenant shares busy: a tenant's
/// loads wait behind each other (calls for the same version share one), so another tenant's load
/// waits for at most one of them: the one in progress when it asked. It does though it has loaded
/// more than the caller of many versions lately, which would otherwise rank that caller's loads first
/// in the turn every tenant shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_asking_for_many_versions_waits_behind_itself_not_others() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let other = app.tenant().await;
    // Each upload loads its model twice: the other tenant, uploading five versions after acme's four,
    // owes more loading time when the calls below come.
    for (tenant, name, versions) in [(&acme, "tone", 4), (&other, "mood", 5)] {
        for labels in [
            ["bad", "meh", "good"],
            ["neg", "neu", "pos"],
            ["-", "0", "+"],
            ["low", "mid", "high"],
            ["no", "maybe", "yes"],
        ]
        .into_iter()
        .take(versions)
        {
            let manifest = json!({ "name": name, "task": "text-classification", "labels": labels });
            let (status, model) =
                upload(&app, tenant, form(built_in("sentiment.onnx"), &manifest, true)).await;
            assert_eq!(status, 201, "{model}");
        }
    }
    let started = std::time::Instant::now();
    let tokens = json!({ "inputs": [
        { "name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 2293, 2023, 102] },
        { "name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1] },
        { "name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0] },
    ]});
    // A call to a version by number loads it (asking for its metadata does not).
    let get = |tenant: &TestTenant, name: &str, version: u32| {
        let request = app
            .http()
            .post(app.url(&format!("/v2/models/{name}/versions/{version}/infer")))
            .bearer_auth(&tenant.key.secret)
            .json(&tokens);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, started.elapsed())
        }
    };
    // Acme calls its versions 1, 2 and 3 (none loaded), twice each; a moment later the other tenant
    // calls its version 1. (Three loads, so that a busy machine answering the other's call slowly
    // still has it ask during acme's first or second.)
    let acme_calls = futures_util::future::join_all([1, 2, 3, 1, 2, 3].map(|v| get(&acme, "tone", v)));
    let other_call = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        get(&other, "mood", 1).await
    };
    let (acme_answers, (other_status, other_done)) = tokio::join!(acme_calls, other_call);
    assert!(
        acme_answers.iter().all(|(status, _)| *status == 200),
        "{acme_answers:?}"
    );
    assert_eq!(other_status, 200);
    // Acme's last version loaded after the other tenant's, which waited for one load only.
    let acme_last = acme_answers.iter().map(|(_, done)| *done).max().unwrap();
    assert!(
        other_done < acme_last,
        "the other tenant's load finished at {other_done:?}, after all of acme's ({acme_answers:?})"
    );
}

/// Each upload is staged on disk before its quota can be checked: a tenant sends one at a time, and
/// one cut short leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sends_one_upload_at_a_time_and_one_cut_short_leaves_nothing() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let other = app.tenant().await;
    let staging = app.config.data_dir.join("models").join("staging");
    let parts = || {
        std::fs::read_dir(&staging).map_or(0, |dir| {
            dir.flatten()
                .filter(|f| f.path().extension().is_some_and(|e| e == "part"))
                .count()
        })
    };
    // An upload whose model never finishes arriving.
    let (chunks, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    chunks.send(Ok(vec![0; 64 << 10])).await.unwrap();
    let trickle = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    let slow = Form::new()
        .part(
            "manifest",
            Part::text(sentiment_manifest("slow").to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "model",
            Part::stream(reqwest::Body::wrap_stream(trickle)).file_name("model.onnx"),
        );
    let sending = tokio::spawn(
        app.http()
            .post(app.url("/v1/models"))
            .bearer_auth(&acme.key.secret)
            .multipart(slow)
            .send(),
    );
    let started = std::time::Instant::now();
    while parts() == 0 {
        assert!(
            started.elapsed().as_secs() < 10,
            "the upload never reached staging"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let (status, body) = upload(
        &app,
        &acme,
        form(built_in("sentiment.onnx"), &sentiment_manifest("tone"), true),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("tenant_queue_full")),
        "{body}"
    );
    // Another tenant is not held up.
    assert_eq!(upload_sentiment_copy(&app, &other, "tone").await, 201);

    // The slow client hangs up: its part goes, and the tenant may upload again.
    sending.abort();
    drop(chunks);
    let hung_up = std::time::Instant::now();
    while parts() > 0 {
        assert!(hung_up.elapsed().as_secs() < 10, "a staged part was left behind");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut status = 0;
    for _ in 0..50 {
        status = upload_sentiment_copy(&app, &acme, "tone").await;
        if status != 429 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 201);
}

/// Replicas share one registry: a model uploaded through one serves on the other within seconds,
/// without a restart, and a delete through one stops it on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_uploaded_or_deleted_through_one_replica_serves_or_stops_on_the_other() {
    let a = TestApp::spawn_with(|config| config.catalog_sync_ms = 250).await;
    let b = a.replica().await;
    let tenant = a.tenant().await;
    let classify = |app: &TestApp| {
        app.http()
            .post(app.url("/v1/models/shared-tone/classify"))
            .bearer_auth(&tenant.key.secret)
            .json(&json!({ "inputs": ["replicas agree"] }))
            .send()
    };
    assert_eq!(classify(&b).await.unwrap().status(), 404);
    assert_eq!(upload_sentiment_copy(&a, &tenant, "shared-tone").await, 201);
    let appeared = plinth_tests::until_status(|| classify(&b), 200).await;

    // A second version through A serves on B.
    let version_on_b = || async {
        b.http()
            .get(b.url("/v1/models/shared-tone"))
            .bearer_auth(&tenant.key.secret)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["version"]
            .clone()
    };
    assert_eq!(upload_sentiment_copy(&a, &tenant, "shared-tone").await, 201);
    let started = std::time::Instant::now();
    while version_on_b().await != json!(2) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "B never served version 2"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // Version 1, pinned on B by a client asking for it by number, deleted through A: B stops it too.
    let pinned_on_b = || {
        b.http()
            .get(b.url("/v2/models/shared-tone/versions/1"))
            .bearer_auth(&tenant.key.secret)
            .send()
    };
    assert_eq!(pinned_on_b().await.unwrap().status(), 200);
    let dropped = a
        .http()
        .delete(a.url("/v1/models/shared-tone/versions/1"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(dropped.status(), 204);
    plinth_tests::until_status(pinned_on_b, 404).await;

    let deleted = a
        .http()
        .delete(a.url("/v1/models/shared-tone"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = plinth_tests::until_status(|| classify(&b), 404).await;
    println!(
        "replica B: serving {:.0} ms after the upload through A, stopped {:.0} ms after the delete",
        appeared.as_secs_f64() * 1e3,
        gone.as_secs_f64() * 1e3
    );
}

/// On Postgres each registry change is announced (`NOTIFY`), so another replica follows it at once
/// rather than at its next periodic comparison; replicas on SQLite follow by the comparison alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_model_change_is_announced_and_followed_without_waiting_for_the_poll() {
    // The periodic comparison a minute apart: only an announcement can be this quick.
    let a = TestApp::spawn_with(|config| config.catalog_sync_ms = 60_000).await;
    let b = a.replica().await;
    let tenant = a.tenant().await;
    let classify = || {
        b.http()
            .post(b.url("/v1/models/announced-tone/classify"))
            .bearer_auth(&tenant.key.secret)
            .json(&json!({ "inputs": ["heard it"] }))
            .send()
    };
    assert_eq!(upload_sentiment_copy(&a, &tenant, "announced-tone").await, 201);
    let started = std::time::Instant::now();
    let mut followed = None;
    while started.elapsed() < std::time::Duration::from_secs(5) {
        if classify().await.unwrap().status() == 200 {
            followed = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    match a.backend {
        plinth_tests::Backend::PostgresRedis => {
            let followed = followed.expect("B served the model within 5 s of the announcement");
            println!(
                "announced: B served the upload {:.0} ms after A accepted it",
                followed.as_secs_f64() * 1e3
            );
        }
        plinth_tests::Backend::SqliteMemory => {
            assert_eq!(followed, None, "on SQLite, B waits for its periodic comparison");
        }
    }
}
