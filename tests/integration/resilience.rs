//! Redis is stopped in the middle of traffic and started again, in production mode (Postgres + a Redis
//! of the test's own). The documented policy: nothing answers 5xx for it, rate limits hold per replica
//! while Redis is away, readiness stays green, and the shared limits resume without a restart.

use std::process::Stdio;
use std::time::{Duration, Instant};

use plinth_sdk::{CreateApiKeyRequest, LoginRequest, Scope};
use plinth_tests::{Backend, PASSWORD, TestApp, postgres_and_redis};
use tokio::process::{Child, Command};

/// A Redis server on a port of its own, without persistence.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = plinth_tests::unshared_port();
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                // `DEBUG SLEEP` plays a Redis that hangs.
                "--enable-debug-command",
                "local",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (production-mode tests need it on the PATH)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.keys().await.is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many keys Redis holds, or `None` when it does not answer.
    async fn keys(&self) -> Option<u64> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "DBSIZE"])
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&output.stdout).trim().parse().ok()
    }
}

/// Every kind of call a tenant makes, once: a metered model call, a listing, a login, a sign-up.
/// Returns their statuses.
async fn traffic(app: &TestApp, key: &str, email: &str) -> Vec<u16> {
    let http = app.http();
    let mut statuses = Vec::new();
    let classify = http
        .post(app.url("/v1/models/sentiment/classify"))
        .bearer_auth(key)
        .json(&serde_json::json!({ "inputs": ["Profits doubled"] }))
        .send()
        .await
        .unwrap();
    statuses.push(classify.status().as_u16());
    let listing = http
        .get(app.url("/v1/api-keys"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    statuses.push(listing.status().as_u16());
    let login = app
        .client()
        .login(&LoginRequest {
            email: email.to_owned(),
            password: PASSWORD.to_owned(),
            tenant_id: None,
        })
        .await;
    statuses.push(if login.is_ok() { 200 } else { 500 });
    let signup = http
        .post(app.url("/v1/signup"))
        .json(&serde_json::json!({
            "email": format!("{}@example.com", ulid::Ulid::new().to_string().to_ascii_lowercase()),
            "password": PASSWORD,
            "tenant_name": "Later",
        }))
        .send()
        .await
        .unwrap();
    statuses.push(signup.status().as_u16());
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_mid_traffic_costs_no_errors_and_limits_resume_without_a_restart() {
    if postgres_and_redis().is_none() {
        // Production mode only: the embedded mode has no Redis to lose.
        return;
    }
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = TestApp::spawn_on(Backend::PostgresRedis, |config| config.redis_url = Some(url)).await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let email = tenant.session.user.email.clone();
    let narrow = tenant
        .owner
        .create_api_key(&CreateApiKeyRequest {
            name: "narrow".to_owned(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: Some(12),
            expires_at: None,
        })
        .await
        .unwrap();
    let classify_with = |key: String| {
        let (http, url) = (app.http(), app.url("/v1/models/sentiment/classify"));
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({ "inputs": ["Profits doubled"] }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // A round of traffic with Redis up: what the rounds below are measured against (a busy
    // machine slows both alike).
    let quiet = Instant::now();
    assert!(
        traffic(&app, &tenant.key.secret, &email)
            .await
            .iter()
            .all(|s| (200..300).contains(s))
    );
    let quiet_round = quiet.elapsed();
    assert!(
        redis.keys().await.unwrap() > 0,
        "limits are kept in Redis while it is up"
    );

    redis.kill().await;
    let outage = Instant::now();
    for _ in 0..10 {
        let statuses = traffic(&app, &tenant.key.secret, &email).await;
        assert!(
            statuses.iter().all(|s| (200..300).contains(s)),
            "during the outage: {statuses:?}"
        );
    }
    // Each failed attempt at Redis is cut short and then skipped for a while: ten rounds take about
    // ten quiet ones, nowhere near 40 Redis timeouts (10 s) more.
    assert!(
        outage.elapsed() < quiet_round * 20 + Duration::from_secs(3),
        "{:?}, where a quiet round took {quiet_round:?}",
        outage.elapsed()
    );
    // Limits still hold, per replica: the narrow key (12 a minute, 2 at once) gets two calls and then 429.
    let narrow_statuses = [
        classify_with(narrow.secret.clone()).await,
        classify_with(narrow.secret.clone()).await,
        classify_with(narrow.secret.clone()).await,
    ];
    assert_eq!(narrow_statuses, [200, 200, 429]);
    let ready = app.http().get(app.url("/v2/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "readiness does not depend on Redis");

    redis.restart().await;
    assert_eq!(
        redis.keys().await,
        Some(0),
        "a fresh Redis, without the old limits"
    );
    let back = Instant::now() + Duration::from_secs(15);
    loop {
        let statuses = traffic(&app, &tenant.key.secret, &email).await;
        assert!(
            statuses.iter().all(|s| (200..300).contains(s)),
            "after the outage: {statuses:?}"
        );
        if redis.keys().await.unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < back, "the replica never went back to Redis");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A Redis that hangs rather than refuses: each command would wait its 250 ms, but the replica
    // notices once, goes on with its own limiter, and lets one request at a time try Redis again.
    // Forty calls with Redis answering first, to measure against.
    let quiet = Instant::now();
    for _ in 0..40 {
        assert_eq!(classify_with(tenant.key.secret.clone()).await, 200);
    }
    let quiet = quiet.elapsed();
    let hang = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "4"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hanging = Instant::now();
    for _ in 0..40 {
        assert_eq!(classify_with(tenant.key.secret.clone()).await, 200);
    }
    // Forty calls that each waited for Redis would take ten seconds more than those above.
    assert!(
        hanging.elapsed() < quiet * 2 + Duration::from_secs(3),
        "{:?}, where forty with Redis answering took {quiet:?}",
        hanging.elapsed()
    );
    drop(hang);
    app.stop().await;
}
