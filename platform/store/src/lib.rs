//! Persistence and the domain rules that sit on it: accounts, memberships, API keys, plans and
//! subscriptions, the usage ledger, and the cache/rate-limiter backends.
//!
//! Only this crate knows sea-orm. Every tenant-owned query starts from
//! [`entity::TenantScoped::find_in`]; functions that touch tenant data take the caller's tenant id and
//! answer [`StoreError::NotFound`] for another tenant's rows, never "forbidden".

#![forbid(unsafe_code)]

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod blobs;
pub mod cache;
mod entity;
pub mod idempotency;
pub mod invocations;
pub mod ledger;
pub mod members;
pub mod metering;
pub mod models;
mod passwords;
pub mod payments;
pub mod plans;
pub mod plugins;
pub mod row_security;
mod secret;
pub mod training;

pub use secret::SecretBox;

use std::path::Path;
use std::time::Duration;

use plinth_core::ErrorCode;
use plinth_migrations::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    SqlErr, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

/// A failure of a store operation. Each variant says what a client did wrong, or that something on our
/// side failed (`Database`), which the HTTP edge reports as an opaque 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("the email and password do not match")]
    InvalidLogin,
    #[error("{0}")]
    Forbidden(String),
    #[error("a tenant must keep at least one owner")]
    LastOwner,
    #[error("this user is already a member of the tenant")]
    AlreadyMember,
    #[error("too many attempts; retry in {} s", .0.as_secs().max(1))]
    TooManyAttempts(Duration),
    #[error("{0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    #[error("cache error: {0}")]
    Cache(#[from] cache::CacheError),
    /// A domain rule refused the request, with the code that names the rule.
    #[error("{1}")]
    Refused(ErrorCode, String),
    #[error("{0}")]
    Internal(String),
}

impl StoreError {
    /// The public error code this failure maps to.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::ValidationFailed,
            Self::EmailTaken => ErrorCode::EmailTaken,
            Self::InvalidLogin => ErrorCode::InvalidLogin,
            Self::Forbidden(_) => ErrorCode::InsufficientScope,
            Self::LastOwner => ErrorCode::LastOwner,
            Self::AlreadyMember => ErrorCode::AlreadyMember,
            Self::TooManyAttempts(_) => ErrorCode::RateLimited,
            Self::Refused(code, _) => *code,
            Self::Cache(_) | Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Database(err) if is_connection_error(err) => ErrorCode::Unavailable,
            Self::Database(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
}

fn is_connection_error(err: &DbErr) -> bool {
    matches!(err, DbErr::ConnectionAcquire(_) | DbErr::Conn(_))
}

pub(crate) fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where the data lives.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `sqlite://path?mode=rwc` or `postgres://user@host/db`.
    pub url: String,
    pub max_connections: u32,
    /// Postgres only: the schema to use (created if missing). Lets several deployments, or tests,
    /// share one database.
    pub schema: Option<String>,
    /// How long a verified API key or session is trusted without re-reading it: the upper bound on how
    /// long a revoked key keeps working on another replica.
    pub credential_cache_ttl: Duration,
}

impl DatabaseSettings {
    /// The embedded default: a SQLite file in `data_dir`.
    #[must_use]
    pub fn sqlite_in(data_dir: &Path) -> Self {
        Self {
            url: format!("sqlite://{}?mode=rwc", data_dir.join("plinth.db").display()),
            max_connections: 8,
            schema: None,
            credential_cache_ttl: Duration::from_secs(1),
        }
    }
}

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// A few connections to the same database whose commits do not wait for the disk (Postgres
    /// `synchronous_commit = off`, SQLite `synchronous = NORMAL`), for writes that may be lost in a
    /// database crash without harm. Commits stay atomic and ordered: a durable commit made after one
    /// of these makes it durable too.
    relaxed: DatabaseConnection,
    /// SQLite only: taken around the hot path's writes (ledger batches, idempotent requests), so they
    /// queue here rather than collide in SQLite, whose busy handler waits in whole milliseconds.
    write_gate: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
    credentials: auth::CredentialCache,
    /// Postgres: the channel on which model registry changes are announced to every replica.
    catalog_channel: String,
}

