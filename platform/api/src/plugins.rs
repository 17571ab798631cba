//! A plugin version's submission as HTTP carries it: multipart parts `manifest` (plugin.json) and
//! `component` (.wasm). The checks, storage and everything after are the marketplace's
//! ([`plinth_marketplace`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix_multipart::Multipart;
use actix_web::error::PayloadError;
use actix_web::web::{self, Bytes};
use futures_util::{Stream, StreamExt, TryStreamExt};
use plinth_core::ErrorCode;
use plinth_core::plugins::PluginVersion;
use plinth_marketplace::BodyRoom;
use plinth_store::audit::Who;
use plinth_store::auth::Principal;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const MAX_MANIFEST_BYTES: usize = 64 << 10;

/// What a multipart body may add to its parts (boundaries and part headers).
const MULTIPART_OVERHEAD: usize = 64 << 10;

fn invalid_plugin(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPlugin, message)
}

/// How long a submission's body may take to arrive, and how long it may pause (a slow link sends
/// 32 MiB in minutes, but keeps sending).
const PUBLISH_BODY_TIME: Duration = Duration::from_secs(300);
const PUBLISH_BODY_PAUSE: Duration = Duration::from_secs(15);

fn body_too_slow() -> ApiError {
    ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "the submission must arrive within {} s, pausing at most {} s",
            PUBLISH_BODY_TIME.as_secs(),
            PUBLISH_BODY_PAUSE.as_secs()
        ),
    )
}

/// Why a body was cut off as it arrived: the multipart parser only sees that its stream failed.
type Refusal = Arc<Mutex<Option<ApiError>>>;

/// A submission's raw body, held to its bounds as it arrives, before the multipart parser buffers
/// any of it (it keeps what it has not matched yet, without a bound of its own): at most `limit`
/// bytes, pausing at most [`PUBLISH_BODY_PAUSE`], and each byte charged twice (parsed, then copied
/// into its part) against the replica's room for arriving submissions, held in `room`.
fn held_to_bounds(
    payload: web::Payload,
    limit: usize,
    room: Arc<Mutex<BodyRoom>>,
    refusal: Refusal,
) -> impl Stream<Item = Result<Bytes, PayloadError>> + 'static {
    futures_util::stream::unfold(Some((payload, 0_usize)), move |state| {
        let (room, refusal) = (room.clone(), refusal.clone());
        async move {
            let (mut payload, received) = state?;
            let chunk = match tokio::time::timeout(PUBLISH_BODY_PAUSE, payload.next()).await {
                Err(_) => Err(body_too_slow()),
                Ok(None) => return None,
                Ok(Some(Err(err))) => return Some((Err(err), None)),
                Ok(Some(Ok(chunk))) => Ok(chunk),
            };
            let total = received + chunk.as_ref().map_or(0, Bytes::len);
            let held = chunk.and_then(|chunk| {
                if total > limit {
                    return Err(ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the submission is larger than {} KiB", limit >> 10),
                    ));
                }
                let mut room = room.lock().unwrap_or_else(PoisonError::into_inner);
                room.grow_to(2 * total)?;
                Ok(chunk)
            });
            match held {
                Ok(chunk) => Some((Ok(chunk), Some((payload, total)))),
                Err(refused) => {
                    *refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(refused);
                    let cut = std::io::Error::other("the submission was refused as it arrived");
                    Some((Err(PayloadError::Io(cut)), None))
                }
            }
        }
    })
    // The parser may ask again once the body has ended.
    .fuse()
}

/// Reads a multipart part into memory, refusing it past `limit` bytes.
async fn read_part(
    field: &mut actix_multipart::Field,
    limit: usize,
    what: &str,
    malformed: &impl Fn(actix_multipart::MultipartError) -> ApiError,
) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.try_next().await.map_err(malformed)? {
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} is larger than {} KiB", limit >> 10),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// `POST /v1/plugins/{name}/versions`: reads the parts `manifest` and `component`, and publishes them
/// (see [`plinth_marketplace::Marketplace::publish`]). In this order (see the marketplace's
/// `publishing`): the author's one turn, refused before the body is read; the body, within the
/// replica's room for arriving submissions and in time; one of the replica's slots to check it in;
/// the author's submissions a minute, spent only by a submission about to be checked.
pub(crate) async fn publish(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    plugin: &str,
    req: &actix_web::HttpRequest,
    payload: web::Payload,
) -> ApiResult<PluginVersion> {
    let _turn = state.marketplace.publish_turn(auth)?;
    let limit = state.marketplace.host().limits().component_bytes;
    let (room, refusal) = (
        Arc::new(Mutex::new(state.marketplace.publish_room())),
        Refusal::default(),
    );
    let body = held_to_bounds(
        payload,
        limit + MAX_MANIFEST_BYTES + MULTIPART_OVERHEAD,
        Arc::clone(&room),
        Arc::clone(&refusal),
    );
    let mut form = Multipart::new(req.headers(), body);
    let malformed = |err: actix_multipart::MultipartError| {
        refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| {
                ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
            })
    };
    let (mut manifest, mut component) = (None, None);
    let read = async {
        while let Some(mut field) = form.try_next().await.map_err(malformed)? {
            let name = field.name().unwrap_or_default().to_owned();
            let part = match name.as_str() {
                "manifest" => &mut manifest,
                "component" => &mut component,
                other => {
                    return Err(invalid_plugin(format!(
                        "unexpected part `{other}`: send `manifest` and `component`"
                    )));
                }
            };
            if part.is_some() {
                return Err(invalid_plugin(format!("the `{name}` part is sent twice")));
            }
            let most = if name == "manifest" {
                MAX_MANIFEST_BYTES
            } else {
                limit
            };
            *part = Some(read_part(&mut field, most, &format!("the {name}"), &malformed).await?);
        }
        Ok(())
    };
    tokio::time::timeout(PUBLISH_BODY_TIME, read)
        .await
        .map_err(|_| body_too_slow())??;
    let manifest = manifest.ok_or_else(|| invalid_plugin("the `manifest` part is missing"))?;
    let component = component.ok_or_else(|| invalid_plugin("the `component` part is missing"))?;
    let slot = state.marketplace.publish_slot()?;
    // Each submission checked is compiled and run: so many an author a minute.
    crate::limits::check(
        state,
        &format!("publish:{}", auth.tenant_id),
        state.settings.limits.publishes_per_author,
    )
    .await?;
    let published = state
        .marketplace
        .publish(&slot, auth, who, plugin, &manifest, component)
        .await?;
    drop(room);
    Ok(published)
}
