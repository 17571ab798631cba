//! What one tenant sends, uploads or publishes never takes another tenant's calls down: absurd
//! tensors, plugins that hold on to their slot, floods of work. Each test is the attack of THREATS.md;
//! it passes when every other tenant is still served.

use futures_util::StreamExt;
use plinth_tests::{TestApp, TestTenant};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

const DATATYPES: [&str; 6] = ["FP32", "FP16", "INT64", "INT32", "BOOL", "BYTES"];

/// Shapes that ask for terabytes, overflow, or hide a huge dimension behind a zero.
fn absurd_shapes() -> [Value; 4] {
    [
        json!([1, 1_099_511_627_776_i64]),
        json!([0, 1_099_511_627_776_i64]),
        json!([2_147_483_648_i64, 2_147_483_648_i64, 2_147_483_648_i64]),
        json!([i64::MAX, 2]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_tensor_shapes_are_refused_and_the_server_keeps_serving() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let url = app.url("/v2/models/sentiment/infer");
    for datatype in DATATYPES {
        for shape in absurd_shapes() {
            let input = json!({ "name": "input_ids", "datatype": datatype, "shape": shape, "data": [] });
            let as_json = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .json(&json!({ "inputs": [input] }))
                .send()
                .await
                .unwrap();
            assert_eq!(as_json.status(), 400, "{datatype} {shape}");
            let body: Value = as_json.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap_or_default().contains("elements"),
                "{body}"
            );

            // The binary extension: the JSON header claims the shape, no bytes follow.
            let header = json!({ "inputs": [{
                "name": "input_ids", "datatype": datatype, "shape": shape,
                "parameters": { "binary_data_size": 0 },
            }]})
            .to_string();
            let as_binary = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .header("Inference-Header-Content-Length", header.len().to_string())
                .header("Content-Type", "application/octet-stream")
                .body(header)
                .send()
                .await
                .unwrap();
            assert_eq!(as_binary.status(), 400, "binary {datatype} {shape}");
        }
    }
    // Still serving, and nothing was billed for the refusals.
    let answer = tenant
        .client
        .classify("sentiment", &["still here"])
        .await
        .unwrap();
    assert_eq!(answer.results.len(), 1);
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 1);
}

