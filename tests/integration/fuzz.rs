//! Schemathesis, pointed at a running server with the committed OpenAPI document: generated requests,
//! valid and not, to every operation, with a tenant's key that holds every scope. None may answer with
//! a server error. Bounded (a fixed seed and a few examples per operation) to fit the suite; new routes
//! are covered because the document lists them.

use plinth_tests::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_to_every_operation_get_no_server_error() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let python = crate::inference::client_python();
    let schemathesis = python.with_file_name("schemathesis");
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");
    let report = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(&schemathesis)
        .args([
            "run",
            spec,
            "--url",
            &app.url(""),
            "--checks",
            "not_a_server_error",
        ])
        .args(["--max-examples", "15", "--seed", "20261202", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing", "--request-timeout", "30"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", tenant.key.secret),
        ])
        .arg("--report-dir")
        .arg(report.path())
        // Its caches go with the report, not into the checkout.
        .current_dir(report.path())
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap_or_else(|err| panic!("{}: {err} (scripts/test.sh installs it)", schemathesis.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found server errors:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
