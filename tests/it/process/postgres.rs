//! What only the PostgreSQL backend has, through the real binary: a server that stops and
//! comes back mid-drain, a refused login, the password kept out of every output, and the
//! sandbox on a database of the operator's choosing.

use super::*;
use crate::common::{free_port, WriteLock};
use invoice_worker::store::postgres::cluster::{self, ScratchCluster, SUPERUSER_PASSWORD};

/// The shared throwaway server, or `None` (a loud skip outside CI) without one.
fn shared_cluster() -> Option<&'static ScratchCluster> {
    cluster::shared()
}

async fn healthz(client: &reqwest::Client, base: &str) -> Option<u16> {
    let response = client.get(format!("{base}/healthz")).send().await.ok()?;
    Some(response.status().as_u16())
}

/// Waits (up to `limit`) until `/healthz` answers `code`.
async fn wait_health(client: &reqwest::Client, base: &str, code: u16, limit: Duration, what: &str) {
    wait_until(limit, what, || async {
        healthz(client, base).await == Some(code)
    })
    .await;
}

/// The server stopped mid-drain: the daemon says so, `/healthz` answers 503 meanwhile, no
/// panic; once the server is back it reconnects by itself, every row is done and accepted,
/// and none is sent twice: the calls in flight when it went are written once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_reported_and_recovered_from_without_loss() {
    const ROWS: usize = 300;
    if shared_cluster().is_none() {
        return;
    }
    // A server of its own: stopping the shared one would fail every other test.
    let own = tokio::task::spawn_blocking(ScratchCluster::start)
        .await
        .expect("start task")
        .expect("a throwaway server of this test's own");
    let world = World::on_cluster(
        &own,
        SimOptions {
            latency: Duration::from_millis(40),
            ..Default::default()
        },
    )
    .await;
    let port = free_port();
    let config = write_toml(
        &world,
        "pg-stop.toml",
        &[],
        &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("PGSTOP-{i:03}")).collect();
    // A rate limit, so that the drain spans the outage.
    let config_text = std::fs::read_to_string(&config).expect("config").replacen(
        "rate_per_second = 1000",
        "rate_per_second = 60",
        1,
    );
    std::fs::write(&config, config_text).expect("config");
    let mut daemon = start_daemon(&world, &config, "pg-stop.log");
    daemon.wait_running().await;
    insert_many(&world, &ordernos, TAX).await;
    wait_until(Duration::from_secs(30), "a first part drained", || async {
        rebill_count(&world, "done").await >= 30
    })
    .await;
    assert_eq!(healthz(&client, &base).await, Some(200));

    let own = std::sync::Arc::new(own);
    let stopper = own.clone();
    tokio::task::spawn_blocking(move || stopper.stop())
        .await
        .expect("stop task")
        .expect("pg_ctl stop");
    let stopped = Instant::now();
    wait_health(
        &client,
        &base,
        503,
        Duration::from_secs(30),
        "/healthz to answer 503 while the server is down",
    )
    .await;
    let noticed = stopped.elapsed();
    // Down for a few seconds longer: claims and completions fail and are retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(healthz(&client, &base).await, Some(503), "still down");
    let starter = own.clone();
    tokio::task::spawn_blocking(move || starter.start_again())
        .await
        .expect("start task")
        .expect("pg_ctl start");
    let back = Instant::now();
    let log = drain_and_stop(&world, &mut daemon, (&client, &base), ROWS).await;
    let recovered = back.elapsed();
    // Said where it happened: the notification connection, and the claims or the results
    // that could not be written meanwhile. One daemon held every row it had claimed
    // through the outage: the calls in flight when the server went were answered and their
    // results written once it was back (the daemon renews its own rows before its rescuer
    // looks), so no row went out twice.
    let resent = assert_survived(
        &world,
        &log,
        ROWS,
        &[
            (
                &["lost the LISTEN connection"],
                "the lost notification connection",
            ),
            (
                &["claim failed", "cannot write results"],
                "the failed claims or writes",
            ),
        ],
    )
    .await;
    eprintln!(
        "PostgreSQL stopped mid-drain: /healthz 503 after {noticed:?}; all {ROWS} rows done and healthy {recovered:?} after it came back; {resent} sent twice"
    );
}

