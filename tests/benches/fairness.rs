//! One model, two tenants of the same weight: a quiet one calling `classify` at concurrency 1, and a noisy
//! one flooding the same model with 48 connections. For each scheduling policy, in one run on this
//! machine: the quiet tenant's p50/p99 alone and under the flood (sampled in turns, ten of each), and
//! the total throughput while the flood runs. Goals for `fair`: quiet p99 under the flood within 2x
//! its solo p99, and total throughput at least 95% of `fifo`'s.
//!
//! What the two goals ask of each other: a run costs about as much as a text beside the texts it
//! carries, or more (every run reads all the weights and steps through every node of the graph: on
//! a 2-core CPU a run of one short text took 2.2 ms where a run of sixteen took 0.8 ms a text; by
//! the run thread's CPU clock on another day, 4.1 ms for one text and 6.3 ms for two), and the quiet
//! tenant at concurrency 1 sends its next call as soon as the last is answered. Served at once, in
//! runs of its own, it spends up to its whole fair share of the machine on runs of one or two texts,
//! where first come, first served packs its calls into the flood's runs (and answers them several
//! times slower). The smaller the machine, the larger that share: on two cores a quarter to a half
//! (the bench prints it), and the total falls by a tenth or so; on sixteen cores both goals were
//! met (README). Where texts are cheap beside a run (a GPU), the quiet tenant's runs carry more of
//! the flood's texts (see `scheduler::most_guests`). The bench also prints where the cores went
//! under each policy, by thread, from `/proc` (in the README's runs the two spent the same CPU, in
//! different numbers of runs).
//!
//! Run: `cargo bench -p plinth-tests --bench fairness` (`PLINTH_EXECUTION_PROVIDER=cuda` on a GPU;
//! `-- long` for a flood of the longest texts; on Postgres + Redis with `PLINTH_TEST_DATABASE_URL`
//! and `PLINTH_TEST_REDIS_URL` set, as for the tests).
//! Clients run on threads and runtimes of their own, as external clients would; the numbers are for
//! comparing within one run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use plinth_tests::TestApp;

/// The quiet tenant's calls sampled alone and under the flood (fewer under a flood of the longest
/// texts, where first come, first served answers each in a fraction of a second).
fn quiet_calls() -> usize {
    if long_flood() { 300 } else { 1_000 }
}
const FLOOD_CONNECTIONS: usize = 48;
/// The turns of the quiet tenant's calls alone and under the flood.
const ROUNDS: usize = 10;
const TEXT: &str = "Shares plunged after the profit warning";

/// Runs `load` on a thread and runtime of its own.
fn client<T: Send + 'static>(
    name: &str,
    load: impl FnOnce(reqwest::Client) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime")
                .block_on(async move {
                    let http = reqwest::Client::builder()
                        .pool_max_idle_per_host(128)
                        .build()
                        .expect("client");
                    load(http).await
                })
        })
        .expect("client thread")
}

fn long_flood() -> bool {
    std::env::args().any(|arg| arg == "long")
}

/// With `-- long`, the flood sends texts of the most tokens a text may have (every text of a run is
/// padded to its longest): the quiet tenant's runs must not become as long.
fn flood_text() -> String {
    if long_flood() {
        "word ".repeat(200)
    } else {
        TEXT.to_owned()
    }
}

/// One call: the server's `Server-Timing` for it (stage, ms).
async fn classify(http: &reqwest::Client, url: &str, key: &str, text: &str) -> Vec<(String, f64)> {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(&serde_json::json!({ "inputs": [text] }))
        .send()
        .await
        .expect("request");
    assert!(response.status().is_success(), "status {}", response.status());
    let timing = response
        .headers()
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .split(", ")
        .filter_map(|stage| {
            let (name, ms) = stage.split_once(";dur=")?;
            Some((name.to_owned(), ms.parse().ok()?))
        })
        .collect();
    response.bytes().await.expect("body");
    timing
}

/// A quiet call: how long it took the client, and the server's stages.
struct Sample {
    latency: Duration,
    stages: Vec<(String, f64)>,
}

