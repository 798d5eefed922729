//! Writes the man pages and shell completions of `invoice-worker`, generated from its clap
//! definitions, for the Debian package (`packaging/build-deb.sh` runs it):
//!
//! ```sh
//! cargo run --release --example package_assets -- target/package-assets
//! ```
//!
//! Into the directory given: `man/invoice-worker.1` and a page per subcommand
//! (`invoice-worker-run.1`, …), and `completions/` for bash, zsh and fish.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/package-assets"));
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let command = invoice_worker::cli::Cli::command();
    clap_mangen::generate_to(command.clone(), &man)?;
    for (shell, file) in [
        (Shell::Bash, "invoice-worker"),
        (Shell::Zsh, "_invoice-worker"),
        (Shell::Fish, "invoice-worker.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), "invoice-worker", &mut out);
        std::fs::write(completions.join(file), out)?;
    }
    println!("man pages and completions written to {}", dir.display());
    Ok(())
}
