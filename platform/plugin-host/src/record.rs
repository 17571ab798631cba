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
//! What is not replayed: the wall clock and randomness (WASI's), which the plugin reads from the
//! machine it runs on, and secrets, which are never recorded (the author supplies stand-ins).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use plinth_core::id::TenantId;
use plinth_core::inference::Classification;
use plinth_core::plugins::{HostAnswer, HostCall, HostRefusal, HostRequest, RecordedInvocation};

use crate::runtime::{Compiled, Outcome, PluginHost};
use crate::{CallContext, InvokeError, LogLine, ServiceError, Services, Trace};

/// What a replay gives a secret the author did not supply.
pub const SECRET_STAND_IN: &str = "(secret not recorded)";

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

/// Records every service call of one invocation on its way to `inner`.
#[derive(Debug)]
pub struct Recorder {
    inner: Arc<dyn Services>,
    calls: Mutex<Vec<HostCall>>,
}

impl Recorder {
    #[must_use]
    pub fn new(inner: Arc<dyn Services>) -> Self {
        Self {
            inner,
            calls: Mutex::default(),
        }
    }

    /// The calls recorded so far, in the order they were made.
    pub fn take(&self) -> Vec<HostCall> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<T>(
        &self,
        request: HostRequest,
        result: Result<T, ServiceError>,
        answer: impl FnOnce(&T) -> HostAnswer,
    ) -> Result<T, ServiceError> {
        let answer = match &result {
            Ok(value) => answer(value),
            Err(err) => HostAnswer::Refused(refusal(err)),
        };
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(HostCall { request, answer });
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
        let request = HostRequest::Classify {
            model: model.to_owned(),
            texts: texts.clone(),
        };
        let result = self.inner.classify(call, sequence, model, texts).await;
        self.write(request, result, |value| {
            HostAnswer::Classifications(value.clone())
        })
    }

    async fn embed(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        let request = HostRequest::Embed {
            model: model.to_owned(),
            texts: texts.clone(),
        };
        let result = self.inner.embed(call, sequence, model, texts).await;
        self.write(request, result, |value| HostAnswer::Embeddings(value.clone()))
    }

    async fn infer(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError> {
        let recorded = HostRequest::Infer {
            model: model.to_owned(),
            request: request.clone(),
        };
        let result = self.inner.infer(call, sequence, model, request).await;
        self.write(recorded, result, |value| HostAnswer::Response(value.clone()))
    }

    async fn kv_get(&self, call: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        let result = self.inner.kv_get(call, key).await;
        let request = HostRequest::KvGet { key: key.to_owned() };
        self.write(request, result, |value| HostAnswer::Value(value.clone()))
    }

    async fn kv_set(
        &self,
        call: &CallContext,
        key: &str,
        value: Vec<u8>,
        max_keys: u64,
    ) -> Result<(), ServiceError> {
        let request = HostRequest::KvSet {
            key: key.to_owned(),
            value: value.clone(),
        };
        let result = self.inner.kv_set(call, key, value, max_keys).await;
        self.write(request, result, |()| HostAnswer::Stored)
    }

    async fn kv_delete(&self, call: &CallContext, key: &str) -> Result<bool, ServiceError> {
        let result = self.inner.kv_delete(call, key).await;
        let request = HostRequest::KvDelete { key: key.to_owned() };
        self.write(request, result, |existed| HostAnswer::Existed(*existed))
    }

    async fn kv_list(&self, call: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        let result = self.inner.kv_list(call, prefix).await;
        let request = HostRequest::KvList {
            prefix: prefix.to_owned(),
        };
        self.write(request, result, |keys| HostAnswer::Keys(keys.clone()))
    }

    fn finished(&self, call: &CallContext, trace: Trace) {
        self.inner.finished(call, trace);
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

    /// The recorded answer to `made`, if it is the call the record has next.
    fn answer(&self, made: HostRequest) -> Result<HostAnswer, ServiceError> {
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
        match self.answer(HostRequest::Classify {
            model: model.to_owned(),
            texts,
        })? {
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
        match self.answer(HostRequest::Embed {
            model: model.to_owned(),
            texts,
        })? {
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
        match self.answer(HostRequest::Infer {
            model: model.to_owned(),
            request,
        })? {
            HostAnswer::Response(response) => Ok(response),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_get(&self, _: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        match self.answer(HostRequest::KvGet { key: key.to_owned() })? {
            HostAnswer::Value(value) => Ok(value),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_set(&self, _: &CallContext, key: &str, value: Vec<u8>, _: u64) -> Result<(), ServiceError> {
        match self.answer(HostRequest::KvSet {
            key: key.to_owned(),
            value,
        })? {
            HostAnswer::Stored => Ok(()),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_delete(&self, _: &CallContext, key: &str) -> Result<bool, ServiceError> {
        match self.answer(HostRequest::KvDelete { key: key.to_owned() })? {
            HostAnswer::Existed(existed) => Ok(existed),
            HostAnswer::Refused(refusal) => Err(refused(&refusal)),
            other => Err(unfit(&other)),
        }
    }

    async fn kv_list(&self, _: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        match self.answer(HostRequest::KvList {
            prefix: prefix.to_owned(),
        })? {
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
    /// record. `secrets` stands in for the secrets the record names (any left out get
    /// [`SECRET_STAND_IN`]).
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
            plugin: record.plugin.clone(),
            granted_models: record.granted_models.clone(),
            settings: record.settings.clone(),
            secrets: record
                .secret_names
                .iter()
                .map(|name| {
                    let value = secrets.get(name).map_or(SECRET_STAND_IN, String::as_str);
                    (name.clone(), value.to_owned())
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
        let recorder = Recorder::new(Arc::new(NoServices));
        assert_eq!(recorder.kv_get(&call, "last").await, Ok(None));
        assert!(recorder.kv_set(&call, "last", b"x".to_vec(), 10).await.is_err());
        let calls = recorder.take();
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
}