impl Sample {
    /// A stage the server timed, in ms (0 when it was not timed).
    fn stage(&self, name: &str) -> f64 {
        self.stages
            .iter()
            .find(|(stage, _)| stage == name)
            .map_or(0.0, |(_, ms)| *ms)
    }
}

/// Where the slowest `share` of the calls (1.0: all) spent their time, on average (ms): each stage
/// the server timed, and what the server's total leaves of the client's (HTTP, connection, the
/// client itself).
fn stage_means(samples: &mut [Sample], share: f64) -> String {
    samples.sort_by_key(|sample| std::cmp::Reverse(sample.latency));
    let slowest = &samples[..((samples.len() as f64 * share).ceil() as usize).max(1)];
    let mean = |value: &dyn Fn(&Sample) -> f64| slowest.iter().map(value).sum::<f64>() / slowest.len() as f64;
    let mut parts: Vec<String> = [
        "admit", "queue", "thread", "run", "wake", "model", "ledger", "total",
    ]
    .into_iter()
    .map(|name| format!("{name} {:.1}", mean(&|sample: &Sample| sample.stage(name))))
    .collect();
    parts.push(format!(
        "outside the server {:.1}",
        mean(&|sample: &Sample| sample.latency.as_secs_f64() * 1e3 - sample.stage("total"))
    ));
    format!(
        "client {:.1} = {}",
        mean(&|sample: &Sample| sample.latency.as_secs_f64() * 1e3),
        parts.join(", ")
    )
}

/// The quiet tenant's client, one call at a time: for each number sent on the returned channel, that
/// many calls, their samples sent back (after 20 calls to warm up).
fn quiet(
    url: String,
    key: String,
) -> (
    tokio::sync::mpsc::Sender<usize>,
    tokio::sync::mpsc::Receiver<Vec<Sample>>,
    std::thread::JoinHandle<()>,
) {
    let (blocks, mut asked) = tokio::sync::mpsc::channel::<usize>(1);
    let (answer, samples) = tokio::sync::mpsc::channel(1);
    let client = client("bench-quiet", move |http| {
        Box::pin(async move {
            for _ in 0..20 {
                classify(&http, &url, &key, TEXT).await;
            }
            while let Some(calls) = asked.recv().await {
                let mut block = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let started = Instant::now();
                    let stages = classify(&http, &url, &key, TEXT).await;
                    block.push(Sample {
                        latency: started.elapsed(),
                        stages,
                    });
                }
                if answer.send(block).await.is_err() {
                    return;
                }
            }
        })
    });
    (blocks, samples, client)
}

/// The noisy tenant: `FLOOD_CONNECTIONS` connections calling while `flooding` is set, from a client
/// thread per four cores (one on a small machine), so that a fast server is not measured by how fast
/// one thread can send.
struct Flood {
    flooding: Arc<AtomicBool>,
    /// Wakes the connections parked while the flood is paused.
    phase: tokio::sync::watch::Sender<Phase>,
    /// Calls sent and not yet answered.
    in_flight: Arc<AtomicU64>,
    /// Calls answered.
    done: Arc<AtomicU64>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Paused,
    Flooding,
    Stopped,
}