/// Token ids of `shape` (zeros, with a mask of ones) for every input of the platform's sentiment
/// model, in the binary extension: the status and body.
async fn infer_token_ids(app: &TestApp, tenant: &TestTenant, shape: [i64; 2]) -> (u16, Value) {
    let described: Value = app
        .http()
        .get(app.url("/v2/models/sentiment"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let elements = usize::try_from(shape[0] * shape[1]).unwrap();
    let mut inputs = Vec::new();
    let mut bytes = Vec::new();
    for input in described["inputs"].as_array().unwrap() {
        let name = input["name"].as_str().unwrap();
        let value: i64 = i64::from(name == "attention_mask");
        inputs.push(json!({
            "name": name, "datatype": "INT64", "shape": shape,
            "parameters": { "binary_data_size": elements * 8 },
        }));
        bytes.extend(std::iter::repeat_n(value.to_le_bytes(), elements).flatten());
    }
    let header = json!({ "inputs": inputs }).to_string();
    let header_length = header.len();
    let mut body = header.into_bytes();
    body.extend(bytes);
    let response = app
        .http()
        .post(app.url("/v2/models/sentiment/infer"))
        .bearer_auth(&tenant.key.secret)
        .header("Inference-Header-Content-Length", header_length.to_string())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// The platform's graphs run outside the tenants' bounded run memory, and a transformer's attention
/// grows with the square of a row's length: token ids of `[1000, 512]` (12 MB, within the body limit)
/// would ask ONNX Runtime for tens of gigabytes in each layer. A protocol call may cost what a text
/// call may, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_call_to_a_platform_model_costs_no_more_than_its_text_calls() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    // The smallest calls past each bound first: cheap to run, were they not refused.
    for shape in [[257, 4], [1, 513], [17, 512], [1_000, 512]] {
        let (status, body) = infer_token_ids(&app, &tenant, shape).await;
        assert_eq!(
            (status, &body["code"]),
            (400, &json!("invalid_input")),
            "{shape:?}: {body}"
        );
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("at most 256 rows of at most 512 tokens"),
            "{body}"
        );
    }
    // What text calls may cost, and longer rows as long as they cost no more.
    for shape in [[256, 128], [2, 512]] {
        let (status, body) = infer_token_ids(&app, &tenant, shape).await;
        assert_eq!(status, 200, "{shape:?}: {body}");
        assert_eq!(body["outputs"][0]["shape"][0], shape[0], "{body}");
    }
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(
        usage.total.units, 258,
        "only the calls that ran are billed: {usage:?}"
    );
}

/// A raw plugin invocation (the SDK would retry a `429` by itself).
async fn invoke_raw(
    app: &TestApp,
    tenant: &plinth_tests::TestTenant,
    installation: &plinth_sdk::InstallationId,
    request: Value,
) -> (u16, Value) {
    let response = app
        .http()
        .post(app.url(&format!("/v1/installations/{installation}/invoke")))
        .bearer_auth(&tenant.key.secret)
        .json(&request)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").is_some();
    let body: Value = response.json().await.unwrap();
    if status == 429 {
        assert!(retry_after, "a 429 without Retry-After: {body}");
    }
    (status, body)
}

/// Installs the `hostile` plugin, published already, for `tenant`, approving what it asks for.
async fn install_hostile(tenant: &TestTenant) -> plinth_sdk::Installation {
    let (manifest, _) = plinth_tests::built_plugin("hostile");
    tenant
        .owner
        .install_plugin(&plinth_sdk::InstallRequest {
            plugin: "hostile".into(),
            version: None,
            approve_capabilities: manifest.capabilities,
            approve_models: manifest.models,
            settings: serde_json::Map::default(),
            secrets: std::collections::BTreeMap::default(),
            record_failures: false,
        })
        .await
        .unwrap()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// The deadline of the calls below: long beside what answering takes on a busy machine, so that
/// what must happen while sleepers hold their instances does.
const SLEEPERS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_waiting_in_the_host_is_stopped_at_its_deadline_and_its_tenant_cannot_hold_every_instance() {
    let deadline = SLEEPERS_DEADLINE;
    let app = TestApp::spawn_with(|config| {
        config.plugin_deadline_ms = u64::try_from(deadline.as_millis()).unwrap();
    })
    .await;
    let author = app.tenant().await;
    // Both on the free plan: two plugin instances at once, one per installation.
    let hoarder = app.tenant().await;
    let neighbour = app.tenant().await;
    let hoarded = app.install_plugin(&author, &hoarder, "hostile", json!({})).await;
    let served = install_hostile(&neighbour).await;

    // Two calls of the installation whose guest sleeps for a minute in a WASI poll, sent together:
    // whichever comes first takes the installation's one instance, and the deadline still holds; the
    // other is refused at once...
    let started = std::time::Instant::now();
    let sleep = {
        let (app, hoarder, id) = (&app, &hoarder, &hoarded.id);
        move || async move {
            let (status, body) = invoke_raw(app, hoarder, id, json!({ "do": "sleep" })).await;
            (status, body, started.elapsed())
        }
    };
    let mut sleepers = futures_util::stream::FuturesUnordered::from_iter([sleep(), sleep()]);
    let (status, body, refused_at) = sleepers.next().await.unwrap();
    assert_eq!(
        (status, code(&body)),
        (429, "plugin_concurrency_exceeded"),
        "{body}"
    );
    assert!(refused_at < deadline, "refused only after {refused_at:?}");
    // ...while another tenant's plugin calls go through.
    for n in 0..3 {
        let (status, body) = invoke_raw(&app, &neighbour, &served.id, json!({ "do": "echo", "n": n })).await;
        assert_eq!((status, &body["n"]), (200, &json!(n)), "{body}");
    }
    assert!(
        started.elapsed() < deadline,
        "another tenant's calls were served only after {:?}",
        started.elapsed()
    );
    let (status, body, stopped_at) = sleepers.next().await.unwrap();
    assert_eq!((status, code(&body)), (504, "plugin_timeout"), "{body}");
    assert!(
        stopped_at >= deadline && stopped_at < deadline + std::time::Duration::from_secs(6),
        "stopped after {stopped_at:?}"
    );
    // The slot came back with the deadline.
    let (status, body) = invoke_raw(&app, &hoarder, &hoarded.id, json!({ "do": "echo" })).await;
    assert_eq!(status, 200, "{body}");
}

/// `size` free accounts with an installation of the hostile plugin each (a new author publishes it),
/// and a tenant on the pro plan with one too.
async fn free_crowd_and_a_paying_tenant(
    app: &TestApp,
    size: usize,
) -> (
    Vec<(plinth_sdk::Installation, TestTenant)>,
    (plinth_sdk::Installation, TestTenant),
) {
    let author = app.tenant().await;
    let first = app.tenant().await;
    let mut crowd = vec![(
        app.install_plugin(&author, &first, "hostile", json!({})).await,
        first,
    )];
    for _ in 1..size {
        let tenant = app.tenant().await;
        crowd.push((install_hostile(&tenant).await, tenant));
    }
    let paying = app.tenant().await;
    app.set_plan(&paying.session.tenant.id, "pro").await;
    (crowd, (install_hostile(&paying).await, paying))
}

/// Signups are free: a crowd of free accounts, each within its own plugin limit, could hold every
/// instance of the server until the deadline, again and again. The tenants without a paid plan run at
/// most three quarters of the instances together, so a paying tenant's plugin still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_accounts_together_leave_a_quarter_of_the_plugin_instances_to_paying_tenants() {
    let deadline = SLEEPERS_DEADLINE;
    let app = TestApp::spawn_with(|config| {
        config.plugin_deadline_ms = u64::try_from(deadline.as_millis()).unwrap();
        config.plugin_instances = 4;
    })
    .await;
    // Four free accounts, each with an installation of its own (one instance each, within its limit).
    let (crowd, (paid, paying)) = free_crowd_and_a_paying_tenant(&app, 4).await;

    // All four sleep in the host, sent together: three take three quarters of the server's four
    // instances, the share of the tenants without a paid plan, and the fourth, within its own
    // limit, is refused at once...
    let started = std::time::Instant::now();
    let app = &app;
    let mut sleepers = crowd
        .iter()
        .map(|(installed, tenant)| async move {
            let (status, body) = invoke_raw(app, tenant, &installed.id, json!({ "do": "sleep" })).await;
            (status, body, started.elapsed())
        })
        .collect::<futures_util::stream::FuturesUnordered<_>>();
    let (status, body, refused_at) = sleepers.next().await.unwrap();
    assert_eq!(
        (status, code(&body)),
        (429, "plugin_concurrency_exceeded"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the tenants without a paid plan together"),
        "{body}"
    );
    assert!(refused_at < deadline, "refused only after {refused_at:?}");
    // ...while a paying tenant's plugin runs.
    let (status, body) = invoke_raw(app, &paying, &paid.id, json!({ "do": "echo", "n": 7 })).await;
    assert_eq!((status, &body["n"]), (200, &json!(7)), "{body}");
    assert!(
        started.elapsed() < deadline,
        "served only after {:?}, once the sleepers had gone",
        started.elapsed()
    );
    for _ in 0..3 {
        let (status, body, _) = sleepers.next().await.unwrap();
        assert_eq!((status, code(&body)), (504, "plugin_timeout"), "{body}");
    }
    // Their instances came back with the deadline: every one of the crowd runs again.
    for (installed, tenant) in &crowd {
        let (status, body) = invoke_raw(app, tenant, &installed.id, json!({ "do": "echo" })).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The tenants computing on one set of threads take turns on it: a crowd of free accounts looping
/// until their deadline, each within its limits, would leave a paying tenant's plugin a seventeenth
/// of those threads and push its compute past the deadline. Paying tenants' guest code has threads
/// of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_free_accounts_looping_leaves_a_paying_tenants_plugin_its_threads() {
    const CROWD: usize = 16;
    let deadline = SLEEPERS_DEADLINE;
    let app = TestApp::spawn_with(|config| {
        config.plugin_deadline_ms = u64::try_from(deadline.as_millis()).unwrap();
        config.plugin_instances = 24;
        config.plugin_threads = 1;
    })
    .await;
    let (crowd, (paid, paying)) = free_crowd_and_a_paying_tenant(&app, CROWD).await;

    // Compute that takes about a sixth of the deadline alone: a seventeenth of a thread, its turn
    // among the crowd's loops, would need well past the deadline for it.
    let counted = count_taking(&app, &paying, &paid.id, deadline / 6).await;
    let loops = crowd
        .iter()
        .map(|(installed, tenant)| (tenant, &installed.id, "loop"))
        .collect();
    count_beside(&app, (&paying, &paid.id), counted, loops).await;
}

/// Counts to `n` (about `alone` alone) as `counter`, beside `hogs` (each a tenant, its installation
/// and what its guest does until the deadline): the count must end in time, and every hog be
/// stopped at its deadline.
async fn count_beside(
    app: &TestApp,
    (counter, counting): (&TestTenant, &plinth_sdk::InstallationId),
    (n, alone): (u64, std::time::Duration),
    hogs: Vec<(&TestTenant, &plinth_sdk::InstallationId, &str)>,
) {
    let hogging = futures_util::future::join_all(
        hogs.iter()
            .map(|(hog, installation, work)| invoke_raw(app, hog, installation, json!({ "do": work }))),
    );
    let beside = async {
        // Under way: every one of them holds its instance until the deadline.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        let answer = invoke_raw(app, counter, counting, json!({ "do": "count", "n": n })).await;
        (answer, started.elapsed())
    };
    let (hogged, ((status, body), took)) = tokio::join!(hogging, beside);
    let work = hogs.first().map_or("", |(_, _, work)| *work);
    assert_eq!(
        (status, &body["counted"]),
        (200, &json!(n)),
        "beside {} guests that {work}: {body} after {took:?} (alone {alone:?})",
        hogs.len()
    );
    for (status, body) in hogged {
        assert_eq!((status, code(&body)), (504, "plugin_timeout"), "{body}");
    }
}

/// How far the hostile plugin counts in about `about` alone, and how long that took.
async fn count_taking(
    app: &TestApp,
    tenant: &TestTenant,
    installation: &plinth_sdk::InstallationId,
    about: std::time::Duration,
) -> (u64, std::time::Duration) {
    let count = async |n: u64| {
        let started = std::time::Instant::now();
        let (status, body) = invoke_raw(app, tenant, installation, json!({ "do": "count", "n": n })).await;
        assert_eq!((status, &body["counted"]), (200, &json!(n)), "{body}");
        started.elapsed()
    };
    // Timed on calls after the first, which also compiles the component.
    let (status, body) = invoke_raw(app, tenant, installation, json!({ "do": "echo" })).await;
    assert_eq!(status, 200, "{body}");
    let probe: u64 = 100_000_000;
    // The quicker of two: a machine busy for one of them would make the count too small to tell.
    let took = count(probe).await.min(count(probe).await);
    let n = u64::try_from(u128::from(probe) * about.as_nanos() / took.as_nanos().max(1)).unwrap();
    (n, count(n).await)
}

/// Busy guests on one set of threads would take turns every epoch tick, so a tenant's share of the
/// threads would be its share of the busy guests: a paying tenant looping in every instance its plan
/// lets an installation run would leave another paying tenant's plugin a seventh of them and push
/// it past its deadline. The tenants take turns instead, each with its share. And a tenant whose
/// guests wait in the host, for long or a little under a tick again and again, holds no thread:
/// they leave the other tenant's plugin all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_looping_or_sleeping_in_many_instances_leaves_another_tenant_its_share_of_the_threads() {
    // The pro plan's 8 instances, three quarters of them for one installation.
    const GUESTS: usize = 6;
    let deadline = SLEEPERS_DEADLINE;
    let app = TestApp::spawn_with(|config| {
        config.plugin_deadline_ms = u64::try_from(deadline.as_millis()).unwrap();
        config.plugin_instances = 24;
        config.plugin_threads = 1;
    })
    .await;
    let (author, hog, other) = (app.tenant().await, app.tenant().await, app.tenant().await);
    for tenant in [&hog, &other] {
        app.set_plan(&tenant.session.tenant.id, "pro").await;
        app.lift_rate_limits(&tenant.session.tenant.id).await;
    }
    let hogging = app.install_plugin(&author, &hog, "hostile", json!({})).await;
    let counting = install_hostile(&other).await;

    // A quarter of the deadline alone: half the thread takes half of it, a seventh of it (beside
    // six loops, all ready every tick) well past it, and none (beside six guests holding the thread
    // while they sleep) all of it.
    let counted = count_taking(&app, &other, &counting.id, deadline / 4).await;
    for work in ["loop", "sleep", "naps"] {
        let hogs = (0..GUESTS).map(|_| (&hog, &hogging.id, work)).collect();
        count_beside(&app, (&other, &counting.id), counted, hogs).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_refuses_a_component_that_crashes_on_every_request_and_limits_submissions() {
    let app = TestApp::spawn_with(plinth_tests::production_limits).await;
    let author = app.tenant().await;
    let (manifest, component) = plinth_tests::built_plugin("crasher");
    author.owner.create_plugin("crasher", "").await.unwrap();
    let err = author
        .owner
        .publish_plugin_version(&manifest, component.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::InvalidPlugin), "{err:?}");
    assert!(err.to_string().contains("the smoke run failed"), "{err}");
    assert!(author.owner.plugin("crasher").await.unwrap().versions.is_empty());

    // Every submission costs a compilation and a run: an author gets two a minute, then 429.
    let submit = || {
        let form = reqwest::multipart::Form::new()
            .part(
                "manifest",
                reqwest::multipart::Part::bytes(serde_json::to_vec(&manifest).unwrap()),
            )
            .part("component", reqwest::multipart::Part::bytes(component.clone()));
        app.http()
            .post(app.url("/v1/plugins/crasher/versions"))
            .bearer_auth(&author.session.token)
            .multipart(form)
            .send()
    };
    assert_eq!(submit().await.unwrap().status(), 422);
    let limited = submit().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
}

/// A component part that arrives slowly: 16 MiB at once (more than the sockets between client and
/// server hold, so the server has begun reading the body once the stream is asked for more, and
/// `began` says so), then a byte a second (within the pause allowed) until `released`.
fn held_back(
    began: tokio::sync::oneshot::Sender<()>,
    released: tokio::sync::watch::Receiver<bool>,
) -> reqwest::Body {
    let stream = futures_util::stream::unfold(
        (Some(began), released, true),
        |(began, mut released, first)| async move {
            if first {
                return Some((
                    Ok::<_, std::io::Error>(vec![0_u8; 16 << 20]),
                    (began, released, false),
                ));
            }
            if let Some(began) = began {
                let _ = began.send(());
            }
            if *released.borrow() {
                return None;
            }
            tokio::select! {
                _ = released.changed() => None,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => Some((Ok(vec![0_u8]), (None, released, false))),
            }
        },
    );
    reqwest::Body::wrap_stream(stream)
}

/// Each submission is held in memory while it is checked: one of an author's at a time, the next
/// refused at once, before its body is read. And a body still arriving holds no slot of the
/// replica's four to check submissions in, so slow senders cannot stop others publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_submission_of_an_authors_at_a_time_and_a_body_still_arriving_holds_no_slot() {
    let app = TestApp::spawn().await;
    let (manifest, component) = plinth_tests::built_plugin("crasher");
    // Five authors, four of whose components are held back.
    let mut stalled = Vec::new();
    // One more author than the slots a replica checks submissions in (four).
    for n in 0..=4 {
        let other = app.tenant().await;
        let name = format!("crasher-{n}");
        other.owner.create_plugin(&name, "").await.unwrap();
        let mut renamed = manifest.clone();
        renamed.name.clone_from(&name);
        stalled.push((other, name, renamed));
    }
    let submit = |(other, name, renamed): &(TestTenant, String, plinth_sdk::PluginManifest),
                  component: Option<reqwest::multipart::Part>| {
        let mut form = reqwest::multipart::Form::new().part(
            "manifest",
            reqwest::multipart::Part::bytes(serde_json::to_vec(renamed).unwrap()),
        );
        if let Some(component) = component {
            form = form.part("component", component);
        }
        app.http()
            .post(app.url(&format!("/v1/plugins/{name}/versions")))
            .bearer_auth(&other.session.token)
            .multipart(form)
            .send()
    };
    let (release, released) = tokio::sync::watch::channel(false);
    let mut arriving = Vec::new();
    let mut begun = Vec::new();
    for author in &stalled[1..] {
        let (began, has_begun) = tokio::sync::oneshot::channel();
        begun.push(has_begun);
        let part = reqwest::multipart::Part::stream(held_back(began, released.clone()));
        arriving.push(submit(author, Some(part)));
    }
    let arriving = futures_util::future::join_all(arriving);
    let meanwhile = async {
        for has_begun in begun {
            has_begun.await.unwrap();
        }
        // The server reads each of the four: each holds its author's turn.
        let refused = submit(&stalled[1], None).await.unwrap();
        assert_eq!(refused.status(), 429);
        assert!(refused.headers().contains_key("retry-after"));
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("another of your submissions"),
            "{body}"
        );
        // Four bodies still arriving; the fifth author's whole submission is checked at once.
        let checked = submit(
            &stalled[0],
            Some(reqwest::multipart::Part::bytes(component.clone())),
        )
        .await
        .unwrap();
        release.send(true).unwrap();
        checked
    };
    let (arrived, checked) = tokio::join!(arriving, meanwhile);
    assert_eq!(checked.status(), 422, "the crasher fails its checks");
    // Arrived together, the four are checked, but for one that may find the three slots of the
    // replica's four that authors without a paid subscription share taken.
    let mut unavailable = 0;
    for answer in arrived {
        let answer = answer.unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap();
        match (status.as_u16(), code(&body)) {
            (422, "invalid_plugin") => {}
            (503, "unavailable") => unavailable += 1,
            _ => panic!("{status}: {body}"),
        }
    }
    assert!(unavailable <= 1, "{unavailable} of the four refused a slot");
    // A body the multipart parser cannot split (no boundary, no line) is held to the submission's
    // bounds as it arrives, not buffered whole by the parser until it ends.
    let (author, name, _) = &stalled[1];
    let unsplittable = app
        .http()
        .post(app.url(&format!("/v1/plugins/{name}/versions")))
        .bearer_auth(&author.session.token)
        .header("Content-Type", "multipart/form-data; boundary=never-sent")
        .body(vec![b'x'; 40 << 20])
        .send()
        .await;
    // The server may answer before it has read the rest, and close the connection under it.
    if let Ok(answer) = unsplittable {
        let status = answer.status();
        let body: Value = answer.json().await.unwrap_or_default();
        assert_eq!(
            (status.as_u16(), code(&body)),
            (413, "payload_too_large"),
            "{body}"
        );
    }
}

/// A body of `head` and then 8 MiB of `a`s, that then stops arriving without ending: the server
/// can answer only by refusing it as it arrives (or after the pause it allows, 15 s).
fn unending(head: &str) -> reqwest::Body {
    let chunks =
        std::iter::once(head.as_bytes().to_vec()).chain(std::iter::repeat_n(vec![b'a'; 64 << 10], 128));
    let stalled = futures_util::stream::once(std::future::pending::<Vec<u8>>());
    reqwest::Body::wrap_stream(
        futures_util::stream::iter(chunks)
            .chain(stalled)
            .map(Ok::<_, std::io::Error>),
    )
}

/// The multipart parser keeps whatever it has read but not matched, without a bound of its own:
/// a body that never sends its boundary, a part's headers that never end, or a line after a part
/// that never ends used to be buffered whole (a model upload may be gigabytes, so a bound on the
/// whole body does not help). Every route that takes a multipart body, API and portal, refuses
/// each of them as it arrives, and a body that stops arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_body_the_parser_cannot_split_is_refused_as_it_arrives() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let cookie = crate::portal::portal_signup(&app).await;
    let csrf = crate::portal::portal_csrf(&app, &cookie).await;
    let origin = app.url("");
    let origin = origin.trim_end_matches('/');
    // Each route, and a part it reads.
    let routes = [
        ("/v1/models".to_owned(), "manifest", false),
        ("/v1/datasets".to_owned(), "name", false),
        ("/v1/plugins/anything/versions".to_owned(), "manifest", false),
        (format!("/portal/models?csrf={csrf}"), "manifest", true),
        (format!("/portal/training/datasets?csrf={csrf}"), "name", true),
        (
            format!("/portal/author/plugins/anything/versions?csrf={csrf}"),
            "manifest",
            true,
        ),
    ];
    for (path, part, portal) in &routes {
        let unsplittable = [
            ("no boundary", String::new()),
            (
                "headers without end",
                format!("--bound\r\nContent-Disposition: form-data; name=\"{part}\"\r\nX-Pad: "),
            ),
            (
                "a line after a part without end",
                format!(
                    "--bound\r\nContent-Disposition: form-data; name=\"{part}\"\r\nContent-Length: 2\r\n\r\n{{}}"
                ),
            ),
        ];
        for (attack, head) in unsplittable {
            let request = app
                .http()
                .post(app.url(path))
                .header("Content-Type", "multipart/form-data; boundary=bound")
                .body(unending(&head));
            let request = if *portal {
                request.header("Cookie", &cookie).header("Origin", origin)
            } else {
                request.bearer_auth(&tenant.session.token)
            };
            let answer = request.send().await.unwrap();
            let status = answer.status();
            let body = answer.text().await.unwrap();
            assert_eq!(status, 413, "{path}, {attack}: {body}");
            // Refused for what the parser holds, long before the route's bound on the whole body.
            assert!(body.contains("outside its parts"), "{path}, {attack}: {body}");
            if !*portal {
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(code(&body), "payload_too_large", "{path}, {attack}: {body}");
            }
        }
    }
    // Honest contents that look like boundaries are given back as they come, however the server
    // reads them: a CRLF dataset each of whose lines starts `--`.
    let mut csv = String::from("text,label\r\n");
    for line in 0.. {
        if csv.len() > 4 << 20 {
            break;
        }
        let label = if line % 2 == 0 { "up" } else { "down" };
        csv.push_str(&format!("--item {line} {}--,{label}\r\n", "x".repeat(100)));
    }
    let form = Form::new().part("file", Part::bytes(csv.into_bytes()).file_name("dashes.csv"));
    let answer = app
        .http()
        .post(app.url("/v1/datasets"))
        .bearer_auth(&tenant.session.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    let body: Value = answer.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "dashes");

    // A body that stops arriving is let go once it has paused for 15 s.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let head = "--bound\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.onnx\"\r\n\r\nonnx";
    let stalled = futures_util::stream::once(
        async move { Ok::<_, std::io::Error>(head.as_bytes().to_vec()) },
    )
    .chain(futures_util::stream::once(async move {
        let _ = stopped.await;
        Ok(Vec::new())
    }));
    let began = std::time::Instant::now();
    let answer = app
        .http()
        .post(app.url("/v1/models"))
        .header("Content-Type", "multipart/form-data; boundary=bound")
        .bearer_auth(&tenant.session.token)
        .body(reqwest::Body::wrap_stream(stalled))
        .send();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(60), answer)
        .await
        .expect("let go after its pause, not held")
        .unwrap();
    let status = answer.status();
    let body: Value = answer.json().await.unwrap();
    assert_eq!((status.as_u16(), code(&body)), (408, "request_timeout"), "{body}");
    assert!(began.elapsed() >= std::time::Duration::from_secs(15));
    drop(stop);
    // The tenant's turn to upload came back with the answer.
    let form = Form::new().part(
        "manifest",
        Part::bytes(br#"{"name":"m","task":"text-classification"}"#.to_vec()),
    );
    let answer = app
        .http()
        .post(app.url("/v1/models"))
        .bearer_auth(&tenant.session.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 422, "the `model` part is missing");
}

