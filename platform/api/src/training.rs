//! Fine-tuning as a service: datasets in (checked, sealed), training jobs run in the background on
//! their own low-priority threads, a trained job deployed as a version of a tenant model (through the
//! same path as an upload) or exported as one ONNX file.
//!
//! A job's work (embedding every text with the base model, then training the head) runs on a thread
//! of its own at the lowest priority, with one ONNX Runtime thread: serving always goes first. The
//! async side writes its progress and checkpoints, and stops it when the job is cancelled, deleted
//! or taken over. Runners on every replica claim queued jobs from the database; a job whose runner
//! goes quiet is queued again and resumes from its last epoch.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use plinth_core::ErrorCode;
use plinth_core::id::{DatasetId, TenantId};
use plinth_core::inference::{Model, Task};
use plinth_core::training::{Dataset, NewTrainingJob, SplitSizes, TrainingJob, TrainingProgress};
use plinth_core::{Micros, training::Evaluation};
use plinth_store::audit::Who;
use plinth_store::auth::Principal;
use plinth_store::ledger::UsageRecord;
use plinth_store::training::{ClaimedJob, Heartbeat, JobEnd, NewDataset};
use plinth_training::dataset::{self, Example, Format, Limits};
use plinth_training::head::{self, Checkpoint, Examples, Head, Settings};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};
use crate::multipart::{Bounds, Form};
use crate::state::AppState;
use crate::uploads::invalid;

/// Training's settings, from the server's configuration.
#[derive(Debug, Clone)]
pub struct TrainingSettings {
    /// Where the platform's base models are (`minilm-embed.onnx` and its `tokenizer.json`).
    pub base_models_dir: PathBuf,
    /// The largest dataset file accepted (the plan's bytes of datasets bound it too).
    pub max_dataset_bytes: u64,
    /// Jobs this replica runs at once.
    pub concurrent_jobs: usize,
    /// How often an idle runner looks for queued jobs.
    pub poll: Duration,
    /// A job's runner is presumed gone when it has not been heard from for this long: the job is
    /// queued again and resumes from its last epoch. Runners write at least six times as often.
    pub stale_after: Duration,
}
/// Datasets being read and checked at once, across tenants: each holds its file in memory.
static CHECKING_DATASETS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
/// Models being assembled (deploys, exports) at once, across tenants: each holds two copies of the
/// base graph in memory.
static ASSEMBLING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
/// How long a request waits for one of those turns before it is told to come back.
const TURN_WAIT: Duration = Duration::from_secs(10);

/// A turn at `semaphore`, or `503` with `Retry-After`.
async fn turn(
    semaphore: &'static tokio::sync::Semaphore,
) -> ApiResult<tokio::sync::SemaphorePermit<'static>> {
    tokio::time::timeout(TURN_WAIT, semaphore.acquire())
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::Unavailable,
                "the server is busy with other uploads; retry shortly",
            )
            .retry_after(Duration::from_secs(5))
        })?
        .map_err(ApiError::internal)
}

/// Tenants with an export under way: one each, so one tenant cannot take every assembly turn.
static EXPORTING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<TenantId>>> =
    std::sync::LazyLock::new(Default::default);

/// A tenant's one turn at something, given back when dropped.
struct OneAtATime {
    set: &'static std::sync::Mutex<std::collections::HashSet<TenantId>>,
    tenant: TenantId,
}

impl OneAtATime {
    fn take(
        set: &'static std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<TenantId>>>,
        tenant: &TenantId,
    ) -> ApiResult<Self> {
        let set: &'static std::sync::Mutex<_> = set;
        if !set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.clone())
        {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "one export at a time: wait for the one under way",
            )
            .retry_after(Duration::from_secs(5)));
        }
        Ok(Self {
            set,
            tenant: tenant.clone(),
        })
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.tenant);
    }
}

/// Texts embedded per run of the base model.
const EMBED_BATCH: usize = 32;
/// Progress is written at most this often while embedding.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

fn invalid_dataset(err: dataset::DatasetError) -> ApiError {
    ApiError::new(ErrorCode::InvalidDataset, err.0)
}

/// The most a dataset's `name` part may hold.
const MAX_NAME_BYTES: u64 = 1024;

