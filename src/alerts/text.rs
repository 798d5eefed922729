//! The human text of an [`Event`]: what a person reads in a WeCom / DingTalk / Feishu group
//! or in a webhook's `text` field.
//!
//! Chinese first (the operators of the sellers read it), then the same in English, one blank
//! line between. Every message names what happened, what to do and the exact command to run.
//! Values that came from outside the process (a platform's message, an order number, a
//! seller) pass through [`sanitize`] first, so a hostile or careless platform message cannot
//! reorder, split or mention-bomb the layout.

use std::fmt::Write as _;

use chrono::{DateTime, FixedOffset};

use super::event::{Event, EventKind, FailedRow};
use crate::validate::invisible::escape_for_log;

/// The tag every message starts with, so a group that receives several robots' messages
/// sees at once who is talking.
pub const TAG: &str = "【invoice-worker】";

/// The most characters [`sanitize`] keeps of one outside value (including the `…` that marks
/// a cut).
pub const MAX_VALUE_CHARS: usize = 200;

/// China Standard Time: fixed UTC+8, no daylight saving, so a fixed offset is exact.
const BEIJING_OFFSET_SECS: i32 = 8 * 3600;

/// The text of `event`: a tagged Chinese part, a blank line, the English part.
pub fn text(event: &Event) -> String {
    let queue = sanitize(&event.queue);
    let (zh, en) = match event.event {
        EventKind::SellerPaused => seller_paused(event, &queue),
        EventKind::QueuePaused => queue_paused(event, &queue),
        EventKind::PauseLifted => pause_lifted(event, &queue),
        EventKind::RowsFailed => rows_failed(event, &queue),
        EventKind::QueueStuck => queue_stuck(event, &queue),
        EventKind::QueueRecovered => queue_recovered(event, &queue),
        EventKind::Test => test_message(event),
    };
    format!("{TAG}{}\n\n{}", zh.trim_end(), en.trim_end())
}

/// `value` made safe to place in a message: line breaks and tabs become one space, other
/// control characters and invisible format characters (bidi overrides U+202A–U+202E,
/// isolates U+2066–U+2069, zero-width characters) are written as `\u{…}` like in log lines,
/// `<` becomes a full-width `＜` (a Feishu text message turns `<at user_id="all">` into a
/// mention of everyone), and the result is cut to [`MAX_VALUE_CHARS`] characters.
pub fn sanitize(value: &str) -> String {
    let mut pieces: Vec<String> = Vec::new();
    let mut buf = [0u8; 4];
    for c in value.trim().chars() {
        let breaks_line = matches!(c, '\u{2028}' | '\u{2029}');
        let piece = if (c.is_control() && c.is_whitespace()) || breaks_line {
            // Collapse "\r\n" and runs of breaks into one space.
            if pieces.last().is_some_and(|p| p == " ") {
                continue;
            }
            " ".to_string()
        } else if c == '<' {
            "＜".to_string()
        } else {
            escape_for_log(c.encode_utf8(&mut buf)).into_owned()
        };
        pieces.push(piece);
    }
    let mut total: usize = pieces.iter().map(|p| p.chars().count()).sum();
    if total > MAX_VALUE_CHARS {
        // Whole pieces only, so an escape is never cut in half; one place left for '…'.
        while total > MAX_VALUE_CHARS - 1 {
            match pieces.pop() {
                Some(p) => total -= p.chars().count(),
                None => break,
            }
        }
        pieces.push("…".to_string());
    }
    pieces.concat().trim().to_string()
}

/// `ms` (epoch milliseconds) as `YYYY-MM-DD HH:MM:SS` in Beijing time.
pub fn beijing_time(ms: i64) -> String {
    let offset = FixedOffset::east_opt(BEIJING_OFFSET_SECS);
    match (DateTime::from_timestamp_millis(ms), offset) {
        (Some(utc), Some(offset)) => utc
            .with_timezone(&offset)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        // Out of chrono's range: say what we have rather than inventing a date.
        _ => format!("{ms} ms"),
    }
}