/// A call counted in flight until it is dropped, answered or not.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Flood {
    /// Connects, paused.
    fn start(url: &str, key: &str) -> Self {
        let flooding = Arc::new(AtomicBool::new(false));
        let (phase, _) = tokio::sync::watch::channel(Phase::Paused);
        let (in_flight, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (std::thread::available_parallelism().map_or(1, usize::from) / 4).clamp(1, 4);
        let clients = (0..threads)
            .map(|_| {
                let (url, key) = (url.to_owned(), key.to_owned());
                let (flooding, phase, in_flight, done) = (
                    flooding.clone(),
                    phase.subscribe(),
                    in_flight.clone(),
                    done.clone(),
                );
                client("bench-flood", move |http| {
                    Box::pin(async move {
                        // The load generator shares this machine's cores with the server it measures:
                        // at the lowest priority it takes only what the server leaves (as a client
                        // elsewhere would).
                        #[cfg(target_os = "linux")]
                        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
                        let text = flood_text();
                        join_all((0..FLOOD_CONNECTIONS / threads).map(|_| {
                            let (http, url, key, text) = (&http, &url, &key, &text);
                            let (flooding, mut phase, in_flight, done) =
                                (&flooding, phase.clone(), &in_flight, &done);
                            async move {
                                loop {
                                    // Counted in flight before `flooding` is read, so that `pause`
                                    // never misses a call about to be sent.
                                    let call = InFlight::enter(in_flight);
                                    if flooding.load(Ordering::SeqCst) {
                                        classify(http, url, key, text).await;
                                        done.fetch_add(1, Ordering::SeqCst);
                                        continue;
                                    }
                                    drop(call);
                                    match phase.wait_for(|phase| *phase != Phase::Paused).await {
                                        Ok(phase) if *phase == Phase::Flooding => {}
                                        _ => return,
                                    }
                                }
                            }
                        }))
                        .await;
                    })
                })
            })
            .collect();
        Self {
            flooding,
            phase,
            in_flight,
            done,
            clients,
        }
    }

    /// Floods until `pause`, from a second on (every connection calling, the queues full).
    async fn resume(&self) {
        self.flooding.store(true, Ordering::SeqCst);
        self.phase.send_replace(Phase::Flooding);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// Returns once every call sent is answered, and a little later: a run in the background gives
    /// its session back once its low-priority thread gets a core.
    async fn pause(&self) {
        self.flooding.store(false, Ordering::SeqCst);
        self.phase.send_replace(Phase::Paused);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            !self.clients.iter().any(std::thread::JoinHandle::is_finished),
            "a flood client stopped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    async fn stop(self) {
        self.flooding.store(false, Ordering::SeqCst);
        self.phase.send_replace(Phase::Stopped);
        tokio::task::spawn_blocking(move || {
            for client in self.clients {
                client.join().expect("flood client");
            }
        })
        .await
        .expect("flood");
    }
}

/// The mean of a stage the server timed, in ms.
fn mean_stage(samples: &[Sample], name: &str) -> f64 {
    samples.iter().map(|sample| sample.stage(name)).sum::<f64>() / samples.len().max(1) as f64
}

fn percentile(samples: &mut [Sample], p: f64) -> f64 {
    samples.sort_by_key(|sample| sample.latency);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
        .latency
        .as_secs_f64()
        * 1e3
}

struct Run {
    alone: (f64, f64),
    flooded: (f64, f64),
    /// The quiet tenant's wait in the model's queue under the flood (p50, p99; bucket bounds), out of
    /// its whole latency: the rest is HTTP, metering and the ledger's durable commit.
    queue_wait: (f64, f64),
    /// The usage ledger's commits under the flood (p50, p99; bucket bounds).
    ledger_commit: (f64, f64),
    throughput: f64,
    /// Texts per run of the model under the flood.
    items_per_run: f64,
    /// Where the quiet tenant's calls spent their time: all of them alone, all under the flood, and
    /// the slowest 1% under the flood.
    stages: [String; 3],
    /// The share of the machine's cores the quiet tenant's calls would take under the flood if each
    /// ran alone, as long as its run took with the machine to itself: what runs of its own cost (see
    /// the header).
    quiet_share: f64,
    /// Where the cores went under the flood (empty where `/proc` cannot be read).
    cpu: String,
}

/// CPU time of each thread of this process (the server and its clients), of the process, and of the
/// whole machine, from Linux's `/proc`, in clock ticks.
struct CpuClocks {
    /// Thread id: (name, user + system ticks).
    threads: std::collections::HashMap<u64, (String, u64)>,
    /// The process's user + system ticks, threads that have ended included.
    process: u64,
    /// The machine's (idle, all) ticks, over all its cores.
    machine: (u64, u64),
}

/// The id, name and user + system ticks in a `/proc/.../stat` line.
fn stat_ticks(stat: &str) -> Option<(&str, &str, u64)> {
    // `id (name) state ...`: the name may hold spaces and parentheses, the fields after the last `)`
    // do not; utime and stime are the 14th and 15th fields.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    Some((stat[..open].trim(), &stat[open + 1..close], ticks(11) + ticks(12)))
}

impl CpuClocks {
    fn read() -> Self {
        let mut threads = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((id, name, ticks)) = stat_ticks(&stat)
                && let Ok(tid) = id.parse()
            {
                threads.insert(tid, (name.to_owned(), ticks));
            }
        }
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| stat_ticks(&stat).map(|(_, _, ticks)| ticks))
            .unwrap_or(0);
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let cpu: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect();
                // idle and iowait of user, nice, system, idle, iowait, irq, softirq, steal.
                Some((cpu.get(3)? + cpu.get(4)?, cpu.iter().take(8).sum()))
            })
            .unwrap_or((0, 0));
        Self {
            threads,
            process,
            machine,
        }
    }
}

