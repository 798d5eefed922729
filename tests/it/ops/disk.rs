//! A full disk: reported, survived and recovered from.

use super::*;

/// A small file system of the test's own (tmpfs, which needs root to mount), unmounted when
/// dropped. `None`, with one loud line, where it cannot be mounted outside CI.
struct SmallDisk {
    dir: PathBuf,
    filler: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallDisk {
                dir: dir.to_path_buf(),
                filler: dir.join("filler"),
            }),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot mount a small tmpfs (the CI machine runs as root): {why}"
                );
                eprintln!("!!!!! SKIPPED: cannot mount a small tmpfs ({why}); full-disk test not run (run as root) !!!!!");
                None
            }
        }
    }

    /// Writes a file until the file system is full.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(&self.filler).expect("filler");
        let chunk = vec![0u8; 16 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.flush();
    }

    /// Gives the space back.
    fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The daemon on a file system that fills up mid-drain: it says so, `/healthz` turns 503,
/// nothing is lost or corrupted, it recovers by itself within seconds of space returning,
/// and SIGTERM on a full disk still exits promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_survived_and_recovered_from() {
    const ROWS: usize = 300;
    let w = World::with_options(SimOptions {
        latency: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let Some(disk) = SmallDisk::mount(&w.dir().join("small"), "16m") else {
        return;
    };
    let db = disk.dir.join("queue.db");
    let store = invoice_worker::store::Store::open_and_migrate(&db, Duration::from_secs(5))
        .await
        .expect("store on the small disk");
    for i in 0..ROWS {
        store
            .enqueue_rebill(&invoice_worker::store::admin::NewRebill {
                orderno: format!("FULL-{i:03}"),
                tax_num: TAX.into(),
                max_attempts: None,
                not_before: None,
            })
            .await
            .expect("insert");
    }
    let port = free_port();
    let old_db = w.config.database.path.display().to_string();
    let config = write_toml(
        &w,
        "disk.toml",
        |t| {
            t.replace(&old_db, &db.display().to_string())
                .replace("max_in_flight = 16", "max_in_flight = 8")
        },
        &format!("\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let done = |store: &invoice_worker::store::Store| {
        let store = store.clone();
        async move {
            store
                .counts(QueueName::Rebill, now_ms())
                .await
                .map(|c| c.count("done"))
                .unwrap_or(-1)
        }
    };
    let mut daemon = Daemon::start(&config, w.dir().join("disk.log"));
    daemon.wait_running().await;
    wait_until(Duration::from_secs(30), "a first part drained", || async {
        done(&store).await >= 40
    })
    .await;

    // The disk fills up mid-drain.
    disk.fill();
    daemon
        .wait_for_log("database or disk is full", Duration::from_secs(30))
        .await;
    wait_until(
        Duration::from_secs(40),
        "/healthz to answer 503",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((503, _))
            )
        },
    )
    .await;
    let (_, why) = get(&client, &format!("{base}/healthz"))
        .await
        .expect("healthz");
    eprintln!("while full: /healthz said {why:?}");

    // Space returns: the daemon recovers by itself.
    disk.free();
    let freed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "every row done after space returned",
        || async { done(&store).await == ROWS as i64 },
    )
    .await;
    let recovered = freed.elapsed();
    wait_until(
        Duration::from_secs(30),
        "/healthz to answer 200 again",
        || async {
            matches!(
                get(&client, &format!("{base}/healthz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    eprintln!("full disk: all {ROWS} rows done {recovered:?} after space returned");
    assert!(
        recovered < Duration::from_secs(30),
        "recovery took {recovered:?}"
    );
    // Nothing marked done that the gateway did not accept.
    let verified = w.verified_ordernos();
    for row in store
        .list(QueueName::Rebill, Some("done"), ROWS as u32 + 10)
        .await
        .expect("list")
    {
        assert!(
            verified.contains(&row.order),
            "{} done but never accepted",
            row.order
        );
    }

    // SIGTERM on a full disk exits within shutdown_grace (5 s) plus a few seconds.
    for i in 0..400 {
        store
            .enqueue_rebill(&invoice_worker::store::admin::NewRebill {
                orderno: format!("FULL2-{i:03}"),
                tax_num: TAX.into(),
                max_attempts: None,
                not_before: None,
            })
            .await
            .expect("insert");
    }
    wait_until(
        Duration::from_secs(30),
        "the second batch under way",
        || async { done(&store).await >= ROWS as i64 + 5 },
    )
    .await;
    let full_before = daemon.log_text().matches("disk is full").count();
    disk.fill();
    wait_until(
        Duration::from_secs(30),
        "the daemon to meet the full disk again",
        || async { daemon.log_text().matches("disk is full").count() > full_before },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (took, log) = daemon.stop_with(
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(25),
        "SIGTERM on a full disk",
    );
    eprintln!("SIGTERM on a full disk: exited in {took:?}");
    assert!(took < Duration::from_secs(5 + 8), "exit took {took:?}");
    assert!(!log.contains("panicked"), "{log}");
    disk.free();
    let (check,): (String,) = {
        let mut conn = crate::common::other_connection(&db).await;
        sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .expect("integrity_check")
    };
    assert_eq!(check, "ok");
    store.close().await;
}
