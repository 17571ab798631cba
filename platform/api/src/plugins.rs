//! A plugin version's submission as HTTP carries it: multipart parts `manifest` (plugin.json) and
//! `component` (.wasm). The checks, storage and everything after are the marketplace's
//! ([`plinth_marketplace`]).

use std::time::Duration;

use actix_multipart::Multipart;
use futures_util::TryStreamExt;
use plinth_core::ErrorCode;
use plinth_core::plugins::PluginVersion;
use plinth_store::audit::Who;
use plinth_store::auth::Principal;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const MAX_MANIFEST_BYTES: usize = 64 << 10;

fn invalid_plugin(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPlugin, message)
}

/// How long a submission's body may take to arrive, and how long it may pause between chunks (a
/// slow link sends 32 MiB in minutes, but keeps sending).
const PUBLISH_BODY_TIME: Duration = Duration::from_secs(300);
const PUBLISH_BODY_PAUSE: Duration = Duration::from_secs(15);

/// Reads a multipart part into memory, refusing it past `limit` bytes, or when the replica's room for
/// arriving submissions is taken (`room` grows with what is read, and is held with the bytes).
async fn read_part(
    state: &AppState,
    field: &mut actix_multipart::Field,
    limit: usize,
    what: &str,
    room: &mut Option<OwnedSemaphorePermit>,
) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::new();
    loop {
        let chunk = tokio::time::timeout(PUBLISH_BODY_PAUSE, field.try_next())
            .await
            .map_err(|_| body_too_slow())?
            .map_err(|err| {
                ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
            })?;
        let Some(chunk) = chunk else {
            return Ok(bytes);
        };
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} is larger than {} KiB", limit >> 10),
            ));
        }
        let more = state.marketplace.publish_memory(chunk.len())?;
        match room {
            Some(room) => room.merge(more),
            None => *room = Some(more),
        }
        bytes.extend_from_slice(&chunk);
    }
}

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
    mut form: Multipart,
) -> ApiResult<PluginVersion> {
    let _turn = state.marketplace.publish_turn(auth)?;
    let limit = state.marketplace.host().limits().component_bytes;
    let (mut manifest, mut component, mut room) = (None, None, None);
    let read = async {
        while let Some(mut field) = form.try_next().await.map_err(|err| {
            ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
        })? {
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
            *part = Some(read_part(state, &mut field, most, &format!("the {name}"), &mut room).await?);
        }
        Ok(())
    };
    tokio::time::timeout(PUBLISH_BODY_TIME, read)
        .await
        .map_err(|_| body_too_slow())??;
    let manifest = manifest.ok_or_else(|| invalid_plugin("the `manifest` part is missing"))?;
    let component = component.ok_or_else(|| invalid_plugin("the `component` part is missing"))?;
    let _slot = state.marketplace.publish_slot()?;
    // Each submission checked is compiled and run: so many an author a minute.
    crate::limits::check(
        state,
        &format!("publish:{}", auth.tenant_id),
        state.settings.limits.publishes_per_author,
    )
    .await?;
    let published = state
        .marketplace
        .publish(auth, who, plugin, &manifest, component)
        .await?;
    drop(room);
    Ok(published)
}
