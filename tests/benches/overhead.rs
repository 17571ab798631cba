//! What the platform adds to a billable call, and how fast the ledger writes.
//!
//! For each backend (SQLite + memory always; Postgres + Redis when `PLINTH_TEST_DATABASE_URL` and
//! `PLINTH_TEST_REDIS_URL` are set) it starts a real server and measures, in one run:
//! - each part of the metered path called directly (cached key verification, the rate limiter, a
//!   database round trip, one durable ledger event) beside the database's own floor, a one-column
//!   insert committed alone: the ledger cannot be faster than the disk's sync;
//! - latency of `GET /v2/health/live` (no auth, no limit, no ledger: the HTTP baseline) and of
//!   `POST /v1/echo` (key verification + rate limit + durable usage event) at concurrency 1 and 64;
//!   the difference is the metering path's added latency; then echo with a fresh `Idempotency-Key`
//!   per call (the request is claimed and its answer stored) and with one key repeated (every call
//!   after the first is a stored replay);
//! - the ledger writer's throughput with many concurrent recorders (group commit), against the same
//!   events written one at a time (the baseline a naive ledger would have).
//!
//! Run: `cargo bench -p plinth-tests --bench overhead` (or `make bench`). The HTTP client runs in the
//! same process on a thread and runtime of its own, sharing the cores with the server (and, here, with
//! the databases); numbers are for comparison within one run.

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

/// How a call uses `Idempotency-Key`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keyed {
    No,
    /// A fresh key per call: each is claimed, run and its answer stored.
    Fresh,
    /// One key for every call: the first runs, the rest are stored replays.
    Repeated,
}

/// One request of the load: `GET url`, or `POST url` with a JSON body and a bearer key.
#[derive(Clone)]
struct Call {
    url: String,
    key: Option<String>,
    body: Option<&'static str>,
    keyed: Keyed,
}

impl Call {
    fn request(&self, http: &reqwest::Client) -> reqwest::RequestBuilder {
        let Some(body) = self.body else {
            return http.get(&self.url);
        };
        let mut request = http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        match self.keyed {
            Keyed::No => request,
            Keyed::Fresh => request.header("Idempotency-Key", ulid::Ulid::new().to_string()),
            Keyed::Repeated => request.header("Idempotency-Key", "bench-replayed"),
        }
    }
}

/// Drives `call` from a thread and runtime of its own, as an external client would: on the server's
/// runtime the client's work would be charged to the server and its wake-ups would mix with the
/// server's.
async fn measure(concurrency: usize, call: Call) -> Latency {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime")
            .block_on(load(concurrency, &call))
    })
    .await
    .expect("client thread")
}

