//! Recording an invocation in full, and replaying it away from the platform.
//!
//! A [`Recorder`] stands between the host and the platform's services and writes down each call the
//! plugin makes (the WIT function and its arguments) with the answer it got. A [`Replayer`] stands in
//! for the services on an author's machine and answers each call from that record, in order: the
//! plugin runs in the same sandbox, under the same limits, and sees what it saw in production, so the
//! same failure happens again. A call that differs from the recorded one (another function, other
//! arguments, one too many) ends the replay's answers there and is reported as a [`Divergence`];
//! so is a run that stops short of the recorded calls.
//!
//! A record is bounded: past [`Recorder::new`]'s budget the recorder lets go of what it holds and
//! the invocation is not recorded in full. Secrets are never recorded: [`redact`] replaces each
//! secret's value wherever it appears with `[secret NAME]`, which is what a replay hands the plugin
//! for that secret unless the author supplies a stand-in. A call the deadline cut off is recorded as
//! [`HostAnswer::Interrupted`], and the replay leaves it unanswered until the same deadline stops it.
//!
//! What is not replayed: the wall clock and randomness (WASI's), which the plugin reads from the
//! machine it runs on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use plinth_core::id::TenantId;
use plinth_core::inference::Classification;
use plinth_core::plugins::{
    Bytes, HostAnswer, HostCall, HostRefusal, HostRequest, RecordedInvocation, RecordedLimits,
    secret_placeholder,
};

use crate::runtime::{Compiled, Outcome, PluginHost};
use crate::{CallContext, InvokeError, Limits, LogLine, ServiceError, Services, Trace};

/// Secret values shorter than this are not searched for in a record (they would match everywhere).
pub const SHORTEST_REDACTED_SECRET: usize = 4;

fn refusal(err: &ServiceError) -> HostRefusal {
    let (kind, message) = match err {
        ServiceError::InvalidInput(message) => ("invalid_input", message),
        ServiceError::QuotaExceeded(message) => ("quota_exceeded", message),
        ServiceError::Unavailable(message) => ("unavailable", message),
    };
    HostRefusal {
        kind: kind.to_owned(),
        message: message.clone(),
    }
}

fn refused(refusal: &HostRefusal) -> ServiceError {
    let message = refusal.message.clone();
    match refusal.kind.as_str() {
        "invalid_input" => ServiceError::InvalidInput(message),
        "quota_exceeded" => ServiceError::QuotaExceeded(message),
        _ => ServiceError::Unavailable(message),
    }
}

/// About how many bytes of JSON a request or answer takes in a record.
fn text_weight(text: &str) -> usize {
    text.len() + 8
}

fn texts_weight(texts: &[String]) -> usize {
    texts.iter().map(|text| text_weight(text)).sum::<usize>() + 8
}

#[derive(Debug, Default)]
struct Recording {
    calls: Vec<HostCall>,
    bytes: usize,
    /// Past the budget: nothing more is kept, and what was is let go.
    overflowed: bool,
}

/// The invocation was too large to record in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub budget: usize,
}

/// Records every service call of one invocation on its way to `inner`, within a byte budget.
#[derive(Debug)]
pub struct Recorder {
    inner: Arc<dyn Services>,
    budget: usize,
    recording: Mutex<Recording>,
}

impl Recorder {
    /// Records at most about `budget` bytes (as JSON) of calls and answers.
    #[must_use]
    pub fn new(inner: Arc<dyn Services>, budget: usize) -> Self {
        Self {
            inner,
            budget,
            recording: Mutex::default(),
        }
    }

