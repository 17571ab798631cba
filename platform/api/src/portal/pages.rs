//! The portal's handlers: each reads what its page shows through the same store and billing functions
//! as the API, and hands it to a template.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use plinth_core::ErrorCode;
use plinth_core::Role;
use plinth_core::Scope;
use plinth_core::api::{AddMemberRequest, CreateApiKeyRequest, LoginRequest, SignupRequest, UsageGrouping};
use plinth_core::id::{InstallationId, KeyId, UserId};
use plinth_store::auth::Actor;
use serde::Deserialize;

use super::session::{self, Posted, Visitor};
use super::view::{self, Chrome, Nav};
use super::{PageError, PageResult, page, see_other};
use crate::auth::require_platform_admin;
use crate::client::origin;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::AppState;

/// The frame of a signed-in page.
pub(super) async fn chrome(
    state: &AppState,
    visitor: &Visitor,
    title: &'static str,
    current: &'static str,
) -> Result<Chrome, PageError> {
    let tenant = state.store.tenant(&visitor.principal.tenant_id).await?;
    let others = match &visitor.principal.actor {
        Actor::User { id, .. } => state
            .store
            .memberships(id)
            .await?
            .into_iter()
            .filter(|m| m.tenant_id != tenant.id)
            // Anyone may add an email to their tenant: the list stays short, and each entry says
            // which tenant it is, not just a name anyone can choose.
            .take(SWITCHABLE_TENANTS)
            .map(|m| {
                let id = m.tenant_id.to_string();
                let short = id
                    .chars()
                    .rev()
                    .take(6)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>();
                (id, format!("{} (…{short}, {})", m.tenant_name, m.role.as_str()))
            })
            .collect(),
        Actor::ApiKey { .. } => Vec::new(),
    };
    Ok(Chrome {
        title,
        nav: Some(Nav {
            current,
            tenant: tenant.name,
            others,
            csrf: visitor.csrf.clone(),
            operator: crate::auth::is_platform_admin(&visitor.principal),
        }),
        flash: None,
    })
}

/// Organisations offered in the header's switcher, oldest memberships first.
const SWITCHABLE_TENANTS: usize = 20;

/// A refusal the visitor can act on (4xx), to show on the page they are on; anything else becomes an
/// error page.
pub(super) fn shown(err: impl Into<ApiError>) -> Result<ApiError, PageError> {
    let err = err.into();
    if err.status_code().is_server_error() {
        Err(err.into())
    } else {
        Ok(err)
    }
}

