//! What each page shows, ready to print: the templates only lay it out.

use askama::Template;
use chrono::{DateTime, Utc};
use plinth_core::Micros;
use plinth_core::api::{ApiKey, Plan, UsageRow};
use plinth_core::billing::Statement;
use plinth_core::training::{Dataset, Evaluation, SplitSizes, TrainingEvent, TrainingJob, TrainingStatus};

/// The frame around every page: its title, the signed-in navigation, a status message.
#[derive(Debug)]
pub(crate) struct Chrome {
    pub(crate) title: &'static str,
    pub(crate) nav: Option<Nav>,
    /// Announced to screen readers (`role="status"`).
    pub(crate) flash: Option<String>,
}

impl Chrome {
    pub(crate) fn public(title: &'static str) -> Self {
        Self {
            title,
            nav: None,
            flash: None,
        }
    }
}

/// Pages only platform admins see in the navigation (and may open).
const OPERATOR_PAGES: [&str; 3] = ["review", "tenants", "billing-ops"];

#[derive(Debug)]
pub(crate) struct Nav {
    /// The page the navigation marks `aria-current`.
    pub(crate) current: &'static str,
    pub(crate) tenant: String,
    /// The visitor's other organisations, `(id, name)`, to switch to.
    pub(crate) others: Vec<(String, String)>,
    pub(crate) csrf: String,
    /// A platform admin: the operators' pages are linked too.
    pub(crate) operator: bool,
}

impl Nav {
    /// The navigation's links: where, what, and whether it is this page.
    pub(crate) fn links(&self) -> Vec<(&'static str, &'static str, bool)> {
        [
            ("overview", "/portal", "Overview"),
            ("keys", "/portal/keys", "API keys"),
            ("usage", "/portal/usage", "Usage"),
            ("models", "/portal/models", "Models"),
            ("training", "/portal/training", "Training"),
            ("marketplace", "/portal/marketplace", "Marketplace"),
            ("plugins", "/portal/plugins", "Installed plugins"),
            ("billing", "/portal/billing", "Billing"),
            ("members", "/portal/members", "Members"),
            ("my-plugins", "/portal/author/plugins", "My plugins"),
            ("author", "/portal/author", "Earnings"),
            ("review", "/portal/review", "Review queue"),
            ("tenants", "/portal/admin/tenants", "Tenants"),
            ("billing-ops", "/portal/admin/billing", "Billing operations"),
        ]
        .into_iter()
        .filter(|(id, ..)| !OPERATOR_PAGES.contains(id) || self.operator)
        .map(|(id, href, label)| (href, label, id == self.current))
        .collect()
    }
}

#[derive(Template)]
#[template(path = "portal/error.html")]
pub(crate) struct ErrorPage {
    pub(crate) chrome: Chrome,
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) message: String,
}

#[derive(Template)]
#[template(path = "portal/login.html")]
pub(crate) struct LoginPage {
    pub(crate) chrome: Chrome,
    pub(crate) error: Option<String>,
    pub(crate) email: String,
    pub(crate) next: String,
}

#[derive(Template)]
#[template(path = "portal/signup.html")]
pub(crate) struct SignupPage {
    pub(crate) chrome: Chrome,
    pub(crate) error: Option<String>,
    pub(crate) email: String,
    pub(crate) tenant_name: String,
}

#[derive(Template)]
#[template(path = "portal/overview.html")]
pub(crate) struct OverviewPage {
    pub(crate) chrome: Chrome,
    pub(crate) plan: String,
    pub(crate) period_end: String,
    pub(crate) calls: i64,
    pub(crate) included_calls: String,
    /// Share of the included calls used, 0 to 100.
    pub(crate) used_percent: i64,
    pub(crate) spend: String,
    pub(crate) cancel_at_period_end: bool,
    pub(crate) errors: Vec<ErrorLine>,
}

/// A failed call on the overview.
#[derive(Debug)]
pub(crate) struct ErrorLine {
    pub(crate) at: String,
    pub(crate) call: String,
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) request_id: String,
}

