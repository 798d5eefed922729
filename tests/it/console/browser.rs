//! The console in a real browser (Debian's chromium through chromedriver, driven over
//! WebDriver with fantoccini): open the overview, see the counts, open a failed row, log in
//! (a wrong token is refused), press retry, watch the row become done against the
//! simulator. Screenshots go to `target/tmp/`. Without Chromium the test prints one loud
//! line and passes, except under `CI=true`, where that is a failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use super::{failed_row, hostile_title, wait_served, with_console, HOSTILE_NAME, TOKEN};
use crate::common::{free_port, World};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Whether the browser is installed; a loud skip outside CI, a failure in it.
fn browser_available() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {CHROMIUM} or {CHROMEDRIVER} is missing: .ci/run installs chromium and chromium-driver");
    }
    eprintln!("!!!!! SKIPPED: the browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver");
    false
}

/// chromedriver on a port of its own, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get(format!("{url}/status"))
            .send()
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { child, url }
    }

    /// A headless Chromium session with a fresh profile in `profile`.
    async fn browser(&self, profile: &Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_string(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        // Plain HTTP to chromedriver on loopback: no TLS stack (a second one would clash
        // with the one reqwest uses).
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether [`wait_for_text`] reloads the page between looks (never after a form was
/// posted: a reload would post it again).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reload {
    Yes,
    No,
}

/// Waits until the page source contains `needle`, reloading meanwhile if asked to.
async fn wait_for_text(browser: &Client, needle: &str, reload: Reload) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let source = browser.source().await.expect("page source");
        if source.contains(needle) {
            return source;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {needle:?}:\n{source}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        if reload == Reload::Yes {
            browser.refresh().await.expect("reload");
        }
    }
}

/// Waits for an element to appear (a page loading after a click or a submit).
async fn wait_for(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never appeared: {e}"))
}

fn save_screenshot(png: &[u8], name: &str) {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_and_retries_a_failed_row_in_the_browser() {
    if !browser_available() {
        return;
    }
    let mut w = World::new().await;
    let base = with_console(&mut w, Some(TOKEN));
    let hostile = hostile_title(&w).await;
    let daemon = w.start().await;
    wait_served(&base).await;
    let id = failed_row(&w, "CONSOLE-UI-1").await;

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = driver.browser(profile.path()).await;

    // The overview shows the failed row in the counts (counted every 2 s).
    browser.goto(&format!("{base}/")).await.expect("open /");
    wait_for_text(&browser, "failed</span><b>1</b>", Reload::Yes).await;
    save_screenshot(
        &browser.screenshot().await.expect("screenshot"),
        "console-overview.png",
    );

    // The failed rows, then the row itself, by its link.
    wait_for(&browser, "a.count[href*='status=failed']")
        .await
        .click()
        .await
        .expect("click");
    wait_for(&browser, &format!("a[href$='/rows/rebill/{id}']")).await;
    browser
        .find(Locator::LinkText("CONSOLE-UI-1"))
        .await
        .expect("the row is listed")
        .click()
        .await
        .expect("click");
    wait_for(&browser, "dl.columns").await;
    let page = wait_for_text(&browser, "系统繁忙", Reload::No).await;
    assert!(page.contains("CONSOLE-UI-1"), "{page}");
    assert!(
        browser
            .find(Locator::Css("form[action$='/retry'] button"))
            .await
            .is_err(),
        "no retry button before a login"
    );

    // A wrong token is refused; the right one brings the operator back to the row.
    browser
        .find(Locator::LinkText("Log in"))
        .await
        .expect("login link")
        .click()
        .await
        .expect("click");
    wait_for(&browser, "form[action='/login']").await;
    let form = browser
        .form(Locator::Css("form[action='/login']"))
        .await
        .expect("login form");
    form.set_by_name("token", "not-the-token-at-all")
        .await
        .expect("type");
    form.submit().await.expect("submit");
    wait_for(&browser, "div.flash.error").await;
    wait_for_text(&browser, "wrong token", Reload::No).await;
    let form = browser
        .form(Locator::Css("form[action='/login']"))
        .await
        .expect("login form");
    form.set_by_name("token", TOKEN).await.expect("type");
    form.submit().await.expect("submit");
    wait_for(&browser, "form[action$='/retry'] button")
        .await
        .click()
        .await
        .expect("press retry");
    wait_for(&browser, "div.flash").await;
    wait_for_text(&browser, "is pending again", Reload::No).await;
    wait_for_text(&browser, "status-done\">done</span>", Reload::Yes).await;
    save_screenshot(
        &browser.screenshot().await.expect("screenshot"),
        "console-row.png",
    );
    assert_eq!(w.status_of("rebill_orders", id).await, "done");

    // A hostile title renders as text, and no script runs.
    browser
        .goto(&format!("{base}/rows/title/{hostile}"))
        .await
        .expect("open the title row");
    wait_for(&browser, "dl.columns").await;
    let name = browser
        .find(Locator::XPath(
            "//dt[text()='gmf_mc']/following-sibling::dd[1]",
        ))
        .await
        .expect("the gmf_mc value")
        .text()
        .await
        .expect("text");
    assert_eq!(name, HOSTILE_NAME);
    assert!(
        browser.get_alert_text().await.is_err(),
        "no alert was raised"
    );

    browser.close().await.expect("close the browser");
    daemon.stop().await;
}
