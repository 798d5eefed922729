//! What `status`, `list` and the sandbox print: plain-text tables of rows, counts and pauses.

use std::time::Duration;

use crate::store::admin::RowSummary;
use crate::store::driver::{AlertStore as _, QueueStore as _};
use crate::store::outbox::AlertReport;
use crate::store::show::RowDetail;
use crate::store::{now_ms, Database, QueueName};

fn clip(text: &str, width: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    // An RLO or a zero-width space from another system must not garble the table.
    let flat = crate::validate::invisible::escape_for_log(&flat).into_owned();
    if flat.chars().count() <= width {
        flat
    } else {
        let mut out: String = flat.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The rows as a plain-text table.
pub fn rows_table(queue: QueueName, rows: &[RowSummary]) -> String {
    let key = match queue {
        QueueName::Rebill => "tax_num",
        QueueName::Title => "ttqqlsh",
    };
    let mut out = format!(
        "{:>5}  {:<22} {:<20} {:<9} {:<11} {:>3}  {:<6} {:<22} {}\n",
        "id", "order", key, "status", "outcome", "att", "code", "invoice_no", "last_message"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>5}  {:<22} {:<20} {:<9} {:<11} {:>3}  {:<6} {:<22} {}\n",
            r.id,
            clip(&r.order, 22),
            clip(r.key.as_deref().unwrap_or("-"), 20),
            r.status,
            r.outcome.as_deref().unwrap_or("-"),
            r.attempts,
            clip(r.last_code.as_deref().unwrap_or("-"), 6),
            r.invoice_no.as_deref().unwrap_or("-"),
            match &r.problem {
                Some(problem) => format!("(!) {}", clip(problem, 66)),
                None => clip(r.last_message.as_deref().unwrap_or(""), 70),
            }
        ));
    }
    if rows.is_empty() {
        out.push_str("(no rows)\n");
    }
    out
}

fn ago(now: i64, at: i64) -> String {
    humantime::format_duration(Duration::from_secs(((now - at).max(0) / 1000) as u64)).to_string()
}

/// The outbox and each alert target's health, as `status` prints them; a target failing
/// for `report_failing_after` or longer is marked FAILING.
pub fn alerts_text(report: &AlertReport, now: i64, report_failing_after: Duration) -> String {
    let mut out = format!(
        "alerts: {} undelivered{}, {} given up",
        report.pending,
        report
            .oldest_pending_at
            .map(|at| format!(" (oldest raised {} ago)", ago(now, at)))
            .unwrap_or_default(),
        report.given_up
    );
    if let Some(error) = &report.last_error {
        out.push_str(&format!("; last error: {}", clip(error, 120)));
    }
    out.push('\n');
    for t in &report.targets {
        let state = match t.failing_since {
            Some(since) if now - since >= report_failing_after.as_millis() as i64 => {
                format!("FAILING for {}", ago(now, since))
            }
            Some(since) => format!("failing for {}", ago(now, since)),
            None => match t.last_ok_at {
                Some(at) => format!("ok, last delivery {} ago", ago(now, at)),
                None => "ok".to_string(),
            },
        };
        let error = match (t.failing_since, &t.last_error) {
            (Some(_), Some(e)) => format!(": {}", clip(e, 100)),
            _ => String::new(),
        };
        out.push_str(&format!("alert target {}: {state}{error}\n", t.name));
    }
    out
}