/// Handles `POST /v1/datasets`: a `file` part (`.jsonl` or `.csv`) and an optional `name` part.
pub(crate) async fn upload_dataset(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    req: &actix_web::HttpRequest,
    payload: actix_web::web::Payload,
) -> ApiResult<Dataset> {
    let limit = state
        .settings
        .training
        .max_dataset_bytes
        .min(auth.isolation.max_dataset_bytes);
    // One upload at a time per tenant, models and datasets alike: each is staged on disk first.
    let _receiving = state.hosting.receive_upload(&auth.tenant_id)?;
    let staging = state.hosting.staging_dir();
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(ApiError::internal)?;
    let mut form = Form::new(
        req,
        payload,
        Bounds::total(limit.saturating_add(MAX_NAME_BYTES + crate::multipart::OVERHEAD)),
    );
    let (mut name, mut file) = (None, None);
    while let Some(mut part) = form.next_part().await? {
        match part.name() {
            "name" if name.is_none() => {
                let bytes = part.read(MAX_NAME_BYTES, "the name").await?;
                name = Some(String::from_utf8(bytes).map_err(|_| invalid("name: not UTF-8"))?);
            }
            "file" if file.is_none() => {
                let file_name = part.file_name().map(ToOwned::to_owned);
                let media_type = part.content_type();
                let format =
                    Format::detect(file_name.as_deref(), media_type.as_deref()).ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidDataset,
                            "the file must be JSON Lines (`.jsonl`) or CSV (`.csv`)",
                        )
                    })?;
                // To disk first, as model uploads: a slow client holds a file, not memory or a turn.
                let staged = crate::uploads::stage(&mut part, &staging, limit, "the dataset").await?;
                file = Some((file_name, format, staged));
            }
            "name" | "file" => {
                return Err(invalid(format!("the `{}` part is sent twice", part.name())));
            }
            other => {
                return Err(invalid(format!(
                    "unexpected part `{other}`: send `file` and `name`"
                )));
            }
        }
    }
    let Some((file_name, format, staged)) = file else {
        return Err(invalid("the `file` part (the .jsonl or .csv file) is missing"));
    };
    // A form's name field left blank names the dataset after its file.
    let name = name
        .filter(|name| !name.trim().is_empty())
        .or_else(|| file_name.map(|f| f.rsplit_once('.').map_or(f.as_str(), |(stem, _)| stem).to_owned()))
        .unwrap_or_else(|| "dataset".to_owned());
    let name = name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(invalid("name: 1-100 characters, no control characters"));
    }
    let _turn = turn(&CHECKING_DATASETS).await?;
    let bytes = tokio::fs::read(staged.path()).await.map_err(ApiError::internal)?;
    drop(staged);
    let secrets = state.secrets.clone();
    let (summary, sealed) = tokio::task::spawn_blocking(move || {
        let examples = dataset::parse(&bytes, format, &Limits::default()).map_err(invalid_dataset)?;
        let summary = dataset::summarize(&examples);
        let plain = serde_json::to_vec(&examples).map_err(ApiError::internal)?;
        Ok::<_, ApiError>((summary, secrets.seal(&plain)?))
    })
    .await
    .map_err(ApiError::internal)??;
    let new = NewDataset {
        name,
        format: format.as_str().to_owned(),
        // What the dataset takes in storage (sealed), which is what the plan's quota counts.
        size_bytes: sealed.len() as u64,
        summary,
        sealed_examples: sealed,
    };
    Ok(state
        .store
        .create_dataset(&auth.tenant_id, who, new, &auth.isolation)
        .await?)
}

