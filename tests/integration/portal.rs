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
    // For the marketplace: an approved plugin that asks for capabilities and a model.
    let (listed, component) = plinth_tests::built_plugin("sentiment-monitor");
    author
        .owner
        .create_plugin(&listed.name, &listed.description)
        .await
        .unwrap();
    let version = author
        .owner
        .publish_plugin_version(&listed, component)
        .await
        .unwrap();
    app.platform_admin()
        .await
        .review_plugin_version(&version.id, true, None)
        .await
        .unwrap();
    // For the author's journey through the pages: a priced plugin that asks for capabilities and a
    // model, as files an author would pick.
    let journey = tempfile::tempdir().unwrap();
    let mut journey_manifest = serde_json::to_value(&listed).unwrap();
    journey_manifest["name"] = "news-watch".into();
    journey_manifest["description"] = "Sentiment of the news about a topic, with alerts.".into();
    journey_manifest["price_per_call_micros"] = 50_000.into();
    std::fs::write(
        journey.path().join("plugin.json"),
        serde_json::to_vec_pretty(&journey_manifest).unwrap(),
    )
    .unwrap();
    std::fs::write(
        journey.path().join("plugin.wasm"),
        plinth_tests::built_plugin("sentiment-monitor").1,
    )
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
    .env("PLINTH_JOURNEY_PLUGIN_DIR", journey.path())
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

/// Signs up through the portal's form, as a browser on the portal would; returns the session cookie.
pub(crate) async fn portal_signup(app: &TestApp) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = http
        .post(app.url("/portal/signup"))
        .header("Origin", app.url("").trim_end_matches('/'))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("tenant_name", "Idle Ltd")
                .append_pair("email", &format!("{}@example.com", ulid::Ulid::new()))
                .append_pair("password", "correct horse battery staple")
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("__Host-plinth_session="))
        .expect("a session cookie");
    cookie.split(';').next().unwrap().to_owned()
}