impl From<&crate::recent_errors::FailedCall> for ErrorLine {
    fn from(call: &crate::recent_errors::FailedCall) -> Self {
        Self {
            at: time(call.at),
            call: format!("{} {}", call.method, call.path),
            status: call.status,
            code: call.code.clone().unwrap_or_default(),
            request_id: call.request_id.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) redacted: String,
    pub(crate) scopes: String,
    pub(crate) created: String,
    pub(crate) last_used: String,
    pub(crate) revoked: bool,
}

impl From<&ApiKey> for KeyRow {
    fn from(key: &ApiKey) -> Self {
        Self {
            id: key.id.to_string(),
            name: key.name.clone(),
            redacted: key.redacted.clone(),
            scopes: key
                .scopes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            created: date(key.created_at),
            last_used: key.last_used_at.map_or_else(|| "never".to_owned(), time),
            revoked: key.revoked_at.is_some(),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/keys.html")]
pub(crate) struct KeysPage {
    pub(crate) chrome: Chrome,
    pub(crate) keys: Vec<KeyRow>,
    /// A key just created: its secret, shown this once.
    pub(crate) created: Option<(String, String)>,
    pub(crate) error: Option<String>,
    pub(crate) csrf: String,
}

#[derive(Debug)]
pub(crate) struct ModelRow {
    pub(crate) name: String,
    pub(crate) task: String,
    pub(crate) version: u32,
    pub(crate) labels: String,
    pub(crate) provider: String,
    pub(crate) platform: bool,
}

#[derive(Template)]
#[template(path = "portal/models.html")]
pub(crate) struct ModelsPage {
    pub(crate) chrome: Chrome,
    pub(crate) models: Vec<ModelRow>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
    pub(crate) error: Option<String>,
}

/// A dataset in the training page's table.
#[derive(Debug)]
pub(crate) struct DatasetRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) format: String,
    pub(crate) examples: String,
    /// `label (examples)`, in the order the file has them.
    pub(crate) labels: String,
    pub(crate) size: String,
    pub(crate) created: String,
}

impl From<&Dataset> for DatasetRow {
    fn from(d: &Dataset) -> Self {
        Self {
            id: d.id.clone(),
            name: d.name.clone(),
            format: d.format.clone(),
            examples: count(i64::try_from(d.summary.examples).unwrap_or(i64::MAX)),
            labels: d
                .summary
                .labels
                .iter()
                .map(|l| format!("{} ({})", l.label, l.examples))
                .collect::<Vec<_>>()
                .join(", "),
            size: bytes(d.size_bytes),
            created: date(d.created_at),
        }
    }
}

/// A training job in the training page's table.
#[derive(Debug)]
pub(crate) struct JobRow {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) status: &'static str,
    pub(crate) progress: String,
    /// On the held-out test split, once it succeeded.
    pub(crate) accuracy: Option<String>,
    pub(crate) created: String,
}

impl From<&TrainingJob> for JobRow {
    fn from(job: &TrainingJob) -> Self {
        Self {
            id: job.id.clone(),
            model: job.model.clone(),
            status: job.status.as_str(),
            progress: progress(job),
            accuracy: accuracy(job),
            created: time(job.created_at),
        }
    }
}

/// How far a job got: texts embedded, then epochs trained.
fn progress(job: &TrainingJob) -> String {
    let p = &job.progress;
    let embedded = p.examples > 0 && p.embedded >= p.examples;
    if p.epoch > 0 || (embedded && p.max_epochs > 0) {
        format!("epoch {}/{}", p.epoch, p.max_epochs)
    } else {
        format!("embedded {}/{}", p.embedded, p.examples)
    }
}

fn accuracy(job: &TrainingJob) -> Option<String> {
    (job.status == TrainingStatus::Succeeded)
        .then_some(job.evaluation.as_ref())
        .flatten()
        .map(|e| percent(e.accuracy))
}

/// What the job form had in it, to show again when it was refused.
#[derive(Debug, Default)]
pub(crate) struct JobDraft {
    pub(crate) dataset: String,
    pub(crate) model: String,
    pub(crate) epochs: String,
    pub(crate) learning_rate: String,
}

/// Datasets and training jobs, with the forms that add them.
#[derive(Template)]
#[template(path = "portal/training.html")]
pub(crate) struct TrainingPage {
    pub(crate) chrome: Chrome,
    pub(crate) datasets: Vec<DatasetRow>,
    pub(crate) jobs: Vec<JobRow>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
    /// A refused upload: the message, shown above the datasets.
    pub(crate) upload_error: Option<String>,
    /// A job that was not started (or a dataset not deleted): the message, shown by the job form.
    pub(crate) job_error: Option<String>,
    pub(crate) draft: JobDraft,
}

/// How a succeeded job did on its held-out test split.
#[derive(Debug)]
pub(crate) struct EvaluationView {
    pub(crate) examples: u64,
    pub(crate) accuracy: String,
    pub(crate) macro_f1: String,
    /// `(label, precision, recall, f1, support)`.
    pub(crate) labels: Vec<(String, String, String, String, u64)>,
    /// The labels, as the confusion matrix's columns.
    pub(crate) columns: Vec<String>,
    /// `(true label, examples predicted as each column)`.
    pub(crate) confusion: Vec<(String, Vec<u64>)>,
}

impl From<&Evaluation> for EvaluationView {
    fn from(e: &Evaluation) -> Self {
        let columns: Vec<String> = e.labels.iter().map(|l| l.label.clone()).collect();
        Self {
            examples: e.examples,
            accuracy: percent(e.accuracy),
            macro_f1: format!("{:.3}", e.macro_f1),
            labels: e
                .labels
                .iter()
                .map(|l| {
                    (
                        l.label.clone(),
                        format!("{:.3}", l.precision),
                        format!("{:.3}", l.recall),
                        format!("{:.3}", l.f1),
                        l.support,
                    )
                })
                .collect(),
            confusion: e
                .confusion
                .iter()
                .enumerate()
                .map(|(i, row)| (columns.get(i).cloned().unwrap_or_default(), row.clone()))
                .collect(),
            columns,
        }
    }
}

/// One training job, everything about it.
#[derive(Template)]
#[template(path = "portal/training_job.html")]
pub(crate) struct TrainingJobPage {
    pub(crate) chrome: Chrome,
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) base_model: String,
    /// The dataset's name, `None` once it was deleted.
    pub(crate) dataset: Option<String>,
    pub(crate) status: &'static str,
    /// Queued or running: the progress refreshes itself.
    pub(crate) active: bool,
    pub(crate) progress: String,
    /// `(what, value)`: the latest epoch's losses and validation accuracy.
    pub(crate) latest: Vec<(&'static str, String)>,
    pub(crate) split: SplitSizes,
    /// `(name, value)`: the settings in effect, defaults filled in.
    pub(crate) hyperparameters: Vec<(String, String)>,
    pub(crate) evaluation: Option<EvaluationView>,
    pub(crate) failure: Option<String>,
    pub(crate) deployed_version: Option<u32>,
    pub(crate) succeeded: bool,
    pub(crate) billed: String,
    pub(crate) billed_units: i64,
    pub(crate) created: String,
    pub(crate) started: Option<String>,
    pub(crate) finished: Option<String>,
    /// `(when, level, message)`, oldest first.
    pub(crate) events: Vec<(String, String, String)>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
    /// A refused action (cancel, deploy, delete): the message.
    pub(crate) error: Option<String>,
}

impl TrainingJobPage {
    /// The page for `job`; `currency` prices what it was billed.
    pub(crate) fn new(
        chrome: Chrome,
        job: &TrainingJob,
        dataset: Option<String>,
        events: &[TrainingEvent],
        currency: &str,
    ) -> Self {
        let p = &job.progress;
        let latest = [
            ("Training loss", p.train_loss.map(|v| format!("{v:.4}"))),
            ("Validation loss", p.validation_loss.map(|v| format!("{v:.4}"))),
            ("Validation accuracy", p.validation_accuracy.map(percent)),
        ]
        .into_iter()
        .filter_map(|(what, value)| Some((what, value?)))
        .collect();
        let hyperparameters = match serde_json::to_value(&job.hyperparameters) {
            Ok(serde_json::Value::Object(map)) => map
                .into_iter()
                .map(|(name, value)| (name, value.to_string()))
                .collect(),
            _ => Vec::new(),
        };
        Self {
            chrome,
            id: job.id.clone(),
            model: job.model.clone(),
            base_model: job.base_model.clone(),
            dataset,
            status: job.status.as_str(),
            active: !job.status.is_finished(),
            progress: progress(job),
            latest,
            split: job.split,
            hyperparameters,
            evaluation: job.evaluation.as_ref().map(EvaluationView::from),
            failure: job.error.clone(),
            deployed_version: job.deployed_version,
            succeeded: job.status == TrainingStatus::Succeeded,
            billed: micros(job.billed_micros, currency),
            billed_units: job.billed_units,
            created: time(job.created_at),
            started: job.started_at.map(time),
            finished: job.finished_at.map(time),
            events: events
                .iter()
                .map(|e| (time(e.at), e.level.clone(), e.message.clone()))
                .collect(),
            can_manage: false,
            csrf: String::new(),
            error: None,
        }
    }
}

/// A marketplace listing at its newest approved version.
#[derive(Debug)]
pub(crate) struct Listing {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) version: String,
    pub(crate) price: String,
    /// `(name, what it lets the plugin do)`.
    pub(crate) capabilities: Vec<(String, &'static str)>,
    pub(crate) models: Vec<String>,
}

impl Listing {
    /// The listing as its newest approved version presents it; `None` without one.
    pub(crate) fn new(plugin: &plinth_core::plugins::Plugin) -> Option<Self> {
        let newest = plugin.versions.iter().max_by_key(|v| v.created_at)?;
        Some(Self::of_version(&plugin.description, newest))
    }

