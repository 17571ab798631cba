//! The command line without a server: what it says when used wrongly, and that it never guesses.

use std::process::Command;

fn cli() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plinth-cli"));
    // Credentials from nowhere but this test.
    let config = std::env::temp_dir().join(format!("plinth-cli-usage-{}", std::process::id()));
    command
        .env("PLINTH_CONFIG_DIR", &config)
        .env_remove("PLINTH_TOKEN")
        .env_remove("PLINTH_PROFILE")
        .env_remove("PLINTH_API_URL");
    command
}

#[test]
fn a_wrong_command_line_exits_2_with_usage() {
    let output = cli().args(["keys", "frobnicate"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage"));
}

#[test]
fn without_credentials_it_exits_3_and_says_how_to_log_in() {
    let output = cli().args(["keys", "list"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("plinth-cli login"), "{said}");
}

#[test]
fn an_unreachable_server_exits_4() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = cli()
        .args(["--api", &format!("http://127.0.0.1:{port}"), "whoami"])
        .env("PLINTH_TOKEN", "plk_live_notarealkey")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
