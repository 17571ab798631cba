//! The batcher: each session of a model has a worker that takes the calls queued for the model, joins
//! text calls into one run (up to `max_batch` items, waiting at most `max_delay` for company), runs it on
//! a blocking thread, and hands each caller its rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::DynValue;
use plinth_core::inference::{Task, TensorMetadata};
use tokenizers::Tokenizer;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::InferenceError;
use crate::tensor::Tensor;

pub(crate) enum Work {
    Text {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<TextOutput, InferenceError>>,
        queued: Instant,
    },
    Raw {
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
        reply: oneshot::Sender<Result<Vec<Tensor>, InferenceError>>,
        queued: Instant,
    },
}

impl Work {
    fn items(&self) -> usize {
        match self {
            Self::Text { texts, .. } => texts.len(),
            Self::Raw { .. } => 1,
        }
    }
}

/// Rows of one output for one call: `width` floats per text.
#[derive(Debug)]
pub(crate) struct TextOutput {
    width: usize,
    data: Vec<f32>,
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

pub(crate) struct Worker {
    pub(crate) session: Session,
    pub(crate) receiver: Arc<Mutex<mpsc::Receiver<Work>>>,
    pub(crate) tokenizer: Option<Arc<Tokenizer>>,
    pub(crate) text: Option<TextPlan>,
    pub(crate) max_batch: usize,
    pub(crate) max_delay: Duration,
    pub(crate) model: String,
    pub(crate) stats: Arc<Stats>,
}

/// Per-model counters, read by the statistics endpoint.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) success: AtomicU64,
    pub(crate) failure: AtomicU64,
    pub(crate) items: AtomicU64,
    pub(crate) executions: AtomicU64,
}

impl Worker {
    /// One run before serving, so the first caller does not pay for lazy initialisation (and a GPU
    /// that cannot run the model fails at load, not on a customer's call).
    pub(crate) fn warm_up(&mut self) -> Result<(), InferenceError> {
        if let (Some(plan), Some(tokenizer)) = (&self.text, &self.tokenizer) {
            run_text(&mut self.session, tokenizer, plan, &["warm up".to_owned()])?;
        }
        Ok(())
    }

    pub(crate) async fn run(mut self) {
        let mut carry = None;
        while let Some(batch) = self.next_batch(&mut carry).await {
            let tokenizer = self.tokenizer.clone();
            let text = self.text.clone();
            let model = self.model.clone();
            let stats = self.stats.clone();
            let mut session = self.session;
            let joined = tokio::task::spawn_blocking(move || {
                process(
                    &mut session,
                    tokenizer.as_deref(),
                    text.as_ref(),
                    batch,
                    &model,
                    &stats,
                );
                session
            })
            .await;
            match joined {
                Ok(session) => self.session = session,
                Err(err) => {
                    tracing::error!(model = %self.model, error = %err, "inference worker panicked; the model loses a session");
                    return;
                }
            }
        }
    }

    /// The next batch: one raw call, or text calls joined up to `max_batch` items.
    async fn next_batch(&self, carry: &mut Option<Work>) -> Option<Vec<Work>> {
        let mut receiver = self.receiver.lock().await;
        let first = match carry.take() {
            Some(work) => work,
            None => receiver.recv().await?,
        };
        if matches!(first, Work::Raw { .. }) || self.max_batch <= 1 {
            return Some(vec![first]);
        }
        let deadline = tokio::time::Instant::now() + self.max_delay;
        let mut items = first.items();
        let mut batch = vec![first];
        while items < self.max_batch {
            let next = match receiver.try_recv() {
                Ok(work) => work,
                Err(mpsc::error::TryRecvError::Empty) if !self.max_delay.is_zero() => {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(work)) => work,
                        _ => break,
                    }
                }
                Err(_) => break,
            };
            if matches!(next, Work::Raw { .. }) || items + next.items() > self.max_batch {
                *carry = Some(next);
                break;
            }
            items += next.items();
            batch.push(next);
        }
        Some(batch)
    }
}

