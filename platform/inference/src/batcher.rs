//! The batcher: each session of a model has a worker that takes calls from the model's fair queue,
//! joins text calls, or protocol calls of the same shapes, into one run (up to `max_batch` items, from
//! any tenants, waiting at most `max_delay` for company), runs it on a blocking thread, and hands each
//! caller its rows.
//!
//! A worker outlives whatever a batch does: a panic is contained to the batch (its callers get an
//! error, the worker keeps its session and goes on), and a run still going when its last caller has
//! given up is terminated, so an abandoned call stops using the CPU.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ort::session::{RunOptions, Session};
use ort::value::DynValue;
use plinth_core::inference::{Task, TensorMetadata};
use tokenizers::Encoding;
use tokio::sync::oneshot;

use crate::InferenceError;
use crate::arena::Failed;
use crate::scheduler::{FairQueue, GUEST_SLACK, Queued, Release, most_guests};
use crate::tensor::Tensor;
use crate::tokenizer::TextTokenizer;

pub(crate) enum Work {
    Text {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<TextOutput, InferenceError>>,
    },
    Raw {
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
        reply: oneshot::Sender<Result<RawOutput, InferenceError>>,
    },
}

impl Work {
    /// A protocol call's input tensors and the outputs it asks for (all when `None`).
    fn tensors(&self) -> Option<(&[Tensor], Option<&[String]>)> {
        match self {
            Self::Raw { inputs, outputs, .. } => Some((inputs, outputs.as_deref())),
            Self::Text { .. } => None,
        }
    }

    /// The caller stopped waiting (it timed out, or its client hung up).
    pub(crate) fn abandoned(&self) -> bool {
        match self {
            Self::Text { reply, .. } => reply.is_closed(),
            Self::Raw { reply, .. } => reply.is_closed(),
        }
    }
}

/// Tokenizes a call's texts (truncated to the model's most tokens), one after another, until `stop`
/// (the run's deadline) is set: a tokenizer is outside what ONNX Runtime can terminate.
///
/// # Errors
/// `InvalidInput` when the tokenizer refuses a text; `Timeout` once `stop` is set.
fn encode(
    tokenizer: &TextTokenizer,
    texts: &[String],
    stop: &AtomicBool,
) -> Result<Vec<Encoding>, InferenceError> {
    // A model reads only its first `max_length` tokens, and where the tokenizer splits text at
    // whitespace (as BERT's does) each word makes at least one: the words after that many are not
    // tokenized at all. The same tokens for any text whose words each leave something after
    // normalizing (a word of only zero-width characters leaves nothing), for a fraction of the work
    // on a long text, and no 32 KiB of words crafted to be slow to split.
    let most = tokenizer
        .get_truncation()
        .map_or(usize::MAX, |truncation| truncation.max_length);
    let words = if splits_at_whitespace(tokenizer) {
        most
    } else {
        usize::MAX
    };
    texts
        .iter()
        .map(|text| {
            if stop.load(Ordering::Relaxed) {
                return Err(InferenceError::Timeout);
            }
            let text = leading_words(text, words);
            if tokenizer.may_make_longer_than(text.len(), MAX_PRE_TOKENIZED_BYTES) {
                check_pre_tokenized_length(tokenizer, text)?;
            }
            let mut encoding = tokenizer
                .encode(text, true)
                .map_err(|err| InferenceError::InvalidInput(format!("tokenization failed: {err}")))?;
            // What truncation cut off is kept beside the encoding; the run has no use for it.
            drop(encoding.take_overflowing());
            // Loading refuses post-processors that could do this (see `tokenizer`); should one get
            // through, its text is not run.
            if encoding.len() > most {
                return Err(InferenceError::InvalidModel(format!(
                    "the tokenizer made {} tokens of a text cut at {most}",
                    encoding.len()
                )));
            }
            Ok(encoding)
        })
        .collect()
}

/// Longest a text may become once normalized and pre-tokenized: the library makes every token of it
/// before cutting at the model's length, and loading bounds a tokenizer's growth only in the worst
/// case over all texts (up to 72 times, see `tokenizer`), which few texts come near.
const MAX_PRE_TOKENIZED_BYTES: usize = 4 * crate::engine::MAX_TEXT_BYTES;

/// Refuses a text its tokenizer's normalizers, then its pre-tokenizers, make longer than
/// `MAX_PRE_TOKENIZED_BYTES`, made as the library makes it: piece by piece between added tokens. Each
/// stage is measured before the next, so no more than that is split to measure it.
fn check_pre_tokenized_length(tokenizer: &TextTokenizer, text: &str) -> Result<(), InferenceError> {
    use tokenizers::{Normalizer as _, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};
    let refused =
        |err: tokenizers::Error| InferenceError::InvalidInput(format!("tokenization failed: {err}"));
    let made = |pieces: &PreTokenizedString| -> usize {
        pieces
            .get_splits(OffsetReferential::Normalized, OffsetType::Byte)
            .iter()
            .map(|(piece, ..)| piece.len())
            .sum()
    };
    let too_long = |made: usize| {
        InferenceError::InvalidInput(format!(
            "this model's tokenizer makes the text {made} bytes long before splitting it into tokens; at most {MAX_PRE_TOKENIZED_BYTES}"
        ))
    };
    // Whole first: added tokens matched in the normalized text would split a long one into as many
    // pieces as it has matches.
    if let Some(normalizer) = tokenizer.get_normalizer() {
        let mut whole = tokenizers::NormalizedString::from(text);
        normalizer.normalize(&mut whole).map_err(refused)?;
        if whole.len() > MAX_PRE_TOKENIZED_BYTES {
            return Err(too_long(whole.len()));
        }
    }
    let mut pieces = tokenizer
        .get_added_vocabulary()
        .extract_and_normalize(tokenizer.get_normalizer(), text);
    let normalized = made(&pieces);
    if normalized > MAX_PRE_TOKENIZED_BYTES {
        return Err(too_long(normalized));
    }
    if let Some(pre_tokenizer) = tokenizer.get_pre_tokenizer() {
        pre_tokenizer.pre_tokenize(&mut pieces).map_err(refused)?;
        let pre_tokenized = made(&pieces);
        if pre_tokenized > MAX_PRE_TOKENIZED_BYTES {
            return Err(too_long(pre_tokenized));
        }
    }
    Ok(())
}

/// Whether the tokenizer's pre-tokenizer splits text at whitespace, so that no token spans two words.
fn splits_at_whitespace(tokenizer: &TextTokenizer) -> bool {
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    matches!(
        tokenizer.get_pre_tokenizer(),
        Some(
            PreTokenizerWrapper::BertPreTokenizer(_)
                | PreTokenizerWrapper::Whitespace(_)
                | PreTokenizerWrapper::WhitespaceSplit(_)
        )
    )
}

/// The start of `text` holding its first `words` words (separated by whitespace).
fn leading_words(text: &str, words: usize) -> &str {
    let mut seen = 0;
    let mut in_word = false;
    for (at, c) in text.char_indices() {
        if !c.is_whitespace() {
            in_word = true;
        } else if in_word {
            in_word = false;
            seen += 1;
            if seen == words {
                return &text[..at];
            }
        }
    }
    text
}

/// Where a call's time went in its model, for its `Server-Timing`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stages {
    /// In the queue, until a worker took it.
    pub(crate) waited: Duration,
    /// From then until its run's thread started on it: setting the run up, and the wait for a
    /// thread (on a busy machine, for a core).
    pub(crate) thread: Duration,
    /// The run on that thread, tokenizing included.
    pub(crate) ran: Duration,
    /// When the run answered: what follows until the caller's task resumes is its wait for a thread.
    pub(crate) answered: Instant,
}

