//! Schema migrations, written once with sea-query so they run unchanged on SQLite and Postgres.
//! Applied by `plinth migrate` and at the start of `plinth serve`. A released migration is never edited:
//! add a new one.

#![forbid(unsafe_code)]

pub use sea_orm_migration::prelude::*;

mod m0001_accounts;
mod m0002_billing;
mod m0003_models;
mod m0004_plugins;
mod m0005_payments;
mod m0006_trust;
mod m0007_isolation;
mod m0008_row_security;
mod m0009_invocations;
mod m0010_replay;
mod m0011_training;
mod m0012_model_signatures;
mod m0013_training_weight;
mod m0014_deploy_claims;

#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_accounts::Migration),
            Box::new(m0002_billing::Migration),
            Box::new(m0003_models::Migration),
            Box::new(m0004_plugins::Migration),
            Box::new(m0005_payments::Migration),
            Box::new(m0006_trust::Migration),
            Box::new(m0007_isolation::Migration),
            Box::new(m0008_row_security::Migration),
            Box::new(m0009_invocations::Migration),
            Box::new(m0010_replay::Migration),
            Box::new(m0011_training::Migration),
            Box::new(m0012_model_signatures::Migration),
            Box::new(m0013_training_weight::Migration),
            Box::new(m0014_deploy_claims::Migration),
        ]
    }
}
