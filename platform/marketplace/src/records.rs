//! How an invocation ended, kept for its tenant: a short record of every invocation that ran, and a
//! full one (request, host calls and answers, secrets replaced) for replay when asked for.

use plinth_core::id::InvocationId;
use plinth_core::plugins::{Installation, InvocationLog, RecordedInvocation};
use plinth_plugin_host::{CallContext, InvokeError, Limits, Outcome, Recorder, TooLarge};
use plinth_store::auth::Principal;
use plinth_store::invocations::NewInvocation;

use crate::Marketplace;
use crate::services::TenantServices;

/// Invocation records waiting to be written, at most.
const RECORDS_WAITING: usize = 256;

/// The invocation recorded in full, secrets replaced; or why it could not be.
pub(crate) fn full_record(
    limits: &Limits,
    installed: &Installation,
    call: &CallContext,
    request: String,
    ran: &Result<Outcome, InvokeError>,
    recorder: &Recorder,
) -> Result<RecordedInvocation, TooLarge> {
    let host_calls = recorder.take()?;
    let (outcome, output) = plinth_plugin_host::ending(ran);
    let mut full = RecordedInvocation {
        invocation_id: InvocationId::new(),
        plugin: installed.plugin.clone(),
        version: installed.version.clone(),
        world: plinth_plugin_host::WIT_VERSIONS[0].to_owned(),
        request,
        granted_models: call.granted_models.clone(),
        settings: call.settings.clone(),
        secret_names: call.secrets.keys().cloned().collect(),
        limits: plinth_plugin_host::recorded_limits(limits),
        host_calls,
        outcome,
        output,
    };
    plinth_plugin_host::redact(&mut full, &call.secrets);
    Ok(full)
}

/// Records how an invocation that ran ended, off the request path: a record that cannot be written is
/// logged, and the call is answered either way. Returns the record's id.
pub(crate) fn record_invocation(
    market: &Marketplace,
    auth: &Principal,
    installed: &Installation,
    request_id: &str,
    services: &TenantServices,
    ran: &Result<Outcome, InvokeError>,
    full: Option<impl FnOnce() -> Result<RecordedInvocation, TooLarge>>,
) -> Option<InvocationId> {
    let Some(trace) = services.take_trace() else {
        // Refused before it ran (instances busy, input too large): nothing to record.
        return None;
    };
    // Recording never holds up calls: beyond this many records waiting to be written, the newest are
    // dropped and counted (before any work goes into them).
    static WAITING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(RECORDS_WAITING);
    let Ok(permit) = WAITING.try_acquire() else {
        metrics::counter!("plinth_plugin_invocation_records_dropped_total").increment(1);
        return None;
    };
    let (outcome, mut message) = match ran {
        Ok(_) => ("ok".to_owned(), None),
        Err(err) => (err.code_name(), Some(err.to_string())),
    };
    let full = match full.map(|build| build()) {
        Some(Ok(full)) => Some(full),
        Some(Err(too_large)) => {
            let note = format!(
                "(not recorded in full: its host calls and answers took more than {} KiB)",
                too_large.budget >> 10
            );
            message = Some(message.map_or_else(|| note.clone(), |message| format!("{message} {note}")));
            None
        }
        None => None,
    };
    let id = full
        .as_ref()
        .map_or_else(InvocationId::new, |full| full.invocation_id.clone());
    let record = NewInvocation {
        id: id.clone(),
        occurred_at: chrono::Utc::now(),
        tenant: auth.tenant_id.clone(),
        installation: installed.id.clone(),
        version_id: installed.version_id.to_string(),
        request_id: request_id.to_owned(),
        duration_ms: u64::try_from(trace.duration.as_millis()).unwrap_or(u64::MAX),
        compute_units: trace.compute_units,
        outcome,
        message,
        logs: trace
            .logs
            .into_iter()
            .map(|line| InvocationLog {
                level: line.level.to_owned(),
                message: line.message,
            })
            .collect(),
        record: full,
    };
    let (store, keep) = (market.store.clone(), market.settings.invocation_records);
    tokio::spawn(async move {
        if let Err(err) = store.record_invocation(record, keep).await {
            tracing::warn!(error = %err, "cannot record a plugin invocation");
        }
        drop(permit);
    });
    Some(id)
}
