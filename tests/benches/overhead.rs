//! What the platform adds to a billable call, and how fast the ledger writes.
//!
//! For each backend (SQLite + memory always; Postgres + Redis when `PLINTH_TEST_DATABASE_URL` and
//! `PLINTH_TEST_REDIS_URL` are set) it starts a real server and measures, in one run:
//! - latency of `GET /v2/health/live` (no auth, no limit, no ledger: the HTTP baseline) and of
//!   `POST /v1/echo` (key verification + rate limit + durable usage event) at concurrency 1 and 64;
//!   the difference is the metering path's added latency;
//! - the ledger writer's throughput with many concurrent recorders (group commit), against the same
//!   events written one at a time (the baseline a naive ledger would have).
//!
//! Run: `cargo bench -p plinth-tests --bench overhead` (or `make bench`). The client runs in the same
//! process as the server, on the same cores; numbers are for comparison within one run.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use plinth_sdk::Micros;
use plinth_store::ledger::{LedgerSettings, Meter, UsageRecord};
use plinth_tests::{Backend, TestApp, postgres_and_redis};

const LATENCY_REQUESTS: usize = 4_000;
const LEDGER_EVENTS: usize = 40_000;
const LEDGER_RECORDERS: usize = 256;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Latency {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

async fn measure(concurrency: usize, request: impl Fn() -> reqwest::RequestBuilder + Sync) -> Latency {
    let per_task = LATENCY_REQUESTS / concurrency;
    // Warm up connections and caches.
    join_all((0..concurrency).map(|_| async {
        request()
            .send()
            .await
            .expect("request")
            .error_for_status()
            .expect("2xx")
    }))
    .await;
    let started = Instant::now();
    let samples = join_all((0..concurrency).map(|_| async {
        let mut samples = Vec::with_capacity(per_task);
        for _ in 0..per_task {
            let t = Instant::now();
            let response = request().send().await.expect("request");
            assert!(response.status().is_success(), "status {}", response.status());
            response.bytes().await.expect("body");
            samples.push(t.elapsed());
        }
        samples
    }))
    .await;
    let elapsed = started.elapsed();
    let mut all: Vec<Duration> = samples.into_iter().flatten().collect();
    all.sort();
    Latency {
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        per_second: all.len() as f64 / elapsed.as_secs_f64(),
    }
}

async fn http_overhead(app: &TestApp, key: &str) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .expect("client");
    let live = app.url("/v2/health/live");
    let echo = app.url("/v1/echo");
    println!(
        "  {:<28} {:>10} {:>10} {:>10}",
        "request (concurrency)", "p50 µs", "p99 µs", "req/s"
    );
    for concurrency in [1, 64] {
        let baseline = measure(concurrency, || http.get(&live)).await;
        let metered = measure(concurrency, || {
            http.post(&echo)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body("{\"ping\":1}")
        })
        .await;
        for (name, l) in [
            ("health/live (baseline)", &baseline),
            ("echo (metered)", &metered),
        ] {
            println!(
                "  {:<28} {:>10.0} {:>10.0} {:>10.0}",
                format!("{name} ({concurrency})"),
                us(l.p50),
                us(l.p99),
                l.per_second
            );
        }
        println!(
            "  => added by auth + rate limit + ledger at concurrency {concurrency}: p50 {:+.0} µs, p99 {:+.0} µs; throughput {:.2}x of baseline",
            us(metered.p50) - us(baseline.p50),
            us(metered.p99) - us(baseline.p99),
            metered.per_second / baseline.per_second
        );
    }
}

/// A verified key is served from the in-process cache: a SHA-256 and a map lookup.
async fn key_verification(app: &TestApp, key: &str) {
    let store = app.store();
    store.authenticate(key).await.expect("valid key");
    let rounds = 200_000;
    let started = Instant::now();
    for _ in 0..rounds {
        store.authenticate(key).await.expect("valid key");
    }
    let per_call = started.elapsed() / rounds;
    println!("  key verification, cached: {:.2} µs per call", us(per_call));
}

fn event(tenant: &plinth_sdk::TenantId, i: usize) -> UsageRecord {
    UsageRecord {
        tenant_id: tenant.clone(),
        api_key_id: None,
        resource_kind: "bench".to_owned(),
        resource_id: "ledger".to_owned(),
        units: 1,
        unit_price: Micros(400),
        author_share: Micros::ZERO,
        idempotency_key: format!("bench-{}-{i}", ulid::Ulid::new()),
        request_id: format!("req_bench_{i}"),
    }
}

async fn ledger_throughput(app: &TestApp, tenant: &plinth_sdk::TenantId) {
    let (meter, writer) = Meter::start(app.store().clone(), LedgerSettings::default());

    // Baseline: one event at a time, each its own INSERT and commit.
    let sequential = 1_000;
    let started = Instant::now();
    for i in 0..sequential {
        meter.record(event(tenant, i)).await.expect("record");
    }
    let one_by_one = sequential as f64 / started.elapsed().as_secs_f64();

    // Group commit: many recorders at once, as under load.
    let per_recorder = LEDGER_EVENTS / LEDGER_RECORDERS;
    let started = Instant::now();
    join_all((0..LEDGER_RECORDERS).map(|r| {
        let meter = meter.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            for i in 0..per_recorder {
                meter
                    .record(event(&tenant, r * per_recorder + i))
                    .await
                    .expect("record");
            }
        })
    }))
    .await;
    let grouped = (per_recorder * LEDGER_RECORDERS) as f64 / started.elapsed().as_secs_f64();
    drop(meter);
    writer.await.expect("writer");
    println!("  ledger, one event at a time:          {one_by_one:>9.0} events/s");
    println!(
        "  ledger, {LEDGER_RECORDERS} concurrent recorders:     {grouped:>9.0} events/s  ({:.1}x)",
        grouped / one_by_one
    );
}

async fn run(backend: Backend) {
    let app = TestApp::spawn_on(backend, |config| config.workers = 2).await;
    let tenant = app.tenant().await;
    // A plan whose limit is never reached: the limiter still runs on every call, which is what we measure.
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    println!("\n{backend:?}");
    key_verification(&app, &tenant.key.secret).await;
    http_overhead(&app, &tenant.key.secret).await;
    ledger_throughput(&app, &tenant.session.tenant.id).await;
    app.stop().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "Plinth metering overhead ({LATENCY_REQUESTS} requests per row, {} cores)",
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        run(Backend::SqliteMemory).await;
        if postgres_and_redis().is_some() {
            run(Backend::PostgresRedis).await;
        } else {
            println!(
                "\n(set PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL to measure Postgres + Redis too)"
            );
        }
    });
}
