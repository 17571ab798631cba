//! A plugin version's submission as HTTP carries it: multipart parts `manifest` (plugin.json) and
//! `component` (.wasm). The checks, storage and everything after are the marketplace's
//! ([`plinth_marketplace`]).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use actix_web::web;
use plinth_core::ErrorCode;
use plinth_core::plugins::PluginVersion;
use plinth_store::audit::Who;
use plinth_store::auth::Principal;

use crate::error::{ApiError, ApiResult};
use crate::multipart::{self, Bounds, Form};
use crate::state::AppState;

const MAX_MANIFEST_BYTES: u64 = 64 << 10;

fn invalid_plugin(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPlugin, message)
}

/// How long a submission's body may take to arrive (a slow link sends 32 MiB in minutes, but keeps
/// sending: see [`multipart::BODY_PAUSE`]).
const PUBLISH_BODY_TIME: Duration = Duration::from_secs(300);

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
    let limit = state.marketplace.host().limits().component_bytes as u64;
    // Each byte is charged twice (parsed, then copied into its part) against the replica's room for
    // arriving submissions; the room is held until the submission has been checked.
    let room = Rc::new(RefCell::new(state.marketplace.publish_room(auth)));
    let charged = Rc::clone(&room);
    let bounds = Bounds {
        total: limit.saturating_add(MAX_MANIFEST_BYTES + multipart::OVERHEAD),
        charge: Some(Box::new(move |fed: u64| {
            let bytes = usize::try_from(fed).map_or(usize::MAX, |fed| fed.saturating_mul(2));
            Ok(charged.borrow_mut().grow_to(bytes)?)
        })),
    };
    let mut form = Form::new(req, payload, bounds);
    let (mut manifest, mut component) = (None, None);
    let read = async {
        while let Some(mut part) = form.next_part().await? {
            let name = part.name().to_owned();
            let (slot, most) = match name.as_str() {
                "manifest" => (&mut manifest, MAX_MANIFEST_BYTES),
                "component" => (&mut component, limit),
                other => {
                    return Err(invalid_plugin(format!(
                        "unexpected part `{other}`: send `manifest` and `component`"
                    )));
                }
            };
            if slot.is_some() {
                return Err(invalid_plugin(format!("the `{name}` part is sent twice")));
            }
            *slot = Some(part.read(most, &format!("the {name}")).await?);
        }
        Ok(())
    };
    tokio::time::timeout(PUBLISH_BODY_TIME, read)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the submission must arrive within {} s",
                    PUBLISH_BODY_TIME.as_secs()
                ),
            )
        })??;
    let manifest = manifest.ok_or_else(|| invalid_plugin("the `manifest` part is missing"))?;
    let component = component.ok_or_else(|| invalid_plugin("the `component` part is missing"))?;
    let slot = state.marketplace.publish_slot(auth)?;
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
    drop((form, room));
    Ok(published)
}
