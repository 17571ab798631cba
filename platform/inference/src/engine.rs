//! Loading models into sessions and answering calls through their batchers.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use plinth_core::inference::{Classification, LabelScore, Model, ModelStatistics, Task, TensorMetadata};
use tokio::sync::oneshot;

use crate::InferenceError;
use crate::batcher::{self, TextOutput, Work};
use crate::scheduler::{FairQueue, Scheduling, Share};
use crate::tensor::{DataType, Tensor};

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionProvider {
    Cpu,
    /// CUDA or refuse to load.
    Cuda,
    /// CUDA when it registers, else CPU, said loudly in the log and the model's metadata.
    Auto,
}

impl FromStr for ExecutionProvider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown execution provider `{other}` (expected cpu, cuda or auto)"
            )),
        }
    }
}

/// Serving knobs.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// `libonnxruntime.so` to load.
    pub ort_dylib: PathBuf,
    pub provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads per session. 1 suits small shared machines: spinning threads hurt.
    pub intra_threads: usize,
    /// Sessions per model, each with its own batcher worker. Under fair scheduling one tenant's calls
    /// may run in all but one of them at once: a session per core plus one keeps every core busy for a
    /// lone tenant and one session free for everyone else.
    pub sessions_per_model: usize,
    /// Most items in one run; 1 turns batching off.
    pub max_batch: usize,
    /// How long the first call of a batch waits for company. Zero (the default) never waits: a batch is
    /// whatever queued while the sessions were busy, which batches under load and adds nothing at low load.
    pub max_queue_delay: Duration,
    /// Calls queued per model before new ones are refused with 503.
    pub queue_capacity: usize,
    /// The order queued calls are served in: fair between tenants, or first come, first served.
    pub scheduling: Scheduling,
    /// Calls one tenant may have queued per model before its new ones are refused with 429; below
    /// `queue_capacity`, so one tenant cannot fill the queue for everyone.
    pub tenant_queue_capacity: usize,
    /// Longest a call may wait for its result.
    pub timeout: Duration,
    /// Longest text, in tokens; longer inputs are truncated.
    pub max_tokens: usize,
    /// Most bytes tenants' graphs may allocate at once while they run (weights aside), all of them
    /// together: past it a run fails with `400` instead of the process being killed for memory. Set
    /// by the first engine of the process (ONNX Runtime has one environment). On a GPU, also each
    /// tenant session's device memory.
    pub tenant_run_memory: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            ort_dylib: PathBuf::from("libonnxruntime.so"),
            provider: ExecutionProvider::Cpu,
            intra_threads: 1,
            sessions_per_model: 3,
            max_batch: 32,
            max_queue_delay: Duration::ZERO,
            queue_capacity: 1_024,
            tenant_queue_capacity: 256,
            scheduling: Scheduling::Fair,
            timeout: Duration::from_secs(30),
            max_tokens: MAX_TOKENS,
            tenant_run_memory: 4 << 30,
        }
    }
}

/// A model to load: its files and what it is for.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub name: String,
    pub version: u32,
    pub task: Task,
    pub labels: Vec<String>,
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub platform: bool,
}

/// ONNX Runtime, loaded once per process.
#[derive(Debug, Clone)]
pub struct Engine {
    environment: Arc<Environment>,
    settings: EngineSettings,
    /// Runs each tenant holds across all of this engine's models.
    tenant_runs: Arc<crate::scheduler::TenantRuns>,
}

fn runtime_error(context: &str, err: impl std::fmt::Display) -> InferenceError {
    InferenceError::Runtime(format!("{context}: {err}"))
}

impl Engine {
    /// Loads the ONNX Runtime library named in the settings.
    ///
    /// # Errors
    /// When the library is missing or unusable, with a message saying how to get it.
    pub fn new(settings: EngineSettings) -> Result<Self, InferenceError> {
        if !settings.ort_dylib.is_file() {
            return Err(InferenceError::Runtime(format!(
                "ONNX Runtime not found at {} (set PLINTH_ORT_DYLIB, or run scripts/fetch-models.sh)",
                settings.ort_dylib.display()
            )));
        }
        // Tokenize each batch on its own blocking thread: the batches are small, and rayon's spinning
        // workers would take cores from ONNX Runtime on small machines.
        tokenizers::utils::parallelism::set_parallelism(false);
        // ONNX Runtime has one environment per process; the first engine's library wins.
        static ENVIRONMENT: OnceLock<Result<(Arc<Environment>, usize), String>> = OnceLock::new();
        let environment = ENVIRONMENT
            .get_or_init(|| {
                let environment = ort::init_from(&settings.ort_dylib)
                    .map_err(|err| format!("cannot load {}: {err}", settings.ort_dylib.display()))?
                    .with_name("plinth")
                    .build()
                    .map_err(|err| format!("cannot create the ONNX Runtime environment: {err}"))?;
                crate::arena::register(&environment, settings.tenant_run_memory)
                    .map_err(|err| format!("cannot set up the memory tenants' graphs run in: {err}"))?;
                Ok((Arc::new(environment), settings.tenant_run_memory))
            })
            .clone()
            .map_err(InferenceError::Runtime)?;
        let (environment, tenant_run_memory) = environment;
        if tenant_run_memory != settings.tenant_run_memory {
            tracing::warn!(
                set = tenant_run_memory,
                asked = settings.tenant_run_memory,
                "tenants' graphs keep the memory bound of the process's first engine"
            );
        }
        Ok(Self {
            environment,
            settings,
            tenant_runs: Arc::default(),
        })
    }

    #[must_use]
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Whether models are meant to run on a GPU: with `cuda`, or `auto` where ONNX Runtime was built
    /// with CUDA (the built-in models come as a graph for each; see `catalog::builtin_graph`).
    #[must_use]
    pub fn prefers_gpu(&self) -> bool {
        match self.settings.provider {
            ExecutionProvider::Cpu => false,
            ExecutionProvider::Cuda => true,
            ExecutionProvider::Auto => {
                <ort::ep::CUDA as ort::ep::ExecutionProvider>::is_available().unwrap_or(false)
            }
        }
    }

