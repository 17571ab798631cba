//! The error vocabulary of the public API. Every failure a client can see has a stable snake_case code
//! and an HTTP status; the body is always `{"error": {"code", "message", "request_id"}}`.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $status:literal,)*) => {
        /// A stable, documented error code. Clients match on this, never on messages.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this version of the client does not know yet.
            #[serde(other)]
            Unknown,
        }

        impl ErrorCode {
            /// The HTTP status that carries this code.
            #[must_use]
            pub const fn status(self) -> u16 {
                match self {
                    $(Self::$variant => $status,)*
                    Self::Unknown => 500,
                }
            }
        }
    };
}

error_codes! {
    /// The body is not valid JSON.
    InvalidJson = 400,
    /// A query-string parameter is missing or malformed.
    InvalidQuery = 400,
    /// A header is malformed (for example an over-long `Idempotency-Key`).
    InvalidHeader = 400,
    /// No credentials were sent.
    Unauthenticated = 401,
    /// The API key or session token is unknown, malformed or expired.
    InvalidCredentials = 401,
    /// The API key was revoked.
    ApiKeyRevoked = 401,
    /// The email and password do not match.
    InvalidLogin = 401,
    /// The credentials are valid but lack the scope or role this call needs.
    InsufficientScope = 403,
    /// The resource does not exist, or belongs to another tenant.
    NotFound = 404,
    /// No route matches the path.
    RouteNotFound = 404,
    /// The route exists but not for this method.
    MethodNotAllowed = 405,
    /// An account with this email already exists.
    EmailTaken = 409,
    /// The change would leave the tenant without an owner.
    LastOwner = 409,
    /// The user is already a member of this tenant.
    AlreadyMember = 409,
    /// A request with this `Idempotency-Key` is still being processed; retry after `Retry-After` to get
    /// its stored answer.
    IdempotencyInFlight = 409,
    /// The `Idempotency-Key` was already used for a different request (another method, path or body)
    /// within the retention window; use a fresh key for a new request.
    IdempotencyKeyReused = 422,
    /// The request under this `Idempotency-Key` ran and was answered, but its answer was too large to
    /// keep for replay; run it again with a new key (and be billed again).
    IdempotencyAnswerNotKept = 422,
    /// Stripe manages this state: change it in Stripe, which tells the platform through its webhooks.
    ManagedByPaymentProvider = 409,
    /// The model or input is not of the kind this call needs (e.g. classify with an embedding model).
    UnsupportedTask = 422,
    /// An uploaded model or manifest is unusable; the message says why.
    InvalidModel = 422,
    /// The upload would take the tenant past its plan's models, versions per model or bytes of model
    /// files; delete models or old versions, or move to a larger plan.
    ModelQuotaExceeded = 409,
    /// A dataset is unusable (encoding, format, empty texts, labels); the message names the line.
    InvalidDataset = 422,
    /// The upload would take the tenant past its plan's datasets or bytes of datasets; delete
    /// datasets, or move to a larger plan.
    DatasetQuotaExceeded = 409,
    /// The tenant already has as many training jobs queued or running as its plan allows; wait for
    /// one to finish or cancel one.
    TrainingJobsExceeded = 429,
    /// The training job is not in a state that allows this (deploying an unfinished job, cancelling a
    /// finished one).
    TrainingJobState = 409,
    /// Inference inputs do not fit the model (names, datatypes, shapes, counts).
    InvalidInput = 400,
    /// The model's queue is full; retry after `Retry-After`.
    Overloaded = 503,
    /// The call did not finish within the server's inference timeout.
    InferenceTimeout = 504,
    /// A plugin component or manifest is unusable, or failed the publishing checks; the message says why.
    InvalidPlugin = 422,
    /// The plugin version is not approved for installation (pending review or rejected).
    PluginNotApproved = 409,
    /// The author already has as many plugin versions awaiting review as it may (each keeps its
    /// component stored); publish more once some are reviewed.
    PluginVersionsPending = 409,
    /// The plugin refused the request as malformed; the message is the plugin's.
    PluginRejectedRequest = 400,
    /// The plugin failed: it trapped (a panic, a stack overflow) or reported an error.
    PluginFailed = 502,
    /// The plugin broke a limit of its sandbox (memory, output size, logs, host calls).
    PluginLimitExceeded = 422,
    /// The plugin ran past its deadline and was stopped.
    PluginTimeout = 504,
    /// The platform revoked the plugin version this installation runs (a kill switch for a harmful
    /// plugin); move the installation to another approved version, or uninstall it.
    PluginRevoked = 410,
    /// The body did not arrive in time (it paused too long, or took too long in all).
    RequestTimeout = 408,
    /// The body is larger than the route accepts.
    PayloadTooLarge = 413,
    /// The body is not `application/json` where JSON is required.
    UnsupportedMediaType = 415,
    /// The body is JSON but not of the expected shape.
    InvalidBody = 422,
    /// A field failed validation; the message names it.
    ValidationFailed = 422,
    /// The operation needs a payment provider and the platform runs in local billing mode.
    PaymentsNotConfigured = 409,
    /// The plan has no Stripe prices configured, so it cannot be bought through Stripe.
    PlanNotPurchasable = 409,
    /// A webhook's signature is missing, malformed, outside the tolerance window or wrong.
    InvalidSignature = 400,
    /// The payment provider refused or failed the request; the message says what it said.
    PaymentProviderError = 502,
    /// The plan's included calls for this period are used up and the plan stops there (the free plan,
    /// or any plan while a payment is past due): upgrade, pay, or wait for the next period.
    QuotaExceeded = 402,
    /// The call costs money (a priced plugin) and the tenant has no paid, active subscription to
    /// charge it to: subscribe to a paid plan first.
    PaymentRequired = 402,
    /// Too many requests; wait for `Retry-After` seconds.
    RateLimited = 429,
    /// The tenant (or this installation) already runs as many plugin instances at once as its plan
    /// allows, or the tenants without a paid plan together run their share of the server's; retry after
    /// `Retry-After`.
    PluginConcurrencyExceeded = 429,
    /// The tenant already has as much on its way as its share allows: as many calls waiting on this
    /// model as its share allows, or another of its models being loaded, or another upload (one at
    /// a time per tenant); retry after `Retry-After`. Other tenants are not held up by them.
    TenantQueueFull = 429,
    /// Something failed on our side; the request id helps support find it.
    Internal = 500,
    /// A dependency is unavailable or the server is overloaded; retry later.
    Unavailable = 503,
}

impl ErrorCode {
    /// Whether a client may retry the same request (with the same idempotency key) and expect it to work.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::PluginConcurrencyExceeded
                | Self::TenantQueueFull
                | Self::Internal
                | Self::Unavailable
                | Self::Overloaded
                | Self::InferenceTimeout
                | Self::PaymentProviderError
        )
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The error body on the Open Inference Protocol's `/v2/models` routes: the protocol's `error` string,
/// with Plinth's code and request id beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProtocolErrorBody {
    pub error: String,
    pub code: ErrorCode,
    pub request_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// A human-readable explanation; may change between versions.
    pub message: String,
    /// The id of the request, also in the `X-Request-Id` response header.
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_unknown_codes_survive() {
        assert_eq!(
            serde_json::to_value(ErrorCode::ApiKeyRevoked).unwrap(),
            "api_key_revoked"
        );
        let code: ErrorCode = serde_json::from_value("some_future_code".into()).unwrap();
        assert_eq!(code, ErrorCode::Unknown);
        assert_eq!(ErrorCode::RateLimited.status(), 429);
    }
}
