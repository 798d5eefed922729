//! The console without a browser: pages, escaping, masking, and every refusal.

use std::time::Duration;

use reqwest::redirect::Policy;
use reqwest::StatusCode;

use super::{failed_row, hostile_title, wait_served, with_console, TOKEN};
use crate::common::{wait_until, Backend, World};
use invoice_worker::store::driver::QueueStore as _;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// The value of the first `name="csrf"` field on a page.
fn csrf_of(page: &str) -> Option<String> {
    let start = page.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    let end = page[start..].find('"')?;
    Some(page[start..start + end].to_string())
}

on_both_backends!(
    only_a_logged_in_form_with_its_csrf_token_can_retry_a_row,
    a_read_only_console_shows_but_refuses_every_action,
    every_page_escapes_hostile_text_and_masks_private_fields,
);

/// Logs in with `token`; the session cookie (`name=value`) on success, else the status.
async fn login(client: &reqwest::Client, base: &str, token: &str) -> Result<String, StatusCode> {
    let response = client
        .post(format!("{base}/login"))
        .form(&[("token", token), ("next", "/")])
        .send()
        .await
        .expect("POST /login");
    if response.status() != StatusCode::SEE_OTHER {
        return Err(response.status());
    }
    let cookie = response
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    Ok(cookie.split(';').next().unwrap_or_default().to_string())
}

async fn text(client: &reqwest::Client, url: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = client.get(url);
    if let Some(c) = cookie {
        request = request.header(reqwest::header::COOKIE, c);
    }
    let response = request.send().await.expect("GET");
    let status = response.status();
    (status, response.text().await.expect("body"))
}

async fn post_retry(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    cookie: Option<&str>,
    csrf: &str,
) -> StatusCode {
    let mut request = client
        .post(format!("{base}/rows/rebill/{id}/retry"))
        .form(&[("csrf", csrf)]);
    if let Some(c) = cookie {
        request = request.header(reqwest::header::COOKIE, c);
    }
    request.send().await.expect("POST retry").status()
}

async fn only_a_logged_in_form_with_its_csrf_token_can_retry_a_row(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    let base = with_console(&mut w, Some(TOKEN));
    let daemon = w.start().await;
    wait_served(&base).await;
    let id = failed_row(&w, "CONSOLE-HTTP-1").await;
    let client = client();

    // The overview counts it (the depths are counted every 2 s).
    wait_until(
        Duration::from_secs(20),
        "the overview to count the failed row",
        || async {
            let (status, page) = text(&client, &format!("{base}/"), None).await;
            status == StatusCode::OK && page.contains("status-failed\">failed</span><b>1</b>")
        },
    )
    .await;
    let (_, page) = text(&client, &format!("{base}/rows/rebill/{id}"), None).await;
    assert!(page.contains("CONSOLE-HTTP-1"), "{page}");
    assert!(
        page.contains("系统繁忙"),
        "the attempt history is shown: {page}"
    );
    assert!(
        !page.contains("name=\"csrf\""),
        "no action form before a login"
    );

    // Refused: no session, a wrong token, a forged CSRF token.
    assert_eq!(
        post_retry(&client, &base, id, None, "x").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&client, &base, "wrong-token-wrong-token").await,
        Err(StatusCode::UNAUTHORIZED)
    );
    let cookie = login(&client, &base, TOKEN).await.expect("login");
    assert_eq!(
        post_retry(&client, &base, id, Some(&cookie), "forged").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        w.status_of("rebill_orders", id).await,
        "failed",
        "nothing changed"
    );

    // Accepted: the session's own form.
    let (_, page) = text(&client, &format!("{base}/rows/rebill/{id}"), Some(&cookie)).await;
    let csrf = csrf_of(&page).expect("the row page has action forms once logged in");
    assert_eq!(
        post_retry(&client, &base, id, Some(&cookie), &csrf).await,
        StatusCode::SEE_OTHER
    );
    w.wait_finished("rebill_orders", &[id]).await;
    assert_eq!(w.status_of("rebill_orders", id).await, "done");
    daemon.stop().await;
}

async fn a_read_only_console_shows_but_refuses_every_action(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    let base = with_console(&mut w, None);
    let daemon = w.start().await;
    wait_served(&base).await;
    let id = failed_row(&w, "CONSOLE-RO-1").await;
    let client = client();
    let (status, page) = text(&client, &format!("{base}/"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("read-only"), "{page}");
    assert_eq!(
        post_retry(&client, &base, id, None, "x").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        login(&client, &base, TOKEN).await,
        Err(StatusCode::FORBIDDEN)
    );
    let pause = client
        .post(format!("{base}/pauses/pause"))
        .form(&[
            ("csrf", "x"),
            ("queue", "rebill"),
            ("scope", "*"),
            ("for", "1h"),
        ])
        .send()
        .await
        .expect("POST pause");
    assert_eq!(pause.status(), StatusCode::FORBIDDEN);
    assert!(w
        .database
        .pauses(invoice_worker::store::now_ms())
        .await
        .expect("pauses")
        .is_empty());
    assert_eq!(w.status_of("rebill_orders", id).await, "failed");
    daemon.stop().await;
}

async fn every_page_escapes_hostile_text_and_masks_private_fields(backend: Backend) {
    let Some(mut w) = World::on(backend).await else {
        return;
    };
    let base = with_console(&mut w, Some(TOKEN));
    let hostile = "<script>alert(1)</script>";
    let id = hostile_title(&w).await;
    let daemon = w.start().await;
    wait_served(&base).await;
    let client = client();
    for url in [
        format!("{base}/rows/title/{id}"),
        format!("{base}/rows?queue=title&status=cancelled"),
        format!("{base}/rows?queue=title&q=%3Cscript"),
        format!("{base}/rows?queue=title&q=%E5%BC%80%E7%A5%A8"),
    ] {
        let (status, page) = text(&client, &url, None).await;
        assert_eq!(status, StatusCode::OK, "{url}");
        assert!(!page.contains(hostile), "{url}: {page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{url}: {page}"
        );
        assert!(
            !page.contains("13800138000") && !page.contains("6225880112345678"),
            "{url}"
        );
    }
    let (_, page) = text(&client, &format!("{base}/rows/title/{id}"), None).await;
    assert!(
        page.contains("****8000") && page.contains("****5678"),
        "{page}"
    );
    assert!(!page.contains(TOKEN), "the token is never on a page");
    let response = client.get(format!("{base}/")).send().await.expect("GET /");
    let csp = response
        .headers()
        .get(reqwest::header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    // A message in a link from elsewhere is not shown as the console's own.
    let (_, page) = text(
        &client,
        &format!("{base}/?msg=Your+token+expired%2C+visit+evil.example"),
        None,
    )
    .await;
    assert!(!page.contains("evil.example"), "{page}");
    // DNS rebinding: another name pointed at 127.0.0.1 is not answered.
    let rebound = client
        .get(format!("{base}/rows/title/{id}"))
        .header(reqwest::header::HOST, "evil.example")
        .send()
        .await
        .expect("GET with a foreign Host");
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let (status, _) = text(&client, &format!("{base}/rows/title/999999"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = text(&client, &format!("{base}/rows?queue=nope"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    daemon.stop().await;
}