/// Where to go after logging in: a portal page, never another site.
fn local_next(next: Option<&str>) -> String {
    match next {
        Some(path) if path.starts_with("/portal") && !path.contains("//") && !path.contains('\\') => {
            path.to_owned()
        }
        _ => "/portal".to_owned(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
}

pub(crate) async fn login_form(query: web::Query<NextQuery>) -> HttpResponse {
    page(
        StatusCode::OK,
        &view::LoginPage {
            chrome: Chrome::public("Log in"),
            error: None,
            email: String::new(),
            next: local_next(query.next.as_deref()),
        },
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    email: String,
    password: String,
    next: Option<String>,
}

pub(crate) async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<LoginForm>,
) -> PageResult {
    session::same_origin(&req)?;
    let form = form.into_inner();
    let request = LoginRequest {
        email: form.email.clone(),
        password: form.password,
        tenant_id: None,
    };
    let client = origin(&req);
    let who = client.who("anonymous");
    match state
        .store
        .login(
            state.cache.as_ref(),
            &request,
            &who,
            &client.login_network(),
            state.settings.limits.unauthenticated_global,
        )
        .await
    {
        Ok(session) => session::open(&state, &session.token, &local_next(form.next.as_deref())).await,
        Err(err) => {
            let err = shown(err)?;
            Ok(page(
                err.status_code(),
                &view::LoginPage {
                    chrome: Chrome::public("Log in"),
                    error: Some(err.message().to_owned()),
                    email: form.email,
                    next: local_next(form.next.as_deref()),
                },
            ))
        }
    }
}

pub(crate) async fn signup_form() -> HttpResponse {
    page(
        StatusCode::OK,
        &view::SignupPage {
            chrome: Chrome::public("Create your account"),
            error: None,
            email: String::new(),
            tenant_name: String::new(),
        },
    )
}

pub(crate) async fn signup(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<SignupRequest>,
) -> PageResult {
    session::same_origin(&req)?;
    let form = form.into_inner();
    match state.store.signup(&form, &origin(&req).who("anonymous")).await {
        Ok(session) => session::open(&state, &session.token, "/portal?welcome=1").await,
        Err(err) => {
            let err = shown(err)?;
            Ok(page(
                err.status_code(),
                &view::SignupPage {
                    chrome: Chrome::public("Create your account"),
                    error: Some(err.message().to_owned()),
                    email: form.email,
                    tenant_name: form.tenant_name,
                },
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Empty {}

pub(crate) async fn logout(state: web::Data<AppState>, posted: Posted<Empty>) -> PageResult {
    if let Actor::User { session, .. } = &posted.visitor.principal.actor {
        state
            .store
            .logout(&posted.visitor.principal.tenant_id, session)
            .await?;
    }
    let mut response = see_other("/portal/login");
    response
        .add_cookie(&session::removal())
        .map_err(ApiError::internal)?;
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(crate) struct WelcomeQuery {
    welcome: Option<String>,
}

pub(crate) async fn overview(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<WelcomeQuery>,
) -> PageResult {
    let mut chrome = chrome(&state, &visitor, "Overview", "overview").await?;
    if query.welcome.is_some() {
        chrome.flash = Some("Welcome to Plinth. Create an API key to make your first call.".into());
    }
    let subscription = state.store.subscription(&visitor.principal.tenant_id).await?;
    let statement = state.billing.upcoming(&visitor.principal.tenant_id).await?;
    let errors = crate::recent_errors::list(&state.cache, &visitor.principal.tenant_id).await;
    let used_percent = if statement.included_calls > 0 {
        (statement.calls * 100 / statement.included_calls).min(100)
    } else {
        0
    };
    Ok(page(
        StatusCode::OK,
        &view::OverviewPage {
            chrome,
            plan: subscription.plan.name,
            period_end: view::date(subscription.current_period_end),
            calls: statement.calls,
            included_calls: view::count(statement.included_calls),
            used_percent,
            spend: view::cents(statement.total_cents, &statement.currency),
            cancel_at_period_end: subscription.cancel_at_period_end,
            errors: errors.iter().map(view::ErrorLine::from).collect(),
        },
    ))
}

async fn keys_page(
    state: &AppState,
    visitor: &Visitor,
    created: Option<(String, String)>,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let chrome = chrome(state, visitor, "API keys", "keys").await?;
    let keys = state.store.list_api_keys(&visitor.principal.tenant_id).await?;
    Ok(page(
        status,
        &view::KeysPage {
            chrome,
            keys: keys.iter().map(view::KeyRow::from).collect(),
            created,
            error,
            csrf: visitor.csrf.clone(),
        },
    ))
}

pub(crate) async fn keys(state: web::Data<AppState>, visitor: Visitor) -> PageResult {
    visitor.require(Scope::Admin)?;
    keys_page(&state, &visitor, None, None, StatusCode::OK).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeyForm {
    name: String,
    inference: Option<String>,
    plugins: Option<String>,
    billing_read: Option<String>,
    admin: Option<String>,
}

pub(crate) async fn create_key(state: web::Data<AppState>, posted: Posted<KeyForm>) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let scopes: Vec<Scope> = [
        (form.inference.is_some(), Scope::Inference),
        (form.plugins.is_some(), Scope::Plugins),
        (form.billing_read.is_some(), Scope::BillingRead),
        (form.admin.is_some(), Scope::Admin),
    ]
    .into_iter()
    .filter_map(|(chosen, scope)| chosen.then_some(scope))
    .collect();
    if scopes.is_empty() {
        return keys_page(
            &state,
            &visitor,
            None,
            Some("Choose at least one scope for the key.".into()),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let request = CreateApiKeyRequest {
        name: form.name,
        scopes: Some(scopes),
        rate_limit_per_minute: None,
        expires_at: None,
    };
    match state
        .store
        .create_api_key(&visitor.principal, &visitor.who(), &request)
        .await
    {
        Ok(created) => {
            keys_page(
                &state,
                &visitor,
                Some((created.key.name, created.secret)),
                None,
                StatusCode::CREATED,
            )
            .await
        }
        Err(err) => {
            let err = shown(err)?;
            keys_page(
                &state,
                &visitor,
                None,
                Some(err.message().to_owned()),
                err.status_code(),
            )
            .await
        }
    }
}

pub(crate) async fn revoke_key(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<KeyId>,
) -> PageResult {
    posted.visitor.require(Scope::Admin)?;
    state
        .store
        .revoke_api_key(&posted.visitor.principal, &posted.visitor.who(), &id)
        .await?;
    Ok(see_other("/portal/keys"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
}

/// A day from a date field (`YYYY-MM-DD`, from 1970 to 9999: see
/// [`crate::routes::billing::within_reach`]), or the default.
fn day(field: &str, value: Option<&str>) -> Result<Option<chrono::NaiveDate>, PageError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(value) => chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .ok()
            .filter(crate::routes::billing::within_reach)
            .map(Some)
            .ok_or_else(|| {
                ApiError::new(
                    plinth_core::ErrorCode::InvalidQuery,
                    format!("{field}: pick a date (YYYY-MM-DD) from 1970 to 9999"),
                )
                .into()
            }),
    }
}

pub(crate) async fn usage(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<RangeQuery>,
) -> PageResult {
    visitor.require(Scope::BillingRead)?;
    let today = chrono::Utc::now().date_naive();
    let to = day("to", query.to.as_deref())?.unwrap_or(today);
    let from = day("from", query.from.as_deref())?.unwrap_or(to - chrono::Duration::days(13));
    if from > to || (to - from).num_days() > 366 {
        return Err(ApiError::new(
            plinth_core::ErrorCode::InvalidQuery,
            "pick a start on or before the end, at most a year apart",
        )
        .into());
    }
    let (start, end) = (
        from.and_time(chrono::NaiveTime::MIN).and_utc(),
        (to + chrono::Duration::days(1))
            .and_time(chrono::NaiveTime::MIN)
            .and_utc(),
    );
    let tenant = &visitor.principal.tenant_id;
    let by_day = state
        .store
        .usage_report(tenant, start, end, UsageGrouping::Day)
        .await?;
    let by_resource = state
        .store
        .usage_report(tenant, start, end, UsageGrouping::Resource)
        .await?;
    let currency = state.store.subscription(tenant).await?.plan.currency;
    // Every day of the range, with or without calls.
    let days: Vec<(String, i64)> = from
        .iter_days()
        .take_while(|d| *d <= to)
        .map(|d| {
            let key = d.format("%Y-%m-%d").to_string();
            let calls = by_day.rows.iter().find(|r| r.key == key).map_or(0, |r| r.calls);
            (key, calls)
        })
        .collect();
    let bars = view::bars(&days);
    let chrome = chrome(&state, &visitor, "Usage", "usage").await?;
    Ok(page(
        StatusCode::OK,
        &view::UsagePage {
            chrome,
            from: from.to_string(),
            to: to.to_string(),
            chart_width: bars.len() * (view::BAR_WIDTH + 4),
            chart_height: view::CHART_HEIGHT + 2,
            bar_width: view::BAR_WIDTH,
            bars,
            days: by_day
                .rows
                .iter()
                .map(|r| view::UsageLine::new(r, &currency))
                .collect(),
            resources: by_resource
                .rows
                .iter()
                .map(|r| view::UsageLine::new(r, &currency))
                .collect(),
            total: view::UsageLine::new(&by_day.total, &currency),
        },
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct CheckoutQuery {
    checkout: Option<String>,
    changed: Option<String>,
}

pub(crate) async fn billing(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<CheckoutQuery>,
) -> PageResult {
    visitor.require(Scope::BillingRead)?;
    let tenant = &visitor.principal.tenant_id;
    let subscription = state.store.subscription(tenant).await?;
    let plans = state.store.list_plans().await?;
    let upcoming = state.billing.upcoming(tenant).await?;
    let invoices = state.billing.invoices(tenant).await?;
    let mut chrome = chrome(&state, &visitor, "Billing", "billing").await?;
    chrome.flash = match (query.checkout.as_deref(), query.changed.as_deref()) {
        (Some("success"), _) => Some(
            "Thank you. Your plan changes as soon as Stripe confirms the payment (usually within seconds)."
                .into(),
        ),
        (Some("canceled"), _) => Some("Checkout was canceled; your plan is unchanged.".into()),
        (_, Some(_)) => Some(format!("You are on the {} plan.", subscription.plan.name)),
        _ => None,
    };
    Ok(page(
        StatusCode::OK,
        &view::BillingPage {
            chrome,
            plans: plans
                .iter()
                .map(|p| view::PlanCard::new(p, &subscription.plan.id))
                .collect(),
            status: format!("{:?}", subscription.status).to_lowercase(),
            cancel_at_period_end: subscription.cancel_at_period_end,
            paid: subscription.plan.monthly_fee_micros.0 > 0,
            upcoming: view::StatementView::from(&upcoming),
            invoices: invoices.invoices.iter().map(view::StatementView::from).collect(),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
        },
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PlanForm {
    plan: String,
}

pub(crate) async fn change_plan(state: web::Data<AppState>, posted: Posted<PlanForm>) -> PageResult {
    posted.visitor.require(Scope::Admin)?;
    let change = state
        .billing
        .change_plan(
            &posted.visitor.principal.tenant_id,
            &posted.form.plan,
            &posted.visitor.who(),
        )
        .await?;
    Ok(match change.checkout_url {
        Some(url) => see_other(&url),
        None => see_other("/portal/billing?changed=1"),
    })
}

pub(crate) async fn cancel(state: web::Data<AppState>, posted: Posted<Empty>) -> PageResult {
    posted.visitor.require(Scope::Admin)?;
    state
        .billing
        .cancel(&posted.visitor.principal.tenant_id, &posted.visitor.who())
        .await?;
    Ok(see_other("/portal/billing?changed=1"))
}

async fn members_page(
    state: &AppState,
    visitor: &Visitor,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let chrome = chrome(state, visitor, "Members", "members").await?;
    let members = state.store.list_members(&visitor.principal.tenant_id).await?;
    let you = match &visitor.principal.actor {
        Actor::User { id, .. } => Some(id.clone()),
        Actor::ApiKey { .. } => None,
    };
    Ok(page(
        status,
        &view::MembersPage {
            chrome,
            members: members
                .iter()
                .map(|m| view::MemberRow {
                    user_id: m.user_id.to_string(),
                    email: m.email.clone(),
                    role: m.role.as_str(),
                    joined: view::date(m.joined_at),
                    you: you.as_ref() == Some(&m.user_id),
                })
                .collect(),
            roles: Role::ALL.map(Role::as_str),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
            error,
        },
    ))
}

pub(crate) async fn members(state: web::Data<AppState>, visitor: Visitor) -> PageResult {
    members_page(&state, &visitor, None, StatusCode::OK).await
}

/// A refusal the visitor can act on is shown on the members page; anything else is an error page.
async fn members_refusal(state: &AppState, visitor: &Visitor, err: plinth_store::StoreError) -> PageResult {
    let err = shown(err)?;
    if err.status_code() == StatusCode::NOT_FOUND {
        return Err(err.into());
    }
    members_page(state, visitor, Some(err.message().to_owned()), err.status_code()).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct AddMemberForm {
    email: String,
    role: Role,
}

pub(crate) async fn add_member(state: web::Data<AppState>, posted: Posted<AddMemberForm>) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let request = AddMemberRequest {
        email: form.email,
        role: form.role,
    };
    match state
        .store
        .add_member(&visitor.principal, &visitor.who(), &request)
        .await
    {
        Ok(_) => Ok(see_other("/portal/members")),
        Err(err) => members_refusal(&state, &visitor, err).await,
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct RoleForm {
    role: Role,
}

pub(crate) async fn change_role(
    state: web::Data<AppState>,
    posted: Posted<RoleForm>,
    user: web::Path<UserId>,
) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    match state
        .store
        .update_member(&visitor.principal, &visitor.who(), &user, form.role)
        .await
    {
        Ok(_) => Ok(see_other("/portal/members")),
        Err(err) => members_refusal(&state, &visitor, err).await,
    }
}

pub(crate) async fn remove_member(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    user: web::Path<UserId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    match state
        .store
        .remove_member(&visitor.principal, &visitor.who(), &user)
        .await
    {
        Ok(()) => Ok(see_other("/portal/members")),
        Err(err) => members_refusal(&state, &visitor, err).await,
    }
}

async fn models_page(
    state: &AppState,
    visitor: &Visitor,
    chrome: Chrome,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let mut models = state.models.visible_to(&visitor.principal.tenant_id);
    models.sort_by(|a, b| (!a.platform, &a.name).cmp(&(!b.platform, &b.name)));
    Ok(page(
        status,
        &view::ModelsPage {
            chrome,
            models: models
                .iter()
                .map(|m| view::ModelRow {
                    name: m.name.clone(),
                    task: serde_json::to_value(m.task)
                        .ok()
                        .and_then(|task| task.as_str().map(ToOwned::to_owned))
                        .unwrap_or_default(),
                    version: m.version,
                    labels: m.labels.join(", "),
                    provider: m.execution_provider.clone(),
                    platform: m.platform,
                })
                .collect(),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
            error,
        },
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct UploadedQuery {
    uploaded: Option<String>,
}

pub(crate) async fn models(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<UploadedQuery>,
) -> PageResult {
    let mut chrome = chrome(&state, &visitor, "Models", "models").await?;
    chrome.flash = query
        .uploaded
        .as_ref()
        .map(|name| format!("Model “{name}” uploaded and serving."));
    models_page(&state, &visitor, chrome, None, StatusCode::OK).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsrfQuery {
    pub(super) csrf: Option<String>,
}

/// An upload: multipart parts `manifest`, `model` and `tokenizer` as the API takes them. Its CSRF
/// token travels in the query, so that the body goes to the upload as it came.
pub(crate) async fn upload_model(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<CsrfQuery>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> PageResult {
    visitor.verify_csrf(query.csrf.as_deref())?;
    visitor.require(Scope::Admin)?;
    match crate::uploads::upload(&state, &visitor.principal, &visitor.who(), &req, body).await {
        Ok(model) => Ok(see_other(&format!(
            "/portal/models?{}",
            serde_urlencoded::to_string([("uploaded", &model.name)]).map_err(ApiError::internal)?
        ))),
        Err(err) => {
            let err = shown(err)?;
            let chrome = chrome(&state, &visitor, "Models", "models").await?;
            let status = err.status_code();
            models_page(&state, &visitor, chrome, Some(err.message().to_owned()), status).await
        }
    }
}

pub(crate) async fn delete_model(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    name: web::Path<String>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    state
        .hosting
        .delete_model(&visitor.principal.tenant_id, &visitor.who(), &name)
        .await
        .map_err(ApiError::from)?;
    Ok(see_other("/portal/models"))
}

/// Plugin versions waiting for review (platform admins).
pub(crate) async fn review_queue(state: web::Data<AppState>, visitor: Visitor) -> PageResult {
    require_platform_admin(&visitor.principal, "review plugins")?;
    let versions = state.store.pending_versions().await?;
    let chrome = chrome(&state, &visitor, "Review queue", "review").await?;
    Ok(page(
        StatusCode::OK,
        &view::ReviewPage {
            chrome,
            versions: versions.iter().map(view::ReviewRow::from).collect(),
            csrf: visitor.csrf.clone(),
        },
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReviewForm {
    decision: String,
    note: Option<String>,
}

pub(crate) async fn review(
    state: web::Data<AppState>,
    posted: Posted<ReviewForm>,
    id: web::Path<plinth_core::id::PluginVersionId>,
) -> PageResult {
    let Posted { visitor, form } = posted;
    require_platform_admin(&visitor.principal, "review plugins")?;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => {
            return Err(ApiError::new(
                plinth_core::ErrorCode::ValidationFailed,
                "decision: approve or reject",
            )
            .into());
        }
    };
    let note = form.note.filter(|note| !note.trim().is_empty());
    if !approve && note.is_none() {
        return Err(ApiError::new(
            plinth_core::ErrorCode::ValidationFailed,
            "a rejection needs a reason: the author sees it",
        )
        .into());
    }
    state
        .store
        .review_version(&visitor.who(), &id, approve, note)
        .await?;
    Ok(see_other("/portal/review"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct SearchQuery {
    q: Option<String>,
}

pub(crate) async fn marketplace(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<SearchQuery>,
) -> PageResult {
    let q = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let plugins = state.store.marketplace(q).await?;
    let chrome = chrome(&state, &visitor, "Marketplace", "marketplace").await?;
    Ok(page(
        StatusCode::OK,
        &view::MarketplacePage {
            chrome,
            query: q.unwrap_or_default().to_owned(),
            listings: plugins.iter().filter_map(view::Listing::new).collect(),
        },
    ))
}

async fn plugin_page(
    state: &AppState,
    visitor: &Visitor,
    name: &str,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let listing = state
        .store
        .marketplace(None)
        .await?
        .iter()
        .find(|p| p.name == name)
        .and_then(view::Listing::new)
        .ok_or_else(|| {
            ApiError::new(
                plinth_core::ErrorCode::NotFound,
                "There is no such plugin in the marketplace.",
            )
        })?;
    let chrome = chrome(state, visitor, "Plugin", "marketplace").await?;
    Ok(page(
        status,
        &view::PluginPage {
            chrome,
            listing,
            can_install: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
            error,
        },
    ))
}

pub(crate) async fn plugin(
    state: web::Data<AppState>,
    visitor: Visitor,
    name: web::Path<String>,
) -> PageResult {
    plugin_page(&state, &visitor, &name, None, StatusCode::OK).await
}

type Fields = std::collections::BTreeMap<String, String>;

/// A form field holding a JSON object; `None` when left empty.
fn json_object(
    form: &Fields,
    field: &str,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    match form.get(field).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(text) => serde_json::from_str(text)
            .map(Some)
            .map_err(|err| format!("{field}: a JSON object ({err})")),
    }
}

/// The `secrets` field: a JSON object of strings; `None` when left empty.
fn secrets_field(form: &Fields) -> Result<Option<std::collections::BTreeMap<String, String>>, String> {
    json_object(form, "secrets")?
        .map(|map| {
            map.into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(v) => Ok((k, v)),
                    _ => Err(format!("secrets: `{k}` must be a string")),
                })
                .collect()
        })
        .transpose()
}

/// The capabilities (`cap:<name>`) and models (`model:<name>`) whose boxes were ticked.
fn approvals(form: &Fields) -> (Vec<plinth_core::plugins::Capability>, Vec<String>) {
    let ticked = |prefix: &str| -> Vec<String> {
        form.keys()
            .filter_map(|key| key.strip_prefix(prefix).map(ToOwned::to_owned))
            .collect()
    };
    let capabilities = ticked("cap:")
        .into_iter()
        .filter_map(|c| serde_json::from_value(serde_json::Value::String(c)).ok())
        .collect();
    (capabilities, ticked("model:"))
}

/// An install form: `cap:<capability>` and `model:<name>` boxes ticked one by one, settings and
/// secrets as JSON objects.
pub(crate) async fn install(
    state: web::Data<AppState>,
    posted: Posted<Fields>,
    name: web::Path<String>,
) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let refused = |message: String| async {
        plugin_page(
            &state,
            &visitor,
            &name,
            Some(message),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await
    };
    let settings = match json_object(&form, "settings") {
        Ok(settings) => settings.unwrap_or_default(),
        Err(message) => return refused(message).await,
    };
    let secrets = match secrets_field(&form) {
        Ok(secrets) => secrets.unwrap_or_default(),
        Err(message) => return refused(message).await,
    };
    let (approve_capabilities, approve_models) = approvals(&form);
    let request = plinth_core::plugins::InstallRequest {
        plugin: name.clone(),
        version: None,
        approve_capabilities,
        approve_models,
        settings,
        secrets,
        record_failures: false,
    };
    match state
        .marketplace
        .install(&visitor.principal, &visitor.who(), &request)
        .await
    {
        Ok(_) => Ok(see_other("/portal/plugins")),
        Err(err) => refused(shown(err)?.message().to_owned()).await,
    }
}

pub(crate) async fn installed(state: web::Data<AppState>, visitor: Visitor) -> PageResult {
    let installations = state.store.installations(&visitor.principal.tenant_id).await?;
    let chrome = chrome(&state, &visitor, "Installed plugins", "plugins").await?;
    Ok(page(
        StatusCode::OK,
        &view::InstalledPage {
            chrome,
            installations: installations.iter().map(view::InstalledRow::from).collect(),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
        },
    ))
}

pub(crate) async fn uninstall(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<plinth_core::id::InstallationId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    state
        .store
        .uninstall(&visitor.principal.tenant_id, &visitor.who(), &id)
        .await?;
    Ok(see_other("/portal/plugins"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConnectQuery {
    connect: Option<String>,
}

/// A plugin author's earnings over the last 30 days, balance and payouts; where Stripe Connect
/// onboarding returns.
pub(crate) async fn author(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<ConnectQuery>,
) -> PageResult {
    visitor.require(Scope::BillingRead)?;
    let tenant = &visitor.principal.tenant_id;
    let (from, to) = crate::routes::billing::period(None, None)?;
    let earnings = state
        .store
        .author_earnings(tenant, from, to, state.marketplace.settings().author_share_bps)
        .await?;
    let payouts = state.billing.payouts(tenant).await?;
    let (rows, payout_lines) = view::AuthorPage::lines(&earnings, &payouts);
    let mut chrome = chrome(&state, &visitor, "Earnings", "author").await?;
    chrome.flash = match query.connect.as_deref() {
        Some("done") => {
            Some("Stripe has your payout details; payouts start once Stripe enables them.".into())
        }
        Some("refresh") => Some("The Stripe link expired: start again for a fresh one.".into()),
        _ => None,
    };
    Ok(page(
        StatusCode::OK,
        &view::AuthorPage {
            chrome,
            from: view::date(earnings.from),
            to: view::date(earnings.to),
            share_percent: format!("{}%", earnings.share_bps / 100),
            rows,
            total: view::micros(earnings.total, "usd"),
            payable: view::micros(earnings.payable, "usd"),
            pending: view::micros(earnings.pending, "usd"),
            balance: view::micros(earnings.balance, "usd"),
            paid_out: view::micros(earnings.paid_out, "usd"),
            payouts: payout_lines,
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
        },
    ))
}

/// Starts (or resumes) Stripe Connect onboarding: a redirect to Stripe's page.
pub(crate) async fn connect(state: web::Data<AppState>, posted: Posted<Empty>) -> PageResult {
    posted.visitor.require(Scope::Admin)?;
    let onboarding = state.billing.connect(&posted.visitor.principal.tenant_id).await?;
    Ok(see_other(&onboarding.url))
}

/// What the installation page shows besides the installation: the try-it box's input and answer, or
/// a refusal.
#[derive(Default)]
struct InstallationExtras {
    input: Option<String>,
    answer: Option<view::TryAnswer>,
    error: Option<String>,
}

async fn installation_page(
    state: &AppState,
    visitor: &Visitor,
    id: &InstallationId,
    extras: InstallationExtras,
    status: StatusCode,
) -> PageResult {
    let installation = state
        .store
        .installations(&visitor.principal.tenant_id)
        .await?
        .into_iter()
        .find(|i| i.id == *id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "There is no such installation."))?;
    // The newest approved version, when it is not this one (none at all when the listing has none).
    let upgrade = match state.store.approved_version(&installation.plugin, None).await {
        Ok(newest) if newest.id != installation.version_id => {
            let listing = state.store.marketplace(Some(&installation.plugin)).await?;
            let description = listing
                .iter()
                .find(|p| p.name == installation.plugin)
                .map(|p| p.description.clone())
                .unwrap_or_default();
            Some(view::Listing::of_version(&description, &newest))
        }
        Ok(_) => None,
        Err(err) => {
            shown(err)?;
            None
        }
    };
    let can_invoke = visitor.principal.has(Scope::Plugins);
    let invocations = if can_invoke {
        state
            .store
            .installation_invocations(&visitor.principal.tenant_id, id, 20)
            .await?
            .into_iter()
            .map(view::InvocationRow::from)
            .collect()
    } else {
        Vec::new()
    };
    let chrome = chrome(state, visitor, "Installed plugin", "plugins").await?;
    Ok(page(
        status,
        &view::InstallationPage {
            chrome,
            settings: serde_json::to_string_pretty(&installation.settings).unwrap_or_default(),
            installation: view::InstalledRow::from(&installation),
            upgrade,
            can_manage: visitor.principal.has(Scope::Admin),
            can_invoke,
            csrf: visitor.csrf.clone(),
            input: extras.input.unwrap_or_else(|| "{}".to_owned()),
            answer: extras.answer,
            error: extras.error,
            invocations,
            record_failures: installation.record_failures,
        },
    ))
}

/// An invocation recorded in full, as a file to hand to the plugin's author for replay.
pub(crate) async fn invocation_record(
    state: web::Data<AppState>,
    visitor: Visitor,
    path: web::Path<(InstallationId, plinth_core::id::InvocationId)>,
) -> PageResult {
    visitor.require(Scope::Plugins)?;
    let (installation, invocation) = path.into_inner();
    let record = state
        .store
        .recorded_invocation(&visitor.principal.tenant_id, &installation, &invocation)
        .await?;
    let body = serde_json::to_string_pretty(&record).map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((
            actix_web::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{invocation}.json\""),
        ))
        .body(body))
}

pub(crate) async fn installation(
    state: web::Data<AppState>,
    visitor: Visitor,
    id: web::Path<InstallationId>,
) -> PageResult {
    installation_page(
        &state,
        &visitor,
        &id,
        InstallationExtras::default(),
        StatusCode::OK,
    )
    .await
}

/// A refusal shown on the installation page (a missing installation is a 404 page).
async fn installation_refusal(
    state: &AppState,
    visitor: &Visitor,
    id: &InstallationId,
    err: ApiError,
    input: Option<String>,
) -> PageResult {
    if err.status_code() == StatusCode::NOT_FOUND {
        return Err(err.into());
    }
    let status = err.status_code();
    let extras = InstallationExtras {
        input,
        answer: None,
        error: Some(err.message().to_owned()),
    };
    installation_page(state, visitor, id, extras, status).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct TryForm {
    input: String,
}

/// The try-it box: invokes the installation with the JSON typed in, admitted and billed as an API
/// call of the visitor's would be. The plugin's own failures are shown, as the API would answer them.
pub(crate) async fn try_plugin(
    state: web::Data<AppState>,
    posted: Posted<TryForm>,
    id: web::Path<InstallationId>,
    request_id: RequestId,
) -> PageResult {
    let Posted { visitor, form } = posted;
    let input = form.input;
    let request: serde_json::Value = match serde_json::from_str(&input) {
        Ok(request) => request,
        Err(err) => {
            let err = ApiError::new(ErrorCode::InvalidBody, format!("the request is not JSON: {err}"));
            return installation_refusal(&state, &visitor, &id, err, Some(input)).await;
        }
    };
    let invoked = async {
        let key = crate::metering::admit_interactive(&state, &visitor.principal, Scope::Plugins).await?;
        let invocation = plinth_marketplace::Invocation {
            installation: &id,
            keys: key.0,
            request_id: request_id.0,
            request: &request,
            record: false,
        };
        Ok::<_, ApiError>(state.marketplace.invoke(&visitor.principal, invocation).await?)
    }
    .await;
    match invoked {
        Ok((plinth_marketplace::Invoked { outcome, .. }, _)) => {
            let body = serde_json::from_str::<serde_json::Value>(&outcome.response)
                .and_then(|answer| serde_json::to_string_pretty(&answer))
                .unwrap_or(outcome.response);
            let extras = InstallationExtras {
                input: Some(input),
                answer: Some(view::TryAnswer {
                    body,
                    compute_units: outcome.compute_units,
                    duration_ms: format!("{:.1}", outcome.duration.as_secs_f64() * 1e3),
                    logs: outcome.logs.into_iter().map(|l| (l.level, l.message)).collect(),
                }),
                error: None,
            };
            installation_page(&state, &visitor, &id, extras, StatusCode::OK).await
        }
        Err(err) => {
            // What the plugin did wrong is the point of trying it: shown, like any refusal.
            let err = if matches!(err.code(), ErrorCode::PluginFailed | ErrorCode::PluginTimeout) {
                err
            } else {
                shown(err)?
            };
            installation_refusal(&state, &visitor, &id, err, Some(input)).await
        }
    }
}

/// Moves an installation to a newer approved version, with what it asks for approved box by box.
pub(crate) async fn upgrade(
    state: web::Data<AppState>,
    posted: Posted<Fields>,
    id: web::Path<InstallationId>,
) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let (capabilities, models) = approvals(&form);
    let request = plinth_core::plugins::UpdateInstallationRequest {
        version: form.get("version").cloned(),
        approve_capabilities: Some(capabilities),
        approve_models: Some(models),
        ..Default::default()
    };
    match state
        .marketplace
        .update_installation(&visitor.principal, &visitor.who(), &id, &request)
        .await
    {
        Ok(_) => Ok(see_other(&format!("/portal/plugins/{id}"))),
        Err(err) => installation_refusal(&state, &visitor, &id, shown(err)?, None).await,
    }
}

/// Replaces an installation's settings, and its secrets when new ones are given.
pub(crate) async fn installation_settings(
    state: web::Data<AppState>,
    posted: Posted<Fields>,
    id: web::Path<InstallationId>,
) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let fields = json_object(&form, "settings").and_then(|settings| Ok((settings, secrets_field(&form)?)));
    let (settings, secrets) = match fields {
        Ok(fields) => fields,
        Err(message) => {
            let err = ApiError::new(ErrorCode::ValidationFailed, message);
            return installation_refusal(&state, &visitor, &id, err, None).await;
        }
    };
    let request = plinth_core::plugins::UpdateInstallationRequest {
        version: None,
        approve_capabilities: None,
        approve_models: None,
        settings: Some(settings.unwrap_or_default()),
        secrets,
        // A checkbox: sent only when ticked.
        record_failures: Some(form.contains_key("record_failures")),
    };
    match state
        .marketplace
        .update_installation(&visitor.principal, &visitor.who(), &id, &request)
        .await
    {
        Ok(_) => Ok(see_other(&format!("/portal/plugins/{id}"))),
        Err(err) => installation_refusal(&state, &visitor, &id, shown(err)?, None).await,
    }
}

async fn my_plugins_page(
    state: &AppState,
    visitor: &Visitor,
    mut chrome: Chrome,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let plugins = state.store.authored_plugins(&visitor.principal.tenant_id).await?;
    if error.is_some() {
        chrome.flash = None;
    }
    Ok(page(
        status,
        &view::MyPluginsPage {
            chrome,
            plugins: plugins.iter().map(view::AuthoredPlugin::from).collect(),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
            error,
        },
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct PublishedQuery {
    published: Option<String>,
}

/// A plugin author's listings, every version with its checks and review.
pub(crate) async fn my_plugins(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<PublishedQuery>,
) -> PageResult {
    let mut chrome = chrome(&state, &visitor, "My plugins", "my-plugins").await?;
    chrome.flash = query
        .published
        .is_some()
        .then(|| "The version passed the automatic checks and waits for review.".to_owned());
    my_plugins_page(&state, &visitor, chrome, None, StatusCode::OK).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListingForm {
    name: String,
    description: String,
}

pub(crate) async fn create_listing(state: web::Data<AppState>, posted: Posted<ListingForm>) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    match state
        .store
        .create_plugin(
            &visitor.principal.tenant_id,
            &visitor.who(),
            &form.name,
            &form.description,
        )
        .await
    {
        Ok(_) => Ok(see_other("/portal/author/plugins")),
        Err(err) => {
            let err = shown(err)?;
            let chrome = chrome(&state, &visitor, "My plugins", "my-plugins").await?;
            my_plugins_page(
                &state,
                &visitor,
                chrome,
                Some(err.message().to_owned()),
                err.status_code(),
            )
            .await
        }
    }
}

/// Publishes a version: multipart parts `manifest` and `component` as the API takes them, the CSRF
/// token in the query (see `upload_model`).
pub(crate) async fn publish(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<CsrfQuery>,
    name: web::Path<String>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> PageResult {
    visitor.verify_csrf(query.csrf.as_deref())?;
    visitor.require(Scope::Admin)?;
    let who = visitor.who();
    match crate::plugins::publish(&state, &visitor.principal, &who, &name, &req, body).await {
        Ok(_) => Ok(see_other("/portal/author/plugins?published=1")),
        Err(err) => {
            let err = shown(err)?;
            let chrome = chrome(&state, &visitor, "My plugins", "my-plugins").await?;
            let message = format!("The version was refused: {}", err.message());
            my_plugins_page(&state, &visitor, chrome, Some(message), err.status_code()).await
        }
    }
}

/// Tenants the operators look after: search, plan and this period's usage; the plans on offer.
pub(crate) async fn tenants(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<SearchQuery>,
) -> PageResult {
    require_platform_admin(&visitor.principal, "see every tenant")?;
    let q = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let mut rows = Vec::new();
    for tenant in state.store.tenant_directory(q, TENANTS_SHOWN).await? {
        let subscription = state.store.subscription(&tenant.id).await?;
        let statement = state.billing.upcoming(&tenant.id).await?;
        rows.push(view::TenantRow {
            id: tenant.id.to_string(),
            name: tenant.name,
            plan: subscription.plan.name,
            status: format!("{:?}", subscription.status).to_lowercase(),
            created: view::date(tenant.created_at),
            calls: statement.calls,
            spend: view::cents(statement.total_cents, &statement.currency),
        });
    }
    let plans = state.store.list_plans().await?;
    let chrome = chrome(&state, &visitor, "Tenants", "tenants").await?;
    Ok(page(
        StatusCode::OK,
        &view::TenantsPage {
            chrome,
            query: q.unwrap_or_default().to_owned(),
            tenants: rows,
            plans: plans.iter().map(|p| view::PlanCard::new(p, "")).collect(),
        },
    ))
}

/// Tenants listed at once in the directory: a search narrows it down.
const TENANTS_SHOWN: u64 = 50;

#[derive(Debug, Deserialize)]
pub(crate) struct SyncedQuery {
    synced: Option<String>,
}

/// Billing operations: the payment mode, the usage sync and the reconciliation of the ledger with
/// what Stripe acknowledged.
pub(crate) async fn billing_ops(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<SyncedQuery>,
) -> PageResult {
    require_platform_admin(&visitor.principal, "see billing operations")?;
    let reconciliation = state.billing.reconcile().await?;
    let stripe = state.billing.mode() == plinth_core::billing::PaymentMode::Stripe;
    let mut chrome = chrome(&state, &visitor, "Billing operations", "billing-ops").await?;
    // Only numbers travel in the link; the sentence is the server's.
    chrome.flash = query.synced.as_deref().and_then(|synced| {
        let counts: Vec<u64> = synced.split('-').map(str::parse).collect::<Result<_, _>>().ok()?;
        let [closed, sent, pending] = counts[..] else {
            return None;
        };
        Some(format!(
            "Sync done: {closed} buckets closed, {sent} meter events sent, {pending} waiting."
        ))
    });
    Ok(page(
        StatusCode::OK,
        &view::BillingOpsPage {
            chrome,
            mode: if stripe { "Stripe" } else { "local" }.to_owned(),
            stripe,
            rows: reconciliation
                .rows
                .iter()
                .map(view::ReconciliationLine::from)
                .collect(),
            balanced: reconciliation.balanced,
            csrf: visitor.csrf.clone(),
        },
    ))
}

/// Pushes settled usage to Stripe now (audited, as through the API).
pub(crate) async fn sync(state: web::Data<AppState>, posted: Posted<Empty>) -> PageResult {
    let visitor = posted.visitor;
    require_platform_admin(&visitor.principal, "run the usage sync")?;
    let report = state.billing.sync_now().await?;
    state
        .store
        .audit(
            None,
            &visitor.who(),
            "billing.sync",
            None,
            serde_json::json!(report),
        )
        .await?;
    Ok(see_other(&format!(
        "/portal/admin/billing?synced={}-{}-{}",
        report.buckets_closed, report.events_sent, report.events_pending
    )))
}

#[derive(Debug, Deserialize)]
pub(crate) struct SwitchForm {
    tenant: plinth_core::id::TenantId,
}

/// Moves the visitor to another organisation they belong to, with a new session there.
pub(crate) async fn switch_tenant(state: web::Data<AppState>, posted: Posted<SwitchForm>) -> PageResult {
    let Posted { visitor, form } = posted;
    let Actor::User { session, .. } = &visitor.principal.actor else {
        return Err(ApiError::new(ErrorCode::InsufficientScope, "only people switch organisations").into());
    };
    let switched = state
        .store
        .switch_tenant(
            &visitor.principal.tenant_id,
            session,
            &form.tenant,
            &visitor.who(),
        )
        .await?;
    session::open(&state, &switched.token, "/portal").await
}