/// Handles `POST /v1/training-jobs`.
pub(crate) async fn create_job(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    request: NewTrainingJob,
) -> ApiResult<TrainingJob> {
    state.hosting.check_model_name("model", &request.model)?;
    let account = state.store.billing_account(&auth.tenant_id).await?;
    let price = account.plan.training_price_micros;
    if price.0 > 0 && !state.billing.collects_training() {
        return Err(ApiError::new(
            ErrorCode::PaymentRequired,
            "training cannot be billed here yet: the operator has not set a Stripe training price",
        ));
    }
    // In Stripe mode a priced job needs a subscription whose items include the training price (one
    // made before the operator added it has none): its meter is invoiced only then.
    if price.0 > 0
        && state.billing.mode() == plinth_core::billing::PaymentMode::Stripe
        && !account.training_item
    {
        return Err(ApiError::new(
            ErrorCode::PaymentRequired,
            "the subscription does not include training yet: change plan (or subscribe again) to add it",
        ));
    }
    if price.0 > 0 && account.status != plinth_core::api::SubscriptionStatus::Active {
        return Err(ApiError::new(
            ErrorCode::PaymentRequired,
            "the subscription's payment is past due: pay the open invoice to train",
        ));
    }
    let base_model = request
        .base_model
        .unwrap_or_else(|| plinth_inference::BASE_MODEL.to_owned());
    if base_model != plinth_inference::BASE_MODEL {
        return Err(invalid(format!(
            "base_model: `{}` is the base model training adapts",
            plinth_inference::BASE_MODEL
        )));
    }
    let dataset_id: DatasetId = request
        .dataset
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::NotFound, "no such dataset"))?;
    let dataset = state.store.dataset(&auth.tenant_id, dataset_id.as_str()).await?;
    let labels: Vec<String> = dataset.summary.labels.iter().map(|l| l.label.clone()).collect();
    let sizes = split_sizes(&dataset);
    let settings = Settings::resolve(
        &request.hyperparameters,
        usize::try_from(sizes.train).unwrap_or(usize::MAX),
    )
    .map_err(invalid)?;
    let job = plinth_store::training::NewTrainingJob {
        price,
        dataset: dataset_id,
        model: request.model,
        base_model,
        hyperparameters: settings.as_hyperparameters(),
        labels,
        split: sizes,
    };
    Ok(state
        .store
        .create_training_job(&auth.tenant_id, who, job, &auth.isolation)
        .await?)
}

/// The split's sizes for a dataset, as the runner will split it.
fn split_sizes(dataset: &Dataset) -> SplitSizes {
    let mut labels = Vec::new();
    for (i, count) in dataset.summary.labels.iter().enumerate() {
        labels.extend(std::iter::repeat_n(
            i,
            usize::try_from(count.examples).unwrap_or(0),
        ));
    }
    let split = plinth_training::split::stratified(&labels, dataset.summary.labels.len(), 0);
    SplitSizes {
        train: split.train.len() as u64,
        validation: split.validation.len() as u64,
        test: split.test.len() as u64,
    }
}

/// What a succeeded job keeps: the head it trained.
#[derive(Debug, Serialize, Deserialize)]
struct Trained {
    head: Head,
}

/// A succeeded job's head.
async fn trained_head(state: &AppState, tenant: &TenantId, job: &TrainingJob) -> ApiResult<Head> {
    let Some(stored) = state.store.training_checkpoint(tenant, &job.id).await? else {
        return Err(ApiError::new(
            ErrorCode::TrainingJobState,
            format!(
                "the job is {}: only a succeeded job has a model",
                job.status.as_str()
            ),
        ));
    };
    let trained: Trained = serde_json::from_str(&stored).map_err(ApiError::internal)?;
    Ok(trained.head)
}

/// The base graph with a job's head: one self-contained ONNX model.
/// The files of the embedding model that training adapts, as this platform serves it.
fn base_model_files(state: &AppState) -> plinth_inference::ModelFiles {
    plinth_inference::builtin_embedding_files(&state.settings.training.base_models_dir, &state.engine)
}

async fn assembled(state: &AppState, tenant: &TenantId, job: &TrainingJob) -> ApiResult<Vec<u8>> {
    let head = trained_head(state, tenant, job).await?;
    let _turn = turn(&ASSEMBLING).await?;
    let files = base_model_files(state);
    let base = tokio::fs::read(&files.model).await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || plinth_training::onnx::with_head(&base, &head))
        .await
        .map_err(ApiError::internal)
}

/// Handles `GET /v1/training-jobs/{id}/model.onnx`.
pub(crate) async fn export(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    id: &str,
) -> ApiResult<(TrainingJob, Vec<u8>)> {
    let job = state.store.training_job(&auth.tenant_id, id).await?;
    let _one = OneAtATime::take(&EXPORTING, &auth.tenant_id)?;
    let bytes = assembled(state, &auth.tenant_id, &job).await?;
    state
        .store
        .audit(
            Some(&auth.tenant_id),
            who,
            "training_job.export",
            Some(&job.id),
            serde_json::json!({}),
        )
        .await?;
    Ok((job, bytes))
}

