//! The `spegel` binary: parse the command line, set up logging, hand over to the library.
use std::process::ExitCode;

use clap::Parser as _;
use spegel::config::{Cli, Command, LogArgs, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_tracing(args: &LogArgs) -> Result<(), String> {
    let filter = EnvFilter::try_new(&args.log).map_err(|e| format!("invalid --log filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = init_tracing(&cli.log) {
        eprintln!("spegel: {err}");
        return ExitCode::from(64); // EX_USAGE
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("spegel: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let done: anyhow::Result<()> = match cli.command {
            Command::Status(args) => {
                return Ok(ExitCode::from(spegel::admin::client::main(args).await));
            }
            Command::Run(args) => {
                spegel::daemon::run(*args, spegel::daemon::shutdown_signal()).await
            }
            Command::ConfigureMirror(args) => spegel::mirror::main(args).await,
            Command::InstallCa(args) => spegel::tls::ca::main(args).await,
            Command::NodeSetup(args) => spegel::node_setup::main(args).await,
        };
        done.map(|()| ExitCode::SUCCESS)
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}
