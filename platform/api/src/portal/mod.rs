//! The web portal at `/portal`: server-rendered pages over the same domain functions the API calls,
//! for tenants to sign up, manage keys, watch usage and change plans. Plain HTML forms (every page
//! works without script, with a keyboard and a screen reader, on a phone-width screen); templates and
//! assets are compiled into the binary.

mod pages;
mod session;
mod training;
mod view;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, ResponseError, web};
use askama::Template;

use crate::error::ApiError;
use crate::limits::{Door, guard};

/// A page that could not be shown: a visitor who must log in first, or an error page.
#[derive(Debug)]
pub(crate) enum PageError {
    LoggedOut { next: String },
    Api(ApiError),
}

impl From<ApiError> for PageError {
    fn from(err: ApiError) -> Self {
        Self::Api(err)
    }
}

impl From<plinth_store::StoreError> for PageError {
    fn from(err: plinth_store::StoreError) -> Self {
        Self::Api(err.into())
    }
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LoggedOut { .. } => f.write_str("log in to see this page"),
            Self::Api(err) => write!(f, "{err}"),
        }
    }
}

impl ResponseError for PageError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::LoggedOut { .. } => StatusCode::SEE_OTHER,
            Self::Api(err) => err.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::LoggedOut { next } => HttpResponse::SeeOther()
                .insert_header((
                    header::LOCATION,
                    format!(
                        "/portal/login?next={}",
                        serde_urlencoded::to_string([("", next)])
                            .unwrap_or_default()
                            .trim_start_matches('=')
                    ),
                ))
                .finish(),
            Self::Api(err) => {
                let status = err.status_code();
                let message = if status.is_server_error() {
                    "Something went wrong on our side. Try again in a moment.".to_owned()
                } else {
                    err.message().to_owned()
                };
                page(
                    status,
                    &view::ErrorPage {
                        chrome: view::Chrome::public(status.canonical_reason().unwrap_or("Error")),
                        status: status.as_u16(),
                        code: serde_json::to_value(err.code())
                            .ok()
                            .and_then(|code| code.as_str().map(ToOwned::to_owned))
                            .unwrap_or_default(),
                        message,
                    },
                )
            }
        }
    }
}

pub(crate) type PageResult = Result<HttpResponse, PageError>;

/// Renders a page with the portal's headers: never cached, never framed, scripts only from here.
pub(crate) fn page(status: StatusCode, template: &impl Template) -> HttpResponse {
    match template.render() {
        Ok(html) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(html),
        Err(err) => {
            tracing::error!(error = %err, "cannot render a portal page");
            HttpResponse::InternalServerError()
                .content_type("text/plain; charset=utf-8")
                .body("the page could not be rendered")
        }
    }
}

/// A redirect after a form (303: the browser follows with a GET).
pub(crate) fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

async fn security_headers(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let mut response = next.call(req).await?;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        // Ignored over plain http; once a browser has the portal over https, it stays there.
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Ok(response)
}

const STYLESHEET: &str = include_str!("../../assets/portal.css");
const SCRIPT: &str = include_str!("../../assets/portal.js");
/// Loaded by pages that follow work in progress (a training job's): it refreshes their live parts.
const REFRESH: &str = include_str!("refresh.js");

async fn asset(file: web::Path<String>) -> HttpResponse {
    let (body, content_type) = match file.as_str() {
        "portal.css" => (STYLESHEET, "text/css; charset=utf-8"),
        "portal.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "refresh.js" => (REFRESH, "text/javascript; charset=utf-8"),
        _ => return HttpResponse::NotFound().finish(),
    };
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(body)
}

async fn not_found() -> PageResult {
    Err(ApiError::new(plinth_core::ErrorCode::NotFound, "There is no such page.").into())
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    let door = |door: Door| from_fn(move |req, next| guard(door, req, next));
    cfg.service(
        web::scope("/portal")
            .wrap(from_fn(security_headers))
            .route("", web::get().to(pages::overview))
            .route("/", web::get().to(pages::overview))
            .route("/assets/{file}", web::get().to(asset))
            .route("/login", web::get().to(pages::login_form))
            .service(
                web::resource("/login")
                    .wrap(door(Door::Login))
                    .route(web::post().to(pages::login)),
            )
            .route("/signup", web::get().to(pages::signup_form))
            .service(
                web::resource("/signup")
                    .wrap(door(Door::Signup))
                    .route(web::post().to(pages::signup)),
            )
            .route("/logout", web::post().to(pages::logout))
            .route("/switch", web::post().to(pages::switch_tenant))
            .route("/keys", web::get().to(pages::keys))
            .route("/keys", web::post().to(pages::create_key))
            .route("/keys/{id}/revoke", web::post().to(pages::revoke_key))
            .route("/usage", web::get().to(pages::usage))
            .route("/billing", web::get().to(pages::billing))
            .route("/billing/plan", web::post().to(pages::change_plan))
            .route("/billing/cancel", web::post().to(pages::cancel))
            .route("/models", web::get().to(pages::models))
            .route("/models", web::post().to(pages::upload_model))
            .route("/models/{name}/delete", web::post().to(pages::delete_model))
            .route("/training", web::get().to(training::training))
            .route("/training/datasets", web::post().to(training::upload_dataset))
            .route(
                "/training/datasets/{id}/delete",
                web::post().to(training::delete_dataset),
            )
            .route("/training/jobs", web::post().to(training::create_job))
            .route("/training/jobs/{id}", web::get().to(training::job))
            .route("/training/jobs/{id}/cancel", web::post().to(training::cancel_job))
            .route("/training/jobs/{id}/deploy", web::post().to(training::deploy_job))
            .route(
                "/training/jobs/{id}/model.onnx",
                web::get().to(training::export_job),
            )
            .route("/training/jobs/{id}/delete", web::post().to(training::delete_job))
            .route("/marketplace", web::get().to(pages::marketplace))
            .route("/marketplace/{name}", web::get().to(pages::plugin))
            .route("/marketplace/{name}/install", web::post().to(pages::install))
            .route("/plugins", web::get().to(pages::installed))
            .route("/plugins/{id}", web::get().to(pages::installation))
            .route("/plugins/{id}/try", web::post().to(pages::try_plugin))
            .route(
                "/plugins/{id}/invocations/{invocation}/record",
                web::get().to(pages::invocation_record),
            )
            .route("/plugins/{id}/upgrade", web::post().to(pages::upgrade))
            .route(
                "/plugins/{id}/settings",
                web::post().to(pages::installation_settings),
            )
            .route("/plugins/{id}/uninstall", web::post().to(pages::uninstall))
            .route("/author/plugins", web::get().to(pages::my_plugins))
            .route("/author/plugins", web::post().to(pages::create_listing))
            .route("/author/plugins/{name}/versions", web::post().to(pages::publish))
            .route("/admin/tenants", web::get().to(pages::tenants))
            .route("/admin/billing", web::get().to(pages::billing_ops))
            .route("/admin/billing/sync", web::post().to(pages::sync))
            .route("/author", web::get().to(pages::author))
            .route("/author/connect", web::post().to(pages::connect))
            .route("/review", web::get().to(pages::review_queue))
            .route("/review/{id}", web::post().to(pages::review))
            .route("/members", web::get().to(pages::members))
            .route("/members", web::post().to(pages::add_member))
            .route("/members/{user}/role", web::post().to(pages::change_role))
            .route("/members/{user}/remove", web::post().to(pages::remove_member))
            .default_service(web::to(not_found)),
    );
}
