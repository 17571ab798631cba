use plinth_sdk::{ErrorCode, LoginRequest, Role, SignupRequest};
use plinth_tests::{PASSWORD, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_creates_a_tenant_on_the_free_plan_with_its_owner_logged_in() {
    let app = TestApp::spawn().await;
    let session = app.signup().await;
    assert!(session.token.starts_with("pls_"));
    assert_eq!(session.role, Role::Owner);
    assert_eq!(session.tenant.plan, "free");
    assert_eq!(session.memberships.len(), 1);

    let owner = app.client().with_token(&session.token);
    let tenant = owner.tenant().await.unwrap();
    assert_eq!(tenant, session.tenant);
    let subscription = owner.subscription().await.unwrap();
    assert_eq!(subscription.plan.id, "free");
    assert!(subscription.current_period_start < subscription.current_period_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_refuses_duplicates_and_weak_input_without_writing_anything() {
    let app = TestApp::spawn().await;
    let session = app.signup().await;
    let client = app.client();
    let again = client
        .signup(&SignupRequest {
            email: session.user.email.to_uppercase(),
            password: PASSWORD.to_owned(),
            tenant_name: "Other".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::EmailTaken));

    for (email, password, tenant_name) in [
        ("not-an-email", PASSWORD, "Acme"),
        ("short@example.com", "short", "Acme"),
        ("noname@example.com", PASSWORD, "   "),
    ] {
        let request = SignupRequest {
            email: email.to_owned(),
            password: password.to_owned(),
            tenant_name: tenant_name.to_owned(),
        };
        let err = client.signup(&request).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ValidationFailed), "{email}");
    }
    // The refused sign-ups left no account behind: the email is still free.
    let ok = SignupRequest {
        email: "short@example.com".to_owned(),
        password: PASSWORD.to_owned(),
        tenant_name: "Acme".to_owned(),
    };
    client.signup(&ok).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_checks_the_password_and_logout_ends_the_session() {
    let app = TestApp::spawn().await;
    let session = app.signup().await;
    let client = app.client();
    let login = |password: &str| LoginRequest {
        email: session.user.email.clone(),
        password: password.to_owned(),
        tenant_id: None,
    };
    let wrong = client.login(&login("wrong password!")).await.unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::InvalidLogin));
    let unknown = client
        .login(&LoginRequest {
            email: "nobody@example.com".to_owned(),
            password: PASSWORD.to_owned(),
            tenant_id: None,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::InvalidLogin));

    let fresh = client.login(&login(PASSWORD)).await.unwrap();
    assert_ne!(fresh.token, session.token);
    assert_eq!(fresh.tenant.id, session.tenant.id);
    let user = app.client().with_token(&fresh.token);
    user.tenant().await.unwrap();
    user.logout().await.unwrap();
    let err = user.tenant().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidCredentials));
    // The first session is unaffected.
    app.client().with_token(&session.token).tenant().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_are_throttled_per_email() {
    let app = TestApp::spawn().await;
    let session = app.signup().await;
    let client = app.client().with_retry(plinth_sdk::RetryPolicy {
        max_retries: 0,
        ..Default::default()
    });
    let guess = LoginRequest {
        email: session.user.email.clone(),
        password: "guess guess guess".to_owned(),
        tenant_id: None,
    };
    let mut codes = Vec::new();
    for _ in 0..11 {
        codes.push(client.login(&guess).await.unwrap_err().code());
    }
    assert!(
        codes[..10]
            .iter()
            .all(|code| *code == Some(ErrorCode::InvalidLogin)),
        "{codes:?}"
    );
    assert_eq!(codes[10], Some(ErrorCode::RateLimited));
}
