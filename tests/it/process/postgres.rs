//! What only the PostgreSQL backend has, through the real binary: a server that stops and
//! comes back mid-drain, a refused login, the password kept out of every output, and the
//! sandbox on a database of the operator's choosing.

use super::*;
use crate::common::free_port;
use invoice_worker::store::postgres::cluster::{self, ScratchCluster, SUPERUSER_PASSWORD};

/// The shared throwaway server, or `None` (a loud skip outside CI) without one.
fn shared_cluster() -> Option<&'static ScratchCluster> {
    cluster::shared()
}

async fn healthz(client: &reqwest::Client, base: &str) -> Option<u16> {
    let response = client.get(format!("{base}/healthz")).send().await.ok()?;
    Some(response.status().as_u16())
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
    wait_until(
        Duration::from_secs(30),
        "/healthz to answer 503 while the server is down",
        || async { healthz(&client, &base).await == Some(503) },
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
    wait_done(
        &world,
        ROWS,
        60,
        "every row done after the server came back",
    )
    .await;
    let recovered = back.elapsed();
    wait_until(
        Duration::from_secs(20),
        "/healthz to answer 200 again",
        || async { healthz(&client, &base).await == Some(200) },
    )
    .await;
    let log = daemon.stop(Duration::from_secs(10), "daemon");
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    assert!(
        log.to_ascii_lowercase().contains("database"),
        "the outage was not logged:\n{log}"
    );
    assert!(
        !log.contains(SUPERUSER_PASSWORD),
        "the password reached the log"
    );
    assert_all_accepted(&world, ROWS, &["Accepted"]).await;
    // One daemon held every row it had claimed through the outage: the calls in flight
    // when the server went were answered and their results written once it was back (the
    // daemon renews its own rows before its rescuer looks), so no row went out twice.
    let twice: Vec<_> = verified_counts(&world)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    let resent = twice.len();
    assert!(twice.is_empty(), "rows sent more than once: {twice:?}");
    eprintln!(
        "PostgreSQL stopped mid-drain: /healthz 503 after {noticed:?}; all {ROWS} rows done {recovered:?} after it came back; {resent} sent twice"
    );
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
