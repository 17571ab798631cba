//! Sealing keys. A rotation keeps every stored secret readable at each step (the new key added, made
//! the primary, everything resealed by `plinth admin rotate-secret-key`) and ends with the old key
//! unneeded; a replica with only the old key then cannot read what was resealed.

use plinth_sdk::UpdateInstallationRequest;
use plinth_tests::{TestApp, TestTenant, built_plugin, sealing_key};
use serde_json::json;

async fn read_secret(
    app: &TestApp,
    tenant: &TestTenant,
    installation: &plinth_sdk::InstallationId,
) -> reqwest::Response {
    app.http()
        .post(app.url(&format!("/v1/installations/{installation}/invoke")))
        .bearer_auth(&tenant.key.secret)
        .json(&json!({ "do": "secret", "key": "token" }))
        .send()
        .await
        .unwrap()
}

async fn secret_read_by_plugin(
    app: &TestApp,
    tenant: &TestTenant,
    installation: &plinth_sdk::InstallationId,
) -> serde_json::Value {
    let response = read_secret(app, tenant, installation).await;
    assert_eq!(response.status(), 200);
    response.json::<serde_json::Value>().await.unwrap()["secret"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_sealing_key_keeps_secrets_readable_and_retires_the_old_key() {
    let (old, new) = (sealing_key(), sealing_key());
    let app = TestApp::spawn_with(|config| config.secret_key = Some(old.clone())).await;
    let (author, tenant) = (app.tenant().await, app.tenant().await);
    let (manifest, component) = built_plugin("hostile");
    let installation = app
        .install_manifest(&author, &tenant, manifest, component, json!({}))
        .await;
    tenant
        .owner
        .update_installation(
            &installation.id,
            &UpdateInstallationRequest {
                secrets: Some([("token".to_owned(), "s3cret".to_owned())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        secret_read_by_plugin(&app, &tenant, &installation.id).await,
        "s3cret"
    );

    // A dataset, sealed under the old key too.
    let examples: String = ["a", "b"]
        .iter()
        .flat_map(|label| {
            (0..10).map(move |i| format!("{{\"text\": \"text {i}\", \"label\": \"{label}\"}}\n"))
        })
        .collect();
    let dataset = tenant
        .owner
        .upload_dataset_bytes("d.jsonl", examples.into_bytes(), None)
        .await
        .unwrap();

    // The new key becomes the primary; the old one only opens what it sealed.
    let rotating = app
        .replica_with(|config| {
            config.secret_key = Some(new.clone());
            config.secret_keys_previous = old.clone();
        })
        .await;
    assert_eq!(
        secret_read_by_plugin(&rotating, &tenant, &installation.id).await,
        "s3cret"
    );

    let output = tokio::process::Command::new(crate::chaos::plinth_binary())
        .args(["admin", "rotate-secret-key"])
        .envs(rotating.command_env())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("2 installations' secrets and datasets resealed"),
        "{stdout}"
    );

    // Only the new key from now on: everything still opens.
    let after = app
        .replica_with(|config| {
            config.secret_key = Some(new.clone());
            config.secret_keys_previous = String::new();
        })
        .await;
    assert_eq!(
        secret_read_by_plugin(&after, &tenant, &installation.id).await,
        "s3cret"
    );
    let sealed = after
        .store()
        .dataset_examples(&tenant.session.tenant.id, &dataset.id)
        .await
        .unwrap();
    let opened = plinth_server::secret_box(&after.config)
        .unwrap()
        .open(&sealed)
        .unwrap();
    assert!(
        String::from_utf8(opened).unwrap().contains("text 9"),
        "the dataset opens under the new key alone"
    );
    // The first server, still on the old key alone, cannot open it, and says so rather than running
    // the plugin without its secret.
    assert_eq!(read_secret(&app, &tenant, &installation.id).await.status(), 500);
    // And a replica started now with a key that opens nothing stored refuses to start.
    let mut wrong = after.config.clone();
    wrong.secret_key = Some(sealing_key());
    wrong.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let Err(refused) = plinth_server::start(&wrong).await else {
        panic!("a replica whose key opens nothing stored started");
    };
    assert!(
        format!("{refused:#}").contains("cannot open the stored secrets"),
        "{refused:#}"
    );
}

/// Secrets are bounded: a sensible name, a value of a few KiB, a few dozen of them. Anything else is
/// refused with what to change, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_beyond_their_bounds_are_refused() {
    let app = TestApp::spawn().await;
    let (author, tenant) = (app.tenant().await, app.tenant().await);
    let installation = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let many: std::collections::BTreeMap<String, String> =
        (0..33).map(|i| (format!("key{i}"), "value".to_owned())).collect();
    for secrets in [
        [("a name with spaces".to_owned(), "value".to_owned())].into(),
        [("x".repeat(65), "value".to_owned())].into(),
        [("token".to_owned(), "v".repeat(4097))].into(),
        many,
    ] {
        let refused = tenant
            .owner
            .update_installation(
                &installation.id,
                &UpdateInstallationRequest {
                    secrets: Some(secrets),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(plinth_sdk::ErrorCode::ValidationFailed),
            "{refused}"
        );
    }
    // Nothing was stored: the plugin still finds no secret.
    assert_eq!(
        secret_read_by_plugin(&app, &tenant, &installation.id).await,
        serde_json::Value::Null
    );
}
