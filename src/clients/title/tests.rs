//! The title client against the simulated platform ([`crate::sim::Simulator`]): what goes
//! over the wire, how the token is shared and renewed, and that what comes back is clean.
//! What the answers mean for a row is tested in `jobs::title::classify`.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::sim::{SimOptions, Simulator, TitleBehavior, TokenBehavior};

/// A client secret with characters that change under URL encoding.
const SECRET: &str = "s3cr3t+/=";
const PHONE: &str = "13800138000";
const ACCOUNT: &str = "招商银行 66454545";

/// A simulator accepting [`SECRET`], started with `opts` otherwise.
async fn start(opts: SimOptions) -> (Simulator, SimOptions) {
    let opts = SimOptions {
        title_client_secret: SECRET.into(),
        ..opts
    };
    let sim = Simulator::start(opts.clone()).await.expect("simulator");
    (sim, opts)
}

/// Options with a TokenAction that takes `ms` milliseconds, so concurrent jobs overlap.
fn slow_tokens(ms: u64) -> SimOptions {
    SimOptions {
        token_latency: Duration::from_millis(ms),
        ..SimOptions::default()
    }
}

fn settings(sim: &Simulator, opts: &SimOptions, secret: &str, ttl: Duration) -> TitleSettings {
    TitleSettings {
        base_url: Url::parse(&sim.title_base_url()).expect("url"),
        client_id: opts.title_client_id.clone(),
        client_secret: Secret::new(secret),
        openid: None,
        busi_type: "SQM_KPJL".into(),
        token_ttl: ttl,
        timeout: Duration::from_secs(5),
    }
}

/// A shareable client of `sim` with the right secret.
fn client(sim: &Simulator, opts: &SimOptions, ttl: Duration) -> Arc<TitleClient> {
    Arc::new(TitleClient::new(settings(sim, opts, SECRET, ttl)).expect("client"))
}

/// Fields whose payload needs every escape: `&`, `<`, quotes, and Base64 with `+` and `/`.
fn fields(order_no: &str, serial: &str) -> TitleFields {
    TitleFields {
        order_no: order_no.into(),
        invoice_type: "1".into(),
        ttqqlsh: Some(serial.into()),
        attach: "661234567890".into(),
        gmf_mc: "A&B <公司> \"引号\"".into(),
        gmf_dh: Some(PHONE.into()),
        gmf_yhzh: Some(ACCOUNT.into()),
        remark: Some("房间 1 ???>>>".into()),
        ..TitleFields::default()
    }
}

/// `n` titles, each with its own order and serial (the platform refuses a reused serial).
fn batch(from: usize, n: usize) -> Vec<TitleFields> {
    (from..from + n)
        .map(|i| fields(&format!("ORD-{i}"), &format!("IW{i:04}")))
        .collect()
}

fn request(fields: &TitleFields, data_type: DataType) -> TitleRequest<'_> {
    TitleRequest {
        fields,
        sqm: "SQM/1+2",
        data_type,
    }
}

type Sent = Result<TitleReply, TitleError>;

/// Sends every title in `titles` at once; their results.
async fn send_concurrently(
    client: &Arc<TitleClient>,
    titles: Vec<TitleFields>,
    data_type: DataType,
) -> Vec<Sent> {
    let handles: Vec<_> = titles
        .into_iter()
        .map(|f| {
            let client = client.clone();
            tokio::spawn(async move { client.send(&request(&f, data_type)).await })
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(h.await.expect("join"));
    }
    results
}

/// The answer was the platform's success reply.
fn assert_sent(sent: &Sent) {
    match sent {
        Ok(TitleReply {
            status: 200,
            body: Ok(reply),
            ..
        }) if is_success(reply) => {}
        other => panic!("not a success: {other:?}"),
    }
}

/// The reply of a sent title.
fn reply_of(sent: Sent) -> Reply {
    match sent {
        Ok(TitleReply { body: Ok(r), .. }) => r,
        other => panic!("no reply: {other:?}"),
    }
}

/// The query parameter `name` as sent.
fn param<'q>(query: &'q str, name: &str) -> &'q str {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
}

