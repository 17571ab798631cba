//! Fine-tuning's records: tenants' datasets (the examples sealed, counted against the plan), training
//! jobs with their progress, checkpoint and evaluation, and each job's events. Runners on any replica
//! claim queued jobs here, prove they are alive with heartbeats, and a job whose runner went quiet is
//! queued again (resuming from its checkpoint) or, after [`MAX_ATTEMPTS`] runs, failed.

use chrono::{DateTime, Utc};
use plinth_core::api::PlanIsolation;
use plinth_core::id::{DatasetId, TenantId, TrainingEventId, TrainingJobId};
use plinth_core::training::{
    Dataset, DatasetSummary, Evaluation, Hyperparameters, SplitSizes, TrainingEvent, TrainingJob,
    TrainingProgress, TrainingStatus,
};
use plinth_core::{ErrorCode, Micros};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::audit::Who;
use crate::entity::{TenantScoped, datasets, tenants, training_events, training_jobs};
use crate::{Result, Store, StoreError};

/// Runs a job may start (the first and restarts after its runner was lost) before it fails.
pub const MAX_ATTEMPTS: i32 = 3;

/// What a runner learns from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    Continue,
    /// Cancelled: stop, and bill what ran.
    Cancelled,
    /// No longer this runner's (deleted, or taken over after a pause): stop, bill nothing.
    Lost,
}

/// `deployed_version` while a deployment is under way.
const DEPLOYING: i32 = 0;

/// A deployment under way, as [`Store::claim_training_deployment`] claimed it: only its holder
/// marks the job deployed or releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployClaim {
    claimed_us: i64,
}

impl DeployClaim {
    /// The job is still being deployed under this claim.
    fn held(self) -> Condition {
        Condition::all()
            .add(training_jobs::Column::DeployedVersion.eq(DEPLOYING))
            .add(training_jobs::Column::DeployClaimedUs.eq(self.claimed_us))
    }
}

/// The ledger kind of training charges.
pub const USAGE_KIND: &str = "training";

/// A dataset to store: its examples already checked and sealed.
#[derive(Debug, Clone)]
pub struct NewDataset {
    pub name: String,
    pub format: String,
    pub size_bytes: u64,
    pub summary: DatasetSummary,
    pub sealed_examples: String,
}

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewTrainingJob {
    /// The plan's training price now: what the job is billed at, whatever the plan is when it ends.
    pub price: Micros,
    pub dataset: DatasetId,
    pub model: String,
    pub base_model: String,
    pub hyperparameters: Hyperparameters,
    pub labels: Vec<String>,
    pub split: SplitSizes,
}

/// A job a runner claimed.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub tenant_id: TenantId,
    pub job: TrainingJob,
    /// Its price per 1,000 example-epochs, fixed when it was created.
    pub price: Micros,
    /// The trainer's state after its latest epoch, when an earlier run got that far.
    pub checkpoint: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum JobEnd {
    Succeeded {
        evaluation: Evaluation,
        checkpoint: String,
    },
    Failed(String),
    Cancelled,
}

fn refused(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError::Refused(code, message.into())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|err| StoreError::Internal(format!("stored {what} is unreadable: {err}")))
}

/// A dataset's row without its examples.
#[derive(Debug, FromQueryResult)]
struct DatasetInfo {
    id: String,
    name: String,
    format: String,
    size_bytes: i64,
    summary: String,
    created_at: DateTime<Utc>,
}

fn to_dataset(row: DatasetInfo) -> Result<Dataset> {
    Ok(Dataset {
        summary: parse(&row.summary, "dataset summary")?,
        id: row.id,
        name: row.name,
        format: row.format,
        size_bytes: u64::try_from(row.size_bytes).unwrap_or(0),
        created_at: row.created_at,
    })
}

fn to_job(row: &training_jobs::Model) -> Result<TrainingJob> {
    Ok(TrainingJob {
        id: row.id.clone(),
        dataset: row.dataset_id.clone(),
        model: row.model.clone(),
        base_model: row.base_model.clone(),
        status: row.status.parse().map_err(StoreError::Internal)?,
        hyperparameters: parse(&row.hyperparameters, "hyperparameters")?,
        labels: parse(&row.labels, "labels")?,
        split: parse(&row.split, "split")?,
        progress: parse(&row.progress, "progress")?,
        evaluation: row
            .evaluation
            .as_deref()
            .map(|e| parse(e, "evaluation"))
            .transpose()?,
        error: row.error.clone(),
        deployed_version: row
            .deployed_version
            .filter(|&v| v != DEPLOYING)
            .and_then(|v| u32::try_from(v).ok()),
        billed_units: row.billed_units,
        billed_micros: Micros(row.billed_micros),
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
    })
}

