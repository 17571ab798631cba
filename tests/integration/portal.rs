//! The portal in Debian's Chromium: `tests/portal/portal.test.mjs` (Node's test runner with
//! playwright-core and axe-core, which scripts/test.sh installs) walks the tenant's pages against this
//! test's server. With `PLINTH_PORTAL_SCREENSHOTS` set, it saves the main pages there.

use plinth_tests::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_in_a_real_browser() {
    let app = TestApp::spawn().await;
    // For the operator's review queue: a platform admin, and a plugin version waiting for review.
    let (admin_email, admin_password) = app.platform_admin_account().await;
    let author = app.tenant().await;
    let (manifest, component) = plinth_tests::built_plugin("hello");
    author
        .owner
        .create_plugin(&manifest.name, &manifest.description)
        .await
        .unwrap();
    author
        .owner
        .publish_plugin_version(&manifest, component)
        .await
        .unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/portal");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "{chromium} is missing: install Debian's chromium (`apt-get install chromium`; .ci/run does)"
    );
    let mut node = tokio::process::Command::new("node");
    node.args([
        "--test",
        "--test-concurrency=1",
        "--test-reporter=spec",
        "portal.test.mjs",
    ])
    .current_dir(dir)
    .env("PLINTH_URL", app.url(""))
    .env("CHROMIUM", &chromium)
    .env(
        "PLINTH_MODELS_DIR",
        plinth_server::config::cache_dir().join("models"),
    )
    .env("PLINTH_ADMIN_EMAIL", &admin_email)
    .env("PLINTH_ADMIN_PASSWORD", &admin_password)
    .env(
        "PLINTH_PENDING_PLUGIN",
        format!("{} {}", manifest.name, manifest.version),
    )
    .env("NO_COLOR", "1")
    .env_remove("PLINTH_SCREENSHOTS");
    if let Some(screenshots) = std::env::var_os("PLINTH_PORTAL_SCREENSHOTS") {
        node.env("PLINTH_SCREENSHOTS", screenshots);
    }
    let output = node
        .output()
        .await
        .unwrap_or_else(|err| panic!("node: {err} (scripts/test.sh installs the browser tests' packages)"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The runner's own summary: how many ran and passed.
    println!("{stdout}");
    assert!(
        output.status.success(),
        "portal browser tests failed (above)\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ℹ fail 0"), "{stdout}");
}
