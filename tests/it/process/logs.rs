//! What reaches the logs: never a secret, never a raw invisible character.

use super::*;

on_both_backends!(invisible_characters_reach_the_log_escaped);

/// An order number holding U+202E (right-to-left override) is rejected naming the code
/// point, and the daemon's log shows it escaped: the character never reaches the log raw.
async fn invisible_characters_reach_the_log_escaped(backend: Backend) {
    let Some(world) = World::on(backend).await else {
        return;
    };
    let id = world.insert_rebill("A2024\u{202E}001", TAX).await;
    let config = write_toml(&world, "rlo.toml", &[], "");
    let mut daemon = start_daemon(&world, &config, "rlo.log");
    daemon.wait_running().await;
    wait_until(Duration::from_secs(20), "the row rejected", || async {
        world.status_of("rebill_orders", id).await == "rejected"
    })
    .await;
    let log = daemon.stop(Duration::from_secs(10), "daemon");
    assert!(
        !log.contains('\u{202E}'),
        "the RLO reached the log raw:\n{log}"
    );
    assert!(
        log.contains("A2024\\u{202e}001"),
        "the order number is logged escaped:\n{log}"
    );
    assert!(
        log.contains("U+202E"),
        "the reason names the code point:\n{log}"
    );
}

/// A transparent HTTP proxy in front of the simulator's title platform that records every
/// access token TokenAction hands out (the simulator does not expose them).
struct TokenProxy {
    addr: SocketAddr,
    tokens: Arc<Mutex<Vec<String>>>,
}

struct ProxyState {
    client: reqwest::Client,
    upstream: SocketAddr,
    tokens: Arc<Mutex<Vec<String>>>,
}

impl TokenProxy {
    async fn start(upstream: SocketAddr) -> TokenProxy {
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(ProxyState {
            client: reqwest::Client::new(),
            upstream,
            tokens: tokens.clone(),
        });
        let app = axum::Router::new()
            .fallback(proxy_request)
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenProxy { addr, tokens }
    }

    fn tokens(&self) -> Vec<String> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn proxy_request(
    axum::extract::State(st): axum::extract::State<Arc<ProxyState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let mut request = st
        .client
        .request(method, format!("http://{}{}", st.upstream, path))
        .body(body);
    if let Some(ct) = parts.headers.get("content-type") {
        request = request.header("content-type", ct.as_bytes());
    }
    let Ok(resp) = request.send().await else {
        return (
            axum::http::StatusCode::BAD_GATEWAY,
            "proxy: upstream failed",
        )
            .into_response();
    };
    let status = axum::http::StatusCode::from_u16(resp.status().as_u16())
        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.bytes().await.unwrap_or_default();
    if parts.uri.path().ends_with("/TokenAction") {
        let body = String::from_utf8_lossy(&bytes);
        if let Some(rest) = body.split("<access_token>").nth(1) {
            if let Some(token) = rest.split("</access_token>").next() {
                st.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(token.to_string());
            }
        }
    }
    let mut response = (status, bytes.to_vec()).into_response();
    if let Some(ct) = ct.and_then(|c| axum::http::HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert("content-type", ct);
    }
    response
}

/// Inserts a valid title row with a phone number and bank account that must be masked.
async fn insert_title(world: &World, order_no: &str, data_type: i64) -> i64 {
    world
        .writer
        .insert_id(
            "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc, gmf_dh, gmf_yhzh, gmf_yhmc, data_type) \
             VALUES ($1, '1', '661234567890', '上海某某科技有限公司', '13812345678', '6222020200112233445', '招商银行上海分行', $2) \
             RETURNING id",
            &[Arg::text(order_no), Arg::Int(data_type)],
        )
        .await
}

const WRONG_APP_SECRET: &str = "WRONG-app-secret-7731";
const WRONG_CLIENT_SECRET: &str = "WRONG-client-secret-8842";
const SELLER_SMS: &str = "9144030071526726XG";
const DEBUG_TEXT: &str = "\n[log]\nlevel = \"debug\"\nformat = \"text\"\n";
const DEBUG_JSON: &str = "\n[log]\nlevel = \"debug\"\nformat = \"json\"\n";

/// A world whose title traffic goes through a [`TokenProxy`] that records every token.
struct SecretsWorld {
    world: World,
    proxy: TokenProxy,
    sim_base: String,
    proxy_base: String,
}

impl SecretsWorld {
    /// On `backend` (`None`: no PostgreSQL here).
    async fn new(backend: Backend) -> Option<SecretsWorld> {
        let world = World::on(backend).await?;
        let proxy = TokenProxy::start(world.sim.addr()).await;
        let sim_base = world.sim.title_base_url();
        let proxy_base = format!("http://{}/Entoauth", proxy.addr);
        Some(SecretsWorld {
            world,
            proxy,
            sim_base,
            proxy_base,
        })
    }

    /// A config (title through the proxy, `log` appended) with extra `edits`.
    fn config(&self, name: &str, edits: &[(&str, &str)], log: &str) -> PathBuf {
        let mut all = vec![(self.sim_base.as_str(), self.proxy_base.as_str())];
        all.extend_from_slice(edits);
        write_toml(&self.world, name, &all, log)
    }