impl Stages {
    /// A call run where it was made, untimed.
    fn direct() -> Self {
        Self {
            waited: Duration::ZERO,
            thread: Duration::ZERO,
            ran: Duration::ZERO,
            answered: Instant::now(),
        }
    }
}

/// Rows of one output for one call: `width` floats per text.
#[derive(Debug)]
pub(crate) struct TextOutput {
    width: usize,
    data: Vec<f32>,
    pub(crate) stages: Stages,
}

/// A protocol call's output tensors.
#[derive(Debug)]
pub(crate) struct RawOutput {
    pub(crate) tensors: Vec<Tensor>,
    pub(crate) stages: Stages,
}

impl TextOutput {
    pub(crate) fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks(self.width.max(1))
    }
}

/// How a text model is fed and read.
#[derive(Debug, Clone)]
pub(crate) struct TextPlan {
    output: String,
    /// Mean-pool a `[batch, tokens, dim]` output with the attention mask.
    pool: bool,
    /// Turn logits into probabilities.
    softmax: bool,
    token_type_ids: bool,
}

impl TextPlan {
    pub(crate) fn new(
        task: Task,
        inputs: &[TensorMetadata],
        outputs: &[TensorMetadata],
        labels: usize,
    ) -> Result<Self, InferenceError> {
        let has = |name: &str| inputs.iter().any(|i| i.name == name && i.datatype == "INT64");
        if !has("input_ids") || !has("attention_mask") {
            return Err(InferenceError::InvalidModel(
                "text models need INT64 inputs `input_ids` and `attention_mask` (a transformer exported with its tokenizer)".into(),
            ));
        }
        let find = |name: &str| outputs.iter().find(|o| o.name == name && o.datatype == "FP32");
        let first_float = || {
            outputs
                .iter()
                .find(|o| o.datatype == "FP32" && (2..=3).contains(&o.shape.len()))
        };
        let (output, softmax) = match task {
            Task::TextClassification => {
                if labels < 2 {
                    return Err(InferenceError::InvalidModel(
                        "a classification model needs at least two labels".into(),
                    ));
                }
                let (output, softmax) = match (find("probs"), find("logits")) {
                    (Some(o), _) => (o, false),
                    (None, Some(o)) => (o, true),
                    (None, None) => (
                        first_float().ok_or_else(|| no_output("a [batch, labels] FP32 output"))?,
                        true,
                    ),
                };
                let width = output.shape.last().copied().unwrap_or(-1);
                if output.shape.len() != 2 || (width > 0 && usize::try_from(width).ok() != Some(labels)) {
                    return Err(InferenceError::InvalidModel(format!(
                        "output `{}` has shape {:?}; the manifest lists {labels} labels",
                        output.name, output.shape
                    )));
                }
                (output, softmax)
            }
            Task::Embedding => (
                find("sentence_embedding")
                    .or_else(first_float)
                    .ok_or_else(|| no_output("an FP32 embedding output"))?,
                false,
            ),
            Task::Raw => {
                return Err(InferenceError::InvalidModel(
                    "raw models have no text plan".into(),
                ));
            }
        };
        Ok(Self {
            output: output.name.clone(),
            pool: output.shape.len() == 3,
            softmax,
            token_type_ids: has("token_type_ids"),
        })
    }
}

fn no_output(what: &str) -> InferenceError {
    InferenceError::InvalidModel(format!("the model has no {what}"))
}

/// What a model's workers share; each adds a session of its own.
#[derive(Clone)]
pub(crate) struct WorkerSetup {
    pub(crate) queue: Arc<FairQueue>,
    pub(crate) tokenizer: Option<Arc<TextTokenizer>>,
    pub(crate) text: Option<TextPlan>,
    pub(crate) max_batch: usize,
    pub(crate) max_delay: Duration,
    /// Protocol calls whose tensors differ only in their first dimension share a run (see
    /// [`tensors_share_a_run`]).
    pub(crate) batch_tensors: bool,
    /// How long a caller waits: a run past its last caller's wait is terminated.
    pub(crate) timeout: Duration,
    pub(crate) model: String,
    /// The `model` label of its metrics: the name of a platform model; `tenant` for every tenant's
    /// model (their names are private, and there is no bound on them).
    pub(crate) metrics_label: String,
    /// Where its runs allocate.
    pub(crate) memory: Memory,
    pub(crate) stats: Arc<Stats>,
}

impl WorkerSetup {
    /// Options for one run of this model.
    fn run_options(&self) -> Result<RunSettings, InferenceError> {
        RunSettings::new(self.memory)
    }
}

/// Where a graph's runs allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memory {
    /// The platform's graphs: the runtime's own allocators.
    Platform,
    /// A tenant's graph on the CPU: the arena every tenant's graph shares (see `arena`).
    SharedArena,
    /// A tenant's graph on a GPU: device memory bounded for its session alone, which no other
    /// tenant's run can take or give back.
    OwnDevice,
}

/// One run's options, where its graph allocates, and until when its callers wait.
pub(crate) struct RunSettings {
    options: RunOptions,
    memory: Memory,
    /// A run that finds the arena full of other runs waits for room until then (see
    /// `arena::Arena::share`); without one, it does not wait.
    deadline: Option<Instant>,
}

impl RunSettings {
    /// Options for a run of a graph allocating from `memory`: a tenant's run gives back what it
    /// freed of the CPU arena as it ends.
    pub(crate) fn new(memory: Memory) -> Result<Self, InferenceError> {
        let mut options = RunOptions::new()?;
        if memory != Memory::Platform {
            let (key, value) = crate::arena::SHRINK_AFTER_RUN;
            options.set(key, value)?;
        }
        Ok(Self {
            options,
            memory,
            deadline: None,
        })
    }

    /// The same, for callers who wait until `deadline`.
    fn until(self, deadline: Instant) -> Self {
        Self {
            deadline: Some(deadline),
            ..self
        }
    }

    /// Stops the runs using these options, and any started with them later.
    fn terminate(&self) {
        let _ = self.options.terminate();
    }

    /// One run with these options: in the arena beside other tenants' runs (see
    /// `arena::Arena::share`), in a session's own device memory (what it cannot get there, no wait
    /// would give it), or on the platform's own allocators.
    fn run<T>(&self, mut run: impl FnMut(&RunOptions) -> Result<T, Failed>) -> Result<T, Failed> {
        match self.memory {
            Memory::SharedArena => crate::arena::TENANTS.share(self.deadline, || run(&self.options)),
            Memory::OwnDevice => run(&self.options).map_err(|failed| match failed {
                Failed::Full => Failed::Beyond,
                other => other,
            }),
            Memory::Platform => run(&self.options),
        }
    }
}

pub(crate) struct Worker {
    pub(crate) session: Session,
    pub(crate) setup: WorkerSetup,
}

/// Per-model counters, read by the statistics endpoint and readiness.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) success: AtomicU64,
    pub(crate) failure: AtomicU64,
    pub(crate) items: AtomicU64,
    pub(crate) executions: AtomicU64,
    /// Workers serving the model's queue.
    pub(crate) workers: AtomicU64,
    /// Runs in a row that failed on the runtime's side (not the caller's input): a model that cannot
    /// run at all (a lost GPU, a broken file) is not ready.
    pub(crate) failing_runs: AtomicU64,
    /// Workers replaced after dying (see `engine::supervise`).
    pub(crate) restarts: AtomicU64,
    /// Runs that went at low priority (see `FairQueue::runs_in_background`).
    pub(crate) background_runs: AtomicU64,
    /// Shared runs of protocol calls that failed, or did not split, and were run again in parts.
    pub(crate) split_runs: AtomicU64,
}

