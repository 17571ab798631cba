//! The world's host interfaces, one binding module per released WIT version (frozen like the WIT).

use std::sync::Arc;
use std::task::Poll;

use crate::runtime::{AbortOnDrop, Invocation};
use crate::{CallContext, LogLine, ServiceError, Services};

pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../../plugins/wit/0.1.0",
        world: "plinth:plugin/plugin@0.1.0",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use v0_1_0::plinth::plugin::{config, inference, kv, log};

impl Invocation {
    /// Runs a call of the platform's services apart from the guest once it must wait: its first
    /// step here (what it checks and writes down first), the rest as a task of its own on the same
    /// threads, cancelled with the invocation. The guest waits for its answer, but the call's steps
    /// (a transaction holding the database's writer lock, say) never wait for the guest's turn.
    fn apart<T, F, S>(
        &self,
        service: S,
    ) -> impl Future<Output = Result<T, ServiceError>> + Send + use<T, F, S>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ServiceError>> + Send + 'static,
        S: FnOnce(Arc<dyn Services>, Arc<CallContext>) -> F,
    {
        let mut call = Box::pin(service(self.services.clone(), self.call.clone()));
        async move {
            if let Poll::Ready(answer) = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx))).await
            {
                return answer;
            }
            let task = tokio::spawn(call);
            let _abort = AbortOnDrop(task.abort_handle());
            match task.await {
                Ok(answer) => answer,
                // As if it had panicked here: the invocation fails, as it would have.
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => Err(ServiceError::Unavailable(
                    "the platform stopped the call; retry shortly".to_owned(),
                )),
            }
        }
    }

    /// Counts a model call against the per-invocation limit and checks the model was granted.
    fn admit_model_call(&mut self, model: &str) -> Result<u32, inference::InferenceError> {
        if !self.call.granted_models.iter().any(|m| m == model) {
            return Err(inference::InferenceError::NotGranted(format!(
                "this installation was not granted the model `{model}`"
            )));
        }
        if self.inference_calls >= self.limits.inference_calls {
            return Err(inference::InferenceError::LimitExceeded(format!(
                "a plugin may make {} model calls per invocation",
                self.limits.inference_calls
            )));
        }
        self.inference_calls += 1;
        Ok(self.inference_calls)
    }

    /// Counts a key-value call against the per-invocation limit.
    fn admit_kv_call(&mut self) -> Result<(), kv::KvError> {
        if self.kv_calls >= self.limits.kv_calls {
            return Err(kv::KvError::QuotaExceeded(format!(
                "a plugin may make {} key-value calls per invocation",
                self.limits.kv_calls
            )));
        }
        self.kv_calls += 1;
        Ok(())
    }

    /// Counts a key-value call and checks its key.
    fn admit_key(&mut self, key: &str) -> Result<(), kv::KvError> {
        self.admit_kv_call()?;
        self.check_key(key)
    }

    fn check_key(&self, key: &str) -> Result<(), kv::KvError> {
        if key.is_empty() || key.len() > self.limits.kv_key_bytes {
            return Err(kv::KvError::InvalidKey(format!(
                "keys are 1 to {} bytes",
                self.limits.kv_key_bytes
            )));
        }
        Ok(())
    }
}

fn inference_error(err: ServiceError) -> inference::InferenceError {
    match err {
        ServiceError::InvalidInput(message) => inference::InferenceError::InvalidInput(message),
        ServiceError::QuotaExceeded(message) => inference::InferenceError::LimitExceeded(message),
        ServiceError::Unavailable(message) => inference::InferenceError::Unavailable(message),
    }
}

fn kv_error(err: ServiceError) -> kv::KvError {
    match err {
        ServiceError::InvalidInput(message) => kv::KvError::InvalidKey(message),
        ServiceError::QuotaExceeded(message) => kv::KvError::QuotaExceeded(message),
        ServiceError::Unavailable(message) => kv::KvError::Unavailable(message),
    }
}

