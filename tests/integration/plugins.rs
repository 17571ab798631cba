//! Plugins end to end: publishing checks, review, installation, real plugins doing real work with the
//! hosted models, metering and earnings, and hostile plugins contained by the sandbox.

use std::time::Duration;

use plinth_sdk::{ErrorCode, InstallRequest, PluginManifest, ReviewStatus, UsageGrouping, UsageQuery};
use plinth_tests::{TestApp, built_plugin};
use serde_json::{Value, json};

fn faq() -> Value {
    json!([
        { "question": "How do I reset my password?", "answer": "Use 'Forgot password' on the sign-in page; the link arrives by email." },
        { "question": "When will my order arrive?", "answer": "Orders ship within 2 business days; tracking is in your account." },
        { "question": "Can I get a refund?", "answer": "Refunds are available within 30 days of purchase from the Orders page." },
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_service_plugin_answers_from_the_faq_and_escalates_upset_customers() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let shop = app.tenant().await;
    app.set_plan(&shop.session.tenant.id, "enterprise").await;

    // Published but not yet reviewed: not listed, not installable.
    let (manifest, component) = built_plugin("customer-service");
    author
        .owner
        .create_plugin(&manifest.name, &manifest.description)
        .await
        .unwrap();
    let version = author
        .owner
        .publish_plugin_version(&manifest, component)
        .await
        .unwrap();
    assert_eq!(version.status, ReviewStatus::Pending);
    assert_eq!(
        version.checks["imports"],
        json!(["inference", "kv", "config", "log"])
    );
    assert!(shop.client.marketplace(Some("faq")).await.unwrap().is_empty());
    let install = InstallRequest {
        plugin: manifest.name.clone(),
        version: None,
        approve_capabilities: manifest.capabilities.clone(),
        approve_models: manifest.models.clone(),
        settings: json!({ "faq": faq() }).as_object().cloned().unwrap(),
        secrets: Default::default(),
        record_failures: false,
    };
    let err = shop.owner.install_plugin(&install).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PluginNotApproved));
    // Only a platform admin reviews.
    let err = author
        .owner
        .review_plugin_version(&version.id, true, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InsufficientScope));
    let admin = app.platform_admin().await;
    assert!(
        admin
            .pending_plugin_versions()
            .await
            .unwrap()
            .iter()
            .any(|v| v.id == version.id)
    );
    admin
        .review_plugin_version(&version.id, true, Some("looks good"))
        .await
        .unwrap();
    let listed = shop.client.marketplace(Some("FAQ")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].versions[0].version, "1.0.0");

    // The tenant must approve every capability and model the plugin asks for.
    let mut partial = install.clone();
    partial.approve_models = vec!["sentiment".into()];
    let err = shop.owner.install_plugin(&partial).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ValidationFailed));
    let installed = shop.owner.install_plugin(&install).await.unwrap();

    let reply = shop
        .client
        .invoke(
            &installed.id,
            &json!({ "message": "Hello! When will my order arrive? Thanks" }),
        )
        .await
        .unwrap();
    assert_eq!(reply["matched_question"], "When will my order arrive?", "{reply}");
    assert!(
        reply["answer"]
            .as_str()
            .unwrap()
            .contains("ship within 2 business days"),
        "{reply}"
    );
    assert_eq!(reply["escalate"], false, "{reply}");

    let reply = shop
        .client
        .invoke(
            &installed.id,
            &json!({ "message": "This is terrible, you people are useless and I am furious!" }),
        )
        .await
        .unwrap();
    assert_eq!(reply["escalate"], true, "{reply}");
    assert_eq!(reply["sentiment"]["label"], "negative", "{reply}");

    // Billing: each invocation once at the plugin's price; its model calls on their own. The FAQ was
    // embedded once (3 questions) and cached in kv; each message was embedded once more.
    let usage = shop
        .client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..Default::default()
        })
        .await
        .unwrap();
    let row = |key: &str| usage.rows.iter().find(|r| r.key.starts_with(key)).cloned();
    let plugin_row = row("plugin:").expect("plugin usage");
    assert_eq!((plugin_row.calls, plugin_row.amount_micros.0), (2, 4_000));
    assert_eq!(row("model:minilm-embed").expect("embeddings").units, 3 + 2);
    assert_eq!(row("model:sentiment").expect("sentiment").units, 2);

    // The author earns their share (80%) of the plugin fees.
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(earnings.rows[0].calls, 2);
    assert_eq!(earnings.total.0, 3_200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentiment_monitor_alerts_when_negative_news_builds_up() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let fund = app.tenant().await;
    app.set_plan(&fund.session.tenant.id, "enterprise").await;
    let installed = app
        .install_plugin(
            &author,
            &fund,
            "sentiment-monitor",
            json!({ "window": 6, "negative_share_alert": 0.5, "min_samples": 4 }),
        )
        .await;

    let good = json!({ "topic": "ACME", "texts": [
        "Great news: ACME delivers wonderful record profits",
        "I love ACME, the results are fantastic",
        "ACME shares soar as investors celebrate excellent results",
    ]});
    let reply = fund.client.invoke(&installed.id, &good).await.unwrap();
    assert_eq!(reply["alert"], Value::Null, "{reply}");
    assert_eq!(reply["scored"].as_array().unwrap().len(), 3);
    assert_eq!(reply["scored"][0]["label"], "positive", "{reply}");

    let bad = json!({ "topic": "ACME", "texts": [
        "ACME shares plunge after a terrible profit warning",
        "Regulators fine ACME over fraud; investors are furious",
        "ACME recalls faulty products, this is a disaster",
        "ACME cuts jobs as losses widen badly",
    ]});
    let reply = fund.client.invoke(&installed.id, &bad).await.unwrap();
    assert_eq!(reply["window"]["size"], 6, "{reply}");
    assert!(
        reply["alert"]["negative_share"].as_f64().unwrap() >= 0.5,
        "{reply}"
    );

    // Windows are per topic.
    let other = json!({ "topic": "GLOBEX", "texts": ["GLOBEX opens a new office"] });
    let reply = fund.client.invoke(&installed.id, &other).await.unwrap();
    assert_eq!(reply["window"]["size"], 1, "{reply}");
    // A malformed request is the plugin's to refuse.
    let err = fund
        .client
        .invoke(&installed.id, &json!({ "texts": [] }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PluginRejectedRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_contained_and_the_host_keeps_serving() {
    let app = TestApp::spawn_with(|config| {
        config.plugin_kv_keys = 20;
        // Long enough that the other tenant's calls below surely finish while the loop still runs.
        config.plugin_deadline_ms = 5_000;
    })
    .await;
    let author = app.tenant().await;
    let victim = app.tenant().await;
    let bystander = app.tenant().await;
    app.set_plan(&victim.session.tenant.id, "enterprise").await;
    let hostile = app.install_plugin(&author, &victim, "hostile", json!({})).await;
    let (manifest, _) = built_plugin("hostile");
    let neighbour = bystander
        .owner
        .install_plugin(&InstallRequest {
            plugin: "hostile".into(),
            version: None,
            approve_capabilities: manifest.capabilities.clone(),
            approve_models: manifest.models.clone(),
            settings: Default::default(),
            secrets: Default::default(),
            record_failures: false,
        })
        .await
        .unwrap();

    let invoke = |mode: &str| {
        let client = victim.client.clone();
        let id = hostile.id.clone();
        let request = json!({ "do": mode, "model": "minilm-embed" });
        async move { client.invoke(&id, &request).await.unwrap_err() }
    };

    // An infinite loop is stopped at the deadline; meanwhile another tenant is served promptly.
    let looping = tokio::spawn(invoke("loop"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let echoed = bystander
            .client
            .invoke(&neighbour.id, &json!({ "do": "echo", "n": 1 }))
            .await
            .unwrap();
        assert_eq!(echoed["n"], 1);
    }
    bystander
        .client
        .classify("sentiment", &["still fine"])
        .await
        .unwrap();
    // All of that was served while the loop was still running.
    assert!(!looping.is_finished(), "other work waited for the loop");
    let err = looping.await.unwrap();
    // Stopped by the deadline, or (on a fast core, in these five seconds) by the compute budget.
    assert!(
        err.code() == Some(ErrorCode::PluginTimeout)
            || (err.code() == Some(ErrorCode::PluginLimitExceeded)
                && err.to_string().contains("compute budget")),
        "{err:?}"
    );

    // New keys written at once, as invocations on several replicas would write them, stop at the
    // limit together (on Postgres each write once counted room for itself).
    let installation = neighbour.id.to_string();
    let keys: Vec<String> = (0..32).map(|i| format!("race-{i}")).collect();
    let writes = keys
        .iter()
        .map(|key| app.store().kv_set(&installation, key, vec![1], 20));
    let stored = futures_util::future::join_all(writes)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    assert_eq!(stored, 20);
    assert_eq!(
        app.store().kv_list(&installation, "race-").await.unwrap().len(),
        20
    );

    // A prefix lists the keys that start with it, byte for byte: `%` and `_` are not wildcards, and
    // case counts (on SQLite as on Postgres).
    let listed = victim
        .client
        .invoke(&hostile.id, &json!({ "do": "kv-list-wildcards" }))
        .await
        .unwrap();
    assert_eq!(listed["percent"], json!(["a%b"]), "{listed}");
    assert_eq!(listed["underscore"], json!(["a_c"]), "{listed}");
    assert_eq!(listed["lower"], json!(["a%b", "a_c", "axb"]), "{listed}");

    let cases = [
        ("alloc", ErrorCode::PluginLimitExceeded, "memory"),
        // Rust keeps its stack in linear memory: runaway recursion runs off its end and traps.
        ("recurse", ErrorCode::PluginFailed, "the plugin trapped"),
        // Past what the guest may hand the host at once: refused as it leaves the guest.
        ("big-output", ErrorCode::PluginLimitExceeded, "at once"),
        ("huge-error", ErrorCode::PluginLimitExceeded, "at once"),
        ("panic", ErrorCode::PluginFailed, "the plugin gave up"),
        ("log-flood", ErrorCode::PluginLimitExceeded, "logged more than"),
        ("kv-flood", ErrorCode::PluginFailed, "holds 20 keys"),
        ("kv-huge-value", ErrorCode::PluginFailed, "at most 256 KiB"),
        (
            "model",
            ErrorCode::PluginFailed,
            "not granted the model `minilm-embed`",
        ),
        (
            "many-calls",
            ErrorCode::PluginFailed,
            "8 model calls per invocation",
        ),
        // Each key-value call is a database round trip: a hundred an invocation.
        (
            "kv-calls",
            ErrorCode::PluginFailed,
            "100 key-value calls per invocation",
        ),
        // Refused by its size before it is parsed (parsed, it would take many times that).
        (
            "huge-model-request",
            ErrorCode::PluginRejectedRequest,
            "a model request is at most 1024 KiB",
        ),
    ];
    for (mode, code, says) in cases {
        let err = invoke(mode).await;
        assert_eq!(err.code(), Some(code), "{mode}: {err:?}");
        assert!(err.to_string().contains(says), "{mode}: {err}");
    }

    // A plugin's own error reaches the caller cut short.
    let long = invoke("long-error").await;
    assert_eq!(long.code(), Some(ErrorCode::PluginRejectedRequest), "{long:?}");
    assert!(long.to_string().contains("… (cut)"), "{long}");
    assert!(long.to_string().len() < 5_000, "{} bytes", long.to_string().len());

    // Nothing leaked: the same installation and its neighbour still answer.
    let echoed = victim
        .client
        .invoke(&hostile.id, &json!({ "do": "echo" }))
        .await
        .unwrap();
    assert_eq!(echoed["do"], "echo");
    bystander
        .client
        .invoke(&neighbour.id, &json!({ "do": "echo" }))
        .await
        .unwrap();
    // Failed invocations are not billed; the successful ones and the model calls made are.
    let usage = victim
        .client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..Default::default()
        })
        .await
        .unwrap();
    let plugin_calls = usage
        .rows
        .iter()
        .find(|r| r.key.starts_with("plugin:"))
        .map(|r| r.calls);
    // The key listing and the last echo.
    assert_eq!(plugin_calls, Some(2), "{usage:?}");
    let model_calls = usage
        .rows
        .iter()
        .find(|r| r.key == "model:sentiment")
        .map(|r| r.calls);
    assert_eq!(model_calls, Some(8), "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_refuses_components_that_fail_the_checks() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let rival = app.tenant().await;
    let (manifest, component) = built_plugin("hostile");
    author.owner.create_plugin("hostile", "").await.unwrap();
    let publish = |manifest: PluginManifest, component: Vec<u8>| {
        let owner = author.owner.clone();
        async move {
            owner
                .publish_plugin_version(&manifest, component)
                .await
                .unwrap_err()
        }
    };
    let refused = |err: plinth_sdk::Error, code: ErrorCode, says: &str| {
        assert_eq!(err.code(), Some(code), "{err:?}");
        assert!(err.to_string().contains(says), "{err}");
    };

    refused(
        publish(manifest.clone(), b"\0asm garbage".to_vec()).await,
        ErrorCode::InvalidPlugin,
        "not a valid WebAssembly component",
    );
    refused(
        publish(manifest.clone(), vec![0; 33 << 20]).await,
        ErrorCode::PayloadTooLarge,
        "larger than",
    );
    let mut undeclared = manifest.clone();
    undeclared
        .capabilities
        .retain(|c| *c == plinth_sdk::Capability::Inference);
    refused(
        publish(undeclared, component.clone()).await,
        ErrorCode::InvalidPlugin,
        "does not declare the `kv` capability",
    );
    let mut future_world = manifest.clone();
    future_world.wit_version = "9.0.0".into();
    refused(
        publish(future_world, component.clone()).await,
        ErrorCode::InvalidPlugin,
        "not supported",
    );
    let mut unknown_model = manifest.clone();
    unknown_model.models = vec!["gpt-17".into()];
    refused(
        publish(unknown_model, component.clone()).await,
        ErrorCode::InvalidPlugin,
        "gpt-17",
    );
    let mut bad_version = manifest.clone();
    bad_version.version = "one".into();
    refused(
        publish(bad_version, component.clone()).await,
        ErrorCode::ValidationFailed,
        "semantic version",
    );

    // Another tenant cannot publish to this listing; a version is published once.
    let err = rival
        .owner
        .publish_plugin_version(&manifest, component.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    author
        .owner
        .publish_plugin_version(&manifest, component.clone())
        .await
        .unwrap();
    refused(
        publish(manifest.clone(), component.clone()).await,
        ErrorCode::ValidationFailed,
        "immutable",
    );
    // Refused before it is compiled, run or stored: other bytes under a published version (here not
    // even a component) are not kept, not compiled.
    let stored = || {
        std::fs::read_dir(app.config.data_dir.join("plugins"))
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".wasm"))
            .count()
    };
    let before = stored();
    let mut other_bytes = component;
    other_bytes.extend_from_slice(b"one byte more");
    refused(
        publish(manifest.clone(), other_bytes).await,
        ErrorCode::ValidationFailed,
        "immutable",
    );
    assert_eq!(stored(), before);
    let listing = author.owner.plugin("hostile").await.unwrap();
    assert_eq!(listing.versions.len(), 1);
}

/// Each version awaiting review keeps its component stored: an author may have ten waiting, every
/// listing's together, and publishes more as they are reviewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_author_may_have_ten_versions_awaiting_review() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let (manifest, component) = built_plugin("hostile");
    let mut first = None;
    for listing in ["hostile", "hostile-two"] {
        author.owner.create_plugin(listing, "").await.unwrap();
        for patch in 0..5 {
            let mut version = manifest.clone();
            version.name = listing.into();
            version.version = format!("1.0.{patch}");
            let published = author
                .owner
                .publish_plugin_version(&version, component.clone())
                .await
                .unwrap();
            first.get_or_insert(published.id);
        }
    }
    let mut eleventh = manifest.clone();
    eleventh.version = "1.1.0".into();
    let refused = author
        .owner
        .publish_plugin_version(&eleventh, component.clone())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(ErrorCode::PluginVersionsPending),
        "{refused:?}"
    );
    assert_eq!(author.owner.plugin("hostile").await.unwrap().versions.len(), 5);
    app.platform_admin()
        .await
        .review_plugin_version(&first.unwrap(), false, Some("not this one"))
        .await
        .unwrap();
    author
        .owner
        .publish_plugin_version(&eleventh, component)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_runs_under_the_same_contract() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let desk = app.tenant().await;
    app.set_plan(&desk.session.tenant.id, "enterprise").await;
    let installed = app
        .install_plugin(
            &author,
            &desk,
            "ticket-triage",
            json!({ "default_team": "front-desk" }),
        )
        .await;

    let reply = desk
        .client
        .invoke(
            &installed.id,
            &json!({
                "subject": "Refund for a double charge",
                "body": "This is terrible: you charged my card twice and I want a refund now!",
            }),
        )
        .await
        .unwrap();
    assert_eq!(reply["team"], "billing", "{reply}");
    assert_eq!(reply["priority"], "urgent", "{reply}");
    assert_eq!(reply["matched_keywords"], json!(["refund", "charge"]), "{reply}");

    let reply = desk
        .client
        .invoke(
            &installed.id,
            &json!({ "subject": "Thanks", "body": "I love the new design, great work!" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (reply["team"].as_str(), reply["priority"].as_str()),
        (Some("front-desk"), Some("normal")),
        "{reply}"
    );

    let err = desk.client.invoke(&installed.id, &json!({})).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PluginRejectedRequest));
    let usage = desk.client.usage(&UsageQuery::default()).await.unwrap();
    // Two invocations at 500 micro-units, two sentiment calls at the enterprise plan's price.
    assert_eq!(usage.total.calls, 4, "{usage:?}");
}