/// Runs failing in a row after which a model reports not ready.
pub(crate) const FAILING_RUNS_NOT_READY: u64 = 3;

/// The run slots a batch's tenants hold, given back when the run ends however it ends.
struct RunSlot {
    queue: Arc<FairQueue>,
    tenants: Vec<Arc<str>>,
    /// What it gives back when dropped.
    release: Release,
}

impl RunSlot {
    /// What the run gives back with its results (its count among its tenants' runs), and what its
    /// worker gives back once it has the session back (the session).
    fn split(mut self) -> (Self, Self) {
        let tenants = std::mem::take(&mut self.tenants);
        let part = |tenants, release| Self {
            queue: self.queue.clone(),
            tenants,
            release,
        };
        (
            part(tenants.clone(), Release::Activity),
            part(tenants, Release::Session),
        )
    }

    /// One call of `tenant` left the run before it started: with no other call in it, the tenant's
    /// run slot is given back at once.
    fn leave(&mut self, tenant: &Arc<str>) {
        if let Some(index) = self.tenants.iter().position(|t| t == tenant) {
            self.tenants.swap_remove(index);
        }
        if !self.tenants.contains(tenant) {
            self.queue.given_back(std::slice::from_ref(tenant), self.release);
        }
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.queue.given_back(&self.tenants, self.release);
    }
}

/// Stops its worker count when the worker ends, however it ends.
struct Serving(Arc<Stats>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    /// One run before serving, so the first caller does not pay for lazy initialisation (and a GPU
    /// that cannot run the model fails at load, not on a customer's call).
    ///
    /// With a `deadline` (a tenant's model), a graph that would run past it (a huge loop) is
    /// terminated there. A `new` model (an upload) is then refused, as taking longer than `limit`
    /// (the whole load's) to warm up, and so is one that finds no memory for one short text with no
    /// other run in the arena; one that finds it full of other tenants' runs is `Overloaded`, to
    /// retry (a load holds the turn every tenant's loads share, so it does not wait for room). A
    /// version accepted before is not judged by one slow load (a busy machine, a cold GPU): it is
    /// `Timeout`, to retry, and one that no longer finds the memory (the bound lowered since)
    /// `Overloaded`.
    pub(crate) fn warm_up(
        &mut self,
        deadline: Option<(Instant, Duration)>,
        new: bool,
    ) -> Result<(), InferenceError> {
        let (Some(plan), Some(tokenizer)) = (&self.setup.text, &self.setup.tokenizer) else {
            return Ok(());
        };
        let warm_up = ["warm up".to_owned()];
        // A load holds the turn every tenant's loads share: it does not wait for run memory.
        let options = Arc::new(self.setup.run_options()?);
        // A run that finds no memory for one short text with no other run in the arena asks for too
        // much (one that finds it full of other runs is `Overloaded`: retry).
        let too_much = |err| match err {
            InferenceError::InvalidInput(_) if new => InferenceError::InvalidModel(
                "the model asks for more memory for one short text than tenants' models may use at once"
                    .into(),
            ),
            InferenceError::InvalidInput(_) => InferenceError::Overloaded,
            other => other,
        };
        let Some((deadline, limit)) = deadline else {
            return run_text(&mut self.session, tokenizer, plan, &warm_up, &options).map(drop);
        };
        let too_slow = || {
            if !new {
                return InferenceError::Timeout;
            }
            InferenceError::InvalidModel(format!(
                "the model did not answer one short text in each of its sessions within {:.1} s",
                limit.as_secs_f64()
            ))
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        let (finished, finishing) = std::sync::mpsc::channel::<()>();
        let watchdog = {
            let options = options.clone();
            std::thread::spawn(move || {
                // Not when the run finished, nor when it panicked (the sender is gone).
                let stopped = matches!(
                    finishing.recv_timeout(left),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
                if stopped {
                    options.terminate();
                }
                stopped
            })
        };
        let outcome = run_text(&mut self.session, tokenizer, plan, &warm_up, &options);
        let _ = finished.send(());
        if watchdog.join().unwrap_or(true) {
            return Err(too_slow());
        }
        outcome.map(drop).map_err(too_much)
    }

    /// How many texts of heavy tenants a light tenant's run may carry on this model, on this machine
    /// (see `scheduler::most_guests`). No guest is longer than the texts of the tenant a run is for
    /// (see `answer_text_calls`), so a guest adds one text of that length: for a short text and for
    /// one of the most tokens a text may have, a run of it alone is timed against runs of it beside
    /// copies of it, and the fewer guests of the two lengths is the answer. `None` for a model that
    /// takes tensors.
    pub(crate) fn time_guests(&mut self, max_batch: usize) -> Result<Option<usize>, InferenceError> {
        let (Some(plan), Some(tokenizer)) = (&self.setup.text, &self.setup.tokenizer) else {
            return Ok(None);
        };
        let options = RunSettings::new(self.setup.memory)?;
        let session = &mut self.session;
        let mut timed = |texts: &[String]| -> Result<Duration, InferenceError> {
            let started = Instant::now();
            run_text(session, tokenizer, plan, texts, &options)?;
            Ok(started.elapsed())
        };
        let most = max_batch.saturating_sub(1).max(1);
        let short = "Shares rose after the quarterly results".to_owned();
        let longest = "word ".repeat(tokenizer.get_truncation().map_or(512, |t| t.max_length));
        let mut fewest = most;
        for text in [short, longest] {
            let alone = std::slice::from_ref(&text);
            let limit = timed(alone)?.min(timed(alone)?).mul_f64(1.0 + GUEST_SLACK);
            let guests = most_guests(most, |guests| -> Result<bool, InferenceError> {
                let texts = vec![text.clone(); guests + 1];
                // Either of two runs within the limit will do (a busy machine slows some); one far
                // past it settles the matter.
                let first = timed(&texts)?;
                Ok(first <= limit || (first <= limit * 2 && timed(&texts)? <= limit))
            })?;
            fewest = fewest.min(guests);
            if fewest == 1 {
                break;
            }
        }
        Ok(Some(fewest))
    }

    /// Serves the queue until it closes. The worker counts as serving from this call, not from its
    /// first poll: a model is ready as soon as it is loaded, however busy the runtime is.
    pub(crate) fn run(self) -> impl Future<Output = ()> + Send + 'static {
        self.setup.stats.workers.fetch_add(1, Ordering::Relaxed);
        let serving = Serving(self.setup.stats.clone());
        async move {
            let _serving = serving;
            self.serve().await;
        }
    }

    async fn serve(mut self) {
        let (max_batch, batch_tensors) = (self.setup.max_batch, self.setup.batch_tensors);
        let platform = self.setup.memory == Memory::Platform;
        let fits = move |batch: &[Queued], next: &Queued| {
            // Every call of a run joined its first: comparing with the first compares with all.
            let joins = match (&batch[0].work, &next.work) {
                (Work::Text { .. }, Work::Text { .. }) => true,
                (Work::Raw { .. }, Work::Raw { .. }) => {
                    batch_tensors
                        && tensors_share_a_run(batch, &next.work)
                        && (!platform || joined_text_cost_fits(batch, &next.work))
                }
                _ => false,
            };
            joins && batch.iter().map(|c| c.items).sum::<usize>() + next.items <= max_batch
        };
        while let Some(batch) = self.setup.queue.next_batch(self.setup.max_delay, &fits).await {
            // However this run ends, its tenants' run slots are given back: once its results are
            // ready, before they are sent (a caller's next call must not find its last run still
            // held), or when it fails, panics or is skipped; a run in the background gives its
            // session back only once its worker is back (below).
            let slot = RunSlot {
                queue: self.setup.queue.clone(),
                tenants: batch.iter().map(|c| c.share.tenant.clone()).collect(),
                release: Release::Both,
            };
            let started = Instant::now();
            // The queue drops calls abandoned before they were taken; these went while the batch lingered.
            let (batch, abandoned): (Vec<_>, Vec<_>) = batch.into_iter().partition(|c| !c.work.abandoned());
            if !abandoned.is_empty() {
                metrics::counter!("plinth_inference_abandoned_total").increment(abandoned.len() as u64);
            }
            let Some(last_arrival) = batch.iter().map(|c| c.queued_at).max() else {
                continue;
            };
            let options = match self.setup.run_options() {
                Ok(options) => Arc::new(options.until(last_arrival + self.setup.timeout)),
                Err(err) => {
                    tracing::error!(model = %self.setup.model, error = %err, "cannot create run options");
                    continue;
                }
            };
            // Once the last caller of the batch has given up, nobody is waiting for the run.
            let terminated = Arc::new(AtomicBool::new(false));
            let watchdog = {
                let (options, terminated) = (options.clone(), terminated.clone());
                let deadline = tokio::time::Instant::from_std(last_arrival + self.setup.timeout);
                tokio::spawn(async move {
                    tokio::time::sleep_until(deadline).await;
                    metrics::counter!("plinth_inference_terminated_total").increment(1);
                    terminated.store(true, Ordering::Relaxed);
                    options.terminate();
                })
            };
            let tokenizer = self.setup.tokenizer.clone();
            let text = self.setup.text.clone();
            let label = self.setup.metrics_label.clone();
            let stats = self.setup.stats.clone();
            let mut session = self.session;
            let background = batch
                .first()
                .is_some_and(|call| self.setup.queue.runs_in_background(&call.share.tenant));
            if background {
                self.setup.stats.background_runs.fetch_add(1, Ordering::Relaxed);
            }
            // A run in the background gives its tenants' sessions back only once this worker has its
            // session back. Its thread waits for a core behind every thread at normal priority, so
            // between its results and its return it can hold the session for milliseconds; were the
            // session counted free meanwhile, its tenant could take the one kept free for others, and
            // the next light call would find none. It stops counting among its tenants' runs with
            // its results, as any run does: a tenant's next call is judged by what it has in hand.
            let (slot, held_until_back) = if background {
                let (activity, session) = slot.split();
                (activity, Some(session))
            } else {
                (slot, None)
            };
            let pool = if background {
                background_runs().handle().clone()
            } else {
                tokio::runtime::Handle::current()
            };
            // A light tenant's run under fair scheduling keeps out others' longer texts.
            let sends_back_for = batch
                .first()
                .filter(|_| !background && self.setup.queue.is_fair())
                .map(|call| call.share.tenant.clone());
            let joined = pool
                .spawn_blocking(move || {
                    let on_thread = Instant::now();
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        process(
                            &mut session,
                            tokenizer.as_deref(),
                            text.as_ref(),
                            batch,
                            &Answered {
                                stats: &stats,
                                label: &label,
                                started,
                                on_thread,
                            },
                            Run {
                                options: &options,
                                terminated: &terminated,
                                sends_back_for,
                                slot,
                            },
                        );
                    }));
                    (session, outcome)
                })
                .await;
            drop(held_until_back);
            watchdog.abort();
            match joined {
                Ok((session, outcome)) => {
                    self.session = session;
                    if outcome.is_err() {
                        // The batch's callers were answered with an error when their replies dropped.
                        metrics::counter!("plinth_inference_worker_panics_total").increment(1);
                        self.setup.stats.failure.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(model = %self.setup.model, "a batch panicked; its calls failed, the worker goes on");
                    }
                }
                Err(err) => {
                    // Only a runtime shutting down cancels a blocking task.
                    tracing::warn!(model = %self.setup.model, error = %err, "inference worker stopped");
                    return;
                }
            }
        }
    }
}

