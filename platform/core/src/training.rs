//! Shapes of fine-tuning: a tenant's labelled datasets, the training jobs that adapt a platform base
//! model to one, and the evaluation a job ends with.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Micros;

/// A labelled dataset as its owner sees it: never the examples themselves, which stay sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Dataset {
    /// `ds_…`
    pub id: String,
    pub name: String,
    /// `jsonl` or `csv`: the format it was uploaded in.
    pub format: String,
    /// Bytes the dataset takes in storage, sealed (what the plan's dataset quota counts): about twice
    /// its examples' text.
    pub size_bytes: u64,
    pub summary: DatasetSummary,
    pub created_at: DateTime<Utc>,
}

/// What a dataset holds, computed when it was uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DatasetSummary {
    pub examples: u64,
    /// Examples per label, in the order labels first appear in the file.
    pub labels: Vec<LabelCount>,
    /// Text lengths in characters.
    pub min_chars: u64,
    pub mean_chars: u64,
    pub max_chars: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LabelCount {
    pub label: String,
    pub examples: u64,
}

/// Settings of a training run; every field has a default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Most passes over the training split, 1-200 (default 100); early stopping usually ends sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Adam's step size, in (0, 1] (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Examples per step, 1-1024 (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// L2 penalty on the weights, 0-10 (default `1 / training examples`, scikit-learn's `C = 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<f64>,
    /// Epochs without a better validation loss before stopping, 1-50 (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patience: Option<u32>,
    /// Seeds the split and the shuffles (default 0): the same dataset and settings train the same head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// `POST /v1/training-jobs`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTrainingJob {
    /// The dataset to learn from (`ds_…`).
    pub dataset: String,
    /// The tenant model a deployment of this job becomes a version of (created by the first one):
    /// 1-64 lower-case letters, digits, `-`, `_` or `.`.
    pub model: String,
    /// The platform embedding model to adapt (default `minilm-embed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TrainingStatus {
    /// Waiting for a training slot.
    Queued,
    Running,
    /// Trained and evaluated: ready to deploy.
    Succeeded,
    /// Stopped by an error; `error` says which.
    Failed,
    Cancelled,
}

impl TrainingStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job has stopped for good.
    #[must_use]
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::str::FromStr for TrainingStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
        .ok_or_else(|| format!("unknown training status `{s}`"))
    }
}

/// Where a running job is.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TrainingProgress {
    /// Texts embedded by the base model so far, of `examples`.
    pub embedded: u64,
    pub examples: u64,
    /// Epochs finished, of at most `max_epochs`.
    pub epoch: u32,
    pub max_epochs: u32,
    /// The latest epoch's losses (mean cross-entropy) and validation accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
}

/// How the trained model does on the held-out test split, which training never saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evaluation {
    /// Held-out examples scored.
    pub examples: u64,
    pub accuracy: f64,
    /// The unweighted mean of the labels' F1 scores.
    pub macro_f1: f64,
    pub labels: Vec<LabelMetrics>,
    /// `confusion[i][j]`: examples of `labels[i]` predicted as `labels[j]`.
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LabelMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Held-out examples with this label.
    pub support: u64,
}

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TrainingJob {
    /// `ftj_…`
    pub id: String,
    /// `None` once the dataset was deleted.
    pub dataset: Option<String>,
    pub model: String,
    pub base_model: String,
    pub status: TrainingStatus,
    /// The settings in effect, defaults filled in.
    pub hyperparameters: Hyperparameters,
    pub labels: Vec<String>,
    /// Examples in each split: training, validation (early stopping), test (evaluation).
    pub split: SplitSizes,
    pub progress: TrainingProgress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The model version a deployment made, once deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_version: Option<u32>,
    /// Billed units: thousands of examples × epochs, rounded up, and their price.
    pub billed_units: i64,
    pub billed_micros: Micros,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SplitSizes {
    pub train: u64,
    pub validation: u64,
    pub test: u64,
}

/// One thing that happened to a job, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TrainingEvent {
    pub at: DateTime<Utc>,
    /// `info` or `error`.
    pub level: String,
    pub message: String,
}