async fn load(concurrency: usize, call: &Call) -> Latency {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .expect("client");
    let per_task = LATENCY_REQUESTS / concurrency;
    // Warm up connections and caches.
    join_all((0..concurrency).map(|_| async {
        call.request(&http)
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
            let response = call.request(&http).send().await.expect("request");
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
    let live = Call {
        url: app.url("/v2/health/live"),
        key: None,
        body: None,
        keyed: Keyed::No,
    };
    let echo = Call {
        url: app.url("/v1/echo"),
        key: Some(key.to_owned()),
        body: Some("{\"ping\":1}"),
        keyed: Keyed::No,
    };
    let keyed = Call {
        keyed: Keyed::Fresh,
        ..echo.clone()
    };
    let replayed = Call {
        keyed: Keyed::Repeated,
        ..echo.clone()
    };
    println!(
        "  {:<28} {:>10} {:>10} {:>10}",
        "request (concurrency)", "p50 µs", "p99 µs", "req/s"
    );
    for concurrency in [1, 64] {
        let baseline = measure(concurrency, live.clone()).await;
        let metered = measure(concurrency, echo.clone()).await;
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
        let stored = measure(concurrency, keyed.clone()).await;
        let replay = measure(concurrency, replayed.clone()).await;
        for (name, l) in [("echo, keyed (stored)", &stored), ("echo, replayed", &replay)] {
            println!(
                "  {:<28} {:>10.0} {:>10.0} {:>10.0}",
                format!("{name} ({concurrency})"),
                us(l.p50),
                us(l.p99),
                l.per_second
            );
        }
        println!(
            "  => a keyed call (claim + stored answer) adds p50 {:+.0} µs to an unkeyed one ({:.2}x its throughput); a replay costs p50 {:+.0} µs against an unkeyed call ({:.2}x its throughput)",
            us(stored.p50) - us(metered.p50),
            stored.per_second / metered.per_second,
            us(replay.p50) - us(metered.p50),
            replay.per_second / metered.per_second
        );
    }
}

/// Median of `rounds` sequential calls of `call`, after one warm-up call.
async fn median_of<F: Future<Output = ()>>(rounds: usize, mut call: impl FnMut(usize) -> F) -> Duration {
    call(usize::MAX).await;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        call(i).await;
        samples.push(t.elapsed());
    }
    samples.sort();
    percentile(&samples, 0.5)
}

/// Where the metered path's time goes, one part at a time, each called directly (no HTTP) at
/// concurrency 1: key verification (cached), the rate limiter, a database round trip and the ledger's
/// durable write of one event.
async fn components(app: &TestApp, key: &str, tenant: &plinth_sdk::TenantId) {
    let store = app.store();
    let verify = median_of(20_000, |_| async {
        store.authenticate(key).await.expect("valid key");
    })
    .await;
    let config = &app.config;
    let cache = plinth_store::cache::connect(config.redis_url.as_deref(), &config.redis_prefix)
        .await
        .expect("cache");
    let quota = plinth_store::cache::Quota {
        per_minute: plinth_store::cache::MAX_PER_MINUTE,
        burst: 1_000_000,
    };
    let limit = median_of(2_000, |_| async {
        cache.rate_limit("bench", quota).await.expect("rate limit");
    })
    .await;
    let round_trip = median_of(2_000, |_| async { store.ping().await.expect("ping") }).await;
    let (meter, writer) = Meter::start(store.clone(), LedgerSettings::default());
    let ledger = median_of(1_000, |i| {
        let meter = meter.clone();
        let event = event(tenant, i);
        async move {
            meter.record(event).await.expect("record");
        }
    })
    .await;
    drop(meter);
    writer.await.expect("writer");
    let floor = commit_floor(app).await;
    println!("  p50 of each part, called directly at concurrency 1:");
    println!("    key verification (cached)      {:>9.1} µs", us(verify));
    println!("    rate limit check               {:>9.1} µs", us(limit));
    println!("    database round trip (ping)     {:>9.1} µs", us(round_trip));
    println!("    ledger, one durable event      {:>9.1} µs", us(ledger));
    println!(
        "    (the database's own floor: a one-column INSERT committed on its own connection {:.1} µs)",
        us(floor)
    );
}

/// What one durable commit costs on this database and disk, whatever the platform does: a one-column
/// `INSERT` committed alone, over a connection of its own, with the platform's durability settings.
async fn commit_floor(app: &TestApp) -> Duration {
    use sea_orm::ConnectionTrait;
    let config = &app.config;
    let (url, table) = match (&config.database_url, &config.database_schema) {
        (Some(url), Some(schema)) => (url.clone(), format!("\"{schema}\".commit_floor")),
        (Some(url), None) => (url.clone(), "commit_floor".to_owned()),
        (None, _) => (
            format!("sqlite://{}", config.data_dir.join("plinth.db").display()),
            "commit_floor".to_owned(),
        ),
    };
    let db = sea_orm::Database::connect(url).await.expect("database");
    if db.get_database_backend() == sea_orm::DbBackend::Sqlite {
        // As the store opens SQLite: WAL, and every commit synced.
        db.execute_unprepared("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL")
            .await
            .expect("pragmas");
    }
    db.execute_unprepared(&format!("CREATE TABLE {table} (n BIGINT)"))
        .await
        .expect("table");
    let insert = format!("INSERT INTO {table} (n) VALUES (1)");
    let floor = median_of(1_000, |_| {
        let (db, insert) = (&db, &insert);
        async move {
            db.execute_unprepared(insert).await.expect("insert");
        }
    })
    .await;
    db.execute_unprepared(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
    db.close().await.expect("close");
    floor
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

    // Group commit: many recorders at once, as under load. Each recorder's wait is timed too: a slow
    // commit (a WAL checkpoint, say) is one commit of many but holds every call waiting on it.
    let per_recorder = LEDGER_EVENTS / LEDGER_RECORDERS;
    let started = Instant::now();
    let waits = join_all((0..LEDGER_RECORDERS).map(|r| {
        let meter = meter.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            let mut waits = Vec::with_capacity(per_recorder);
            for i in 0..per_recorder {
                let recording = Instant::now();
                meter
                    .record(event(&tenant, r * per_recorder + i))
                    .await
                    .expect("record");
                waits.push(recording.elapsed());
            }
            waits
        })
    }))
    .await;
    let grouped = (per_recorder * LEDGER_RECORDERS) as f64 / started.elapsed().as_secs_f64();
    let mut waits: Vec<Duration> = waits
        .into_iter()
        .flat_map(|recorder| recorder.expect("recorder"))
        .collect();
    waits.sort();
    drop(meter);
    writer.await.expect("writer");
    println!("  ledger, one event at a time:          {one_by_one:>9.0} events/s");
    println!(
        "  ledger, {LEDGER_RECORDERS} concurrent recorders:     {grouped:>9.0} events/s  ({:.1}x)",
        grouped / one_by_one
    );
    println!(
        "  ledger, each of those events' wait:   p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        us(percentile(&waits, 0.5)) / 1e3,
        us(percentile(&waits, 0.99)) / 1e3,
        us(percentile(&waits, 0.999)) / 1e3,
        us(percentile(&waits, 1.0)) / 1e3
    );
}

async fn run(backend: Backend) {
    let app = TestApp::spawn_on(backend, |config| config.workers = 2).await;
    let tenant = app.tenant().await;
    // A plan whose limit is never reached: the limiter still runs on every call, which is what we measure.
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    println!("\n{backend:?}");
    components(&app, &tenant.key.secret, &tenant.session.tenant.id).await;
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
