//! Sentiment throughput and latency, in one run on this machine:
//! (a) the engine in-process (tokenize + ONNX Runtime, no HTTP) at batch 1 and 32, as served on a CPU
//!     (integer products) and with the base model's float products (its GPU graph);
//! (b) `POST /v1/models/sentiment/classify` with one text per request at concurrency 1, 16 and 64,
//!     batching on (max batch 32) and off (max batch 1); auth, rate limit and metering included;
//! (c) FastAPI + onnxruntime serving the same model (the baseline), when its virtualenv exists
//!     (`make bench` creates it).
//!
//! Run: `make bench` (or `cargo bench -p plinth-tests --bench inference`). Numbers are for comparing
//! within one run: the client (on its own thread and runtime) shares the machine with the servers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use plinth_inference::{Catalog, Engine, load_builtin};
use plinth_sdk::TenantId;
use plinth_tests::TestApp;

const TEXTS: [&str; 4] = [
    "I love this product",
    "this is terrible",
    "Shares plunged after the profit warning",
    "The meeting moved to Thursday",
];
const REQUESTS: usize = 3_000;

struct Measured {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn cache_dir() -> PathBuf {
    plinth_server::config::cache_dir()
}

/// The engine alone: the built-in `sentiment` as served on a CPU (integer products), or with
/// `float_products` its GPU graph run on the CPU (the base model's own float products), for comparison.
async fn in_process(batch: usize, float_products: bool) -> Measured {
    let config = plinth_server::Config::default();
    let engine = Engine::new(config.engine_settings()).expect("engine");
    let catalog = Catalog::default();
    load_builtin(&engine, &config.models_dir, &catalog).expect("models");
    let mut model = catalog.find(&TenantId::new(), "sentiment").expect("sentiment");
    if float_products {
        let info = model.info();
        model = engine
            .load(&plinth_inference::ModelFiles {
                name: info.name.clone(),
                version: 1,
                task: info.task,
                labels: info.labels.clone(),
                model: config.models_dir.join("sentiment.gpu.onnx"),
                tokenizer: Some(config.models_dir.join("tokenizer.json")),
                platform: true,
            })
            .expect("the float graph loads");
    }
    let rounds = (REQUESTS / batch).max(50);
    let mut samples = Vec::with_capacity(rounds);
    let started = Instant::now();
    for round in 0..rounds {
        // The same rotation of texts as the HTTP runs send, so both do the same work.
        let texts: Vec<String> = (0..batch)
            .map(|i| TEXTS[(round + i) % TEXTS.len()].to_owned())
            .collect();
        let t = Instant::now();
        model
            .classify(plinth_inference::Share::platform(), texts)
            .await
            .expect("classify");
        samples.push(t.elapsed());
    }
    summarise(samples, (rounds * batch) as f64 / started.elapsed().as_secs_f64())
}

fn summarise(mut samples: Vec<Duration>, per_second: f64) -> Measured {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Measured {
        per_second,
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// Drives `url` from a thread and runtime of its own, as an external client would: running the client
/// on the server's runtime would charge the client's work to the server.
async fn over_http(
    url: &str,
    key: Option<&str>,
    concurrency: usize,
    body: fn(usize) -> serde_json::Value,
) -> Measured {
    let (url, key) = (url.to_owned(), key.map(ToOwned::to_owned));
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime")
            .block_on(load(&url, key.as_deref(), concurrency, body))
    })
    .await
    .expect("client thread")
}

/// A task request: one of the short texts.
fn text_body(i: usize) -> serde_json::Value {
    serde_json::json!({ "inputs": [TEXTS[i % TEXTS.len()]] })
}

/// An Open Inference Protocol request: one text's tokens (seven, the ids varying), for `probs`.
fn tensor_body(i: usize) -> serde_json::Value {
    let ids = [
        101,
        2_000 + i64::try_from(i % 500).unwrap_or(0),
        2_023,
        2_003,
        1_037,
        2_204,
        102,
    ];
    let input = |name: &str, data: &[i64]| serde_json::json!({ "name": name, "shape": [1, data.len()], "datatype": "INT64", "data": data });
    serde_json::json!({
        "inputs": [input("input_ids", &ids), input("attention_mask", &[1; 7]), input("token_type_ids", &[0; 7])],
        "outputs": [{ "name": "probs" }],
    })
}

async fn load(
    url: &str,
    key: Option<&str>,
    concurrency: usize,
    body: fn(usize) -> serde_json::Value,
) -> Measured {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(128)
        .build()
        .expect("client");
    let request = |i: usize| {
        let mut request = http.post(url).json(&body(i));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request
    };
    join_all((0..concurrency).map(|i| async move {
        request(i)
            .send()
            .await
            .expect("warm-up")
            .error_for_status()
            .expect("2xx")
    }))
    .await;
    let per_task = REQUESTS / concurrency;
    let started = Instant::now();
    let samples = join_all((0..concurrency).map(|c| async move {
        let mut samples = Vec::with_capacity(per_task);
        for i in 0..per_task {
            let t = Instant::now();
            let response = request(c + i).send().await.expect("request");
            assert!(response.status().is_success(), "status {}", response.status());
            response.bytes().await.expect("body");
            samples.push(t.elapsed());
        }
        samples
    }))
    .await;
    let samples: Vec<Duration> = samples.into_iter().flatten().collect();
    let count = samples.len();
    summarise(samples, count as f64 / started.elapsed().as_secs_f64())
}

fn row(name: &str, m: &Measured) {
    println!(
        "  {name:<44} {:>9.0} {:>9.0} {:>9.0}",
        m.per_second,
        m.p50.as_secs_f64() * 1e6,
        m.p99.as_secs_f64() * 1e6
    );
}

async fn plinth_api(max_batch: usize) -> (TestApp, String) {
    let app = TestApp::spawn_on(plinth_tests::Backend::SqliteMemory, |config| {
        config.max_batch = max_batch;
        config.inference_sessions = 2;
    })
    .await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    (app, tenant.key.secret)
}

fn fastapi_python() -> Option<PathBuf> {
    let python = std::env::var_os("PLINTH_BENCH_PYTHON")
        .map_or_else(|| cache_dir().join("venv-bench/bin/python"), PathBuf::from);
    python.is_file().then_some(python)
}

async fn fastapi(concurrencies: &[usize]) -> Vec<(usize, Measured)> {
    let Some(python) = fastapi_python() else {
        println!("  (FastAPI baseline skipped: run `make bench` to create its virtualenv)");
        return Vec::new();
    };
    let port = plinth_tests::unshared_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseline/fastapi_server.py");
    let mut child = tokio::process::Command::new(python)
        .args([
            script,
            &cache_dir().join("models").display().to_string(),
            &port.to_string(),
            "2",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("FastAPI starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if http.get(format!("{base}/health")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut results = Vec::new();
    for &c in concurrencies {
        results.push((
            c,
            over_http(&format!("{base}/classify"), None, c, text_body).await,
        ));
    }
    let _ = child.kill().await;
    results
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "Sentiment (MiniLM-L6 int8 + head), short texts, {} cores",
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        println!("  {:<44} {:>9} {:>9} {:>9}", "", "texts/s", "p50 µs", "p99 µs");
        let raw1 = in_process(1, false).await;
        row("(a) engine in-process, batch 1", &raw1);
        let raw32 = in_process(32, false).await;
        row("(a) engine in-process, batch 32", &raw32);
        let float1 = in_process(1, true).await;
        row("(a) the same, float products, batch 1", &float1);
        let float32 = in_process(32, true).await;
        row("(a) the same, float products, batch 32", &float32);

        let concurrencies = [1, 16, 64];
        let mut best_api: f64 = 0.0;
        let mut api_c1 = None;
        let mut tensors_at_64 = Vec::new();
        for (label, max_batch) in [("batching on", 32), ("batching off", 1)] {
            let (app, key) = plinth_api(max_batch).await;
            let url = app.url("/v1/models/sentiment/classify");
            for &c in &concurrencies {
                let m = over_http(&url, Some(&key), c, text_body).await;
                row(&format!("(b) Plinth API, {label}, concurrency {c}"), &m);
                if max_batch > 1 {
                    best_api = best_api.max(m.per_second);
                    if c == 1 {
                        api_c1 = Some(m.p50);
                    }
                }
            }
            let url = app.url("/v2/models/sentiment/infer");
            for c in [16, 64] {
                let m = over_http(&url, Some(&key), c, tensor_body).await;
                row(&format!("(b) /v2 tensors, {label}, concurrency {c}"), &m);
                if c == 64 {
                    tensors_at_64.push(m.per_second);
                }
            }
            app.stop().await;
        }
        let baseline = fastapi(&concurrencies).await;
        for (c, m) in &baseline {
            row(&format!("(c) FastAPI + onnxruntime, concurrency {c}"), m);
        }

        println!();
        if let Some(p50) = api_c1 {
            println!(
                "  API p50 overhead over the in-process engine at concurrency 1: {:+.0} µs",
                (p50.as_secs_f64() - raw1.p50.as_secs_f64()) * 1e6
            );
        }
        println!(
            "  integer products / float products, in-process texts/s: batch 1 {:.2}x, batch 32 {:.2}x",
            raw1.per_second / float1.per_second,
            raw32.per_second / float32.per_second
        );
        if let [on, off] = tensors_at_64[..] {
            println!(
                "  /v2 tensor calls at concurrency 64, batching on / off: {:.2}x",
                on / off
            );
        }
        println!(
            "  best API throughput / in-process batch-32 throughput: {:.2}",
            best_api / raw32.per_second
        );
        if let Some(best_baseline) = baseline.iter().map(|(_, m)| m.per_second).reduce(f64::max) {
            println!(
                "  best API throughput / best FastAPI throughput: {:.2}",
                best_api / best_baseline
            );
        }
    });
}