/// The niceness of the threads for the runs of tenants sending more than one run's worth at a time:
/// on a core both want, a run at normal priority gets 1024 parts to their 110. (Linux's idle class
/// did no better: README, "Tests and benchmarks".)
const BACKGROUND_NICENESS: i32 = 10;

/// The blocking threads for runs in the background (`FairQueue::runs_in_background`), at a lower
/// priority (Linux: a thread's niceness is its own). Process-wide, like the cores they share.
fn background_runs() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            // Linux keeps 15 bytes of a thread's name: this one shows whole in `top` and `/proc`.
            .thread_name("plinth-infer-bg")
            .on_thread_start(|| {
                #[cfg(target_os = "linux")]
                if let Err(err) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICENESS)
                {
                    tracing::warn!(error = %err, "could not lower the priority of an inference thread");
                }
            })
            .build()
            .unwrap_or_else(|err| panic!("cannot start the inference background threads: {err}"))
    })
}

/// One run's options, whether the watchdog terminated it, and its tenants' run slots.
struct Run<'a, Slot = RunSlot> {
    options: &'a RunSettings,
    terminated: &'a AtomicBool,
    /// The tenant the run is for, when calls of other tenants with longer texts than its own go back
    /// to the queue (see `answer_text_calls`).
    sends_back_for: Option<Arc<str>>,
    /// Given back once the results are ready, before they are sent (a run in the background: all
    /// but the sessions, which its worker gives back once it has its own back).
    slot: Slot,
}

/// A run the watchdog stopped failed because its callers' time ran out, whatever the runtime says.
fn timed_out_or(err: InferenceError, terminated: &AtomicBool) -> InferenceError {
    if terminated.load(Ordering::Relaxed) {
        InferenceError::Timeout
    } else {
        err
    }
}

fn process(
    session: &mut Session,
    tokenizer: Option<&TextTokenizer>,
    plan: Option<&TextPlan>,
    batch: Vec<Queued>,
    answered: &Answered<'_>,
    run: Run<'_>,
) {
    let Answered { stats, label, .. } = *answered;
    let options = run.options;
    let mut slot = Some(run.slot);
    let started = Instant::now();
    let mut items: usize = batch.iter().map(|c| c.items).sum();
    let mut failure: Option<bool> = None;
    // Counted before any caller is answered: statistics read right after an answer include it.
    stats.executions.fetch_add(1, Ordering::Relaxed);
    let (text_calls, tensor_calls): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|call| matches!(call.work, Work::Text { .. }));
    if !tensor_calls.is_empty() {
        let results = run_tensor_calls(session, &tensor_calls, options, run.terminated, stats);
        drop(slot.take());
        for (call, result) in tensor_calls.into_iter().zip(results) {
            let waited = answered.waited(&call);
            let Work::Raw { reply, .. } = call.work else {
                continue;
            };
            let result = result
                .map(|tensors| RawOutput {
                    tensors,
                    stages: answered.stages(waited),
                })
                .map_err(|err| timed_out_or(err, run.terminated));
            if let Err(err) = &result {
                // The caller's input is the caller's problem; anything else is the runtime's.
                // (Or of other tenants' runs holding the run memory: not the model's.)
                let runtime = !matches!(err, InferenceError::InvalidInput(_) | InferenceError::Overloaded);
                failure = Some(failure.unwrap_or(false) || runtime);
            }
            answered.count(1, call.items, result.is_ok());
            let _ = reply.send(result);
        }
    }
    if !text_calls.is_empty() {
        let (sent_back, outcome) = answer_text_calls(
            session,
            tokenizer,
            plan,
            text_calls,
            Run {
                options,
                terminated: run.terminated,
                sends_back_for: run.sends_back_for,
                slot: slot.take(),
            },
            answered,
        );
        items -= sent_back;
        if let Err(runtime) = outcome {
            failure = Some(failure.unwrap_or(false) || runtime);
        }
    }
    match failure {
        // A run stopped because every caller had gone says nothing about the model.
        Some(true) if !run.terminated.load(Ordering::Relaxed) => {
            stats.failing_runs.fetch_add(1, Ordering::Relaxed)
        }
        Some(_) => 0,
        None => stats.failing_runs.swap(0, Ordering::Relaxed),
    };
    let elapsed = started.elapsed();
    metrics::counter!("nv_inference_exec_count", "model" => label.to_owned()).increment(1);
    metrics::counter!("nv_inference_compute_infer_duration_us", "model" => label.to_owned())
        .increment(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    metrics::histogram!("plinth_inference_batch_size", "model" => label.to_owned()).record(items as f64);
}