/// Connections reset under the daemon mid-drain (every one of its server processes
/// terminated, several times), then statements cancelled by `statement_timeout` for longer
/// than the health check allows (another session holds the rebill table): each is logged,
/// `/healthz` answers 503 while nothing can be claimed or written, the daemon recovers by
/// itself, no panic, every row done and none sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_and_statement_timeouts_are_logged_and_recovered_from() {
    const ROWS: usize = 300;
    let Some(world) = World::on(Backend::Postgres).await else {
        return;
    };
    let port = free_port();
    let url_line = database_line(&world.config);
    let config = write_toml(
        &world,
        "pg-faults.toml",
        &[
            (
                url_line.as_str(),
                &format!("{url_line}\nstatement_timeout = \"300ms\""),
            ),
            ("rate_per_second = 1000", "rate_per_second = 40"),
        ],
        &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ordernos: Vec<String> = (0..ROWS).map(|i| format!("PGFAULT-{i:03}")).collect();
    let mut daemon = start_daemon(&world, &config, "pg-faults.log");
    daemon.wait_running().await;
    insert_many(&world, &ordernos, TAX).await;
    wait_until(Duration::from_secs(30), "a first part drained", || async {
        rebill_count(&world, "done").await >= 20
    })
    .await;

    // Resets: every session of the daemon's (its pool and its LISTEN connection)
    // terminated, five times.
    let mut terminated = 0;
    for _ in 0..5 {
        let killed: Vec<(i64,)> = world
            .writer
            .rows(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND application_name = 'invoice-worker') x",
                &[],
            )
            .await;
        terminated += killed[0].0;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done_before = rebill_count(&world, "done").await;
    wait_until(
        Duration::from_secs(20),
        "drained on after the resets",
        || async { rebill_count(&world, "done").await >= done_before + 20 },
    )
    .await;
    assert_eq!(
        healthz(&client, &base).await,
        Some(200),
        "healthy after the resets"
    );

    // Statement timeouts: the table held for longer than the health check's 10 s.
    let lock = WriteLock::take(&world).await;
    wait_health(
        &client,
        &base,
        503,
        Duration::from_secs(20),
        "/healthz to answer 503 while every claim and write times out",
    )
    .await;
    lock.release().await;
    let log = drain_and_stop(&world, &mut daemon, (&client, &base), ROWS).await;
    assert!(
        terminated >= 5,
        "only {terminated} sessions were terminated"
    );
    let resent = assert_survived(
        &world,
        &log,
        ROWS,
        &[
            (
                &["lost the LISTEN connection"],
                "the reset notification connection",
            ),
            (&["statement timeout"], "the statement timeouts"),
        ],
    )
    .await;
    eprintln!(
        "PostgreSQL faults mid-drain: {terminated} sessions terminated, statements timed out past the health limit; all {ROWS} rows done, {resent} sent twice"
    );
}

/// After a fault: waits until all `rows` are done and `/healthz` answers 200 again, then
/// stops the daemon; its log.
async fn drain_and_stop(
    world: &World,
    daemon: &mut Daemon,
    (client, base): (&reqwest::Client, &str),
    rows: usize,
) -> String {
    wait_done(world, rows, 60, "every row done after the fault").await;
    wait_health(
        client,
        base,
        200,
        Duration::from_secs(20),
        "/healthz to answer 200 again",
    )
    .await;
    daemon.stop(Duration::from_secs(10), "daemon")
}