async fn portal_get(app: &TestApp, cookie: &str, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url(path))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_portal_session_must_log_in_again_and_is_not_revoked_by_it() {
    // Six seconds idle: long beside a page's answer on a busy machine.
    let app = TestApp::spawn_with(|config| config.portal_idle_secs = 6).await;
    let cookie = portal_signup(&app).await;
    assert_eq!(portal_get(&app, &cookie, "/portal").await.status(), 200);
    // Used within the expiry, it stays (the two pauses together outlast it).
    for _ in 0..2 {
        tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
        assert_eq!(portal_get(&app, &cookie, "/portal").await.status(), 200);
    }
    // Left alone past it: log in again.
    tokio::time::sleep(std::time::Duration::from_millis(7_000)).await;
    let response = portal_get(&app, &cookie, "/portal/keys").await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "/portal/login?next=%2Fportal%2Fkeys"
    );
    // The expiry is the portal's; a lost mark (a cache outage) must not end the session itself.
    let token = cookie.split_once('=').unwrap().1;
    let tenant = app
        .http()
        .get(app.url("/v1/tenant"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(tenant.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_elsewhere_is_not_a_portal_session() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    // A session token from the API's login, planted as the portal's cookie.
    let cookie = format!("__Host-plinth_session={}", tenant.session.token);
    assert_eq!(portal_get(&app, &cookie, "/portal").await.status(), 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_the_api_does_not_lock_the_tenants_admins_out_of_the_portal() {
    let app = TestApp::spawn_with(|config| config.unmetered_per_tenant_per_minute = 5).await;
    let cookie = portal_signup(&app).await;
    let token = cookie.split_once('=').unwrap().1.to_owned();
    // Whoever holds a credential of the tenant spends its API budget for unmetered routes.
    let mut limited = false;
    for _ in 0..20 {
        let response = app
            .http()
            .get(app.url("/v1/api-keys"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        limited |= response.status() == 429;
    }
    assert!(limited, "the tenant's API limit was reached");
    // The portal answers from each member's own budget.
    assert_eq!(portal_get(&app, &cookie, "/portal/keys").await.status(), 200);
}

/// The CSRF token in a portal page's forms.
pub(crate) async fn portal_csrf(app: &TestApp, cookie: &str) -> String {
    let html = portal_get(app, cookie, "/portal/billing")
        .await
        .text()
        .await
        .unwrap();
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a form with its CSRF token") + marker.len();
    html[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_stripe_mode_subscribing_goes_through_checkout_and_returns_to_the_billing_page() {
    use crate::billing::{stripe_app, stripe_prices};
    use plinth_tests::stripe_double::StripeDouble;

    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let cookie = portal_signup(&app).await;
    let csrf = portal_csrf(&app, &cookie).await;
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url("/portal/billing/plan"))
        .header("Cookie", &cookie)
        .header("Origin", app.url("").trim_end_matches('/'))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&plan=pro"))
        .send()
        .await
        .unwrap();
    // Off to Stripe's Checkout page; nothing changes until Stripe says it was paid.
    assert_eq!(response.status(), 303);
    let checkout = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        checkout.starts_with("https://checkout.stripe.test/"),
        "{checkout}"
    );
    let overview = portal_get(&app, &cookie, "/portal").await.text().await.unwrap();
    assert!(overview.contains("data-testid=\"plan\">Free<"), "{overview}");

    double.complete_checkout(&app.url(""), &checkout).await;
    // Stripe sends the browser back to the billing page, which says what happens next.
    let back = portal_get(&app, &cookie, "/portal/billing?checkout=success").await;
    assert_eq!(back.status(), 200);
    assert!(
        back.text()
            .await
            .unwrap()
            .contains("Your plan changes as soon as Stripe confirms")
    );
    let overview = portal_get(&app, &cookie, "/portal").await.text().await.unwrap();
    assert!(overview.contains("data-testid=\"plan\">Pro<"), "{overview}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_an_organisation_one_does_not_belong_to_is_a_404_and_keeps_the_session() {
    let app = TestApp::spawn().await;
    let cookie = portal_signup(&app).await;
    let stranger = app.tenant().await;
    let csrf = portal_csrf(&app, &cookie).await;
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url("/portal/switch"))
        .header("Cookie", &cookie)
        .header("Origin", app.url("").trim_end_matches('/'))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&tenant={}", stranger.session.tenant.id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(
        response.headers().get("set-cookie").is_none(),
        "no session is handed out"
    );
    let overview = portal_get(&app, &cookie, "/portal").await;
    assert_eq!(overview.status(), 200, "the visitor's own session still works");
    assert!(
        !overview
            .text()
            .await
            .unwrap()
            .contains(stranger.session.tenant.id.as_str())
    );
}

/// The installation page lists the installation's newest invocations, failures with what the plugin
/// logged; another tenant's installation is a 404 page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installation_page_lists_recent_invocations_with_their_logs() {
    let app = TestApp::spawn().await;
    let cookie = portal_signup(&app).await;
    let owner = app.client().with_token(cookie.split_once('=').unwrap().1);
    let (author, neighbour) = (app.tenant().await, app.tenant().await);
    // Published and approved (and installed by a neighbour) on the way.
    app.install_plugin(&author, &neighbour, "hostile", serde_json::json!({}))
        .await;
    let installed = plinth_tests::install_listed(&owner, "hostile").await;
    // Recording failures is switched on from the settings form (a checkbox).
    let csrf = portal_csrf(&app, &cookie).await;
    let saved = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url(&format!("/portal/plugins/{}/settings", installed.id)))
        .header("Cookie", &cookie)
        .header("Origin", app.url("").trim_end_matches('/'))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&settings=%7B%7D&secrets=&record_failures=on"))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 303);
    assert!(owner.installations().await.unwrap()[0].record_failures);
    owner
        .invoke(&installed.id, &serde_json::json!({ "do": "log-then-fail" }))
        .await
        .unwrap_err();
    let path = format!("/portal/plugins/{}", installed.id);
    let mut page = String::new();
    for _ in 0..100 {
        let response = portal_get(&app, &cookie, &path).await;
        assert_eq!(response.status(), 200);
        page = response.text().await.unwrap();
        if page.contains("about to fail on purpose") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        page.contains("Recent invocations") && page.contains("plugin_failed"),
        "{page}"
    );
    assert!(page.contains("about to fail on purpose"), "{page}");
    // What the plugin logged is shown as text, never run as markup.
    assert!(!page.contains("<script>alert(1)</script>"), "{page}");
    assert!(
        page.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{page}"
    );

    // The failure was recorded in full: its record downloads as a file to hand to the author.
    assert!(page.contains("record_failures\" checked"), "{page}");
    let record_path = format!("/portal/plugins/{}/invocations/", installed.id);
    let start = page.find(&record_path).expect("a download link");
    let link = page[start..].split('"').next().unwrap().to_owned();
    let download = portal_get(&app, &cookie, &link).await;
    assert_eq!(download.status(), 200);
    assert!(
        download.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;")
    );
    let record: plinth_sdk::RecordedInvocation = download.json().await.unwrap();
    assert_eq!(record.outcome, "plugin_failed");

    let theirs = neighbour.owner.installations().await.unwrap();
    let response = portal_get(&app, &cookie, &format!("/portal/plugins/{}", theirs[0].id)).await;
    assert_eq!(response.status(), 404);
    // Nor is anyone else's record there under this visitor's name.
    let elsewhere = link.replace(installed.id.as_str(), theirs[0].id.as_str());
    assert_eq!(portal_get(&app, &cookie, &elsewhere).await.status(), 404);
}

/// Dates chrono parses but no range can reach (the default start two weeks before, or the end's next
/// day, would overflow) are refused like any other bad date, not a panicking page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_page_refuses_dates_no_range_can_reach() {
    let app = TestApp::spawn().await;
    let cookie = portal_signup(&app).await;
    for query in [
        "to=-262143-01-01",
        "to=%2B262142-12-31",
        "from=0001-01-01&to=0001-01-02",
    ] {
        let response = portal_get(&app, &cookie, &format!("/portal/usage?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
    }
    assert_eq!(
        portal_get(&app, &cookie, "/portal/usage?from=2026-01-01&to=2026-01-31")
            .await
            .status(),
        200
    );
}