fn process(
    session: &mut Session,
    tokenizer: Option<&Tokenizer>,
    plan: Option<&TextPlan>,
    batch: Vec<Work>,
    model: &str,
    stats: &Stats,
) {
    let started = Instant::now();
    let requests = batch.len() as u64;
    let items: usize = batch.iter().map(Work::items).sum();
    let mut succeeded = true;
    let mut text_calls = Vec::new();
    for work in batch {
        let queued = match &work {
            Work::Text { queued, .. } | Work::Raw { queued, .. } => *queued,
        };
        metrics::counter!("nv_inference_queue_duration_us", "model" => model.to_owned())
            .increment(u64::try_from(started.duration_since(queued).as_micros()).unwrap_or(u64::MAX));
        match work {
            Work::Raw {
                inputs,
                outputs,
                reply,
                ..
            } => {
                let result = run_raw(session, &inputs, outputs.as_deref());
                succeeded &= result.is_ok();
                let _ = reply.send(result);
            }
            Work::Text { texts, reply, .. } => text_calls.push((texts, reply)),
        }
    }
    if !text_calls.is_empty() {
        succeeded &= answer_text_calls(session, tokenizer, plan, text_calls);
    }
    let elapsed = started.elapsed();
    let counter = if succeeded { &stats.success } else { &stats.failure };
    counter.fetch_add(requests, Ordering::Relaxed);
    stats.items.fetch_add(items as u64, Ordering::Relaxed);
    stats.executions.fetch_add(1, Ordering::Relaxed);
    let outcome = if succeeded {
        "nv_inference_request_success"
    } else {
        "nv_inference_request_failure"
    };
    metrics::counter!(outcome, "model" => model.to_owned()).increment(requests);
    metrics::counter!("nv_inference_count", "model" => model.to_owned()).increment(items as u64);
    metrics::counter!("nv_inference_exec_count", "model" => model.to_owned()).increment(1);
    metrics::counter!("nv_inference_compute_infer_duration_us", "model" => model.to_owned())
        .increment(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    metrics::histogram!("plinth_inference_batch_size", "model" => model.to_owned()).record(items as f64);
}

type TextCall = (Vec<String>, oneshot::Sender<Result<TextOutput, InferenceError>>);

/// Runs every text of every call at once and gives each call its rows.
fn answer_text_calls(
    session: &mut Session,
    tokenizer: Option<&Tokenizer>,
    plan: Option<&TextPlan>,
    calls: Vec<TextCall>,
) -> bool {
    let all: Vec<String> = calls
        .iter()
        .flat_map(|(texts, _)| texts.iter().cloned())
        .collect();
    let result = match (tokenizer, plan) {
        (Some(tokenizer), Some(plan)) => run_text(session, tokenizer, plan, &all),
        _ => Err(InferenceError::WrongTask(
            "this model takes tensors, not text".into(),
        )),
    };
    match result {
        Ok(output) => {
            let mut offset = 0;
            for (texts, reply) in calls {
                let rows = output.width * texts.len();
                let data = output.data[offset..offset + rows].to_vec();
                offset += rows;
                let _ = reply.send(Ok(TextOutput {
                    width: output.width,
                    data,
                }));
            }
            true
        }
        Err(err) => {
            let message = err.to_string();
            for (_, reply) in calls {
                let _ = reply.send(Err(InferenceError::Runtime(message.clone())));
            }
            false
        }
    }
}

fn int64_tensor(shape: &[i64], values: Vec<i64>) -> Result<DynValue, InferenceError> {
    Ok(ort::value::Tensor::from_array((shape.to_vec(), values))?.into_dyn())
}

/// Tokenizes (padding to the longest text), runs, and reads the plan's output as `[texts, width]`.
fn run_text(
    session: &mut Session,
    tokenizer: &Tokenizer,
    plan: &TextPlan,
    texts: &[String],
) -> Result<TextOutput, InferenceError> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(|err| InferenceError::InvalidInput(format!("tokenization failed: {err}")))?;
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
    let outputs = session.run(inputs)?;
    let value = outputs
        .get(&plan.output)
        .ok_or_else(|| InferenceError::Runtime(format!("the model returned no `{}`", plan.output)))?;
    let (out_shape, data) = value.try_extract_tensor::<f32>()?;
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
    Ok(TextOutput { width, data })
}

fn run_raw(
    session: &mut Session,
    inputs: &[Tensor],
    wanted: Option<&[String]>,
) -> Result<Vec<Tensor>, InferenceError> {
    let names: Vec<String> = match wanted {
        Some(names) => names.to_vec(),
        None => session.outputs().iter().map(|o| o.name().to_owned()).collect(),
    };
    let values = inputs
        .iter()
        .map(|t| Ok((t.name.as_str(), t.to_ort()?)))
        .collect::<Result<Vec<_>, InferenceError>>()?;
    let outputs = session
        .run(values)
        .map_err(|err| InferenceError::InvalidInput(format!("the model rejected the inputs: {err}")))?;
    names
        .iter()
        .map(|name| {
            let value = outputs
                .get(name)
                .ok_or_else(|| InferenceError::Runtime(format!("no output `{name}`")))?;
            Tensor::from_ort(name, value)
        })
        .collect()
}
