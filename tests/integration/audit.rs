//! The audit log as its readers use it: a tenant's admins see who did what in their tenant, from where;
//! platform admins see everything; nobody else sees anything, and no secret value is ever written.

use plinth_sdk::{
    AuditQuery, CreateApiKeyRequest, ErrorCode, InstallRequest, Scope, UpdateInstallationRequest,
};
use plinth_tests::{PASSWORD, TestApp, built_plugin};
use serde_json::json;

#[tokio::test]
async fn tenant_admins_read_who_did_what_from_where_and_nobody_else_does() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let email = tenant.session.user.email.clone();

    // A failed and a successful login, a key made with a recognisable client, a plan change.
    let login = |password: &'static str| {
        app.http()
            .post(app.url("/v1/login"))
            .header("User-Agent", "audit-test/1.0")
            .json(&json!({ "email": email, "password": password }))
            .send()
    };
    assert_eq!(login("not the password").await.unwrap().status(), 401);
    assert_eq!(login(PASSWORD).await.unwrap().status(), 200);
    let created: plinth_sdk::CreatedApiKey = app
        .http()
        .post(app.url("/v1/api-keys"))
        .bearer_auth(&tenant.session.token)
        .header("User-Agent", "audit-test/1.0")
        .json(&CreateApiKeyRequest {
            name: "ci".into(),
            scopes: Some(vec![Scope::Inference]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tenant.owner.revoke_api_key(&created.key.id).await.unwrap();
    tenant.owner.change_plan("pro").await.unwrap();

    // An installation with a secret: its name is recorded, its value never.
    let author = app.tenant().await;
    let (manifest, component) = built_plugin("hello");
    author
        .owner
        .create_plugin(&manifest.name, &manifest.description)
        .await
        .unwrap();
    let version = author
        .owner
        .publish_plugin_version(&manifest, component)
        .await
        .unwrap();
    let admin = app.platform_admin().await;
    admin
        .review_plugin_version(&version.id, true, Some("looks fine"))
        .await
        .unwrap();
    let installed = tenant
        .owner
        .install_plugin(&InstallRequest {
            plugin: manifest.name.clone(),
            version: None,
            approve_capabilities: manifest.capabilities.clone(),
            approve_models: manifest.models.clone(),
            settings: json!({ "greeting": "hi" }).as_object().cloned().unwrap(),
            secrets: [("api_token".to_owned(), "s3cret-value-never-logged".to_owned())].into(),
            record_failures: false,
        })
        .await
        .unwrap();
    tenant
        .owner
        .update_installation(
            &installed.id,
            &UpdateInstallationRequest {
                settings: Some(
                    json!({ "greeting": "hello", "style": "warm" })
                        .as_object()
                        .cloned()
                        .unwrap(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let log = tenant.owner.audit_log(&AuditQuery::default()).await.unwrap();
    let actions: Vec<&str> = log.entries.iter().map(|e| e.action.as_str()).collect();
    for expected in [
        "tenant.signup",
        "login.failed",
        "login.succeeded",
        "api_key.create",
        "api_key.revoke",
        "subscription.change_plan",
        "plugin.install",
        "plugin.update",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    assert!(log.entries.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let key_created = log.entries.iter().find(|e| e.action == "api_key.create").unwrap();
    assert_eq!(key_created.client_address.as_deref(), Some("127.0.0.1"));
    assert_eq!(key_created.user_agent.as_deref(), Some("audit-test/1.0"));
    assert_eq!(key_created.actor, tenant.session.user.id.as_str());
    let failed = log.entries.iter().find(|e| e.action == "login.failed").unwrap();
    assert_eq!(failed.user_agent.as_deref(), Some("audit-test/1.0"));
    let install = log.entries.iter().find(|e| e.action == "plugin.install").unwrap();
    assert_eq!(install.detail["secrets"], json!(["api_token"]));
    let update = log.entries.iter().find(|e| e.action == "plugin.update").unwrap();
    assert_eq!(update.detail["settings_changed"], json!(["greeting", "style"]));
    assert!(
        !serde_json::to_string(&log)
            .unwrap()
            .contains("s3cret-value-never-logged")
    );
    // The author sees the review of its plugin in its own log.
    let author_log = author.owner.audit_log(&AuditQuery::default()).await.unwrap();
    assert!(
        author_log
            .entries
            .iter()
            .any(|e| e.action == "plugin.approve" && e.detail["note"] == "looks fine")
    );

    // Pages of two, newest first, without overlap, to the end.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = tenant
            .owner
            .audit_log(&AuditQuery {
                limit: Some(2),
                before: before.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.iter().map(|e| e.id.clone()));
        match page.next_before {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let all: Vec<String> = log.entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(seen, all);
    // The SDK's helper follows the same pages, and stops at its bound.
    let small_pages = AuditQuery {
        limit: Some(2),
        ..Default::default()
    };
    let followed: Vec<String> = tenant
        .owner
        .audit_log_all(&small_pages, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(followed, all);
    let bounded = tenant.owner.audit_log_all(&small_pages, 3).await.unwrap();
    assert_eq!(bounded.len(), 3.min(all.len()));
    let logins = tenant
        .owner
        .audit_log(&AuditQuery {
            action: Some("login.".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(logins.entries.len(), 2);

    // Another tenant sees none of it, and cannot ask for it; a reader without admin scope sees nothing.
    let stranger = app.tenant().await;
    let theirs = stranger.owner.audit_log(&AuditQuery::default()).await.unwrap();
    assert!(
        theirs
            .entries
            .iter()
            .all(|e| e.tenant_id.as_ref() == Some(&stranger.session.tenant.id))
    );
    let peek = stranger
        .owner
        .audit_log(&AuditQuery {
            tenant: Some(tenant.session.tenant.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(peek.code(), Some(ErrorCode::NotFound));
    let reader = app.tenant_with_scopes(&[Scope::BillingRead]).await;
    let denied = reader.client.audit_log(&AuditQuery::default()).await.unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::InsufficientScope));

    // Platform admins see every tenant's entries and the platform's own acts.
    let everything = admin
        .audit_log(&AuditQuery {
            limit: Some(200),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        everything
            .entries
            .iter()
            .any(|e| e.action == "platform_admin.grant" && e.tenant_id.is_none())
    );
    assert!(
        everything
            .entries
            .iter()
            .any(|e| e.tenant_id.as_ref() == Some(&stranger.session.tenant.id))
    );
    let one_tenant = admin
        .audit_log(&AuditQuery {
            tenant: Some(tenant.session.tenant.id.clone()),
            limit: Some(200),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(one_tenant.entries.len(), log.entries.len());
    let bad = admin
        .audit_log(&AuditQuery {
            limit: Some(500),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::ValidationFailed));
}