/// Where the cores went while the flood ran, in clock ticks summed over its windows.
#[derive(Default)]
struct CpuUse {
    /// By kind of thread: threads named alike, their numbers and pool suffixes dropped, count as one.
    kinds: Vec<(String, u64)>,
    /// The process's ticks, threads that have ended included.
    process: u64,
    /// The machine's idle ticks and all its ticks, over all its cores.
    idle: u64,
    all: u64,
}

impl CpuUse {
    /// Adds what was spent between two readings.
    fn add(&mut self, before: &CpuClocks, after: &CpuClocks) {
        let mut live = 0;
        for (tid, (name, ticks)) in &after.threads {
            let used = ticks - before.threads.get(tid).map_or(0, |(_, t)| *t).min(*ticks);
            live += used;
            let kind =
                name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == ':' || c == ' ');
            match self.kinds.iter_mut().find(|(k, _)| k == kind) {
                Some((_, total)) => *total += used,
                None => self.kinds.push((kind.to_owned(), used)),
            }
        }
        self.process += after.process.saturating_sub(before.process).max(live);
        self.idle += after.machine.0.saturating_sub(before.machine.0);
        self.all += after.machine.1.saturating_sub(before.machine.1);
    }
}

/// The share of all the machine's cores each kind of thread took, the rest of the machine, and idle
/// (empty where `/proc` could not be read).
impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all == 0 {
            return Ok(());
        }
        let live: u64 = self.kinds.iter().map(|(_, t)| t).sum();
        let mut kinds = self.kinds.clone();
        kinds.push(("threads that ended".to_owned(), self.process.saturating_sub(live)));
        kinds.retain(|(_, t)| *t * 100 >= self.all);
        kinds.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        let share = |ticks: u64| ticks as f64 * 100.0 / self.all as f64;
        let mut parts: Vec<String> = kinds
            .iter()
            .map(|(k, t)| format!("{k} {:.0}%", share(*t)))
            .collect();
        parts.push(format!(
            "other processes {:.0}%",
            share(self.all.saturating_sub(self.idle + self.process))
        ));
        parts.push(format!("idle {:.0}%", share(self.idle)));
        write!(f, "{}", parts.join(", "))
    }
}

