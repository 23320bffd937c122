//! `cmdflow`: one binary for every role and the client commands.

use std::process::ExitCode;

use clap::Parser;
use cmdflow_gateway::cli::client::{self, Client, EmitArgs};
use cmdflow_gateway::cli::{Cli, Cmd, roles};
use cmdflow_shared::{Config, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cmdflow: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cmdflow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    let server_config = || -> anyhow::Result<Config> {
        let config = Config::load()?;
        cmdflow_shared::tls::configure(config.tls_ca_file.as_deref())?;
        telemetry::init(&config.log_format);
        cmdflow_shared::metrics::install();
        Ok(config)
    };
    match cli.command {
        Cmd::Up { http, concurrency } => {
            let mut config = server_config()?;
            config.http_addr = http;
            if let Some(n) = concurrency {
                config.concurrency = n;
            }
            config.validate()?;
            roles::up(config).await
        }
        Cmd::Gateway { http } => {
            let mut config = server_config()?;
            config.http_addr = http;
            roles::gateway(config).await
        }
        Cmd::Worker { concurrency } => {
            let mut config = server_config()?;
            if let Some(n) = concurrency {
                config.concurrency = n;
            }
            config.validate()?;
            roles::worker(config).await
        }
        Cmd::Scheduler => roles::scheduler(server_config()?).await,
        Cmd::Archiver => roles::archiver(server_config()?).await,
        Cmd::Archive(cmdflow_gateway::cli::ArchiveCmd::Run { dry_run }) => {
            roles::archive_run(server_config()?, dry_run, json).await
        }
        Cmd::Key(cmdflow_gateway::cli::KeyCmd::New {
            name,
            scopes,
            event_types,
        }) => {
            print!(
                "{}",
                cmdflow_gateway::auth::new_key_entry(&name, &scopes, &event_types)?
            );
            Ok(())
        }
        Cmd::Migrate => {
            let config = server_config()?;
            roles::migrate(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Cmd::Emit {
            event_type,
            command,
            data,
            source,
            id,
            correlation,
            file,
        } => {
            let args = EmitArgs {
                event_type,
                command,
                data,
                source,
                id,
                correlation,
                file,
            };
            client::emit(&Client::from_env(json)?, args).await
        }
        Cmd::Start {
            kind,
            owner,
            data,
            wait,
        } => client::start(&Client::from_env(json)?, &kind, &owner, &data, wait).await,
        Cmd::Show { id } => client::show(&Client::from_env(json)?, &id).await,
        Cmd::History { id } => client::history(&Client::from_env(json)?, &id).await,
        Cmd::Feed { owner, kind, limit } => {
            client::feed(&Client::from_env(json)?, &owner, kind.as_deref(), limit).await
        }
        Cmd::Dlq(cmd) => cmdflow_gateway::cli::dlq::run(&Client::from_env(json)?, cmd).await,
        Cmd::Tree { id } => client::tree(&Client::from_env(json)?, &id).await,
        Cmd::Abort { id, reason } => client::abort(&Client::from_env(json)?, &id, reason).await,
    }
}
