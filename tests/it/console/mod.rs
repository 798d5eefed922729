//! The operator console over real HTTP: what it shows, what it escapes and masks, who may
//! act (token login, CSRF), and the same actions driven from a real browser.

mod browser;
mod http;

use std::time::Duration;

use crate::common::{free_port, wait_until, Arg, World, TAX};
use invoice_worker::secret::Secret;
use invoice_worker::sim::RebillBehavior;

/// The token the console tests log in with.
pub const TOKEN: &str = "console-test-token-0123456789";

/// A world whose daemon serves the console on a free loopback port, with `token` (none =
/// read-only); its base URL.
pub fn with_console(w: &mut World, token: Option<&str>) -> String {
    let port = free_port();
    w.config.http.listen = Some(format!("127.0.0.1:{port}").parse().expect("address"));
    w.config.http.console_token = token.map(|t| Secret::new(t.to_string()));
    format!("http://127.0.0.1:{port}")
}

/// A rebill row that failed for good (one attempt allowed, a busy gateway), scripted to be
/// accepted when it is tried again; its id once it is `failed`.
pub async fn failed_row(w: &World, orderno: &str) -> i64 {
    w.sim.script_rebill(
        orderno,
        vec![
            RebillBehavior::Fail {
                code: 9,
                message: "系统繁忙".to_string(),
            },
            RebillBehavior::Accepted,
        ],
    );
    let id = w
        .writer
        .insert_id(
            "INSERT INTO rebill_orders (orderno, tax_num, max_attempts) VALUES ($1, $2, 1) RETURNING id",
            &[Arg::text(orderno), Arg::text(TAX)],
        )
        .await;
    wait_until(Duration::from_secs(20), "the row to fail", || async {
        w.status_of("rebill_orders", id).await == "failed"
    })
    .await;
    id
}

/// Waits until `/healthz` answers, so the console is up.
pub async fn wait_served(base: &str) {
    let client = reqwest::Client::new();
    wait_until(Duration::from_secs(20), "the console to answer", || async {
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// A title whose buyer name is a script tag (and Chinese), with a phone number and a bank
/// account that must never be shown whole; cancelled, so the daemon leaves it alone.
pub const HOSTILE_NAME: &str = "<script>alert(1)</script>开票公司";

/// Inserts the [`HOSTILE_NAME`] title; its id.
pub async fn hostile_title(w: &World) -> i64 {
    w.writer
        .insert_id(
            "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc, gmf_dh, gmf_yhzh, status) \
             VALUES ($1, '1', 'A1', $1, '13800138000', '招商银行 6225880112345678', 'cancelled') RETURNING id",
            &[Arg::text(HOSTILE_NAME)],
        )
        .await
}
