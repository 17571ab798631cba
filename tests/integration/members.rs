use plinth_sdk::{AddMemberRequest, ErrorCode, LoginRequest, Role};
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
