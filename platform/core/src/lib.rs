//! Plinth's shared vocabulary: typed ids, money, roles and scopes, error codes and the request and
//! response shapes of the public API. The server and the SDK both depend on it, so the wire format has
//! one definition. No I/O lives here.

#![forbid(unsafe_code)]

pub mod api;
pub mod billing;
pub mod error;
pub mod id;
pub mod inference;
pub mod money;
pub mod plugins;
pub mod scope;
pub mod timing;
pub mod training;

pub use error::ErrorCode;
pub use money::Micros;
pub use scope::{Role, Scope};