/// `word` as one shell word a person can paste: left alone when it holds only characters no
/// shell treats specially, else single-quoted (`*` must not expand to file names).
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `invoice-worker resume` for one seller: the rebill queue is the command's default.
fn resume_seller_command(queue: &str, scope: &str) -> String {
    if queue == "rebill" {
        format!("invoice-worker resume {}", shell_word(scope))
    } else {
        format!(
            "invoice-worker resume --queue {} {}",
            shell_word(queue),
            shell_word(scope)
        )
    }
}

/// `invoice-worker resume` for a whole queue.
fn resume_queue_command(queue: &str) -> String {
    format!("invoice-worker resume --queue {} '*'", shell_word(queue))
}

/// The sanitised value of an optional outside field, or `fallback`.
fn field(value: Option<&str>, fallback: &str) -> String {
    match value.map(sanitize) {
        Some(v) if !v.is_empty() => v,
        _ => fallback.to_string(),
    }
}

/// What a paused scope is called, in both languages: a title row's seller is its 授权码.
fn scope_label(queue: &str, scope: &str) -> (String, String) {
    if queue == "title" {
        (
            format!("授权码 {scope}"),
            format!("The 授权码 (sqm) {scope}"),
        )
    } else {
        (format!("销方 {scope}"), format!("Seller {scope}"))
    }
}

/// The sentence saying when a pause ends by itself, in both languages (empty without `until`).
fn pause_end(until: Option<i64>) -> (String, String) {
    match until {
        Some(until) => {
            let at = beijing_time(until);
            (
                format!("否则暂停于北京时间 {at} 结束，届时先试发一行。\n"),
                format!(
                    "Otherwise the pause ends at {at} Beijing time, with one probe row first.\n"
                ),
            )
        }
        None => (String::new(), String::new()),
    }
}

fn seller_paused(event: &Event, queue: &str) -> (String, String) {
    let scope = field(event.scope.as_deref(), "?");
    let reason = field(event.reason.as_deref(), "（无）");
    let command = resume_seller_command(queue, &scope);
    let (zh_end, en_end) = pause_end(event.until);
    let (zh_who, en_who) = scope_label(queue, &scope);
    let (zh_do, en_do) = if queue == "title" {
        (
            "请按平台提示处理该授权码的问题",
            "fix what the platform message asks for this 授权码",
        )
    } else {
        (
            "请该销方登录电子税务局/诺诺完成短信验证或实人认证（或按平台提示处理）",
            "the seller must log in to the e-tax bureau (电子税务局) or Nuonuo and complete the \
             SMS or real-name (实人认证) verification, or do what the platform message asks",
        )
    };
    let zh = format!(
        "{zh_who} 已暂停发送（{queue} 队列）\n\
         平台返回：{reason}\n\
         需要人工处理：{zh_do}，然后运行\n  {command}\n\
         {zh_end}"
    );
    let en = format!(
        "{en_who} is paused ({queue} queue)\n\
         The platform said: {reason}\n\
         A person must act: {en_do}, then run\n  {command}\n\
         {en_end}"
    );
    (zh, en)
}

fn queue_paused(event: &Event, queue: &str) -> (String, String) {
    let reason = field(event.reason.as_deref(), "（无）");
    let command = resume_queue_command(queue);
    let (zh_end, en_end) = pause_end(event.until);
    let zh = format!(
        "{queue} 队列已整体暂停\n\
         平台返回：{reason}\n\
         整个队列停止发送（凭据被拒或额度用尽）。请检查配置中的 [{queue}] 凭据或平台额度，修复后运行\n  {command}\n\
         {zh_end}"
    );
    let en = format!(
        "The whole {queue} queue is paused\n\
         The platform said: {reason}\n\
         Nothing is sent (credentials refused or quota exhausted). Fix the [{queue}] credentials \
         in the configuration or the platform quota, then run\n  {command}\n\
         {en_end}"
    );
    (zh, en)
}