/// Handles `POST /v1/training-jobs/{id}/deploy`: the trained model becomes the newest version of the
/// job's model, through the same checks, quota, storage and serving as an upload.
pub(crate) async fn deploy(state: &AppState, auth: &Principal, who: &Who, id: &str) -> ApiResult<Model> {
    let job = state.store.training_job(&auth.tenant_id, id).await?;
    // From claiming the job to marking it deployed or releasing it runs on a task of its own, whether
    // or not the caller waits: stopped in between (a client hanging up), the claim would stay, and
    // every later deploy of the job would answer "being deployed".
    let (state, auth, who) = (state.clone(), auth.clone(), who.clone());
    // A task does not inherit the request's row-security scope: it names the tenant again.
    tokio::spawn(async move {
        let deploy = deploy_claimed(&state, &auth, &who, job);
        plinth_store::row_security::within_tenant(&auth.tenant_id, deploy).await
    })
    .await
    .map_err(ApiError::internal)?
}

/// How old a deployment's claim is before another replica takes it over: the replica that took it
/// stopped (a deployment takes seconds: the model assembled, loaded and checked once).
const DEPLOY_CLAIM_STALE: Duration = Duration::from_secs(600);

/// Claims `job` for deploying, installs its model and marks it deployed, or releases the claim.
async fn deploy_claimed(state: &AppState, auth: &Principal, who: &Who, job: TrainingJob) -> ApiResult<Model> {
    let Some(claim) = state
        .store
        .claim_training_deployment(&auth.tenant_id, &job.id, DEPLOY_CLAIM_STALE)
        .await?
    else {
        let why = match job.deployed_version {
            Some(version) => format!(
                "the job is already deployed as version {version} of `{}`",
                job.model
            ),
            None if job.status == plinth_core::training::TrainingStatus::Succeeded => {
                "the job is being deployed".to_owned()
            }
            None => format!(
                "the job is {}: only a succeeded job has a model",
                job.status.as_str()
            ),
        };
        return Err(ApiError::new(ErrorCode::TrainingJobState, why));
    };
    match install_trained(state, auth, who, &job).await {
        Ok(model) => {
            state
                .store
                .mark_training_job_deployed(&auth.tenant_id, who, &job.id, claim, model.version)
                .await?;
            Ok(model)
        }
        Err(err) => {
            state
                .store
                .release_training_deployment(&auth.tenant_id, &job.id, claim)
                .await?;
            Err(err)
        }
    }
}

/// The trained model and the base tokenizer, through the path of an upload.
async fn install_trained(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    job: &TrainingJob,
) -> ApiResult<Model> {
    let model = assembled(state, &auth.tenant_id, job).await?;
    let files = base_model_files(state);
    let tokenizer_path = files
        .tokenizer
        .ok_or_else(|| ApiError::internal("the base model has no tokenizer"))?;
    let tokenizer = tokio::fs::read(tokenizer_path)
        .await
        .map_err(ApiError::internal)?;
    let version = plinth_hosting::NewVersion {
        name: job.model.clone(),
        task: Task::TextClassification,
        labels: job.labels.clone(),
    };
    let staged_model = state.hosting.stage_bytes(&model).await?;
    drop(model);
    let staged_tokenizer = state.hosting.stage_bytes(&tokenizer).await?;
    Ok(state
        .hosting
        .install(
            &auth.tenant_id,
            who,
            &auth.isolation,
            version,
            staged_model,
            Some(staged_tokenizer),
        )
        .await?)
}

/// Starts this replica's runner: it claims queued jobs (up to `concurrent_jobs` at once) and runs
/// them until the process ends.
#[must_use]
pub fn spawn_training(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let runner = format!("runner-{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let slots = Arc::new(tokio::sync::Semaphore::new(
            state.settings.training.concurrent_jobs.max(1),
        ));
        // Owned here, so stopping the runner stops its jobs (and lets go of the state they hold).
        let mut jobs = tokio::task::JoinSet::new();
        loop {
            while jobs.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            match state
                .store
                .claim_training_job(&runner, state.settings.training.stale_after)
                .await
            {
                Ok(Some(claimed)) => {
                    let (state, runner) = (state.clone(), runner.clone());
                    jobs.spawn(async move {
                        run(&state, &runner, claimed).await;
                        drop(slot);
                    });
                }
                Ok(None) => {
                    drop(slot);
                    tokio::time::sleep(state.settings.training.poll).await;
                }
                Err(err) => {
                    drop(slot);
                    tracing::warn!(error = %err, "cannot look for training jobs");
                    tokio::time::sleep(state.settings.training.poll).await;
                }
            }
        }
    })
}

