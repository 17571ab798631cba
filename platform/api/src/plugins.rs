//! A plugin version's submission as HTTP carries it: multipart parts `manifest` (plugin.json) and
//! `component` (.wasm). The checks, storage and everything after are the marketplace's
//! ([`plinth_marketplace`]).

use actix_multipart::Multipart;
use futures_util::TryStreamExt;
use plinth_core::ErrorCode;
use plinth_core::plugins::PluginVersion;
use plinth_store::audit::Who;
use plinth_store::auth::Principal;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const MAX_MANIFEST_BYTES: usize = 64 << 10;

fn invalid_plugin(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPlugin, message)
}

/// How long a submission's body may take to arrive.
const PUBLISH_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads a multipart part into memory, refusing it past `limit` bytes.
async fn read_part(field: &mut actix_multipart::Field, limit: usize, what: &str) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .try_next()
        .await
        .map_err(|err| ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}")))?
    {
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
/// (see [`plinth_marketplace::Marketplace::publish`]).
pub(crate) async fn publish(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    plugin: &str,
    mut form: Multipart,
) -> ApiResult<PluginVersion> {
    // One submission of an author's at a time, and each is compiled and run: both checked before its
    // bytes are even read (the turn first, so a refused submission costs none of the author's).
    let _turn = state.marketplace.publish_turn(auth)?;
    crate::limits::check(
        state,
        &format!("publish:{}", auth.tenant_id),
        state.settings.limits.publishes_per_author,
    )
    .await?;
    let limit = state.marketplace.host().limits().component_bytes;
    let (mut manifest, mut component) = (None, None);
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
            *part = Some(read_part(&mut field, most, &format!("the {name}")).await?);
        }
        Ok(())
    };
    // The author's turn is held while the body arrives: a sender that never finishes holds it no
    // longer than this.
    tokio::time::timeout(PUBLISH_BODY_TIME, read)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidBody,
                format!(
                    "the submission did not arrive within {} s",
                    PUBLISH_BODY_TIME.as_secs()
                ),
            )
        })??;
    let manifest = manifest.ok_or_else(|| invalid_plugin("the `manifest` part is missing"))?;
    let component = component.ok_or_else(|| invalid_plugin("the `component` part is missing"))?;
    Ok(state
        .marketplace
        .publish(auth, who, plugin, &manifest, component)
        .await?)
}