impl inference::Host for Invocation {
    async fn classify(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<inference::Classification>, inference::InferenceError>> {
        let sequence = match self.admit_model_call(&model) {
            Ok(sequence) => sequence,
            Err(err) => return Ok(Err(err)),
        };
        let results = self
            .apart(|services, call| async move { services.classify(&call, sequence, &model, texts).await })
            .await;
        Ok(results
            .map(|results| {
                results
                    .into_iter()
                    .map(|c| inference::Classification {
                        label: c.label,
                        score: c.score,
                        scores: c
                            .scores
                            .into_iter()
                            .map(|s| inference::LabelScore {
                                label: s.label,
                                score: s.score,
                            })
                            .collect(),
                    })
                    .collect()
            })
            .map_err(inference_error))
    }

    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, inference::InferenceError>> {
        let sequence = match self.admit_model_call(&model) {
            Ok(sequence) => sequence,
            Err(err) => return Ok(Err(err)),
        };
        Ok(self
            .apart(|services, call| async move { services.embed(&call, sequence, &model, texts).await })
            .await
            .map_err(inference_error))
    }

    async fn infer(
        &mut self,
        model: String,
        request: String,
    ) -> wasmtime::Result<Result<String, inference::InferenceError>> {
        let sequence = match self.admit_model_call(&model) {
            Ok(sequence) => sequence,
            Err(err) => return Ok(Err(err)),
        };
        // Bounded before it is parsed: a JSON tensor takes many times its bytes once parsed.
        if request.len() > self.limits.input_bytes {
            return Ok(Err(inference::InferenceError::InvalidInput(format!(
                "a model request is at most {} KiB",
                self.limits.input_bytes >> 10
            ))));
        }
        Ok(self
            .apart(|services, call| async move { services.infer(&call, sequence, &model, request).await })
            .await
            .map_err(inference_error))
    }
}

impl kv::Host for Invocation {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::KvError>> {
        if let Err(err) = self.admit_key(&key) {
            return Ok(Err(err));
        }
        Ok(self
            .apart(|services, call| async move { services.kv_get(&call, &key).await })
            .await
            .map_err(kv_error))
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        if let Err(err) = self.admit_key(&key) {
            return Ok(Err(err));
        }
        if value.len() > self.limits.kv_value_bytes {
            return Ok(Err(kv::KvError::QuotaExceeded(format!(
                "values are at most {} KiB",
                self.limits.kv_value_bytes >> 10
            ))));
        }
        let max_keys = self.limits.kv_keys;
        Ok(self
            .apart(|services, call| async move { services.kv_set(&call, &key, value, max_keys).await })
            .await
            .map_err(kv_error))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, kv::KvError>> {
        if let Err(err) = self.admit_key(&key) {
            return Ok(Err(err));
        }
        Ok(self
            .apart(|services, call| async move { services.kv_delete(&call, &key).await })
            .await
            .map_err(kv_error))
    }

    async fn list_keys(&mut self, prefix: String) -> wasmtime::Result<Result<Vec<String>, kv::KvError>> {
        if let Err(err) = self.admit_kv_call() {
            return Ok(Err(err));
        }
        // No key is longer than a key may be: a longer prefix would only make the database work.
        if prefix.len() > self.limits.kv_key_bytes {
            return Ok(Ok(Vec::new()));
        }
        Ok(self
            .apart(|services, call| async move { services.kv_list(&call, &prefix).await })
            .await
            .map_err(kv_error))
    }
}

impl config::Host for Invocation {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.call.settings.get(&key).map(ToString::to_string))
    }

    async fn secret(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.call.secrets.get(&key).cloned())
    }
}

/// What one log line costs beyond its bytes, against the per-invocation log budget.
const LOG_LINE_OVERHEAD: usize = 32;

impl log::Host for Invocation {
    async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        // Each line costs its bytes and a fixed overhead, so a flood of empty lines is bounded too.
        self.log_bytes += message.len() + LOG_LINE_OVERHEAD;
        if self.log_bytes > self.limits.log_bytes {
            let breach = format!("the plugin logged more than {} KiB", self.limits.log_bytes >> 10);
            self.breach = Some(breach.clone());
            return Err(wasmtime::Error::msg(breach));
        }
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        self.logs.push(LogLine { level, message });
        Ok(())
    }
}