    fn session(&self, files: &ModelFiles, provider: ExecutionProvider) -> Result<Session, InferenceError> {
        let mut builder = Session::builder(&self.environment)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|err| runtime_error("session options", err))?
            .with_intra_threads(self.settings.intra_threads.max(1))
            .map_err(|err| runtime_error("session options", err))?
            .with_intra_op_spinning(false)
            .map_err(|err| runtime_error("session options", err))?;
        if provider == ExecutionProvider::Cuda {
            let mut cuda = ort::ep::CUDA::default();
            if !files.platform {
                cuda = cuda.with_memory_limit(self.settings.tenant_run_memory);
            }
            builder = builder
                .with_execution_providers([cuda.build().error_on_failure()])
                .map_err(|err| runtime_error("the CUDA execution provider did not register", err))?;
        }
        let invalid = |err: ort::Error| {
            InferenceError::InvalidModel(format!("ONNX Runtime cannot load the model: {err}"))
        };
        if files.platform {
            return builder.commit_from_file(&files.model).map_err(invalid);
        }
        // What a tenant's model may not contain (external data, text, what would allocate outside the
        // arena: see `screen`) is refused here, before the runtime parses anything; and the runtime
        // gets the bytes with an empty directory for external data besides.
        let bytes = std::fs::read(&files.model).map_err(|err| runtime_error("reading the model", err))?;
        match crate::screen::screen(&bytes) {
            Ok(None) => {}
            Ok(Some(refusal)) => return Err(InferenceError::InvalidModel(refusal.to_string())),
            Err(err) => return Err(InferenceError::InvalidModel(format!("not an ONNX model: {err}"))),
        }
        let no_external_data = files
            .model
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join(".no-external-data");
        std::fs::create_dir_all(&no_external_data).map_err(|err| runtime_error("model directory", err))?;
        // The runtime's messages may name paths on this server: not the uploader's business.
        let dir = files
            .model
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let paths: Vec<String> = [std::fs::canonicalize(&dir).ok(), Some(dir)]
            .into_iter()
            .flatten()
            .map(|dir| dir.to_string_lossy().into_owned())
            .filter(|dir| !dir.is_empty())
            .collect();
        let invalid = |err: ort::Error| {
            let mut message = format!("ONNX Runtime cannot load the model: {err}");
            for path in &paths {
                message = message.replace(path.as_str(), ".");
            }
            InferenceError::InvalidModel(message)
        };
        builder
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                no_external_data.to_string_lossy(),
            )
            .map_err(|err| runtime_error("session options", err))?
            // Read as ONNX only, never as the runtime's own format (which `screen` does not read).
            .with_config_entry("session.load_model_format", "ONNX")
            .map_err(|err| runtime_error("session options", err))?
            // What the graph allocates comes from the bounded arena (see `arena`)...
            .with_env_allocators()
            .map_err(|err| runtime_error("session options", err))?
            // ...but constant folding computes parts of the graph while the session is built, with
            // the runtime's own allocator: a `ConstantOfShape` of a constant shape would take what it
            // asks at upload (1.8 GB for one node, measured). Those parts are computed in each run.
            .with_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
            .map_err(|err| runtime_error("session options", err))?
            .commit_from_memory(&bytes)
            .map_err(invalid)
    }

    /// Loads a model: creates its sessions (checking that the file is a valid model whose inputs fit its
    /// task), runs a warm-up, and starts its batcher.
    ///
    /// # Errors
    /// [`InferenceError::InvalidModel`] for unusable files; [`InferenceError::Runtime`] when a required
    /// execution provider is unavailable.
    pub fn load(&self, files: &ModelFiles) -> Result<Arc<LoadedModel>, InferenceError> {
        self.load_with(files, None)
    }

    /// Loads a tenant's model that is being uploaded: as [`Self::load`], with the warm-ups of all its
    /// sessions together bounded (see [`TENANT_WARM_UP`]; a graph that would run for ever is
    /// terminated and refused), and a model that finds no run memory for one short text with no
    /// other run in the arena refused (one that finds it full of other tenants' runs is
    /// [`InferenceError::Overloaded`], to retry).
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn validate(&self, files: &ModelFiles) -> Result<Arc<LoadedModel>, InferenceError> {
        self.load_with(files, Some(true))
    }

    /// Loads a tenant's model accepted before: as [`Self::validate`], except that the model is not
    /// refused for its warm-up: one past the limit (a busy machine) is [`InferenceError::Timeout`],
    /// and one that finds no run memory for a short text (the bound lowered since the model was
    /// accepted, or other runs holding it) [`InferenceError::Overloaded`].
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn reload(&self, files: &ModelFiles) -> Result<Arc<LoadedModel>, InferenceError> {
        self.load_with(files, Some(false))
    }

    /// `tenant`: for a tenant's model, whether it is new (see [`batcher::Worker::warm_up`]).
    fn load_with(
        &self,
        files: &ModelFiles,
        tenant: Option<bool>,
    ) -> Result<Arc<LoadedModel>, InferenceError> {
        let (mut sessions, provider) = match self.settings.provider {
            ExecutionProvider::Cpu => (vec![self.session(files, ExecutionProvider::Cpu)?], "cpu"),
            ExecutionProvider::Cuda => (vec![self.session(files, ExecutionProvider::Cuda)?], "cuda"),
            ExecutionProvider::Auto => match self.session(files, ExecutionProvider::Cuda) {
                Ok(session) => (vec![session], "cuda"),
                Err(err) => {
                    tracing::warn!(model = %files.name, error = %err, "CUDA unavailable: serving this model on CPU");
                    (vec![self.session(files, ExecutionProvider::Cpu)?], "cpu")
                }
            },
        };
        let tokenizer = match (&files.tokenizer, files.task) {
            (Some(path), _) => Some(Arc::new(crate::tokenizer::load(path, self.settings.max_tokens)?)),
            (None, Task::Raw) => None,
            (None, _) => {
                return Err(InferenceError::InvalidModel(
                    "text models need a tokenizer.json".into(),
                ));
            }
        };
        let first = &sessions[0];
        let inputs = metadata(first.inputs().iter().map(|o| (o.name(), o.dtype())));
        let outputs = metadata(first.outputs().iter().map(|o| (o.name(), o.dtype())));
        let text = match files.task {
            Task::Raw => None,
            task => Some(batcher::TextPlan::new(
                task,
                &inputs,
                &outputs,
                files.labels.len(),
            )?),
        };
        let session_provider = if provider == "cuda" {
            ExecutionProvider::Cuda
        } else {
            ExecutionProvider::Cpu
        };
        for _ in 1..self.settings.sessions_per_model.max(1) {
            sessions.push(self.session(files, session_provider)?);
        }

        let info = Model {
            name: files.name.clone(),
            task: files.task,
            labels: files.labels.clone(),
            version: files.version,
            platform: files.platform,
            execution_provider: provider.to_owned(),
            inputs,
            outputs,
        };
        // Platform models by name; tenants' models only as a count per execution provider.
        let metrics_label = if files.platform {
            info.name.clone()
        } else {
            "tenant".to_owned()
        };
        if files.platform {
            metrics::gauge!("plinth_model_info", "model" => metrics_label.clone(), "execution_provider" => provider)
                .set(1.0);
        }

        let queue = Arc::new(
            FairQueue::new(
                self.settings.queue_capacity,
                self.settings.tenant_queue_capacity,
                sessions.len(),
                self.settings.scheduling,
            )
            .sharing_runs(self.tenant_runs.clone()),
        );
        let stats = Arc::new(batcher::Stats::default());
        let setup = batcher::WorkerSetup {
            queue: queue.clone(),
            tokenizer,
            text,
            max_batch: self.settings.max_batch.max(1),
            max_delay: self.settings.max_queue_delay,
            batch_tensors: batches_tensors(&info, files.platform),
            timeout: self.settings.timeout,
            model: files.name.clone(),
            metrics_label,
            memory: if files.platform {
                batcher::Memory::Platform
            } else if provider == "cuda" {
                batcher::Memory::OwnDevice
            } else {
                batcher::Memory::SharedArena
            },
            stats: stats.clone(),
        };
        let mut workers = Vec::with_capacity(sessions.len());
        // One deadline for every session's warm-up: a load holds the turn all tenants' loads share.
        let limit = self.settings.timeout.min(TENANT_WARM_UP);
        let deadline = tenant.map(|new| ((Instant::now() + limit, limit), new));
        for session in sessions {
            let mut worker = batcher::Worker {
                session,
                setup: setup.clone(),
            };
            worker.warm_up(
                deadline.map(|(deadline, _)| deadline),
                deadline.is_some_and(|(_, new)| new),
            )?;
            workers.push(worker);
        }
        // How many of heavy tenants' texts a light tenant's run may carry depends on what a text costs
        // beside a run on this machine: timed on the platform's models (the ones tenants share), with
        // texts no tenant chooses. Tenants' own models keep one.
        if files.platform
            && let Some(worker) = workers.first_mut()
        {
            match worker.time_guests(self.settings.max_batch) {
                Ok(Some(guests)) => {
                    queue.set_guest_items(guests);
                    tracing::info!(model = %files.name, guests, "texts of heavy tenants a light tenant's run may carry");
                }
                Ok(None) => {}
                // It served its warm-up: serve, with one guest per light run.
                Err(err) => {
                    tracing::warn!(model = %files.name, error = %err, "could not time the model's runs");
                }
            }
        }
        let replacement: Arc<NewSession> = Arc::new({
            let (engine, files) = (self.clone(), files.clone());
            move || engine.session(&files, session_provider)
        });
        let running = workers
            .into_iter()
            .map(|worker| {
                let current = Arc::new(CurrentWorker::default());
                tokio::spawn(supervise(worker, replacement.clone(), current.clone()));
                current
            })
            .collect();
        Ok(Arc::new(LoadedModel {
            info,
            queue,
            timeout: self.settings.timeout,
            stats,
            workers: running,
        }))
    }
}

