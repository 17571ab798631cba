//! Write Plinth plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`], registered with [`register!`]; it receives the caller's
//! JSON request and returns a JSON response. Through this crate it may call the hosted models the
//! installing tenant granted it ([`inference`]), keep state per installation ([`kv`]), read its
//! installation settings ([`config`]) and log ([`log`]). Nothing else: no files, no network.
//!
//! ```ignore
//! use plinth_plugin::{Error, Plugin, Value, json};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn handle(request: Value) -> Result<Value, Error> {
//!         let name = request["name"].as_str().ok_or(Error::invalid("`name` is required"))?;
//!         Ok(json!({ "greeting": format!("Hello, {name}!") }))
//!     }
//! }
//!
//! plinth_plugin::register!(Hello);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` is the component to publish.

// The generated bindings name this crate by its path, from inside it too.
extern crate self as plinth_plugin;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/0.1.0",
        world: "plinth:plugin/plugin@0.1.0",
        pub_export_macro: true,
        default_bindings_module: "plinth_plugin::bindings",
        runtime_path: "plinth_plugin::wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen;

pub use serde_json::{self, Value, json};

use bindings::exports::plinth::plugin::handler;
use bindings::plinth::plugin as host;

/// Why a request failed, as the caller will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The caller's request is unacceptable (a 400 with this message).
    InvalidRequest(String),
    /// The plugin could not do its job (a plugin failure with this message).
    Failed(String),
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest(message.into())
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidRequest(message) => write!(f, "invalid request: {message}"),
            Self::Failed(message) => write!(f, "failed: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<host::inference::InferenceError> for Error {
    fn from(err: host::inference::InferenceError) -> Self {
        use host::inference::InferenceError as E;
        match err {
            E::InvalidInput(message) => Self::InvalidRequest(message),
            E::NotGranted(message) | E::LimitExceeded(message) | E::Unavailable(message) => {
                Self::Failed(message)
            }
        }
    }
}

impl From<host::kv::KvError> for Error {
    fn from(err: host::kv::KvError) -> Self {
        use host::kv::KvError as E;
        match err {
            E::QuotaExceeded(message) | E::InvalidKey(message) | E::Unavailable(message) => {
                Self::Failed(message)
            }
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::Failed(format!("JSON: {err}"))
    }
}

/// A plugin: one handler from a JSON request to a JSON response.
pub trait Plugin {
    /// Handles one invocation.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for requests the caller must fix, [`Error::Failed`] otherwise.
    fn handle(request: Value) -> Result<Value, Error>;
}

#[doc(hidden)]
pub fn dispatch<P: Plugin>(request: &str) -> Result<String, handler::Error> {
    let request: Value = serde_json::from_str(request)
        .map_err(|err| handler::Error::InvalidRequest(format!("the request is not JSON: {err}")))?;
    match P::handle(request) {
        Ok(response) => Ok(response.to_string()),
        Err(Error::InvalidRequest(message)) => Err(handler::Error::InvalidRequest(message)),
        Err(Error::Failed(message)) => Err(handler::Error::Failed(message)),
    }
}

/// Exports a [`Plugin`] as the component's handler. Use once per plugin crate.
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __PlinthExport;

        impl $crate::bindings::exports::plinth::plugin::handler::Guest for __PlinthExport {
            fn handle(
                request: ::std::string::String,
            ) -> ::std::result::Result<
                ::std::string::String,
                $crate::bindings::exports::plinth::plugin::handler::Error,
            > {
                $crate::dispatch::<$plugin>(&request)
            }
        }

        $crate::bindings::export!(__PlinthExport with_types_in $crate::bindings);
    };
}

/// The hosted models the tenant granted this plugin. Each call is metered to the tenant.
pub mod inference {
    pub use crate::host::inference::{Classification, InferenceError, LabelScore};

    use crate::{Error, Value, host};

    /// Classifies each text; results are in the order of `texts`.
    ///
    /// # Errors
    /// The model was not granted, the input does not fit, the per-invocation call limit was reached,
    /// or the model is unavailable.
    pub fn classify(model: &str, texts: &[&str]) -> Result<Vec<Classification>, Error> {
        let texts: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        Ok(host::inference::classify(model, &texts)?)
    }

    /// Embeds each text; vectors are in the order of `texts`.
    ///
    /// # Errors
    /// As [`classify`].
    pub fn embed(model: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let texts: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        Ok(host::inference::embed(model, &texts)?)
    }

    /// Runs a model on tensors: an Open Inference Protocol v2 request, answered the same way.
    ///
    /// # Errors
    /// As [`classify`].
    pub fn infer(model: &str, request: &Value) -> Result<Value, Error> {
        let response = host::inference::infer(model, &request.to_string())?;
        Ok(serde_json::from_str(&response)?)
    }
}

/// State kept per installation (this tenant's copy of the plugin), within quotas.
pub mod kv {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::{Error, host};

    /// # Errors
    /// The store is unavailable or the key is invalid.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(host::kv::get(key)?)
    }

    /// # Errors
    /// A quota would be exceeded, the key is invalid, or the store is unavailable.
    pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
        Ok(host::kv::set(key, value)?)
    }

    /// Whether the key existed.
    ///
    /// # Errors
    /// The store is unavailable or the key is invalid.
    pub fn delete(key: &str) -> Result<bool, Error> {
        Ok(host::kv::delete(key)?)
    }

    /// Keys starting with `prefix`, sorted.
    ///
    /// # Errors
    /// The store is unavailable.
    pub fn list(prefix: &str) -> Result<Vec<String>, Error> {
        Ok(host::kv::list_keys(prefix)?)
    }

    /// A JSON value stored with [`set_json`].
    ///
    /// # Errors
    /// As [`get`], or the stored bytes are not that type.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
        get(key)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(Error::from))
            .transpose()
    }

    /// # Errors
    /// As [`set`].
    pub fn set_json<T: Serialize>(key: &str, value: &T) -> Result<(), Error> {
        set(key, &serde_json::to_vec(value)?)
    }
}

/// The installation's settings and secrets, as the tenant configured them.
pub mod config {
    use serde::de::DeserializeOwned;

    use crate::{Error, host};

    /// A setting's JSON value, if set.
    ///
    /// # Errors
    /// The setting is not that type.
    pub fn get<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
        host::config::get(key)
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|err| Error::failed(format!("setting `{key}`: {err}")))
            })
            .transpose()
    }

    /// A secret (an API token, say), if set. Secrets are stored encrypted and never shown back.
    #[must_use]
    pub fn secret(key: &str) -> Option<String> {
        host::config::secret(key)
    }
}

/// Log lines kept with the invocation.
pub mod log {
    use crate::host::log::{Level, log};

    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }

    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}