/// Prints per-queue counts, the oldest pending age, pauses and, when alerts are
/// configured (`alerting`), the outbox (`invoice-worker status`).
pub async fn print_status(
    store: &Database,
    json: bool,
    alerting: Option<&crate::config::AlertingConfig>,
) -> anyhow::Result<()> {
    let now = now_ms();
    let mut counts = Vec::new();
    for queue in QueueName::ALL {
        counts.push(store.counts(queue, now).await?);
    }
    let pauses = store.pauses(now).await?;
    let alerts = match alerting {
        Some(_) => Some(store.alert_report(now).await?),
        None => None,
    };
    if json {
        let value = serde_json::json!({ "queues": counts, "pauses": pauses, "alerts": alerts, "now_ms": now });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "{:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}  oldest due pending",
        "queue", "pending", "running", "done", "failed", "rejected", "cancelled"
    );
    for c in &counts {
        let age = c
            .oldest_pending_age_ms
            .map(|ms| {
                humantime::format_duration(Duration::from_secs((ms / 1000) as u64)).to_string()
            })
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:<7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}  {}",
            c.queue,
            c.count("pending"),
            c.count("running"),
            c.count("done"),
            c.count("failed"),
            c.count("rejected"),
            c.count("cancelled"),
            age
        );
    }
    for c in counts.iter().filter(|c| c.awaiting_confirmation > 0) {
        println!(
            "{}: {} pending rows accepted, awaiting confirmation (invoice number not yet seen)",
            c.queue, c.awaiting_confirmation
        );
    }
    if pauses.is_empty() {
        println!("no pauses");
    }
    for p in pauses {
        let what = if p.scope == "*" {
            "whole queue".to_string()
        } else {
            format!("seller {}", p.scope)
        };
        let when = if p.until_at > now {
            format!(
                "for {}",
                humantime::format_duration(Duration::from_secs(((p.until_at - now) / 1000) as u64))
            )
        } else if p.probe_row_id.is_some() {
            "probing".to_string()
        } else {
            "expired; next row probes".to_string()
        };
        println!("paused: {} {what} {when}: {}", p.queue, clip(&p.reason, 80));
    }
    if let (Some(report), Some(settings)) = (&alerts, alerting) {
        print!(
            "{}",
            alerts_text(report, now, settings.report_failing_after)
        );
    }
    Ok(())
}

/// An epoch-ms time as UTC, to the millisecond (`2026-12-02 13:25:53.120Z`).
pub fn utc(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
        None => ms.to_string(),
    }
}

/// Columns holding epoch-ms times, shown as UTC next to the number.
const TIME_COLUMNS: &[&str] = &[
    "next_attempt_at",
    "created_at",
    "updated_at",
    "finished_at",
    "lease_expires_at",
    "confirm_since",
];

/// One row with every column and its attempts, as `invoice-worker show` prints it.
pub fn row_detail_text(detail: &RowDetail) -> String {
    let mut out = format!("{} row {}\n", detail.queue.as_str(), detail.id);
    let width = detail
        .columns
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    for (name, value) in &detail.columns {
        let shown = match value {
            None => "NULL".to_string(),
            Some(v) => match v.parse::<i64>() {
                Ok(ms) if TIME_COLUMNS.contains(&name.as_str()) => format!("{ms} ({})", utc(ms)),
                _ => clip(v, 200),
            },
        };
        out.push_str(&format!("  {name:<width$}  {shown}\n"));
    }
    if detail.history.is_empty() {
        out.push_str("attempts: none recorded\n");
        return out;
    }
    out.push_str(&format!("attempts ({}):\n", detail.history.len()));
    out.push_str(&format!(
        "  {:>3}  {:<24}  {:>7}  {:>4}  {:<6}  {:<18}  {:<9}  {:<16}  {}\n",
        "#", "started (UTC)", "took", "http", "code", "action", "status", "instance", "message"
    ));
    for h in &detail.history {
        out.push_str(&format!(
            "  {:>3}  {:<24}  {:>7}  {:>4}  {:<6}  {:<18}  {:<9}  {:<16}  {}\n",
            h.attempt,
            utc(h.started_at),
            h.duration_ms
                .map(|ms| format!("{ms}ms"))
                .unwrap_or_else(|| "?".to_string()),
            if h.http_status < 0 {
                "-".to_string()
            } else {
                h.http_status.to_string()
            },
            clip(h.code.as_deref().unwrap_or("-"), 6),
            h.action,
            h.status,
            clip(h.instance.as_deref().unwrap_or("-"), 16),
            clip(h.message.as_deref().unwrap_or(""), 100),
        ));
    }
    out
}