/// A model file from `tests/fixtures/make_models.py` (scripts/test.sh builds them).
fn fixture(file: &str) -> Vec<u8> {
    let path = plinth_server::config::cache_dir().join("test-models").join(file);
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err} (scripts/test.sh builds it)", path.display()))
}

/// Uploads `model` as `manifest` describes: the status and body. Retries while the answer is `503
/// overloaded`, as a client should: tests beside this one may hold the run memory tenants' models
/// share, and an upload's warm-up does not wait for it.
async fn upload(app: &TestApp, tenant: &TestTenant, model: Vec<u8>, manifest: Value) -> (u16, Value) {
    let tokenizer = manifest["task"] != "raw";
    for _ in 0..20 {
        let form = crate::models::form(model.clone(), &manifest, tokenizer);
        let (status, body) = crate::models::upload(app, tenant, form).await;
        if (status, code(&body)) != (503, "overloaded") {
            return (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    panic!("the upload of {manifest} was overloaded for ten seconds");
}

/// `DELETE path` as `who`: the status.
async fn delete(app: &TestApp, who: &TestTenant, path: &str) -> u16 {
    app.http()
        .delete(app.url(path))
        .bearer_auth(&who.key.secret)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_answers_the_wrong_rows_fails_that_call_and_keeps_serving() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let manifest = json!({ "name": "one-row", "task": "text-classification", "labels": ["no", "yes"] });
    let (status, body) = upload(&app, &tenant, fixture("one-row.onnx"), manifest).await;
    assert_eq!(status, 201, "{body}");
    // Two texts, one row of answer: refused as the model's fault, where it once crashed the worker.
    let err = tenant
        .client
        .classify("one-row", &["first", "second"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::InvalidModel), "{err:?}");
    assert!(err.to_string().contains("shape"), "{err}");
    for _ in 0..3 {
        let answer = tenant.client.classify("one-row", &["alone"]).await.unwrap();
        assert_eq!(answer.results[0].label, "yes");
    }
    let ready = app
        .http()
        .get(app.url("/v2/models/one-row/ready"))
        .bearer_auth(&tenant.key.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

/// A square FP32 input of side `n` for the slow model, in the binary extension.
async fn run_slow(app: &TestApp, tenant: &TestTenant, n: usize) -> (u16, String) {
    let header = json!({ "inputs": [{
        "name": "x", "datatype": "FP32", "shape": [n, n],
        "parameters": { "binary_data_size": n * n * 4 },
    }]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(std::iter::repeat_n(0u8, n * n * 4));
    let response = app
        .http()
        .post(app.url("/v2/models/slow/infer"))
        .bearer_auth(&tenant.key.secret)
        .header("Inference-Header-Content-Length", header.len().to_string())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_times_out_is_terminated_and_the_model_serves_the_next_call() {
    let app = TestApp::spawn_with(|config| config.inference_timeout_ms = 2_000).await;
    let tenant = app.tenant().await;
    // A batch of 1,024 rows is 1,024 units: past the free plan's included calls.
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    accepted(
        &app,
        &tenant,
        "slow.onnx",
        json!({ "name": "slow", "task": "raw" }),
    )
    .await;
    // 400 multiplications of 1024 x 1024 matrices: far longer than the two seconds the caller waits.
    let (status, body) = run_slow(&app, &tenant, 1_024).await;
    assert_eq!(status, 504, "{body}");
    // The model has one session: the next call is served within its own two seconds only if the
    // abandoned run was stopped (it would have tens of seconds left).
    let (status, body) = run_slow(&app, &tenant, 4).await;
    assert_eq!(status, 200, "{body}");
}

/// `POST /v2/models/{model}/infer` with a JSON `request`: the status and body.
async fn infer(app: &TestApp, tenant: &TestTenant, model: &str, request: Value) -> (u16, Value) {
    let response = app
        .http()
        .post(app.url(&format!("/v2/models/{model}/infer")))
        .bearer_auth(&tenant.key.secret)
        .json(&request)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The hungry model's `output` for a tensor of ones of `shape`, which its graph allocates: the status
/// and body.
async fn run_hungry(app: &TestApp, tenant: &TestTenant, shape: [i64; 2], output: &str) -> (u16, Value) {
    let request = json!({
        "inputs": [{ "name": "shape", "datatype": "INT64", "shape": [2], "data": shape }],
        "outputs": [{ "name": output }],
    });
    infer(app, tenant, "hungry", request).await
}

/// Uploads `file` as the model `manifest` describes, which must be accepted.
async fn accepted(app: &TestApp, tenant: &TestTenant, file: &str, manifest: Value) {
    let (status, body) = upload(app, tenant, fixture(file), manifest).await;
    assert_eq!(status, 201, "{body}");
}

/// Uploads `file` as the model `manifest` describes, which must be refused as an invalid model: the
/// message.
async fn refused(app: &TestApp, tenant: &TestTenant, file: &str, manifest: Value) -> String {
    let (status, body) = upload(app, tenant, fixture(file), manifest).await;
    assert_eq!((status, code(&body)), (422, "invalid_model"), "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// The tests that take most of the run memory tenants' models share, one at a time: the arena is
/// one per process, and each of them asserts what a run finds in it.
static MOST_OF_THE_RUN_MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_asking_for_more_memory_than_tenants_may_use_fails_its_call_and_the_server_keeps_serving() {
    let _alone = MOST_OF_THE_RUN_MEMORY.lock().await;
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let other = app.tenant().await;
    // Room for the three models below.
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    accepted(
        &app,
        &tenant,
        "hungry.onnx",
        json!({ "name": "hungry", "task": "raw" }),
    )
    .await;
    let (status, body) = run_hungry(&app, &tenant, [1_000, 1_000], "total").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([1_000_000.0]), "{body}");

    // 1 GiB of ones, twice what tenants' graphs may take at once in the test servers: refused by
    // that bound (any machine could allocate it). Without one, a graph takes whatever it asks for,
    // and a little more than the machine has gets the server killed.
    let asked = 2 * i64::try_from(plinth_tests::TENANT_RUN_MEMORY_MIB).unwrap();
    let (status, body) = run_hungry(&app, &tenant, [asked, 256 * 1024], "total").await;
    // The protocol's error shape: the message under `error`, the code beside it.
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_input")),
        "{body}"
    );
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("more memory than"), "{body}");
    assert!(
        !message.contains("onnxruntime"),
        "the runtime's source paths are not the caller's business: {body}"
    );

    // The model still serves, 256 MiB is still there to take, and so does everything else.
    let (status, body) = run_hungry(&app, &tenant, [8_192, 8_192], "total").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([67_108_864.0]), "{body}");
    // 32 Mi ones (128 MiB) fit the bound, but copied out and written as JSON each takes tens of
    // bytes: a graph answers no more elements than a call may send.
    let (status, body) = run_hungry(&app, &tenant, [4_096, 8_192], "ones").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_input")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("at most 16777216 are sent back"),
        "{body}"
    );
    // As JSON an element takes tens of bytes more while the answer is built: past a million, an
    // answer goes back only in binary (four bytes an element here), and the call is not billed.
    let billed = async || {
        app.store()
            .usage_event_count(&tenant.session.tenant.id)
            .await
            .unwrap()
    };
    let calls = billed().await;
    let (status, body) = run_hungry(&app, &tenant, [1_024, 1_025], "ones").await;
    // (Not the body: answered, it is a million numbers.)
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_input")),
        "{}",
        body["error"]
    );
    assert!(
        body["error"].as_str().unwrap().contains("binary_data_output"),
        "{body}"
    );
    assert_eq!(billed().await, calls);
    let request = json!({
        "inputs": [{ "name": "shape", "datatype": "INT64", "shape": [2], "data": [1_024, 1_025] }],
        "outputs": [{ "name": "ones" }],
        "parameters": { "binary_data_output": true },
    });
    let response = app
        .http()
        .post(app.url("/v2/models/hungry/infer"))
        .bearer_auth(&tenant.key.secret)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let header: usize = response.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(response.bytes().await.unwrap().len() - header, 1_024 * 1_025 * 4);
    let answer = other.client.classify("sentiment", &["still here"]).await.unwrap();
    assert_eq!(answer.results.len(), 1);
    // Constant folding would compute a constant part of the graph while the session is built, with
    // the runtime's own allocator: for this one, 576 MB at upload. Not folded, it is computed in the
    // run, within the bound.
    accepted(
        &app,
        &tenant,
        "folds.onnx",
        json!({ "name": "folds", "task": "raw" }),
    )
    .await;
    let x = json!({ "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1], "data": [1.0] }] });
    let (status, body) = infer(&app, &tenant, "folds", x).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("more memory than"),
        "{body}"
    );

    // A text model's answer is copied out for each text too: one 20 million numbers wide for each is
    // refused at its warm-up.
    let manifest = json!({ "name": "wide", "task": "text-classification", "labels": ["no", "yes"] });
    let message = refused(&app, &tenant, "wide.onnx", manifest).await;
    assert!(message.contains("are sent back"), "{message}");
    // An embedding model 8,192 numbers wide: 100 texts' embeddings (819,200 numbers) go back as
    // JSON, 200 texts' (1,638,400) do not, and that call is not billed.
    accepted(
        &app,
        &tenant,
        "broad.onnx",
        json!({ "name": "broad", "task": "embedding" }),
    )
    .await;
    let texts = vec!["x"; 200];
    let calls = billed().await;
    let err = tenant.client.embed("broad", &texts).await.unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::InvalidInput), "{err:?}");
    assert!(err.to_string().contains("send fewer texts"), "{err}");
    assert_eq!(billed().await, calls);
    let answer = tenant.client.embed("broad", &texts[..100]).await.unwrap();
    assert_eq!((answer.embeddings.len(), answer.dimensions), (100, 8_192));

    // Strings' characters are outside that bound: a graph that could repeat a long one is refused.
    let manifest = json!({ "name": "repeats-text", "task": "raw" });
    let message = refused(&app, &tenant, "repeats-text.onnx", manifest).await;
    assert!(message.contains("text"), "{message}");
    // Only the served calls are billed: two sums, the answer sent back in binary, and the embeddings.
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 4);
}

/// Sums the holds model makes of its tensor in the run that holds most of the run memory: a few
/// seconds (a sum of 400 MiB takes tens of milliseconds).
const HOLDING_SUMS: i64 = 100;

/// The holds model's sum of a tensor of ones of `shape`, summed `times` over while its graph holds
/// the tensor: the status and body.
async fn run_holds(app: &TestApp, tenant: &TestTenant, shape: [i64; 2], times: i64) -> (u16, Value) {
    let request = json!({
        "inputs": [
            { "name": "shape", "datatype": "INT64", "shape": [2], "data": shape },
            { "name": "times", "datatype": "INT64", "shape": [], "data": [times] },
        ],
    });
    infer(app, tenant, "holds", request).await
}

/// Tenants' graphs share the run memory. One tenant's run holding most of it makes another tenant's
/// run that needs more than is left wait for it to end, then run: it does not fail that tenant's call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_holding_most_of_the_run_memory_delays_another_tenants_run_but_does_not_fail_it() {
    let _alone = MOST_OF_THE_RUN_MEMORY.lock().await;
    let app = TestApp::spawn().await;
    let (holder, other) = (app.tenant().await, app.tenant().await);
    for tenant in [&holder, &other] {
        accepted(
            &app,
            tenant,
            "holds.onnx",
            json!({ "name": "holds", "task": "raw" }),
        )
        .await;
    }
    let mib = |n: i64| [n * 256, 1_024];
    let memory = i64::try_from(plinth_tests::TENANT_RUN_MEMORY_MIB).unwrap();
    // Four fifths of the run memory, held for many sums of it (seconds).
    let held = mib(memory * 4 / 5);
    let waits = counter(&app, "plinth_inference_arena_waits_total").await;
    let holding = async {
        let answer = run_holds(&app, &holder, held, HOLDING_SUMS).await;
        (answer, std::time::Instant::now())
    };
    let started = async {
        // The holder's run is counted as it starts, before its graph allocates anything.
        let executions = async || {
            let response = app
                .http()
                .get(app.url("/v2/models/holds/stats"))
                .bearer_auth(&holder.key.secret)
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()["execution_count"]
                .as_u64()
                .unwrap()
        };
        let waiting = std::time::Instant::now();
        while executions().await == 0 {
            assert!(
                waiting.elapsed() < std::time::Duration::from_secs(20),
                "the holder's run never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Time for its `ConstantOfShape` (about what one sum takes).
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // Two fifths: room alone, not beside the holder's run.
        let answer = run_holds(&app, &other, mib(memory * 2 / 5), 1).await;
        (answer, std::time::Instant::now())
    };
    let (((status, body), held_until), ((other_status, other_body), answered)) =
        tokio::join!(holding, started);
    let sum = |body: &Value| body["outputs"][0]["data"][0].as_f64();
    let ones = |[rows, columns]: [i64; 2]| Some(f64::from(u32::try_from(rows * columns).unwrap()));
    assert_eq!(other_status, 200, "{other_body}");
    assert_eq!(sum(&other_body), ones(mib(memory * 2 / 5)), "{other_body}");
    assert_eq!(status, 200, "{body}");
    assert_eq!(sum(&body), ones(held), "{body}");
    // The other tenant's run met the holder's, and waited for it to end: its answer (a run of 200
    // MiB, a tenth of a second or more) came after the holder's, give or take the two answers'
    // ways back.
    assert!(counter(&app, "plinth_inference_arena_waits_total").await > waits);
    assert!(
        answered + std::time::Duration::from_millis(100) >= held_until,
        "answered {:?} before the holder",
        held_until.saturating_duration_since(answered)
    );
}

/// A plan with room for two models, two versions each, and two and a half copies of `file`.
async fn small_quota_plan(app: &TestApp, tenant: &TestTenant, file_bytes: u64) {
    let plan = plinth_sdk::Plan {
        id: "tiny-models".to_owned(),
        name: "Tiny models".to_owned(),
        currency: "usd".to_owned(),
        monthly_fee_micros: plinth_sdk::Micros(0),
        included_calls: 0,
        price_per_call_micros: plinth_sdk::Micros(0),
        hard_cap: false,
        training_price_micros: plinth_sdk::Micros(0),
        rate_limit_per_minute: 100_000,
        burst: 10_000,
        isolation: plinth_sdk::PlanIsolation {
            max_models: 2,
            max_model_versions: 2,
            max_model_bytes: file_bytes * 5 / 2,
            ..plinth_sdk::PlanIsolation::FREE
        },
    };
    app.store().upsert_plan(&plan).await.unwrap();
    app.set_plan(&tenant.session.tenant.id, "tiny-models").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_quotas_refuse_the_upload_past_the_plan_and_deleting_makes_room() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let other = app.tenant().await;
    let file = fixture("one-row.onnx");
    small_quota_plan(&app, &tenant, file.len() as u64).await;
    let manifest =
        |name: &str| json!({ "name": name, "task": "text-classification", "labels": ["no", "yes"] });

    assert_eq!(upload(&app, &tenant, file.clone(), manifest("a")).await.0, 201);
    assert_eq!(upload(&app, &tenant, file.clone(), manifest("a")).await.0, 201);
    // A third version of `a`: past two versions.
    let (status, body) = upload(&app, &tenant, file.clone(), manifest("a")).await;
    assert_eq!((status, code(&body)), (409, "model_quota_exceeded"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("versions"),
        "{body}"
    );
    // The newest version is the one served: it cannot go alone.
    assert_eq!(delete(&app, &tenant, "/v1/models/a/versions/2").await, 422);
    assert_eq!(delete(&app, &tenant, "/v1/models/a/versions/1").await, 204);
    assert_eq!(delete(&app, &tenant, "/v1/models/a/versions/1").await, 404);
    assert_eq!(upload(&app, &tenant, file.clone(), manifest("a")).await.0, 201);
    // `a` keeps two copies; a third copy passes two and a half.
    let (status, body) = upload(&app, &tenant, file.clone(), manifest("b")).await;
    assert_eq!((status, code(&body)), (409, "model_quota_exceeded"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );
    assert_eq!(delete(&app, &tenant, "/v1/models/a/versions/2").await, 204);
    assert_eq!(upload(&app, &tenant, file.clone(), manifest("b")).await.0, 201);
    // Two models already.
    let (status, body) = upload(&app, &tenant, file.clone(), manifest("c")).await;
    assert_eq!((status, code(&body)), (409, "model_quota_exceeded"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("models"),
        "{body}"
    );
    // The tenant's models still serve, and another tenant's quota is its own.
    assert_eq!(
        tenant.client.classify("a", &["x"]).await.unwrap().results.len(),
        1
    );
    assert_eq!(upload(&app, &other, file.clone(), manifest("c")).await.0, 201);
    // Another tenant cannot delete this tenant's versions.
    assert_eq!(delete(&app, &other, "/v1/models/a/versions/3").await, 404);

    // Concurrent uploads cannot pass the quota together: one slot, four attempts, through four
    // replicas (a replica takes one upload of a tenant's at a time).
    assert_eq!(delete(&app, &tenant, "/v1/models/b").await, 204);
    let replicas = [app.replica().await, app.replica().await, app.replica().await];
    let attempts = futures_util::future::join_all(
        [&app, &replicas[0], &replicas[1], &replicas[2]]
            .into_iter()
            .zip(["d", "e", "f", "g"])
            .map(|(through, name)| upload(through, &tenant, file.clone(), manifest(name))),
    )
    .await;
    let created = attempts.iter().filter(|(status, _)| *status == 201).count();
    let refused = attempts
        .iter()
        .filter(|(status, body)| *status == 409 && code(body) == "model_quota_exceeded")
        .count();
    assert_eq!((created, refused), (1, 3), "{attempts:?}");
}

/// The files in the tenant model store (content-addressed `.onnx` and `.json`), staging included.
fn stored_files(app: &TestApp) -> Vec<String> {
    let dir = app.config.data_dir.join("models");
    let mut files: Vec<String> = walk(&dir);
    files.sort();
    files
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path.display().to_string()]
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_and_deleted_models_leave_no_files_behind() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let manifest = json!({ "name": "kept", "task": "text-classification", "labels": ["no", "yes"] });
    // A part sent twice is refused, and neither copy stays.
    let twice = Form::new()
        .part("manifest", Part::text(manifest.to_string()))
        .part("model", Part::bytes(fixture("one-row.onnx")).file_name("a.onnx"))
        .part("model", Part::bytes(fixture("one-row.onnx")).file_name("b.onnx"));
    let response = app
        .http()
        .post(app.url("/v1/models"))
        .bearer_auth(&tenant.key.secret)
        .multipart(twice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(stored_files(&app), Vec::<String>::new());
    // A file ONNX Runtime cannot load is refused and removed.
    let (status, body) = upload(&app, &tenant, b"not a model".to_vec(), manifest.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(stored_files(&app), Vec::<String>::new());

    // Two tenants upload the same file: one copy, kept while either uses it.
    let other = app.tenant().await;
    assert_eq!(
        upload(&app, &tenant, fixture("one-row.onnx"), manifest.clone())
            .await
            .0,
        201
    );
    assert_eq!(
        upload(&app, &other, fixture("one-row.onnx"), manifest.clone())
            .await
            .0,
        201
    );
    let stored = stored_files(&app);
    assert_eq!(
        stored.iter().filter(|f| f.ends_with(".onnx")).count(),
        1,
        "{stored:?}"
    );
    assert_eq!(delete(&app, &tenant, "/v1/models/kept").await, 204);
    assert_eq!(stored_files(&app), stored, "still used by the other tenant");
    assert_eq!(
        other.client.classify("kept", &["x"]).await.unwrap().results.len(),
        1
    );
    assert_eq!(delete(&app, &other, "/v1/models/kept").await, 204);
    assert_eq!(stored_files(&app), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_cannot_read_another_tenants_file_as_external_data() {
    let app = TestApp::spawn().await;
    let victim = app.tenant().await;
    let attacker = app.tenant().await;
    let manifest = json!({ "name": "private", "task": "text-classification", "labels": ["no", "yes"] });
    assert_eq!(
        upload(&app, &victim, fixture("one-row.onnx"), manifest).await.0,
        201
    );
    // Its initializer names the victim's stored file (by the SHA-256 of its bytes) as external data.
    let (status, body) = upload(
        &app,
        &attacker,
        fixture("reads-one-row.onnx"),
        json!({ "name": "reader", "task": "raw" }),
    )
    .await;
    assert_eq!((status, code(&body)), (422, "invalid_model"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("external data"),
        "{body}"
    );
    assert!(
        !body
            .to_string()
            .contains(&app.config.data_dir.display().to_string()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_warm_up_never_ends_is_refused_at_the_timeout() {
    let app = TestApp::spawn_with(|config| config.inference_timeout_ms = 1_000).await;
    let tenant = app.tenant().await;
    let manifest = json!({ "name": "endless", "task": "text-classification", "labels": ["no", "yes"] });
    let started = std::time::Instant::now();
    let (status, body) = upload(&app, &tenant, fixture("endless.onnx"), manifest).await;
    assert_eq!((status, code(&body)), (422, "invalid_model"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{body}"
    );
    // One warm-up, stopped at the timeout (not a trillion iterations later).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Nothing of it stayed, and other uploads go on.
    assert_eq!(stored_files(&app), Vec::<String>::new());
    let manifest = json!({ "name": "fine", "task": "text-classification", "labels": ["no", "yes"] });
    assert_eq!(
        upload(&app, &tenant, fixture("one-row.onnx"), manifest).await.0,
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizers_that_would_stall_or_exhaust_a_serving_thread_are_refused_at_upload() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    let published: Value =
        serde_json::from_slice(&std::fs::read(app.config.models_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let with = |part: &str, value: Value| {
        let mut tokenizer = published.clone();
        tokenizer[part] = value;
        tokenizer
    };
    let double_every_a = json!({ "type": "Replace", "pattern": { "String": "a" }, "content": "aa" });
    let mut template = published["post_processor"].clone();
    template["single"] = json!(vec![json!({ "Sequence": { "id": "A", "type_id": 0 } }); 60]);
    for (tokenizer, reason) in [
        // 2^20 times longer: one text of 32 KiB of "a" would ask for 32 GiB.
        (
            with(
                "normalizer",
                json!({ "type": "Sequence", "normalizers": vec![double_every_a; 20] }),
            ),
            "pre-tokenizers can make a text",
        ),
        // The text again and again, after truncation: 60 times the tokens the model reads.
        (with("post_processor", template), "names the text 60 times"),
        // Every byte becomes a character of up to two bytes, sixteen times over.
        (
            with(
                "pre_tokenizer",
                json!({ "type": "Sequence", "pretokenizers": vec![json!({
                    "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
                }); 16] }),
            ),
            "16 pre-tokenizer steps",
        ),
        // Backtracking: quadratic in the text.
        (
            with(
                "pre_tokenizer",
                json!({ "type": "Split", "behavior": "Isolated", "invert": false,
                        "pattern": { "Regex": r"a+b|\s+(?!\S)" } }),
            ),
            "not one of the published patterns",
        ),
    ] {
        let manifest = json!({ "name": "crafted", "task": "text-classification", "labels": ["no", "yes"] });
        let form = crate::models::form(fixture("one-row.onnx"), &manifest, false).part(
            "tokenizer",
            Part::bytes(serde_json::to_vec(&tokenizer).unwrap()).file_name("tokenizer.json"),
        );
        let (status, body) = crate::models::upload(&app, &tenant, form).await;
        assert_eq!((status, code(&body)), (422, "invalid_model"), "{reason}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(reason),
            "{body}"
        );
    }
    assert_eq!(stored_files(&app), Vec::<String>::new());
    let manifest = json!({ "name": "fine", "task": "text-classification", "labels": ["no", "yes"] });
    assert_eq!(
        upload(&app, &tenant, fixture("one-row.onnx"), manifest).await.0,
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_models_past_the_loaded_bound_are_let_go_and_loaded_again_when_called() {
    let app = TestApp::spawn_with(|config| config.tenant_models_loaded = 1).await;
    let tenant = app.tenant().await;
    let other = app.tenant().await;
    let manifest =
        |name: &str| json!({ "name": name, "task": "text-classification", "labels": ["no", "yes"] });
    assert_eq!(
        upload(&app, &tenant, fixture("one-row.onnx"), manifest("first"))
            .await
            .0,
        201
    );
    // Loading the second lets the first go; the third (another tenant's) lets the second go.
    assert_eq!(
        upload(&app, &tenant, fixture("one-row.onnx"), manifest("second"))
            .await
            .0,
        201
    );
    assert_eq!(
        upload(&app, &other, fixture("one-row.onnx"), manifest("third"))
            .await
            .0,
        201
    );
    // Every one is still listed and answers, loaded again on demand.
    let names: Vec<String> = tenant
        .client
        .models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(
        names.contains(&"first".to_owned()) && names.contains(&"second".to_owned()),
        "{names:?}"
    );
    for _ in 0..2 {
        for (who, name) in [(&tenant, "first"), (&tenant, "second"), (&other, "third")] {
            let answer = who.client.classify(name, &["alone"]).await.unwrap();
            assert_eq!(answer.results[0].label, "yes", "{name}");
        }
    }
    // They were let go and loaded again, not all kept: six calls, each after another model's.
    let metrics = app.metrics().await;
    let reloads: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("plinth_tenant_models_reloaded_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(reloads >= 6.0, "{reloads} reloads");
    // Still private: another tenant's let-go model is not found by name.
    let err = other.client.classify("first", &["x"]).await.unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::NotFound));
    // And a deleted one is not loaded again.
    tenant.owner.delete_model("first").await.unwrap();
    let err = tenant.client.classify("first", &["x"]).await.unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::NotFound));
}

/// Loads take a core from every tenant: a replica spends only so much time loading one tenant's
/// models, and what would load past that (an upload, a call to a model that was let go) is refused
/// with when to retry, while the tenant's loaded models and other tenants' loads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_making_the_server_load_its_models_back_to_back_is_held_to_its_load_budget() {
    let app = TestApp::spawn_with(|config| {
        config.tenant_models_loaded = 1;
        // A millisecond of loading a minute: a load of more than a millisecond owes over a minute,
        // and whatever would load next waits for it.
        config.tenant_load_ms_per_minute = 1;
    })
    .await;
    let tenant = app.tenant().await;
    let other = app.tenant().await;
    let manifest =
        |name: &str| json!({ "name": name, "task": "text-classification", "labels": ["no", "yes"] });
    let classify = async |who: &plinth_tests::TestTenant, name: &str| {
        let response = app
            .http()
            .post(app.url(&format!("/v1/models/{name}/classify")))
            .bearer_auth(&who.key.secret)
            .json(&json!({ "inputs": ["alone"] }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let body: Value = response.json().await.unwrap();
        (status, retry_after, body)
    };
    // Owing nothing, the tenant's upload loads (twice: checked, then served), and owes for it.
    let (status, body) = upload(&app, &tenant, fixture("one-row.onnx"), manifest("first")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = upload(&app, &tenant, fixture("one-row.onnx"), manifest("second")).await;
    assert_eq!((status, code(&body)), (429, "rate_limited"), "{body}");
    // Refused before anything was registered (a registered model would be known, and its call
    // refused for the budget, not unknown).
    let err = tenant.client.classify("second", &["x"]).await.unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::NotFound), "{err:?}");
    // Its loaded model answers as before.
    let (status, _, body) = classify(&tenant, "first").await;
    assert_eq!(status, 200, "{body}");
    // Another tenant's budget is its own: its upload loads (and lets the tenant's model go)...
    let (status, body) = upload(&app, &other, fixture("one-row.onnx"), manifest("third")).await;
    assert_eq!(status, 201, "{body}");
    let (status, _, body) = classify(&other, "third").await;
    assert_eq!(status, 200, "{body}");
    // ... and the tenant's call that would load it again waits for its budget.
    let (status, retry_after, body) = classify(&tenant, "first").await;
    assert_eq!((status, code(&body)), (429, "rate_limited"), "{body}");
    assert!(retry_after.is_some_and(|seconds| seconds >= 1), "{retry_after:?}");
    assert!(counter(&app, "plinth_tenant_model_loads_refused_total").await >= 2.0);
}

/// The value of an unlabelled counter on `/metrics` (0 before it first counts).
async fn counter(app: &TestApp, name: &str) -> f64 {
    let metrics = app.metrics().await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Asking about a model that is not loaded (its metadata, readiness or counters, of any version), or
/// sending it a call that does not parse, loads nothing: a tenant cannot make a server load models,
/// pushing out the ones being called, without calls that run (and are billed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_about_a_model_or_sending_it_garbage_loads_nothing() {
    let app = TestApp::spawn_with(|config| config.tenant_models_loaded = 1).await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let manifest =
        |name: &str| json!({ "name": name, "task": "text-classification", "labels": ["no", "yes"] });
    let get = async |path: &str| {
        let response = app
            .http()
            .get(app.url(path))
            .bearer_auth(&tenant.key.secret)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    let calls = async |path: &str| {
        let (status, stats) = get(path).await;
        assert_eq!(status, 200, "{path}: {stats}");
        stats["success_count"].as_u64().unwrap()
    };
    // One of the tenant's models loaded at a time: `second`, called twice, has pushed `first` out.
    for name in ["first", "second"] {
        assert_eq!(
            upload(&app, &tenant, fixture("one-row.onnx"), manifest(name))
                .await
                .0,
            201
        );
    }
    for _ in 0..2 {
        tenant.client.classify("second", &["x"]).await.unwrap();
    }
    assert_eq!(calls("/v2/models/second/stats").await, 2);

    assert_eq!(get("/v2/models/first").await.0, 200);
    assert_eq!(get("/v2/models/first/ready").await.0, 200);
    let (status, stats) = get("/v2/models/first/stats").await;
    assert_eq!(
        (status, stats["success_count"].as_u64()),
        (200, Some(0)),
        "{stats}"
    );
    let absurd = json!({ "inputs": [
        { "name": "input_ids", "shape": [1, 1_099_511_627_776_u64], "datatype": "INT64", "data": [] },
    ]});
    let tensor = |name: &str, datatype: &str| json!({ "name": name, "shape": [1, 2], "datatype": datatype, "data": [1, 2] });
    let misfits = [
        json!({ "inputs": [tensor("input_ids", "INT64"), tensor("attention_mask", "INT64"), tensor("extra", "INT64")] }),
        json!({ "inputs": [tensor("input_ids", "INT32"), tensor("attention_mask", "INT64")] }),
        json!({ "inputs": [tensor("input_ids", "INT64"), tensor("attention_mask", "INT64")], "outputs": [{ "name": "nothing" }] }),
    ];
    let garbage = [(json!({ "inputs": "none" }), 422), (absurd, 400)]
        .into_iter()
        .chain(misfits.into_iter().map(|misfit| (misfit, 400)));
    for (garbage, refused) in garbage {
        let (status, body) = infer(&app, &tenant, "first", garbage.clone()).await;
        assert_eq!(status, refused, "{garbage}: {body}");
    }
    // Nor texts the model cannot run: none, or an embedding asked of a classifier.
    let err = tenant.client.classify("first", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::InvalidInput), "{err:?}");
    let err = tenant.client.embed("first", &["x"]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(plinth_sdk::ErrorCode::UnsupportedTask),
        "{err:?}"
    );
    // Had any of these loaded `first`, `second` would have been let go, its counters with it.
    assert_eq!(calls("/v2/models/second/stats").await, 2);
    tenant.client.classify("first", &["x"]).await.unwrap();
    assert_eq!(calls("/v2/models/first/stats").await, 1);
    assert_eq!(calls("/v2/models/second/stats").await, 0);

    // Older versions: one called by number is kept beside the newest, up to four of a tenant's.
    for _ in 0..5 {
        assert_eq!(
            upload(&app, &tenant, fixture("one-row.onnx"), manifest("second"))
                .await
                .0,
            201
        );
    }
    let tokens = json!({ "inputs": [
        { "name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 102] },
        { "name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1] },
    ]});
    let (status, body) = app
        .http()
        .post(app.url("/v2/models/second/versions/1/infer"))
        .bearer_auth(&tenant.key.secret)
        .json(&tokens)
        .send()
        .await
        .map(|response| (response.status().as_u16(), response))
        .unwrap();
    assert_eq!(status, 200, "{:?}", body.text().await);
    assert_eq!(calls("/v2/models/second/versions/1/stats").await, 1);
    // Four more older versions asked about: had they loaded, version 1 would have been let go.
    for version in 2..=5 {
        assert_eq!(
            calls(&format!("/v2/models/second/versions/{version}/stats")).await,
            0
        );
        assert_eq!(
            get(&format!("/v2/models/second/versions/{version}/ready"))
                .await
                .0,
            200
        );
    }
    assert_eq!(calls("/v2/models/second/versions/1/stats").await, 1);
    for missing in ["7", "0", "one"] {
        let (status, body) = get(&format!("/v2/models/second/versions/{missing}/stats")).await;
        assert_eq!(status, 404, "{missing}: {body}");
    }
    assert_eq!(get("/v2/models/nothing/stats").await.0, 404);
}
