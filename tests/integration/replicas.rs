//! Replicas that agree: two servers with data directories of their own, on one database (and in
//! production mode one Redis) and one object store. What one replica accepts, the other serves.

use futures_util::future::join_all;
use plinth_sdk::UpdateInstallationRequest;
use plinth_tests::{Backend, ObjectStorage, TestApp, built_plugin, until_status};
use serde_json::json;
use std::time::{Duration, Instant};

use crate::models::upload_sentiment_copy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_their_own_data_directories_serve_what_the_other_accepted() {
    let storage = ObjectStorage::start().await;
    let (shared, b_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestApp::spawn_with(|config| {
        storage.configure(config);
        config.catalog_sync_ms = 250;
        if config.database_url.is_none() {
            // SQLite: one database file both replicas open, outside either data directory, and one
            // sealing key (production mode requires it; a key generated per data directory would not
            // open on the other replica).
            config.database_url = Some(format!("sqlite:{}/plinth.db?mode=rwc", shared.path().display()));
            config.secret_key = Some(plinth_tests::sealing_key());
        }
    })
    .await;
    let b = a
        .replica_with(|config| config.data_dir = b_data.path().to_path_buf())
        .await;
    let (author, tenant) = (a.tenant().await, a.tenant().await);
    // Room for the polling below; its limit is still reached in the end.
    a.set_plan(&tenant.session.tenant.id, "pro").await;

    // A model uploaded through A: B fetches its files from the object store and serves it.
    let classify = |app: &TestApp| {
        app.http()
            .post(app.url("/v1/models/fleet-tone/classify"))
            .bearer_auth(&tenant.key.secret)
            .json(&json!({ "inputs": ["replicas agree"] }))
            .send()
    };
    assert_eq!(upload_sentiment_copy(&a, &tenant, "fleet-tone").await, 201);
    let appeared = until_status(|| classify(&b), 200).await;
    // B's copies of model files (named by hash; the directory holds bookkeeping entries too).
    let b_model_files = || -> Vec<String> {
        std::fs::read_dir(b_data.path().join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".onnx") || name.ends_with(".json"))
            .collect()
    };
    assert_eq!(
        b_model_files().len(),
        2,
        "B keeps its own copy of the model and its tokenizer"
    );

    // A plugin published and approved through A, installed with a secret through A: B runs it and the
    // plugin reads the secret there.
    let (manifest, component) = built_plugin("hostile");
    let installation = a
        .install_manifest(&author, &tenant, manifest, component, json!({}))
        .await;
    tenant
        .owner
        .update_installation(
            &installation.id,
            &UpdateInstallationRequest {
                secrets: Some([("token".to_owned(), "shared-s3cret".to_owned())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let on_b = b.client().with_token(&tenant.key.secret);
    let answer = on_b
        .invoke(&installation.id, &json!({ "do": "secret", "key": "token" }))
        .await
        .unwrap();
    assert_eq!(answer["secret"], "shared-s3cret");

    // One Idempotency-Key across both replicas: run once, billed once, replayed by the other.
    let keyed = |app: &TestApp| {
        app.http()
            .post(app.url("/v1/models/sentiment/classify"))
            .bearer_auth(&tenant.key.secret)
            .header("Idempotency-Key", "fleet-once")
            .json(&json!({ "inputs": ["billed once"] }))
            .send()
    };
    let before = a
        .store()
        .usage_event_count(&tenant.session.tenant.id)
        .await
        .unwrap();
    assert_eq!(keyed(&a).await.unwrap().status(), 200);
    // A's answer is stored just after it is sent; until then B says the request is in flight and
    // when to come back, as a client retrying at once would be told.
    let mut replayed = keyed(&b).await.unwrap();
    for _ in 0..200 {
        if replayed.status() != 409 {
            break;
        }
        assert!(replayed.headers().contains_key("retry-after"));
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        replayed = keyed(&b).await.unwrap();
    }
    assert_eq!(replayed.status(), 200);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    let after = a
        .store()
        .usage_event_count(&tenant.session.tenant.id)
        .await
        .unwrap();
    assert_eq!(after - before, 1, "one charge for the key");

    // Rate limits are one budget across replicas where the cache is shared (Redis). A key allowed 20
    // calls in a row (120 a minute, 2 a second after that) sends 30 at once, 15 to each replica:
    // each replica alone would let its 15 through; counted together, some are refused. (Unless the
    // 30 took over 5 s to arrive, which even a busy machine does not.)
    if a.backend == Backend::PostgresRedis {
        let fleet_key = tenant
            .owner
            .create_api_key(&plinth_sdk::CreateApiKeyRequest {
                name: "fleet".into(),
                scopes: None,
                rate_limit_per_minute: Some(120),
                expires_at: None,
            })
            .await
            .unwrap();
        let echo = |app: &TestApp| {
            app.http()
                .post(app.url("/v1/echo"))
                .bearer_auth(&fleet_key.secret)
                .json(&json!({}))
                .send()
        };
        let statuses: Vec<u16> = join_all((0..30).map(|i| echo(if i % 2 == 0 { &a } else { &b })))
            .await
            .into_iter()
            .map(|answer| answer.unwrap().status().as_u16())
            .collect();
        assert!(
            statuses.contains(&429) && statuses.iter().all(|status| [200, 429].contains(status)),
            "the key's limit is reached across both replicas together: {statuses:?}"
        );
    }

    // Deleted through A: it stops on B, and B's copy of its files goes.
    let deleted = a
        .http()
        .delete(a.url("/v1/models/fleet-tone"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = until_status(|| classify(&b), 404).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b_model_files().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = b_model_files();
    assert!(
        left.is_empty(),
        "B removed its copy of the deleted model's files: {left:?}"
    );
    println!(
        "two replicas, separate data directories: B served an upload through A after {:.0} ms, stopped a delete after {:.0} ms",
        appeared.as_secs_f64() * 1e3,
        gone.as_secs_f64() * 1e3
    );
}
