//! `datasets` and `train`: labelled datasets in, training jobs that fine-tune a platform base model on
//! them, how the trained model did on held-out examples, and the model deployed or exported.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use plinth_sdk::{
    Client, Dataset, DatasetId, Evaluation, Hyperparameters, NewTrainingJob, TrainingJob, TrainingJobId,
    TrainingStatus,
};

use crate::{Failure, Outcome, Shell, micros, printable, table, uploading};

/// How often `train start --wait` asks how the job is doing.
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Subcommand)]
pub(crate) enum DatasetsCommand {
    /// Upload a labelled dataset: JSON Lines of `{"text": …, "label": …}` (.jsonl) or CSV with `text`
    /// and `label` columns (.csv), UTF-8. Checked line by line; the examples are stored sealed and only
    /// a summary is ever shown.
    Upload {
        file: PathBuf,
        /// Its name; the file's name without the extension by default.
        #[arg(long)]
        name: Option<String>,
    },
    List,
    /// A dataset's summary: examples per label and text lengths.
    Show {
        id: String,
    },
    /// Delete a dataset and its examples: its queued jobs are cancelled and running ones stopped;
    /// finished jobs and deployed models stay.
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TrainCommand {
    /// Start a training job: a classification head over a platform base model, trained on a dataset
    /// with early stopping, then evaluated on held-out examples. Billed when it ends, per 1,000
    /// examples × epochs.
    Start(Start),
    List,
    /// A job's status, progress, settings and, once it succeeded, its evaluation.
    Show {
        id: String,
    },
    /// What happened to a job, oldest first.
    Events {
        id: String,
    },
    /// Cancel a job: a queued one at once, a running one at its next step.
    Cancel {
        id: String,
    },
    /// Deploy a succeeded job: it becomes the newest version of its model, served like any model.
    Deploy {
        id: String,
    },
    /// Download a succeeded job's model as one ONNX file (base model and trained head).
    Export {
        id: String,
        /// Where to write it; `<model>.onnx` by default.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Delete a job that has ended, with its events (a deployed model stays).
    Delete {
        id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct Start {
    /// The dataset to learn from (ds_…).
    #[arg(long)]
    dataset: String,
    /// The tenant model a deployment becomes a version of (created by the first one).
    #[arg(long)]
    model: String,
    /// The platform embedding model to adapt (the server's default: minilm-embed).
    #[arg(long)]
    base_model: Option<String>,
    /// Most passes over the training split, 1-200 (default 100; early stopping usually ends sooner).
    #[arg(long)]
    epochs: Option<u32>,
    /// Adam's step size, in (0, 1] (default 0.01).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Examples per step, 1-1024 (default 32).
    #[arg(long)]
    batch_size: Option<u32>,
    /// L2 penalty on the weights, 0-10 (default 1 / training examples).
    #[arg(long)]
    l2: Option<f64>,
    /// Epochs without a better validation loss before stopping, 1-50 (default 5).
    #[arg(long)]
    patience: Option<u32>,
    /// Seeds the split and the shuffles (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Follow the job until it ends, then print its evaluation; exits 1 unless it succeeded.
    /// Interrupting stops only the waiting (`train cancel` stops the job).
    #[arg(long)]
    wait: bool,
}

fn dataset_id(raw: &str) -> Result<DatasetId, Failure> {
    raw.parse().map_err(|_| {
        Failure::Usage(format!(
            "`{raw}` is not a dataset id (ds_…); `plinth-cli datasets list` shows them"
        ))
    })
}

fn job_id(raw: &str) -> Result<TrainingJobId, Failure> {
    raw.parse().map_err(|_| {
        Failure::Usage(format!(
            "`{raw}` is not a training job id (ftj_…); `plinth-cli train list` shows them"
        ))
    })
}

pub(crate) async fn datasets(context: &Shell, command: DatasetsCommand) -> Outcome {
    let client = context.client()?;
    match command {
        DatasetsCommand::Upload { file, name } => {
            let (client, bar) = uploading(client, &format!("uploading {}", file.display()));
            let dataset = client.upload_dataset(&file, name.as_deref()).await;
            bar.finish_and_clear();
            context.print_text(&dataset?, dataset_report)
        }
        DatasetsCommand::List => {
            let datasets = client.datasets().await?;
            context.print(&datasets, |datasets| {
                let mut out = table(&["id", "name", "format", "size", "examples", "labels", "created"]);
                for d in datasets {
                    out.add_row(vec![
                        d.id.clone(),
                        printable(&d.name),
                        d.format.clone(),
                        size(d.size_bytes),
                        d.summary.examples.to_string(),
                        d.summary.labels.len().to_string(),
                        d.created_at.format("%Y-%m-%d %H:%M").to_string(),
                    ]);
                }
                out
            })
        }
        DatasetsCommand::Show { id } => {
            let dataset = client.dataset(dataset_id(&id)?.as_str()).await?;
            context.print_text(&dataset, dataset_report)
        }
        DatasetsCommand::Delete { id } => {
            client.delete_dataset(dataset_id(&id)?.as_str()).await?;
            eprintln!("deleted dataset {id} and its examples");
            Ok(())
        }
    }
}

pub(crate) async fn train(context: &Shell, command: TrainCommand) -> Outcome {
    let client = context.client()?;
    match command {
        TrainCommand::Start(start) => self::start(context, &client, start).await,
        TrainCommand::List => {
            let jobs = client.training_jobs().await?;
            context.print(&jobs, |jobs| {
                let mut out = table(&[
                    "id", "model", "dataset", "status", "progress", "accuracy", "created",
                ]);
                for job in jobs {
                    out.add_row(vec![
                        job.id.clone(),
                        job.model.clone(),
                        job.dataset.clone().unwrap_or_else(|| "(deleted)".to_owned()),
                        job.status.as_str().to_owned(),
                        stage(job),
                        job.evaluation
                            .as_ref()
                            .map_or_else(|| "-".to_owned(), |e| format!("{:.3}", e.accuracy)),
                        job.created_at.format("%Y-%m-%d %H:%M").to_string(),
                    ]);
                }
                out
            })
        }
        TrainCommand::Show { id } => {
            let job = client.training_job(job_id(&id)?.as_str()).await?;
            context.print_text(&job, job_report)
        }
        TrainCommand::Events { id } => {
            let events = client.training_events(job_id(&id)?.as_str()).await?;
            context.print(&events, |events| {
                let mut out = table(&["at", "level", "message"]);
                for event in events {
                    out.add_row(vec![
                        event.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        printable(&event.level),
                        printable(&event.message),
                    ]);
                }
                out
            })
        }
        TrainCommand::Cancel { id } => {
            let job = client.cancel_training_job(job_id(&id)?.as_str()).await?;
            context.print(&job, |job| {
                let mut out = table(&["id", "model", "status"]);
                out.add_row(vec![
                    job.id.clone(),
                    job.model.clone(),
                    job.status.as_str().to_owned(),
                ]);
                out
            })
        }
        TrainCommand::Deploy { id } => {
            let model = client.deploy_training_job(job_id(&id)?.as_str()).await?;
            context.print(&model, |m| {
                let mut out = table(&["name", "version", "labels"]);
                out.add_row(vec![m.name.clone(), m.version.to_string(), m.labels.join(" ")]);
                out
            })?;
            eprintln!("try it: plinth-cli classify {} \"some text\"", model.name);
            Ok(())
        }
        TrainCommand::Export { id, output } => {
            let id = job_id(&id)?;
            let output = match output {
                Some(path) => path,
                None => PathBuf::from(format!("{}.onnx", client.training_job(id.as_str()).await?.model)),
            };
            let bytes = client.export_training_job(id.as_str()).await?;
            std::fs::write(&output, &bytes).with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!(
                "saved {id}'s model ({}) to {}: outputs `sentence_embedding` and `probs`; it reads the base model's tokenizer.json",
                size(bytes.len() as u64),
                output.display()
            );
            Ok(())
        }
        TrainCommand::Delete { id } => {
            client.delete_training_job(job_id(&id)?.as_str()).await?;
            eprintln!("deleted training job {id}");
            Ok(())
        }
    }
}

async fn start(context: &Shell, client: &Client, start: Start) -> Outcome {
    let request = NewTrainingJob {
        dataset: dataset_id(&start.dataset)?.to_string(),
        model: start.model,
        base_model: start.base_model,
        hyperparameters: Hyperparameters {
            epochs: start.epochs,
            learning_rate: start.learning_rate,
            batch_size: start.batch_size,
            l2: start.l2,
            patience: start.patience,
            seed: start.seed,
        },
    };
    let job = client.create_training_job(&request).await?;
    if !start.wait {
        context.print(&job, |job| {
            let mut out = table(&["id", "model", "dataset", "status"]);
            out.add_row(vec![
                job.id.clone(),
                job.model.clone(),
                job.dataset.clone().unwrap_or_default(),
                job.status.as_str().to_owned(),
            ]);
            out
        })?;
        eprintln!("follow it with `plinth-cli train show {}`", job.id);
        return Ok(());
    }
    let job = follow(client, &job.id).await?;
    context.print_text(&job, job_report)?;
    match job.status {
        TrainingStatus::Succeeded => Ok(()),
        status => Err(Failure::Local(anyhow!(
            "training job {} {}{}",
            job.id,
            status.as_str(),
            job.error
                .as_deref()
                .map(|e| format!(": {}", printable(e)))
                .unwrap_or_default()
        ))),
    }
}

/// Polls a job until it ends, showing its progress on standard error: a bar at a terminal, else a
/// line whenever it moves on.
async fn follow(client: &Client, id: &str) -> Result<TrainingJob, Failure> {
    let terminal = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix:9} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if terminal {
        bar.enable_steady_tick(Duration::from_millis(120));
    }
    let mut last = String::new();
    let job = client
        .watch_training_job(id, POLL, |job| {
            let p = &job.progress;
            if terminal {
                if embedding(job) {
                    bar.set_prefix("embedding");
                    bar.set_length(p.examples);
                    bar.set_position(p.embedded);
                } else {
                    bar.set_prefix(if job.status == TrainingStatus::Queued {
                        "queued"
                    } else {
                        "epoch"
                    });
                    bar.set_length(u64::from(p.max_epochs));
                    bar.set_position(u64::from(p.epoch));
                }
                bar.set_message(losses(job));
            } else {
                let line = format!("{} {}", job.status.as_str(), progress(job));
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
            }
        })
        .await;
    bar.finish_and_clear();
    Ok(job?)
}

/// Whether the job is still embedding its texts with the base model (before the first epoch).
fn embedding(job: &TrainingJob) -> bool {
    job.status == TrainingStatus::Running
        && job.progress.epoch == 0
        && job.progress.embedded < job.progress.examples
}

/// Where a job is, in a few words (for lists).
fn stage(job: &TrainingJob) -> String {
    let p = &job.progress;
    if embedding(job) {
        format!("embedded {}/{}", p.embedded, p.examples)
    } else if p.epoch > 0 {
        format!("epoch {}/{}", p.epoch, p.max_epochs)
    } else {
        "-".to_owned()
    }
}

/// The latest epoch's losses and validation accuracy.
fn losses(job: &TrainingJob) -> String {
    let p = &job.progress;
    [
        p.train_loss.map(|l| format!("train loss {l:.4}")),
        p.validation_loss.map(|l| format!("val loss {l:.4}")),
        p.validation_accuracy.map(|a| format!("val acc {a:.3}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ")
}

/// Where a job is, in full: embedded texts, epochs, and the latest epoch's numbers.
fn progress(job: &TrainingJob) -> String {
    let p = &job.progress;
    if job.status == TrainingStatus::Queued {
        return "waiting for a training slot".to_owned();
    }
    let mut parts = vec![format!("embedded {}/{}", p.embedded, p.examples)];
    if !embedding(job) {
        parts.push(format!("epoch {}/{}", p.epoch, p.max_epochs));
    }
    let losses = losses(job);
    if !losses.is_empty() {
        parts.push(losses);
    }
    parts.join(", ")
}

fn dataset_report(d: &Dataset) -> String {
    let mut head = table(&["id", "name", "format", "size", "examples", "created"]);
    head.add_row(vec![
        d.id.clone(),
        printable(&d.name),
        d.format.clone(),
        size(d.size_bytes),
        d.summary.examples.to_string(),
        d.created_at.format("%Y-%m-%d %H:%M").to_string(),
    ]);
    let mut labels = table(&["label", "examples", "share"]);
    for label in &d.summary.labels {
        labels.add_row(vec![
            printable(&label.label),
            label.examples.to_string(),
            format!("{:.1}%", share(label.examples, d.summary.examples)),
        ]);
    }
    format!(
        "{head}\n{labels}\ntext length in characters: min {}, mean {}, max {}",
        d.summary.min_chars, d.summary.mean_chars, d.summary.max_chars
    )
}

fn job_report(job: &TrainingJob) -> String {
    let mut out = Table::new();
    out.load_preset(UTF8_BORDERS_ONLY);
    let time = "%Y-%m-%d %H:%M:%S";
    let rows = [
        ("job", job.id.clone()),
        ("model", job.model.clone()),
        (
            "dataset",
            job.dataset.clone().unwrap_or_else(|| "(deleted)".to_owned()),
        ),
        ("base model", job.base_model.clone()),
        ("status", job.status.as_str().to_owned()),
        ("progress", progress(job)),
        (
            "labels",
            job.labels
                .iter()
                .map(|l| printable(l))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (
            "split",
            format!(
                "{} train, {} validation, {} test",
                job.split.train, job.split.validation, job.split.test
            ),
        ),
        ("settings", settings(&job.hyperparameters)),
        (
            "billed",
            format!("{} units, {}", job.billed_units, micros(job.billed_micros)),
        ),
        ("created", job.created_at.format(time).to_string()),
        (
            "started",
            job.started_at
                .map_or_else(|| "-".to_owned(), |t| t.format(time).to_string()),
        ),
        (
            "finished",
            job.finished_at
                .map_or_else(|| "-".to_owned(), |t| t.format(time).to_string()),
        ),
        (
            "deployed",
            job.deployed_version
                .map_or_else(|| "-".to_owned(), |v| format!("{} v{v}", job.model)),
        ),
    ];
    for (field, value) in rows {
        out.add_row(vec![field.to_owned(), value]);
    }
    if let Some(error) = &job.error {
        out.add_row(vec!["error".to_owned(), printable(error)]);
    }
    match &job.evaluation {
        Some(evaluation) => format!("{out}\n{}", evaluation_report(evaluation)),
        None => out.to_string(),
    }
}

/// The settings in effect (the server fills in every default).
fn settings(h: &Hyperparameters) -> String {
    [
        h.epochs.map(|v| format!("epochs {v}")),
        h.learning_rate.map(|v| format!("learning rate {v}")),
        h.batch_size.map(|v| format!("batch size {v}")),
        h.l2.map(|v| format!("l2 {v}")),
        h.patience.map(|v| format!("patience {v}")),
        h.seed.map(|v| format!("seed {v}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ")
}

/// Accuracy and macro-F1, each label's precision, recall and F1, and the confusion matrix.
fn evaluation_report(e: &Evaluation) -> String {
    let mut labels = table(&["label", "precision", "recall", "F1", "support"]);
    for l in &e.labels {
        labels.add_row(vec![
            printable(&l.label),
            format!("{:.3}", l.precision),
            format!("{:.3}", l.recall),
            format!("{:.3}", l.f1),
            l.support.to_string(),
        ]);
    }
    let names: Vec<String> = e.labels.iter().map(|l| printable(&l.label)).collect();
    let mut header = vec!["true \\ predicted".to_owned()];
    header.extend(names.iter().cloned());
    let mut confusion = Table::new();
    confusion.load_preset(UTF8_BORDERS_ONLY).set_header(header);
    for (name, row) in names.iter().zip(&e.confusion) {
        let mut cells = vec![name.clone()];
        cells.extend(row.iter().map(ToString::to_string));
        confusion.add_row(cells);
    }
    format!(
        "evaluation on {} held-out examples: accuracy {:.3}, macro-F1 {:.3}\n{labels}\nconfusion matrix (rows: true label; columns: predicted)\n{confusion}",
        e.examples, e.accuracy, e.macro_f1
    )
}

/// `part` of `whole` in percent.
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Bytes for people: `512 B`, `12.3 KiB`, `87.1 MiB`.
fn size(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(12_595), "12.3 KiB");
        assert_eq!(size(91_330_000), "87.1 MiB");
    }

    #[test]
    fn an_empty_dataset_has_no_shares() {
        assert!(share(0, 0).abs() < f64::EPSILON);
        assert!((share(1, 4) - 25.0).abs() < 1e-9);
    }
}
