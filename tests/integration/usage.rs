//! The usage ledger: one event per billable call, exactly once, under concurrency and across replicas.

use futures_util::future::join_all;
use plinth_sdk::{UsageGrouping, UsageQuery};
use plinth_tests::TestApp;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_idempotency_key_are_billed_once() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;

    // 24 attempts at once: one runs, the others wait for its answer (the SDK retries
    // `409 idempotency_in_flight`) and get it.
    let body = json!({"order": 42});
    let replies = join_all((0..24).map(|_| tenant.client.echo_with_key(&body, "order-42"))).await;
    let replies: Vec<_> = replies.into_iter().map(Result::unwrap).collect();
    let first = &replies[0];
    assert!(replies.iter().all(|reply| reply == first), "one answer for all");
    assert_eq!(
        app.store()
            .usage_event_count(&tenant.session.tenant.id)
            .await
            .unwrap(),
        1
    );

    // A later retry gets the same answer back, marked as a replay.
    let later = app
        .http()
        .post(app.url("/v1/echo"))
        .bearer_auth(&tenant.key.secret)
        .header("Idempotency-Key", "order-42")
        .json(&json!({"order": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        later.status(),
        200,
        "every attempt above ended with the stored answer"
    );
    assert_eq!(later.headers()["idempotent-replayed"], "true");
    let later: plinth_sdk::EchoResponse = later.json().await.unwrap();
    assert_eq!(&later, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_concurrent_calls_each_get_one_event() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let other = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    app.set_plan(&other.session.tenant.id, "enterprise").await;

    // 100 calls from two tenants at once; both tenants reuse the same keys, which are per tenant.
    let calls = (0..50)
        .flat_map(|i| [(tenant.client.clone(), i), (other.client.clone(), i)])
        .map(|(client, i)| async move {
            client
                .echo_with_key(&json!({ "i": i }), &format!("call-{i}"))
                .await
        });
    let replies = join_all(calls).await;
    assert!(
        replies
            .iter()
            .all(|reply| reply.as_ref().is_ok_and(|r| !r.replayed))
    );
    assert_eq!(
        app.store()
            .usage_event_count(&tenant.session.tenant.id)
            .await
            .unwrap(),
        50
    );
    assert_eq!(
        app.store()
            .usage_event_count(&other.session.tenant.id)
            .await
            .unwrap(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_replicas_are_billed_once() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let on_replica = replica.client().with_token(&tenant.key.secret);
    let body = json!({});
    let (a, b) = tokio::join!(
        tenant.client.echo_with_key(&body, "shared"),
        on_replica.echo_with_key(&body, "shared")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "one answer, whichever replica ran it");
    assert_eq!(
        app.store()
            .usage_event_count(&tenant.session.tenant.id)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_reported_by_day_and_by_resource() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    for i in 0..3 {
        tenant.client.echo(&json!({ "i": i })).await.unwrap();
    }
    let by_day = tenant.client.usage(&UsageQuery::default()).await.unwrap();
    assert_eq!(by_day.group_by, UsageGrouping::Day);
    assert_eq!(by_day.rows.len(), 1);
    assert_eq!(
        by_day.rows[0].key,
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );
    assert_eq!((by_day.total.calls, by_day.total.units), (3, 3));

    let by_resource = tenant
        .client
        .usage(&UsageQuery {
            group_by: Some(UsageGrouping::Resource),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_resource.rows.len(), 1);
    assert_eq!(by_resource.rows[0].key, "echo:echo");
    assert_eq!(by_resource.rows[0].calls, 3);
    assert_eq!(by_resource.total.amount_micros.0, 0);

    // A range that excludes today is empty.
    let past = tenant
        .client
        .usage(&UsageQuery {
            from: Some("2020-01-01".into()),
            to: Some("2020-02-01".into()),
            group_by: None,
        })
        .await
        .unwrap();
    assert!(past.rows.is_empty());
    assert_eq!(past.total.calls, 0);
}