/// What a daemon that lived through a fault must show: no panic, each of `logged` (any of
/// its alternatives) in its log, no password there, all `rows` accepted, none sent twice.
/// How many were sent twice (0), for the test's report.
async fn assert_survived(
    world: &World,
    log: &str,
    rows: usize,
    logged: &[(&[&str], &str)],
) -> usize {
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    for (alternatives, what) in logged {
        assert!(
            alternatives.iter().any(|a| log.contains(a)),
            "{what} was not logged:\n{log}"
        );
    }
    assert!(
        !log.contains(SUPERUSER_PASSWORD),
        "the password reached the log"
    );
    assert_all_accepted(world, rows, &["Accepted"]).await;
    let twice: Vec<_> = verified_counts(world)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "rows sent more than once: {twice:?}");
    twice.len()
}

/// A wrong password: `run` exits 2 at once, naming `[database] url`, and neither the
/// password tried nor the right one appears anywhere; given apart (the environment, a
/// file), the right one works and `check-config` shows none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_exits_2_and_no_password_is_ever_shown() {
    let Some(cluster) = shared_cluster() else {
        return;
    };
    let url = cluster.create_database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let wrong_url = url.replace(SUPERUSER_PASSWORD, "Wr0ng-Pa55word");
    let wrong = write_cfg(
        dir,
        "wrong.toml",
        &format!("[database]\nurl = \"{wrong_url}\"\n[rebill]\nenabled = false\n[title]\nenabled = false\n"),
    );
    let started = Instant::now();
    let out = cli(dir, &["run", "--config", &wrong]);
    expect_code(&out, 2, "run with a wrong password");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("[database] url"),
        "stderr does not name the key: {err}"
    );
    let all = format!("{}{err}", text(&out.stdout));
    assert!(
        !all.contains("Wr0ng-Pa55word"),
        "the password tried was shown: {all}"
    );

    // The right password apart from the URL: in the environment, then in a file.
    let bare_url = url.replace(&format!(":{SUPERUSER_PASSWORD}@"), "@");
    assert_ne!(bare_url, url);
    let bare = write_cfg(
        dir,
        "bare.toml",
        &format!("[database]\nurl = \"{bare_url}\"\n"),
    );
    let out = cli_env(
        dir,
        &["migrate", "--config", &bare],
        &[("INVOICE_WORKER_DATABASE_PASSWORD", SUPERUSER_PASSWORD)],
    );
    expect_code(&out, 0, "migrate with the password in the environment");
    let pw_file = dir.join("database-password");
    std::fs::write(&pw_file, format!("{SUPERUSER_PASSWORD}\n")).expect("password file");
    let from_file = write_cfg(
        dir,
        "file.toml",
        &format!(
            "[database]\nurl = \"{bare_url}\"\npassword_file = \"{}\"\n",
            pw_file.display()
        ),
    );
    let out = cli(dir, &["status", "--config", &from_file]);
    expect_code(&out, 0, "status with the password in a file");
    let inline = write_cfg(
        dir,
        "inline.toml",
        &format!(
            "[database]\nurl = \"{url}\"\n[rebill]\nenabled = false\n[title]\nenabled = false\n"
        ),
    );
    for cfg in [&inline, &from_file] {
        let out = cli(dir, &["check-config", "--config", cfg]);
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !shown.contains(SUPERUSER_PASSWORD),
            "check-config showed the password: {shown}"
        );
        assert!(shown.contains("# database: PostgreSQL"), "{shown}");
    }
    let out = cli(dir, &["check-config", "--config", &inline]);
    assert!(
        text(&out.stdout).contains("postgres:***@127.0.0.1"),
        "{}",
        text(&out.stdout)
    );
}

