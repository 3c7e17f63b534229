//! The `ugc-subgraph` command line: `serve` (default), `migrate`, `seed`,
//! `print-schema`, `token` (development tokens).

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::state::AppState;
use crate::store::seed::SeedPlan;
use crate::{graphql, server, shutdown, telemetry};

#[derive(Parser)]
#[command(name = "ugc-subgraph", version, about = "Apollo Federation 2 subgraph for reviews and ratings of offers")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve GraphQL (the default).
    Serve,
    /// Apply migrations and exit.
    Migrate,
    /// Replace all reviews with deterministic generated data.
    Seed {
        #[arg(long, default_value_t = 1000)]
        offers: u32,
        #[arg(long, default_value_t = 5000)]
        users: u32,
        #[arg(long, default_value_t = 50_000)]
        reviews: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Print the federation SDL (what schema/ugc-subgraph.graphql holds).
    PrintSchema,
    /// Print a development token for mutations, signed with UGC_JWT_SECRET.
    Token {
        /// The user id (JWT `sub`).
        #[arg(long)]
        sub: String,
        /// Add the `moderator` role.
        #[arg(long)]
        moderator: bool,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

/// Runs the command line.
///
/// # Errors
/// Bad configuration, Postgres unreachable for `migrate`/`seed`, a failed
/// listener.
pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::PrintSchema = command {
        print!("{}", graphql::sdl(&graphql::schema_builder().finish()));
        return Ok(());
    }
    let config = Config::from_env().context("invalid configuration")?;
    if let Command::Token { sub, moderator, ttl_secs } = &command {
        let secret = config.auth.jwt_secret.as_deref().context("UGC_JWT_SECRET is not set: nothing to sign with")?;
        println!("{}", crate::http::auth::issue(secret, sub, *moderator, *ttl_secs)?);
        return Ok(());
    }
    let traces = telemetry::init(config.log_format, config.traces.as_ref())
        .context("cannot set up the OTLP trace exporter (OTEL_EXPORTER_OTLP_ENDPOINT)")?;
    let state = AppState::build(config).context("cannot set up the database and cache clients")?;
    let outcome = run_command(command, state).await;
    if let Some(traces) = traces {
        // Flushing blocks on the exporter: off the runtime's workers, bounded.
        let flush = tokio::task::spawn_blocking(move || traces.shutdown());
        let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
    }
    outcome
}

async fn run_command(command: Command, state: AppState) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            state.store.migrate().await.context("migration failed")?;
            tracing::info!("migrations applied");
        }
        Command::Seed { offers, users, reviews, seed } => {
            state.store.migrate().await.context("migration failed")?;
            let report = state.store.seed(SeedPlan { offers, users, reviews, seed }).await?;
            println!(
                "seeded {} reviews over {offers} offers and {users} users (seed {seed}) in {:.2} s",
                report.reviews,
                report.elapsed.as_secs_f64()
            );
        }
        Command::Serve => serve(state).await?,
        Command::PrintSchema | Command::Token { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// How many of the hottest recorded keys a starting instance preloads.
const WARM_UP_KEYS: usize = 2_000;

async fn serve(state: AppState) -> anyhow::Result<()> {
    state.store.migrate().await.context("migration failed (is Postgres up? see DATABASE_URL)")?;
    crate::events::fanout::sync_epoch(&state.events).await;
    let addr = state.config.http.listen;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (UGC_LISTEN)"))?;
    tracing::info!(config = ?state.config, "configuration");
    if state.config.http.graphiql {
        tracing::info!("serving GraphQL on http://{addr}/graphql (GraphiQL: open it in a browser)");
    } else {
        tracing::info!("serving GraphQL on http://{addr}/graphql (GraphiQL off: UGC_GRAPHIQL=on to serve it)");
    }
    let grace: Duration = state.config.http.shutdown_timeout;
    let stop = CancellationToken::new();
    let background = state.spawn_background(&stop);
    let cache = state.cache.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let warmed = cache.warm_up(WARM_UP_KEYS).await;
        if warmed > 0 {
            tracing::info!(keys = warmed, ms = started.elapsed().as_millis() as u64, "L1 warmed with the hottest keys");
        }
    });
    if let Some(metrics_addr) = state.config.http.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("cannot listen on {metrics_addr} (UGC_METRICS_LISTEN)"))?;
        tracing::info!("serving /metrics on http://{metrics_addr}/metrics");
        let (router, http) = (crate::http::metrics_router(state.clone()), state.config.http.clone());
        let stop = stop.clone();
        tokio::spawn(async move { server::serve_router(metrics, router, &http, stop.cancelled_owned()).await });
    }
    let (state_drain, draining) = (state.config.http.shutdown_drain, std::sync::Arc::clone(&state.draining));
    let server = tokio::spawn(server::serve(listener, state, stop.clone().cancelled_owned()));
    // SIGTERM (an orchestrator): readiness fails first and requests are
    // still served for the drain period, so that load balancers stop
    // sending before the listener closes. SIGINT (a person): at once.
    let drain = state_drain;
    if shutdown::signal().await == shutdown::Signal::Terminate && !drain.is_zero() {
        draining.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(drain_ms = drain.as_millis() as u64, "draining: readiness fails, still serving");
        tokio::time::sleep(drain).await;
    }
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(Ok(()))) => tracing::info!("in-flight requests finished; bye"),
        Ok(Ok(Err(e))) => return Err(e).context("server failed"),
        Ok(Err(e)) => return Err(e).context("server task failed"),
        Err(_) => tracing::warn!(grace_secs = grace.as_secs(), "shutdown timed out; exiting with requests in flight"),
    }
    Ok(())
}
