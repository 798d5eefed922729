#!/usr/bin/env bash
# Checks the package build-deb.sh made, then installs, reinstalls (the upgrade path),
# removes and purges it on this machine, checking files, modes, the user and group and
# check-config at each step. Needs root and dpkg; systemd need not run as PID 1.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test-deb: $*" >&2; exit 1; }
# It installs into this machine: root, dpkg and lintian are needed. Outside CI a missing one
# skips the test loudly; in CI it fails.
missing=""
[ "$(id -u)" = 0 ] || missing=" root"
command -v dpkg >/dev/null 2>&1 || missing="$missing dpkg"
command -v lintian >/dev/null 2>&1 || missing="$missing lintian"
if [ -n "$missing" ]; then
    [ "${CI:-}" = true ] && fail "needs$missing"
    echo "test-deb: SKIPPED, this machine lacks:$missing (CI installs and runs it)" >&2
    exit 0
fi

deb=$(ls target/debian/invoice-worker_*_amd64.deb 2>/dev/null | tail -1)
[ -n "$deb" ] || fail "no package in target/debian: run packaging/build-deb.sh first"
mode_of() { stat -c '%a %U %G' "$1"; }
expect_mode() { [ "$(mode_of "$1")" = "$2" ] || fail "$1 is $(mode_of "$1"), expected $2"; }

echo "== lintian $deb"
lintian --fail-on error --tag-display-limit 0 "$deb"

if dpkg -s invoice-worker >/dev/null 2>&1; then
    fail "invoice-worker is installed already; purge it first (dpkg -P invoice-worker)"
fi

echo "== dpkg -i (first install)"
out=$(dpkg -i "$deb" 2>&1) || fail "dpkg -i failed: $out"
echo "$out"
echo "$out" | grep -q "enabled, but not started" || fail "the install did not say the service waits for credentials"

getent group invoice-worker >/dev/null || fail "no group invoice-worker"
uid=$(getent passwd invoice-worker | cut -d: -f3)
[ -n "$uid" ] && [ "$uid" -lt 1000 ] || fail "invoice-worker is not a system user (uid '$uid')"
[ "$(getent passwd invoice-worker | cut -d: -f7)" = /usr/sbin/nologin ] || fail "invoice-worker has a login shell"
[ -x /usr/bin/invoice-worker ] || fail "no /usr/bin/invoice-worker"
/usr/bin/invoice-worker --version | grep -q '^invoice-worker ' || fail "--version"
expect_mode /usr/bin/invoice-worker "755 root root"
expect_mode /lib/systemd/system/invoice-worker.service "644 root root"
expect_mode /etc/invoice-worker "750 root invoice-worker"
expect_mode /etc/invoice-worker/worker.toml "640 root invoice-worker"
expect_mode /etc/invoice-worker/credentials "750 root invoice-worker"
expect_mode /var/lib/invoice-worker "700 invoice-worker invoice-worker"
for f in /usr/share/doc/invoice-worker/operations.md /usr/share/doc/invoice-worker/README.Debian \
         /usr/share/man/man1/invoice-worker.1.gz /usr/share/man/man1/invoice-worker-run.1.gz \
         /usr/share/bash-completion/completions/invoice-worker \
         /usr/share/zsh/vendor-completions/_invoice-worker \
         /usr/share/fish/vendor_completions.d/invoice-worker.fish; do
    [ -f "$f" ] || fail "missing $f"
done
zcat /usr/share/man/man1/invoice-worker.1.gz | grep -q '^\.TH' || fail "the man page is not a man page"
dpkg-query -W -f='${Conffiles}\n' invoice-worker | grep -q ' /etc/invoice-worker/worker.toml ' \
    || fail "worker.toml is not a conffile"
[ -L /etc/systemd/system/multi-user.target.wants/invoice-worker.service ] || fail "the unit is not enabled"
grep -q '^ExecStart=/usr/bin/invoice-worker run --config /etc/invoice-worker/worker.toml$' \
    /lib/systemd/system/invoice-worker.service || fail "ExecStart does not run the packaged binary"
grep -q '^path = "/var/lib/invoice-worker/queue.db"$' /etc/invoice-worker/worker.toml \
    || fail "the installed config does not put the database in the state directory"

echo "== check-config on the installed config (no credentials yet: exit 2 naming them)"
set +e
err=$(/usr/bin/invoice-worker check-config --config /etc/invoice-worker/worker.toml 2>&1 >/dev/null)
code=$?
set -e
[ "$code" = 2 ] || fail "check-config exited $code, expected 2: $err"
echo "$err" | grep -q "missing credentials" || fail "check-config does not name the missing credentials: $err"
echo "$err" | grep -q "rebill.app_secret" || fail "check-config does not name rebill.app_secret: $err"

echo "== the service user can use the state directory"
runuser -u invoice-worker -- /usr/bin/invoice-worker migrate --config /etc/invoice-worker/worker.toml
expect_mode /var/lib/invoice-worker/queue.db "600 invoice-worker invoice-worker"
runuser -u invoice-worker -- /usr/bin/invoice-worker enqueue rebill --config /etc/invoice-worker/worker.toml \
    --tax-num 91310117568051222X --orderno DEB-1 | grep -q enqueued || fail "enqueue as the service user"

echo "== a local edit of the conffile survives a reinstall (the upgrade path)"
echo "# local edit" >> /etc/invoice-worker/worker.toml
out=$(dpkg -i --force-confold "$deb" 2>&1) || fail "reinstall failed: $out"
echo "$out"
grep -q '^# local edit$' /etc/invoice-worker/worker.toml || fail "the reinstall replaced the edited conffile"
expect_mode /etc/invoice-worker/worker.toml "640 root invoice-worker"
[ -f /var/lib/invoice-worker/queue.db ] || fail "the reinstall lost the database"

echo "== dpkg -r: binary gone, configuration, database and user kept"
dpkg -r invoice-worker
[ ! -e /usr/bin/invoice-worker ] || fail "/usr/bin/invoice-worker left after remove"
[ -f /etc/invoice-worker/worker.toml ] || fail "remove deleted the configuration"
[ -f /var/lib/invoice-worker/queue.db ] || fail "remove deleted the database"
getent passwd invoice-worker >/dev/null || fail "remove deleted the user"

echo "== dpkg -P: configuration, credentials, database, user and group gone"
dpkg -P invoice-worker
for p in /etc/invoice-worker /var/lib/invoice-worker /lib/systemd/system/invoice-worker.service \
         /etc/systemd/system/multi-user.target.wants/invoice-worker.service; do
    [ ! -e "$p" ] || fail "$p left after purge"
done
! getent passwd invoice-worker >/dev/null || fail "the user is left after purge"
! getent group invoice-worker >/dev/null || fail "the group is left after purge"

echo "test-deb: all checks passed"