/// Where `scripts/fetch-models.sh` puts ONNX Runtime and the built-in models: `PLINTH_CACHE_DIR`, else
/// `~/.cache/plinth`.
#[must_use]
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PLINTH_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME").map_or_else(
        || PathBuf::from(".cache/plinth"),
        |home| PathBuf::from(home).join(".cache/plinth"),
    )
}

/// The ONNX Runtime library `scripts/fetch-models.sh` fetches into [`cache_dir`].
#[must_use]
pub fn fetched_ort_dylib() -> PathBuf {
    cache_dir().join("onnxruntime/libonnxruntime.so.1.31.1")
}

/// An embedding model's own session for background work (training): on the CPU, one intra-op thread,
/// running on the caller's thread (so that thread's priority is the work's), outside the batchers that
/// serve calls.
pub struct Embedder {
    session: Session,
    tokenizer: crate::tokenizer::TextTokenizer,
    plan: batcher::TextPlan,
    options: batcher::RunSettings,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").finish_non_exhaustive()
    }
}

impl Engine {
    /// A standalone embedder for an embedding model's files.
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn embedder(&self, files: &ModelFiles) -> Result<Embedder, InferenceError> {
        let single = Self {
            settings: EngineSettings {
                intra_threads: 1,
                ..self.settings.clone()
            },
            ..self.clone()
        };
        let session = single.session(files, ExecutionProvider::Cpu)?;
        let tokenizer = match &files.tokenizer {
            Some(path) => crate::tokenizer::load(path, self.settings.max_tokens)?,
            None => {
                return Err(InferenceError::InvalidModel(
                    "text models need a tokenizer.json".into(),
                ));
            }
        };
        let inputs = metadata(session.inputs().iter().map(|o| (o.name(), o.dtype())));
        let outputs = metadata(session.outputs().iter().map(|o| (o.name(), o.dtype())));
        let plan = batcher::TextPlan::new(Task::Embedding, &inputs, &outputs, 0)?;
        Ok(Embedder {
            session,
            tokenizer,
            plan,
            options: batcher::RunSettings::new(if files.platform {
                batcher::Memory::Platform
            } else {
                batcher::Memory::SharedArena
            })?,
        })
    }
}

