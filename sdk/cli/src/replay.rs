//! `plugin replay`: a recorded invocation run again on this machine, in the platform's own sandbox
//! (the plugin host, its limits and WASI), every host call answered from the record.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plinth_plugin_host::{HostSettings, PluginHost, Replay, ending, replay_limits};
use plinth_sdk::RecordedInvocation;
use serde::Serialize;

use crate::{Failure, Outcome, Shell, emit, printable};

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    invocation: String,
    /// The run made the recorded host calls and ended as the record did.
    reproduced: bool,
    /// Where its host calls left the record, if they did.
    divergence: Option<String>,
    recorded: Ending<'a>,
    replayed: Ending<'a>,
    logs: Vec<(&'static str, &'a str)>,
}

#[derive(Debug, Serialize)]
struct Ending<'a> {
    outcome: &'a str,
    output: &'a str,
}

fn secret_stand_ins(pairs: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .ok_or_else(|| Failure::Usage(format!("--secret `{pair}`: expected NAME=VALUE")))
        })
        .collect()
}

pub(crate) async fn run(
    context: &Shell,
    record: &RecordedInvocation,
    component: &Path,
    secrets: &[String],
) -> Outcome {
    let secrets = secret_stand_ins(secrets)?;
    let bytes = std::fs::read(component)
        .with_context(|| format!("cannot read the component {}", component.display()))?;
    // The sandbox the invocation ran in: its deadline, memory, compute and model-call limits.
    let settings = HostSettings {
        limits: replay_limits(&record.limits),
        cache_dir: None,
    };
    let host = PluginHost::new(&settings)
        .map_err(|err| anyhow::anyhow!("cannot start the plugin sandbox: {err}"))?;
    let compiled = host
        .compile(bytes)
        .await
        .map_err(|err| anyhow::anyhow!("{} cannot run: {err}", component.display()))?;
    if !context.global.json {
        eprintln!(
            "replaying {} of {} {} ({} host calls recorded) with {}",
            record.invocation_id,
            record.plugin,
            record.version,
            record.host_calls.len(),
            component.display()
        );
        for name in record
            .secret_names
            .iter()
            .filter(|name| !secrets.contains_key(*name))
        {
            eprintln!(
                "note: the secret `{name}` is not in the record; the plugin gets a stand-in (--secret {name}=VALUE)"
            );
        }
    }
    let replay = host.replay(compiled, record, &secrets).await;
    let reproduced = replay.reproduces(record);
    let (outcome, output) = ending(&replay.result);
    let report = Report {
        invocation: record.invocation_id.to_string(),
        reproduced,
        divergence: replay.divergence.as_ref().map(ToString::to_string),
        recorded: Ending {
            outcome: &record.outcome,
            output: &record.output,
        },
        replayed: Ending {
            outcome: &outcome,
            output: &output,
        },
        logs: replay
            .logs
            .iter()
            .map(|line| (line.level, line.message.as_str()))
            .collect(),
    };
    if context.global.json {
        emit(&serde_json::to_string_pretty(&report).context("cannot write the report")?)?;
    } else {
        print_report(&report, &replay)?;
    }
    match (&replay.divergence, reproduced) {
        (Some(_), _) => Err(Failure::Diverged),
        (None, false) => Err(Failure::EndedDifferently),
        (None, true) => Ok(()),
    }
}

fn print_report(report: &Report<'_>, replay: &Replay) -> Outcome {
    for (level, message) in &report.logs {
        emit(&format!("log {:<5} {}", level, printable(message)))?;
    }
    emit(&format!(
        "recorded: {}: {}",
        printable(report.recorded.outcome),
        printable(report.recorded.output)
    ))?;
    emit(&format!(
        "replayed: {}: {}",
        report.replayed.outcome,
        printable(report.replayed.output)
    ))?;
    match &replay.divergence {
        Some(divergence) => emit(&format!("DIVERGED at {}", printable(&divergence.to_string()))),
        None if report.reproduced => emit("reproduced: the same host calls and the same ending"),
        None => emit("ended differently: the same host calls, another ending"),
    }
}