    /// The listing as `version` presents it.
    pub(crate) fn of_version(description: &str, version: &plinth_core::plugins::PluginVersion) -> Self {
        Self {
            name: version.plugin.clone(),
            description: description.to_owned(),
            version: version.version.clone(),
            price: micros(version.price_per_call, "usd"),
            capabilities: version
                .capabilities
                .iter()
                .map(|c| (name_of(c), capability_meaning(*c)))
                .collect(),
            models: version.models.clone(),
        }
    }
}

fn capability_meaning(capability: plinth_core::plugins::Capability) -> &'static str {
    use plinth_core::plugins::Capability;
    match capability {
        Capability::Inference => "call the models you approve below, billed to you per call",
        Capability::Kv => "keep data in a store private to this installation",
        Capability::Config => "read this installation's settings and secrets",
        Capability::Log => "write log lines",
    }
}

#[derive(Template)]
#[template(path = "portal/marketplace.html")]
pub(crate) struct MarketplacePage {
    pub(crate) chrome: Chrome,
    pub(crate) query: String,
    pub(crate) listings: Vec<Listing>,
}

#[derive(Template)]
#[template(path = "portal/plugin.html")]
pub(crate) struct PluginPage {
    pub(crate) chrome: Chrome,
    pub(crate) listing: Listing,
    pub(crate) can_install: bool,
    pub(crate) csrf: String,
    pub(crate) error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct InstalledRow {
    pub(crate) id: String,
    pub(crate) plugin: String,
    pub(crate) version: String,
    pub(crate) status: String,
    pub(crate) price: String,
    pub(crate) capabilities: String,
    pub(crate) models: String,
    pub(crate) secrets: String,
}

impl From<&plinth_core::plugins::Installation> for InstalledRow {
    fn from(i: &plinth_core::plugins::Installation) -> Self {
        Self {
            id: i.id.to_string(),
            plugin: i.plugin.clone(),
            version: i.version.clone(),
            status: name_of(i.version_status),
            price: micros(i.price_per_call, "usd"),
            capabilities: i.capabilities.iter().map(name_of).collect::<Vec<_>>().join(", "),
            models: i.models.join(", "),
            secrets: i.secret_names.join(", "),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/plugins.html")]
pub(crate) struct InstalledPage {
    pub(crate) chrome: Chrome,
    pub(crate) installations: Vec<InstalledRow>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
}

#[derive(Debug)]
pub(crate) struct EarningsLine {
    pub(crate) plugin: String,
    pub(crate) calls: i64,
    pub(crate) gross: String,
    pub(crate) earnings: String,
    pub(crate) payable: String,
    pub(crate) pending: String,
}

#[derive(Debug)]
pub(crate) struct PayoutLine {
    pub(crate) period: String,
    pub(crate) amount: String,
    pub(crate) status: String,
}

#[derive(Template)]
#[template(path = "portal/author.html")]
pub(crate) struct AuthorPage {
    pub(crate) chrome: Chrome,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) share_percent: String,
    pub(crate) rows: Vec<EarningsLine>,
    pub(crate) total: String,
    pub(crate) payable: String,
    pub(crate) pending: String,
    pub(crate) balance: String,
    pub(crate) paid_out: String,
    pub(crate) payouts: Vec<PayoutLine>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
}

impl AuthorPage {
    pub(crate) fn lines(
        earnings: &plinth_core::plugins::Earnings,
        payouts: &[plinth_core::billing::Payout],
    ) -> (Vec<EarningsLine>, Vec<PayoutLine>) {
        (
            earnings
                .rows
                .iter()
                .map(|r| EarningsLine {
                    plugin: r.plugin.clone(),
                    calls: r.calls,
                    gross: micros(r.gross, "usd"),
                    earnings: micros(r.earnings, "usd"),
                    payable: micros(r.payable, "usd"),
                    pending: micros(r.pending, "usd"),
                })
                .collect(),
            payouts
                .iter()
                .map(|p| PayoutLine {
                    period: p.period.clone(),
                    amount: cents(p.amount_cents, &p.currency),
                    status: name_of(p.status),
                })
                .collect(),
        )
    }
}

#[derive(Debug)]
pub(crate) struct ReviewRow {
    pub(crate) id: String,
    pub(crate) plugin: String,
    pub(crate) version: String,
    pub(crate) wit_version: String,
    pub(crate) capabilities: String,
    pub(crate) models: String,
    pub(crate) price: String,
    pub(crate) size: String,
    /// What the automatic checks found, as indented JSON.
    pub(crate) checks: String,
    pub(crate) submitted: String,
}

#[derive(Template)]
#[template(path = "portal/review.html")]
pub(crate) struct ReviewPage {
    pub(crate) chrome: Chrome,
    pub(crate) versions: Vec<ReviewRow>,
    pub(crate) csrf: String,
}

#[derive(Debug)]
pub(crate) struct MemberRow {
    pub(crate) user_id: String,
    pub(crate) email: String,
    pub(crate) role: &'static str,
    pub(crate) joined: String,
    pub(crate) you: bool,
}

#[derive(Template)]
#[template(path = "portal/members.html")]
pub(crate) struct MembersPage {
    pub(crate) chrome: Chrome,
    pub(crate) members: Vec<MemberRow>,
    pub(crate) roles: [&'static str; 4],
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
    pub(crate) error: Option<String>,
}

/// One bar of a chart, in the SVG's user units.
#[derive(Debug)]
pub(crate) struct Bar {
    pub(crate) x: usize,
    pub(crate) y: i64,
    pub(crate) height: i64,
    pub(crate) label: String,
    pub(crate) value: i64,
}

pub(crate) const CHART_HEIGHT: i64 = 120;
pub(crate) const BAR_WIDTH: usize = 18;

/// Bars for values, scaled to the chart's height.
pub(crate) fn bars(values: &[(String, i64)]) -> Vec<Bar> {
    let most = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    values
        .iter()
        .enumerate()
        .map(|(i, (label, value))| {
            let height = (value * CHART_HEIGHT / most).max(i64::from(*value > 0));
            Bar {
                x: i * (BAR_WIDTH + 4),
                y: CHART_HEIGHT - height,
                height,
                label: label.clone(),
                value: *value,
            }
        })
        .collect()
}

#[derive(Debug)]
pub(crate) struct UsageLine {
    pub(crate) key: String,
    pub(crate) calls: i64,
    pub(crate) units: i64,
    pub(crate) amount: String,
}

impl UsageLine {
    pub(crate) fn new(row: &UsageRow, currency: &str) -> Self {
        Self {
            key: row.key.clone(),
            calls: row.calls,
            units: row.units,
            amount: micros(row.amount_micros, currency),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/usage.html")]
pub(crate) struct UsagePage {
    pub(crate) chrome: Chrome,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) days: Vec<UsageLine>,
    pub(crate) resources: Vec<UsageLine>,
    pub(crate) total: UsageLine,
    pub(crate) bars: Vec<Bar>,
    pub(crate) chart_width: usize,
    pub(crate) chart_height: i64,
    pub(crate) bar_width: usize,
}

#[derive(Debug)]
pub(crate) struct PlanCard {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) fee: String,
    pub(crate) included_calls: String,
    pub(crate) per_call: String,
    pub(crate) hard_cap: bool,
    pub(crate) rate: u32,
    pub(crate) current: bool,
}

impl PlanCard {
    pub(crate) fn new(plan: &Plan, current: &str) -> Self {
        Self {
            id: plan.id.clone(),
            name: plan.name.clone(),
            fee: micros(plan.monthly_fee_micros, &plan.currency),
            included_calls: count(plan.included_calls),
            per_call: micros(plan.price_per_call_micros, &plan.currency),
            hard_cap: plan.hard_cap,
            rate: plan.rate_limit_per_minute,
            current: plan.id == current,
        }
    }
}

#[derive(Debug)]
pub(crate) struct StatementView {
    pub(crate) period: String,
    pub(crate) plan: String,
    pub(crate) fee: String,
    pub(crate) calls: i64,
    pub(crate) included_calls: i64,
    pub(crate) overage_calls: i64,
    pub(crate) overage: String,
    pub(crate) plugin_fees: String,
    pub(crate) training: String,
    pub(crate) total: String,
    pub(crate) items: Vec<(String, String, i64, String)>,
    /// Stripe's invoice: its status and hosted page.
    pub(crate) invoice: Option<(String, Option<String>)>,
}

impl From<&Statement> for StatementView {
    fn from(s: &Statement) -> Self {
        Self {
            period: format!("{} – {}", date(s.period_start), date(s.period_end)),
            plan: s.plan.clone(),
            fee: cents(s.subscription_fee_cents, &s.currency),
            calls: s.calls,
            included_calls: s.included_calls,
            overage_calls: s.overage_calls,
            overage: cents(s.overage_cents, &s.currency),
            plugin_fees: cents(s.plugin_fees_cents, &s.currency),
            training: cents(s.training_cents, &s.currency),
            total: cents(s.total_cents, &s.currency),
            items: s
                .items
                .iter()
                .map(|i| {
                    (
                        i.kind.clone(),
                        i.name.clone(),
                        i.units,
                        micros(i.amount_micros, &s.currency),
                    )
                })
                .collect(),
            // A link only to Stripe's https pages, whatever a webhook said.
            invoice: s.invoice.as_ref().map(|i| {
                (
                    i.status.clone(),
                    i.hosted_url.clone().filter(|url| url.starts_with("https://")),
                )
            }),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/billing.html")]
pub(crate) struct BillingPage {
    pub(crate) chrome: Chrome,
    pub(crate) plans: Vec<PlanCard>,
    pub(crate) status: String,
    pub(crate) cancel_at_period_end: bool,
    pub(crate) paid: bool,
    pub(crate) upcoming: StatementView,
    pub(crate) invoices: Vec<StatementView>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
}

/// A count with thousands separated: `100,000`.
pub(crate) fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn name_of(value: impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(ToOwned::to_owned))
        .unwrap_or_default()
}

impl From<&plinth_core::plugins::PluginVersion> for ReviewRow {
    fn from(v: &plinth_core::plugins::PluginVersion) -> Self {
        Self {
            id: v.id.to_string(),
            plugin: v.plugin.clone(),
            version: v.version.clone(),
            wit_version: v.wit_version.clone(),
            capabilities: v.capabilities.iter().map(name_of).collect::<Vec<_>>().join(", "),
            models: v.models.join(", "),
            price: micros(v.price_per_call, "usd"),
            size: format!(
                "{} KiB",
                count(i64::try_from(v.size_bytes / 1024).unwrap_or(i64::MAX))
            ),
            checks: serde_json::to_string_pretty(&v.checks).unwrap_or_default(),
            submitted: time(v.created_at),
        }
    }
}

/// One installation: what it runs, its settings, a newer version to move to, and the try-it box.
#[derive(Template)]
#[template(path = "portal/installation.html")]
pub(crate) struct InstallationPage {
    pub(crate) chrome: Chrome,
    pub(crate) installation: InstalledRow,
    /// Settings as indented JSON, ready to edit.
    pub(crate) settings: String,
    /// The newest approved version when it is not the installed one, with what it asks for.
    pub(crate) upgrade: Option<Listing>,
    pub(crate) can_manage: bool,
    pub(crate) can_invoke: bool,
    pub(crate) csrf: String,
    pub(crate) input: String,
    pub(crate) answer: Option<TryAnswer>,
    pub(crate) error: Option<String>,
    /// The installation's newest invocation records (for those who may invoke it).
    pub(crate) invocations: Vec<InvocationRow>,
    /// Whether failed invocations are recorded in full, for replay.
    pub(crate) record_failures: bool,
}

/// One invocation record, as the installation page lists it.
#[derive(Debug)]
pub(crate) struct InvocationRow {
    pub(crate) id: String,
    /// Recorded in full: its record can be downloaded for replay.
    pub(crate) recorded: bool,
    pub(crate) when: String,
    pub(crate) outcome: String,
    pub(crate) message: Option<String>,
    pub(crate) duration_ms: u64,
    pub(crate) compute_units: u64,
    pub(crate) request_id: String,
    /// `(level, message)`.
    pub(crate) logs: Vec<(String, String)>,
}

impl From<plinth_core::plugins::InvocationRecord> for InvocationRow {
    fn from(record: plinth_core::plugins::InvocationRecord) -> Self {
        Self {
            id: record.id.to_string(),
            recorded: record.recorded,
            when: record.occurred_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            outcome: record.outcome,
            message: record.message,
            duration_ms: record.duration_ms,
            compute_units: record.compute_units,
            request_id: record.request_id,
            logs: record.logs.into_iter().map(|l| (l.level, l.message)).collect(),
        }
    }
}

/// What a call from the try-it box answered.
#[derive(Debug)]
pub(crate) struct TryAnswer {
    /// The plugin's JSON answer, indented.
    pub(crate) body: String,
    pub(crate) compute_units: u64,
    pub(crate) duration_ms: String,
    /// `(level, message)`.
    pub(crate) logs: Vec<(&'static str, String)>,
}

/// A version of one of the author's listings, with its checks and review.
#[derive(Debug)]
pub(crate) struct AuthoredVersion {
    pub(crate) row: ReviewRow,
    pub(crate) status: String,
    pub(crate) note: String,
}

#[derive(Debug)]
pub(crate) struct AuthoredPlugin {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) versions: Vec<AuthoredVersion>,
}

impl From<&plinth_core::plugins::Plugin> for AuthoredPlugin {
    fn from(plugin: &plinth_core::plugins::Plugin) -> Self {
        Self {
            name: plugin.name.clone(),
            description: plugin.description.clone(),
            versions: plugin
                .versions
                .iter()
                .map(|v| AuthoredVersion {
                    row: ReviewRow::from(v),
                    status: name_of(v.status),
                    note: v.review_note.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "portal/my_plugins.html")]
pub(crate) struct MyPluginsPage {
    pub(crate) chrome: Chrome,
    pub(crate) plugins: Vec<AuthoredPlugin>,
    pub(crate) can_manage: bool,
    pub(crate) csrf: String,
    pub(crate) error: Option<String>,
}

/// A tenant in the operators' directory.
#[derive(Debug)]
pub(crate) struct TenantRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) plan: String,
    pub(crate) status: String,
    pub(crate) created: String,
    pub(crate) calls: i64,
    pub(crate) spend: String,
}

#[derive(Template)]
#[template(path = "portal/tenants.html")]
pub(crate) struct TenantsPage {
    pub(crate) chrome: Chrome,
    pub(crate) query: String,
    pub(crate) tenants: Vec<TenantRow>,
    pub(crate) plans: Vec<PlanCard>,
}

/// A line of the reconciliation: ledger against what Stripe acknowledged.
#[derive(Debug)]
pub(crate) struct ReconciliationLine {
    pub(crate) tenant_id: String,
    pub(crate) meter: String,
    pub(crate) synced_until: String,
    pub(crate) ledger: i64,
    pub(crate) sent: i64,
    pub(crate) pending: i64,
    pub(crate) balanced: bool,
}

impl From<&plinth_core::billing::ReconciliationRow> for ReconciliationLine {
    fn from(row: &plinth_core::billing::ReconciliationRow) -> Self {
        Self {
            tenant_id: row.tenant_id.clone(),
            meter: row.meter.clone(),
            synced_until: row.synced_until.map_or_else(|| "never".to_owned(), time),
            ledger: row.ledger,
            sent: row.sent,
            pending: row.pending,
            balanced: row.ledger == row.sent + row.pending,
        }
    }
}

#[derive(Template)]
#[template(path = "portal/billing_ops.html")]
pub(crate) struct BillingOpsPage {
    pub(crate) chrome: Chrome,
    pub(crate) mode: String,
    pub(crate) stripe: bool,
    pub(crate) rows: Vec<ReconciliationLine>,
    pub(crate) balanced: bool,
    pub(crate) csrf: String,
}

pub(crate) fn date(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d").to_string()
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A share as a percentage, to a tenth: `93.3%`.
fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// A size in bytes, in the unit that reads best: `812 bytes`, `3.4 KiB`, `1.2 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    let tenths = |unit: u64| {
        let tenths = n.saturating_mul(10) / unit;
        format!("{}.{}", tenths / 10, tenths % 10)
    };
    if n < 1 << 10 {
        format!("{n} bytes")
    } else if n < 1 << 20 {
        format!("{} KiB", tenths(1 << 10))
    } else {
        format!("{} MiB", tenths(1 << 20))
    }
}

fn symbol(currency: &str) -> String {
    match currency {
        "usd" => "$".to_owned(),
        "eur" => "€".to_owned(),
        "gbp" => "£".to_owned(),
        other => format!("{} ", other.to_uppercase()),
    }
}

/// Minor units (cents) as money: `$12.34`.
pub(crate) fn cents(amount: i64, currency: &str) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let amount = amount.unsigned_abs();
    format!("{sign}{}{}.{:02}", symbol(currency), amount / 100, amount % 100)
}

/// Millionths of a unit as money, to the precision that matters: `$0.0010`, `$29.00`.
pub(crate) fn micros(amount: Micros, currency: &str) -> String {
    let amount = amount.0;
    let sign = if amount < 0 { "-" } else { "" };
    let amount = amount.unsigned_abs();
    let (whole, fraction) = (amount / 1_000_000, amount % 1_000_000);
    if fraction % 10_000 == 0 {
        format!("{sign}{}{whole}.{:02}", symbol(currency), fraction / 10_000)
    } else {
        let digits = format!("{fraction:06}");
        format!(
            "{sign}{}{whole}.{}",
            symbol(currency),
            digits.trim_end_matches('0')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_as_people_write_it() {
        assert_eq!(cents(2_900, "usd"), "$29.00");
        assert_eq!(cents(-5, "eur"), "-€0.05");
        assert_eq!(micros(Micros(29_000_000), "usd"), "$29.00");
        assert_eq!(micros(Micros(1_000), "usd"), "$0.001");
        assert_eq!(micros(Micros(1_500_000), "chf"), "CHF 1.50");
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(3_000_000), "3,000,000");
        assert_eq!(count(-12_345), "-12,345");
    }

    #[test]
    fn sizes_and_shares_read_as_people_write_them() {
        assert_eq!(bytes(812), "812 bytes");
        assert_eq!(bytes(3_482), "3.4 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
        assert_eq!(percent(0.9333), "93.3%");
        assert_eq!(percent(1.0), "100.0%");
    }

    #[test]
    fn bars_scale_to_the_largest_and_keep_small_values_visible() {
        let bars = bars(&[("a".into(), 0), ("b".into(), 1), ("c".into(), 1_000)]);
        assert_eq!(bars[0].height, 0);
        assert_eq!(bars[1].height, 1);
        assert_eq!(bars[2].height, CHART_HEIGHT);
        assert_eq!(bars[2].y, 0);
    }
}