fn pause_lifted(event: &Event, queue: &str) -> (String, String) {
    let scope = field(event.scope.as_deref(), "*");
    let reason = field(event.reason.as_deref(), "");
    let (zh_what, en_what) = if scope == "*" {
        (
            format!("{queue} 队列恢复发送"),
            format!("The {queue} queue sends again"),
        )
    } else {
        let (zh_who, en_who) = scope_label(queue, &scope);
        (
            format!("{zh_who} 恢复发送（{queue} 队列）"),
            format!("{en_who} sends again ({queue} queue)"),
        )
    };
    let (zh_why, en_why) = if reason.is_empty() {
        (String::new(), String::new())
    } else {
        (
            format!("暂停结束：{reason}\n"),
            format!("How the pause ended: {reason}\n"),
        )
    };
    (
        format!("{zh_what}\n{zh_why}"),
        format!("{en_what}\n{en_why}"),
    )
}

/// One example line of a digest (the Chinese part lists them; the English part points there,
/// so a digest stays within the robots' length limits).
fn example_line(row: &FailedRow) -> String {
    format!(
        "- 订单 {}，销方 {}，ID {}：{}\n",
        sanitize(&row.order),
        sanitize(&row.seller),
        row.id,
        sanitize(&row.message)
    )
}

fn rows_failed(event: &Event, queue: &str) -> (String, String) {
    let shown = event.rows.len() as i64;
    let count = event.count.unwrap_or(shown).max(shown);
    let since = event.since.map(beijing_time);
    let list = format!(
        "invoice-worker list --queue {} --status failed",
        shell_word(queue)
    );
    let retry = format!("invoice-worker retry --queue {} ID", shell_word(queue));
    let mut zh = match &since {
        Some(since) => format!("{queue} 队列自北京时间 {since} 起有 {count} 行永久失败\n"),
        None => format!("{queue} 队列有 {count} 行永久失败\n"),
    };
    for row in &event.rows {
        zh.push_str(&example_line(row));
    }
    let more = count - shown;
    if more > 0 {
        let _ = writeln!(zh, "……另有 {more} 行");
    }
    let _ = write!(
        zh,
        "查看全部：\n  {list}\n按原因处理后重试一行：\n  {retry}\n"
    );
    let mut en = match &since {
        Some(since) => {
            format!(
                "{count} rows of the {queue} queue failed permanently since {since} Beijing time\n"
            )
        }
        None => format!("{count} rows of the {queue} queue failed permanently\n"),
    };
    if shown > 0 {
        let _ = write!(en, "Examples above (order, seller, ID: message)");
        if more > 0 {
            let _ = write!(en, ", and {more} more");
        }
        en.push_str(".\n");
    }
    let _ = write!(
        en,
        "See them all:\n  {list}\nFix the cause, then retry a row:\n  {retry}\n"
    );
    (zh, en)
}

fn queue_stuck(event: &Event, queue: &str) -> (String, String) {
    let count = event.count.unwrap_or(0);
    let (zh_since, en_since) = match event.since.map(beijing_time) {
        Some(since) => (
            format!("最早到期的一行自北京时间 {since} 起一直在等待"),
            format!("the oldest due row has waited since {since} Beijing time"),
        ),
        None => (
            "最早到期的一行等待过久".to_string(),
            "the oldest due row has waited too long".to_string(),
        ),
    };
    let zh = format!(
        "{queue} 队列停滞\n\
         {count} 行待发送，{zh_since}。\n\
         请运行 invoice-worker status 查看暂停、进程和错误。\n"
    );
    let en = format!(
        "The {queue} queue is stuck\n\
         {count} rows are pending; {en_since}.\n\
         Run invoice-worker status to see pauses, workers and errors.\n"
    );
    (zh, en)
}

fn queue_recovered(event: &Event, queue: &str) -> (String, String) {
    match event.since.map(beijing_time) {
        Some(since) => (
            format!("{queue} 队列恢复流动（自北京时间 {since} 起停滞）\n"),
            format!("The {queue} queue moves again (it was stuck since {since} Beijing time)\n"),
        ),
        None => (
            format!("{queue} 队列恢复流动\n"),
            format!("The {queue} queue moves again\n"),
        ),
    }
}

