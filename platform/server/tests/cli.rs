//! The `plinth` binary as operators run it. (Being here also makes `cargo test --workspace` build the
//! binary, which the end-to-end chaos test starts and kills.)

use std::process::Command;

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