    /// Fails naming every secret value (an app or client secret, a buyer's phone or
    /// account, an access token the proxy saw, the sign of any request the simulator got)
    /// found in `logs`. At least `min_tokens` tokens and `min_signs` signatures must have
    /// been seen, so that the scan really looked for something.
    fn assert_no_secrets(&self, logs: &[(&str, String)], min_tokens: usize, min_signs: usize) {
        let opts = SimOptions::default();
        let tokens = self.proxy.tokens();
        assert!(
            tokens.len() >= min_tokens,
            "expected at least {min_tokens} issued tokens, got {tokens:?}"
        );
        let mut signs = HashSet::new();
        for r in self.world.sim.rebill_requests() {
            if r.timestamp.is_empty() {
                continue;
            }
            let data = invoice_worker::clients::rebill::request_data(&r.orderno);
            for secret in [opts.rebill_secret.as_str(), WRONG_APP_SECRET] {
                let fields = [
                    ("appid", opts.rebill_appid.as_str()),
                    ("timestamp", r.timestamp.as_str()),
                    ("tax_num", r.tax_num.as_str()),
                    ("request_data", data.as_str()),
                ];
                signs.insert(invoice_worker::clients::sign::sign(fields, secret));
            }
        }
        assert!(
            signs.len() >= min_signs,
            "too few requests to check signatures against: {}",
            signs.len()
        );
        let mut forbidden: Vec<(&str, String)> = vec![
            ("app_secret", opts.rebill_secret.clone()),
            ("client_secret", opts.title_client_secret.clone()),
            ("wrong app_secret", WRONG_APP_SECRET.to_string()),
            ("wrong client_secret", WRONG_CLIENT_SECRET.to_string()),
            ("buyer phone", "13812345678".to_string()),
            ("buyer bank account", "6222020200112233445".to_string()),
        ];
        // The database's password, on PostgreSQL (the URL carries it).
        if self.world.config.database.url.is_some() {
            let password = invoice_worker::store::postgres::cluster::SUPERUSER_PASSWORD;
            forbidden.push(("database password", password.to_string()));
        }
        forbidden.extend(tokens.iter().map(|t| ("access_token", t.clone())));
        forbidden.extend(signs.iter().map(|s| ("sign", s.clone())));
        let leaks: Vec<String> = logs
            .iter()
            .flat_map(|(phase, log)| leaks_in(phase, log, &forbidden))
            .collect();
        assert!(
            leaks.is_empty(),
            "secrets in the logs:\n{}",
            leaks.join("\n")
        );
        eprintln!(
            "log scan: {} log lines, {} tokens, {} signatures and {} secret values checked; none found",
            logs.iter().map(|(_, l)| l.lines().count()).sum::<usize>(),
            tokens.len(),
            signs.len(),
            forbidden.len() - tokens.len() - signs.len()
        );
    }
}

/// Every place in `log` where a `forbidden` value, or a value after a secret's key,
/// appears.
fn leaks_in(phase: &str, log: &str, forbidden: &[(&str, String)]) -> Vec<String> {
    assert!(
        log.lines().count() > 20,
        "{phase}: suspiciously short debug log:\n{log}"
    );
    let mut leaks = Vec::new();
    for (what, value) in forbidden {
        if let Some(pos) = log.find(value.as_str()) {
            let line = log[..pos].rsplit('\n').next().unwrap_or("").to_string()
                + log[pos..].lines().next().unwrap_or("");
            leaks.push(format!("{phase}: {what} {value:?} in: {line}"));
        }
    }
    for key in [
        "sign=",
        "sign\":\"",
        "sign\\\":\\\"",
        "access_token=",
        "access_token\":\"",
        "<access_token>",
    ] {
        for hit in key_then_hex32(log, key) {
            leaks.push(format!("{phase}: {key} followed by a 32-hex value: {hit}"));
        }
    }
    for key in ["client_secret=", "app_secret="] {
        for (pos, _) in log.match_indices(key) {
            let next = log[pos + key.len()..].chars().next().unwrap_or(' ');
            if next.is_ascii_alphanumeric() {
                leaks.push(format!(
                    "{phase}: {key} followed by a value: {}",
                    &log[pos..(pos + 60).min(log.len())]
                ));
            }
        }
    }
    leaks
}

on_both_backends!(
    a_mixed_drain_logs_no_secret,
    wrong_credentials_and_their_fix_log_no_secret,
);

/// Successes, an issued invoice, retried failures, a seller pause and titles in JSON and
/// XML (one forcing a token renewal), logged at debug in text: no secret in the log.
async fn a_mixed_drain_logs_no_secret(backend: Backend) {
    let Some(s) = SecretsWorld::new(backend).await else {
        return;
    };
    let world = &s.world;
    let good_text = s.config("good-text.toml", &[], DEBUG_TEXT);
    world
        .sim
        .script_rebill("ISS-1", vec![RebillBehavior::Issued]);
    world.sim.script_rebill(
        "FAIL-1",
        vec![
            RebillBehavior::Fail {
                code: 9999,
                message: "系统繁忙,请稍后再试".into(),
            },
            RebillBehavior::Accepted,
        ],
    );
    world.sim.script_rebill(
        "ERR-1",
        vec![
            RebillBehavior::Status(500),
            RebillBehavior::Html,
            RebillBehavior::Accepted,
        ],
    );
    world.sim.script_rebill(
        "SMS-1",
        vec![RebillBehavior::Fail {
            code: 1,
            message: "开票失败:需要短信验证码登录".into(),
        }],
    );
    world.sim.script_title(
        "T-RENEW",
        vec![TitleBehavior::TokenExpired, TitleBehavior::Ok],
    );
    for o in ["OK-1", "OK-2", "ISS-1", "FAIL-1", "ERR-1"] {
        world.insert_rebill(o, TAX).await;
    }
    world.insert_rebill("SMS-1", SELLER_SMS).await;
    let titles = [
        insert_title(world, "T-JSON", 0).await,
        insert_title(world, "T-XML", 1).await,
        insert_title(world, "T-RENEW", 0).await,
    ];
    let mut daemon = start_daemon(world, &good_text, "secrets-1.log");
    let w = world;
    wait_until(
        Duration::from_secs(20),
        "phase 1 rows finished",
        move || async move {
            rebill_count(w, "done").await == 5
                && w.count("SELECT COUNT(*) FROM title_submissions WHERE status = 'done'")
                    .await
                    == 3
                && w.count(&format!(
                    "SELECT COUNT(*) FROM pauses WHERE queue = 'rebill' AND scope = '{SELLER_SMS}'"
                ))
                .await
                    == 1
        },
    )
    .await;
    let log = daemon.stop(Duration::from_secs(10), "phase 1");
    for id in titles {
        assert_eq!(world.status_of("title_submissions", id).await, "done");
    }
    s.assert_no_secrets(&[("text, good credentials", log)], 2, 10);
}

/// Wrong app_secret and client_secret pause both queues (JSON logs at debug); the operator
/// resumes them with the CLI and the fixed config drains everything: no secret, right or
/// wrong, in either log.
async fn wrong_credentials_and_their_fix_log_no_secret(backend: Backend) {
    let opts = SimOptions::default();
    let Some(s) = SecretsWorld::new(backend).await else {
        return;
    };
    let world = &s.world;
    let w = world;
    let dir = world.dir().to_path_buf();
    let mut logs = Vec::new();
    let wrong_json = s.config(
        "wrong-json.toml",
        &[
            (
                &format!("app_secret = \"{}\"", opts.rebill_secret),
                &format!("app_secret = \"{WRONG_APP_SECRET}\""),
            ),
            (
                &format!("client_secret = \"{}\"", opts.title_client_secret),
                &format!("client_secret = \"{WRONG_CLIENT_SECRET}\""),
            ),
        ],
        DEBUG_JSON,
    );
    for o in ["SIG-1", "SIG-2", "SIG-3"] {
        world.insert_rebill(o, TAX).await;
    }
    insert_title(world, "T-SIG", 1).await;
    let mut daemon = start_daemon(world, &wrong_json, "secrets-2.log");
    wait_until(
        Duration::from_secs(20),
        "both queues paused by the bad credentials",
        move || async move {
            w.count("SELECT COUNT(*) FROM pauses WHERE scope = '*'")
                .await
                == 2
        },
    )
    .await;
    logs.push((
        "phase 2 (json, wrong credentials)",
        daemon.stop(Duration::from_secs(10), "phase 2"),
    ));
    assert!(
        world
            .sim
            .rebill_requests()
            .iter()
            .any(|r| r.answered == "RejectedSign"),
        "the wrong app_secret never produced a signature rejection"
    );
    assert_eq!(
        world.count("SELECT COUNT(*) FROM rebill_orders WHERE orderno LIKE 'SIG-%' AND status IN ('failed', 'done')").await,
        0,
        "a signature error must pause the queue, not finish rows"
    );

    // Phase 3: JSON format, good credentials, after lifting the pauses with the CLI.
    let good_json = s.config("good-json.toml", &[], DEBUG_JSON);
    let gj = good_json.to_string_lossy().into_owned();
    for queue in ["rebill", "title"] {
        cli_ok(
            &dir,
            &["resume", "--queue", queue, "*", "--config", &gj],
            &format!("resume {queue} '*'"),
            &["resumed"],
        );
    }
    let mut daemon = start_daemon(world, &good_json, "secrets-3.log");
    wait_until(
        Duration::from_secs(20),
        "phase 3 rows done",
        move || async move {
            w.count(
                "SELECT COUNT(*) FROM rebill_orders WHERE orderno LIKE 'SIG-%' AND status = 'done'",
            )
            .await
                == 3
                && w.count("SELECT COUNT(*) FROM title_submissions WHERE status = 'done'")
                    .await
                    == 1
        },
    )
    .await;
    logs.push((
        "phase 3 (json, good credentials)",
        daemon.stop(Duration::from_secs(10), "phase 3"),
    ));
    s.assert_no_secrets(&logs, 1, 6);
}
