//! `plinth-cli`: Plinth from a terminal, for application developers and plugin authors. Tables for
//! people, `--json` for scripts. Exit codes: 0 done, 1 the API refused (the message says why and what to
//! do) or a job followed by `train start --wait` did not succeed, 2 the command line was wrong, 3 not
//! logged in, 4 the server could not be reached or failed; `plugin replay`: 5 the plugin's host calls
//! diverged from the record, 6 it made the recorded calls but ended differently.

mod author;
mod profiles;
mod replay;
mod training;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use plinth_sdk::{
    Client, CreateApiKeyRequest, InstallationId, KeyId, LoginRequest, PluginManifest, Scope, UsageGrouping,
    UsageQuery,
};
use serde::Serialize;

use crate::profiles::{DEFAULT_API, Profile, Profiles};

#[derive(Debug, Parser)]
#[command(
    name = "plinth-cli",
    version,
    about = "Plinth for developers: keys, models, training, usage and plugins"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// The stored profile to use (`login` stores one per name).
    #[arg(long, global = true, env = "PLINTH_PROFILE", default_value = "default")]
    profile: String,
    /// The API's base URL; defaults to the profile's, then http://127.0.0.1:8080.
    #[arg(long, global = true, env = "PLINTH_API_URL")]
    api: Option<String>,
    /// Print the API's answer as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Log in and keep the session in the profile. The password is read from PLINTH_PASSWORD, or from
    /// the first line of standard input. With --api-key, keeps an API key instead (PLINTH_API_KEY or
    /// standard input).
    Login {
        #[arg(long, required_unless_present = "api_key")]
        email: Option<String>,
        #[arg(long, conflicts_with = "email")]
        api_key: bool,
    },
    /// End the session and forget the profile's credentials.
    Logout,
    /// The tenant these credentials act for.
    Whoami,
    /// API keys of the tenant.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Models: the platform's and the tenant's.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Classify texts with a model (e.g. `sentiment`).
    Classify {
        model: String,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Embed texts with an embedding model (e.g. `minilm-embed`): each text's vector.
    Embed {
        model: String,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Run a model on tensors: an Open Inference Protocol v2 request (JSON) from a file, or `-` for
    /// standard input; prints the response as JSON.
    Infer {
        model: String,
        #[arg(long)]
        request: PathBuf,
    },
    /// Labelled datasets to train models on.
    #[command(subcommand)]
    Datasets(training::DatasetsCommand),
    /// Fine-tune a platform base model on a dataset: start and follow a job, see how it did on
    /// held-out examples, deploy or export the model.
    #[command(subcommand)]
    Train(training::TrainCommand),
    /// Metered usage, by day or by resource.
    Usage {
        /// `YYYY-MM-DD` or RFC 3339; 30 days before `--to` by default.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        /// Group by resource (model or plugin) instead of by day.
        #[arg(long)]
        by_resource: bool,
    },
    /// Closed billing periods, newest first.
    Invoices,
    /// Plugins: publish, and what their invocations did.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    List,
    /// Create a key; its secret is shown once.
    Create {
        name: String,
        /// `inference`, `plugins`, `billing:read` or `admin`; repeat for several (default: inference).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    Revoke {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    List,
    /// Upload a model (a new version when the name exists): the ONNX file, its manifest (JSON: name,
    /// task, labels…) and, for text models, the tokenizer.
    Upload {
        /// The model's manifest, e.g. `{"name": "support-tone", "task": "text-classification", "labels": [...]}`.
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Delete a tenant model, every version.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Start a plugin from the template of its language: the handler, its manifest (plugin.json) and
    /// the WIT world, in a new folder.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: author::Language,
        /// Where to create it; `./<name>` by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rust: the guest SDK to depend on (the Plinth repository's plugins/sdk).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build the plugin in a folder into a WebAssembly component, `<name>.wasm` beside its manifest.
    Build {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Publish a version: the manifest and the built component (the first one opens the listing).
    /// Prints the checks' findings; a version is installable once the platform approved it.
    Publish {
        #[arg(long, default_value = "plugin.json")]
        manifest: PathBuf,
        /// The built component (.wasm); `<name>.wasm` beside the manifest by default (what `plugin
        /// build` writes).
        #[arg(long)]
        component: Option<PathBuf>,
    },
    /// An installation's newest invocations: outcome, duration, compute units.
    Invocations {
        installation: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// The log lines of an installation's newest invocations, oldest first.
    Logs {
        installation: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// How often the author's plugin was called per version and day across tenants (days with several
    /// tenants besides the author's own).
    Calls { plugin: String },
    /// Save an invocation recorded in full (its request, settings and every host call with its
    /// answer), to replay it or hand it to the plugin's author.
    Record {
        installation: String,
        invocation: String,
        /// Where to write it; standard output by default.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Run a component on a recorded invocation, on this machine, in the platform's sandbox: every
    /// host call is answered from the record. Exits 0 when the run makes the recorded calls and ends
    /// the same way, 5 when its host calls diverge from the record, 6 when it ends differently.
    Replay {
        /// The invocation to fetch (with --installation), when not replaying a saved record.
        #[arg(required_unless_present = "record", requires = "installation")]
        invocation: Option<String>,
        #[arg(long)]
        installation: Option<String>,
        /// A record saved by `plugin record` (no login needed).
        #[arg(long, conflicts_with_all = ["invocation", "installation"])]
        record: Option<PathBuf>,
        /// The component to run (.wasm): the published one, or your fix.
        #[arg(long)]
        component: PathBuf,
        /// A stand-in for a secret the record names (`NAME=VALUE`); otherwise `[secret NAME]`, as the
        /// record has it in place of the value.
        #[arg(long = "secret", value_name = "NAME=VALUE")]
        secrets: Vec<String>,
    },
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
enum Failure {
    Refused(plinth_sdk::Error),
    /// An argument the command line could not use (exit 2, as clap's own).
    Usage(String),
    NotLoggedIn(String),
    Unreachable(anyhow::Error),
    Local(anyhow::Error),
    /// A replay's host calls left the record (exit 5; the replay printed where).
    Diverged,
    /// A replay made the recorded calls but ended differently (exit 6).
    EndedDifferently,
}

impl From<plinth_sdk::Error> for Failure {
    fn from(err: plinth_sdk::Error) -> Self {
        match (&err, err.status()) {
            (_, Some(status)) if (400..500).contains(&status) => Self::Refused(err),
            (plinth_sdk::Error::Transport(_), _) | (plinth_sdk::Error::Api { .. }, _) => {
                Self::Unreachable(err.into())
            }
            (plinth_sdk::Error::Decode { status, .. }, _) if *status >= 500 => Self::Unreachable(err.into()),
            // A local file that could not be read: the message names it.
            (plinth_sdk::Error::Io { .. }, _) => Self::Local(err.into()),
            // An answer this version does not understand, or a bad URL: not the network's fault.
            _ => Self::Local(
                anyhow::Error::from(err)
                    .context("unexpected answer (is this plinth-cli as new as the server?)"),
            ),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Local(err)
    }
}

impl Failure {
    fn report(&self) -> ExitCode {
        match self {
            Self::Refused(err) => {
                eprintln!("error: {}", refused_message(err));
                if err.status() == Some(401) {
                    if token_from_environment().is_some() {
                        eprintln!("hint: the token in PLINTH_TOKEN was refused; unset it or replace it");
                    } else {
                        eprintln!("hint: log in again with `plinth-cli login --email you@example.com`");
                    }
                }
                ExitCode::from(1)
            }
            Self::Usage(message) => {
                eprintln!("error: {message}");
                ExitCode::from(2)
            }
            Self::NotLoggedIn(profile) => {
                eprintln!(
                    "error: profile `{profile}` has no credentials; run `plinth-cli login --email you@example.com` \
                     (or `--api-key`), or set PLINTH_TOKEN"
                );
                ExitCode::from(3)
            }
            Self::Unreachable(err) => {
                eprintln!("error: {err:#}");
                eprintln!(
                    "hint: is the server running at the profile's API URL? (`--api` or PLINTH_API_URL)"
                );
                ExitCode::from(4)
            }
            Self::Local(err) => {
                eprintln!("error: {err:#}");
                ExitCode::from(1)
            }
            Self::Diverged => ExitCode::from(5),
            Self::EndedDifferently => ExitCode::from(6),
        }
    }
}

/// The API's own words: its error code and message.
fn refused_message(err: &plinth_sdk::Error) -> String {
    match err {
        plinth_sdk::Error::Api { code, message, .. } => {
            let code = serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{code}: {message}")
        }
        other => other.to_string(),
    }
}

type Outcome = std::result::Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

struct Shell {
    global: Global,
    profiles: Profiles,
}

impl Shell {
    fn profile(&self) -> Profile {
        self.profiles.get(&self.global.profile)
    }

    fn api(&self) -> String {
        self.global
            .api
            .clone()
            .or_else(|| self.profile().api)
            .unwrap_or_else(|| DEFAULT_API.to_owned())
    }

    fn anonymous(&self) -> Result<Client, Failure> {
        Client::new(&self.api()).map_err(|err| Failure::Local(anyhow!("API URL `{}`: {err}", self.api())))
    }

    /// A client with the profile's credentials (PLINTH_TOKEN overrides them).
    fn client(&self) -> Result<Client, Failure> {
        let token = token_from_environment()
            .or_else(|| self.profile().token)
            .ok_or_else(|| Failure::NotLoggedIn(self.global.profile.clone()))?;
        Ok(self.anonymous()?.with_token(token))
    }

    /// Prints `value` as JSON with `--json`, else the table `table` makes of it.
    fn print<T: Serialize>(&self, value: &T, table: impl FnOnce(&T) -> Table) -> Outcome {
        self.print_text(value, |value| table(value).to_string())
    }

    /// Prints `value` as JSON with `--json`, else the text `text` makes of it (several tables, say).
    fn print_text<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) -> Outcome {
        if self.global.json {
            emit(&serde_json::to_string_pretty(value).context("cannot encode the answer")?)
        } else {
            emit(&text(value))
        }
    }
}

/// `client` reporting its uploads on a progress bar (on standard error, when it is a terminal).
fn uploading(client: Client, what: &str) -> (Client, indicatif::ProgressBar) {
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_owned());
    let shown = bar.clone();
    let client = client.with_upload_progress(std::sync::Arc::new(move |sent, total| {
        shown.set_length(total);
        shown.set_position(sent);
    }));
    (client, bar)
}

/// An amount in millionths of the currency unit, written out exactly.
fn micros(amount: plinth_sdk::Micros) -> String {
    let sign = if amount.0 < 0 { "-" } else { "" };
    let abs = amount.0.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// The token PLINTH_TOKEN names, which overrides the profile's for one command.
fn token_from_environment() -> Option<String> {
    std::env::var("PLINTH_TOKEN").ok().filter(|t| !t.is_empty())
}

/// Text a plugin (or anyone but this program) wrote, made safe for a terminal: control characters
/// (escape sequences that retitle the terminal, write the clipboard or forge lines) are shown escaped.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() && c != '\t' {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Writes a line to standard output; a reader that went away (`| head`) ends the output quietly.
fn emit(line: &str) -> Outcome {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(Failure::Local(
            anyhow::Error::from(err).context("cannot write the output"),
        )),
    }
}

/// Cents as an amount with its currency, e.g. `-1.50 USD`.
fn cents(amount: i64, currency: &str) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!("{sign}{}.{:02} {}", abs / 100, abs % 100, currency.to_uppercase())
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    table
}

/// A secret from `variable`, or else the first line of standard input.
fn secret_from(variable: &str, what: &str) -> Result<String> {
    if let Ok(value) = std::env::var(variable)
        && !value.is_empty()
    {
        return Ok(value);
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        // Typed at a terminal it would be echoed, and kept in the scrollback.
        anyhow::bail!(
            "set {variable}, or pipe the {what} on standard input (it is not read from a terminal)"
        );
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .with_context(|| format!("cannot read the {what} from standard input"))?;
    let value = line.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        anyhow::bail!("no {what}: set {variable} or pipe it on standard input");
    }
    Ok(value)
}

async fn run(cli: Cli) -> Outcome {
    let context = Shell {
        profiles: Profiles::load()?,
        global: cli.global,
    };
    match cli.command {
        Command::Login { email, api_key } => login(&context, email, api_key).await,
        Command::Logout => logout(&context).await,
        Command::Whoami => {
            let tenant = context.client()?.tenant().await?;
            context.print(&tenant, |t| {
                let mut out = table(&["tenant", "name", "plan"]);
                out.add_row(vec![t.id.to_string(), t.name.clone(), t.plan.clone()]);
                out
            })
        }
        Command::Keys(command) => keys(&context, command).await,
        Command::Models(command) => models(&context, command).await,
        Command::Datasets(command) => training::datasets(&context, command).await,
        Command::Train(command) => training::train(&context, command).await,
        Command::Classify { model, texts } => {
            let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let answer = context.client()?.classify(&model, &inputs).await?;
            context.print(&answer, |a| {
                let mut out = table(&["text", "label", "score"]);
                for (text, result) in texts.iter().zip(&a.results) {
                    out.add_row(vec![
                        text.clone(),
                        result.label.clone(),
                        format!("{:.3}", result.score),
                    ]);
                }
                out
            })
        }
        Command::Embed { model, texts } => {
            let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let answer = context.client()?.embed(&model, &inputs).await?;
            context.print(&answer, |a| {
                let mut out = table(&["text", "dimensions", "vector"]);
                for (text, vector) in texts.iter().zip(&a.embeddings) {
                    let head: Vec<String> = vector.iter().take(4).map(|x| format!("{x:.4}")).collect();
                    out.add_row(vec![
                        text.clone(),
                        vector.len().to_string(),
                        format!("[{}, …]", head.join(", ")),
                    ]);
                }
                out
            })
        }
        Command::Infer { model, request } => {
            let text = if request.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("cannot read the request from standard input")?
            } else {
                std::fs::read_to_string(&request)
                    .with_context(|| format!("cannot read the request {}", request.display()))?
            };
            let request: plinth_sdk::InferRequest = serde_json::from_str(&text).map_err(|err| {
                Failure::Usage(format!(
                    "the request is not an Open Inference Protocol request ({err}); see GET /v2/models/{model} for the inputs"
                ))
            })?;
            let answer = context.client()?.infer(&model, &request).await?;
            emit(&serde_json::to_string_pretty(&answer).context("cannot encode the answer")?)
        }
        Command::Usage {
            from,
            to,
            by_resource,
        } => {
            let query = UsageQuery {
                from,
                to,
                group_by: Some(if by_resource {
                    UsageGrouping::Resource
                } else {
                    UsageGrouping::Day
                }),
            };
            let report = context.client()?.usage(&query).await?;
            context.print(&report, |r| {
                let mut out = table(&[
                    if by_resource { "resource" } else { "day" },
                    "calls",
                    "units",
                    "amount",
                ]);
                for row in r.rows.iter().chain(std::iter::once(&r.total)) {
                    out.add_row(vec![
                        row.key.clone(),
                        row.calls.to_string(),
                        row.units.to_string(),
                        micros(row.amount_micros),
                    ]);
                }
                out
            })
        }
        Command::Invoices => {
            let list = context.client()?.invoices().await?;
            context.print(&list, |l| {
                let mut out = table(&["period", "plan", "calls", "total", "invoice"]);
                for statement in &l.invoices {
                    out.add_row(vec![
                        format!(
                            "{} – {}",
                            statement.period_start.format("%Y-%m-%d"),
                            statement.period_end.format("%Y-%m-%d")
                        ),
                        statement.plan.clone(),
                        statement.calls.to_string(),
                        cents(statement.total_cents, &statement.currency),
                        statement
                            .invoice
                            .as_ref()
                            .map_or("-".to_owned(), |invoice| invoice.status.clone()),
                    ]);
                }
                out
            })
        }
        Command::Plugin(command) => plugin(&context, command).await,
    }
}

async fn login(context: &Shell, email: Option<String>, api_key: bool) -> Outcome {
    let api = context.api();
    if token_from_environment().is_some() {
        eprintln!("warning: PLINTH_TOKEN is set: commands use it, not the credentials stored now");
    }
    let (token, tenant) = if api_key {
        let key = secret_from("PLINTH_API_KEY", "API key")?;
        let tenant = context.anonymous()?.with_token(&key).tenant().await?;
        (key, tenant)
    } else {
        let email = email.context("--email is required")?;
        let password = secret_from("PLINTH_PASSWORD", "password")?;
        let session = context
            .anonymous()?
            .login(&LoginRequest {
                email,
                password,
                tenant_id: None,
            })
            .await?;
        (session.token, session.tenant)
    };
    let name = context.global.profile.clone();
    Profiles::update(&name, |profile| {
        *profile = Profile {
            api: Some(api.clone()),
            token: Some(token),
        };
    })?;
    eprintln!(
        "logged in to {api} as tenant {} ({}); profile `{name}` saved in {}",
        tenant.name,
        tenant.id,
        profiles::config_dir()?.display()
    );
    Ok(())
}

async fn logout(context: &Shell) -> Outcome {
    let name = context.global.profile.clone();
    if token_from_environment().is_some() {
        eprintln!("warning: PLINTH_TOKEN is set and stays usable: logout ends only the profile's session");
    }
    let Some(token) = context.profile().token else {
        return Err(Failure::NotLoggedIn(name));
    };
    if token.starts_with("pls_") {
        // An expired or already ended session is logged out as far as the server is concerned.
        match context.anonymous()?.with_token(&token).logout().await {
            Ok(()) => {}
            Err(err) if err.status() == Some(401) => {}
            Err(err) => return Err(err.into()),
        }
    }
    // Only the token this command ended goes: another command may have changed the profile since.
    Profiles::update(&name, |stored| {
        if stored.token.as_deref() == Some(token.as_str()) {
            stored.token = None;
        }
    })?;
    eprintln!("logged out; profile `{name}` keeps no credentials");
    Ok(())
}

async fn keys(context: &Shell, command: KeysCommand) -> Outcome {
    let client = context.client()?;
    match command {
        KeysCommand::List => {
            let keys = client.api_keys().await?;
            context.print(&keys, |keys| {
                let mut out = table(&["id", "name", "key", "scopes", "last used", "revoked"]);
                for key in keys {
                    out.add_row(vec![
                        key.id.to_string(),
                        key.name.clone(),
                        key.redacted.clone(),
                        key.scopes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" "),
                        key.last_used_at
                            .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                        key.revoked_at
                            .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                    ]);
                }
                out
            })
        }
        KeysCommand::Create { name, scopes } => {
            let scopes = scopes
                .iter()
                .map(|s| {
                    s.parse::<Scope>().map_err(|_| {
                        Failure::Usage(format!(
                            "unknown scope `{s}`: use inference, plugins, billing:read or admin"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let created = client
                .create_api_key(&CreateApiKeyRequest {
                    name,
                    scopes: (!scopes.is_empty()).then_some(scopes),
                    rate_limit_per_minute: None,
                    expires_at: None,
                })
                .await?;
            context.print(&created, |c| {
                let mut out = table(&["id", "secret (shown once)"]);
                out.add_row(vec![c.key.id.to_string(), c.secret.clone()]);
                out
            })
        }
        KeysCommand::Revoke { id } => {
            let id: KeyId = id.parse().map_err(|_| {
                Failure::Usage(format!(
                    "`{id}` is not a key id (key_…); `plinth-cli keys list` shows them"
                ))
            })?;
            let revoked = client.revoke_api_key(&id).await?;
            context.print(&revoked, |k| {
                let mut out = table(&["id", "name", "revoked"]);
                out.add_row(vec![
                    k.id.to_string(),
                    k.name.clone(),
                    k.revoked_at.map_or("-".into(), |t| t.to_rfc3339()),
                ]);
                out
            })
        }
    }
}

async fn models(context: &Shell, command: ModelsCommand) -> Outcome {
    let client = context.client()?;
    match command {
        ModelsCommand::List => {
            let models = client.models().await?;
            context.print(&models, |models| {
                let mut out = table(&["name", "task", "version", "owner", "labels"]);
                for model in models {
                    out.add_row(vec![
                        model.name.clone(),
                        serde_json::to_value(model.task)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        model.version.to_string(),
                        if model.platform { "platform" } else { "tenant" }.to_owned(),
                        model.labels.join(" "),
                    ]);
                }
                out
            })
        }
        ModelsCommand::Upload {
            manifest,
            model,
            tokenizer,
        } => {
            let read = |path: &PathBuf, what: &str| {
                std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
            };
            let manifest_value: serde_json::Value = serde_json::from_slice(&read(&manifest, "manifest")?)
                .with_context(|| format!("{} is not JSON", manifest.display()))?;
            let bytes = read(&model, "model")?;
            let tokenizer = tokenizer.as_ref().map(|t| read(t, "tokenizer")).transpose()?;
            let (client, bar) = uploading(client, &format!("uploading {}", model.display()));
            let uploaded = client.upload_model(&manifest_value, bytes, tokenizer).await;
            bar.finish_and_clear();
            let uploaded = uploaded?;
            context.print(&uploaded, |m| {
                let mut out = table(&["name", "version", "labels"]);
                out.add_row(vec![m.name.clone(), m.version.to_string(), m.labels.join(" ")]);
                out
            })
        }
        ModelsCommand::Delete { name } => {
            client.delete_model(&name).await?;
            eprintln!("deleted model `{name}` (every version)");
            Ok(())
        }
    }
}

fn invocation_id(raw: &str) -> Result<plinth_sdk::InvocationId, Failure> {
    raw.parse().map_err(|_| {
        Failure::Usage(format!(
            "`{raw}` is not an invocation id (inv_…); `plinth-cli plugin invocations <installation>` lists them"
        ))
    })
}

fn installation_id(raw: &str) -> Result<InstallationId, Failure> {
    raw.parse().map_err(|_| {
        Failure::Usage(format!(
            "`{raw}` is not an installation id (ins_…); GET /v1/installations lists them"
        ))
    })
}

async fn plugin(context: &Shell, command: PluginCommand) -> Outcome {
    let command = match command {
        PluginCommand::New { name, lang, dir, sdk } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            return author::new(&name, lang, &dir, sdk.as_deref());
        }
        PluginCommand::Build { dir } => {
            let built = author::build(&dir)?;
            let size = std::fs::metadata(&built).map_or(0, |m| m.len());
            eprintln!("built {} ({} KiB)", built.display(), size >> 10);
            return Ok(());
        }
        other => other,
    };
    if let PluginCommand::Replay {
        invocation,
        installation,
        record,
        component,
        secrets,
    } = command
    {
        let record = match (record, invocation, installation) {
            (Some(path), _, _) => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the record {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not an invocation record", path.display()))?
            }
            (None, Some(invocation), Some(installation)) => {
                context
                    .client()?
                    .invocation_record(&installation_id(&installation)?, &invocation_id(&invocation)?)
                    .await?
            }
            _ => {
                return Err(Failure::Usage(
                    "name an invocation and --installation, or --record".into(),
                ));
            }
        };
        return replay::run(context, &record, &component, &secrets).await;
    }
    let client = context.client()?;
    match command {
        PluginCommand::Replay { .. } | PluginCommand::New { .. } | PluginCommand::Build { .. } => {
            unreachable!("handled above")
        }
        PluginCommand::Record {
            installation,
            invocation,
            output,
        } => {
            let record = client
                .invocation_record(&installation_id(&installation)?, &invocation_id(&invocation)?)
                .await?;
            let text = serde_json::to_string_pretty(&record).context("cannot write the record")? + "\n";
            match output {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "saved {} ({} host calls) to {}: the request, the settings and what the plugin read and wrote, each secret's value replaced",
                        record.invocation_id,
                        record.host_calls.len(),
                        path.display()
                    );
                    Ok(())
                }
                None => Ok(emit(text.trim_end())?),
            }
        }
        PluginCommand::Publish { manifest, component } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("cannot read the manifest {}", manifest.display()))?;
            let parsed: PluginManifest = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a plugin manifest", manifest.display()))?;
            let component = component.unwrap_or_else(|| {
                manifest
                    .parent()
                    .unwrap_or_else(|| std::path::Path::new("."))
                    .join(format!("{}.wasm", parsed.name))
            });
            let manifest = parsed;
            let bytes = std::fs::read(&component)
                .with_context(|| format!("cannot read the component {}", component.display()))?;
            // The first version of a plugin opens its listing.
            match client.plugin(&manifest.name).await {
                Ok(_) => {}
                Err(err) if err.status() == Some(404) => {
                    client
                        .create_plugin(&manifest.name, &manifest.description)
                        .await?;
                    eprintln!("created the listing `{}`", manifest.name);
                }
                Err(err) => return Err(err.into()),
            }
            let (uploader, bar) = uploading(client.clone(), &format!("publishing {}", component.display()));
            let version = uploader.publish_plugin_version(&manifest, bytes).await;
            bar.finish_and_clear();
            let version = version?;
            context.print(&version, |v| {
                let mut out = table(&["plugin", "version", "status", "checks"]);
                out.add_row(vec![
                    v.plugin.clone(),
                    v.version.clone(),
                    format!("{:?}", v.status).to_lowercase(),
                    v.checks.to_string(),
                ]);
                out
            })
        }
        PluginCommand::Invocations { installation, limit } => {
            let records = client
                .invocations(&installation_id(&installation)?, Some(limit))
                .await?;
            context.print(&records, |records| {
                let mut out = table(&["when", "id", "version", "outcome", "ms", "compute", "request"]);
                for r in records {
                    out.add_row(vec![
                        r.occurred_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        r.id.to_string(),
                        r.version.clone(),
                        r.message
                            .as_ref()
                            .map_or(r.outcome.clone(), |m| format!("{}: {}", r.outcome, printable(m))),
                        r.duration_ms.to_string(),
                        r.compute_units.to_string(),
                        r.request_id.clone(),
                    ]);
                }
                out
            })
        }
        PluginCommand::Logs { installation, limit } => {
            let records = client
                .invocations(&installation_id(&installation)?, Some(limit))
                .await?;
            if context.global.json {
                return context.print(&records, |_| Table::new());
            }
            for record in records.iter().rev() {
                for line in &record.logs {
                    emit(&format!(
                        "{} {} {:<5} {}",
                        record.occurred_at.format("%H:%M:%S%.3f"),
                        record.id,
                        printable(&line.level),
                        printable(&line.message)
                    ))?;
                }
            }
            Ok(())
        }
        PluginCommand::Calls { plugin } => {
            let summary = client.invocation_summary(&plugin).await?;
            context.print(&summary, |days| {
                let mut out = table(&["day", "version", "calls"]);
                for day in days {
                    out.add_row(vec![day.day.clone(), day.version.clone(), day.calls.to_string()]);
                }
                out
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_plugins_are_shown_not_obeyed() {
        assert_eq!(printable("plain\ttext"), "plain\ttext");
        assert_eq!(printable("\u{1b}]0;pwned\u{7}"), "\\u{1b}]0;pwned\\u{7}");
        assert_eq!(printable("two\nlines"), "two\\nlines");
    }

    #[test]
    fn amounts_keep_their_sign() {
        assert_eq!(cents(-150, "usd"), "-1.50 USD");
        assert_eq!(cents(-50, "eur"), "-0.50 EUR");
        assert_eq!(cents(1234, "usd"), "12.34 USD");
        assert_eq!(micros(plinth_sdk::Micros(-1_500_000)), "-1.500000");
    }
}