    fn recording(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calls recorded, in the order they were made; or that they did not fit the budget.
    ///
    /// # Errors
    /// [`TooLarge`] when the calls and answers went past the budget.
    pub fn take(&self) -> Result<Vec<HostCall>, TooLarge> {
        let mut recording = self.recording();
        if recording.overflowed {
            return Err(TooLarge { budget: self.budget });
        }
        Ok(std::mem::take(&mut recording.calls))
    }

    /// Counts `weight` bytes against the budget; past it, lets everything go.
    fn spend(&self, recording: &mut Recording, weight: usize) -> bool {
        recording.bytes = recording.bytes.saturating_add(weight);
        if recording.bytes > self.budget {
            recording.overflowed = true;
            recording.calls = Vec::new();
        }
        !recording.overflowed
    }

    /// Writes a call down before it is made (its answer `Interrupted` until it comes): `weight`
    /// is counted before `request` is built, so an oversized call is never copied.
    fn begin(&self, weight: usize, request: impl FnOnce() -> HostRequest) -> Option<usize> {
        let mut recording = self.recording();
        if recording.overflowed || !self.spend(&mut recording, weight) {
            return None;
        }
        recording.calls.push(HostCall {
            request: request(),
            answer: HostAnswer::Interrupted,
        });
        Some(recording.calls.len() - 1)
    }

    /// Writes down the answer to the call at `at`, weighing it before it is copied.
    fn end<T>(
        &self,
        at: Option<usize>,
        result: Result<T, ServiceError>,
        weight: impl FnOnce(&T) -> usize,
        answer: impl FnOnce(&T) -> HostAnswer,
    ) -> Result<T, ServiceError> {
        let Some(at) = at else {
            return result;
        };
        let mut recording = self.recording();
        let weight = match &result {
            Ok(value) => weight(value),
            Err(err) => text_weight(&refusal(err).message) + 32,
        };
        if recording.overflowed || !self.spend(&mut recording, weight) {
            return result;
        }
        // Gone when the record was taken before the call ended (it ends apart from its guest).
        if let Some(call) = recording.calls.get_mut(at) {
            call.answer = match &result {
                Ok(value) => answer(value),
                Err(err) => HostAnswer::Refused(refusal(err)),
            };
        }
        result
    }
}

#[async_trait::async_trait]
impl Services for Recorder {
    async fn classify(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError> {
        let at = self.begin(text_weight(model) + texts_weight(&texts), || {
            HostRequest::Classify {
                model: model.to_owned(),
                texts: texts.clone(),
            }
        });
        let result = self.inner.classify(call, sequence, model, texts).await;
        self.end(
            at,
            result,
            |results| {
                results
                    .iter()
                    .map(|c| {
                        text_weight(&c.label)
                            + 16
                            + c.scores.iter().map(|s| text_weight(&s.label) + 16).sum::<usize>()
                    })
                    .sum()
            },
            |value| HostAnswer::Classifications(value.clone()),
        )
    }

    async fn embed(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        let at = self.begin(text_weight(model) + texts_weight(&texts), || HostRequest::Embed {
            model: model.to_owned(),
            texts: texts.clone(),
        });
        let result = self.inner.embed(call, sequence, model, texts).await;
        self.end(
            at,
            result,
            |vectors| vectors.iter().map(|v| v.len() * 12 + 8).sum(),
            |value| HostAnswer::Embeddings(value.clone()),
        )
    }

    async fn infer(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError> {
        let at = self.begin(text_weight(model) + text_weight(&request), || {
            HostRequest::Infer {
                model: model.to_owned(),
                request: request.clone(),
            }
        });
        let result = self.inner.infer(call, sequence, model, request).await;
        self.end(
            at,
            result,
            |response| text_weight(response),
            |value| HostAnswer::Response(value.clone()),
        )
    }

    async fn kv_get(&self, call: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        let at = self.begin(text_weight(key), || HostRequest::KvGet { key: key.to_owned() });
        let result = self.inner.kv_get(call, key).await;
        self.end(
            at,
            result,
            |value| value.as_ref().map_or(8, |bytes| bytes.len() * 4 / 3 + 8),
            |value| HostAnswer::Value(value.clone().map(Bytes)),
        )
    }

    async fn kv_set(
        &self,
        call: &CallContext,
        key: &str,
        value: Vec<u8>,
        max_keys: u64,
    ) -> Result<(), ServiceError> {
        let at = self.begin(text_weight(key) + value.len() * 4 / 3 + 8, || {
            HostRequest::KvSet {
                key: key.to_owned(),
                value: Bytes(value.clone()),
            }
        });
        let result = self.inner.kv_set(call, key, value, max_keys).await;
        self.end(at, result, |()| 16, |()| HostAnswer::Stored)
    }

    async fn kv_delete(&self, call: &CallContext, key: &str) -> Result<bool, ServiceError> {
        let at = self.begin(text_weight(key), || HostRequest::KvDelete { key: key.to_owned() });
        let result = self.inner.kv_delete(call, key).await;
        self.end(at, result, |_| 16, |existed| HostAnswer::Existed(*existed))
    }

    async fn kv_list(&self, call: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        let at = self.begin(text_weight(prefix), || HostRequest::KvList {
            prefix: prefix.to_owned(),
        });
        let result = self.inner.kv_list(call, prefix).await;
        self.end(
            at,
            result,
            |keys| texts_weight(keys),
            |keys| HostAnswer::Keys(keys.clone()),
        )
    }

    fn finished(&self, call: &CallContext, trace: Trace) {
        self.inner.finished(call, trace);
    }
}

/// Replaces each secret's value (of [`SHORTEST_REDACTED_SECRET`] bytes or more) with
/// `[secret NAME]` everywhere in `record`: the request, the answer, the settings (keys and values),
/// and every host call's arguments and answer, key-value bytes included; as written and as it reads
/// inside JSON text (escaped). One pass, in time linear in the record: the longest secret wins where
/// two overlap, and a placeholder is never searched again. A plugin that writes a secret into its
/// store, a model's input or its answer does not carry it out in the record; one that encodes it
/// first (base64, split across calls) does: the record is the tenant's to hand over.
pub fn redact(record: &mut RecordedInvocation, secrets: &BTreeMap<String, String>) {
    let mut patterns: Vec<String> = Vec::new();
    let mut placeholders: Vec<String> = Vec::new();
    for (name, value) in secrets {
        if value.len() < SHORTEST_REDACTED_SECRET {
            continue;
        }
        let placeholder = secret_placeholder(name);
        let escaped = serde_json::to_string(value).unwrap_or_default();
        let escaped = escaped.trim_matches('"');
        if escaped != value {
            patterns.push(escaped.to_owned());
            placeholders.push(placeholder.clone());
        }
        patterns.push(value.clone());
        placeholders.push(placeholder);
    }
    if patterns.is_empty() {
        return;
    }
    let Ok(matcher) = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .build(&patterns)
    else {
        return;
    };
    let text = |text: &mut String| {
        if matcher.is_match(text.as_str()) {
            *text = matcher.replace_all(text, &placeholders);
        }
    };
    let bytes = |bytes: &mut Vec<u8>| {
        if matcher.is_match(bytes.as_slice()) {
            *bytes = matcher.replace_all_bytes(bytes, &placeholders);
        }
    };
    text(&mut record.request);
    text(&mut record.output);
    let settings = std::mem::take(&mut record.settings);
    record.settings = settings
        .into_iter()
        .map(|(mut key, mut value)| {
            text(&mut key);
            redact_json(&mut value, &text);
            (key, value)
        })
        .collect();
    for call in &mut record.host_calls {
        match &mut call.request {
            HostRequest::Classify { model, texts } | HostRequest::Embed { model, texts } => {
                text(model);
                texts.iter_mut().for_each(text);
            }
            HostRequest::Infer { model, request } => {
                text(model);
                text(request);
            }
            HostRequest::KvGet { key } | HostRequest::KvDelete { key } => text(key),
            HostRequest::KvSet { key, value } => {
                text(key);
                bytes(&mut value.0);
            }
            HostRequest::KvList { prefix } => text(prefix),
        }
        match &mut call.answer {
            HostAnswer::Classifications(results) => {
                for result in results {
                    text(&mut result.label);
                    result.scores.iter_mut().for_each(|score| text(&mut score.label));
                }
            }
            HostAnswer::Response(response) => text(response),
            HostAnswer::Value(Some(value)) => bytes(&mut value.0),
            HostAnswer::Keys(keys) => keys.iter_mut().for_each(text),
            HostAnswer::Refused(refusal) => text(&mut refusal.message),
            HostAnswer::Embeddings(_)
            | HostAnswer::Value(None)
            | HostAnswer::Stored
            | HostAnswer::Existed(_)
            | HostAnswer::Interrupted => {}
        }
    }
}

fn redact_json(value: &mut serde_json::Value, text: &impl Fn(&mut String)) {
    match value {
        serde_json::Value::String(string) => text(string),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|item| redact_json(item, text)),
        serde_json::Value::Object(fields) => {
            let taken = std::mem::take(fields);
            *fields = taken
                .into_iter()
                .map(|(mut key, mut item)| {
                    text(&mut key);
                    redact_json(&mut item, text);
                    (key, item)
                })
                .collect();
        }
        _ => {}
    }
}

/// The limits a recorded invocation ran under, as the host's (the rest at their defaults).
#[must_use]
pub fn recorded_limits(limits: &Limits) -> RecordedLimits {
    RecordedLimits {
        deadline_ms: u64::try_from(limits.deadline.as_millis()).unwrap_or(u64::MAX),
        memory_bytes: limits.memory_bytes as u64,
        fuel: limits.fuel,
        inference_calls: limits.inference_calls,
    }
}

/// The longest deadline a replay takes from a record.
const MOST_REPLAY_DEADLINE_MS: u64 = 10 * 60 * 1000;
/// The most memory a replay takes from a record.
const MOST_REPLAY_MEMORY: u64 = 4 << 30;

/// The host limits to replay a record under: the recorded ones (within sane bounds: a record may
/// come from anyone), the rest at their defaults.
#[must_use]
pub fn replay_limits(recorded: &RecordedLimits) -> Limits {
    Limits {
        deadline: std::time::Duration::from_millis(recorded.deadline_ms.clamp(1, MOST_REPLAY_DEADLINE_MS)),
        memory_bytes: usize::try_from(recorded.memory_bytes.clamp(1 << 20, MOST_REPLAY_MEMORY))
            .unwrap_or(64 << 20),
        fuel: recorded.fuel,
        inference_calls: recorded.inference_calls.min(1_000),
        ..Limits::default()
    }
}

/// Where a replayed plugin left the record: at call `at` (from 1), the record has `recorded` and the
/// plugin made `made` (`None`: it made no such call, or the record has no more).
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    pub at: usize,
    pub recorded: Option<HostRequest>,
    pub made: Option<HostRequest>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.at;
        match (&self.recorded, &self.made) {
            (Some(recorded), Some(made)) => {
                write!(
                    f,
                    "host call {at}: the record has {recorded}, the plugin called {made}"
                )
            }
            (None, Some(made)) => write!(
                f,
                "host call {at}: the plugin called {made}, but the record ends after {} calls",
                at - 1
            ),
            (Some(recorded), None) => write!(
                f,
                "host call {at}: the record has {recorded}, but the plugin ended without making it"
            ),
            (None, None) => write!(f, "host call {at}: no call on either side"),
        }
    }
}

