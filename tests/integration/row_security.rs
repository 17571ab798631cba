//! Postgres row-level security, the second wall behind the tenant-scoped queries: through the app's own
//! database role, a query that forgets its tenant filter returns only the current tenant's rows, and a
//! write for another tenant is refused by the database. (Production mode only: SQLite has no row
//! security, and the embedded mode relies on the tenant-scoped queries alone.)

use plinth_store::row_security;
use plinth_tests::{Backend, TestApp, postgres_and_redis};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};

/// The server's database and schema, opened as its role but without the store's per-checkout setting:
/// what a person with the app's credentials, or a query that bypassed the store, would get.
async fn raw_connection(app: &TestApp) -> DatabaseConnection {
    let mut options = ConnectOptions::new(app.config.database_url.clone().unwrap());
    options
        .max_connections(1)
        .sqlx_logging(false)
        .set_schema_search_path(app.config.database_schema.clone().unwrap());
    Database::connect(options).await.unwrap()
}

async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    let mut found: Vec<String> = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect();
    found.sort();
    found.dedup();
    found
}

async fn set_tenant(db: &DatabaseConnection, value: &str) {
    db.execute_unprepared(&format!("SELECT set_config('plinth.tenant', '{value}', false)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unscoped_query_through_the_apps_role_returns_no_other_tenants_rows() {
    if postgres_and_redis().is_none() {
        return;
    }
    let app = TestApp::spawn_on(Backend::PostgresRedis, |_| {}).await;
    let (a, b) = (app.tenant().await, app.tenant().await);
    let (a_id, b_id) = (a.session.tenant.id.to_string(), b.session.tenant.id.to_string());
    let db = raw_connection(&app).await;

    // The role the platform runs as cannot pass through the policies, as production's must not.
    let role = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
        ))
        .await
        .unwrap()
        .unwrap();
    let (superuser, bypass): (bool, bool) = (
        role.try_get_by_index(0).unwrap(),
        role.try_get_by_index(1).unwrap(),
    );
    assert!(
        !superuser && !bypass,
        "PLINTH_TEST_DATABASE_URL must name a role without SUPERUSER or BYPASSRLS, as in production \
         (.ci/run creates `plinth_app`); row security does not bind this one"
    );

    // Every table with a tenant column is walled, and the wall binds the tables' owner too: a table
    // added later without a policy fails here.
    let unwalled = strings(
        &db,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' \
         AND EXISTS (SELECT 1 FROM information_schema.columns i WHERE i.table_schema = n.nspname \
                     AND i.table_name = c.relname AND i.column_name = 'tenant_id') \
         AND NOT (c.relrowsecurity AND c.relforcerowsecurity)",
    )
    .await;
    assert!(
        unwalled.is_empty(),
        "tenant tables without row security: {unwalled:?}"
    );

    // A connection that never said whose rows it serves sees none.
    for table in [
        "api_keys",
        "tenants",
        "memberships",
        "sessions",
        "subscriptions",
        "audit_log",
    ] {
        let rows = strings(&db, &format!("SELECT CAST(COUNT(*) AS TEXT) FROM {table}")).await;
        assert_eq!(rows, ["0"], "{table} without a tenant set");
    }

    // Set to A: a query without any tenant filter returns A's rows only, in every walled table.
    set_tenant(&db, &a_id).await;
    for (table, column) in [
        ("api_keys", "tenant_id"),
        ("tenants", "id"),
        ("memberships", "tenant_id"),
        ("sessions", "tenant_id"),
        ("subscriptions", "tenant_id"),
        ("audit_log", "tenant_id"),
    ] {
        let seen = strings(&db, &format!("SELECT {column} FROM {table}")).await;
        assert_eq!(seen, std::slice::from_ref(&a_id), "{table} as tenant A");
    }
    // An unscoped write touches A's rows only; moving rows to B is refused by the database itself.
    db.execute_unprepared("UPDATE api_keys SET name = 'renamed by A'")
        .await
        .unwrap();
    let refused = db
        .execute_unprepared(&format!("UPDATE api_keys SET tenant_id = '{b_id}'"))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("row-level security"),
        "A's keys handed to B: {refused}"
    );

    // As every tenant (what the platform's background work uses), both are there, and B's key kept
    // its name.
    set_tenant(&db, "*").await;
    let everyone = strings(&db, "SELECT tenant_id FROM api_keys").await;
    assert!(everyone.contains(&a_id) && everyone.contains(&b_id));
    let names = strings(
        &db,
        &format!("SELECT name FROM api_keys WHERE tenant_id = '{b_id}'"),
    )
    .await;
    assert_eq!(names, ["test"]);

    // The store sets the wall on its own connections: an operator's query that has no tenant filter at
    // all, run inside tenant A's scope, returns A alone; outside any tenant's scope, both.
    let directory =
        row_security::within_tenant(&a.session.tenant.id, app.store().tenant_directory(None, 1_000))
            .await
            .unwrap();
    let ids: Vec<String> = directory.iter().map(|t| t.id.to_string()).collect();
    assert_eq!(ids, std::slice::from_ref(&a_id));
    let directory = app.store().tenant_directory(None, 1_000).await.unwrap();
    assert!(directory.iter().any(|t| t.id.to_string() == b_id));

    // And the API still serves each tenant its own: B's key works and lists as it was.
    let keys = b.owner.api_keys().await.unwrap();
    assert!(keys.iter().all(|key| key.name == "test"), "{keys:?}");
}
