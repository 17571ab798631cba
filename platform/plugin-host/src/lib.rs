//! Runs plugins: WebAssembly components bound to the `plinth:plugin` WIT world, each invocation in a
//! fresh, sandboxed instance.
//!
//! The host owns everything a plugin can reach. Hosted models and key-value state come through
//! [`Services`], which the API implements (metering, tenancy, quotas); configuration and logs stay
//! in the invocation. Every limit breach ends the invocation with an [`InvokeError`] that names the
//! limit; nothing a plugin does outlives its call or reaches another tenant.

#![forbid(unsafe_code)]

mod host;
mod limits;
mod occupancy;
mod record;
mod runtime;
mod services;
mod turns;

pub use limits::Limits;
pub use record::{
    Divergence, Recorder, Replay, Replayer, SHORTEST_REDACTED_SECRET, TooLarge, ending, recorded_limits,
    redact, replay_limits,
};
pub use runtime::{Compiled, HostSettings, Invocation, Outcome, PluginHost, WIT_VERSIONS};
pub use services::{CallContext, Capability, LogLine, NoServices, ServiceError, Services, Trace};

/// Why a component cannot be published or run.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Not a valid component, or too large.
    #[error("{0}")]
    Invalid(String),
    /// It imports something the world or its manifest does not allow.
    #[error("{0}")]
    Incompatible(String),
    /// The engine could not be set up.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// Compilation did not finish in time, or the compiler is busy; retry later.
    #[error("{0}")]
    Busy(String),
}

/// Why an invocation ended without a response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvokeError {
    /// The plugin judged the request invalid; its message.
    #[error("{0}")]
    Rejected(String),
    /// The plugin reported a failure.
    #[error("{0}")]
    Failed(String),
    /// The plugin trapped: a panic, a stack overflow, an unreachable instruction.
    #[error("{0}")]
    Trapped(String),
    /// The plugin broke a sandbox limit (memory, output, logs, host calls, compute).
    #[error("{0}")]
    LimitExceeded(String),
    /// The plugin ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The tenant or installation already runs as many instances as its plan allows.
    #[error("{0}")]
    Busy(String),
    /// The host could not run it now (instance pool full, a dependency down).
    #[error("{0}")]
    Unavailable(String),
}

impl InvokeError {
    #[must_use]
    pub fn code(&self) -> plinth_core::ErrorCode {
        use plinth_core::ErrorCode;
        match self {
            Self::Rejected(_) => ErrorCode::PluginRejectedRequest,
            Self::Failed(_) | Self::Trapped(_) => ErrorCode::PluginFailed,
            Self::LimitExceeded(_) => ErrorCode::PluginLimitExceeded,
            Self::Timeout(_) => ErrorCode::PluginTimeout,
            Self::Busy(_) => ErrorCode::PluginConcurrencyExceeded,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// The error code as the API writes it (`plugin_failed`, …).
    #[must_use]
    pub fn code_name(&self) -> String {
        serde_json::to_value(self.code())
            .ok()
            .and_then(|code| code.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}
