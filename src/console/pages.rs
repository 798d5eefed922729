//! The console's pages, rendered on the server with maud (checked at compile time, every
//! interpolated value escaped): no scripts, so they work with JavaScript off.

use maud::{html, Markup, DOCTYPE};

use crate::depths::{Snapshot, STATUSES};
use crate::report::utc;
use crate::store::admin::RowSummary;
use crate::store::history::MinuteCount;
use crate::store::page::{PageCursor, Part, RowFilter, RowPage};
use crate::store::show::RowDetail;
use crate::store::QueueName;

/// What the visitor may do, as the pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visitor {
    /// No token configured: nobody may act.
    ReadOnly,
    /// Actions need a login first.
    LoggedOut,
    /// Logged in; action forms carry this CSRF token.
    LoggedIn {
        /// The session's CSRF token.
        csrf: String,
    },
}

/// A one-line message shown at the top of a page after an action.
#[derive(Debug, Clone)]
pub struct Flash {
    /// The text.
    pub text: String,
    /// Whether it reports a failure.
    pub error: bool,
}

/// A span of `ms` milliseconds, to the second, for a person.
fn age(ms: i64) -> String {
    let secs = (ms.max(0) / 1000) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// How long ago `at` was, roughly, for a person.
fn ago(now: i64, at: i64) -> String {
    age(now.saturating_sub(at))
}

/// A query string from pairs, each value percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

fn layout(
    title: &str,
    visitor: &Visitor,
    flash: Option<&Flash>,
    refresh: bool,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="zh-CN" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content="15"; }
                title { (title) " · invoice-worker" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    h1 { "invoice-worker" }
                    nav {
                        a href="/" { "Overview 概览" }
                        a href="/rows?queue=rebill" { "Rebill rows 重开" }
                        a href="/rows?queue=title" { "Title rows 抬头" }
                        a href="/rows?queue=rebill&status=failed" { "Failed 失败" }
                    }
                    div.who {
                        @match visitor {
                            Visitor::ReadOnly => { "read-only (no [http] console_token)" }
                            Visitor::LoggedOut => { a href="/login" { "Log in to act 登录" } }
                            Visitor::LoggedIn { csrf } => {
                                form.inline method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button.quiet type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main {
                    @if let Some(f) = flash {
                        div class=(if f.error { "flash error" } else { "flash" }) role="status" { (f.text) }
                    }
                    (body)
                }
            }
        }
    }
}

/// A small bar chart of attempts per minute over the hour before `now`.
fn chart(minutes: &[MinuteCount], now: i64) -> Markup {
    const WIDTH: i64 = 600;
    const HEIGHT: i64 = 70;
    let last = now.div_euclid(60_000);
    let first = last - 59;
    let peak = minutes.iter().map(|m| m.attempts).max().unwrap_or(0).max(1);
    let total: i64 = minutes
        .iter()
        .filter(|m| m.minute >= first)
        .map(|m| m.attempts)
        .sum();
    let bar = WIDTH / 60;
    html! {
        svg.chart viewBox=(format!("0 0 {WIDTH} {}", HEIGHT + 14)) role="img"
            aria-label=(format!("{total} attempts in the last hour")) {
            line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
            @for m in minutes.iter().filter(|m| m.minute >= first && m.minute <= last) {
                @let h = (m.attempts * HEIGHT / peak).max(1);
                rect x=((m.minute - first) * bar) y=(HEIGHT - h) width=(bar - 1) height=(h) {
                    title { (utc(m.minute * 60_000)) ": " (m.attempts) " attempts" }
                }
            }
            text x="0" y=(HEIGHT + 12) { "-60 min" }
            text x=(WIDTH - 40) y=(HEIGHT + 12) { "now" }
            text x=(WIDTH / 2 - 40) y=(HEIGHT + 12) { "peak " (peak) "/min" }
        }
    }
}

/// `GET /`: per queue counts, the attempts chart, the oldest due row, calls in flight;
/// then the pauses.
pub fn overview(
    snapshot: &Snapshot,
    charts: &[(QueueName, Vec<MinuteCount>)],
    now: i64,
    visitor: &Visitor,
    flash: Option<&Flash>,
) -> Markup {
    let body = html! {
        @if snapshot.active_at == 0 {
            section { p { "Counting the queues… (the first count is on its way)" } }
        }
        @for (queue, minutes) in charts {
            @let counts = snapshot.queue(*queue);
            section {
                h2 { (queue.as_str()) " queue" }
                div.counts {
                    @for status in STATUSES {
                        @let n = counts.map_or(0, |c| c.count(status));
                        a.count href=(format!("/rows?{}", query(&[("queue", queue.as_str()), ("status", status)]))) {
                            span class=(format!("status-{status}")) { (status) }
                            b { (n) }
                        }
                    }
                }
                p.facts {
                    "calls in flight: " (counts.map_or(0, |c| c.count("running")))
                    " · oldest due pending: "
                    @match counts.and_then(|c| c.oldest_pending_age_ms) {
                        Some(ms) => { (age(ms)) " overdue" }
                        None => { "none due" }
                    }
                    @if let Some(c) = counts.filter(|c| c.awaiting_confirmation > 0) {
                        " · awaiting confirmation: " (c.awaiting_confirmation)
                    }
                }
                (chart(minutes, now))
                p.facts {
                    "active rows counted " (ago(now, snapshot.active_at)) " ago, finished rows "
                    (ago(now, snapshot.finished_at)) " ago"
                }
            }
        }
        section {
            h2 { "Pauses 暂停" }
            @if snapshot.pauses.is_empty() {
                p { "No seller or queue is paused." }
            } @else {
                table {
                    thead { tr { th { "queue" } th { "seller" } th { "reason" } th { "since" } th { "until" } th {} } }
                    tbody {
                        @for p in &snapshot.pauses {
                            tr {
                                td { (p.queue) }
                                td { @if p.scope == "*" { "whole queue 整个队列" } @else { (p.scope) } }
                                td.msg { (p.reason) }
                                td { (utc(p.created_at)) }
                                td {
                                    @if p.until_at > now { (utc(p.until_at)) }
                                    @else if p.probe_row_id.is_some() { "probing with row " (p.probe_row_id.unwrap_or(0)) }
                                    @else { "ended; the next row probes" }
                                }
                                td {
                                    @if let Visitor::LoggedIn { csrf } = visitor {
                                        form.inline method="post" action="/pauses/resume" {
                                            input type="hidden" name="csrf" value=(csrf);
                                            input type="hidden" name="queue" value=(p.queue);
                                            input type="hidden" name="scope" value=(p.scope);
                                            button type="submit" { "Resume 恢复" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if let Visitor::LoggedIn { csrf } = visitor {
                form.filters method="post" action="/pauses/pause" {
                    input type="hidden" name="csrf" value=(csrf);
                    label { "queue" select name="queue" { option value="rebill" { "rebill" } option value="title" { "title" } } }
                    label { "seller (tax number / sqm, or * for the queue)" input name="scope" required; }
                    label { "for" input name="for" value="1h" size="6"; }
                    button type="submit" { "Pause 暂停" }
                }
            }
        }
    };
    layout("Overview", visitor, flash, true, body)
}

fn cursor_text(c: &PageCursor) -> String {
    match (c.part, c.finished_at) {
        (Part::Number, Some(f)) => format!("{f}:{}", c.id),
        (Part::Odd, _) => format!("~:{}", c.id),
        _ => format!("-:{}", c.id),
    }
}

/// Parses a cursor as [`rows`] writes it (`finished_at:id`, `-:id` for NULL, `~:id` for
/// text or BLOB values).
pub fn parse_cursor(text: &str) -> Option<PageCursor> {
    let (f, id) = text.split_once(':')?;
    let id = id.parse().ok()?;
    let (part, finished_at) = match f {
        "-" => (Part::Null, None),
        "~" => (Part::Odd, None),
        f => (
            Part::Number,
            Some(f.parse::<f64>().ok().filter(|f| f.is_finite())?),
        ),
    };
    Some(PageCursor {
        part,
        finished_at,
        id,
    })
}

/// `GET /rows`: the filter form, one page of rows and the link to the next.
pub fn rows(queue: QueueName, filter: &RowFilter, page: &RowPage, visitor: &Visitor) -> Markup {
    let key = match queue {
        QueueName::Rebill => "tax_num",
        QueueName::Title => "serial",
    };
    let status = filter.status.as_deref().unwrap_or("");
    let body = html! {
        section {
            form.filters method="get" action="/rows" {
                label { "queue" select name="queue" {
                    @for q in QueueName::ALL { option value=(q.as_str()) selected[q == queue] { (q.as_str()) } }
                } }
                label { "status" select name="status" {
                    option value="" selected[status.is_empty()] { "any" }
                    @for s in STATUSES { option value=(s) selected[s == status] { (s) } }
                } }
                label { "seller" input name="seller" value=(filter.seller.as_deref().unwrap_or("")); }
                label { "order number / serial contains" input name="q" value=(filter.text.as_deref().unwrap_or("")); }
                button type="submit" { "Show" }
            }
            @if let (Visitor::LoggedIn { csrf }, Some(seller), "failed") = (visitor, &filter.seller, status) {
                form.inline method="post" action="/sellers/retry-failed" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="queue" value=(queue.as_str());
                    input type="hidden" name="seller" value=(seller);
                    button type="submit" { "Retry every failed row of " (seller) }
                }
            }
            table {
                thead { tr { th.num { "id" } th { "order" } th { (key) } th { "status" } th { "outcome" } th.num { "att" } th { "code" } th { "invoice_no" } th { "updated (UTC)" } th { "last message" } } }
                tbody {
                    @for r in &page.rows { (row_line(queue, r)) }
                }
            }
            @if page.rows.is_empty() { p { "No rows match." } }
            @if let Some(next) = &page.next {
                p { a href=(next_page_link(queue, filter, next)) rel="next" { "Next page →" } }
            }
        }
    };
    layout(
        &format!("{} rows", queue.as_str()),
        visitor,
        None,
        false,
        body,
    )
}

/// The link to the page after `next` with the same filters.
fn next_page_link(queue: QueueName, filter: &RowFilter, next: &PageCursor) -> String {
    let after = cursor_text(next);
    let mut pairs = vec![("queue", queue.as_str())];
    if let Some(s) = &filter.status {
        pairs.push(("status", s.as_str()));
    }
    if let Some(s) = &filter.seller {
        pairs.push(("seller", s.as_str()));
    }
    if let Some(t) = &filter.text {
        pairs.push(("q", t.as_str()));
    }
    pairs.push(("after", after.as_str()));
    format!("/rows?{}", query(&pairs))
}

fn row_line(queue: QueueName, r: &RowSummary) -> Markup {
    html! {
        tr {
            td.num { a href=(format!("/rows/{}/{}", queue.as_str(), r.id)) { (r.id) } }
            td { a href=(format!("/rows/{}/{}", queue.as_str(), r.id)) { (r.order) } }
            td { (r.key.as_deref().unwrap_or("-")) }
            td class=(format!("status-{}", r.status)) { (r.status) }
            td { (r.outcome.as_deref().unwrap_or("-")) }
            td.num { (r.attempts) }
            td { (r.last_code.as_deref().unwrap_or("-")) }
            td { (r.invoice_no.as_deref().unwrap_or("-")) }
            td { (utc(r.updated_at)) }
            td.msg {
                @if let Some(p) = &r.problem { "(!) " (p) } @else { (r.last_message.as_deref().unwrap_or("")) }
            }
        }
    }
}

/// `GET /rows/{queue}/{id}`: every column, the attempts, and the actions the row allows.
pub fn row_detail(detail: &RowDetail, visitor: &Visitor, flash: Option<&Flash>) -> Markup {
    let queue = detail.queue.as_str();
    let status = detail.value("status").unwrap_or("");
    let body = html! {
        section {
            h2 { (queue) " row " (detail.id) " · " span class=(format!("status-{status}")) { (status) } }
            @match visitor {
                Visitor::LoggedIn { csrf } => {
                    @if matches!(status, "failed" | "rejected" | "cancelled") {
                        form.inline method="post" action=(format!("/rows/{queue}/{}/retry", detail.id)) {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Retry 重试" }
                        }
                    }
                    @if status == "pending" {
                        " "
                        form.inline method="post" action=(format!("/rows/{queue}/{}/cancel", detail.id)) {
                            input type="hidden" name="csrf" value=(csrf);
                            button.quiet type="submit" { "Cancel 取消" }
                        }
                    }
                }
                Visitor::LoggedOut => { p.facts { a href=(format!("/login?{}", query(&[("next", &format!("/rows/{queue}/{}", detail.id))]))) { "Log in" } " to retry or cancel this row." } }
                Visitor::ReadOnly => {}
            }
            dl.columns {
                @for (name, value) in &detail.columns {
                    dt { (name) }
                    dd {
                        @match value {
                            None => { span.facts { "NULL" } }
                            Some(v) => {
                                (v)
                                @if let (Ok(ms), true) = (v.parse::<i64>(), name.ends_with("_at") || name == "confirm_since") {
                                    span.facts { " (" (utc(ms)) ")" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Attempts 尝试记录 (" (detail.history.len()) ")" }
            @if detail.history.is_empty() {
                p { "No attempt recorded." }
            } @else {
                table {
                    thead { tr { th.num { "#" } th { "started (UTC)" } th.num { "took" } th.num { "http" } th { "code" } th { "action" } th { "status" } th { "daemon" } th { "message" } } }
                    tbody {
                        @for h in &detail.history {
                            tr {
                                td.num { (h.attempt) }
                                td { (utc(h.started_at)) }
                                td.num { @match h.duration_ms { Some(ms) => { (ms) " ms" } None => { "?" } } }
                                td.num { @if h.http_status < 0 { "-" } @else { (h.http_status) } }
                                td { (h.code.as_deref().unwrap_or("-")) }
                                td { (h.action) }
                                td class=(format!("status-{}", h.status)) { (h.status) }
                                td { (h.instance.as_deref().unwrap_or("-")) }
                                td.msg { (h.message.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(
        &format!("{queue} row {}", detail.id),
        visitor,
        flash,
        false,
        body,
    )
}

/// `GET /login`.
pub fn login(next: &str, error: Option<&str>, visitor: &Visitor) -> Markup {
    let body = html! {
        section {
            h2 { "Log in 登录" }
            @if let Some(e) = error { div.flash.error role="alert" { (e) } }
            @if *visitor == Visitor::ReadOnly {
                p { "This console is read-only: set [http] console_token to allow actions." }
            } @else {
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    label { "console token" input type="password" name="token" autocomplete="current-password" required autofocus; }
                    p { button type="submit" { "Log in" } }
                }
            }
        }
    };
    layout("Log in", visitor, None, false, body)
}

/// A page for a missing row or a refused request.
pub fn message(title: &str, text: &str, visitor: &Visitor) -> Markup {
    layout(
        title,
        visitor,
        None,
        false,
        html! { section { h2 { (title) } p { (text) } p { a href="/" { "Back to the overview" } } } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        for c in [
            PageCursor {
                part: Part::Number,
                finished_at: Some(1_700_000_000_123.0),
                id: 42,
            },
            PageCursor {
                part: Part::Null,
                finished_at: None,
                id: 7,
            },
            PageCursor {
                part: Part::Odd,
                finished_at: None,
                id: 9,
            },
        ] {
            assert_eq!(parse_cursor(&cursor_text(&c)), Some(c));
        }
        assert_eq!(parse_cursor("x:1"), None);
        assert_eq!(parse_cursor("NaN:1"), None);
        assert_eq!(parse_cursor("12"), None);
    }

    #[test]
    fn the_chart_draws_one_bar_per_minute_of_the_last_hour() {
        let now = 1_700_000_000_000;
        let minute = now / 60_000;
        let minutes = vec![
            MinuteCount {
                minute: minute - 90,
                attempts: 5,
            },
            MinuteCount {
                minute: minute - 2,
                attempts: 10,
            },
            MinuteCount {
                minute,
                attempts: 5,
            },
        ];
        let svg = chart(&minutes, now).into_string();
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("15 attempts in the last hour"), "{svg}");
    }

    #[test]
    fn hostile_text_is_escaped() {
        let flash = Flash {
            text: "<script>alert(1)</script>".into(),
            error: true,
        };
        let page = message("t", "<b>x</b>", &Visitor::ReadOnly).into_string();
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"), "{page}");
        let snapshot = Snapshot::default();
        let page = overview(&snapshot, &[], 0, &Visitor::ReadOnly, Some(&flash)).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
    }
}