/// Counts calls as they are answered (requests, items, outcome, time in the queue), in the model's
/// statistics and metrics.
#[derive(Clone, Copy)]
struct Answered<'a> {
    stats: &'a Stats,
    label: &'a str,
    /// When the worker took the run's calls from the queue.
    started: Instant,
    /// When the run's thread started on them.
    on_thread: Instant,
}

impl Answered<'_> {
    /// Records how long a call waited to be taken, once: when it runs or is refused, not when it is
    /// sent back to the queue (it waits on).
    fn waited(&self, call: &Queued) -> Duration {
        let waited = self.started.duration_since(call.queued_at);
        metrics::histogram!("plinth_inference_queue_wait_seconds", "plan" => call.share.plan.to_string())
            .record(waited.as_secs_f64());
        metrics::counter!("nv_inference_queue_duration_us", "model" => self.label.to_owned())
            .increment(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX));
        waited
    }

    /// A call's stages, as it is answered.
    fn stages(&self, waited: Duration) -> Stages {
        Stages {
            waited,
            thread: self.on_thread.duration_since(self.started),
            ran: self.on_thread.elapsed(),
            answered: Instant::now(),
        }
    }

    fn count(&self, requests: u64, items: usize, succeeded: bool) {
        let (counter, outcome) = if succeeded {
            (&self.stats.success, "nv_inference_request_success")
        } else {
            (&self.stats.failure, "nv_inference_request_failure")
        };
        counter.fetch_add(requests, Ordering::Relaxed);
        self.stats.items.fetch_add(items as u64, Ordering::Relaxed);
        metrics::counter!(outcome, "model" => self.label.to_owned()).increment(requests);
        metrics::counter!("nv_inference_count", "model" => self.label.to_owned()).increment(items as u64);
    }
}