async fn add_event(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    job: &str,
    level: &str,
    message: &str,
) -> Result<()> {
    training_events::ActiveModel {
        id: Set(TrainingEventId::new().to_string()),
        tenant_id: Set(tenant.to_string()),
        job_id: Set(job.to_owned()),
        at: Set(Utc::now()),
        level: Set(level.to_owned()),
        message: Set(message.chars().take(2_000).collect()),
    }
    .insert(conn)
    .await?;
    Ok(())
}

/// Serialises a tenant's quota-checked writes (SQLite's write transaction already does).
async fn lock_tenant(conn: &impl ConnectionTrait, tenant: &TenantId) -> Result<()> {
    tenants::Entity::find_by_id(tenant.to_string())
        .lock_exclusive()
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("tenant"))?;
    Ok(())
}

const ACTIVE: [&str; 2] = ["queued", "running"];

impl Store {
    /// Stores a dataset if it fits the plan's datasets and bytes.
    pub async fn create_dataset(
        &self,
        tenant: &TenantId,
        who: &Who,
        new: NewDataset,
        quota: &PlanIsolation,
    ) -> Result<Dataset> {
        let txn = self.write_transaction().await?;
        lock_tenant(&txn, tenant).await?;
        let kept: Vec<i64> = datasets::Entity::find_in(tenant)
            .select_only()
            .column(datasets::Column::SizeBytes)
            .into_tuple()
            .all(&txn)
            .await?;
        if kept.len() >= quota.max_datasets as usize {
            return Err(refused(
                ErrorCode::DatasetQuotaExceeded,
                format!(
                    "the plan keeps {} datasets: delete one, or move to a larger plan",
                    quota.max_datasets
                ),
            ));
        }
        let used = kept
            .iter()
            .map(|&b| u64::try_from(b).unwrap_or(0))
            .fold(0, u64::saturating_add);
        if used.saturating_add(new.size_bytes) > quota.max_dataset_bytes {
            return Err(refused(
                ErrorCode::DatasetQuotaExceeded,
                format!(
                    "the plan keeps {} bytes of datasets and {used} are used; this one has {}",
                    quota.max_dataset_bytes, new.size_bytes
                ),
            ));
        }
        let id = DatasetId::new();
        let row = datasets::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(tenant.to_string()),
            name: Set(new.name.clone()),
            format: Set(new.format),
            size_bytes: Set(i64::try_from(new.size_bytes).unwrap_or(i64::MAX)),
            summary: Set(json(&new.summary)),
            content: Set(new.sealed_examples),
            created_at: Set(Utc::now()),
        }
        .insert(&txn)
        .await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "dataset.upload",
            Some(id.as_str()),
            serde_json::json!({ "name": new.name, "examples": new.summary.examples, "bytes": new.size_bytes }),
        )
        .await?;
        txn.commit().await?;
        to_dataset(DatasetInfo {
            id: row.id,
            name: row.name,
            format: row.format,
            size_bytes: row.size_bytes,
            summary: row.summary,
            created_at: row.created_at,
        })
    }

    /// The tenant's datasets, newest first.
    pub async fn datasets(&self, tenant: &TenantId) -> Result<Vec<Dataset>> {
        self.dataset_infos(tenant, None).await
    }

    pub async fn dataset(&self, tenant: &TenantId, id: &str) -> Result<Dataset> {
        self.dataset_infos(tenant, Some(id))
            .await?
            .pop()
            .ok_or(StoreError::NotFound("dataset"))
    }

    async fn dataset_infos(&self, tenant: &TenantId, id: Option<&str>) -> Result<Vec<Dataset>> {
        let mut select = datasets::Entity::find_in(tenant).select_only().columns([
            datasets::Column::Id,
            datasets::Column::Name,
            datasets::Column::Format,
            datasets::Column::SizeBytes,
            datasets::Column::Summary,
            datasets::Column::CreatedAt,
        ]);
        if let Some(id) = id {
            select = select.filter(datasets::Column::Id.eq(id));
        }
        let rows = select
            .order_by_desc(datasets::Column::Id)
            .into_model::<DatasetInfo>()
            .all(self.db())
            .await?;
        rows.into_iter().map(to_dataset).collect()
    }

    /// A dataset's sealed examples.
    pub async fn dataset_examples(&self, tenant: &TenantId, id: &str) -> Result<String> {
        datasets::Entity::find_in(tenant)
            .filter(datasets::Column::Id.eq(id))
            .one(self.db())
            .await?
            .map(|row| row.content)
            .ok_or(StoreError::NotFound("dataset"))
    }

    /// Deletes a dataset and its examples. Jobs that used it keep their results and lose the link;
    /// a queued job on it is cancelled and a running one told to stop.
    pub async fn delete_dataset(&self, tenant: &TenantId, who: &Who, id: &str) -> Result<()> {
        let txn = self.write_transaction().await?;
        let deleted = datasets::Entity::delete_many()
            .filter(datasets::Column::TenantId.eq(tenant.as_str()))
            .filter(datasets::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        if deleted.rows_affected == 0 {
            return Err(StoreError::NotFound("dataset"));
        }
        let affected = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::DatasetId.eq(id))
            .filter(training_jobs::Column::Status.is_in(ACTIVE))
            .all(&txn)
            .await?;
        for job in affected {
            stop(&txn, tenant, &job, "its dataset was deleted").await?;
        }
        training_jobs::Entity::update_many()
            .col_expr(
                training_jobs::Column::DatasetId,
                Expr::value(Option::<String>::None),
            )
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::DatasetId.eq(id))
            .exec(&txn)
            .await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "dataset.delete",
            Some(id),
            serde_json::json!({}),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Queues a job if the tenant has fewer than its plan's jobs queued or running.
    pub async fn create_training_job(
        &self,
        tenant: &TenantId,
        who: &Who,
        new: NewTrainingJob,
        quota: &PlanIsolation,
    ) -> Result<TrainingJob> {
        let txn = self.write_transaction().await?;
        lock_tenant(&txn, tenant).await?;
        let active = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Status.is_in(ACTIVE))
            .count(&txn)
            .await?;
        if active >= u64::from(quota.training_jobs) {
            return Err(refused(
                ErrorCode::TrainingJobsExceeded,
                format!(
                    "the plan runs {} training jobs at once: wait for one to finish, or cancel one",
                    quota.training_jobs
                ),
            ));
        }
        // The dataset may have been deleted since the caller read it.
        datasets::Entity::find_in(tenant)
            .select_only()
            .column(datasets::Column::Id)
            .filter(datasets::Column::Id.eq(new.dataset.as_str()))
            .into_tuple::<String>()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("dataset"))?;
        let id = TrainingJobId::new();
        let progress = TrainingProgress {
            examples: new.split.train + new.split.validation + new.split.test,
            max_epochs: new.hyperparameters.epochs.unwrap_or(0),
            ..TrainingProgress::default()
        };
        let row = training_jobs::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(tenant.to_string()),
            dataset_id: Set(Some(new.dataset.to_string())),
            model: Set(new.model.clone()),
            base_model: Set(new.base_model.clone()),
            status: Set(TrainingStatus::Queued.as_str().to_owned()),
            hyperparameters: Set(json(&new.hyperparameters)),
            labels: Set(json(&new.labels)),
            split: Set(json(&new.split)),
            progress: Set(json(&progress)),
            checkpoint: Set(None),
            evaluation: Set(None),
            error: Set(None),
            deployed_version: Set(None),
            billed_units: Set(0),
            billed_micros: Set(0),
            attempts: Set(0),
            cancel_requested: Set(false),
            price_micros: Set(new.price.0),
            runner: Set(None),
            heartbeat_us: Set(None),
            weight: Set(i32::try_from(quota.scheduling_weight).unwrap_or(i32::MAX)),
            deploy_claimed_us: Set(None),
            created_at: Set(Utc::now()),
            started_at: Set(None),
            finished_at: Set(None),
        }
        .insert(&txn)
        .await?;
        add_event(&txn, tenant, id.as_str(), "info", "queued").await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "training_job.create",
            Some(id.as_str()),
            serde_json::json!({ "dataset": new.dataset.as_str(), "model": new.model, "base_model": new.base_model }),
        )
        .await?;
        txn.commit().await?;
        to_job(&row)
    }

    /// The tenant's jobs, newest first.
    pub async fn training_jobs(&self, tenant: &TenantId) -> Result<Vec<TrainingJob>> {
        let rows = training_jobs::Entity::find_in(tenant)
            .order_by_desc(training_jobs::Column::Id)
            .limit(200)
            .all(self.db())
            .await?;
        rows.iter().map(to_job).collect()
    }

    pub async fn training_job(&self, tenant: &TenantId, id: &str) -> Result<TrainingJob> {
        to_job(&self.training_job_row(tenant, id).await?)
    }

    async fn training_job_row(&self, tenant: &TenantId, id: &str) -> Result<training_jobs::Model> {
        training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Id.eq(id))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("training job"))
    }

    /// A finished job's trained state (`None` until it succeeded).
    pub async fn training_checkpoint(&self, tenant: &TenantId, id: &str) -> Result<Option<String>> {
        let row = self.training_job_row(tenant, id).await?;
        Ok(if row.status == TrainingStatus::Succeeded.as_str() {
            row.checkpoint
        } else {
            None
        })
    }

    /// A job's events, oldest first.
    pub async fn training_events(&self, tenant: &TenantId, id: &str) -> Result<Vec<TrainingEvent>> {
        self.training_job_row(tenant, id).await?;
        let rows = training_events::Entity::find_in(tenant)
            .filter(training_events::Column::JobId.eq(id))
            .order_by_asc(training_events::Column::Id)
            .limit(1_000)
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| TrainingEvent {
                at: row.at,
                level: row.level,
                message: row.message,
            })
            .collect())
    }

    /// Cancels a queued job at once; asks a running one to stop (its runner does, between epochs).
    pub async fn cancel_training_job(&self, tenant: &TenantId, who: &Who, id: &str) -> Result<TrainingJob> {
        let txn = self.write_transaction().await?;
        let row = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Id.eq(id))
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("training job"))?;
        if !ACTIVE.contains(&row.status.as_str()) {
            return Err(refused(
                ErrorCode::TrainingJobState,
                format!("the job has already {}", row.status),
            ));
        }
        stop(&txn, tenant, &row, "cancelled").await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "training_job.cancel",
            Some(id),
            serde_json::json!({}),
        )
        .await?;
        txn.commit().await?;
        self.training_job(tenant, id).await
    }

    /// Deletes a finished job with its events and trained state (a deployed model stays).
    pub async fn delete_training_job(&self, tenant: &TenantId, who: &Who, id: &str) -> Result<()> {
        let txn = self.write_transaction().await?;
        let row = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Id.eq(id))
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("training job"))?;
        if ACTIVE.contains(&row.status.as_str()) {
            return Err(refused(
                ErrorCode::TrainingJobState,
                "the job is still active: cancel it first",
            ));
        }
        training_events::Entity::delete_many()
            .filter(training_events::Column::TenantId.eq(tenant.as_str()))
            .filter(training_events::Column::JobId.eq(id))
            .exec(&txn)
            .await?;
        training_jobs::Entity::delete_many()
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "training_job.delete",
            Some(id),
            serde_json::json!({}),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Records that a job's model was deployed as `version` under `claim`.
    pub async fn mark_training_job_deployed(
        &self,
        tenant: &TenantId,
        who: &Who,
        id: &str,
        claim: DeployClaim,
        version: u32,
    ) -> Result<()> {
        let txn = self.write_transaction().await?;
        let marked = training_jobs::Entity::update_many()
            .col_expr(
                training_jobs::Column::DeployedVersion,
                Expr::value(i32::try_from(version).unwrap_or(i32::MAX)),
            )
            .col_expr(
                training_jobs::Column::DeployClaimedUs,
                Expr::value(Option::<i64>::None),
            )
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .filter(claim.held())
            .exec(&txn)
            .await?;
        // A job deleted meanwhile, or whose claim was taken over (see
        // [`Store::claim_training_deployment`]), gets no event; the version stays a version of its
        // model, and the deployment is audited all the same.
        if marked.rows_affected == 1 {
            add_event(
                &txn,
                tenant,
                id,
                "info",
                &format!("deployed as version {version}"),
            )
            .await?;
        }
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "training_job.deploy",
            Some(id),
            serde_json::json!({ "version": version }),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Claims a queued job for `runner`: the first of a tenant with none running, else the first (so
    /// one tenant's queue of jobs does not hold everyone else's back); first by the weight of the plan
    /// it was queued under, then oldest (signups are free: a crowd of free accounts, each with a job
    /// queued, does not hold back a paying tenant's). First, jobs whose runner
    /// has not been heard from since `stale_before` are queued again (or failed, after
    /// [`MAX_ATTEMPTS`] runs).
    pub async fn claim_training_job(
        &self,
        runner: &str,
        stale_after: std::time::Duration,
    ) -> Result<Option<ClaimedJob>> {
        // Measured on the database's clock, like every lease replicas compare.
        let stale_us = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
        let stale = training_jobs::Entity::find()
            .filter(training_jobs::Column::Status.eq(TrainingStatus::Running.as_str()))
            .filter(Expr::cust(format!(
                "heartbeat_us < {} - {stale_us}",
                self.clock_sql()
            )))
            .all(self.db())
            .await?;
        for row in stale {
            let tenant = crate::accounts::parse_id(&row.tenant_id)?;
            let txn = self.write_transaction().await?;
            let (status, message) = if row.cancel_requested {
                ("cancelled", "cancelled (its runner stopped)".to_owned())
            } else if row.attempts >= MAX_ATTEMPTS {
                (
                    "failed",
                    format!("interrupted {MAX_ATTEMPTS} times; not restarted again"),
                )
            } else {
                (
                    "queued",
                    "its runner stopped; queued again, to resume from the last epoch".to_owned(),
                )
            };
            let mut update = training_jobs::Entity::update_many()
                .col_expr(training_jobs::Column::Status, Expr::value(status))
                .col_expr(training_jobs::Column::Runner, Expr::value(Option::<String>::None));
            if status != "queued" {
                update = update.col_expr(training_jobs::Column::FinishedAt, Expr::value(Utc::now()));
            }
            if status == "failed" {
                update = update.col_expr(training_jobs::Column::Error, Expr::value(message.clone()));
            }
            let moved = update
                .filter(training_jobs::Column::Id.eq(&row.id))
                .filter(training_jobs::Column::Status.eq(TrainingStatus::Running.as_str()))
                .filter(training_jobs::Column::HeartbeatUs.eq(row.heartbeat_us))
                .exec(&txn)
                .await?;
            if moved.rows_affected == 1 {
                add_event(
                    &txn,
                    &tenant,
                    &row.id,
                    if status == "failed" { "error" } else { "info" },
                    &message,
                )
                .await?;
            }
            txn.commit().await?;
        }
        let first_queued = || {
            training_jobs::Entity::find()
                .filter(training_jobs::Column::Status.eq(TrainingStatus::Queued.as_str()))
                .order_by_desc(training_jobs::Column::Weight)
                .order_by_asc(training_jobs::Column::CreatedAt)
                .order_by_asc(training_jobs::Column::Id)
        };
        loop {
            // Asked of the database rather than picked from the oldest few: however many jobs the
            // tenants with runs hold queued, a tenant with none is found.
            let running_tenants = sea_orm::sea_query::Query::select()
                .column(training_jobs::Column::TenantId)
                .from(training_jobs::Entity)
                .and_where(training_jobs::Column::Status.eq(TrainingStatus::Running.as_str()))
                .to_owned();
            let first_of_an_idle_tenant = first_queued()
                .filter(training_jobs::Column::TenantId.not_in_subquery(running_tenants))
                .one(self.db())
                .await?;
            let row = match first_of_an_idle_tenant {
                Some(row) => row,
                None => match first_queued().one(self.db()).await? {
                    Some(row) => row,
                    None => return Ok(None),
                },
            };
            let now = Utc::now();
            let txn = self.write_transaction().await?;
            let claimed = training_jobs::Entity::update_many()
                .col_expr(
                    training_jobs::Column::Status,
                    Expr::value(TrainingStatus::Running.as_str()),
                )
                .col_expr(training_jobs::Column::Runner, Expr::value(runner))
                .col_expr(training_jobs::Column::HeartbeatUs, Expr::cust(self.clock_sql()))
                .col_expr(training_jobs::Column::Attempts, Expr::value(row.attempts + 1))
                .col_expr(
                    training_jobs::Column::StartedAt,
                    Expr::value(row.started_at.unwrap_or(now)),
                )
                .filter(training_jobs::Column::Id.eq(&row.id))
                .filter(training_jobs::Column::Status.eq(TrainingStatus::Queued.as_str()))
                .exec(&txn)
                .await?;
            if claimed.rows_affected == 0 {
                // Another runner took it first.
                txn.commit().await?;
                continue;
            }
            let tenant = crate::accounts::parse_id(&row.tenant_id)?;
            let message = if row.attempts == 0 {
                "started".to_owned()
            } else {
                format!("restarted (run {})", row.attempts + 1)
            };
            add_event(&txn, &tenant, &row.id, "info", &message).await?;
            txn.commit().await?;
            let row = training_jobs::Entity::find_in(&tenant)
                .filter(training_jobs::Column::Id.eq(&row.id))
                .one(self.db())
                .await?
                .ok_or(StoreError::NotFound("training job"))?;
            return Ok(Some(ClaimedJob {
                job: to_job(&row)?,
                checkpoint: row.checkpoint.clone(),
                price: Micros(row.price_micros),
                tenant_id: tenant,
            }));
        }
    }

    /// A running job's progress (and, after an epoch, its checkpoint), from the runner holding it.
    /// The heartbeat goes on after a cancellation (the runner still has to stop and bill what ran).
    pub async fn training_heartbeat(
        &self,
        tenant: &TenantId,
        id: &str,
        runner: &str,
        progress: &TrainingProgress,
        checkpoint: Option<String>,
    ) -> Result<Heartbeat> {
        let mut update = training_jobs::Entity::update_many()
            .col_expr(training_jobs::Column::HeartbeatUs, Expr::cust(self.clock_sql()))
            .col_expr(training_jobs::Column::Progress, Expr::value(json(progress)));
        if let Some(checkpoint) = checkpoint {
            update = update.col_expr(training_jobs::Column::Checkpoint, Expr::value(checkpoint));
        }
        let updated = update
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .filter(training_jobs::Column::Runner.eq(runner))
            .filter(training_jobs::Column::Status.eq(TrainingStatus::Running.as_str()))
            .exec(self.db())
            .await?;
        if updated.rows_affected == 0 {
            return Ok(Heartbeat::Lost);
        }
        let cancelled: Option<bool> = training_jobs::Entity::find_in(tenant)
            .select_only()
            .column(training_jobs::Column::CancelRequested)
            .filter(training_jobs::Column::Id.eq(id))
            .into_tuple()
            .one(self.db())
            .await?;
        Ok(if cancelled == Some(true) {
            Heartbeat::Cancelled
        } else {
            Heartbeat::Continue
        })
    }

    /// Marks a succeeded job as being deployed, once: `None` when it already is (or was). A claim
    /// older than `stale_after` is taken over: its replica stopped before it marked the job deployed
    /// or released it (a deployment takes seconds). Measured on the database's clock.
    pub async fn claim_training_deployment(
        &self,
        tenant: &TenantId,
        id: &str,
        stale_after: std::time::Duration,
    ) -> Result<Option<DeployClaim>> {
        let stale_us = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
        let unclaimed = Condition::any()
            .add(training_jobs::Column::DeployedVersion.is_null())
            .add(
                Condition::all()
                    .add(training_jobs::Column::DeployedVersion.eq(DEPLOYING))
                    .add(
                        Condition::any()
                            .add(training_jobs::Column::DeployClaimedUs.is_null())
                            .add(Expr::cust(format!(
                                "deploy_claimed_us < {} - {stale_us}",
                                self.clock_sql()
                            ))),
                    ),
            );
        let txn = self.write_transaction().await?;
        let claimed = training_jobs::Entity::update_many()
            .col_expr(training_jobs::Column::DeployedVersion, Expr::value(DEPLOYING))
            .col_expr(
                training_jobs::Column::DeployClaimedUs,
                Expr::cust(self.clock_sql()),
            )
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .filter(training_jobs::Column::Status.eq(TrainingStatus::Succeeded.as_str()))
            .filter(unclaimed)
            .exec(&txn)
            .await?;
        if claimed.rows_affected != 1 {
            return Ok(None);
        }
        let claimed_us: Option<i64> = training_jobs::Entity::find_in(tenant)
            .select_only()
            .column(training_jobs::Column::DeployClaimedUs)
            .filter(training_jobs::Column::Id.eq(id))
            .into_tuple()
            .one(&txn)
            .await?
            .flatten();
        txn.commit().await?;
        Ok(claimed_us.map(|claimed_us| DeployClaim { claimed_us }))
    }

    /// Gives up a deployment that failed, so it can be tried again (unless the claim was taken over).
    pub async fn release_training_deployment(
        &self,
        tenant: &TenantId,
        id: &str,
        claim: DeployClaim,
    ) -> Result<()> {
        training_jobs::Entity::update_many()
            .col_expr(
                training_jobs::Column::DeployedVersion,
                Expr::value(Option::<i32>::None),
            )
            .col_expr(
                training_jobs::Column::DeployClaimedUs,
                Expr::value(Option::<i64>::None),
            )
            .filter(training_jobs::Column::TenantId.eq(tenant.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .filter(claim.held())
            .exec(self.db())
            .await?;
        Ok(())
    }

    /// Whether `runner` still runs the job (it was not deleted, finished or taken over).
    pub async fn holds_training_job(&self, tenant: &TenantId, id: &str, runner: &str) -> Result<bool> {
        let held = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Id.eq(id))
            .filter(training_jobs::Column::Runner.eq(runner))
            .filter(training_jobs::Column::Status.eq(TrainingStatus::Running.as_str()))
            .count(self.db())
            .await?;
        Ok(held == 1)
    }

    /// Reseals the datasets not sealed under `secrets`' primary key (a key rotation, over every
    /// tenant); returns how many. One at a time: each holds a whole dataset.
    pub async fn reseal_datasets(&self, secrets: &crate::SecretBox) -> Result<u64> {
        const PAGE: u64 = 1;
        let mut resealed = 0;
        let mut after = String::new();
        loop {
            let rows = datasets::Entity::find()
                .filter(datasets::Column::Id.gt(after.as_str()))
                .order_by_asc(datasets::Column::Id)
                .limit(PAGE)
                .all(self.db())
                .await?;
            let Some(last) = rows.last() else {
                return Ok(resealed);
            };
            after = last.id.clone();
            for row in rows {
                if !secrets.needs_resealing(&row.content) {
                    continue;
                }
                let sealed = secrets.seal(&secrets.open(&row.content)?)?;
                let updated = datasets::Entity::update_many()
                    .col_expr(datasets::Column::Content, Expr::value(sealed))
                    .filter(datasets::Column::Id.eq(&row.id))
                    .exec(self.db())
                    .await?;
                resealed += updated.rows_affected;
            }
        }
    }

    /// Adds an event to a job's history.
    pub async fn training_event(
        &self,
        tenant: &TenantId,
        id: &str,
        level: &str,
        message: &str,
    ) -> Result<()> {
        add_event(self.db(), tenant, id, level, message).await
    }

    /// Ends the run `runner` holds, with what it billed. A job cancelled meanwhile ends cancelled
    /// whatever the run's outcome.
    pub async fn finish_training_job(
        &self,
        tenant: &TenantId,
        id: &str,
        runner: &str,
        end: JobEnd,
        billed: (i64, Micros),
    ) -> Result<()> {
        let txn = self.write_transaction().await?;
        let Some(row) = training_jobs::Entity::find_in(tenant)
            .filter(training_jobs::Column::Id.eq(id))
            .lock_exclusive()
            .one(&txn)
            .await?
        else {
            return Ok(());
        };
        if row.status != TrainingStatus::Running.as_str() || row.runner.as_deref() != Some(runner) {
            return Ok(());
        }
        let end = if row.cancel_requested {
            JobEnd::Cancelled
        } else {
            end
        };
        let mut update = training_jobs::Entity::update_many()
            .col_expr(training_jobs::Column::Runner, Expr::value(Option::<String>::None))
            .col_expr(training_jobs::Column::FinishedAt, Expr::value(Utc::now()))
            .col_expr(training_jobs::Column::BilledUnits, Expr::value(billed.0))
            .col_expr(training_jobs::Column::BilledMicros, Expr::value(billed.1.0));
        let (status, level, message) = match end {
            JobEnd::Succeeded {
                evaluation,
                checkpoint,
            } => {
                update = update
                    .col_expr(training_jobs::Column::Evaluation, Expr::value(json(&evaluation)))
                    .col_expr(training_jobs::Column::Checkpoint, Expr::value(checkpoint));
                (
                    TrainingStatus::Succeeded,
                    "info",
                    format!(
                        "succeeded: held-out accuracy {:.3}, macro-F1 {:.3} on {} examples",
                        evaluation.accuracy, evaluation.macro_f1, evaluation.examples
                    ),
                )
            }
            JobEnd::Failed(error) => {
                update = update
                    .col_expr(training_jobs::Column::Error, Expr::value(error.clone()))
                    .col_expr(
                        training_jobs::Column::Checkpoint,
                        Expr::value(Option::<String>::None),
                    );
                (TrainingStatus::Failed, "error", format!("failed: {error}"))
            }
            JobEnd::Cancelled => {
                update = update.col_expr(
                    training_jobs::Column::Checkpoint,
                    Expr::value(Option::<String>::None),
                );
                (TrainingStatus::Cancelled, "info", "cancelled".to_owned())
            }
        };
        update
            .col_expr(training_jobs::Column::Status, Expr::value(status.as_str()))
            .filter(training_jobs::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        add_event(&txn, tenant, id, level, &message).await?;
        txn.commit().await?;
        Ok(())
    }
}

/// Stops an active job: a queued one is cancelled now, a running one is asked to stop.
async fn stop(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    job: &training_jobs::Model,
    why: &str,
) -> Result<()> {
    let mut update = training_jobs::Entity::update_many()
        .col_expr(training_jobs::Column::CancelRequested, Expr::value(true));
    if job.status == TrainingStatus::Queued.as_str() {
        update = update
            .col_expr(
                training_jobs::Column::Status,
                Expr::value(TrainingStatus::Cancelled.as_str()),
            )
            .col_expr(training_jobs::Column::FinishedAt, Expr::value(Utc::now()));
    }
    update
        .filter(training_jobs::Column::Id.eq(&job.id))
        .exec(conn)
        .await?;
    let message = if job.status == TrainingStatus::Queued.as_str() {
        why.to_owned()
    } else {
        format!("stopping: {why}")
    };
    add_event(conn, tenant, &job.id, "info", &message).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use plinth_core::training::LabelCount;

    use super::*;

    /// A dataset of `tenant`'s, and a job for it queued `jobs` times over, on the free plan.
    async fn queue_jobs(store: &Store, tenant: &TenantId, jobs: usize) -> Vec<TrainingJob> {
        queue_weighed_jobs(store, tenant, jobs, PlanIsolation::FREE.scheduling_weight).await
    }

    /// [`queue_jobs`] on a plan of scheduling weight `weight`.
    async fn queue_weighed_jobs(
        store: &Store,
        tenant: &TenantId,
        jobs: usize,
        weight: u32,
    ) -> Vec<TrainingJob> {
        let quota = PlanIsolation {
            training_jobs: 1_000,
            scheduling_weight: weight,
            ..PlanIsolation::FREE
        };
        let who = Who::internal(Who::OPERATOR);
        let dataset = store
            .create_dataset(
                tenant,
                &who,
                NewDataset {
                    name: "tickets".into(),
                    format: "csv".into(),
                    size_bytes: 10,
                    summary: DatasetSummary {
                        examples: 2,
                        labels: vec![LabelCount {
                            label: "urgent".into(),
                            examples: 2,
                        }],
                        min_chars: 5,
                        mean_chars: 5,
                        max_chars: 5,
                    },
                    sealed_examples: String::new(),
                },
                &quota,
            )
            .await
            .unwrap();
        let mut queued = Vec::with_capacity(jobs);
        for _ in 0..jobs {
            let new = NewTrainingJob {
                price: Micros(0),
                dataset: dataset.id.parse().unwrap(),
                model: "triage".into(),
                base_model: "minilm-embed".into(),
                hyperparameters: Hyperparameters::default(),
                labels: vec!["urgent".into()],
                split: SplitSizes {
                    train: 2,
                    validation: 0,
                    test: 0,
                },
            };
            queued.push(
                store
                    .create_training_job(tenant, &who, new, &quota)
                    .await
                    .unwrap(),
            );
        }
        queued
    }

    #[tokio::test]
    async fn a_tenant_with_nothing_running_is_served_before_a_long_queue_of_another_tenants() {
        let (store, _dir) = crate::testing::test_store().await;
        let stale = std::time::Duration::from_secs(60);
        let claim = async |runner: &str| store.claim_training_job(runner, stale).await.unwrap().unwrap();
        let busy = crate::testing::tenant_with_customer(&store, "cus_busy").await;
        let busy_jobs = queue_jobs(&store, &busy, 151).await;
        let running = claim("runner-1").await;
        assert_eq!(running.job.id, busy_jobs[0].id);
        // Queued after 150 of the busy tenant's.
        let quiet = crate::testing::tenant_with_customer(&store, "cus_quiet").await;
        let quiet_job = queue_jobs(&store, &quiet, 1).await.remove(0);

        let next = claim("runner-2").await;
        assert_eq!(next.tenant_id, quiet);
        assert_eq!(next.job.id, quiet_job.id);
        // With every tenant running something, the oldest job goes next.
        let after = claim("runner-3").await;
        assert_eq!(after.job.id, busy_jobs[1].id);
    }

    /// Signups are free: jobs queued by a crowd of free accounts, one each (all the free plan allows),
    /// do not hold back a job a paying tenant queues after them; theirs then go oldest first.
    #[tokio::test]
    async fn a_paying_tenants_job_is_claimed_before_a_crowd_of_free_accounts_queued_earlier() {
        let (store, _dir) = crate::testing::test_store().await;
        let stale = std::time::Duration::from_secs(60);
        let claim = async |runner: &str| store.claim_training_job(runner, stale).await.unwrap().unwrap();
        let mut crowd = Vec::new();
        for at in 0..5 {
            let free = crate::testing::tenant_with_customer(&store, &format!("cus_free_{at}")).await;
            crowd.push(queue_jobs(&store, &free, 1).await.remove(0).id);
        }
        let paying = crate::testing::tenant_with_customer(&store, "cus_paying").await;
        let paying_jobs = queue_weighed_jobs(&store, &paying, 2, 4).await;

        let first = claim("runner-1").await;
        assert_eq!(first.tenant_id, paying);
        assert_eq!(first.job.id, paying_jobs[0].id);
        // The paying tenant now runs a job: the free accounts' go next, in the order they were queued,
        // and its second job once every tenant with jobs queued runs one.
        let mut claimed = Vec::new();
        for runner in 2..=6 {
            claimed.push(claim(&format!("runner-{runner}")).await.job.id);
        }
        assert_eq!(claimed, crowd);
        assert_eq!(claim("runner-7").await.job.id, paying_jobs[1].id);
    }
}