/// The recommendation scenario, a JavaScript plugin: a shop's catalogue embedded into the plugin's
/// store, "items like this one" by meaning, and a user's recommendations from what they viewed (never
/// what they already saw); other tenants' installations know nothing of this catalogue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recommendation_plugin_finds_similar_items_and_recommends_from_recent_views() {
    let app = TestApp::spawn().await;
    let (author, shop, other_shop) = (app.tenant().await, app.tenant().await, app.tenant().await);
    for tenant in [&shop, &other_shop] {
        app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    }
    let installed = app
        .install_plugin(&author, &shop, "recommendations", json!({ "recent": 5 }))
        .await;
    let invoke = |request: serde_json::Value| {
        let (client, id) = (shop.client.clone(), installed.id.clone());
        async move { client.invoke(&id, &request).await }
    };
    let catalogue = json!([
        { "id": "trail-shoe", "text": "Waterproof trail running shoes with a grippy sole" },
        { "id": "road-shoe", "text": "Lightweight road running shoes for marathon training" },
        { "id": "running-socks", "text": "Cushioned running socks that wick sweat" },
        { "id": "espresso", "text": "Espresso machine with a milk frother for cappuccino" },
        { "id": "grinder", "text": "Burr coffee grinder for espresso and filter coffee" },
        { "id": "coffee-beans", "text": "Dark roast coffee beans, one kilogram bag" },
        { "id": "tent", "text": "Two-person camping tent for hiking trips" },
    ]);
    let added = invoke(json!({ "op": "add", "items": catalogue })).await.unwrap();
    assert_eq!(added["added"], 7, "{added}");

    let ids = |answer: &serde_json::Value| -> Vec<String> {
        answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Items like this one: the other coffee things, not shoes; never the item itself.
    let like_espresso = invoke(json!({ "op": "similar", "id": "espresso", "k": 2 }))
        .await
        .unwrap();
    let mut found = ids(&like_espresso);
    found.sort();
    assert_eq!(found, ["coffee-beans", "grinder"], "{like_espresso}");
    // By free text too.
    let by_text = invoke(json!({ "op": "similar", "text": "jogging sneakers", "k": 1 }))
        .await
        .unwrap();
    assert!(ids(&by_text)[0].ends_with("-shoe"), "{by_text}");

    // A user who browsed running gear is recommended running gear they have not seen.
    for viewed in ["trail-shoe", "running-socks"] {
        invoke(json!({ "op": "view", "user": "u-42", "id": viewed }))
            .await
            .unwrap();
    }
    let recommended = invoke(json!({ "op": "recommend", "user": "u-42", "k": 1 }))
        .await
        .unwrap();
    assert_eq!(ids(&recommended), ["road-shoe"], "{recommended}");
    assert_eq!(recommended["based_on"], 2);
    let everything = invoke(json!({ "op": "recommend", "user": "u-42", "k": 50 }))
        .await
        .unwrap();
    let everything = ids(&everything);
    assert_eq!(everything.len(), 5);
    assert!(
        !everything
            .iter()
            .any(|id| id == "trail-shoe" || id == "running-socks")
    );
    // A new user has no history yet: an empty list that says why, not an error.
    let newcomer = invoke(json!({ "op": "recommend", "user": "u-new" }))
        .await
        .unwrap();
    assert_eq!(newcomer["items"], json!([]));

    // Removed items are gone from answers.
    let removed = invoke(json!({ "op": "remove", "ids": ["road-shoe"] }))
        .await
        .unwrap();
    assert_eq!(removed["removed"], 1);
    let after = invoke(json!({ "op": "recommend", "user": "u-42", "k": 1 }))
        .await
        .unwrap();
    assert_ne!(ids(&after), ["road-shoe"], "{after}");

    // Bad requests get the plugin's typed refusal, with what to send instead.
    for bad in [
        json!({ "op": "similar", "id": "no-such-item" }),
        json!({ "op": "view", "user": "u-42", "id": "no-such-item" }),
        json!({ "op": "add", "items": [] }),
        // 150 characters, 300 bytes: longer than a key may be.
        json!({ "op": "add", "items": [{ "id": "é".repeat(150), "text": "accented" }] }),
        json!({ "op": "similar", "id": "espresso", "k": 0 }),
        json!({ "op": "teleport" }),
    ] {
        let err = invoke(bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PluginRejectedRequest), "{bad}: {err}");
    }

    // Another shop's installation starts empty: catalogues are per installation.
    let theirs = plinth_tests::install_listed(&other_shop.owner, "recommendations").await;
    let err = other_shop
        .client
        .invoke(&theirs.id, &json!({ "op": "similar", "id": "espresso" }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PluginRejectedRequest));
}

