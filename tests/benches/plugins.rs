//! Plugin overhead, in one run on this machine:
//! (a) inside the host: a fresh instance + call of the trivial Rust plugin (`hello`), the JavaScript
//!     template (`hello-js`) and the Python one (`ticket-triage`), p50/p99, against the same host
//!     running nothing (an empty async call);
//! (b) over HTTP at concurrency 1: invoking `hello` against the metered no-op `/v1/echo`, i.e. what a
//!     plugin adds to a billed call;
//! (c) a plugin making one model call (`hostile` in its `model` mode) against calling the model
//!     directly: what the plugin path adds to inference;
//! (d) a storm: one tenant keeps 32 busy-looping plugin invocations running while another tenant calls
//!     a model at concurrency 1; that tenant's latency during the storm against the same calls when
//!     all is quiet (the goal: p50 within 2x).
//!
//! Run: `cargo bench -p plinth-tests --bench plugins` (after `scripts/build-plugins.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use plinth_plugin_host::{CallContext, HostSettings, NoServices, PluginHost, Services};
use plinth_tests::{TestApp, built_plugin};
use serde_json::json;

const ROUNDS: usize = 2_000;

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn row(name: &str, (p50, p99): (f64, f64)) {
    println!("  {name:<52} {p50:>9.1} {p99:>9.1}");
}

async fn timed<F: Future<Output = ()>>(rounds: usize, mut call: impl FnMut(usize) -> F) -> Vec<Duration> {
    for i in 0..20 {
        call(i).await;
    }
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let started = Instant::now();
        call(i).await;
        samples.push(started.elapsed());
    }
    samples
}

