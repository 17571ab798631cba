//! sea-orm entities, one module per table. Only this crate sees them; the rest of the platform talks in
//! `plinth_core` types.

use sea_orm::entity::prelude::*;

use plinth_core::id::TenantId;

/// An entity whose rows belong to one tenant. Every query for such rows starts from
/// [`TenantScoped::find_in`], so forgetting the tenant filter is not expressible through this crate's API.
pub trait TenantScoped: EntityTrait {
    fn tenant_column() -> Self::Column;

    fn find_in(tenant: &TenantId) -> Select<Self> {
        Self::find().filter(Self::tenant_column().eq(tenant.as_str()))
    }
}

macro_rules! tenant_scoped {
    ($($module:ident),*) => {
        $(impl TenantScoped for $module::Entity {
            fn tenant_column() -> $module::Column {
                $module::Column::TenantId
            }
        })*
    };
}

tenant_scoped!(
    datasets,
    training_jobs,
    training_events,
    idempotent_requests,
    memberships,
    sessions,
    api_keys,
    subscriptions,
    usage_events,
    models,
    installations,
    meter_pushes,
    plan_eras,
    invoices,
    author_accounts,
    payouts,
    plugin_invocations
);

pub mod tenants {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tenants")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod users {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Stored lower-cased and trimmed.
        pub email: String,
        /// An argon2id PHC string.
        pub password_hash: String,
        pub is_platform_admin: bool,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod memberships {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "memberships")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
        pub role: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sessions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// Hex SHA-256 of the bearer token.
        pub token_hash: String,
        pub user_id: String,
        pub tenant_id: String,
        pub created_at: DateTimeUtc,
        pub expires_at: DateTimeUtc,
        pub revoked_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        /// Hex SHA-256 of the secret; the secret itself is never stored.
        pub token_hash: String,
        pub redacted: String,
        /// Space-separated scope names.
        pub scopes: String,
        pub rate_limit_per_minute: Option<i32>,
        pub created_by: Option<String>,
        pub created_at: DateTimeUtc,
        pub last_used_at: Option<DateTimeUtc>,
        pub expires_at: Option<DateTimeUtc>,
        pub revoked_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_log {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_log")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: Option<String>,
        /// Who acted: a user id, a key id, or `system`.
        pub actor: String,
        /// Dotted verb, e.g. `api_key.revoke`.
        pub action: String,
        pub target: Option<String>,
        /// JSON with the details worth keeping.
        pub detail: Option<String>,
        pub created_at: DateTimeUtc,
        pub client_address: Option<String>,
        pub user_agent: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plans {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plans")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub currency: String,
        pub monthly_fee_micros: i64,
        pub included_calls: i64,
        pub price_per_call_micros: i64,
        pub hard_cap: bool,
        pub rate_limit_per_minute: i32,
        pub burst: i32,
        pub plugin_instances: i32,
        pub scheduling_weight: i32,
        pub max_models: i32,
        pub max_model_versions: i32,
        pub max_model_bytes: i64,
        pub training_price_micros: i64,
        pub max_datasets: i32,
        pub max_dataset_bytes: i64,
        pub training_jobs: i32,
        pub stripe_flat_price_id: Option<String>,
        pub stripe_metered_price_id: Option<String>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod subscriptions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "subscriptions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub plan_id: String,
        pub status: String,
        pub current_period_start: DateTimeUtc,
        pub current_period_end: DateTimeUtc,
        pub cancel_at_period_end: bool,
        pub stripe_customer_id: Option<String>,
        pub stripe_subscription_id: Option<String>,
        pub updated_at: DateTimeUtc,
        pub stripe_event_at: Option<i64>,
        pub status_event_at: Option<i64>,
        pub meter_synced_until_us: Option<i64>,
        pub plugin_fees_item: bool,
        pub training_item: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod usage_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "usage_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub api_key_id: Option<String>,
        pub resource_kind: String,
        pub resource_id: String,
        pub units: i64,
        pub unit_price_micros: i64,
        pub amount_micros: i64,
        pub idempotency_key: String,
        pub request_id: String,
        pub occurred_at_us: i64,
        pub author_share_micros: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod models {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "models")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        pub version: i32,
        pub task: String,
        /// JSON array of label strings.
        pub labels: String,
        pub sha256: String,
        pub size_bytes: i64,
        pub tokenizer_sha256: Option<String>,
        pub created_at: DateTimeUtc,
        pub deleted_at: Option<DateTimeUtc>,
        /// JSON `Signature` (null for versions registered before signatures were kept).
        pub signature: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plugins {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugins")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub author_tenant_id: String,
        pub name: String,
        pub description: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plugin_versions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugin_versions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub plugin_id: String,
        pub version: String,
        pub wit_version: String,
        /// Space-separated capabilities the manifest declares.
        pub capabilities: String,
        /// JSON array of model names.
        pub models: String,
        pub price_per_call_micros: i64,
        pub sha256: String,
        pub size_bytes: i64,
        /// `pending`, `approved` or `rejected`.
        pub status: String,
        /// JSON: what the publishing checks found.
        pub checks: String,
        pub review_note: Option<String>,
        pub created_at: DateTimeUtc,
        pub reviewed_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod installations {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "installations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub plugin_id: String,
        pub version_id: String,
        /// JSON object of settings.
        pub settings: String,
        /// Secrets as one sealed (encrypted) JSON object, hex.
        pub secrets: String,
        /// Record failed invocations in full, for replay.
        pub record_failures: bool,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub deleted_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plugin_invocations {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugin_invocations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub installation_id: String,
        pub plugin_id: String,
        pub version_id: String,
        pub request_id: String,
        pub occurred_at: DateTimeUtc,
        pub duration_ms: i64,
        pub compute_units: i64,
        pub outcome: String,
        pub message: Option<String>,
        /// JSON array of `{level, message}`.
        pub logs: String,
        /// JSON `RecordedInvocation`, when it was recorded in full.
        pub record: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plugin_kv {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugin_kv")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub installation_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: Vec<u8>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod stripe_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "stripe_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub kind: String,
        pub created: i64,
        pub received_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod meter_pushes {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "meter_pushes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub identifier: String,
        pub tenant_id: String,
        pub stripe_customer_id: String,
        pub meter: String,
        pub bucket_start_us: i64,
        pub bucket_end_us: i64,
        pub value: i64,
        pub created_at: DateTimeUtc,
        pub sent_at: Option<DateTimeUtc>,
        pub sent_at_us: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod invoices {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub stripe_invoice_id: String,
        pub tenant_id: String,
        pub period_start_us: i64,
        pub period_end_us: i64,
        pub status: String,
        pub currency: String,
        pub total_cents: i64,
        pub amount_paid_cents: i64,
        pub hosted_url: Option<String>,
        pub stripe_event_at: i64,
        pub updated_at: DateTimeUtc,
        pub finalized_at_us: Option<i64>,
        pub local: bool,
        pub paid_at_us: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod author_accounts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "author_accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        pub stripe_account_id: String,
        pub payouts_enabled: bool,
        pub stripe_event_at: i64,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod payouts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payouts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        /// `YYYY-MM`.
        pub period: String,
        pub earnings_micros: i64,
        pub amount_cents: i64,
        pub currency: String,
        pub stripe_account_id: String,
        pub stripe_transfer_id: Option<String>,
        /// `pending`, `transferring`, `paid` or `failed` (see `PayoutStatus`).
        pub status: String,
        pub created_at: DateTimeUtc,
        pub paid_at: Option<DateTimeUtc>,
        pub attempts: i32,
        pub last_attempt_at_us: Option<i64>,
        pub failure: Option<String>,
        pub generation: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod plan_eras {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plan_eras")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub plan_id: String,
        pub first_period_start: DateTimeUtc,
        pub first_period_end: DateTimeUtc,
        pub ended_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod idempotent_requests {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotent_requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub id: String,
        pub fingerprint: String,
        /// `in_flight` or `completed`.
        pub state: String,
        pub owner: String,
        pub locked_until_us: i64,
        pub response_status: Option<i32>,
        pub response_headers: Option<String>,
        pub response_body: Option<Vec<u8>>,
        pub created_at_us: i64,
        pub expires_at_us: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod datasets {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "datasets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub name: String,
        pub format: String,
        pub size_bytes: i64,
        /// JSON `DatasetSummary`.
        pub summary: String,
        /// The examples as JSON, sealed.
        pub content: String,
        pub created_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod training_jobs {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "training_jobs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub dataset_id: Option<String>,
        pub model: String,
        pub base_model: String,
        pub status: String,
        pub hyperparameters: String,
        pub labels: String,
        pub split: String,
        pub progress: String,
        pub checkpoint: Option<String>,
        pub evaluation: Option<String>,
        pub error: Option<String>,
        pub deployed_version: Option<i32>,
        pub billed_units: i64,
        pub billed_micros: i64,
        pub attempts: i32,
        pub cancel_requested: bool,
        pub price_micros: i64,
        pub runner: Option<String>,
        pub heartbeat_us: Option<i64>,
        /// The plan's scheduling weight when the job was created: heavier plans' jobs are claimed first.
        pub weight: i32,
        /// When the deployment under way was claimed (database clock, microseconds).
        pub deploy_claimed_us: Option<i64>,
        pub created_at: DateTimeUtc,
        pub started_at: Option<DateTimeUtc>,
        pub finished_at: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod training_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "training_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub job_id: String,
        pub at: DateTimeUtc,
        pub level: String,
        pub message: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