/// What the training thread tells the runner.
enum Report {
    Embedded(u64),
    /// An epoch ended: its numbers, and the checkpoint to store.
    Epoch {
        epoch: u32,
        stats: Option<plinth_training::head::EpochStats>,
        checkpoint: String,
    },
    Finished(Result<Finished, String>),
}

/// The work a run did, which its bill counts: texts embedded, epochs trained.
#[derive(Debug, Clone, Copy, Default)]
struct Done {
    embedded: u64,
    epochs: u32,
}

enum Finished {
    Trained {
        head: Head,
        evaluation: Evaluation,
        done: Done,
    },
    Stopped {
        done: Done,
    },
}

/// Runs one claimed job to its end (or until it is cancelled or taken over).
async fn run(state: &AppState, runner: &str, claimed: ClaimedJob) {
    let ClaimedJob {
        tenant_id: tenant,
        job,
        checkpoint,
        price,
    } = claimed;
    metrics::gauge!("plinth_training_jobs_running").increment(1.0);
    let end = match prepare(state, &tenant, &job).await {
        Ok(examples) => train_job(state, runner, &tenant, &job, examples, checkpoint).await,
        Err(message) => Some((JobEnd::Failed(message), Done::default())),
    };
    metrics::gauge!("plinth_training_jobs_running").decrement(1.0);
    // `None`: the job was taken from this runner (deleted, or claimed by another after a pause).
    let Some((end, done)) = end else {
        return;
    };
    // Billed only by the runner that still holds the job: one that paused past `stale_after` may have
    // lost it to another, which bills the whole run.
    if !matches!(
        state.store.holds_training_job(&tenant, &job.id, runner).await,
        Ok(true)
    ) {
        return;
    }
    let billed = match bill(state, &tenant, &job, price, done).await {
        Ok(billed) => billed,
        Err(err) => {
            // Not finished: the job stays running, goes stale and is resumed, billing again under
            // the same key (so once).
            tracing::error!(job = %job.id, error = %err, "cannot bill a training job");
            return;
        }
    };
    let outcome = match &end {
        JobEnd::Succeeded { .. } => "succeeded",
        JobEnd::Failed(_) => "failed",
        JobEnd::Cancelled => "cancelled",
    };
    metrics::counter!("plinth_training_jobs_total", "outcome" => outcome).increment(1);
    if let Err(err) = state
        .store
        .finish_training_job(&tenant, &job.id, runner, end, billed)
        .await
    {
        tracing::error!(job = %job.id, error = %err, "cannot record the end of a training job");
    }
}

/// The dataset's examples, opened (off the async workers: a dataset may be large).
async fn prepare(state: &AppState, tenant: &TenantId, job: &TrainingJob) -> Result<Vec<Example>, String> {
    let Some(dataset) = &job.dataset else {
        return Err("the dataset was deleted".into());
    };
    let sealed = match state.store.dataset_examples(tenant, dataset).await {
        Ok(sealed) => sealed,
        Err(plinth_store::StoreError::NotFound(_)) => return Err("the dataset was deleted".into()),
        Err(err) => {
            tracing::error!(job = %job.id, error = %err, "cannot read a training job's dataset");
            return Err("the dataset could not be read; start the job again".into());
        }
    };
    let secrets = state.secrets.clone();
    tokio::task::spawn_blocking(move || {
        let plain = secrets.open(&sealed).map_err(|err| err.to_string())?;
        serde_json::from_slice(&plain).map_err(|err| format!("the stored dataset is unreadable: {err}"))
    })
    .await
    .map_err(|err| err.to_string())?
}

/// The job's charge at the price fixed when it was created: per 1,000 example-epochs (rounded up),
/// embedding every text counting as one pass.
async fn bill(
    state: &AppState,
    tenant: &TenantId,
    job: &TrainingJob,
    price: Micros,
    done: Done,
) -> plinth_store::Result<(i64, Micros)> {
    let example_epochs = job
        .split
        .train
        .saturating_mul(u64::from(done.epochs))
        .saturating_add(done.embedded);
    let units = i64::try_from(example_epochs.div_ceil(1_000)).unwrap_or(i64::MAX);
    if units == 0 {
        return Ok((0, Micros(0)));
    }
    state
        .meter
        .record(UsageRecord {
            tenant_id: tenant.clone(),
            api_key_id: None,
            resource_kind: plinth_store::training::USAGE_KIND.to_owned(),
            resource_id: job.model.clone(),
            units,
            unit_price: price,
            author_share: Micros(0),
            // One charge per job, however often it is resumed.
            idempotency_key: format!("training:{}", job.id),
            request_id: job.id.clone(),
        })
        .await?;
    Ok((units, price.checked_mul(units).unwrap_or(Micros(i64::MAX))))
}