/// Each invocation leaves a record: its tenant reads it whole (outcome, cost, what the plugin logged,
/// failures included), the author reads daily counts once several tenants called, another tenant finds
/// nothing, only the newest records of an installation are kept, and uninstalling removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_leave_records_for_the_tenant_and_a_redacted_view_for_the_author() {
    let app = TestApp::spawn_with(|config| config.invocation_records = 5).await;
    let (author, tenant, stranger) = (app.tenant().await, app.tenant().await, app.tenant().await);
    let installed = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    tenant
        .client
        .invoke(&installed.id, &json!({ "do": "echo" }))
        .await
        .unwrap();
    let failed = tenant
        .client
        .invoke(
            &installed.id,
            &json!({ "do": "log-then-fail", "private": "order 1234" }),
        )
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Some(ErrorCode::PluginFailed));

    // Written just after the answer, off the request path.
    let records = async |count: usize| {
        for _ in 0..100 {
            let records = tenant.client.invocations(&installed.id, None).await.unwrap();
            if records.len() >= count {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {count} invocation records");
    };
    let seen = records(2).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (newest, first) = (&seen[0], &seen[1]);
    assert_eq!(newest.outcome, "plugin_failed");
    assert!(
        newest.message.as_deref().unwrap().contains("gave up on purpose"),
        "{newest:?}"
    );
    assert!(
        newest
            .logs
            .iter()
            .any(|l| l.level == "warn" && l.message == "about to fail on purpose"),
        "{newest:?}"
    );
    assert_eq!(first.outcome, "ok");
    assert!(first.message.is_none() && first.compute_units > 0, "{first:?}");
    assert_eq!(
        (first.plugin.as_str(), first.installation_id.clone()),
        ("hostile", installed.id.clone())
    );
    assert!(!first.request_id.is_empty());

    // The author: daily calls per version, and only once several tenants besides its own called;
    // nothing of theirs.
    assert_eq!(author.owner.invocation_summary("hostile").await.unwrap(), []);
    let recorded = |tenant: &plinth_tests::TestTenant, installation: plinth_sdk::InstallationId| {
        let client = tenant.client.clone();
        async move {
            for _ in 0..100 {
                if !client.invocations(&installation, None).await.unwrap().is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the invocation was not recorded");
        }
    };
    // The author's own calls, and a sybil's, are two tenants: not enough.
    for caller in [&author, &app.tenant().await] {
        let theirs = plinth_tests::install_listed(&caller.owner, "hostile").await;
        caller
            .client
            .invoke(&theirs.id, &json!({ "do": "echo" }))
            .await
            .unwrap();
        recorded(caller, theirs.id).await;
    }
    assert_eq!(author.owner.invocation_summary("hostile").await.unwrap(), []);
    let another = app.tenant().await;
    let theirs = plinth_tests::install_listed(&another.owner, "hostile").await;
    another
        .client
        .invoke(&theirs.id, &json!({ "do": "echo" }))
        .await
        .unwrap();
    let mut summary = Vec::new();
    for _ in 0..100 {
        summary = author.owner.invocation_summary("hostile").await.unwrap();
        if summary.first().is_some_and(|day| day.calls == 4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(summary.len(), 1, "{summary:?}");
    // The tenant's two calls (one failed), the author's, the sybil's and the last tenant's: the four
    // answered ones.
    assert_eq!(summary[0].calls, 4, "{summary:?}");
    assert_eq!(summary[0].version, newest.version);
    // Counts of calls only: whether a call failed is the plugin's to decide, so it could spell out a
    // tenant's secret to its author, one deliberate failure at a time.
    let day = serde_json::to_value(&summary[0]).unwrap();
    let mut fields: Vec<&String> = day.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["calls", "day", "version"], "{day}");
    let shown = serde_json::to_string(&summary).unwrap();
    for private in [
        "about to fail",
        "gave up",
        "order 1234",
        tenant.session.tenant.id.as_str(),
        installed.id.as_str(),
    ] {
        assert!(!shown.contains(private), "the author sees `{private}`: {shown}");
    }

    // Nobody else: another tenant's installation and another author's plugin are not found.
    let not_found = stranger
        .client
        .invocations(&installed.id, None)
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Some(ErrorCode::NotFound));
    let not_found = stranger.owner.invocation_summary("hostile").await.unwrap_err();
    assert_eq!(not_found.code(), Some(ErrorCode::NotFound));

    // Bounded: the newest five of eight are kept.
    for n in 0..6 {
        tenant
            .client
            .invoke(&installed.id, &json!({ "do": "echo", "n": n }))
            .await
            .unwrap();
    }
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = tenant.client.invocations(&installed.id, Some(50)).await.unwrap();
        if kept.iter().filter(|r| r.outcome == "ok").count() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(
        kept.iter().all(|r| r.outcome == "ok"),
        "the oldest went first: {kept:?}"
    );

    // Uninstalled: its records (whose logs may echo its secrets) go with it.
    tenant.owner.uninstall_plugin(&installed.id).await.unwrap();
    let gone = tenant.client.invocations(&installed.id, None).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::NotFound));
}
