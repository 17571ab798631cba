//! Recording invocations in full and replaying them away from the platform: a plugin fails in
//! production on an installation that records its failures; its author replays the record with
//! `plinth-cli plugin replay` and gets the same failure from the same host answers, without the
//! platform (the plugin's key-value state and the model are answered from the record); a changed
//! plugin that makes a different host call is reported as divergent. Records keep no secret, are the
//! installing tenant's alone, and a success is recorded only when the caller asks.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use plinth_sdk::{InvocationRecord, UpdateInstallationRequest};
use plinth_tests::{TestApp, built_plugin, plinth_cli};
use serde_json::json;

async fn cli(app: &TestApp, config: &Path, args: &[&str], token: Option<&str>) -> Output {
    let mut command = plinth_cli(app, config);
    command.args(args);
    if let Some(token) = token {
        command.env("PLINTH_TOKEN", token);
    }
    command.output().await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The installation's records once `count` have been written (they are written off the request path).
async fn records(
    client: &plinth_sdk::Client,
    installation: &plinth_sdk::InstallationId,
    count: usize,
) -> Vec<InvocationRecord> {
    for _ in 0..200 {
        let records = client.invocations(installation, None).await.unwrap();
        if records.len() >= count {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {count} invocation records were written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_failure_replays_on_the_authors_machine_and_a_changed_plugin_diverges() {
    let app = TestApp::spawn().await;
    let (author, tenant, stranger) = (app.tenant().await, app.tenant().await, app.tenant().await);
    let installed = app
        .install_plugin(&author, &tenant, "hostile", json!({ "tone": "dry" }))
        .await;
    assert!(!installed.record_failures, "recording is opt-in");
    let installed = tenant
        .owner
        .update_installation(
            &installed.id,
            &UpdateInstallationRequest {
                record_failures: Some(true),
                secrets: Some([("api_token".to_owned(), "s3cret-never-recorded".to_owned())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(installed.record_failures);

    // Two failing invocations: the second depends on what the first left in the plugin's store and on
    // the model's verdict.
    let invoke = |text: &'static str| {
        let client = tenant.client.clone();
        let id = installed.id.clone();
        async move {
            client
                .invoke(&id, &json!({ "do": "remember-then-fail", "text": text }))
                .await
                .unwrap_err()
        }
    };
    let first = invoke("I love this, it works perfectly").await;
    assert_eq!(first.code(), Some(plinth_sdk::ErrorCode::PluginFailed));
    let second = invoke("This is terrible and broken").await;
    let failure = match &second {
        plinth_sdk::Error::Api { message, .. } => message.clone(),
        other => panic!("{other}"),
    };
    assert!(
        failure.starts_with("gave up on a ") && !failure.ends_with("after nothing"),
        "{failure}"
    );
    // A success on this installation is not recorded in full unless the caller asks.
    tenant
        .client
        .invoke(&installed.id, &json!({ "do": "echo" }))
        .await
        .unwrap();
    let listed = records(&tenant.client, &installed.id, 3).await;
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.outcome.as_str(), r.recorded))
            .collect::<Vec<_>>(),
        [("ok", false), ("plugin_failed", true), ("plugin_failed", true)]
    );
    let failed = &listed[1];

    // The record: the request, the settings, each host call with its answer; no secret's value.
    let record = tenant
        .owner
        .invocation_record(&installed.id, &failed.id)
        .await
        .unwrap();
    assert_eq!(
        (record.plugin.as_str(), record.outcome.as_str()),
        ("hostile", "plugin_failed")
    );
    assert_eq!(record.output, failure);
    assert_eq!(
        record.host_calls.len(),
        3,
        "kv.get, classify, kv.set: {:?}",
        record.host_calls
    );
    assert_eq!(record.secret_names, ["api_token"]);
    let stored = serde_json::to_string(&record).unwrap();
    assert!(!stored.contains("s3cret-never-recorded"), "{stored}");
    // Another tenant, the author included, cannot read it.
    for other in [&stranger, &author] {
        let refused = other
            .owner
            .invocation_record(&installed.id, &failed.id)
            .await
            .unwrap_err();
        assert_eq!(refused.status(), Some(404));
    }
    // A plugin that writes a secret into what is recorded (here its answer, asked for in full) does
    // not carry it out: the value is replaced by `[secret NAME]`, which a replay gives the plugin too.
    let (answer, leaky) = tenant
        .client
        .invoke_recorded(&installed.id, &json!({ "do": "secret", "key": "api_token" }))
        .await
        .unwrap();
    assert_eq!(
        answer["secret"], "s3cret-never-recorded",
        "the caller gets its answer"
    );
    let leaky = leaky.expect("an invocation id");
    records(&tenant.client, &installed.id, 4).await;
    let leaked = tenant
        .owner
        .invocation_record(&installed.id, &leaky)
        .await
        .unwrap();
    assert!(
        !serde_json::to_string(&leaked)
            .unwrap()
            .contains("s3cret-never-recorded")
    );
    assert!(leaked.output.contains("[secret api_token]"), "{}", leaked.output);

    // Nor is a success read in full that was not recorded.
    let unrecorded = tenant
        .owner
        .invocation_record(&installed.id, &listed[0].id)
        .await
        .unwrap_err();
    assert_eq!(unrecorded.status(), Some(404));

    // The tenant's developer replays it: the same failure, from the recorded answers. The plugin's store now holds
    // the second verdict and this machine has no model: only the record can give these answers.
    let work = tempfile::tempdir().unwrap();
    let (_, component) = built_plugin("hostile");
    let wasm = work.path().join("hostile.wasm");
    std::fs::write(&wasm, component).unwrap();
    let replayed = cli(
        &app,
        work.path(),
        &[
            "plugin",
            "replay",
            failed.id.as_str(),
            "--installation",
            installed.id.as_str(),
            "--component",
            wasm.to_str().unwrap(),
        ],
        Some(&tenant.session.token),
    )
    .await;
    let out = text(&replayed.stdout);
    assert_eq!(replayed.status.code(), Some(0), "{out}{}", text(&replayed.stderr));
    assert!(
        out.contains(&format!("replayed: plugin_failed: {failure}")),
        "{out}"
    );
    assert!(out.contains("reproduced"), "{out}");
    assert!(out.contains("log warn  saw "), "{out}");
    assert!(
        text(&replayed.stderr).contains("the secret `api_token` is not in the record"),
        "{}",
        text(&replayed.stderr)
    );

    // The tenant saves the record and hands it over; the author replays a changed plugin from the file,
    // with no account at all. It reads another key first: the replay says where it left the record.
    let saved = work.path().join("record.json");
    let save = cli(
        &app,
        work.path(),
        &[
            "plugin",
            "record",
            installed.id.as_str(),
            failed.id.as_str(),
            "--output",
            saved.to_str().unwrap(),
        ],
        Some(&tenant.session.token),
    )
    .await;
    assert!(save.status.success(), "{}", text(&save.stderr));
    let (_, edited) = built_plugin("hostile-edited");
    let edited_wasm = work.path().join("hostile-edited.wasm");
    std::fs::write(&edited_wasm, edited).unwrap();
    let nobody = tempfile::tempdir().unwrap();
    let diverged = cli(
        &app,
        nobody.path(),
        &[
            "plugin",
            "replay",
            "--record",
            saved.to_str().unwrap(),
            "--component",
            edited_wasm.to_str().unwrap(),
            "--json",
        ],
        None,
    )
    .await;
    assert_eq!(diverged.status.code(), Some(5), "{}", text(&diverged.stderr));
    let report: serde_json::Value = serde_json::from_slice(&diverged.stdout).unwrap();
    assert_eq!(report["reproduced"], false);
    assert_eq!(
        report["divergence"],
        r#"host call 1: the record has kv.get("last"), the plugin called kv.get("previous")"#
    );
    assert_eq!(report["recorded"]["output"], failure.as_str());

    // The unchanged plugin from the same file reproduces it too.
    let again = cli(
        &app,
        nobody.path(),
        &[
            "plugin",
            "replay",
            "--record",
            saved.to_str().unwrap(),
            "--component",
            wasm.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stdout));
}

#[tokio::test]
async fn a_caller_records_one_invocation_and_bad_record_requests_are_refused() {
    let app = TestApp::spawn().await;
    let (author, tenant) = (app.tenant().await, app.tenant().await);
    let installed = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let (answer, invocation) = tenant
        .client
        .invoke_recorded(&installed.id, &json!({ "do": "model" }))
        .await
        .unwrap();
    let invocation = invocation.expect("the invocation's id");
    records(&tenant.client, &installed.id, 1).await;
    let record = tenant
        .client
        .invocation_record(&installed.id, &invocation)
        .await
        .unwrap();
    assert_eq!(record.outcome, "ok");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&record.output).unwrap(),
        answer
    );
    assert_eq!(record.granted_models, ["sentiment"]);
    match &record.host_calls[..] {
        [call] => {
            assert_eq!(
                call.request,
                plinth_sdk::HostRequest::Classify {
                    model: "sentiment".into(),
                    texts: vec!["is this allowed?".into()],
                }
            );
            let plinth_sdk::HostAnswer::Classifications(results) = &call.answer else {
                panic!("{:?}", call.answer);
            };
            assert_eq!(json!(results[0].label), answer);
        }
        other => panic!("{other:?}"),
    }

    // A retry of a recorded call under its Idempotency-Key gets the first answer back with the same
    // invocation; the same key without asking for the record is another request, refused.
    let send = |record: bool| {
        let mut request = reqwest::Client::new()
            .post(app.url(&format!("/v1/installations/{}/invoke", installed.id)))
            .bearer_auth(&tenant.key.secret)
            .header("Idempotency-Key", "recorded-once")
            .json(&json!({ "do": "echo" }));
        if record {
            request = request.header("Plinth-Record", "full");
        }
        request.send()
    };
    let first = send(true).await.unwrap();
    assert_eq!(first.status(), 200);
    let retried = send(true).await.unwrap();
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    assert_eq!(
        retried.headers()["plinth-invocation-id"],
        first.headers()["plinth-invocation-id"]
    );
    let unrecorded = send(false).await.unwrap();
    assert_eq!(unrecorded.status(), 422);

    // Only `full` is a recording mode.
    let response = reqwest::Client::new()
        .post(app.url(&format!("/v1/installations/{}/invoke", installed.id)))
        .bearer_auth(&tenant.key.secret)
        .header("Plinth-Record", "everything")
        .json(&json!({ "do": "echo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_header");
}
