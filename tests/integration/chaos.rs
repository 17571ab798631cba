//! The platform is killed (SIGKILL) and restarted over and over while clients make metered calls, each
//! retried with its Idempotency-Key until it succeeds, and while the usage sync pushes to Stripe.
//! Afterwards the ledger holds exactly one event per logical call, and Stripe's meters hold exactly the
//! ledger's totals.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use plinth_sdk::{Client, CreateApiKeyRequest, Scope, SignupRequest};
use plinth_server::Config;
use plinth_tests::stripe_double::{CALLS_METER, PLUGIN_FEES_PRICE, SECRET_KEY, StripeDouble, WEBHOOK_SECRET};
use plinth_tests::{PASSWORD, postgres_and_redis};
use tokio::process::{Child, Command};

use crate::billing::{metered_plan, stripe_prices};

/// The `plinth` binary `cargo test` built next to this test binary.
pub(crate) fn plinth_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("plinth");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test --workspace` builds it (plinth-server has integration tests)",
        bin.display()
    );
    bin
}

/// In production mode, points the `plinth` binary (through `env`) and this test's own store (through
/// `config`) at Postgres and Redis, in a schema and key prefix of their own; returns whether it did.
fn production_backend(prefix: &str, config: &mut Config, env: &mut Vec<(String, String)>) -> bool {
    let Some((database, redis)) = postgres_and_redis() else {
        return false;
    };
    let schema = format!("{prefix}_{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    env.push(("PLINTH_DATABASE_URL".into(), database.clone()));
    env.push(("PLINTH_DATABASE_SCHEMA".into(), schema.clone()));
    env.push(("PLINTH_REDIS_URL".into(), redis));
    env.push(("PLINTH_REDIS_PREFIX".into(), format!("plinth:{schema}:")));
    config.database_url = Some(database);
    config.database_schema = Some(schema);
    config.database_max_connections = 4;
    true
}

struct Platform {
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Platform {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(plinth_binary())
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no draining, no shutdown hooks.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(response) = http.get(format!("{base}/v2/health/ready")).send().await
            && response.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the platform did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_and_restarted_under_load_it_bills_each_call_once_and_stripe_gets_the_ledger() {
    const CLIENTS: usize = 3;
    const CALLS_PER_CLIENT: usize = 60;
    /// At least this many kills, and kills go on until the clients are done.
    const MIN_KILLS: usize = 6;

    let double = StripeDouble::start(stripe_prices()).await;
    let data = tempfile::tempdir().unwrap();
    let port = plinth_tests::unshared_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut config = Config {
        data_dir: data.path().to_path_buf(),
        ..Config::default()
    };
    let mut env: Vec<(String, String)> = vec![
        ("PLINTH_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
        ("PLINTH_DATA_DIR".into(), data.path().display().to_string()),
        ("PLINTH_WORKERS".into(), "2".into()),
        ("PLINTH_INFERENCE_SESSIONS".into(), "1".into()),
        ("PLINTH_LOG".into(), "warn".into()),
        ("PLINTH_STRIPE_SECRET_KEY".into(), SECRET_KEY.into()),
        ("PLINTH_STRIPE_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
        (
            "PLINTH_STRIPE_API_BASE".into(),
            format!("http://{}/", double.addr),
        ),
        (
            "PLINTH_STRIPE_PLAN_PRICES".into(),
            "metered=price_metered_flat/price_metered_calls".into(),
        ),
        ("PLINTH_STRIPE_PLUGIN_FEES_PRICE".into(), PLUGIN_FEES_PRICE.into()),
        ("PLINTH_BILLING_SYNC_INTERVAL_SECS".into(), "1".into()),
        ("PLINTH_BILLING_SYNC_BUCKET_SECS".into(), "1".into()),
        ("PLINTH_BILLING_SYNC_SETTLE_SECS".into(), "1".into()),
    ];
    if production_backend("chaos", &mut config, &mut env) {
        let key = plinth_tests::sealing_key();
        env.push(("PLINTH_SECRET_KEY".into(), key.clone()));
        config.secret_key = Some(key);
    }
    let mut platform = Platform {
        env,
        log: data.path().join("plinth.log"),
        child: None,
    };
    platform.spawn();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    wait_ready(&http, &base).await;

    // The operator's plan, and a tenant subscribed to it through Checkout.
    let store = plinth_server::open_store(&config).await.unwrap();
    store.upsert_plan(&metered_plan()).await.unwrap();
    let client = Client::new(&base).unwrap();
    let session = client
        .signup(&SignupRequest {
            email: format!("chaos-{}@example.com", ulid::Ulid::new()),
            password: PASSWORD.into(),
            tenant_name: "Chaos".into(),
        })
        .await
        .unwrap();
    let owner = client.clone().with_token(&session.token);
    let key = owner
        .create_api_key(&CreateApiKeyRequest {
            name: "load".into(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let checkout = owner.change_plan("metered").await.unwrap().checkout_url.unwrap();
    let subscription = double.complete_checkout(&base, &checkout).await;
    let customer = double.subscription(&subscription).unwrap().customer;

    // Clients: each logical call has one Idempotency-Key and is retried until it gets a 2xx.
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (http, base, secret) = (http.clone(), base.clone(), key.secret.clone());
        clients.push(tokio::spawn(async move {
            let (mut units, mut attempts) = (0_i64, 0_u64);
            for i in 0..CALLS_PER_CLIENT {
                let idempotency_key = format!("chaos-{c}-{i}-{}", ulid::Ulid::new());
                let items = 1 + (c + i) % 3;
                let body = serde_json::json!({ "inputs": vec!["steady as she goes"; items] });
                loop {
                    attempts += 1;
                    let sent = http
                        .post(format!("{base}/v1/models/sentiment/classify"))
                        .bearer_auth(&secret)
                        .header("Idempotency-Key", &idempotency_key)
                        .json(&body)
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                units += i64::try_from(items).unwrap();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            (units, attempts)
        }));
    }

    // Meanwhile: SIGKILL and restart at uneven intervals, for as long as the clients run.
    let started = Instant::now();
    let mut kills = 0;
    while kills < MIN_KILLS || clients.iter().any(|c| !c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(900 + 350 * (kills as u64 % 3))).await;
        platform.kill().await;
        kills += 1;
        platform.spawn();
        wait_ready(&http, &base).await;
    }
    let mut units = 0;
    let mut attempts = 0;
    for client in clients {
        let (u, a) = client.await.unwrap();
        units += u;
        attempts += a;
    }

    // The running platform's sync catches up with the ledger.
    let tenant = session.tenant.id.clone();
    let billing = plinth_server::billing(&config, store.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let reconciliation = loop {
        let reconciliation = billing.reconcile().await.unwrap();
        let calls = reconciliation
            .rows
            .iter()
            .find(|r| r.tenant_id == tenant.as_str() && r.meter == "calls")
            .cloned();
        if calls.as_ref().is_some_and(|r| r.sent == units && r.pending == 0) || Instant::now() > deadline {
            break reconciliation;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let logical_calls = (CLIENTS * CALLS_PER_CLIENT) as u64;
    let events = store.usage_event_count(&tenant).await.unwrap();
    let stripe_total = double.meter_total(CALLS_METER, &customer);
    let meter_events = double.meter_events().len();
    println!(
        "chaos: {logical_calls} logical calls ({attempts} attempts) over {:.1} s, {kills} kills; ledger {events} events \
         ({units} units); Stripe {meter_events} meter events totalling {stripe_total} units; \
         {} duplicate identifiers",
        started.elapsed().as_secs_f64(),
        double.duplicate_identifiers()
    );
    platform.kill().await;

    assert_eq!(events, logical_calls, "one ledger event per logical call");
    assert!(reconciliation.balanced, "{reconciliation:?}");
    assert_eq!(
        stripe_total, units,
        "Stripe's meter holds exactly the ledger's units"
    );
    assert_eq!(double.duplicate_identifiers(), 0);
    let statement_calls = billing.upcoming(&tenant).await.unwrap().calls;
    assert_eq!(statement_calls, units);
}

/// SIGTERM under load: readiness turns 503 at once while calls are still answered, then the process
/// finishes what it took in and exits 0. Every call answered 200 is in the ledger, and nothing else is:
/// no call is billed without its answer, and no answered call is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_turns_readiness_off_first_then_drains_without_losing_a_billed_call() {
    const CLIENTS: usize = 4;
    let data = tempfile::tempdir().unwrap();
    let port = plinth_tests::unshared_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut config = Config {
        data_dir: data.path().to_path_buf(),
        ..Config::default()
    };
    let mut env: Vec<(String, String)> = vec![
        ("PLINTH_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
        ("PLINTH_DATA_DIR".into(), data.path().display().to_string()),
        ("PLINTH_WORKERS".into(), "2".into()),
        ("PLINTH_INFERENCE_SESSIONS".into(), "1".into()),
        ("PLINTH_LOG".into(), "warn".into()),
        // Long beside answering a probe while clients keep the server busy.
        ("PLINTH_SHUTDOWN_DELAY_SECS".into(), "6".into()),
    ];
    if production_backend("drain", &mut config, &mut env) {
        let key = plinth_tests::sealing_key();
        env.push(("PLINTH_SECRET_KEY".into(), key.clone()));
        config.secret_key = Some(key);
    }
    let mut platform = Platform {
        env,
        log: data.path().join("plinth.log"),
        child: None,
    };
    platform.spawn();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    wait_ready(&http, &base).await;
    let client = Client::new(&base).unwrap();
    let session = client
        .signup(&SignupRequest {
            email: format!("drain-{}@example.com", ulid::Ulid::new()),
            password: PASSWORD.into(),
            tenant_name: "Drain".into(),
        })
        .await
        .unwrap();
    let store = plinth_server::open_store(&config).await.unwrap();
    // Calls as fast as the clients can send them: no rate limit in the way.
    plinth_tests::lift_rate_limits(&store, &session.tenant.id).await;
    let key = client
        .clone()
        .with_token(&session.token)
        .create_api_key(&CreateApiKeyRequest {
            name: "load".into(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();

    // Clients call until the server stops taking connections, counting the answers.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (http, base, secret) = (http.clone(), base.clone(), key.secret.clone());
        clients.push(tokio::spawn(async move {
            let (mut answered, mut refused) = (0_u64, Vec::new());
            loop {
                let sent = http
                    .post(format!("{base}/v1/models/sentiment/classify"))
                    .bearer_auth(&secret)
                    .json(&serde_json::json!({ "inputs": ["draining calmly"] }))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => answered += 1,
                    // The status and the body's error code, so a refusal says which limit it was.
                    Ok(response) => refused.push(format!(
                        "{} {}",
                        response.status().as_u16(),
                        response.text().await.unwrap_or_default()
                    )),
                    // The listener closed: this client is done.
                    Err(_) => return (answered, refused),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = platform.child.as_ref().unwrap().id().unwrap();
    let signalled = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    // Readiness is off well before the delay ends, while calls are still answered.
    let mut not_ready_after = None;
    while signalled.elapsed() < Duration::from_secs(4) {
        let ready = http.get(format!("{base}/v2/health/ready")).send().await.unwrap();
        if ready.status() == 503 {
            not_ready_after = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready_after = not_ready_after.expect("readiness answered 503 within 4 s of SIGTERM");
    let live = http.get(format!("{base}/v2/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200, "still serving during the delay");

    let mut child = platform.child.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the process exits after draining")
        .unwrap();
    let stopped_after = signalled.elapsed();
    let (mut answered, mut refused) = (0, Vec::new());
    for c in clients {
        let (a, r) = c.await.unwrap();
        answered += a;
        refused.extend(r);
    }
    let billed = store.usage_event_count(&session.tenant.id).await.unwrap();
    println!(
        "SIGTERM: readiness 503 after {:.0} ms, exited after {:.1} s; {answered} calls answered, {billed} billed, {} refused",
        not_ready_after.as_secs_f64() * 1e3,
        stopped_after.as_secs_f64(),
        refused.len()
    );
    assert!(status.success(), "exit status {status}");
    assert!(
        stopped_after >= Duration::from_secs(6),
        "it served on through the delay"
    );
    assert!(
        refused.is_empty(),
        "every call sent before the listener closed was answered: {refused:?}"
    );
    assert!(answered > 0);
    assert_eq!(billed, answered, "every answered call billed, and only those");
}

/// Two replicas with data directories of their own on one database (and Redis in production mode).
/// Clients send each logical call with one Idempotency-Key to either replica and, when it fails, retry on
/// the other, while one replica is killed (SIGKILL) and restarted again and again. Every logical call is
/// billed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_replicas_killing_one_under_load_bills_each_call_once() {
    const CLIENTS: usize = 3;
    const CALLS_PER_CLIENT: usize = 40;
    const KILLS: usize = 4;

    let shared = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..2).map(|_| plinth_tests::unshared_port()).collect();
    let bases: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let key = plinth_tests::sealing_key();
    let mut config = Config {
        data_dir: shared.path().to_path_buf(),
        secret_key: Some(key.clone()),
        ..Config::default()
    };
    let mut common: Vec<(String, String)> = vec![
        ("PLINTH_WORKERS".into(), "2".into()),
        ("PLINTH_INFERENCE_SESSIONS".into(), "1".into()),
        ("PLINTH_LOG".into(), "warn".into()),
        ("PLINTH_SECRET_KEY".into(), key),
    ];
    if !production_backend("pair", &mut config, &mut common) {
        let url = format!("sqlite:{}/plinth.db?mode=rwc", shared.path().display());
        common.push(("PLINTH_DATABASE_URL".into(), url.clone()));
        config.database_url = Some(url);
    }
    let data: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Platform> = (0..2)
        .map(|i| {
            let mut env = common.clone();
            env.push(("PLINTH_HTTP_ADDR".into(), format!("127.0.0.1:{}", ports[i])));
            env.push(("PLINTH_DATA_DIR".into(), data[i].path().display().to_string()));
            Platform {
                env,
                log: data[i].path().join("plinth.log"),
                child: None,
            }
        })
        .collect();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // One at a time: the first applies the migrations.
    for (replica, base) in replicas.iter_mut().zip(&bases) {
        replica.spawn();
        wait_ready(&http, base).await;
    }
    let client = Client::new(&bases[0]).unwrap();
    let session = client
        .signup(&SignupRequest {
            email: format!("pair-{}@example.com", ulid::Ulid::new()),
            password: PASSWORD.into(),
            tenant_name: "Pair".into(),
        })
        .await
        .unwrap();
    let store = plinth_server::open_store(&config).await.unwrap();
    plinth_tests::lift_rate_limits(&store, &session.tenant.id).await;
    let api_key = client
        .clone()
        .with_token(&session.token)
        .create_api_key(&CreateApiKeyRequest {
            name: "load".into(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (http, bases, secret) = (http.clone(), bases.clone(), api_key.secret.clone());
        clients.push(tokio::spawn(async move {
            let mut attempts = 0_usize;
            for i in 0..CALLS_PER_CLIENT {
                let idempotency_key = format!("pair-{c}-{i}-{}", ulid::Ulid::new());
                // Start on either replica; on a failure, retry on the other.
                let mut target = (c + i) % 2;
                loop {
                    attempts += 1;
                    let sent = http
                        .post(format!("{}/v1/models/sentiment/classify", bases[target]))
                        .bearer_auth(&secret)
                        .header("Idempotency-Key", &idempotency_key)
                        .json(&serde_json::json!({ "inputs": ["either replica will do"] }))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        break;
                    }
                    target = 1 - target;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            attempts
        }));
    }
    // Replica 0 is killed and restarted while replica 1 keeps serving.
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(700 + 300 * (kill as u64 % 2))).await;
        replicas[0].kill().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        replicas[0].spawn();
        wait_ready(&http, &bases[0]).await;
    }
    let mut attempts = 0;
    for client in clients {
        attempts += client.await.unwrap();
    }
    let logical = (CLIENTS * CALLS_PER_CLIENT) as u64;
    let events = store.usage_event_count(&session.tenant.id).await.unwrap();
    println!(
        "two replicas, {KILLS} kills of one: {logical} logical calls, {attempts} attempts, {events} ledger events"
    );
    for replica in &mut replicas {
        replica.kill().await;
    }
    assert_eq!(events, logical, "one ledger event per logical call");
}