/// Nothing in `sent` (every text it carries) holds the secret, a token the simulator saw,
/// `data` or the buyer's phone and account.
fn assert_clean(sim: &Simulator, sent: &Sent) {
    let shown = format!("{sent:?}");
    let tokens: Vec<String> = sim
        .title_requests()
        .iter()
        .map(|r| param(&r.query, "access_token").to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let fixed = [
        SECRET,
        "s3cr3t%2B%2F%3D",
        PHONE,
        "66454545",
        "data=",
        "client_secret=",
    ];
    for bad in fixed
        .iter()
        .copied()
        .chain(tokens.iter().map(String::as_str))
    {
        assert!(!shown.contains(bad), "{bad:?} in {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_is_what_was_built() {
    let (sim, opts) = start(SimOptions::default()).await;
    let client = client(&sim, &opts, Duration::from_secs(60));
    for (dt, serial) in [(DataType::Json, "IW0001"), (DataType::Xml, "IW0002")] {
        let f = fields("ORD-1 & x=1+2", serial);
        let sent = client.send(&request(&f, dt)).await;
        assert_sent(&sent);
        assert_clean(&sim, &sent);
        let rec = sim.title_requests().pop().expect("recorded");
        let expected_payload = payload(&f, dt).expect("payload");
        assert!(rec.payload_ok, "{rec:?}");
        assert_eq!(rec.payload, expected_payload);
        let data = encode_data(&expected_payload);
        let expected = format!(
            "sign=FPTT1001&client_id={}&access_token={}&openID={}&sqm=SQM%2F1%2B2&busiType=SQM_KPJL&data={data}&dataType={}",
            opts.title_client_id,
            param(&rec.query, "access_token"),
            url_encode(&sim.open_id()),
            dt.code()
        );
        assert_eq!(rec.query, expected);
        // The sample's Base64 needs the Java-style escapes, so decoding them on the
        // simulator's side (where `+` reads as a space) really tested something.
        assert!(data.contains("%2B") && data.contains("%2F"), "{data}");
        assert_eq!(rec.sqm, "SQM/1+2");
    }
    assert_eq!(sim.token_requests(), 1);
    assert_eq!(sim.open_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_one_renewal() {
    let (sim, opts) = start(slow_tokens(50)).await;
    let client = client(&sim, &opts, Duration::from_secs(1));
    // Cold start: 20 jobs, one TokenAction call.
    for sent in send_concurrently(&client, batch(0, 20), DataType::Json).await {
        assert_sent(&sent);
    }
    assert_eq!(sim.token_requests(), 1);
    // After the TTL, again exactly one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for sent in send_concurrently(&client, batch(20, 20), DataType::Json).await {
        assert_sent(&sent);
    }
    assert_eq!(sim.token_requests(), 2);
    assert_eq!(sim.open_requests(), 2);
    assert_eq!(client.tokens().fetch_count(), 2);
    assert_eq!(sim.title_requests().len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_renews_once_and_resends() {
    let (sim, opts) = start(SimOptions {
        token_reply_401: true,
        ..slow_tokens(50)
    })
    .await;
    let client = client(&sim, &opts, Duration::from_secs(3600));
    assert_sent(&client.send(&request(&batch(0, 1)[0], DataType::Json)).await);
    // The platform drops the token long before our TTL; ten jobs meet the 401 at once.
    sim.expire_tokens();
    for sent in send_concurrently(&client, batch(1, 10), DataType::Xml).await {
        assert_sent(&sent);
        assert_clean(&sim, &sent);
    }
    assert_eq!(sim.token_requests(), 2);
    // Each job sent once or, if it met the 401, twice; a job that started after the
    // renewal needed no resend, so the exact count depends on scheduling.
    let api_calls = sim.title_requests().len();
    assert!(
        (1 + 10 + 1..=1 + 10 + 10).contains(&api_calls),
        "{api_calls} thirdApi calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_message_renews_and_a_persistent_401_is_returned() {
    let (sim, opts) = start(SimOptions::default()).await;
    let client = client(&sim, &opts, Duration::from_secs(3600));
    assert_sent(&client.send(&request(&batch(0, 1)[0], DataType::Json)).await);

    // Every call answers "access_token无效": one renewal, one resend, then the answer.
    let f = fields("TOKEN-MSG", "IWTOKEN1");
    sim.script_title("TOKEN-MSG", vec![TitleBehavior::TokenExpired]);
    let sent = client.send(&request(&f, DataType::Json)).await;
    assert_clean(&sim, &sent);
    let reply = reply_of(sent);
    assert!(mentions_token(reply.detail()), "{reply:?}");
    assert_eq!(sim.token_requests(), 2);
    assert_eq!(sim.title_requests().len(), 3);

    // A 401 that persists after the renewal comes back as it is, after one resend.
    let f = fields("AUTH-401", "IWAUTH01");
    sim.script_title("AUTH-401", vec![TitleBehavior::Status(401)]);
    let sent = client.send(&request(&f, DataType::Json)).await;
    assert!(
        matches!(
            &sent,
            Ok(TitleReply {
                status: 401,
                body: Err(_),
                ..
            })
        ),
        "{sent:?}"
    );
    assert_eq!(sim.token_requests(), 3);
    assert_eq!(sim.title_requests().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_reported_without_the_secret() {
    let (sim, opts) = start(SimOptions::default()).await;
    // A careless platform quotes the secret it was sent in its refusal.
    sim.script_token(vec![TokenBehavior::EchoSecret]);
    let client = Arc::new(
        TitleClient::new(settings(
            &sim,
            &opts,
            "wrong-secret",
            Duration::from_secs(3600),
        ))
        .expect("client"),
    );
    for sent in send_concurrently(&client, batch(0, 8), DataType::Json).await {
        let Err(error @ TitleError::Refused { .. }) = sent else {
            panic!("not refused: {sent:?}");
        };
        assert!(
            matches!(&error, TitleError::Refused { code, .. } if code == "1001"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("TokenAction refused client_id sandbox-client"),
            "{text}"
        );
        assert!(text.contains("check client_id/client_secret"), "{text}");
        assert!(!format!("{error:?}").contains("wrong-secret"), "{error:?}");
    }
    assert!(sim.title_requests().is_empty());
    // Jobs that waited for the refused fetch share its answer.
    assert_eq!(sim.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_service_failure_is_shared_by_one_call() {
    let (sim, opts) = start(slow_tokens(100)).await;
    sim.script_token(vec![TokenBehavior::Status(500)]);
    let client = client(&sim, &opts, Duration::from_secs(3600));
    for sent in send_concurrently(&client, batch(0, 20), DataType::Json).await {
        match &sent {
            Err(TitleError::TokenService(text)) => assert!(text.contains("TokenAction"), "{text}"),
            other => panic!("not a token service failure: {other:?}"),
        }
    }
    assert_eq!(sim.token_requests(), 1);
    // An attempt after the short hold tries again.
    sim.script_token(Vec::new());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_sent(
        &client
            .send(&request(&batch(20, 1)[0], DataType::Json))
            .await,
    );
    assert_eq!(sim.token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_openid_skips_open_action() {
    let (sim, opts) = start(SimOptions::default()).await;
    let mut s = settings(&sim, &opts, SECRET, Duration::from_secs(3600));
    s.openid = Some(sim.open_id());
    let client = TitleClient::new(s).expect("client");
    assert_sent(&client.send(&request(&batch(0, 1)[0], DataType::Json)).await);
    assert_eq!(sim.open_requests(), 0);
    let rec = sim.title_requests().pop().expect("recorded");
    assert_eq!(param(&rec.query, "openID"), url_encode(&sim.open_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_are_returned_cleaned() {
    let (sim, opts) = start(SimOptions::default()).await;
    let mut s = settings(&sim, &opts, SECRET, Duration::from_secs(3600));
    s.timeout = Duration::from_millis(500);
    let client = TitleClient::new(s).expect("client");
    let send = |order: &'static str, serial: &'static str, behavior: Option<TitleBehavior>| {
        if let Some(b) = behavior {
            sim.script_title(order, vec![b]);
        }
        let client = &client;
        async move {
            client
                .send(&request(&fields(order, serial), DataType::Json))
                .await
        }
    };

    let sent = send(
        "BUSY",
        "IWBUSY01",
        Some(TitleBehavior::Busy {
            retry_after_secs: 9,
        }),
    )
    .await;
    assert!(
        matches!(&sent, Ok(TitleReply { status: 503, retry_after: Some(d), .. }) if *d == Duration::from_secs(9)),
        "{sent:?}"
    );

    // A server echoing the buyer's phone and account: masked in the reply.
    let echo = TitleBehavior::Fail {
        code: "9100".into(),
        message: format!("GMF_DH {PHONE} 与 GMF_YHZH {ACCOUNT} 格式错误"),
    };
    let sent = send("ECHO", "IWECHO01", Some(echo)).await;
    assert_clean(&sim, &sent);
    let reply = reply_of(sent);
    assert_eq!(reply.code, "9100");
    assert!(reply.message.contains("****8000"), "{}", reply.message);

    // The serial already used: the first send's answer says so, and so does a resend.
    for _ in 0..2 {
        let reply = reply_of(send("DUP", "IWDUP001", Some(TitleBehavior::Duplicate)).await);
        assert_eq!(reply.code, "9001");
        assert!(mentions_duplicate(reply.detail()), "{reply:?}");
    }

    let sent = send("PAGE", "IWPAGE01", Some(TitleBehavior::EchoQuery)).await;
    assert_clean(&sim, &sent);
    match &sent {
        Ok(TitleReply {
            status: 400,
            body: Err(unreadable),
            ..
        }) => assert!(
            unreadable.excerpt.contains("Bad data *** for ***"),
            "{}",
            unreadable.excerpt
        ),
        other => panic!("not the error page: {other:?}"),
    }

    let sent = send(
        "SLOW",
        "IWSLOW01",
        Some(TitleBehavior::Late(Duration::from_secs(2))),
    )
    .await;
    assert!(
        matches!(
            &sent,
            Err(TitleError::Transport(TransportError::Timeout(_)))
        ),
        "{sent:?}"
    );
    assert_clean(&sim, &sent);
}

fn http(status: u16, body: &str) -> HttpReply {
    HttpReply {
        status,
        body: Bytes::from(body.to_string()),
        retry_after: None,
    }
}

fn json(code: &str, msg: &str) -> String {
    serde_json::json!({"head":{"service":{"replyCode":code,"replyMsg":msg}},"body":{"TTQQLSH":"IW1"}})
        .to_string()
}

fn xml(code: &str, msg: &str) -> String {
    format!("<ROOT><HEAD><SERVICE><REPLYCODE>{code}</REPLYCODE><REPLYMSG>{msg}</REPLYMSG></SERVICE></HEAD><BODY></BODY></ROOT>")
}

#[test]
fn token_refusal_detection() {
    assert!(token_refused(&http(401, "")));
    assert!(token_refused(&http(200, &json("8001", "access_token无效"))));
    assert!(token_refused(&http(200, &xml("8001", "openID错误"))));
    assert!(!token_refused(&http(200, &json("0000", "token ok"))));
    assert!(!token_refused(&http(200, &json("9001", "流水号重复"))));
    assert!(!token_refused(&http(500, "token")));
}