fn test_message(event: &Event) -> (String, String) {
    let at = beijing_time(event.at);
    // Who sent it (`invoice-worker alert test from HOST`), when given.
    let from = event
        .reason
        .as_deref()
        .map(|r| format!("（{}）", sanitize(r)))
        .unwrap_or_default();
    let from_en = event
        .reason
        .as_deref()
        .map(|r| format!(" ({})", sanitize(r)))
        .unwrap_or_default();
    (
        format!("测试消息{from}\n这是一条测试消息，发送于北京时间 {at}。收到即说明此告警目标可用。\n"),
        format!(
            "Test message{from_en}\nThis is a test message, sent at {at} Beijing time. If you can read it, \
             this alert target works.\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAX: &str = "91310117568051222X";
    /// 2023-11-14 22:13:20 UTC = 2023-11-15 06:13:20 in Beijing.
    const AT: i64 = 1_700_000_000_000;

    fn event(kind: EventKind, queue: &str) -> Event {
        Event::new(kind, queue, AT)
    }

    /// The text is tagged, has a Chinese part, a blank line, then an English part.
    fn assert_layout(text: &str, zh: &str, en: &str) {
        assert!(text.starts_with(TAG), "{text}");
        let (first, second) = text.split_once("\n\n").expect("a blank line");
        assert!(first.contains(zh), "{zh:?} not in the Chinese part: {text}");
        assert!(
            second.contains(en),
            "{en:?} not in the English part: {text}"
        );
        assert!(!second.contains("\n\n"), "one blank line only: {text}");
    }

    #[test]
    fn seller_paused_says_what_to_do_and_until_when() {
        let mut e = event(EventKind::SellerPaused, "rebill");
        e.scope = Some(TAX.into());
        e.reason = Some("请先完成实人认证".into());
        e.until = Some(AT + 3_600_000);
        let t = text(&e);
        assert_layout(
            &t,
            "销方 91310117568051222X 已暂停",
            "Seller 91310117568051222X is paused",
        );
        assert!(
            t.contains("请该销方登录电子税务局/诺诺完成短信验证或实人认证"),
            "{t}"
        );
        assert!(t.contains(&format!("invoice-worker resume {TAX}\n")), "{t}");
        assert!(t.contains("北京时间 2023-11-15 07:13:20"), "{t}");
        assert!(t.contains("2023-11-15 07:13:20 Beijing time"), "{t}");
        assert!(t.contains("请先完成实人认证"), "{t}");

        let mut e = event(EventKind::SellerPaused, "title");
        e.scope = Some("SQM-0001".into());
        e.reason = Some("授权码已失效".into());
        let t = text(&e);
        assert_layout(
            &t,
            "授权码 SQM-0001 已暂停",
            "The 授权码 (sqm) SQM-0001 is paused",
        );
        assert!(
            t.contains("invoice-worker resume --queue title SQM-0001"),
            "{t}"
        );
        assert!(!t.contains("Beijing time"), "no until, no end: {t}");
    }

    #[test]
    fn queue_paused_names_the_credentials_and_the_quoted_star() {
        let mut e = event(EventKind::QueuePaused, "title");
        e.scope = Some("*".into());
        e.reason = Some("client_secret错误".into());
        let t = text(&e);
        assert_layout(
            &t,
            "title 队列已整体暂停",
            "The whole title queue is paused",
        );
        assert!(t.contains("[title]") && t.contains("额度"), "{t}");
        assert!(t.contains("invoice-worker resume --queue title '*'"), "{t}");
    }

    #[test]
    fn pause_lifted_for_a_seller_and_a_queue() {
        let mut e = event(EventKind::PauseLifted, "rebill");
        e.scope = Some(TAX.into());
        e.reason = Some("probe went through".into());
        let t = text(&e);
        assert_layout(
            &t,
            "91310117568051222X 恢复发送",
            "91310117568051222X sends again",
        );
        assert!(t.contains("probe went through"), "{t}");

        e.scope = Some("*".into());
        let t = text(&e);
        assert_layout(&t, "rebill 队列恢复发送", "The rebill queue sends again");
    }

    #[test]
    fn rows_failed_lists_examples_and_the_rest() {
        let mut e = event(EventKind::RowsFailed, "rebill");
        e.count = Some(7);
        e.since = Some(AT);
        e.rows = (1..=2)
            .map(|i| FailedRow {
                id: 40 + i,
                order: format!("ORD-{i}"),
                seller: TAX.into(),
                message: format!("发票抬头错误 {i}"),
            })
            .collect();
        let t = text(&e);
        assert_layout(
            &t,
            "自北京时间 2023-11-15 06:13:20 起有 7 行永久失败",
            "7 rows of the rebill queue failed permanently since 2023-11-15 06:13:20",
        );
        assert!(
            t.contains("- 订单 ORD-1，销方 91310117568051222X，ID 41：发票抬头错误 1"),
            "{t}"
        );
        assert!(
            t.contains("ORD-2") && t.contains("另有 5 行") && t.contains("and 5 more"),
            "{t}"
        );
        assert!(
            t.contains("invoice-worker list --queue rebill --status failed"),
            "{t}"
        );
        assert!(t.contains("invoice-worker retry --queue rebill ID"), "{t}");

        e.count = Some(2);
        let t = text(&e);
        assert!(!t.contains("另有") && !t.contains("more"), "{t}");
    }

    #[test]
    fn queue_stuck_and_recovered() {
        let mut e = event(EventKind::QueueStuck, "title");
        e.count = Some(12);
        e.since = Some(AT);
        let t = text(&e);
        assert_layout(&t, "title 队列停滞", "The title queue is stuck");
        assert!(
            t.contains("12 行待发送") && t.contains("12 rows are pending"),
            "{t}"
        );
        assert!(
            t.contains("2023-11-15 06:13:20") && t.contains("invoice-worker status"),
            "{t}"
        );

        let mut e = event(EventKind::QueueRecovered, "title");
        e.since = Some(AT);
        let t = text(&e);
        assert_layout(&t, "title 队列恢复流动", "The title queue moves again");
    }

    #[test]
    fn test_message_names_the_time() {
        let t = text(&event(EventKind::Test, ""));
        assert_layout(&t, "测试消息", "This is a test message");
        assert!(t.contains("北京时间 2023-11-15 06:13:20"), "{t}");
    }

    #[test]
    fn a_hostile_reason_cannot_break_the_layout() {
        let mut e = event(EventKind::SellerPaused, "rebill");
        e.scope = Some(TAX.into());
        e.reason = Some("\u{202E}evil\n@all <at user_id=\"all\">所有人</at>\u{2066}".into());
        let t = text(&e);
        assert!(!t.contains("\u{202E}evil\n@all"), "{t}");
        assert!(!t.contains('\u{202E}') && !t.contains('\u{2066}'), "{t}");
        assert!(!t.contains("<at"), "{t}");
        assert!(t.contains("\\u{202e}evil @all ＜at"), "{t}");
        // Still one blank line, between the two languages.
        assert_eq!(t.matches("\n\n").count(), 1, "{t}");
    }

    #[test]
    fn sanitize_caps_and_keeps_escapes_whole() {
        assert_eq!(sanitize("  a\r\n\tb  "), "a b");
        assert_eq!(sanitize("x\u{2028}y\u{0}z"), "x y\\u{0000}z");
        let long = "错".repeat(500);
        let s = sanitize(&long);
        assert_eq!(s.chars().count(), MAX_VALUE_CHARS);
        assert!(s.ends_with('…'));
        let rlo = "\u{202E}".repeat(100);
        let s = sanitize(&rlo);
        assert!(s.chars().count() <= MAX_VALUE_CHARS, "{s}");
        assert!(s.trim_end_matches('…').ends_with("\\u{202e}"), "{s}");
    }

    #[test]
    fn beijing_time_is_utc_plus_eight() {
        assert_eq!(beijing_time(0), "1970-01-01 08:00:00");
        assert_eq!(beijing_time(i64::MAX), format!("{} ms", i64::MAX));
    }

    #[test]
    fn odd_scopes_are_quoted_for_the_shell() {
        assert_eq!(shell_word("*"), "'*'");
        assert_eq!(shell_word("a b'c"), r"'a b'\''c'");
        assert_eq!(shell_word(TAX), TAX);
    }
}
