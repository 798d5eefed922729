#!/usr/bin/env bash
# Builds target/debian/invoice-worker_<version>-1_amd64.deb with cargo-deb: the release
# binary, the man pages and completions generated from the clap definitions
# (examples/package_assets.rs), and the assets listed in Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi
cargo build --release --bin invoice-worker
rm -rf target/package-assets
cargo run --release --quiet --example package_assets -- target/package-assets
# Reproducible, as Debian wants man pages: best compression, no name or time stamp.
gzip -9n target/package-assets/man/*.1
# The conffile is the commented worker.toml with the database in the state directory, the
# one place the unit lets the daemon write.
sed 's|^path = "invoice-worker.db"$|path = "/var/lib/invoice-worker/queue.db"|' worker.toml \
    > target/package-assets/worker.toml
grep -q '^path = "/var/lib/invoice-worker/queue.db"$' target/package-assets/worker.toml || {
    echo "worker.toml: the [database] path line was not found" >&2
    exit 1
}
# The release profile keeps line tables for backtraces; the packaged binary is stripped.
cargo deb --no-build --strip "$@"
