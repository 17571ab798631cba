//! The Prometheus recorder. Installed once per process (metrics are process-global), rendered at
//! `GET /metrics`: on the API listener only for the holder of the metrics token, or on a listener of
//! its own (`PLINTH_METRICS_ADDR`) meant for a private network. Labels never carry tenants' names or
//! anything a client chooses: routes are patterns, methods a fixed set, tenant models one `tenant`
//! label, tenants only their plan.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sha2::{Digest, Sha256};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// The process-wide recorder handle, installing the recorder on first use.
///
/// # Panics
/// Only if another metrics recorder was installed by someone else, a programming error at start-up.
#[must_use]
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZE_BUCKETS)
                })
                .and_then(PrometheusBuilder::install_recorder)
                .inspect(|handle| drain_histograms(handle.clone()))
                .expect("a metrics recorder was already installed")
        })
        .clone()
}

/// Histograms keep every sample until they are drained into their buckets, which a scrape does: without
/// this, a process nobody scrapes (or scrapes rarely) grows by every sample of every request. A thread
/// of its own, since the recorder outlives any one runtime.
fn drain_histograms(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("plinth-metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start draining histograms; they are drained at each scrape");
    }
}

/// The bearer token that opens `/metrics` on the API listener, kept as its digest.
#[derive(Clone)]
pub struct MetricsToken([u8; 32]);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(<redacted>)")
    }
}

impl MetricsToken {
    #[must_use]
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `presented` is the token. Digests are compared, so the time taken says nothing about
    /// how much of the token was right.
    #[must_use]
    pub fn admits(&self, presented: &str) -> bool {
        Sha256::digest(presented.as_bytes()).as_slice() == self.0
    }
}

/// Prometheus text exposition of every metric.
#[must_use]
pub fn exposition() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle().render())
}

/// The HTTP method as a metric label: the standard ones by name, anything else `other` (a client may
/// send any token as a method; each would be a new series).
#[must_use]
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