/// What the runner tells the training thread.
#[derive(Debug, Default)]
struct Signals {
    /// Stop at the next check.
    stop: AtomicBool,
    /// ...because the job is no longer this runner's.
    lost: AtomicBool,
}

/// Embeds and trains on a thread of its own, writing progress and checkpoints as they come. Returns
/// how the job ended and the work done, or `None` when it was taken from this runner.
async fn train_job(
    state: &AppState,
    runner: &str,
    tenant: &TenantId,
    job: &TrainingJob,
    examples: Vec<Example>,
    checkpoint: Option<String>,
) -> Option<(JobEnd, Done)> {
    let settings = match Settings::resolve(
        &job.hyperparameters,
        usize::try_from(job.split.train).unwrap_or(0),
    ) {
        Ok(settings) => settings,
        Err(err) => return Some((JobEnd::Failed(err), Done::default())),
    };
    let resume: Option<Checkpoint> = checkpoint.and_then(|c| serde_json::from_str(&c).ok());
    let signals = Arc::new(Signals::default());
    let (reports, mut reported) = mpsc::channel(16);
    let work = Work {
        engine: state.engine.clone(),
        base: base_model_files(state),
        labels: job.labels.clone(),
        examples,
        settings,
        resume,
        signals: signals.clone(),
        reports,
    };
    std::thread::Builder::new()
        .name("plinth-training".into())
        .spawn(move || work.run())
        .ok()?;
    let mut progress = TrainingProgress {
        examples: job.progress.examples,
        max_epochs: settings.epochs,
        ..TrainingProgress::default()
    };
    let mut last_write = tokio::time::Instant::now() - PROGRESS_EVERY;
    let mut heartbeat = tokio::time::interval(state.settings.training.stale_after / 6);
    let finished = loop {
        let report = tokio::select! {
            report = reported.recv() => report,
            _ = heartbeat.tick() => {
                // When cancelled, the thread stops at its next check and reports how far it got.
                keep_going(state, tenant, job, runner, &progress, None, &signals).await;
                continue;
            }
        };
        match report {
            Some(Report::Embedded(n)) => {
                progress.embedded = n;
                if last_write.elapsed() >= PROGRESS_EVERY || n == progress.examples {
                    last_write = tokio::time::Instant::now();
                    keep_going(state, tenant, job, runner, &progress, None, &signals).await;
                }
            }
            Some(Report::Epoch {
                epoch,
                stats,
                checkpoint,
            }) => {
                progress.epoch = epoch;
                if let Some(last) = stats {
                    progress.train_loss = Some(last.train_loss);
                    progress.validation_loss = Some(last.validation_loss);
                    progress.validation_accuracy = Some(last.validation_accuracy);
                }
                keep_going(state, tenant, job, runner, &progress, Some(checkpoint), &signals).await;
            }
            Some(Report::Finished(result)) => break result,
            None => break Err("the training thread stopped unexpectedly".into()),
        }
    };
    Some(match finished {
        Ok(Finished::Trained {
            head,
            evaluation,
            done,
        }) => match serde_json::to_string(&Trained { head }) {
            Ok(checkpoint) => (
                JobEnd::Succeeded {
                    evaluation,
                    checkpoint,
                },
                done,
            ),
            Err(err) => (JobEnd::Failed(err.to_string()), done),
        },
        // Stopped because the job was cancelled, or because it is no longer this runner's.
        Ok(Finished::Stopped { done }) if !signals.lost.load(Ordering::Relaxed) => (JobEnd::Cancelled, done),
        Ok(Finished::Stopped { .. }) => return None,
        Err(message) => (JobEnd::Failed(message), Done::default()),
    })
}