/// `sandbox --database-url` runs the whole demo on PostgreSQL, and refuses a database
/// whose queue tables already hold rows (its table shows every row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_runs_on_postgresql_and_refuses_a_used_database() {
    let Some(cluster) = shared_cluster() else {
        return;
    };
    let url = cluster.create_database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cli(dir.path(), &["sandbox", "--database-url", &url]);
    expect_code(&out, 0, "sandbox on PostgreSQL");
    let so = text(&out.stdout);
    for needle in [
        "postgres database",
        "SBX-ACCEPTED",
        "SBX-T-JSON",
        "done",
        "drained in",
    ] {
        assert!(
            so.contains(needle),
            "sandbox output lacks {needle:?}:\n{so}"
        );
    }
    let shown = format!("{so}{}", text(&out.stderr));
    assert!(
        !shown.contains(SUPERUSER_PASSWORD),
        "the sandbox showed the password"
    );
    let again = cli(dir.path(), &["sandbox", "--database-url", &url]);
    expect_code(&again, 2, "sandbox on a used database");
    assert!(
        text(&again.stderr).contains("not empty"),
        "{}",
        text(&again.stderr)
    );
}

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1: (CA PEM, server
/// chain PEM, server key PEM).
fn test_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "invoice-worker test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let server_key = KeyPair::generate().expect("server key");
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = server_params
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

/// TLS through `sslmode` in the URL, with rustls: `verify-full` against the operator's CA
/// works, and every connection the daemon opens is encrypted; a server whose certificate
/// no trusted root signed, or a server without TLS where TLS is required, is refused at
/// start with `[database] url` named and no password shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_sslmode_is_verified_and_used_by_every_connection() {
    let Some(shared) = shared_cluster() else {
        return;
    };
    let own = tokio::task::spawn_blocking(ScratchCluster::start)
        .await
        .expect("start task")
        .expect("a throwaway server of this test's own");
    let (ca_pem, chain_pem, key_pem) = test_certificates();
    own.enable_tls(&chain_pem, &key_pem).expect("TLS on");
    let url = own.create_database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &ca_pem).expect("CA file");
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        url.replace("@127.0.0.1:", "@localhost:"),
        ca.display()
    );
    let queues_off = "[rebill]\nenabled = false\n[title]\nenabled = false\n";
    let good = write_cfg(
        dir,
        "tls.toml",
        &format!("[database]\nurl = \"{verified}\"\n{queues_off}"),
    );
    expect_code(
        &cli(dir, &["migrate", "--config", &good]),
        0,
        "migrate over verified TLS",
    );
    let mut daemon = Daemon::start(Path::new(&good), dir.join("tls.log"));
    daemon.wait_running().await;
    let mut watcher = {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&url)
            .await
            .expect("a connection to look with")
    };
    let (plain, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE NOT s.ssl), COUNT(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.backend_type = 'client backend' \
         AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut watcher)
    .await
    .expect("pg_stat_ssl");
    let log = daemon.stop(Duration::from_secs(10), "daemon over TLS");
    assert!(
        encrypted >= 1 && plain == 0,
        "the daemon's connections: {encrypted} over TLS, {plain} in the clear; log:\n{log}"
    );

    // A server certificate no trusted root signed (the system's roots, not the test CA).
    let untrusted = write_cfg(
        dir,
        "untrusted.toml",
        &format!(
            "[database]\nurl = \"{}\"\n{queues_off}",
            url.replace("@127.0.0.1:", "@localhost:") + "?sslmode=verify-full"
        ),
    );
    // A server without TLS where TLS is required.
    let no_tls_url = shared.create_database().await.expect("database") + "?sslmode=require";
    let required = write_cfg(
        dir,
        "required.toml",
        &format!("[database]\nurl = \"{no_tls_url}\"\n{queues_off}"),
    );
    for (cfg, what, reason) in [
        (
            &untrusted,
            "an untrusted server certificate",
            "invalid peer certificate",
        ),
        (
            &required,
            "TLS required of a server without it",
            "server does not support TLS",
        ),
    ] {
        let out = cli(dir, &["migrate", "--config", cfg]);
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{what}: accepted\n{err}");
        assert!(err.contains("[database] url"), "{what}: {err}");
        assert!(err.contains(reason), "{what}: {err}");
        assert!(!err.contains(SUPERUSER_PASSWORD), "{what}: {err}");
    }
}