/// Whether protocol calls of `model` may share a run, joined along their first dimension: where every
/// input and output has a free first (batch) dimension, on models whose rows are independent: the
/// platform's (built so) and text models (whose texts are batched on that ground anyway). A tenant's
/// tensor model is another matter: its graph may compute across the batch, and a call's answer must
/// not depend on the call beside it.
fn batches_tensors(model: &Model, platform: bool) -> bool {
    let free_batch =
        |tensors: &[TensorMetadata]| tensors.iter().all(|t| t.shape.first().is_some_and(|d| *d < 0));
    (platform || model.task != Task::Raw) && free_batch(&model.inputs) && free_batch(&model.outputs)
}

/// Lowers the calling thread to the lowest priority (Linux: niceness 19), for background work such
/// as training: serving threads always go first.
pub fn lower_this_thread_priority() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::warn!(error = %err, "could not lower the priority of a background thread");
    }
}

impl Embedder {
    /// One vector per text, on the calling thread.
    ///
    /// # Errors
    /// Tokenization or runtime failures.
    pub fn embed(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>, InferenceError> {
        let output = batcher::run_text(
            &mut self.session,
            &self.tokenizer,
            &self.plan,
            texts,
            &self.options,
        )?;
        Ok(output.rows().map(<[f32]>::to_vec).collect())
    }
}

fn metadata<'a>(outlets: impl Iterator<Item = (&'a str, &'a ort::value::ValueType)>) -> Vec<TensorMetadata> {
    outlets
        .map(|(name, dtype)| TensorMetadata {
            name: name.to_owned(),
            datatype: DataType::name_of(dtype),
            shape: match dtype {
                ort::value::ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
                _ => Vec::new(),
            },
        })
        .collect()
}

/// A model ready to answer calls. Dropping it stops its workers once they have answered what is
/// queued.
#[derive(Debug)]
pub struct LoadedModel {
    info: Model,
    queue: Arc<FairQueue>,
    timeout: Duration,
    stats: Arc<batcher::Stats>,
    /// The task of each worker, as its supervisor last started it.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the tests that kill a worker"))]
    workers: Vec<Arc<CurrentWorker>>,
}

/// Records a model call's stages for the request's `Server-Timing`: its wait in the queue, for its
/// run's thread, its run, and from the run's answer until the caller's task ran again.
fn record_stages(stages: &batcher::Stages) {
    crate::timing::record("queue", stages.waited);
    crate::timing::record("thread", stages.thread);
    crate::timing::record("run", stages.ran);
    crate::timing::record("wake", stages.answered.elapsed());
}

/// Makes one more session of a loaded model.
type NewSession = dyn Fn() -> Result<ort::session::Session, InferenceError> + Send + Sync;

/// The task a supervisor runs its worker in.
#[derive(Debug, Default)]
struct CurrentWorker(std::sync::Mutex<Option<tokio::task::AbortHandle>>);

/// The most the warm-ups of a tenant's model may take together, in a load (the inference timeout if
/// it is shorter). A load holds the one turn every tenant's loads take, and a real graph answers one
/// short text in milliseconds, in seconds on a cold GPU; a graph that loops for longer is refused.
pub const TENANT_WARM_UP: Duration = Duration::from_secs(10);

/// Longest wait between attempts to replace a dead worker whose new session fails.
const MOST_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps one of a model's workers serving. A worker ends by itself only once its model is unloaded;
/// one that dies otherwise (a panic outside a batch, its task killed) took its session with it: the
/// supervisor makes a new session, warms it up and starts a new worker on the same queue, retrying with
/// a growing pause while the session cannot be made. Meanwhile the model has one worker fewer, and
/// readiness says so when it has none.
fn supervise(
    first: batcher::Worker,
    new_session: Arc<NewSession>,
    current: Arc<CurrentWorker>,
) -> impl Future<Output = ()> + Send + 'static {
    let setup = first.setup.clone();
    // Counted as serving now, while the model is being loaded (see `Worker::run`).
    let mut running = first.run();
    async move {
        loop {
            let task = tokio::spawn(running);
            *current
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task.abort_handle());
            let died = match task.await {
                Ok(()) => return,
                Err(err) => err,
            };
            if setup.queue.is_closed() {
                return;
            }
            setup
                .stats
                .restarts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("plinth_inference_worker_restarts_total", "model" => setup.metrics_label.clone())
                .increment(1);
            tracing::error!(model = %setup.model, error = %died, "an inference worker died; starting another");
            match replacement(&setup, &new_session).await {
                Some(worker) => running = worker.run(),
                None => return,
            }
        }
    }
}

