//! The `invoice-worker` binary: turns `cli::run`'s result into an exit code.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = invoice_worker::cli::Cli::parse();
    if let Err(e) = invoice_worker::cli::run(cli).await {
        eprintln!("invoice-worker: {e}");
        std::process::exit(e.exit_code());
    }
}