/// Runs every text of every call at once and gives each call its rows. On failure, whether it was
/// the runtime's (or the model's) rather than the input's.
///
/// Each call is tokenized on its own, so a text the tokenizer refuses fails only its call. In a run
/// that sends back longer calls, a call of another tenant whose texts are longer (in tokens) than the
/// longest of the tenant the run is for goes back to the queue to lead a run of its own: every text of
/// a run is padded to the longest, and it would make each of that tenant's texts as costly as its own.
fn answer_text_calls(
    session: &mut Session,
    tokenizer: Option<&TextTokenizer>,
    plan: Option<&TextPlan>,
    calls: Vec<Queued>,
    run: Run<'_, Option<RunSlot>>,
    answered: &Answered<'_>,
) -> (usize, Result<(), bool>) {
    let Run {
        options,
        terminated,
        sends_back_for,
        mut slot,
    } = run;
    let reply_of = |call: Queued| match call.work {
        Work::Text { reply, .. } => Some(reply),
        Work::Raw { .. } => None,
    };
    let (Some(tokenizer), Some(plan)) = (tokenizer, plan) else {
        drop(slot);
        for call in calls {
            answered.waited(&call);
            answered.count(1, call.items, false);
            if let Some(reply) = reply_of(call) {
                let _ = reply.send(Err(InferenceError::WrongTask(
                    "this model takes tensors, not text".into(),
                )));
            }
        }
        return (0, Err(false));
    };
    let mut refused = false;
    let mut tokenized = Vec::with_capacity(calls.len());
    for call in calls {
        let Work::Text { texts, .. } = &call.work else {
            continue;
        };
        match encode(tokenizer, texts, terminated) {
            Ok(encodings) => tokenized.push((call, encodings)),
            Err(err) => {
                refused = true;
                answered.waited(&call);
                answered.count(1, call.items, false);
                if let Some(reply) = reply_of(call) {
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
    let mut sent_back = 0;
    if let (Some(leader), Some(slot)) = (&sends_back_for, &mut slot) {
        let lengths: Vec<(&Arc<str>, usize)> = tokenized
            .iter()
            .map(|(call, encodings)| (&call.share.tenant, longest(encodings)))
            .collect();
        let longer = longer_than_the_leaders(leader, &lengths);
        let mut kept = Vec::with_capacity(tokenized.len());
        for ((call, encodings), send_back) in tokenized.into_iter().zip(longer) {
            if send_back {
                sent_back += call.items;
                slot.leave(&call.share.tenant);
                slot.queue.send_back(call, longest(&encodings));
            } else {
                kept.push((call, encodings));
            }
        }
        tokenized = kept;
    }
    if tokenized.is_empty() {
        // Nothing ran: calls refused by the tokenizer say nothing about the model, but do not count as
        // a run that worked either.
        return (sent_back, if refused { Err(false) } else { Ok(()) });
    }
    let counts: Vec<usize> = tokenized.iter().map(|(_, encodings)| encodings.len()).collect();
    let mut replies = Vec::with_capacity(tokenized.len());
    let mut all = Vec::with_capacity(counts.iter().sum());
    for (call, encodings) in tokenized {
        let waited = answered.waited(&call);
        all.extend(encodings);
        replies.extend(reply_of(call).map(|reply| (reply, waited)));
    }
    let calls = replies.len();
    let result = run_encoded(session, tokenizer, plan, all, options).map_err(|failed| {
        let err = match failed {
            // Together these calls asked for more than tenants' models may use; each alone may
            // not: they go back to their callers to retry, in other runs.
            Failed::Beyond if calls > 1 => InferenceError::Overloaded,
            failed => failed.into_error(TEXTS_BEYOND),
        };
        timed_out_or(err, terminated)
    });
    drop(slot);
    answered.count(replies.len() as u64, counts.iter().sum(), result.is_ok());
    let outcome = match result {
        Ok(output) => {
            let done = answered.stages(Duration::ZERO);
            let mut offset = 0;
            for (texts, (reply, waited)) in counts.into_iter().zip(replies) {
                let rows = output.width * texts;
                let data = output.data[offset..offset + rows].to_vec();
                offset += rows;
                let _ = reply.send(Ok(TextOutput {
                    width: output.width,
                    data,
                    stages: Stages {
                        waited,
                        answered: Instant::now(),
                        ..done
                    },
                }));
            }
            Ok(())
        }
        Err(err) => {
            let runtime = matches!(err, InferenceError::Runtime(_) | InferenceError::InvalidModel(_));
            for (reply, _) in replies {
                let _ = reply.send(Err(err.for_another_caller()));
            }
            Err(runtime)
        }
    };
    (sent_back, outcome)
}

/// Tokens of the longest of a call's texts.
fn longest(encodings: &[Encoding]) -> usize {
    encodings.iter().map(Encoding::len).max().unwrap_or(0)
}

/// For each call of a run, in order (its tenant, its longest text in tokens), whether it belongs to
/// another tenant than `leader`, the tenant the run is for, and is longer than every text of that
/// tenant's calls. None when no call of that tenant is left to compare with.
fn longer_than_the_leaders(leader: &Arc<str>, calls: &[(&Arc<str>, usize)]) -> Vec<bool> {
    let leaders = calls
        .iter()
        .filter(|(tenant, _)| *tenant == leader)
        .map(|(_, tokens)| *tokens)
        .max();
    calls
        .iter()
        .map(|(tenant, tokens)| *tenant != leader && leaders.is_some_and(|longest| *tokens > longest))
        .collect()
}

fn int64_tensor(shape: &[i64], values: Vec<i64>) -> Result<DynValue, InferenceError> {
    Ok(ort::value::Tensor::from_array((shape.to_vec(), values))?.into_dyn())
}

/// Tokenizes, runs, and reads the plan's output as `[texts, width]`.
pub(crate) fn run_text(
    session: &mut Session,
    tokenizer: &TextTokenizer,
    plan: &TextPlan,
    texts: &[String],
    options: &RunSettings,
) -> Result<TextOutput, InferenceError> {
    let encodings = encode(tokenizer, texts, &AtomicBool::new(false))?;
    run_encoded(session, tokenizer, plan, encodings, options)
        .map_err(|failed| failed.into_error(TEXTS_BEYOND))
}

/// Pads tokenized texts (of one call or several) to the longest, runs them, and reads the plan's
/// output as `[texts, width]`.
fn run_encoded(
    session: &mut Session,
    tokenizer: &TextTokenizer,
    plan: &TextPlan,
    mut encodings: Vec<Encoding>,
    options: &RunSettings,
) -> Result<TextOutput, Failed> {
    let padding = tokenizer.get_padding().cloned().unwrap_or_default();
    tokenizers::utils::padding::pad_encodings(&mut encodings, &padding)
        .map_err(|err| InferenceError::Runtime(format!("padding failed: {err}")))?;
    options.run(|options| run_padded(session, plan, &encodings, options))
}

/// What the callers of a text run that asked for more memory than tenants' models may use are told.
const TEXTS_BEYOND: &str = "the model asked for more memory for these texts than tenants' models may use at once; send fewer or shorter texts";

/// One run of texts padded to the same length.
fn run_padded(
    session: &mut Session,
    plan: &TextPlan,
    encodings: &[Encoding],
    options: &RunOptions,
) -> Result<TextOutput, Failed> {
    let rows = encodings.len();
    let tokens = encodings.first().map_or(0, tokenizers::Encoding::len);
    let column = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
        encodings
            .iter()
            .flat_map(|e| f(e).iter().map(|&v| i64::from(v)))
            .collect()
    };
    let dim = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let shape = [dim(rows), dim(tokens)];
    let mask = column(tokenizers::Encoding::get_attention_mask);
    let mut inputs = vec![
        (
            "input_ids",
            int64_tensor(&shape, column(tokenizers::Encoding::get_ids))?,
        ),
        ("attention_mask", int64_tensor(&shape, mask.clone())?),
    ];
    if plan.token_type_ids {
        inputs.push((
            "token_type_ids",
            int64_tensor(&shape, column(tokenizers::Encoding::get_type_ids))?,
        ));
    }
    let outputs = session
        .run_with_options(inputs, options)
        .map_err(|err| crate::arena::no_room(&err.to_string()).unwrap_or_else(|| err.into()))?;
    let value = outputs
        .get(&plan.output)
        .ok_or_else(|| InferenceError::Runtime(format!("the model returned no `{}`", plan.output)))?;
    let (out_shape, data) = value.try_extract_tensor::<f32>()?;
    // An uploaded model may answer in any shape: check it before reading rows out of it.
    let expected: &[usize] = if plan.pool { &[rows, tokens] } else { &[rows] };
    let fits = out_shape.len() == expected.len() + 1
        && out_shape
            .iter()
            .zip(expected)
            .all(|(given, wanted)| usize::try_from(*given).ok() == Some(*wanted))
        && usize::try_from(out_shape.iter().product::<i64>()).ok() == Some(data.len());
    if !fits {
        return Err(Failed::Other(InferenceError::InvalidModel(format!(
            "the model answered `{}` with shape {:?} for {rows} texts of {tokens} tokens",
            plan.output,
            &out_shape[..]
        ))));
    }
    // What is copied out and answered, a few numbers per text for most models: no more than a call
    // may send, whatever width a tenant's graph answers.
    let answered = rows.saturating_mul(usize::try_from(out_shape[out_shape.len() - 1]).unwrap_or(0));
    if answered > crate::tensor::MAX_ELEMENTS {
        return Err(Failed::Other(InferenceError::InvalidModel(format!(
            "the model answered {answered} numbers for {rows} texts; at most {} are sent back",
            crate::tensor::MAX_ELEMENTS
        ))));
    }
    let (width, mut data) = if plan.pool {
        let dim = usize::try_from(out_shape[2]).unwrap_or(0);
        let mut pooled = vec![0.0f32; rows * dim];
        for row in 0..rows {
            let mut count = 0.0f32;
            for token in 0..tokens {
                if mask[row * tokens + token] == 0 {
                    continue;
                }
                count += 1.0;
                let offset = (row * tokens + token) * dim;
                for d in 0..dim {
                    pooled[row * dim + d] += data[offset + d];
                }
            }
            for value in &mut pooled[row * dim..(row + 1) * dim] {
                *value /= count.max(1e-9);
            }
        }
        (dim, pooled)
    } else {
        (usize::try_from(out_shape[1]).unwrap_or(0), data.to_vec())
    };
    if plan.softmax {
        for row in data.chunks_mut(width.max(1)) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row
                .iter_mut()
                .map(|v| {
                    *v = (*v - max).exp();
                    *v
                })
                .sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
    }
    Ok(TextOutput {
        width,
        data,
        stages: Stages::direct(),
    })
}

/// Whether protocol call `next` may join `run`: its inputs have the same names, datatypes and every
/// dimension but the first (the batch's) as the run's first call's, it asks for the same outputs, and
/// the run stays within [`crate::tensor::MAX_ELEMENTS`] per input, as one call must.
///
/// Only on models whose rows are independent (see `engine`): the platform's, whose graphs are built
/// so (each token quantized on its own), and text models, whose texts are batched anyway. A tenant's
/// tensor model may compute across its batch, so each of its calls runs alone.
fn tensors_share_a_run(run: &[Queued], next: &Work) -> bool {
    let (Some((first, wanted)), Some((inputs, asked))) = (run[0].work.tensors(), next.tensors()) else {
        return false;
    };
    let same = wanted == asked
        && first.len() == inputs.len()
        && inputs.iter().all(|input| {
            first.iter().any(|other| {
                other.name == input.name
                    && other.data.datatype() == input.data.datatype()
                    && other.shape.len() == input.shape.len()
                    && !input.shape.is_empty()
                    && other.shape[1..] == input.shape[1..]
            })
        });
    same && inputs.iter().all(|input| {
        let joined: usize = run
            .iter()
            .filter_map(|call| call.work.tensors())
            .filter_map(|(inputs, _)| inputs.iter().find(|t| t.name == input.name))
            .map(|t| t.data.len())
            .sum();
        joined + input.data.len() <= crate::tensor::MAX_ELEMENTS
    })
}

/// Whether the calls of `run` and `next` (which share a run, see [`tensors_share_a_run`]) cost together
/// no more than one text call to a platform model may: each is checked alone as it arrives, and a run
/// of many at the limit would take many times the memory.
fn joined_text_cost_fits(run: &[Queued], next: &Work) -> bool {
    let Some((inputs, _)) = next.tensors() else {
        return false;
    };
    inputs.iter().all(|input| {
        let joined = run
            .iter()
            .filter_map(|call| call.work.tensors())
            .filter_map(|(inputs, _)| inputs.iter().find(|t| t.name == input.name))
            .map(crate::engine::rows)
            .fold(crate::engine::rows(input), usize::saturating_add);
        crate::engine::text_cost_fits(joined, input.shape.get(1..).unwrap_or_default())
    })
}

/// Each protocol call's outputs. Calls in one run (see [`tensors_share_a_run`]) run together, each
/// getting its rows of every output. A shared run that fails is split in halves, each run again
/// (and split again while it fails), so one caller's bad input fails only its own call, at the cost
/// of a few runs that fail at once rather than a run per call. One whose outputs do not have a row
/// per input row runs each call alone.
fn run_tensor_calls(
    session: &mut Session,
    calls: &[Queued],
    options: &RunSettings,
    terminated: &AtomicBool,
    stats: &Stats,
) -> Vec<Result<Vec<Tensor>, InferenceError>> {
    let work: Vec<(&[Tensor], Option<&[String]>)> =
        calls.iter().filter_map(|call| call.work.tensors()).collect();
    let rows: Vec<usize> = calls.iter().map(|call| call.items).collect();
    let mut answers = Vec::with_capacity(work.len());
    answer_in_halves(session, &work, &rows, options, terminated, stats, &mut answers);
    answers
}

/// Answers `work` (appending to `answers`, in order): together, or in halves while that fails.
fn answer_in_halves(
    session: &mut Session,
    work: &[(&[Tensor], Option<&[String]>)],
    rows: &[usize],
    options: &RunSettings,
    terminated: &AtomicBool,
    stats: &Stats,
    answers: &mut Vec<Result<Vec<Tensor>, InferenceError>>,
) {
    if let [(inputs, outputs)] = work {
        answers.push(run_raw(session, inputs, *outputs, options));
        return;
    }
    match run_together(session, work, rows, options) {
        Some(Ok(together)) => answers.extend(together.into_iter().map(Ok)),
        // Past the deadline every caller's time is up: nothing is run again.
        Some(Err(_)) if terminated.load(Ordering::Relaxed) => {
            answers.extend(work.iter().map(|_| Err(InferenceError::Timeout)));
        }
        Some(Err(_)) => {
            stats.split_runs.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("plinth_inference_tensor_runs_split_total").increment(1);
            let half = work.len() / 2;
            answer_in_halves(
                session,
                &work[..half],
                &rows[..half],
                options,
                terminated,
                stats,
                answers,
            );
            answer_in_halves(
                session,
                &work[half..],
                &rows[half..],
                options,
                terminated,
                stats,
                answers,
            );
        }
        None => {
            stats.split_runs.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("plinth_inference_tensor_runs_split_total").increment(1);
            answers.extend(
                work.iter()
                    .map(|(inputs, outputs)| run_raw(session, inputs, *outputs, options)),
            );
        }
    }
}

/// One run of several calls' tensors joined along the first dimension, its outputs cut into each
/// call's `rows`. `None` when the inputs do not join or an output does not split.
fn run_together(
    session: &mut Session,
    work: &[(&[Tensor], Option<&[String]>)],
    rows: &[usize],
    options: &RunSettings,
) -> Option<Result<Vec<Vec<Tensor>>, InferenceError>> {
    let (first, wanted) = work[0];
    let joined = first
        .iter()
        .map(|input| {
            let parts: Option<Vec<&Tensor>> = work
                .iter()
                .map(|(inputs, _)| inputs.iter().find(|t| t.name == input.name))
                .collect();
            Tensor::concat_rows(&parts?)
        })
        .collect::<Option<Vec<Tensor>>>()?;
    let outputs = match run_raw(session, &joined, wanted, options) {
        Ok(outputs) => outputs,
        Err(err) => return Some(Err(err)),
    };
    let mut answers: Vec<Vec<Tensor>> = work.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for output in outputs {
        for (answer, piece) in answers.iter_mut().zip(output.split_rows(rows)?) {
            answer.push(piece);
        }
    }
    Some(Ok(answers))
}

fn run_raw(
    session: &mut Session,
    inputs: &[Tensor],
    wanted: Option<&[String]>,
    options: &RunSettings,
) -> Result<Vec<Tensor>, InferenceError> {
    options
        .run(|options| run_raw_once(session, inputs, wanted, options))
        .map_err(|failed| {
            let failed = match failed {
                // The platform's graphs share no arena: memory they cannot get, the input asked for.
                Failed::Full if options.memory == Memory::Platform => Failed::Beyond,
                failed => failed,
            };
            failed.into_error(
                "the model asked for more memory than tenants' models may use at once; send smaller inputs",
            )
        })
}

fn run_raw_once(
    session: &mut Session,
    inputs: &[Tensor],
    wanted: Option<&[String]>,
    options: &RunOptions,
) -> Result<Vec<Tensor>, Failed> {
    let names: Vec<String> = match wanted {
        Some(names) => names.to_vec(),
        None => session.outputs().iter().map(|o| o.name().to_owned()).collect(),
    };
    let values = inputs
        .iter()
        .map(|t| Ok((t.name.as_str(), t.to_ort()?)))
        .collect::<Result<Vec<_>, InferenceError>>()?;
    let outputs = session.run_with_options(values, options).map_err(|err| {
        let message = err.to_string();
        crate::arena::no_room(&message).unwrap_or_else(|| {
            InferenceError::InvalidInput(format!("the model rejected the inputs: {message}")).into()
        })
    })?;
    let values = names
        .iter()
        .map(|name| {
            outputs
                .get(name)
                .map(|value| (name, value))
                .ok_or_else(|| InferenceError::Runtime(format!("no output `{name}`")))
        })
        .collect::<Result<Vec<_>, InferenceError>>()?;
    // Copied out and written as JSON, an element takes tens of bytes: a graph may answer no more than
    // a call may send.
    let elements = values
        .iter()
        .map(|(_, value)| Tensor::elements_of(value))
        .fold(0_usize, usize::saturating_add);
    if elements > crate::tensor::MAX_ELEMENTS {
        return Err(Failed::Other(InferenceError::InvalidInput(format!(
            "the model answered {elements} elements for these inputs; at most {} are sent back",
            crate::tensor::MAX_ELEMENTS
        ))));
    }
    values
        .into_iter()
        .map(|(name, value)| Tensor::from_ort(name, value))
        .collect::<Result<_, InferenceError>>()
        .map_err(Failed::Other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Scheduling, Share};

    fn call_of(tenant: &str) -> (Work, Share) {
        let (reply, waiting) = oneshot::channel();
        std::mem::forget(waiting);
        let share = Share {
            tenant: Arc::from(tenant),
            weight: 1,
            plan: Arc::from("test"),
        };
        (
            Work::Text {
                texts: vec!["text".to_owned()],
                reply,
            },
            share,
        )
    }

    #[tokio::test]
    async fn a_call_sent_back_gives_its_tenants_run_slot_back_at_once() {
        // Two sessions: a tenant's calls may be in one run at a time.
        let queue = Arc::new(FairQueue::new(100, 100, 2, Scheduling::Fair));
        for tenant in ["light", "long"] {
            let (work, share) = call_of(tenant);
            queue.push(work, share, 1).unwrap();
        }
        let all = |_: &[Queued], _: &Queued| true;
        let mut run = queue.next_batch(Duration::ZERO, &all).await.unwrap();
        let mut slot = RunSlot {
            queue: queue.clone(),
            tenants: run.iter().map(|call| call.share.tenant.clone()).collect(),
            release: Release::Both,
        };
        let long = run.pop().unwrap();
        slot.leave(&long.share.tenant);
        queue.send_back(long, 100);
        // While the light tenant's run goes on, the call sent back leads the other session's run, as
        // the only run of its tenant (normal priority).
        let next = tokio::time::timeout(Duration::from_secs(1), queue.next_batch(Duration::ZERO, &all))
            .await
            .expect("the call sent back is not held back by the run it left")
            .unwrap();
        assert_eq!(next[0].share.tenant.as_ref(), "long");
        assert!(!queue.runs_in_background(&next[0].share.tenant));
        drop(slot);
    }

    /// Token ids of `rows` rows of `length` for `tenant`.
    fn token_ids(tenant: &str, rows: i64, length: i64) -> (Work, Share) {
        let (reply, waiting) = oneshot::channel();
        std::mem::forget(waiting);
        let elements = usize::try_from(rows * length).unwrap();
        let ids = Tensor::from_json(
            "input_ids",
            "INT64",
            &[rows, length],
            &serde_json::json!(vec![0; elements]),
        )
        .unwrap();
        let (_, share) = call_of(tenant);
        (
            Work::Raw {
                inputs: vec![ids],
                outputs: None,
                reply,
            },
            share,
        )
    }

    /// Each call to a platform model is held to what a text call may cost as it arrives; calls joined
    /// into one run are held to it together, or a run of many at the limit would take many times the
    /// memory.
    #[tokio::test]
    async fn calls_to_a_platform_model_join_a_run_only_within_what_one_text_call_may_cost() {
        let queue = FairQueue::new(100, 100, 4, Scheduling::Fifo);
        for (tenant, rows) in [("a", 8), ("b", 8), ("c", 1)] {
            let (work, share) = token_ids(tenant, rows, 512);
            queue.push(work, share, usize::try_from(rows).unwrap()).unwrap();
        }
        let all = |_: &[Queued], _: &Queued| true;
        let run = queue.next_batch(Duration::ZERO, &all).await.unwrap();
        let rows: Vec<_> = run.iter().map(|call| call.items).collect();
        assert_eq!(rows, [8, 8, 1]);
        // 16 rows of 512 tokens cost what 256 of 128 do; 17 cost more.
        assert!(joined_text_cost_fits(&run[..1], &run[1].work));
        assert!(!joined_text_cost_fits(&run[..2], &run[2].work));
    }

    #[test]
    fn only_the_words_a_model_can_read_are_tokenized() {
        assert_eq!(leading_words("one two  three four", 2), "one two");
        assert_eq!(leading_words("  one\ttwo\nthree", 2), "  one\ttwo");
        assert_eq!(leading_words("one two", 2), "one two");
        assert_eq!(leading_words("one two ", 2), "one two");
        assert_eq!(leading_words("", 2), "");
        assert_eq!(leading_words("naïve café über", 2), "naïve café");
        assert_eq!(leading_words("one two", usize::MAX), "one two");
    }

    #[test]
    fn texts_are_cut_only_where_the_tokenizer_splits_at_whitespace() {
        let vocab = [("[UNK]", 0), ("a", 1), ("b", 2), ("c", 3), ("a b c", 4)]
            .map(|(word, id)| (word.to_owned(), id));
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into())
            .unk_token("[UNK]".to_owned())
            .build()
            .unwrap();
        let mut tokenizer = TextTokenizer::unbounded(tokenizers::Tokenizer::new(model));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: 2,
                ..tokenizers::TruncationParams::default()
            }))
            .unwrap();
        let ids = |tokenizer: &TextTokenizer| {
            encode(tokenizer, &["a b c".to_owned()], &AtomicBool::new(false)).unwrap()[0]
                .get_ids()
                .to_vec()
        };
        // No pre-tokenizer: the whole text is one token, which a cut after two words would lose.
        assert_eq!(ids(&tokenizer), [4]);
        tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
        assert_eq!(ids(&tokenizer), [1, 2]);
        // A post-processor that adds the text again after truncation (loading refuses it) is not run.
        let template = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("$A $A $A")
            .unwrap()
            .build()
            .unwrap();
        let mut repeating = tokenizer.clone();
        repeating.with_post_processor(Some(template));
        assert!(matches!(
            encode(&repeating, &["a b c".to_owned()], &AtomicBool::new(false)),
            Err(InferenceError::InvalidModel(_))
        ));
        // A text its normalizer makes more than 4 times as long as the longest text is refused.
        let mut expanding = tokenizer.clone();
        expanding
            .with_normalizer(Some(
                tokenizers::normalizers::replace::Replace::new("a", "a".repeat(8)).unwrap(),
            ))
            .unwrap();
        let long = "a".repeat(crate::engine::MAX_TEXT_BYTES);
        // Refused before it is split into pieces (a piece a character, or an added token matched in
        // the normalized text, would make 256 Ki pieces).
        expanding.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::fixed_length::FixedLength::new(
            1,
        )));
        expanding
            .add_tokens([tokenizers::AddedToken::from("a", false)])
            .unwrap();
        let started = Instant::now();
        assert!(matches!(
            encode(&expanding, &[long], &AtomicBool::new(false)),
            Err(InferenceError::InvalidInput(reason)) if reason.contains("before splitting it into tokens")
        ));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(encode(&expanding, &["a b".to_owned()], &AtomicBool::new(false)).is_ok());
        // Normalized as the library does, piece by piece between (special) added tokens: a prefix
        // for each.
        let mut prefixing = tokenizer.clone();
        prefixing
            .with_normalizer(Some(tokenizers::normalizers::prepend::Prepend::new(
                "x".repeat(70),
            )))
            .unwrap();
        prefixing
            .add_tokens([tokenizers::AddedToken::from("b", true)])
            .unwrap();
        let pieces = "ab".repeat(crate::engine::MAX_TEXT_BYTES / 2);
        assert!(matches!(
            encode(&prefixing, &[pieces], &AtomicBool::new(false)),
            Err(InferenceError::InvalidInput(reason)) if reason.contains("before splitting it into tokens")
        ));
        // Pre-tokenizers grow it too: three byte-level steps make each "ÿ" (2 bytes) 16.
        let mut byte_level = tokenizer.clone();
        let step = tokenizers::PreTokenizerWrapper::from(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, false),
        );
        byte_level.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(
            vec![step; 3],
        )));
        assert!(matches!(
            encode(&byte_level, &["ÿ".repeat(crate::engine::MAX_TEXT_BYTES / 2)], &AtomicBool::new(false)),
            Err(InferenceError::InvalidInput(reason)) if reason.contains("before splitting it into tokens")
        ));
        assert!(encode(&byte_level, &["ÿ".repeat(1000)], &AtomicBool::new(false)).is_ok());
        // Past the run's deadline, no further text is tokenized.
        let texts = vec!["a b".to_owned(); 3];
        assert!(matches!(
            encode(&tokenizer, &texts, &AtomicBool::new(true)),
            Err(InferenceError::Timeout)
        ));
    }

    #[test]
    fn calls_of_other_tenants_longer_than_the_leaders_texts_are_singled_out() {
        let (light, other, third): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("light"), Arc::from("other"), Arc::from("third"));
        let run = [
            (&light, 12),
            (&other, 128),
            (&light, 40),
            (&third, 40),
            (&other, 9),
        ];
        assert_eq!(
            longer_than_the_leaders(&light, &run),
            [false, true, false, false, false],
            "only the call longer than the light tenant's longest (40)"
        );
        // The tenant a run is for is never sent back from it, however long its texts, nor anyone
        // when none of its calls is left to compare with (the tokenizer refused them).
        assert_eq!(
            longer_than_the_leaders(&light, &[(&light, 128), (&light, 512)]),
            [false, false]
        );
        assert_eq!(
            longer_than_the_leaders(&light, &[(&other, 128), (&third, 9)]),
            [false, false]
        );
        assert!(longer_than_the_leaders(&light, &[]).is_empty());
    }
}
