//! Plugin overhead, in one run on this machine:
//! (a) inside the host: a fresh instance + call of the trivial Rust plugin (`hello`) and of the Python
//!     one (`ticket-triage`), p50/p99, against the same host running nothing (an empty async call);
//! (b) over HTTP at concurrency 1: invoking `hello` against the metered no-op `/v1/echo`, i.e. what a
//!     plugin adds to a billed call;
//! (c) a plugin making one model call (`hostile` in its `model` mode) against calling the model
//!     directly: what the plugin path adds to inference.
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
    let compiled = host.compile("hello", &component).expect("compile");
    let call = Arc::new(CallContext {
        tenant_id: plinth_core::id::TenantId::new(),
        installation_id: "bench".into(),
        plugin: "hello".into(),
        granted_models: Vec::new(),
        settings: serde_json::Map::new(),
        secrets: Default::default(),
        idempotency_key: "bench".into(),
    });
    let services: Arc<dyn Services> = Arc::new(NoServices);
    let baseline = timed(ROUNDS, |_| async { tokio::task::yield_now().await }).await;
    let invocations = timed(ROUNDS, |_| {
        let (host, compiled, call, services) = (&host, &compiled, call.clone(), services.clone());
        async move {
            host.invoke(compiled, call, services, r#"{"name":"bench"}"#)
                .await
                .expect("invoke");
        }
    })
    .await;
    // The Python plugin, answering an empty request with its typed error (no model call).
    let (_, component) = built_plugin("ticket-triage");
    let python = host.compile("ticket-triage", &component).expect("compile");
    let python_invocations = timed(ROUNDS / 4, |_| {
        let (host, python, call, services) = (&host, &python, call.clone(), services.clone());
        async move {
            let refused = host.invoke(python, call, services, "{}").await;
            assert!(
                matches!(refused, Err(plinth_plugin_host::InvokeError::Rejected(_))),
                "{refused:?}"
            );
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    rustls::crypto::ring::default_provider().install_default().ok();
    in_host().await;
    over_http().await;
}
