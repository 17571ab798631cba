//! The `plinth` binary as operators run it. (Being here also makes `cargo test --workspace` build the
//! binary, which the end-to-end chaos test starts and kills.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn plinth() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plinth"))
}

#[test]
fn config_prints_the_effective_settings_with_secrets_hidden() {
    let output = plinth()
        .arg("config")
        .env("PLINTH_STRIPE_SECRET_KEY", "sk_live_very_secret")
        .env("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_very_secret")
        .env("PLINTH_STRIPE_PLAN_PRICES", "pro=price_a/price_b")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains("\"stripe_plan_prices\": \"pro=price_a/price_b\""),
        "{printed}"
    );
    assert!(!printed.contains("very_secret"), "{printed}");
    assert!(printed.contains("<redacted>"));
}

#[test]
fn invalid_configuration_is_refused_with_the_setting_named() {
    let output = plinth()
        .arg("config")
        .env("PLINTH_STRIPE_SECRET_KEY", "sk_test_1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8(output.stderr).unwrap();
    assert!(message.contains("PLINTH_STRIPE_WEBHOOK_SECRET"), "{message}");
}

/// What a new user runs: `plinth serve` with every default, so the data directory is the relative
/// `./data` under the working directory.
#[test]
fn serve_starts_with_the_default_relative_data_directory() {
    let workdir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = plinth()
        .arg("serve")
        .current_dir(workdir.path())
        .env_remove("PLINTH_DATA_DIR")
        .env_remove("PLINTH_DATABASE_URL")
        .env_remove("PLINTH_REDIS_URL")
        .env("PLINTH_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = |port: u16| -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    let started = Instant::now();
    let answer = loop {
        if let Some(status) = server.try_wait().unwrap() {
            let mut stderr = String::new();
            server.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            panic!("plinth serve exited with {status}: {stderr}");
        }
        if let Some(answer) = ready(port) {
            break answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not ready within two minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(workdir.path().join("data").join("plinth.db").exists());
}

/// `plinth admin create-admin` and `revoke-admin` on an embedded database in `dir`.
fn admin(dir: &std::path::Path, args: &[&str], password: &str) -> std::process::Output {
    plinth()
        .arg("admin")
        .args(args)
        .env("PLINTH_DATA_DIR", dir)
        .env_remove("PLINTH_DATABASE_URL")
        .env("PLINTH_ADMIN_PASSWORD", password)
        .env("PLINTH_LOG", "warn")
        .output()
        .expect("plinth runs")
}

#[test]
fn create_admin_never_promotes_an_account_it_cannot_prove_is_the_operators() {
    let dir = tempfile::tempdir().unwrap();
    // The operator's own account: created, then promoted by name again only with its password.
    let created = admin(
        dir.path(),
        &["create-admin", "--email", "ops@example.com"],
        "operator password 1",
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let again = admin(
        dir.path(),
        &["create-admin", "--email", "ops@example.com"],
        "operator password 1",
    );
    assert!(!again.status.success());
    let message = String::from_utf8_lossy(&again.stderr);
    assert!(message.contains("--promote-existing"), "{message}");
    let wrong = admin(
        dir.path(),
        &["create-admin", "--email", "ops@example.com", "--promote-existing"],
        "a guess at the password",
    );
    assert!(!wrong.status.success());
    let right = admin(
        dir.path(),
        &["create-admin", "--email", "ops@example.com", "--promote-existing"],
        "operator password 1",
    );
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    let revoked = admin(dir.path(), &["revoke-admin", "--email", "ops@example.com"], "");
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("no longer a platform admin"));
}