#[derive(Debug, Default)]
struct Tape {
    next: usize,
    divergence: Option<Divergence>,
    trace: Option<Trace>,
}

/// Answers a replayed plugin's service calls from a record, in order.
#[derive(Debug)]
pub struct Replayer {
    calls: Vec<HostCall>,
    tape: Mutex<Tape>,
}

impl Replayer {
    #[must_use]
    pub fn new(calls: Vec<HostCall>) -> Self {
        Self {
            calls,
            tape: Mutex::default(),
        }
    }

    fn tape(&self) -> std::sync::MutexGuard<'_, Tape> {
        self.tape.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The recorded answer to `made`, if it is the call the record has next. A call the deadline cut
    /// off in the recording is never answered here either (the replay's deadline stops it).
    async fn answer(&self, made: HostRequest) -> Result<HostAnswer, ServiceError> {
        let answer = self.next(made)?;
        if answer == HostAnswer::Interrupted {
            std::future::pending::<()>().await;
        }
        Ok(answer)
    }

    fn next(&self, made: HostRequest) -> Result<HostAnswer, ServiceError> {
        let mut tape = self.tape();
        if let Some(divergence) = &tape.divergence {
            return Err(ServiceError::Unavailable(format!(
                "the replay diverged at host call {}",
                divergence.at
            )));
        }
        let at = tape.next;
        match self.calls.get(at) {
            Some(recorded) if recorded.request == made => {
                tape.next += 1;
                Ok(recorded.answer.clone())
            }
            recorded => {
                let divergence = Divergence {
                    at: at + 1,
                    recorded: recorded.map(|call| call.request.clone()),
                    made: Some(made),
                };
                let message = format!("the replay diverged: {divergence}");
                tape.divergence = Some(divergence);
                Err(ServiceError::Unavailable(message))
            }
        }
    }

