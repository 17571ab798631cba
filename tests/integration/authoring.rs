//! A new plugin author, following plugins/README.md, in each of the three languages: `plinth-cli plugin
//! new` from the template, `plugin build` with that language's tool, `plugin publish`; the platform
//! approves it, a tenant installs and invokes it and gets the template's answer, and a bad request
//! gets the template's typed refusal.

use std::path::Path;
use std::process::Output;

use plinth_tests::{TestApp, plinth_cli};
use serde_json::json;

/// The language tools `scripts/build-plugins.sh` installed (componentize-py, componentize-js) on
/// PATH, and cargo pointed where that script builds Rust plugins, so the standard library it built
/// for wasm32-wasip2 is not built again.
fn author_environment() -> Vec<(String, String)> {
    let cache = plinth_server::config::cache_dir();
    let path = std::env::join_paths(
        [
            cache.join("venv-plugins/bin"),
            cache.join("node-plugins/node_modules/.bin"),
        ]
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .unwrap();
    let rustup_wasm = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        });
    let mut env = vec![("PATH".to_owned(), path.to_string_lossy().into_owned())];
    if rustup_wasm {
        env.push((
            "CARGO_TARGET_DIR".into(),
            cache.join("plugins-target/rustup").display().to_string(),
        ));
    } else {
        env.push((
            "CARGO_TARGET_DIR".into(),
            cache.join("plugins-target/debian").display().to_string(),
        ));
        env.push(("CARGO_HOME".into(), cache.join("cargo-web").display().to_string()));
    }
    env
}

async fn cli(app: &TestApp, config: &Path, args: &[&str], token: Option<&str>) -> Output {
    let mut command = plinth_cli(app, config);
    command.args(args).envs(author_environment());
    if let Some(token) = token {
        command.env("PLINTH_TOKEN", token);
    }
    command.output().await.unwrap()
}

fn ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_author_goes_from_plugin_new_to_an_invoked_plugin_in_rust_python_and_javascript() {
    let app = TestApp::spawn().await;
    let (author, tenant) = (app.tenant().await, app.tenant().await);
    let admin = app.platform_admin().await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("config");
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    let token = Some(author.session.token.as_str());

    for language in ["rust", "python", "js"] {
        let name = format!("greeter-{language}");
        let dir = work.path().join(&name);
        let dir_arg = dir.to_str().unwrap();
        let created = cli(
            &app,
            &config,
            &[
                "plugin",
                "new",
                &name,
                "--lang",
                language,
                "--dir",
                dir_arg,
                "--sdk",
                sdk.to_str().unwrap(),
            ],
            None,
        )
        .await;
        ok(&created, "plugin new");
        ok(
            &cli(&app, &config, &["plugin", "build", "--dir", dir_arg], None).await,
            &format!("plugin build ({language})"),
        );
        assert!(dir.join(format!("{name}.wasm")).is_file());
        let manifest_path = dir.join("plugin.json");
        let published = cli(
            &app,
            &config,
            &[
                "plugin",
                "publish",
                "--manifest",
                manifest_path.to_str().unwrap(),
                "--json",
            ],
            token,
        )
        .await;
        ok(&published, "plugin publish");
        let version: plinth_sdk::PluginVersion = serde_json::from_slice(&published.stdout).unwrap();
        assert_eq!(
            (version.plugin.as_str(), version.version.as_str()),
            (name.as_str(), "0.1.0")
        );
        admin
            .review_plugin_version(&version.id, true, None)
            .await
            .unwrap();

        let manifest: plinth_sdk::PluginManifest =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        let installed = tenant
            .owner
            .install_plugin(&plinth_sdk::InstallRequest {
                plugin: name.clone(),
                version: None,
                approve_capabilities: manifest.capabilities.clone(),
                approve_models: manifest.models.clone(),
                settings: serde_json::Map::new(),
                secrets: std::collections::BTreeMap::new(),
                record_failures: false,
            })
            .await
            .unwrap();
        let answer = tenant
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap_or_else(|err| panic!("{language}: {err}"));
        assert_eq!(answer, json!({ "greeting": "Hello, Ada!" }), "{language}");
        let refused = tenant.client.invoke(&installed.id, &json!({})).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(plinth_sdk::ErrorCode::PluginRejectedRequest),
            "{language}: {refused}"
        );
    }
}