/// Writes progress (and a checkpoint); tells the thread to stop when the job should not go on.
async fn keep_going(
    state: &AppState,
    tenant: &TenantId,
    job: &TrainingJob,
    runner: &str,
    progress: &TrainingProgress,
    checkpoint: Option<String>,
    signals: &Signals,
) {
    match state
        .store
        .training_heartbeat(tenant, &job.id, runner, progress, checkpoint)
        .await
    {
        Ok(Heartbeat::Continue) => {}
        Ok(Heartbeat::Cancelled) => signals.stop.store(true, Ordering::Relaxed),
        Ok(Heartbeat::Lost) => {
            signals.lost.store(true, Ordering::Relaxed);
            signals.stop.store(true, Ordering::Relaxed);
        }
        // A database hiccup: go on; a runner that stays unheard is replaced (see `stale_after`).
        Err(err) => tracing::warn!(job = %job.id, error = %err, "cannot record a training job's progress"),
    }
}

/// A job's computation, on its own thread.
struct Work {
    engine: plinth_inference::Engine,
    base: plinth_inference::ModelFiles,
    labels: Vec<String>,
    examples: Vec<Example>,
    settings: Settings,
    resume: Option<Checkpoint>,
    signals: Arc<Signals>,
    reports: mpsc::Sender<Report>,
}

impl Work {
    fn run(self) {
        plinth_inference::lower_this_thread_priority();
        let reports = self.reports.clone();
        let result = match self.engine.embedder(&self.base) {
            Ok(mut embedder) => self.compute(&mut embedder),
            Err(err) => {
                tracing::error!(error = %err, "cannot load the base model for training");
                Err("the base model could not be loaded; start the job again".into())
            }
        };
        let _ = reports.blocking_send(Report::Finished(result));
    }

    /// Sends a report; once nobody listens (the runner stopped), the work stops too.
    fn report(&self, report: Report) {
        if self.reports.blocking_send(report).is_err() {
            self.signals.stop.store(true, Ordering::Relaxed);
        }
    }

    fn stopped(&self) -> bool {
        self.signals.stop.load(Ordering::Relaxed)
    }

    fn compute(mut self, embedder: &mut plinth_inference::Embedder) -> Result<Finished, String> {
        let index: std::collections::HashMap<&str, usize> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        let y: Vec<usize> = self
            .examples
            .iter()
            .map(|e| {
                index
                    .get(e.label.as_str())
                    .copied()
                    .ok_or("the dataset's labels changed")
            })
            .collect::<Result<_, _>>()?;
        let split = plinth_training::split::stratified(&y, self.labels.len(), self.settings.seed);
        let resumed_epochs = self.resume.as_ref().map_or(0, |c| c.epoch);
        let mut x: Vec<Vec<f32>> = Vec::with_capacity(self.examples.len());
        for chunk in self.examples.chunks(EMBED_BATCH) {
            if self.stopped() {
                let done = Done {
                    embedded: x.len() as u64,
                    epochs: resumed_epochs,
                };
                return Ok(Finished::Stopped { done });
            }
            let texts: Vec<String> = chunk.iter().map(|e| e.text.clone()).collect();
            let vectors = embedder.embed(&texts).map_err(|err| {
                tracing::error!(error = %err, "embedding a training dataset failed");
                "embedding the dataset failed".to_owned()
            })?;
            x.extend(vectors);
            self.report(Report::Embedded(x.len() as u64));
        }
        let embedded = x.len() as u64;
        let dim = x.first().map_or(0, Vec::len);
        let pick = |indices: &[usize]| -> (Vec<Vec<f32>>, Vec<usize>) {
            indices.iter().map(|&i| (x[i].clone(), y[i])).unzip()
        };
        let (train_x, train_y) = pick(&split.train);
        let (validation_x, validation_y) = pick(&split.validation);
        let (test_x, test_y) = pick(&split.test);
        let end = head::train(
            &self.settings,
            self.labels.len(),
            dim,
            Examples {
                x: &train_x,
                y: &train_y,
            },
            Examples {
                x: &validation_x,
                y: &validation_y,
            },
            self.resume.take(),
            |checkpoint| {
                if let Ok(json) = serde_json::to_string(checkpoint) {
                    self.report(Report::Epoch {
                        epoch: checkpoint.epoch,
                        stats: checkpoint.last,
                        checkpoint: json,
                    });
                }
                if self.stopped() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        let done = Done {
            embedded,
            epochs: end.epoch,
        };
        if self.stopped() {
            return Ok(Finished::Stopped { done });
        }
        let head = end.best_head(&self.labels, dim);
        let evaluation = plinth_training::evaluate::evaluate(
            &head,
            Examples {
                x: &test_x,
                y: &test_y,
            },
        );
        Ok(Finished::Trained {
            head,
            evaluation,
            done,
        })
    }
}