    /// How the run left the record: the first divergence, or the recorded calls it never made.
    fn divergence(&self) -> Option<Divergence> {
        let tape = self.tape();
        tape.divergence.clone().or_else(|| {
            self.calls.get(tape.next).map(|missing| Divergence {
                at: tape.next + 1,
                recorded: Some(missing.request.clone()),
                made: None,
            })
        })
    }
}

/// A recorded answer that does not fit the call it answers: the record was altered or is corrupt.
fn unfit(answer: &HostAnswer) -> ServiceError {
    ServiceError::Unavailable(format!("the record's answer does not fit the call: {answer:?}"))
}

#[async_trait::async_trait]
impl Services for Replayer {
    async fn classify(
        &self,
        _: &CallContext,
        _: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError> {
        match self
            .answer(HostRequest::Classify {
                model: model.to_owned(),
                texts,
            })
            .await?
        {
            HostAnswer::Classifications(results) => Ok(results),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn embed(
        &self,
        _: &CallContext,
        _: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        match self
            .answer(HostRequest::Embed {
                model: model.to_owned(),
                texts,
            })
            .await?
        {
            HostAnswer::Embeddings(vectors) => Ok(vectors),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn infer(
        &self,
        _: &CallContext,
        _: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError> {
        match self
            .answer(HostRequest::Infer {
                model: model.to_owned(),
                request,
            })
            .await?
        {
            HostAnswer::Response(response) => Ok(response),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_get(&self, _: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        match self.answer(HostRequest::KvGet { key: key.to_owned() }).await? {
            HostAnswer::Value(value) => Ok(value.map(|bytes| bytes.0)),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_set(&self, _: &CallContext, key: &str, value: Vec<u8>, _: u64) -> Result<(), ServiceError> {
        match self
            .answer(HostRequest::KvSet {
                key: key.to_owned(),
                value: Bytes(value),
            })
            .await?
        {
            HostAnswer::Stored => Ok(()),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_delete(&self, _: &CallContext, key: &str) -> Result<bool, ServiceError> {
        match self.answer(HostRequest::KvDelete { key: key.to_owned() }).await? {
            HostAnswer::Existed(existed) => Ok(existed),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_list(&self, _: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        match self
            .answer(HostRequest::KvList {
                prefix: prefix.to_owned(),
            })
            .await?
        {
            HostAnswer::Keys(keys) => Ok(keys),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    fn finished(&self, _: &CallContext, trace: Trace) {
        self.tape().trace = Some(trace);
    }
}

/// How an invocation ended, as records write it: `ok` or the error code, and the answer or the
/// error's message.
#[must_use]
pub fn ending(result: &Result<Outcome, InvokeError>) -> (String, String) {
    match result {
        Ok(outcome) => ("ok".to_owned(), outcome.response.clone()),
        Err(err) => (err.code_name(), err.to_string()),
    }
}

/// A replayed invocation.
#[derive(Debug)]
pub struct Replay {
    pub result: Result<Outcome, InvokeError>,
    /// Where the plugin's host calls left the record, if they did.
    pub divergence: Option<Divergence>,
    /// What the plugin logged during the replay.
    pub logs: Vec<LogLine>,
}

impl Replay {
    /// Whether the replay made the recorded calls and ended as the recorded invocation did.
    #[must_use]
    pub fn reproduces(&self, record: &RecordedInvocation) -> bool {
        self.divergence.is_none() && ending(&self.result) == (record.outcome.clone(), record.output.clone())
    }
}

impl PluginHost {
    /// Runs `compiled` on a recorded invocation's request, its service calls answered from the
    /// record, under this host's limits (make the host with [`replay_limits`]). `secrets` stands in
    /// for the secrets the record names; any left out get `[secret NAME]`, as the record has them.
    pub async fn replay(
        &self,
        compiled: Arc<Compiled>,
        record: &RecordedInvocation,
        secrets: &BTreeMap<String, String>,
    ) -> Replay {
        let call = Arc::new(CallContext {
            tenant_id: TenantId::new(),
            installation_id: format!("replay-of-{}", record.invocation_id),
            instances: 1,
            paying: true,
            plugin: record.plugin.clone(),
            granted_models: record.granted_models.clone(),
            settings: record.settings.clone(),
            secrets: record
                .secret_names
                .iter()
                .map(|name| {
                    let value = secrets
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| secret_placeholder(name));
                    (name.clone(), value)
                })
                .collect(),
            idempotency_key: format!("replay-{}", record.invocation_id),
        });
        let replayer = Arc::new(Replayer::new(record.host_calls.clone()));
        let result = self
            .invoke(compiled, call, replayer.clone(), record.request.clone())
            .await;
        let logs = replayer
            .tape()
            .trace
            .take()
            .map(|trace| trace.logs)
            .unwrap_or_default();
        Replay {
            divergence: replayer.divergence(),
            result,
            logs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoServices;

    fn context() -> CallContext {
        CallContext {
            tenant_id: TenantId::new(),
            installation_id: "inst".into(),
            instances: 1,
            paying: false,
            plugin: "p".into(),
            granted_models: vec![],
            settings: serde_json::Map::new(),
            secrets: BTreeMap::new(),
            idempotency_key: "k".into(),
        }
    }

    #[tokio::test]
    async fn a_replay_answers_recorded_calls_in_order_and_reports_the_first_difference() {
        let call = context();
        let recorder = Recorder::new(Arc::new(NoServices), 1 << 20);
        assert_eq!(recorder.kv_get(&call, "last").await, Ok(None));
        assert!(recorder.kv_set(&call, "last", b"x".to_vec(), 10).await.is_err());
        let calls = recorder.take().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(matches!(calls[1].answer, HostAnswer::Refused(ref r) if r.kind == "unavailable"));

        // The same calls get the same answers, refusals included.
        let same = Replayer::new(calls.clone());
        assert_eq!(same.kv_get(&call, "last").await, Ok(None));
        assert!(matches!(
            same.kv_set(&call, "last", b"x".to_vec(), 10).await,
            Err(ServiceError::Unavailable(_))
        ));
        assert_eq!(same.divergence(), None);

        // Another argument diverges, and nothing is answered after it.
        let other = Replayer::new(calls.clone());
        assert!(other.kv_get(&call, "first").await.is_err());
        let divergence = other.divergence().expect("diverged");
        assert_eq!(divergence.at, 1);
        assert_eq!(
            divergence.to_string(),
            r#"host call 1: the record has kv.get("last"), the plugin called kv.get("first")"#
        );
        assert!(other.kv_set(&call, "last", b"x".to_vec(), 10).await.is_err());

        // Stopping short of the record diverges too; so does a call past its end.
        let short = Replayer::new(calls.clone());
        short.kv_get(&call, "last").await.unwrap();
        assert_eq!(short.divergence().map(|d| d.at), Some(2));
        let long = Replayer::new(calls);
        long.kv_get(&call, "last").await.unwrap();
        let _ = long.kv_set(&call, "last", b"x".to_vec(), 10).await;
        assert!(long.kv_delete(&call, "last").await.is_err());
        assert!(
            long.divergence()
                .unwrap()
                .to_string()
                .contains("the record ends after 2 calls")
        );
    }

    #[tokio::test]
    async fn an_answer_that_does_not_fit_its_call_is_refused() {
        let calls = vec![HostCall {
            request: HostRequest::KvDelete { key: "k".into() },
            answer: HostAnswer::Keys(vec![]),
        }];
        let replayer = Replayer::new(calls);
        assert!(matches!(
            replayer.kv_delete(&context(), "k").await,
            Err(ServiceError::Unavailable(message)) if message.contains("does not fit")
        ));
    }

    #[tokio::test]
    async fn a_recording_past_its_budget_keeps_nothing_and_says_so() {
        let call = context();
        let recorder = Recorder::new(Arc::new(NoServices), 8 << 10);
        for _ in 0..3 {
            let _ = recorder.kv_set(&call, "big", vec![7; 1 << 10], 10).await;
        }
        assert_eq!(recorder.take().map(|calls| calls.len()), Ok(3));
        let recorder = Recorder::new(Arc::new(NoServices), 8 << 10);
        for _ in 0..10 {
            // The calls still go through; only the record gives up.
            let _ = recorder.kv_set(&call, "big", vec![7; 1 << 10], 10).await;
        }
        assert_eq!(recorder.take(), Err(TooLarge { budget: 8 << 10 }));
        assert!(recorder.recording().calls.is_empty(), "what was held is let go");
    }

    #[tokio::test]
    async fn a_call_cut_off_by_the_deadline_is_recorded_and_left_unanswered_in_the_replay() {
        #[derive(Debug)]
        struct Hangs;
        #[async_trait::async_trait]
        impl Services for Hangs {
            async fn classify(
                &self,
                _: &CallContext,
                _: u32,
                _: &str,
                _: Vec<String>,
            ) -> Result<Vec<Classification>, ServiceError> {
                std::future::pending().await
            }
            async fn embed(
                &self,
                _: &CallContext,
                _: u32,
                _: &str,
                _: Vec<String>,
            ) -> Result<Vec<Vec<f32>>, ServiceError> {
                std::future::pending().await
            }
            async fn infer(
                &self,
                _: &CallContext,
                _: u32,
                _: &str,
                _: String,
            ) -> Result<String, ServiceError> {
                std::future::pending().await
            }
            async fn kv_get(&self, _: &CallContext, _: &str) -> Result<Option<Vec<u8>>, ServiceError> {
                std::future::pending().await
            }
            async fn kv_set(&self, _: &CallContext, _: &str, _: Vec<u8>, _: u64) -> Result<(), ServiceError> {
                std::future::pending().await
            }
            async fn kv_delete(&self, _: &CallContext, _: &str) -> Result<bool, ServiceError> {
                std::future::pending().await
            }
            async fn kv_list(&self, _: &CallContext, _: &str) -> Result<Vec<String>, ServiceError> {
                std::future::pending().await
            }
        }
        let call = context();
        let recorder = Recorder::new(Arc::new(Hangs), 1 << 20);
        let cut_off = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            recorder.kv_get(&call, "slow"),
        )
        .await;
        assert!(cut_off.is_err());
        let calls = recorder.take().unwrap();
        assert_eq!(calls[0].answer, HostAnswer::Interrupted);
        let replayer = Replayer::new(calls);
        let replayed = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            replayer.kv_get(&call, "slow"),
        )
        .await;
        assert!(replayed.is_err(), "left unanswered, as it was");
        assert_eq!(replayer.divergence(), None);
    }

    #[test]
    fn secrets_are_replaced_wherever_they_appear() {
        let token = "tok-3f9a81c2";
        let mut record = RecordedInvocation {
            invocation_id: plinth_core::id::InvocationId::new(),
            plugin: "p".into(),
            version: "1".into(),
            world: "0.1.0".into(),
            request: format!("{{\"echo\":\"{token}\"}}"),
            granted_models: vec![],
            settings: serde_json::json!({ "note": format!("uses {token}"), "pin": "12" })
                .as_object()
                .cloned()
                .unwrap(),
            secret_names: vec!["api".into(), "pin".into()],
            limits: recorded_limits(&Limits::default()),
            host_calls: vec![
                HostCall {
                    request: HostRequest::KvSet {
                        key: "stash".into(),
                        value: Bytes(format!("before {token} after").into_bytes()),
                    },
                    answer: HostAnswer::Refused(HostRefusal {
                        kind: "unavailable".into(),
                        message: format!("no {token}"),
                    }),
                },
                HostCall {
                    request: HostRequest::Classify {
                        model: "sentiment".into(),
                        texts: vec![token.to_owned()],
                    },
                    answer: HostAnswer::Value(Some(Bytes(token.as_bytes().to_vec()))),
                },
            ],
            outcome: "ok".into(),
            output: format!("\"{token}\""),
        };
        let secrets = BTreeMap::from([
            ("api".to_owned(), token.to_owned()),
            ("pin".to_owned(), "12".to_owned()),
        ]);
        redact(&mut record, &secrets);
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains(token), "{json}");
        assert!(record.output.contains("[secret api]"));
        assert_eq!(
            record.host_calls[0].request,
            HostRequest::KvSet {
                key: "stash".into(),
                value: Bytes(b"before [secret api] after".to_vec()),
            }
        );
        // Too short to search for: left as it is.
        assert_eq!(record.settings["pin"], "12");
    }

    #[test]
    fn secrets_are_found_escaped_inside_json_and_in_one_pass() {
        let quoted = "pa\"ss\\word";
        let mut record = RecordedInvocation {
            invocation_id: plinth_core::id::InvocationId::new(),
            plugin: "p".into(),
            version: "1".into(),
            world: "0.1.0".into(),
            request: serde_json::json!({ "echo": quoted }).to_string(),
            granted_models: vec![],
            settings: serde_json::json!({ "nested": { quoted: [quoted] } })
                .as_object()
                .cloned()
                .unwrap(),
            secret_names: vec!["a".into(), "b".into()],
            limits: recorded_limits(&Limits::default()),
            host_calls: vec![],
            outcome: "ok".into(),
            output: format!("secret and {quoted}"),
        };
        // `b` would match inside `a`'s placeholder if placeholders were searched again.
        let secrets = BTreeMap::from([
            ("a".to_owned(), quoted.to_owned()),
            ("b".to_owned(), "secret".to_owned()),
        ]);
        redact(&mut record, &secrets);
        assert_eq!(record.request, r#"{"echo":"[secret a]"}"#);
        assert_eq!(record.settings["nested"]["[secret a]"][0], "[secret a]");
        assert_eq!(record.output, "[secret b] and [secret a]");
    }

    #[test]
    fn a_records_limits_are_bounded_when_replayed() {
        let limits = replay_limits(&RecordedLimits {
            deadline_ms: u64::MAX,
            memory_bytes: u64::MAX,
            fuel: 1,
            inference_calls: u32::MAX,
        });
        assert_eq!(limits.deadline, std::time::Duration::from_secs(600));
        assert_eq!(limits.memory_bytes, 4 << 30);
    }
}
