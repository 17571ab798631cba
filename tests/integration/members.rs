use plinth_sdk::{AddMemberRequest, AuditQuery, CreateApiKeyRequest, ErrorCode, LoginRequest, Role, Scope};
use plinth_tests::{PASSWORD, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_have_roles_and_the_last_owner_stays() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let bea = app.signup().await;

    let added = acme
        .owner
        .add_member(&AddMemberRequest {
            email: bea.user.email.clone(),
            role: Role::Viewer,
        })
        .await
        .unwrap();
    assert_eq!(added.role, Role::Viewer);
    let again = acme
        .owner
        .add_member(&AddMemberRequest {
            email: bea.user.email.clone(),
            role: Role::Viewer,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::AlreadyMember));
    let nobody = acme
        .owner
        .add_member(&AddMemberRequest {
            email: "nobody@example.com".into(),
            role: Role::Viewer,
        })
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Some(ErrorCode::NotFound));

    // Bea logs into Acme as a viewer: she reads usage but cannot manage keys.
    let login = app
        .client()
        .login(&LoginRequest {
            email: bea.user.email.clone(),
            password: PASSWORD.into(),
            tenant_id: Some(acme.session.tenant.id.clone()),
        })
        .await
        .unwrap();
    assert_eq!(login.role, Role::Viewer);
    assert_eq!(login.memberships.len(), 2);
    let bea_in_acme = app.client().with_token(&login.token);
    bea_in_acme.usage(&Default::default()).await.unwrap();
    assert_eq!(
        bea_in_acme.api_keys().await.unwrap_err().code(),
        Some(ErrorCode::InsufficientScope)
    );

    // An admin key (not an owner) cannot touch ownership.
    let err = acme
        .client
        .update_member(&bea.user.id, Role::Owner)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InsufficientScope));
    // The last owner can be neither demoted nor removed.
    let owner_id = acme.session.user.id.clone();
    assert_eq!(
        acme.owner
            .update_member(&owner_id, Role::Admin)
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::LastOwner)
    );
    assert_eq!(
        acme.owner.remove_member(&owner_id).await.unwrap_err().code(),
        Some(ErrorCode::LastOwner)
    );
    // With a second owner, the first may step down.
    acme.owner.update_member(&bea.user.id, Role::Owner).await.unwrap();
    let demoted = acme
        .owner
        .update_member(&owner_id, Role::Developer)
        .await
        .unwrap();
    assert_eq!(demoted.role, Role::Developer);

    let members = bea_in_acme.members().await.unwrap();
    assert_eq!(members.len(), 2);
    // Bea, now owner, removes the first user, whose session loses access at once.
    bea_in_acme.remove_member(&owner_id).await.unwrap();
    assert_eq!(
        acme.owner.tenant().await.unwrap_err().code(),
        Some(ErrorCode::InvalidCredentials)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_keys_do_not_outlast_their_role_or_their_membership() {
    let app = TestApp::spawn().await;
    let acme = app.tenant().await;
    let bea = app.signup().await;
    acme.owner
        .add_member(&AddMemberRequest {
            email: bea.user.email.clone(),
            role: Role::Admin,
        })
        .await
        .unwrap();
    let login = app
        .client()
        .login(&LoginRequest {
            email: bea.user.email.clone(),
            password: PASSWORD.into(),
            tenant_id: Some(acme.session.tenant.id.clone()),
        })
        .await
        .unwrap();
    let bea_in_acme = app.client().with_token(&login.token);
    let key = |name: &str, scopes: Vec<Scope>| CreateApiKeyRequest {
        name: name.into(),
        scopes: Some(scopes),
        rate_limit_per_minute: None,
        expires_at: None,
    };
    // Bea, an admin, makes an admin key, an inference key, and through the admin key one more.
    let admin_key = bea_in_acme
        .create_api_key(&key("ops", vec![Scope::Admin, Scope::Inference]))
        .await
        .unwrap();
    let inference_key = bea_in_acme
        .create_api_key(&key("backend", vec![Scope::Inference]))
        .await
        .unwrap();
    let made_by_key = app
        .client()
        .with_token(&admin_key.secret)
        .create_api_key(&key("spare", vec![Scope::Admin]))
        .await
        .unwrap();
    // And through the admin key, a key within a developer's scopes: it outlives the demotion that
    // revokes the key that made it, but not Bea's leaving.
    let inference_by_key = app
        .client()
        .with_token(&admin_key.secret)
        .create_api_key(&key("spare-backend", vec![Scope::Inference]))
        .await
        .unwrap();
    let works = |secret: &str| {
        let client = app.client().with_token(secret);
        async move { client.models().await.map(drop).map_err(|err| err.code()) }
    };
    works(&made_by_key.secret).await.unwrap();

    // Demoted to developer: her keys holding more than a developer's scopes stop working at once.
    acme.owner
        .update_member(&bea.user.id, Role::Developer)
        .await
        .unwrap();
    for secret in [&admin_key.secret, &made_by_key.secret] {
        assert_eq!(works(secret).await, Err(Some(ErrorCode::ApiKeyRevoked)));
    }
    works(&inference_key.secret).await.unwrap();
    works(&inference_by_key.secret).await.unwrap();
    // Nor can she, or a key of hers, make an admin key any more.
    assert!(
        bea_in_acme
            .create_api_key(&key("again", vec![Scope::Admin]))
            .await
            .is_err()
    );

    // Removed: none of her keys works, and the log says why each was revoked.
    acme.owner.remove_member(&bea.user.id).await.unwrap();
    for secret in [&inference_key.secret, &inference_by_key.secret] {
        assert_eq!(works(secret).await, Err(Some(ErrorCode::ApiKeyRevoked)));
    }
    let log = acme
        .owner
        .audit_log(&AuditQuery {
            action: Some("api_key.revoke".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut revoked: Vec<(String, String)> = log
        .entries
        .iter()
        .map(|entry| {
            (
                entry.target.clone().unwrap_or_default(),
                entry.detail["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    revoked.sort();
    let mut expected = vec![
        (
            admin_key.key.id.to_string(),
            "its maker's role no longer grants its scopes".to_owned(),
        ),
        (
            made_by_key.key.id.to_string(),
            "its maker's role no longer grants its scopes".to_owned(),
        ),
        (
            inference_key.key.id.to_string(),
            "its maker left the tenant".to_owned(),
        ),
        (
            inference_by_key.key.id.to_string(),
            "its maker left the tenant".to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(revoked, expected);
    // The tenant's own keys, made by its owner, are untouched.
    works(&acme.key.secret).await.unwrap();
}