/// A new worker for a dead one: a new session, warmed up, retried with a growing pause while it
/// cannot be made. `None` once the model is unloaded or the runtime shuts down.
async fn replacement(setup: &batcher::WorkerSetup, new_session: &Arc<NewSession>) -> Option<batcher::Worker> {
    let mut pause = Duration::from_millis(100);
    loop {
        let made = tokio::task::spawn_blocking({
            let (new_session, setup) = (new_session.clone(), setup.clone());
            move || {
                let mut worker = batcher::Worker {
                    session: new_session()?,
                    setup,
                };
                let limit = worker.setup.timeout;
                worker.warm_up(Some((Instant::now() + limit, limit)), false)?;
                Ok::<_, InferenceError>(worker)
            }
        })
        .await;
        match made {
            Ok(Ok(worker)) => return Some(worker),
            Ok(Err(err)) => {
                tracing::error!(model = %setup.model, error = %err, "cannot replace an inference worker yet");
            }
            // The runtime is shutting down.
            Err(_) => return None,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MOST_RESTART_BACKOFF);
        if setup.queue.is_closed() {
            return None;
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// Most texts in one call.
pub const MAX_TEXTS: usize = 256;
/// Longest text accepted, in bytes (longer token sequences are truncated anyway).
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Tokens a text is cut to, by default ([`EngineSettings::max_tokens`]).
pub const MAX_TOKENS: usize = 128;
/// Tokens a row of the platform's text graphs can hold (their position embeddings).
pub const MAX_POSITIONS: usize = 512;

impl LoadedModel {
    #[must_use]
    pub fn info(&self) -> &Model {
        &self.info
    }

    /// Counters since load.
    #[must_use]
    pub fn statistics(&self) -> ModelStatistics {
        use std::sync::atomic::Ordering::Relaxed;
        ModelStatistics {
            name: self.info.name.clone(),
            version: self.info.version.to_string(),
            success_count: self.stats.success.load(Relaxed),
            failure_count: self.stats.failure.load(Relaxed),
            inference_count: self.stats.items.load(Relaxed),
            execution_count: self.stats.executions.load(Relaxed),
        }
    }

    /// Whether the model can serve: a worker is running, and runs are not failing one after another
    /// on the runtime's side.
    #[must_use]
    pub fn serving(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.workers.load(Relaxed) > 0
            && self.stats.failing_runs.load(Relaxed) < batcher::FAILING_RUNS_NOT_READY
    }

    async fn submit<T>(
        &self,
        share: Share,
        items: usize,
        work: Work,
        response: oneshot::Receiver<Result<T, InferenceError>>,
    ) -> Result<T, InferenceError> {
        if let Err(err) = self.queue.push(work, share, items) {
            if matches!(err, InferenceError::TenantQueueFull(_)) {
                metrics::counter!("plinth_inference_tenant_queue_full_total").increment(1);
            }
            return Err(err);
        }
        match tokio::time::timeout(self.timeout, response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferenceError::Runtime("the model's worker stopped".into())),
            Err(_) => Err(InferenceError::Timeout),
        }
    }

    async fn run_text(
        &self,
        share: Share,
        texts: Vec<String>,
        want: Task,
    ) -> Result<TextOutput, InferenceError> {
        check_texts(&self.info, &texts, want)?;
        let (reply, response) = oneshot::channel();
        let items = texts.len();
        let output = self
            .submit(share, items, Work::Text { texts, reply }, response)
            .await?;
        record_stages(&output.stages);
        Ok(output)
    }

    /// Scores each text against the model's labels.
    ///
    /// # Errors
    /// Wrong task, bad input, overload or timeout.
    pub async fn classify(
        &self,
        share: Share,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, InferenceError> {
        let output = self.run_text(share, texts, Task::TextClassification).await?;
        Ok(output
            .rows()
            .map(|scores| {
                let scores: Vec<LabelScore> = self
                    .info
                    .labels
                    .iter()
                    .zip(scores)
                    .map(|(label, score)| LabelScore {
                        label: label.clone(),
                        score: *score,
                    })
                    .collect();
                let best = scores.iter().max_by(|a, b| a.score.total_cmp(&b.score)).cloned();
                let best = best.unwrap_or(LabelScore {
                    label: String::new(),
                    score: 0.0,
                });
                Classification {
                    label: best.label,
                    score: best.score,
                    scores,
                }
            })
            .collect())
    }

    /// One vector per text.
    ///
    /// # Errors
    /// Wrong task, bad input, overload or timeout.
    pub async fn embed(&self, share: Share, texts: Vec<String>) -> Result<Vec<Vec<f32>>, InferenceError> {
        let output = self.run_text(share, texts, Task::Embedding).await?;
        Ok(output.rows().map(<[f32]>::to_vec).collect())
    }

    /// Runs the model on protocol tensors, returning the requested outputs (all when `None`).
    ///
    /// # Errors
    /// Inputs that do not match the model's names, datatypes or ranks; overload or timeout.
    pub async fn infer(
        &self,
        share: Share,
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
    ) -> Result<Vec<Tensor>, InferenceError> {
        check_tensors(&self.info, &inputs, outputs.as_deref())?;
        // Queued at the cost of its batch: a tenant's share counts items, not calls.
        let items = usize::try_from(Self::batch_size(&inputs)?).unwrap_or(1);
        let (reply, response) = oneshot::channel();
        let output = self
            .submit(
                share,
                items,
                Work::Raw {
                    inputs,
                    outputs,
                    reply,
                },
                response,
            )
            .await?;
        record_stages(&output.stages);
        Ok(output.tensors)
    }

    /// Items in a protocol request, for metering: the batch dimension (the first) that every input
    /// with a dimension shares. Inputs that disagree are refused, or a request could run a large
    /// batch through one input and be billed for the small one of another.
    ///
    /// # Errors
    /// `InvalidInput` when two inputs have different first dimensions, or one has an empty dimension.
    pub fn batch_size(inputs: &[Tensor]) -> Result<i64, InferenceError> {
        let mut batch: Option<(&str, i64)> = None;
        for tensor in inputs {
            // An empty dimension makes an input of no elements whatever its batch claims: nothing to
            // run, and a batch size no data backs would be billed (and summed) as given.
            if tensor.shape.contains(&0) {
                return Err(InferenceError::InvalidInput(format!(
                    "input `{}` has a dimension of size 0",
                    tensor.name
                )));
            }
            let Some(&first) = tensor.shape.first() else {
                continue;
            };
            match batch {
                None => batch = Some((&tensor.name, first)),
                Some((name, size)) if size != first => {
                    return Err(InferenceError::InvalidInput(format!(
                        "inputs must agree on the batch (first) dimension: `{name}` has {size}, `{}` has {first}",
                        tensor.name
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(batch.map_or(1, |(_, size)| size).max(1))
    }
}

/// Refuses texts a model described by `info` cannot run for `want`: another task, none or too many,
/// one too long. Checked again by the model; a caller may check first, before loading it.
///
/// # Errors
/// `WrongTask` or `InvalidInput`, saying which.
pub fn check_texts(info: &Model, texts: &[String], want: Task) -> Result<(), InferenceError> {
    if info.task != want {
        return Err(InferenceError::WrongTask(format!(
            "model `{}` is a {:?} model and cannot serve this task",
            info.name, info.task
        )));
    }
    if texts.is_empty() || texts.len() > MAX_TEXTS {
        return Err(InferenceError::InvalidInput(format!(
            "inputs: give 1 to {MAX_TEXTS} texts"
        )));
    }
    if let Some(i) = texts.iter().position(|t| t.len() > MAX_TEXT_BYTES) {
        return Err(InferenceError::InvalidInput(format!(
            "inputs[{i}]: longer than {MAX_TEXT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Refuses protocol inputs that do not fit the signature in `info` (names, datatypes, ranks and fixed
/// dimensions, each name once), or outputs it does not have. Checked again by the model; a caller may
/// check first, before loading it.
///
/// # Errors
/// `InvalidInput`, saying which.
pub fn check_tensors(
    info: &Model,
    inputs: &[Tensor],
    outputs: Option<&[String]>,
) -> Result<(), InferenceError> {
    for expected in &info.inputs {
        let Some(given) = inputs.iter().find(|t| t.name == expected.name) else {
            return Err(InferenceError::InvalidInput(format!(
                "missing input `{}`",
                expected.name
            )));
        };
        if given.data.datatype().as_str() != expected.datatype {
            return Err(InferenceError::InvalidInput(format!(
                "input `{}`: datatype {} given, the model expects {}",
                expected.name,
                given.data.datatype().as_str(),
                expected.datatype
            )));
        }
        let fits = given.shape.len() == expected.shape.len()
            && given
                .shape
                .iter()
                .zip(&expected.shape)
                .all(|(g, e)| *e < 0 || g == e);
        if !fits {
            return Err(InferenceError::InvalidInput(format!(
                "input `{}`: shape {:?} does not fit the model's {:?}",
                expected.name, given.shape, expected.shape
            )));
        }
    }
    if let Some(extra) = inputs
        .iter()
        .find(|t| !info.inputs.iter().any(|e| e.name == t.name))
    {
        return Err(InferenceError::InvalidInput(format!(
            "the model has no input `{}`",
            extra.name
        )));
    }
    if let Some(unknown) = outputs
        .into_iter()
        .flatten()
        .find(|o| !info.outputs.iter().any(|e| &e.name == *o))
    {
        return Err(InferenceError::InvalidInput(format!(
            "the model has no output `{unknown}`"
        )));
    }
    // Each name once: an output asked for a million times would be copied out a million times,
    // and an input given twice leaves which one runs to chance.
    if let Some(twice) = repeated(inputs.iter().map(|t| t.name.as_str())) {
        return Err(InferenceError::InvalidInput(format!(
            "input `{twice}` is given more than once"
        )));
    }
    if let Some(twice) = repeated(outputs.into_iter().flatten().map(String::as_str)) {
        return Err(InferenceError::InvalidInput(format!(
            "output `{twice}` is asked for more than once"
        )));
    }
    if info.platform {
        within_text_bounds(inputs)?;
    }
    Ok(())
}

/// A protocol call to a platform model may cost no more than its text calls may: at most
/// [`MAX_TEXTS`] rows of at most [`MAX_POSITIONS`] tokens, and rows × tokens² (what a transformer's
/// attention takes, in each layer) at most what [`MAX_TEXTS`] texts of [`MAX_TOKENS`] take. Those graphs
/// run outside the tenants' bounded run memory: token ids of `[1000, 512]`, 12 MB sent, would ask for
/// tens of gigabytes in each layer.
fn within_text_bounds(inputs: &[Tensor]) -> Result<(), InferenceError> {
    for tensor in inputs {
        if !text_cost_fits(rows(tensor), tensor.shape.get(1..).unwrap_or_default()) {
            return Err(InferenceError::InvalidInput(format!(
                "input `{}`: shape {:?} is larger than this model runs: at most {MAX_TEXTS} rows of at \
                 most {MAX_POSITIONS} tokens, and rows × tokens² at most {MAX_TEXTS} × {MAX_TOKENS}²",
                tensor.name, tensor.shape
            )));
        }
    }
    Ok(())
}

/// A protocol input's rows: its first dimension (one for a scalar; beyond `usize`, the most).
pub(crate) fn rows(tensor: &Tensor) -> usize {
    tensor
        .shape
        .first()
        .map_or(1, |&rows| usize::try_from(rows).unwrap_or(usize::MAX))
}

/// Whether `rows` rows of `row_shape` (a row's length is its elements) are within what a text call
/// may cost (see [`within_text_bounds`]): also checked for calls joined into one run.
pub(crate) fn text_cost_fits(rows: usize, row_shape: &[i64]) -> bool {
    let length = row_shape
        .iter()
        .map(|&dim| usize::try_from(dim).unwrap_or(usize::MAX))
        .try_fold(1_usize, usize::checked_mul)
        .unwrap_or(usize::MAX);
    let attention = length
        .checked_mul(length)
        .and_then(|square| square.checked_mul(rows));
    rows <= MAX_TEXTS
        && length <= MAX_POSITIONS
        && attention.is_some_and(|attention| attention <= MAX_TEXTS * MAX_TOKENS * MAX_TOKENS)
}

/// The first name that comes again in `names`, if any.
fn repeated<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen = std::collections::HashSet::new();
    names.into_iter().find(|name| !seen.insert(*name))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::Ordering::Relaxed;

    use futures_util::future::join_all;

    use super::*;

    #[test]
    fn the_built_in_graphs_follow_where_models_run() {
        let engine = |provider| {
            Engine::new(EngineSettings {
                ort_dylib: ort_dylib(),
                provider,
                ..EngineSettings::default()
            })
            .expect("ONNX Runtime (scripts/setup.sh fetches it)")
        };
        // The CPU serves the integer products; CUDA, which has no kernels for them, the float ones.
        assert!(!engine(ExecutionProvider::Cpu).prefers_gpu());
        assert!(engine(ExecutionProvider::Cuda).prefers_gpu());
    }

    fn ort_dylib() -> PathBuf {
        std::env::var_os("PLINTH_ORT_DYLIB").map_or_else(fetched_ort_dylib, PathBuf::from)
    }

    fn sentiment(sessions: usize) -> Arc<LoadedModel> {
        sentiment_with(|settings| settings.sessions_per_model = sessions)
    }

    fn sentiment_with(settings: impl FnOnce(&mut EngineSettings)) -> Arc<LoadedModel> {
        let ort_dylib = ort_dylib();
        let models =
            std::env::var_os("PLINTH_MODELS_DIR").map_or_else(|| cache_dir().join("models"), PathBuf::from);
        let mut chosen = EngineSettings {
            ort_dylib,
            ..EngineSettings::default()
        };
        settings(&mut chosen);
        let engine = Engine::new(chosen).expect("ONNX Runtime (scripts/setup.sh fetches it)");
        engine
            .load(&ModelFiles {
                name: "sentiment".into(),
                version: 1,
                task: Task::TextClassification,
                labels: vec!["negative".into(), "neutral".into(), "positive".into()],
                model: models.join("sentiment.onnx"),
                tokenizer: Some(models.join("tokenizer.json")),
                platform: true,
            })
            .expect("the built-in sentiment model (scripts/setup.sh prepares it)")
    }

    /// Kills each worker's task as a crash would, once its supervisor has started it.
    async fn kill_workers(model: &LoadedModel) {
        for worker in &model.workers {
            let running = || {
                worker
                    .0
                    .lock()
                    .expect("lock")
                    .clone()
                    .filter(|task| !task.is_finished())
            };
            until("the worker's task is running", || running().is_some()).await;
            running().expect("a running worker").abort();
        }
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..300 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting until {what}");
    }

    async fn classify(model: &LoadedModel) -> Result<String, InferenceError> {
        let answer = model
            .classify(Share::platform(), vec!["What a wonderful day".into()])
            .await?;
        Ok(answer[0].label.clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_workers_are_replaced_and_calls_in_flight_are_answered() {
        let model = sentiment(2);
        let before = classify(&model).await.expect("a call before");
        // Calls in flight while every worker is killed: each is answered, by the run it was in or by a
        // replacement; none waits for ever.
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let model = model.clone();
                tokio::spawn(async move { classify(&model).await })
            })
            .collect();
        kill_workers(&model).await;
        for call in calls {
            let label = tokio::time::timeout(Duration::from_secs(20), call)
                .await
                .expect("a call in flight hung")
                .expect("task");
            assert_eq!(label.expect("a call in flight failed"), before);
        }
        until("both workers are replaced", || {
            model.stats.restarts.load(Relaxed) == 2 && model.stats.workers.load(Relaxed) == 2
        })
        .await;
        assert!(model.serving());
        // And again: a replacement is supervised like the first.
        kill_workers(&model).await;
        until("the replacements are replaced", || {
            model.stats.restarts.load(Relaxed) == 4 && model.stats.workers.load(Relaxed) == 2
        })
        .await;
        assert_eq!(classify(&model).await.expect("a call after"), before);
    }

    /// A protocol call of one text's tokens (ids only vary), `[1, tokens.len()]`.
    fn tokens_call(tokens: &[i64]) -> Vec<Tensor> {
        let shape = vec![1, i64::try_from(tokens.len()).expect("length")];
        let tensor = |name: &str, data: Vec<i64>| Tensor {
            name: name.into(),
            shape: shape.clone(),
            data: crate::tensor::TensorData::Int64(data),
        };
        vec![
            tensor("input_ids", tokens.to_vec()),
            tensor("attention_mask", vec![1; tokens.len()]),
            tensor("token_type_ids", vec![0; tokens.len()]),
        ]
    }

    fn floats(outputs: &[Tensor]) -> Vec<f32> {
        outputs
            .iter()
            .flat_map(|output| match &output.data {
                crate::tensor::TensorData::Fp32(values) => values.clone(),
                other => panic!("{} is not FP32: {other:?}", output.name),
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tensor_calls_share_runs_and_each_gets_its_own_rows() {
        // One session, first come first served, a run waiting a moment for company: calls sent at
        // once share a run in the order they came, whoever sends them.
        let model = sentiment_with(|settings| {
            settings.sessions_per_model = 1;
            settings.scheduling = Scheduling::Fifo;
            settings.max_queue_delay = Duration::from_millis(100);
        });
        let texts: Vec<Vec<i64>> = (0..12)
            .map(|i| vec![101, 2_000 + i * 37, 2_023, 3_000 + i, 102])
            .collect();
        let mut alone = Vec::new();
        for tokens in &texts {
            let outputs = model.infer(Share::platform(), tokens_call(tokens), None).await;
            alone.push(floats(&outputs.expect("a call alone")));
        }
        let tenant = |name: &str| Share {
            tenant: Arc::from(name),
            weight: 1,
            plan: Arc::from("test"),
        };
        // Calls are joined in this task rather than spawned: each is queued on its first poll, so all of
        // them are queued together, however late a busy machine would have run spawned tasks.
        let call = |share: Share, inputs: Vec<Tensor>| {
            let model = model.clone();
            async move { model.infer(share, inputs, None).await }
        };
        let same_as_alone = |got: &[f32], expected: &[f32]| {
            assert_eq!(got.len(), expected.len());
            for (got, expected) in got.iter().zip(expected) {
                assert!(
                    (got - expected).abs() < 1e-4,
                    "{got} in a shared run, {expected} alone"
                );
            }
        };
        let from_two_tenants = || -> Vec<_> {
            texts
                .iter()
                .enumerate()
                .map(|(i, tokens)| call(tenant(if i % 2 == 0 { "a" } else { "b" }), tokens_call(tokens)))
                .collect()
        };

        // Each text from two tenants at once: fewer runs than calls, none split, each caller its rows.
        let runs_before = model.stats.executions.load(Relaxed);
        for (answer, expected) in join_all(from_two_tenants()).await.into_iter().zip(&alone) {
            same_as_alone(&floats(&answer.expect("a call beside others")), expected);
        }
        let runs = model.stats.executions.load(Relaxed) - runs_before;
        assert!(
            runs < 12,
            "12 calls in {runs} runs: tensor calls did not share runs"
        );
        assert_eq!(model.stats.split_runs.load(Relaxed), 0, "a shared run was split");

        // Again beside a call whose token id is past the vocabulary (the runtime refuses it) and one of
        // another length (which runs apart): the shared run fails, is split, and only the bad call fails.
        let (together, refused, longer) = tokio::join!(
            join_all(from_two_tenants()),
            call(
                tenant("mallory"),
                tokens_call(&[101, 1_000_000_000, 102, 102, 102]),
            ),
            call(tenant("c"), tokens_call(&[101, 2_000, 2_023, 3_000, 3_001, 102])),
        );
        for (answer, expected) in together.into_iter().zip(&alone) {
            same_as_alone(&floats(&answer.expect("a call beside a bad one")), expected);
        }
        let err = refused.expect_err("an id past the vocabulary");
        assert!(matches!(err, InferenceError::InvalidInput(_)), "{err}");
        longer.expect("a call of another length");
        assert!(
            model.stats.split_runs.load(Relaxed) > 0,
            "the bad call never shared a run"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_models_only_worker_is_replaced_when_killed() {
        let model = sentiment(1);
        kill_workers(&model).await;
        // The kill lands at the worker's next await; its count drops with it.
        until("the model is replaced", || {
            model.stats.restarts.load(Relaxed) == 1
        })
        .await;
        until("the model serves again", || model.serving()).await;
        assert_eq!(classify(&model).await.expect("a call after"), "positive");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_calling_one_at_a_time_keeps_normal_priority() {
        // Runs of two: eight calls at once are four runs' worth, whenever the workers take them.
        let model = sentiment_with(|settings| {
            settings.sessions_per_model = 3;
            settings.max_batch = 2;
        });
        for _ in 0..50 {
            classify(&model).await.expect("a call");
        }
        // Each call's run slot is given back before its answer is sent, so the next call never finds
        // the last one still running.
        assert_eq!(model.stats.background_runs.load(Relaxed), 0);
        // Joined in one task, the eight are queued together (each on its first poll): a run is taken
        // while the tenant has calls queued behind it or another run under way.
        for answer in join_all((0..8).map(|_| classify(&model))).await {
            answer.expect("a call");
        }
        assert!(
            model.stats.background_runs.load(Relaxed) > 0,
            "calls beyond one run's worth go at low priority"
        );
    }

    /// A run in the background finishes on a thread that waits for a core behind everyone else's; until
    /// its worker has the session back, the session is not free, and its tenant cannot take the one
    /// kept free for other tenants meanwhile. With its results the run no longer counts among the
    /// tenant's runs, so that its next call is judged by what it has in hand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_run_in_the_background_holds_its_session_until_its_worker_is_back() {
        use std::sync::mpsc::channel;
        const WAIT: Duration = Duration::from_secs(60);
        // Two sessions: a tenant may hold one run, the other is kept free for other tenants.
        let model = sentiment_with(|settings| {
            settings.sessions_per_model = 2;
            settings.max_batch = 1;
        });
        let heavy = Share {
            // A plan of its own: another test counts the queue waits of its plans.
            tenant: Arc::from("flooding"),
            weight: 1,
            plan: Arc::from("flooding-plan"),
        };
        // The runtime's one worker thread, which the model's workers run on, is held by a task: first
        // while both calls are queued, so the first runs in the background with the second behind
        // it; then, from the moment that run is handed to its thread, so that the run's worker cannot
        // get its session back, as when its thread waits for a core.
        let (held, go, release) = (channel(), channel::<()>(), channel::<()>());
        let stats = model.stats.clone();
        tokio::spawn(async move {
            held.0.send(()).expect("the test waits");
            go.1.recv().expect("the calls are queued");
            for _ in 0..1_000_000 {
                if stats.background_runs.load(Relaxed) > 0 {
                    held.0.send(()).expect("the test waits");
                    let _ = release.1.recv();
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        held.1.recv_timeout(WAIT).expect("the worker thread is held");
        // As many tokens as the model reads: a run of tens of milliseconds.
        let long = vec!["word ".repeat(600)];
        let mut first = Box::pin(model.classify(heavy.clone(), long.clone()));
        let mut second = Box::pin(model.classify(heavy.clone(), long));
        // Polled once each, both are queued.
        std::future::poll_fn(|cx| {
            assert!(first.as_mut().poll(cx).is_pending());
            assert!(second.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        go.0.send(()).expect("the holding task waits");
        held.1
            .recv_timeout(WAIT)
            .expect("the first call runs in the background, and the worker thread is held again");
        // The answer comes from the run's thread, not from the model's workers.
        first.await.expect("the first call");
        assert_eq!(
            model.queue.runs_of("flooding"),
            (1, 0),
            "answered, but its worker is not back: the run holds its session, and only that"
        );
        release.0.send(()).expect("the holding task waits");
        second.await.expect("the second call");
        assert_eq!(model.queue.runs_of("flooding"), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_sent_back_counts_its_wait_in_the_queue_once() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder of these tests");
        // One session whose runs wait half a second for company, so that calls sent apart meet.
        let model = sentiment_with(|settings| {
            settings.sessions_per_model = 1;
            settings.max_queue_delay = Duration::from_millis(500);
        });
        let share = |tenant: &str| Share {
            tenant: Arc::from(tenant),
            weight: 1,
            plan: Arc::from(format!("{tenant}-plan")),
        };
        let leading = {
            let model = model.clone();
            tokio::spawn(async move { model.classify(share("light"), vec!["Shares rose".into()]).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Longer than the light tenant's text: sent back from its run, to run on its own.
        let long = format!("{} and the outlook was raised", "word ".repeat(60));
        model
            .classify(share("heavy"), vec![long])
            .await
            .expect("the long call");
        leading.await.expect("task").expect("the short call");
        assert_eq!(
            model.stats.executions.load(Relaxed),
            2,
            "the long call ran on its own"
        );
        // A snapshot drains histograms: one for both.
        let snapshot = snapshotter.snapshot().into_vec();
        let samples = |plan: &str| {
            snapshot
                .iter()
                .filter(|(key, ..)| {
                    key.key().name() == "plinth_inference_queue_wait_seconds"
                        && key.key().labels().any(|label| label.value() == plan)
                })
                .map(|(.., value)| match value {
                    DebugValue::Histogram(samples) => samples.len(),
                    other => panic!("not a histogram: {other:?}"),
                })
                .sum::<usize>()
        };
        assert_eq!((samples("light-plan"), samples("heavy-plan")), (1, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unloaded_models_workers_stay_stopped() {
        let model = sentiment(1);
        let stats = model.stats.clone();
        drop(model);
        until("the worker stops", || stats.workers.load(Relaxed) == 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(stats.restarts.load(Relaxed), 0);
        assert_eq!(stats.workers.load(Relaxed), 0);
    }
}
