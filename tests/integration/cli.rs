//! `plinth-cli` against a real server, as a developer uses it: log in (credentials kept in a profile
//! only the user can read), keys, models, a classification, usage, plugin invocation records and logs,
//! publishing, errors that say what to do with exit codes that mean something, and logging out.

use std::path::Path;
use std::process::Output;

use plinth_tests::{PASSWORD, TestApp, built_plugin, plinth_cli};
use serde_json::{Value, json};

/// Runs the command line with its own config directory, talking to `app`.
async fn cli(app: &TestApp, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = plinth_cli(app, config);
    command.args(args).envs(env.iter().copied());
    command.output().await.unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("{err}: {}", stdout(output)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_works_from_the_command_line() {
    let app = TestApp::spawn().await;
    let config = tempfile::tempdir().unwrap();
    let dir = config.path();
    let session = app.signup().await;
    let email = session.user.email.clone();

    // A wrong password: refused, exit 1, nothing stored.
    let refused = cli(
        &app,
        dir,
        &["login", "--email", &email],
        &[("PLINTH_PASSWORD", "not the password")],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(!dir.join("profiles.toml").exists());

    let login = cli(
        &app,
        dir,
        &["login", "--email", &email],
        &[("PLINTH_PASSWORD", PASSWORD)],
    )
    .await;
    assert!(login.status.success(), "{}", stderr(&login));
    assert!(stderr(&login).contains(session.tenant.id.as_str()));
    let stored = std::fs::read_to_string(dir.join("profiles.toml")).unwrap();
    let cli_session: String = stored
        .split('"')
        .find(|part| part.starts_with("pls_"))
        .expect("the session is kept")
        .to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("profiles.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "credentials readable by others: {mode:o}");
    }

    // Two logins at once into two more profiles: neither loses the other's.
    let password = [("PLINTH_PASSWORD", PASSWORD)];
    let first_args = ["--profile", "first", "login", "--email", email.as_str()];
    let second_args = ["--profile", "second", "login", "--email", email.as_str()];
    let (first, second) = tokio::join!(
        cli(&app, dir, &first_args, &password),
        cli(&app, dir, &second_args, &password),
    );
    assert!(
        first.status.success() && second.status.success(),
        "{}{}",
        stderr(&first),
        stderr(&second)
    );
    let profiles = std::fs::read_to_string(dir.join("profiles.toml")).unwrap();
    for profile in ["profiles.default", "profiles.first", "profiles.second"] {
        assert!(profiles.contains(profile), "{profile} lost: {profiles}");
    }

    let whoami = json_of(&cli(&app, dir, &["whoami", "--json"], &[]).await);
    assert_eq!(whoami["id"], session.tenant.id.to_string());

    // Keys: a new one works on its own (PLINTH_TOKEN), and lists as a table.
    let created = json_of(
        &cli(
            &app,
            dir,
            &["keys", "create", "ci", "--scope", "inference", "--json"],
            &[],
        )
        .await,
    );
    let secret = created["secret"].as_str().unwrap().to_owned();
    let listed = cli(&app, dir, &["keys", "list"], &[]).await;
    assert!(
        listed.status.success() && stdout(&listed).contains("ci"),
        "{}",
        stdout(&listed)
    );
    let classified = json_of(
        &cli(
            &app,
            dir,
            &["classify", "sentiment", "I love this product", "--json"],
            &[("PLINTH_TOKEN", &secret)],
        )
        .await,
    );
    assert_eq!(classified["results"][0]["label"], "positive");
    let embedded = json_of(
        &cli(
            &app,
            dir,
            &["embed", "minilm-embed", "hello", "world", "--json"],
            &[("PLINTH_TOKEN", &secret)],
        )
        .await,
    );
    assert_eq!(embedded["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(embedded["dimensions"], 384);
    // Tensors in, tensors out: an Open Inference Protocol request from a file.
    let scratch = tempfile::tempdir().unwrap();
    let request = scratch.path().join("request.json");
    std::fs::write(
        &request,
        json!({ "inputs": [
            { "name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 2293, 2023, 102] },
            { "name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1] },
            { "name": "token_type_ids", "shape": [1, 4], "datatype": "INT64", "data": [0, 0, 0, 0] },
        ]})
        .to_string(),
    )
    .unwrap();
    let inferred = json_of(
        &cli(
            &app,
            dir,
            &["infer", "sentiment", "--request", request.to_str().unwrap()],
            &[("PLINTH_TOKEN", &secret)],
        )
        .await,
    );
    assert!(
        inferred["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|output| output["name"] == "probs" && output["shape"] == json!([1, 3])),
        "{inferred}"
    );
    std::fs::write(&request, "{\"not\": \"a request\"}").unwrap();
    let malformed = cli(
        &app,
        dir,
        &["infer", "sentiment", "--request", request.to_str().unwrap()],
        &[("PLINTH_TOKEN", &secret)],
    )
    .await;
    assert_eq!(malformed.status.code(), Some(2), "{}", stderr(&malformed));
    // A key without the scope: refused with the API's code, exit 1.
    let scoped = cli(&app, dir, &["keys", "list"], &[("PLINTH_TOKEN", &secret)]).await;
    assert_eq!(scoped.status.code(), Some(1));
    assert!(
        stderr(&scoped).contains("insufficient_scope"),
        "{}",
        stderr(&scoped)
    );

    // A model of the tenant's own: uploaded, listed, served, deleted.
    let files = tempfile::tempdir().unwrap();
    let builtin = plinth_server::config::cache_dir().join("models");
    let manifest = files.path().join("manifest.json");
    std::fs::write(
        &manifest,
        json!({ "name": "cli-tone", "task": "text-classification", "labels": ["bad", "meh", "good"] })
            .to_string(),
    )
    .unwrap();
    let uploaded = json_of(
        &cli(
            &app,
            dir,
            &[
                "models",
                "upload",
                "--manifest",
                manifest.to_str().unwrap(),
                "--model",
                builtin.join("sentiment.onnx").to_str().unwrap(),
                "--tokenizer",
                builtin.join("tokenizer.json").to_str().unwrap(),
                "--json",
            ],
            &[],
        )
        .await,
    );
    assert_eq!(
        (uploaded["name"].as_str(), uploaded["version"].as_u64()),
        (Some("cli-tone"), Some(1))
    );
    let models = cli(&app, dir, &["models", "list"], &[]).await;
    assert!(
        stdout(&models).contains("sentiment") && stdout(&models).contains("cli-tone"),
        "{}",
        stdout(&models)
    );
    let own = json_of(
        &cli(
            &app,
            dir,
            &["classify", "cli-tone", "I love this product", "--json"],
            &[],
        )
        .await,
    );
    assert_eq!(own["results"][0]["label"], "good");
    let deleted = cli(&app, dir, &["models", "delete", "cli-tone"], &[]).await;
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    let gone = cli(&app, dir, &["classify", "cli-tone", "hello"], &[]).await;
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("not_found"), "{}", stderr(&gone));
    let usage = json_of(&cli(&app, dir, &["usage", "--by-resource", "--json"], &[]).await);
    assert!(
        usage["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["key"] == "model:sentiment"),
        "{usage}"
    );
    let unknown = format!("key_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    let missing = cli(&app, dir, &["keys", "revoke", &unknown], &[]).await;
    assert_eq!(missing.status.code(), Some(1), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("not_found"), "{}", stderr(&missing));
    let malformed = cli(&app, dir, &["keys", "revoke", "not-a-key"], &[]).await;
    assert_eq!(malformed.status.code(), Some(2), "{}", stderr(&malformed));

    // Plugins: the tenant reads its installation's records and logs.
    let author = app.tenant().await;
    let tenant = plinth_tests::TestTenant {
        owner: app.client().with_token(&session.token),
        client: app.client().with_token(&secret),
        key: created_key(&app, &session.token).await,
        session: session.clone(),
    };
    let installed = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let failed = tenant
        .owner
        .invoke(&installed.id, &json!({ "do": "log-then-fail" }))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Some(plinth_sdk::ErrorCode::PluginFailed));
    let mut logs = String::new();
    for _ in 0..100 {
        logs = stdout(&cli(&app, dir, &["plugin", "logs", installed.id.as_str()], &[]).await);
        if logs.contains("about to fail on purpose") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        logs.contains("warn") && logs.contains("about to fail on purpose"),
        "{logs}"
    );
    // The plugin's attempt to retitle the terminal arrives as text, not as an escape sequence.
    assert!(
        !logs.contains('\u{1b}') && logs.contains("\\u{1b}]0;pwned"),
        "{logs}"
    );
    let records = json_of(
        &cli(
            &app,
            dir,
            &["plugin", "invocations", installed.id.as_str(), "--json"],
            &[],
        )
        .await,
    );
    assert_eq!(records[0]["outcome"], "plugin_failed");

    // An author publishes from the command line; the checks' findings are printed.
    let author_dir = tempfile::tempdir().unwrap();
    let token_env = [("PLINTH_TOKEN", author.session.token.as_str())];
    let (mut manifest, component) = built_plugin("hostile");
    manifest.version = "9.9.9".into();
    let manifest_path = author_dir.path().join("plugin.json");
    let component_path = author_dir.path().join("hostile.wasm");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    std::fs::write(&component_path, component).unwrap();
    let published = json_of(
        &cli(
            &app,
            author_dir.path(),
            &[
                "plugin",
                "publish",
                "--manifest",
                manifest_path.to_str().unwrap(),
                "--component",
                component_path.to_str().unwrap(),
                "--json",
            ],
            &token_env,
        )
        .await,
    );
    assert_eq!(
        (published["version"].as_str(), published["status"].as_str()),
        (Some("9.9.9"), Some("pending"))
    );

    // Logging out ends the session on the server too.
    let logout = cli(&app, dir, &["logout"], &[]).await;
    assert!(logout.status.success(), "{}", stderr(&logout));
    let after = cli(&app, dir, &["whoami"], &[]).await;
    assert_eq!(after.status.code(), Some(3));
    assert!(stderr(&after).contains("plinth-cli login"));
    let ended = app.client().with_token(&cli_session).tenant().await.unwrap_err();
    assert_eq!(ended.status(), Some(401));
}

async fn created_key(app: &TestApp, token: &str) -> plinth_sdk::CreatedApiKey {
    app.client()
        .with_token(token)
        .create_api_key(&plinth_sdk::CreateApiKeyRequest {
            name: "plugins".into(),
            scopes: Some(plinth_sdk::Scope::ALL.to_vec()),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_trains_deploys_and_exports_a_classifier_from_the_command_line() {
    let app = TestApp::spawn().await;
    let config = tempfile::tempdir().unwrap();
    let dir = config.path();
    let session = app.signup().await;
    let login = cli(
        &app,
        dir,
        &["login", "--email", &session.user.email],
        &[("PLINTH_PASSWORD", PASSWORD)],
    )
    .await;
    assert!(login.status.success(), "{}", stderr(&login));

    let data = dir.join("tickets.jsonl");
    let lines: String = [
        ("billing", "my invoice shows a double charge"),
        ("access", "I cannot log in to my account"),
    ]
    .iter()
    .flat_map(|(label, text)| {
        (0..15).map(move |i| json!({ "text": format!("{text} ({i})"), "label": label }).to_string() + "\n")
    })
    .collect();
    std::fs::write(&data, lines).unwrap();
    let uploaded = json_of(
        &cli(
            &app,
            dir,
            &[
                "--json",
                "datasets",
                "upload",
                data.to_str().unwrap(),
                "--name",
                "tickets",
            ],
            &[],
        )
        .await,
    );
    let dataset = uploaded["id"].as_str().unwrap().to_owned();
    let shown = cli(&app, dir, &["datasets", "show", &dataset], &[]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(
        stdout(&shown).contains("billing") && stdout(&shown).contains("15"),
        "{}",
        stdout(&shown)
    );

    // Started and followed to the end: the evaluation is printed.
    let trained = cli(
        &app,
        dir,
        &[
            "train",
            "start",
            "--dataset",
            &dataset,
            "--model",
            "tickets",
            "--epochs",
            "20",
            "--wait",
        ],
        &[],
    )
    .await;
    assert!(trained.status.success(), "{}", stderr(&trained));
    let report = stdout(&trained);
    assert!(
        report.contains("succeeded") && report.contains("macro-F1"),
        "{report}"
    );
    let jobs = json_of(&cli(&app, dir, &["--json", "train", "list"], &[]).await);
    let job = jobs[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(jobs[0]["status"], "succeeded");

    let deployed = json_of(&cli(&app, dir, &["--json", "train", "deploy", &job], &[]).await);
    assert_eq!(
        (deployed["name"].as_str(), deployed["version"].as_u64()),
        (Some("tickets"), Some(1))
    );
    let classified = cli(
        &app,
        dir,
        &["classify", "tickets", "I was charged twice on my invoice"],
        &[],
    )
    .await;
    assert!(stdout(&classified).contains("billing"), "{}", stdout(&classified));
    let exported = dir.join("tickets.onnx");
    let export = cli(
        &app,
        dir,
        &["train", "export", &job, "-o", exported.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(export.status.success(), "{}", stderr(&export));
    assert!(
        std::fs::metadata(&exported).unwrap().len() > 1_000_000,
        "the whole graph"
    );

    // A bad dataset: refused with the API's code and the line, exit 1.
    std::fs::write(&data, "{\"text\": \"only one label\", \"label\": \"x\"}\n").unwrap();
    let refused = cli(&app, dir, &["datasets", "upload", data.to_str().unwrap()], &[]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("invalid_dataset"),
        "{}",
        stderr(&refused)
    );
}