async fn in_host() {
    let host = PluginHost::new(&HostSettings::default()).expect("host");
    let (_, component) = built_plugin("hello");
    let compiled = host.compile(component).await.expect("compile");
    let call = Arc::new(CallContext {
        tenant_id: plinth_core::id::TenantId::new(),
        installation_id: "bench".into(),
        instances: 64,
        paying: true,
        plugin: "hello".into(),
        granted_models: Vec::new(),
        settings: serde_json::Map::new(),
        secrets: Default::default(),
        idempotency_key: "bench".into(),
    });
    let services: Arc<dyn Services> = Arc::new(NoServices);
    let baseline = timed(ROUNDS, |_| async { tokio::task::yield_now().await }).await;
    let invocations = timed(ROUNDS, |_| {
        let (host, compiled, call, services) = (&host, compiled.clone(), call.clone(), services.clone());
        async move {
            host.invoke(compiled, call, services, r#"{"name":"bench"}"#.to_owned())
                .await
                .expect("invoke");
        }
    })
    .await;
    // The Python plugin, answering an empty request with its typed error (no model call).
    let (_, component) = built_plugin("ticket-triage");
    let python = host.compile(component).await.expect("compile");
    let python_invocations = timed(ROUNDS / 4, |_| {
        let (host, python, call, services) = (&host, python.clone(), call.clone(), services.clone());
        async move {
            let refused = host.invoke(python, call, services, "{}".to_owned()).await;
            assert!(
                matches!(refused, Err(plinth_plugin_host::InvokeError::Rejected(_))),
                "{refused:?}"
            );
        }
    })
    .await;
    // The JavaScript template (componentize-js, StarlingMonkey), greeting: a whole call.
    let (_, component) = built_plugin("hello-js");
    let javascript = host.compile(component).await.expect("compile");
    let javascript_invocations = timed(ROUNDS / 4, |_| {
        let (host, javascript, call, services) = (&host, javascript.clone(), call.clone(), services.clone());
        async move {
            host.invoke(javascript, call, services, r#"{"name":"bench"}"#.to_owned())
                .await
                .expect("invoke");
        }
    })
    .await;
    println!("(a) inside the host                                      p50 (us)  p99 (us)");
    row("baseline: an empty async call", percentiles(baseline));
    row(
        "hello (Rust): new instance + call (fuel, epoch, limits)",
        percentiles(invocations),
    );
    row(
        "ticket-triage (Python): new instance + call",
        percentiles(python_invocations),
    );
    row(
        "hello-js (JavaScript): new instance + call",
        percentiles(javascript_invocations),
    );
}

async fn over_http() {
    let app = TestApp::spawn_on(plinth_tests::Backend::SqliteMemory, |_| {}).await;
    let author = app.tenant().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let hello = app.install_plugin(&author, &tenant, "hello", json!({})).await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let http = reqwest::Client::new();
    let post = |path: String, body: serde_json::Value| {
        let request = http
            .post(app.url(&path))
            .bearer_auth(&tenant.key.secret)
            .json(&body);
        async move {
            let response = request.send().await.expect("request");
            assert!(response.status().is_success(), "{}", response.status());
            response.bytes().await.expect("body");
        }
    };
    let rounds = ROUNDS / 2;
    let echo = timed(rounds, |_| post("/v1/echo".into(), json!({"name": "bench"}))).await;
    let plugin = timed(rounds, |_| {
        post(
            format!("/v1/installations/{}/invoke", hello.id),
            json!({"name": "bench"}),
        )
    })
    .await;
    println!("(b) over HTTP, concurrency 1, SQLite                       p50 (us)  p99 (us)");
    row("POST /v1/echo (metered no-op; baseline)", percentiles(echo));
    row(
        "invoke hello (metered at the plugin's price)",
        percentiles(plugin),
    );
    let text = json!({ "inputs": ["is this allowed?"] });
    let direct = timed(rounds / 2, |_| {
        post("/v1/models/sentiment/classify".into(), text.clone())
    })
    .await;
    let through = timed(rounds / 2, |_| {
        post(
            format!("/v1/installations/{}/invoke", hostile.id),
            json!({"do": "model", "model": "sentiment"}),
        )
    })
    .await;
    println!("(c) one sentiment call                                     p50 (us)  p99 (us)");
    row("direct: POST /v1/models/sentiment/classify", percentiles(direct));
    row(
        "through a plugin (invoke + host call + classify)",
        percentiles(through),
    );
    app.stop().await;
}

async fn storm() {
    let app = TestApp::spawn_on(plinth_tests::Backend::SqliteMemory, |config| {
        config.plugin_deadline_ms = 2_000;
    })
    .await;
    let author = app.tenant().await;
    let noisy = app.tenant().await;
    let quiet = app.tenant().await;
    app.lift_rate_limits(&noisy.session.tenant.id).await;
    app.lift_rate_limits(&quiet.session.tenant.id).await;
    let hostile = app.install_plugin(&author, &noisy, "hostile", json!({})).await;
    let http = reqwest::Client::new();
    let classify = || {
        let request = http
            .post(app.url("/v1/models/sentiment/classify"))
            .bearer_auth(&quiet.key.secret)
            .json(&json!({ "inputs": ["the quarter beat expectations"] }));
        async move {
            let response = request.send().await.expect("request");
            assert!(response.status().is_success(), "{}", response.status());
        }
    };
    // About three deadlines' worth of calls: the storm's instances turn over during the measurement.
    let rounds = 1_000;
    let alone = timed(rounds, |_| classify()).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let invocations = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let url = app.url(&format!("/v1/installations/{}/invoke", hostile.id));
    let flood: Vec<_> = (0..32)
        .map(|_| {
            let (http, url, secret) = (http.clone(), url.clone(), noisy.key.secret.clone());
            let (stop, invocations) = (stop.clone(), invocations.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let response = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&json!({ "do": "loop" }))
                        .send()
                        .await
                        .expect("request");
                    // Stopped at the deadline (504), or refused for instances (429/503): still a storm.
                    assert!(!response.status().is_success());
                    invocations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the storm fill its instances first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = timed(rounds, |_| classify()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in flood {
        task.await.expect("flood task");
    }
    let (alone, during) = (percentiles(alone), percentiles(during));
    println!("(d) a quiet tenant's classify, c=1, beside 32 busy-looping invocations   p50 (us)  p99 (us)");
    row("alone", alone);
    row("during the storm", during);
    println!(
        "  during / alone: p50 {:.2}x, p99 {:.2}x ({} storm invocations ended meanwhile)",
        during.0 / alone.0,
        during.1 / alone.1,
        invocations.load(std::sync::atomic::Ordering::Relaxed)
    );
    app.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let only = std::env::args().nth(1).filter(|arg| !arg.starts_with('-'));
    if only.as_deref().is_none_or(|only| only == "overhead") {
        in_host().await;
        over_http().await;
    }
    if only.as_deref().is_none_or(|only| only == "storm") {
        storm().await;
    }
}
