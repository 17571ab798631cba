//! `plinth`: the platform's one binary.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use plinth_core::api::Plan;
use plinth_core::id::TenantId;
use plinth_server::config::{Config, LogFormat};
use plinth_store::audit::Who;

#[derive(Debug, Parser)]
#[command(name = "plinth", version, about = "Host models, sell plugins, bill per call.")]
struct Cli {
    /// A TOML configuration file (also `PLINTH_CONFIG`); `PLINTH_*` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply migrations, then serve the API.
    Serve,
    /// Apply database migrations and seed the default plans, then exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi {
        /// Write it to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print the effective configuration, after validation.
    Config,
    /// Operator tasks.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Money: usage sync to Stripe, reconciliation, author payouts.
    #[command(subcommand)]
    Billing(BillingCommand),
}

#[derive(Debug, Subcommand)]
enum BillingCommand {
    /// Push settled usage to Stripe's meters now (the server also does this every interval).
    Sync,
    /// Compare the ledger with what Stripe's meters were sent; exits 2 when they differ.
    Reconcile,
    /// Compare the Stripe prices with the plans they sell; prints each difference, exits 2 if any.
    CheckPrices,
    /// Pay onboarded plugin authors what tenants paid for their plugins up to the end of a month that
    /// has ended (safe to rerun, at any age).
    Payouts {
        /// `YYYY-MM`.
        #[arg(long)]
        period: String,
    },
    /// Local billing: record that a tenant paid the statement of a closed period, so the plugin fees
    /// on it become payable to their authors.
    MarkPaid {
        #[arg(long)]
        tenant: TenantId,
        /// The statement's `period_start` (RFC 3339), as `GET /v1/invoices` shows it.
        #[arg(long)]
        period_start: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create a platform operator account with this email. The password is read from
    /// `PLINTH_ADMIN_PASSWORD` or, if unset, from standard input. An existing account is refused: with
    /// `--promote-existing`, it is promoted only if the password is that account's own.
    CreateAdmin {
        #[arg(long)]
        email: String,
        /// Promote an account that already exists (the password must be its password).
        #[arg(long)]
        promote_existing: bool,
    },
    /// Take platform-operator rights away from a user.
    RevokeAdmin {
        #[arg(long)]
        email: String,
    },
    /// Insert the default plans that are missing (never overwrites edits).
    SeedPlans,
    /// The last step of rotating `PLINTH_SECRET_KEY`: reseal every stored secret under the current
    /// key (opening each under whichever configured key sealed it). Run it once every replica has the
    /// new key as `PLINTH_SECRET_KEY` and the old one in `PLINTH_SECRET_KEYS_PREVIOUS`; afterwards the
    /// old key can go.
    RotateSecretKey,
    /// List the plans as JSON.
    Plans,
    /// Create or replace a plan from JSON (the shape `GET /v1/plans` returns), e.g. `--json '{...}'`.
    PutPlan {
        #[arg(long)]
        json: String,
    },
    /// Move a tenant to another plan.
    SetPlan {
        #[arg(long)]
        tenant: TenantId,
        #[arg(long)]
        plan: String,
    },
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("PLINTH_ADMIN_PASSWORD") {
        return Ok(password);
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("cannot read the password from standard input")?;
    Ok(password.trim_end_matches(['\r', '\n']).to_owned())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Openapi { output } = &cli.command {
        let json = plinth_api::openapi::to_json()?;
        match output {
            Some(path) => {
                std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
            }
            None => print!("{json}"),
        }
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    init_logging(&config);
    match cli.command {
        Command::Openapi { .. } => unreachable!("handled above"),
        Command::Config => println!("{}", serde_json::to_string_pretty(&config.redacted())?),
        Command::Serve => {
            plinth_server::start(&config)
                .await?
                .serve_until_signalled(config.shutdown_delay())
                .await?;
        }
        Command::Migrate => {
            plinth_server::open_store(&config).await?;
            eprintln!("migrations applied");
        }
        Command::Billing(command) => billing(&config, command).await?,
        Command::Admin(admin) => {
            let store = plinth_server::open_store(&config).await?;
            let operator = Who::internal(Who::OPERATOR);
            match admin {
                AdminCommand::CreateAdmin {
                    email,
                    promote_existing,
                } => {
                    let user = store
                        .create_platform_admin(&email, &read_password()?, promote_existing, &operator)
                        .await?;
                    println!("{} is a platform admin ({})", user.email, user.id);
                }
                AdminCommand::RevokeAdmin { email } => {
                    let user = store.revoke_platform_admin(&email, &operator).await?;
                    println!("{} is no longer a platform admin ({})", user.email, user.id);
                }
                AdminCommand::SeedPlans => eprintln!("default plans present"),
                AdminCommand::RotateSecretKey => {
                    let secrets = plinth_server::secret_box(&config)?;
                    // Passes until one finds nothing: a replica not yet on the new key may have sealed
                    // something under the old one meanwhile.
                    let mut resealed = 0;
                    for _ in 0..3 {
                        let pass = store.reseal_installation_secrets(&secrets).await?
                            + store.reseal_datasets(&secrets).await?;
                        resealed += pass;
                        if pass == 0 {
                            break;
                        }
                    }
                    store
                        .audit(
                            None,
                            &operator,
                            "secrets.resealed",
                            None,
                            serde_json::json!({ "key_id": secrets.primary_id(), "resealed": resealed }),
                        )
                        .await?;
                    println!(
                        "{resealed} installations' secrets and datasets resealed under key {id}; remove the previous keys once every replica runs with key {id} as PLINTH_SECRET_KEY",
                        id = secrets.primary_id()
                    );
                }
                AdminCommand::Plans => {
                    println!("{}", serde_json::to_string_pretty(&store.list_plans().await?)?);
                }
                AdminCommand::PutPlan { json } => {
                    let plan: Plan = serde_json::from_str(&json).context("--json is not a plan")?;
                    let saved = store.upsert_plan(&plan).await?;
                    store
                        .audit(
                            None,
                            &operator,
                            "plan.put",
                            Some(&saved.id),
                            serde_json::to_value(&saved)?,
                        )
                        .await?;
                    println!("{}", serde_json::to_string_pretty(&saved)?);
                }
                AdminCommand::SetPlan { tenant, plan } => {
                    let subscription = store.change_plan(&tenant, &plan, &operator).await?;
                    println!("{}", serde_json::to_string_pretty(&subscription)?);
                }
            }
        }
    }
    Ok(())
}

async fn billing(config: &Config, command: BillingCommand) -> anyhow::Result<()> {
    let store = plinth_server::open_store(config).await?;
    let billing = plinth_server::billing(config, store.clone())?;
    match command {
        BillingCommand::Sync => {
            let report = billing.sync_now().await?;
            store
                .audit(
                    None,
                    &Who::internal(Who::OPERATOR),
                    "billing.sync",
                    None,
                    serde_json::to_value(report)?,
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        BillingCommand::Reconcile => {
            let report = billing.reconcile().await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.balanced {
                std::process::exit(2);
            }
        }
        BillingCommand::CheckPrices => {
            let problems = billing.check_prices().await?;
            for problem in &problems {
                println!("{problem}");
            }
            if !problems.is_empty() {
                std::process::exit(2);
            }
            println!("every Stripe price matches its plan");
        }
        BillingCommand::Payouts { period } => {
            let run = billing
                .run_payouts(&period, chrono::Utc::now(), &Who::internal(Who::OPERATOR))
                .await?;
            println!("{}", serde_json::to_string_pretty(&run)?);
        }
        BillingCommand::MarkPaid { tenant, period_start } => {
            let invoice = billing
                .mark_statement_paid(&tenant, period_start, &Who::internal(Who::OPERATOR))
                .await?;
            println!("{}", serde_json::to_string_pretty(&invoice)?);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(err) = run(Cli::parse()).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
