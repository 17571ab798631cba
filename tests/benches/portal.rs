//! The portal's pages: weight and server render time. A tenant with keys and usage, and a platform
//! admin with fifty tenants to look after, fetch each main page in turn; for each page, in one run:
//! its HTML size, its weight on a first visit (HTML + stylesheet + script; nothing else loads), and
//! the server's time to answer p50/p95, beside `GET /v2/health/live` (the HTTP floor: no session, no
//! database) measured the same way.
//!
//! Run: `cargo bench -p plinth-tests --bench portal`. The client shares the machine with the server;
//! numbers are for comparing within one run.

use std::time::{Duration, Instant};

use plinth_tests::TestApp;

const FETCHES: usize = 200;
const TENANTS: usize = 50;
const CALLS: usize = 300;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Posts a portal form as a browser on the portal would; returns the session cookie it sets.
async fn portal_form(app: &TestApp, path: &str, fields: &[(&str, &str)]) -> String {
    let response = http()
        .post(app.url(path))
        .header("Origin", app.url("").trim_end_matches('/'))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(fields)
                .finish(),
        )
        .send()
        .await
        .expect("form");
    assert_eq!(response.status(), 303, "{path}");
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("__Host-plinth_session="))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

struct Measured {
    html: usize,
    p50: Duration,
    p95: Duration,
}

async fn measure(app: &TestApp, cookie: Option<&str>, path: &str) -> Measured {
    let client = http();
    let mut samples = Vec::with_capacity(FETCHES);
    let mut html = 0;
    for _ in 0..FETCHES {
        let mut request = client.get(app.url(path));
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        let started = Instant::now();
        let response = request.send().await.expect("page");
        assert_eq!(response.status(), 200, "{path}");
        html = response.bytes().await.expect("body").len();
        samples.push(started.elapsed());
    }
    samples.sort();
    Measured {
        html,
        p50: samples[FETCHES / 2],
        p95: samples[FETCHES * 95 / 100],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let app = TestApp::spawn_with(|config| config.unmetered_per_tenant_per_minute = 1_000_000).await;
    let password = "correct horse battery staple";
    let email = format!("bench-{}@example.com", ulid::Ulid::new());
    let tenant = portal_form(
        &app,
        "/portal/signup",
        &[
            ("tenant_name", "Bench Ltd"),
            ("email", &email),
            ("password", password),
        ],
    )
    .await;
    let token = tenant.split_once('=').expect("cookie").1.to_owned();
    app.lift_rate_limits(&app.store().authenticate(&token).await.expect("session").tenant_id)
        .await;
    let mut secret = String::new();
    for name in ["backend", "batch", "staging", "ci", "analytics"] {
        let created: serde_json::Value = http()
            .post(app.url("/v1/api-keys"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .expect("key")
            .json()
            .await
            .expect("key body");
        secret = created["secret"].as_str().expect("secret").to_owned();
    }
    for _ in 0..CALLS {
        let response = http()
            .post(app.url("/v1/models/sentiment/classify"))
            .bearer_auth(&secret)
            .json(&serde_json::json!({ "inputs": ["The numbers look good"] }))
            .send()
            .await
            .expect("classify");
        assert!(response.status().is_success());
    }
    for _ in 0..TENANTS {
        app.tenant().await;
    }
    let (admin_email, admin_password) = app.platform_admin_account().await;
    let admin = portal_form(
        &app,
        "/portal/login",
        &[("email", &admin_email), ("password", &admin_password)],
    )
    .await;

    let assets = {
        let mut bytes = 0;
        for asset in ["/portal/assets/portal.css", "/portal/assets/portal.js"] {
            bytes += http()
                .get(app.url(asset))
                .send()
                .await
                .expect("asset")
                .bytes()
                .await
                .expect("asset body")
                .len();
        }
        bytes
    };
    let floor = measure(&app, None, "/v2/health/live").await;
    println!(
        "{FETCHES} fetches per page, one at a time; {CALLS} calls in usage; {TENANTS} tenants in the directory"
    );
    println!(
        "floor: GET /v2/health/live p50 {:.2} ms, p95 {:.2} ms; stylesheet + script {:.1} KiB",
        ms(floor.p50),
        ms(floor.p95),
        assets as f64 / 1024.0
    );
    println!(
        "{:<24} {:>9} {:>15} {:>9} {:>9} {:>12}",
        "page", "HTML KiB", "first visit KiB", "p50 ms", "p95 ms", "p50 / floor"
    );
    let pages = [
        (&tenant, "/portal"),
        (&tenant, "/portal/keys"),
        (&tenant, "/portal/usage"),
        (&tenant, "/portal/billing"),
        (&tenant, "/portal/models"),
        (&tenant, "/portal/marketplace"),
        (&tenant, "/portal/plugins"),
        (&tenant, "/portal/members"),
        (&tenant, "/portal/author"),
        (&tenant, "/portal/author/plugins"),
        (&admin, "/portal/review"),
        (&admin, "/portal/admin/tenants"),
        (&admin, "/portal/admin/billing"),
    ];
    for (cookie, path) in pages {
        let page = measure(&app, Some(cookie), path).await;
        println!(
            "{:<24} {:>9.1} {:>15.1} {:>9.2} {:>9.2} {:>11.1}x",
            path,
            page.html as f64 / 1024.0,
            (page.html + assets) as f64 / 1024.0,
            ms(page.p50),
            ms(page.p95),
            page.p50.as_secs_f64() / floor.p50.as_secs_f64()
        );
    }
}
