//! What keeps tenants out of each other's way, per plan: plugin instances at once, a share of each
//! model's capacity under contention, and how many models, versions and bytes a tenant may upload.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, integer};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Plans {
    Table,
    Id,
    /// Plugin instances the tenant may run at once.
    PluginInstances,
    /// The tenant's share of a contended model, relative to other tenants' weights.
    SchedulingWeight,
    /// Uploaded models the tenant may keep.
    MaxModels,
    /// Versions kept per uploaded model.
    MaxModelVersions,
    /// Bytes of model files (every version) the tenant may keep.
    MaxModelBytes,
}

/// The shipped plans' values (`plinth_store::plans::default_plans`); plans an operator created get the
/// column defaults, the free plan's.
const SHIPPED: [(&str, i32, i32, i32, i32, i64); 3] = [
    ("free", 2, 1, 2, 5, 1 << 30),
    ("pro", 8, 4, 20, 20, 20 << 30),
    ("enterprise", 32, 16, 200, 50, 200 << 30),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let (_, instances, weight, models, versions, bytes) = SHIPPED[0];
        for column in [
            integer(Plans::PluginInstances).default(instances).to_owned(),
            integer(Plans::SchedulingWeight).default(weight).to_owned(),
            integer(Plans::MaxModels).default(models).to_owned(),
            integer(Plans::MaxModelVersions).default(versions).to_owned(),
            big_integer(Plans::MaxModelBytes).default(bytes).to_owned(),
        ] {
            // One column per statement: SQLite alters one at a time.
            manager
                .alter_table(Table::alter().table(Plans::Table).add_column(column).to_owned())
                .await?;
        }
        for (id, instances, weight, models, versions, bytes) in SHIPPED {
            manager
                .exec_stmt(
                    Query::update()
                        .table(Plans::Table)
                        .value(Plans::PluginInstances, instances)
                        .value(Plans::SchedulingWeight, weight)
                        .value(Plans::MaxModels, models)
                        .value(Plans::MaxModelVersions, versions)
                        .value(Plans::MaxModelBytes, bytes)
                        .and_where(Expr::col(Plans::Id).eq(id))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            Plans::PluginInstances,
            Plans::SchedulingWeight,
            Plans::MaxModels,
            Plans::MaxModelVersions,
            Plans::MaxModelBytes,
        ] {
            manager
                .alter_table(Table::alter().table(Plans::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
