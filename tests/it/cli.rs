//! The real binary's `enqueue` commands: flags, JSON from a file and from stdin, and the
//! database's refusals surfacing as exit code 2.

use std::io::Write;
use std::process::{Output, Stdio};

use crate::common::{binary, Backend, World};

fn run(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = binary()
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(pipe);
    child.wait_with_output().expect("wait")
}

/// `enqueue title` from flags: the four required ones, then `extra`.
fn enqueue_title(
    config: &std::path::Path,
    [order_no, invoice_type, attach, gmf_mc]: [&str; 4],
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "enqueue",
        "title",
        "--order-no",
        order_no,
        "--invoice-type",
        invoice_type,
        "--attach",
        attach,
        "--gmf-mc",
        gmf_mc,
    ];
    args.extend_from_slice(extra);
    run(config, &args, None)
}

/// `enqueue title --json -` with `json` on stdin.
fn enqueue_title_stdin(config: &std::path::Path, json: &str) -> Output {
    run(config, &["enqueue", "title", "--json", "-"], Some(json))
}

on_both_backends!(
    enqueue_title_from_flags_file_and_stdin,
    refusals_exit_2_with_the_reason,
    a_config_holding_a_secret_readable_by_others_is_warned_about,
);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn enqueue_title_from_flags_file_and_stdin(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let config = w.write_config();
    let out = enqueue_title(
        &config,
        ["CLI-1", "1", "661234", "命令行公司"],
        &["--data-type", "xml"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("CLI-1"));

    let json = r#"{"ORDER_NO":"CLI-2","INVOICETYPE":"2","ATTACH":"661234","GMF_MC":"文件公司","GMF_NSRSBH":"91310115MA1K3BTP2B","GMF_DH":"13800138000","SQM":"ROW-SQM"}"#;
    let file = w.dir().join("title.json");
    std::fs::write(&file, json).expect("write json");
    let out = run(
        &config,
        &[
            "enqueue",
            "title",
            "--json",
            file.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let stdin_json = r#"{"ORDER_NO":"CLI-3","INVOICETYPE":"1","ATTACH":"661234","GMF_MC":"标准输入公司","TTQQLSH":"IWSTDIN000000000001"}"#;
    let out = enqueue_title_stdin(&config, stdin_json);
    assert!(out.status.success(), "{}", text(&out.stderr));

    type TitleRow = (String, String, Option<String>, Option<i64>, Option<String>);
    let rows: Vec<TitleRow> = w
        .writer
        .rows(
            "SELECT order_no, invoice_type, sqm, data_type, ttqqlsh FROM title_submissions ORDER BY id",
            &[],
        )
        .await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0], ("CLI-1".into(), "1".into(), None, Some(1), None));
    assert_eq!(rows[1].2.as_deref(), Some("ROW-SQM"));
    assert_eq!(rows[2].4.as_deref(), Some("IWSTDIN000000000001"));
}

async fn refusals_exit_2_with_the_reason(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let config = w.write_config();
    // The database's CHECK constraint.
    let out = enqueue_title(&config, ["X", "3", "a", "b"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).to_lowercase().contains("check"),
        "{}",
        text(&out.stderr)
    );
    // Unknown JSON fields are named.
    let out = enqueue_title_stdin(
        &config,
        r#"{"ORDER_NO":"X","INVOICETYPE":"1","ATTACH":"a","GMF_MC":"b","GMF_XX":"?"}"#,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("GMF_XX"),
        "{}",
        text(&out.stderr)
    );
    // A missing required flag is a usage error.
    let out = run(&config, &["enqueue", "title", "--order-no", "X"], None);
    assert_eq!(out.status.code(), Some(2));
    // A duplicate serial is refused by the UNIQUE column.
    for expected in [Some(0), Some(2)] {
        let out = enqueue_title(&config, ["D", "1", "a", "b"], &["--ttqqlsh", "SAME"]);
        assert_eq!(out.status.code(), expected, "{}", text(&out.stderr));
    }
    // The idempotent rebill insert reports the existing row instead of failing.
    for expected in ["enqueued", "already exists"] {
        let out = run(
            &config,
            &[
                "enqueue",
                "rebill",
                "--tax-num",
                crate::common::TAX,
                "--orderno",
                "IDEM-1",
            ],
            None,
        );
        assert!(out.status.success());
        assert!(
            text(&out.stdout).contains(expected),
            "{}",
            text(&out.stdout)
        );
    }
}

async fn a_config_holding_a_secret_readable_by_others_is_warned_about(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let Some(w) = World::on(backend).await else {
        return;
    };
    let config = w.write_config();
    let name = config.display().to_string();
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = run(&config, &["check-config"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert_eq!(
            stderr.contains("readable by other users") && stderr.contains(&name),
            warned,
            "mode {mode:o}: {stderr}"
        );
    }
}

/// Rows that other systems wrote with values of the wrong type (around the CHECKs) never
/// fail a listing: each is shown with the bad value described, and the rest are listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_badly_typed_rows_and_lists_the_rest() {
    let w = World::new().await;
    let config = w.write_config();
    w.insert_rebill("GOOD-1", crate::common::TAX).await;
    {
        use sqlx::Connection;
        let mut other = crate::common::other_connection(&w.config.database.path).await;
        for sql in [
            "PRAGMA ignore_check_constraints = ON",
            "INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) VALUES ('SOON-1', '91310117568051222X', 'soon')",
            "INSERT INTO rebill_orders (orderno, tax_num, status, last_message) VALUES (X'DEADBEEF', '91310117568051222X', 'rejected', 'orderno: value of the wrong type')",
        ] {
            sqlx::query(sql).execute(&mut other).await.expect(sql);
        }
        other.close().await.expect("close");
    }
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["list", "--status", "pending"],
        vec!["list", "--status", "rejected"],
        vec!["list", "--status", "rejected", "--json"],
    ] {
        let out = run(&config, &args, None);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: exit {:?}: {}",
            out.status,
            text(&out.stderr)
        );
        let pending = !args.contains(&"rejected");
        if pending {
            assert!(
                stdout.contains("GOOD-1"),
                "{args:?} lists the sound row: {stdout}"
            );
            assert!(stdout.contains("SOON-1"), "{args:?}: {stdout}");
            assert!(
                stdout.contains("next_attempt_at holds text 'soon'"),
                "{args:?} describes the bad value: {stdout}"
            );
        }
        if args.contains(&"rejected") || args == ["list"] || args == ["list", "--json"] {
            assert!(
                stdout.contains("X'DEADBEEF'"),
                "{args:?} shows the BLOB order number described: {stdout}"
            );
        }
    }
}
