//! Log formats: JSON one object per line with the attempt fields; plain text without
//! colour; `RUST_LOG` over the configured level.

use super::*;

on_both_backends!(
    json_logs_are_one_object_per_line_with_the_attempt_fields,
    text_logs_have_no_colour_and_rust_log_overrides_the_configured_level,
);

async fn json_logs_are_one_object_per_line_with_the_attempt_fields(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let id = w.insert_rebill("JSON-1", TAX).await;
    let config = write_toml(
        &w,
        "worker.toml",
        |t| t,
        "\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
    );
    let log = run_until_done(&w, &config, "daemon.log", &[], id).await;

    let mut attempt = None;
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nwhole log:\n{log}"));
        assert!(
            value.get("timestamp").is_some() && value.get("level").is_some(),
            "{line}"
        );
        if value["message"] == "attempt" && value["row_id"] == id {
            attempt = Some(value);
        }
    }
    assert!(lines >= 3, "startup, attempt and stop lines: {log}");
    let attempt = attempt.unwrap_or_else(|| panic!("no attempt line for row {id}:\n{log}"));
    for field in [
        "queue",
        "row_id",
        "orderno",
        "tax_num",
        "attempt",
        "action",
        "http_status",
        "code",
        "reason",
        "duration_ms",
    ] {
        assert!(
            attempt.get(field).is_some(),
            "attempt line lacks {field}: {attempt}"
        );
    }
    assert_eq!(attempt["queue"], "rebill");
    assert_eq!(attempt["orderno"], "JSON-1");
    assert_eq!(attempt["tax_num"], TAX);
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["action"], "done");
    assert_eq!(attempt["http_status"], 200);
    assert_eq!(attempt["level"], "INFO");
    assert!(attempt["duration_ms"].is_u64(), "{attempt}");
}

async fn text_logs_have_no_colour_and_rust_log_overrides_the_configured_level(backend: Backend) {
    let Some(w) = World::on(backend).await else {
        return;
    };
    let config = write_toml(&w, "worker.toml", |t| t, "\n[log]\nlevel = \"warn\"\n");

    // [log] level = "warn": no info lines, so no attempt lines.
    let quiet_id = w.insert_rebill("TEXT-QUIET", TAX).await;
    let log = run_until_done(&w, &config, "quiet.log", &[], quiet_id).await;
    assert!(
        !log.contains(" INFO "),
        "level warn logs no info lines:\n{log}"
    );

    // RUST_LOG=info wins over the file.
    let loud_id = w.insert_rebill("TEXT-LOUD", TAX).await;
    let log = run_until_done(&w, &config, "loud.log", &[("RUST_LOG", "info")], loud_id).await;
    let line = log
        .lines()
        .find(|l| l.contains(" attempt ") && l.contains("orderno=TEXT-LOUD"))
        .unwrap_or_else(|| panic!("an attempt line for TEXT-LOUD:\n{log}"));
    assert!(line.contains(" INFO "), "{line}");
    for field in [
        "queue=\"rebill\"",
        "row_id=",
        "tax_num=",
        "attempt=1",
        "action=\"done\"",
        "http_status=200",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "attempt line lacks {field}: {line}");
    }
    // stderr is a file, not a terminal: no ANSI colour codes anywhere.
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a non-terminal log:\n{log}"
    );
}