/// Pool options for `settings`; `relaxed` connections do not wait for the disk at commit.
fn connect_options(settings: &DatabaseSettings, relaxed: bool) -> ConnectOptions {
    let mut options = ConnectOptions::new(settings.url.as_str());
    // Idempotency claims are small, quick writes, two per keyed call. On Postgres as many connections
    // as the main pool, so a burst of them does not starve other tenants' leases; on SQLite one, so
    // they queue here instead of contending for the database's one writer (SQLite's busy handler
    // sleeps in milliseconds).
    let max_connections = match (relaxed, settings.url.starts_with("sqlite")) {
        (true, true) => 1,
        _ => settings.max_connections,
    };
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(10))
        // Ping only connections idle long enough to have been dropped: a ping on every checkout
        // costs a round trip on every query, the ledger's commit included.
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(move |opts| {
            opts.journal_mode(SqliteJournalMode::Wal)
                .synchronous(if relaxed {
                    SqliteSynchronous::Normal
                } else {
                    SqliteSynchronous::Full
                })
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    if relaxed {
        options.map_sqlx_postgres_opts(|opts| opts.options([("synchronous_commit", "off")]));
    }
    // Postgres: every connection carries the tenant whose rows it may see (`row_security`), set on
    // each checkout; a new connection also gets the schema (done here rather than through sea-orm's
    // search path, whose connect hook this one would replace).
    options.map_sqlx_postgres_before_acquire(|conn, _| {
        Box::pin(async move { row_security::apply(conn).await.map(|()| true) })
    });
    let schema = settings.schema.clone();
    options.map_sqlx_postgres_pool_opts(move |pool| {
        let schema = schema.clone();
        pool.after_connect(move |conn, _| {
            let schema = schema.clone();
            Box::pin(async move { row_security::apply_on_connect(conn, schema.as_deref()).await })
        })
    });
    options
}

impl Store {
    /// Connects and tunes the backend: SQLite gets WAL with full fsync (a usage event acknowledged to a
    /// client survives power loss) and a busy timeout so concurrent writers queue instead of failing.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self> {
        if let Some(schema) = &settings.schema {
            if !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::invalid(format!("invalid schema name `{schema}`")));
            }
            let admin = Database::connect(settings.url.as_str()).await?;
            admin
                .execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await?;
            admin.close().await?;
        }
        let db = Database::connect(connect_options(settings, false)).await?;
        let relaxed = Database::connect(connect_options(settings, true)).await?;
        let write_gate = (db.get_database_backend() == DbBackend::Sqlite)
            .then(|| std::sync::Arc::new(tokio::sync::Mutex::new(())));
        Ok(Self {
            db,
            relaxed,
            write_gate,
            credentials: auth::CredentialCache::new(settings.credential_cache_ttl),
            // One channel per schema: stores sharing a database do not wake each other.
            catalog_channel: format!(
                "plinth_catalog_{}",
                settings
                    .schema
                    .as_deref()
                    .unwrap_or("public")
                    .to_ascii_lowercase()
            ),
        })
    }

    /// Applies pending migrations and seeds the default plans (existing plans are left as operators
    /// edited them).
    pub async fn migrate(&self) -> Result<()> {
        Migrator::up(&self.db, None).await?;
        self.seed_default_plans().await
    }

    /// Postgres: whether the connected role passes through row-level security (a superuser, or one
    /// with `BYPASSRLS`), which production must not. Always false on SQLite, which has none.
    pub async fn row_security_bypassed(&self) -> Result<bool> {
        if self.backend() != DbBackend::Postgres {
            return Ok(false);
        }
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                "SELECT rolsuper OR rolbypassrls AS bypassed FROM pg_roles WHERE rolname = current_user",
            ))
            .await?;
        Ok(match row {
            Some(row) => row.try_get::<bool>("", "bypassed")?,
            None => false,
        })
    }

    /// Whether the database answers; used by the readiness probe.
    pub async fn ping(&self) -> Result<()> {
        Ok(self.db.ping().await?)
    }

    #[must_use]
    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    pub(crate) fn relaxed(&self) -> &DatabaseConnection {
        &self.relaxed
    }

    /// Waits for the turn to write on the hot path (SQLite only; Postgres writes in parallel).
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }

    /// SQL for the database's clock, in microseconds since the epoch. Leases that several replicas
    /// compare are measured on it, so a replica whose own clock is off cannot take another's lease
    /// early. (SQLite's `'now'` holds still within a statement.)
    pub(crate) fn clock_sql(&self) -> &'static str {
        match self.backend() {
            DbBackend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
            _ => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
        }
    }

    /// The database's clock, in microseconds since the epoch.
    pub async fn database_now_us(&self) -> Result<i64> {
        let sql = format!("SELECT {} AS now_us", self.clock_sql());
        let row = self
            .relaxed
            .query_one_raw(sea_orm::Statement::from_string(self.backend(), sql))
            .await?
            .ok_or_else(|| StoreError::Internal("the database did not tell the time".into()))?;
        Ok(row.try_get::<i64>("", "now_us")?)
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred transaction that reads first cannot wait for the lock when it later
    /// writes and fails with `SQLITE_BUSY` if another writer got in between. Postgres ignores the mode.
    pub(crate) async fn write_transaction(&self) -> Result<DatabaseTransaction> {
        let options = TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        Ok(self.db.begin_with_options(options).await?)
    }
}

/// Fixtures for the store's own tests: a migrated SQLite database in a temporary directory.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]

    use chrono::Utc;
    use plinth_core::id::TenantId;
    use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

    use crate::entity::{subscriptions, tenants};
    use crate::{DatabaseSettings, Store};

    pub(crate) async fn test_store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&DatabaseSettings::sqlite_in(dir.path()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    /// A tenant on the free plan, known to Stripe as `customer`.
    pub(crate) async fn tenant_with_customer(store: &Store, customer: &str) -> TenantId {
        let tenant = TenantId::new();
        let now = Utc::now();
        tenants::ActiveModel {
            id: Set(tenant.to_string()),
            name: Set("Acme".into()),
            created_at: Set(now),
        }
        .insert(store.db())
        .await
        .unwrap();
        Store::create_free_subscription(store.db(), &tenant, now)
            .await
            .unwrap();
        subscriptions::Entity::update_many()
            .col_expr(
                subscriptions::Column::StripeCustomerId,
                sea_orm::sea_query::Expr::value(customer),
            )
            .filter(subscriptions::Column::TenantId.eq(tenant.as_str()))
            .exec(store.db())
            .await
            .unwrap();
        tenant
    }
}