/// The cumulative buckets of a histogram, (upper bound in s, count), over the series whose labels
/// contain `labels`.
async fn buckets(app: &TestApp, histogram: &str, labels: &str) -> Vec<(f64, u64)> {
    let text = app.metrics().await;
    let prefix = format!("{histogram}_bucket{{");
    text.lines()
        .filter(|line| line.starts_with(&prefix) && line.contains(labels))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = line.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The quiet plan's waits in the model's queue, and the usage ledger's commits (every metered call
/// waits for one).
async fn waits(app: &TestApp) -> [Vec<(f64, u64)>; 2] {
    [
        buckets(app, "plinth_inference_queue_wait_seconds", "plan=\"quiet\"").await,
        buckets(app, "plinth_ledger_write_duration_seconds", "").await,
    ]
}

/// A counter of the sentiment model's (`nv_inference_*`).
async fn model_counter(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains("model=\"sentiment\""))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Adds what a histogram counted between two snapshots of its cumulative buckets to `counts`.
fn add_counts(counts: &mut Vec<(f64, u64)>, before: &[(f64, u64)], after: &[(f64, u64)]) {
    for (le, n) in after {
        let counted = n.saturating_sub(before.iter().find(|(l, _)| l == le).map_or(0, |(_, b)| *b));
        match counts.iter_mut().find(|(l, _)| l == le) {
            Some((_, total)) => *total += counted,
            None => counts.push((*le, counted)),
        }
    }
}

/// The bucket bound under which a share `p` of the counted calls waited, in ms.
fn bucket_percentile(counts: &[(f64, u64)], p: f64) -> f64 {
    let total = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let wanted = (total as f64 * p).ceil() as u64;
    counts
        .iter()
        .filter(|(_, n)| *n >= wanted)
        .map(|(le, _)| *le)
        .fold(f64::INFINITY, f64::min)
        * 1e3
}

async fn measure(scheduling: &'static str) -> Run {
    // SQLite + memory, or Postgres + Redis where `PLINTH_TEST_DATABASE_URL` and `PLINTH_TEST_REDIS_URL`
    // are set (production mode: the ledger's commits overlap there).
    let app = TestApp::spawn_with(|config| {
        config.inference_scheduling = scheduling.to_owned();
        // The defaults: a session per core plus one, an HTTP worker per core.
        config.inference_sessions = std::thread::available_parallelism().map_or(2, usize::from) + 1;
        config.workers = 0;
        // `PLINTH_EXECUTION_PROVIDER=cuda` measures a GPU (with `PLINTH_CACHE_DIR` holding its ONNX
        // Runtime build).
        if let Ok(provider) = std::env::var("PLINTH_EXECUTION_PROVIDER") {
            config.execution_provider = provider;
        }
    })
    .await;
    let (noisy, calm) = (app.tenant().await, app.tenant().await);
    app.lift_rate_limits(&noisy.session.tenant.id).await;
    // The quiet tenant on a plan of its own, like the noisy one's in all but name, so that its
    // queue wait can be told apart in the metrics.
    let mut plan = app.store().plan("unlimited").await.expect("plan");
    plan.id = "quiet".to_owned();
    app.store().upsert_plan(&plan).await.expect("plan");
    app.set_plan(&calm.session.tenant.id, "quiet").await;
    let url = app.url("/v1/models/sentiment/classify");

    // The quiet tenant's calls alone and under the flood, in turns (`ROUNDS` of each, in pairs whose
    // order swaps: alone first, then flooded first, ...), so that both are sampled over the same
    // minutes of a shared machine (whose own load moved its p99 alone by 2x from one run to the
    // next): the ratio compares the two, not two moments.
    let (blocks, mut samples, quiet_client) = quiet(url.clone(), calm.key.secret.clone());
    let flood = Flood::start(&url, &noisy.key.secret);
    let block = quiet_calls() / ROUNDS;
    let (mut alone, mut flooded) = (Vec::new(), Vec::new());
    let (mut queue_wait, mut ledger_commit, mut cpu) = (Vec::new(), Vec::new(), CpuUse::default());
    let (mut runs, mut items, mut calls, mut elapsed) = (0.0, 0.0, 0, 0.0);
    for turn in 0..2 * ROUNDS {
        if matches!(turn % 4, 0 | 3) {
            blocks.send(block).await.expect("quiet client");
            alone.extend(samples.recv().await.expect("quiet client"));
            continue;
        }
        flood.resume().await;
        let waits_before = waits(&app).await;
        let (runs_before, items_before) = (
            model_counter(&app, "nv_inference_exec_count").await,
            model_counter(&app, "nv_inference_count").await,
        );
        let cpu_before = CpuClocks::read();
        let (done_before, started) = (flood.done.load(Ordering::SeqCst), Instant::now());
        blocks.send(block).await.expect("quiet client");
        flooded.extend(samples.recv().await.expect("quiet client"));
        elapsed += started.elapsed().as_secs_f64();
        calls += flood.done.load(Ordering::SeqCst) - done_before + block as u64;
        cpu.add(&cpu_before, &CpuClocks::read());
        let waits_after = waits(&app).await;
        add_counts(&mut queue_wait, &waits_before[0], &waits_after[0]);
        add_counts(&mut ledger_commit, &waits_before[1], &waits_after[1]);
        runs += model_counter(&app, "nv_inference_exec_count").await - runs_before;
        items += model_counter(&app, "nv_inference_count").await - items_before;
        flood.pause().await;
    }
    drop(blocks);
    tokio::task::spawn_blocking(move || quiet_client.join().expect("quiet client"))
        .await
        .expect("quiet");
    flood.stop().await;
    app.stop().await;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let quiet_share = flooded.len() as f64 / elapsed * mean_stage(&alone, "run") / 1e3 / cores;
    Run {
        alone: (percentile(&mut alone, 0.5), percentile(&mut alone, 0.99)),
        flooded: (percentile(&mut flooded, 0.5), percentile(&mut flooded, 0.99)),
        queue_wait: (
            bucket_percentile(&queue_wait, 0.5),
            bucket_percentile(&queue_wait, 0.99),
        ),
        ledger_commit: (
            bucket_percentile(&ledger_commit, 0.5),
            bucket_percentile(&ledger_commit, 0.99),
        ),
        throughput: calls as f64 / elapsed,
        items_per_run: items / runs.max(1.0),
        stages: [
            stage_means(&mut alone, 1.0),
            stage_means(&mut flooded, 1.0),
            stage_means(&mut flooded, 0.01),
        ],
        quiet_share,
        cpu: cpu.to_string(),
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "sentiment, one text per call; quiet tenant c=1 beside a noisy one at c={FLOOD_CONNECTIONS} sending {} texts, same weight ({} cores, {})",
            if flood_text() == TEXT { "short" } else { "the longest" },
            std::thread::available_parallelism().map_or(0, usize::from),
            if plinth_tests::postgres_and_redis().is_some() {
                "Postgres + Redis"
            } else {
                "SQLite + memory"
            }
        );
        println!(
            "  {:<10} {:>15} {:>15} {:>15} {:>12} {:>10} {:>22} {:>22}",
            "policy",
            "alone p50/p99",
            "flood p50/p99",
            "p99 vs alone",
            "calls/s",
            "texts/run",
            "queue wait p50/p99 <=",
            "ledger commit p50/p99 <="
        );
        let fifo = measure("fifo").await;
        let fair = measure("fair").await;
        for (name, run) in [("fifo", &fifo), ("fair", &fair)] {
            println!(
                "  {name:<10} {:>7.1}/{:>6.1}ms {:>7.1}/{:>6.1}ms {:>14.2}x {:>12.0} {:>10.1} {:>12.1}/{:>6.1}ms {:>14.1}/{:>6.1}ms",
                run.alone.0,
                run.alone.1,
                run.flooded.0,
                run.flooded.1,
                run.flooded.1 / run.alone.1,
                run.throughput,
                run.items_per_run,
                run.queue_wait.0,
                run.queue_wait.1,
                run.ledger_commit.0,
                run.ledger_commit.1
            );
        }
        println!(
            "  fair throughput under the flood vs fifo: {:.2}x",
            fair.throughput / fifo.throughput
        );
        println!(
            "  fair: the quiet tenant's runs of its own under the flood, each as long as one alone, take {:.0}% of the cores (its share by weight: 50%)",
            fair.quiet_share * 100.0
        );
        println!("  the machine's cores under the flood, by thread (the server, its clients, the rest of the machine):");
        for (name, run) in [("fifo", &fifo), ("fair", &fair)] {
            println!("  {name:<10} {}", run.cpu);
        }
        println!("  the quiet tenant's calls, mean ms (Server-Timing; ledger overlaps model):");
        for (name, run) in [("fifo", &fifo), ("fair", &fair)] {
            for (which, stages) in ["alone", "flood", "slowest 1%"].iter().zip(&run.stages) {
                println!("  {name:<5} {which:<11} {stages}");
            }
        }
    });
}
