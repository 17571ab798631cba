//! Postgres row-level security: the second wall behind the tenant-scoped queries.
//!
//! Every table that holds a tenant's rows carries a policy (migration `m0008_row_security`) that shows
//! a row only when the connection's `plinth.tenant` setting names the row's tenant, or is `*`. Every
//! connection taken from the pool is set from the task it serves:
//! - inside [`within_request`] once the caller is verified ([`narrow_to`]): that tenant, so a query
//!   that forgets its tenant filter returns only the caller's rows, and a write for another tenant is
//!   refused by the database;
//! - before verification (key and session lookups, sign-up, login, webhooks), in background work
//!   (the ledger's flusher, billing, catalogue sync) and inside [`across_tenants`]: `*`, every tenant.
//!
//! A connection whose setting was never applied (a person's `psql` under the app's role) sees nothing.
//! SQLite has no row security; there the tenant-scoped queries are the only wall.
//!
//! The wall is against forgotten filters, not against SQL injection: the app's role may set `*`.

use std::cell::RefCell;
use std::future::Future;

use plinth_core::id::TenantId;
use sea_orm::sqlx::{self, PgConnection};

/// The setting the policies read.
pub(crate) const SETTING: &str = "plinth.tenant";
/// Its value for work that may see every tenant's rows.
const ALL_TENANTS: &str = "*";

tokio::task_local! {
    /// The tenant whose rows this task may see; `None` for every tenant.
    static CURRENT: RefCell<Option<TenantId>>;
}

/// Runs a request's handling with a place for its tenant: every tenant until [`narrow_to`] is called
/// (key and session lookups come first and must see every tenant's keys), that tenant after.
pub async fn within_request<F: Future>(handling: F) -> F::Output {
    CURRENT.scope(RefCell::new(None), handling).await
}

/// Narrows the current request to `tenant`'s rows: called once its credentials are verified. Outside
/// [`within_request`] (background work, the command line) it changes nothing.
pub fn narrow_to(tenant: &TenantId) {
    let _ = CURRENT.try_with(|current| *current.borrow_mut() = Some(tenant.clone()));
}

/// Lets the rest of the current request see every tenant's rows: only for a verified platform
/// operator's request once its operator check passed (reviews, the tenant directory, billing
/// operations and the platform audit log cross tenants by purpose).
pub fn open_to_operator() {
    let _ = CURRENT.try_with(|current| *current.borrow_mut() = None);
}

/// Runs `work` with every tenant's rows visible, inside a request already narrowed to one tenant. For
/// the few operations whose purpose is to cross tenants: an operator's directory and reviews, a person's
/// memberships in other organisations, switching to one of them.
pub async fn across_tenants<F: Future>(work: F) -> F::Output {
    CURRENT.scope(RefCell::new(None), work).await
}

/// Runs `work` with only `tenant`'s rows visible, wherever it runs.
pub async fn within_tenant<F: Future>(tenant: &TenantId, work: F) -> F::Output {
    CURRENT.scope(RefCell::new(Some(tenant.clone())), work).await
}

/// The setting's value for the current task.
fn current_value() -> String {
    CURRENT
        .try_with(|current| current.borrow().as_ref().map(ToString::to_string))
        .ok()
        .flatten()
        .unwrap_or_else(|| ALL_TENANTS.to_owned())
}

/// Applies the current task's tenant to `conn` (one round trip; every checkout from the pool).
pub(crate) async fn apply(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config($1, $2, false)")
        .bind(SETTING)
        .bind(current_value())
        .execute(conn)
        .await
        .map(|_| ())
}

/// Applies a schema search path and the current task's tenant to a new connection.
pub(crate) async fn apply_on_connect(
    conn: &mut PgConnection,
    schema: Option<&str>,
) -> Result<(), sqlx::Error> {
    if let Some(schema) = schema {
        sqlx::query("SELECT set_config('search_path', $1, false)")
            .bind(format!("\"{schema}\""))
            .execute(&mut *conn)
            .await?;
    }
    apply(conn).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_request_sees_every_tenant_until_narrowed_and_crossing_is_explicit() {
        let tenant: TenantId = TenantId::new();
        assert_eq!(current_value(), "*", "background work sees every tenant");
        within_request(async {
            assert_eq!(current_value(), "*", "before the caller is verified");
            narrow_to(&tenant);
            assert_eq!(current_value(), tenant.to_string());
            across_tenants(async { assert_eq!(current_value(), "*") }).await;
            assert_eq!(current_value(), tenant.to_string(), "crossing ends with its work");
        })
        .await;
        within_tenant(&tenant, async { assert_eq!(current_value(), tenant.to_string()) }).await;
    }
}
