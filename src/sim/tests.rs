//! Loopback tests of the simulator: requests are built here by hand (independently of the
//! crate's clients) and sent with reqwest.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use md5::{Digest, Md5};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::*;

/// What Java's `URLEncoder.encode` leaves alone: alphanumerics and `.-*_`.
const JAVA_URLENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'*')
    .remove(b'_');

/// Like `JAVA_URLENCODE` but forgetting `+`, `/` and `=` — the classic client bug.
const SLOPPY: &AsciiSet = &JAVA_URLENCODE.remove(b'+').remove(b'/').remove(b'=');

/// reqwest is built without its `json` feature here.
trait JsonBody {
    async fn json(self) -> reqwest::Result<serde_json::Value>;
}

impl JsonBody for reqwest::Response {
    async fn json(self) -> reqwest::Result<serde_json::Value> {
        let bytes = self.bytes().await?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, JAVA_URLENCODE).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The gateway signature computed from scratch (not with the crate's signer).
fn md5_sign(fields: &[(&str, &str)], secret: &str) -> String {
    let mut sorted: Vec<_> = fields.iter().filter(|(k, _)| *k != "sign").collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut text = String::from(secret);
    for (k, v) in sorted {
        text.push_str(k);
        text.push_str(v);
    }
    text.push_str(secret);
    hex::encode(Md5::digest(text.as_bytes()))
}

fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn refs(fields: &[(String, String)]) -> Vec<(&str, &str)> {
    fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A correctly signed rebill form carrying `request_data` as it is, at `ts`.
fn signed_fields(
    opts: &SimOptions,
    tax_num: &str,
    request_data: &str,
    ts: u64,
) -> Vec<(String, String)> {
    let mut fields = vec![
        ("appid".to_owned(), opts.rebill_appid.clone()),
        ("timestamp".to_owned(), ts.to_string()),
        ("tax_num".to_owned(), tax_num.to_owned()),
        ("request_data".to_owned(), request_data.to_owned()),
    ];
    let sign = md5_sign(&refs(&fields), &opts.rebill_secret);
    fields.push(("sign".to_owned(), sign));
    fields
}

/// A correctly signed rebill form for `orderno`, at `ts`.
fn rebill_fields(opts: &SimOptions, orderno: &str, ts: u64) -> Vec<(String, String)> {
    let data = serde_json::json!({ "orderno": orderno }).to_string();
    signed_fields(opts, "91310117568051222X", &data, ts)
}

/// A POST of `fields` as a form body to the rebill endpoint, with `content_type`.
fn form_request(
    client: &reqwest::Client,
    sim: &Simulator,
    fields: &[(String, String)],
    content_type: &str,
) -> reqwest::RequestBuilder {
    client
        .post(sim.rebill_url())
        .header("content-type", content_type)
        .body(form_body(&refs(fields)))
}

async fn post_form(
    client: &reqwest::Client,
    sim: &Simulator,
    fields: &[(String, String)],
) -> reqwest::Response {
    form_request(
        client,
        sim,
        fields,
        "application/x-www-form-urlencoded;charset=UTF-8",
    )
    .send()
    .await
    .unwrap()
}

/// `post_form`, the answer read as JSON.
async fn post_form_json(
    client: &reqwest::Client,
    sim: &Simulator,
    fields: &[(String, String)],
) -> serde_json::Value {
    post_form(client, sim, fields).await.json().await.unwrap()
}

async fn rebill_json(
    client: &reqwest::Client,
    sim: &Simulator,
    orderno: &str,
) -> serde_json::Value {
    let fields = rebill_fields(&SimOptions::default(), orderno, now());
    post_form_json(client, sim, &fields).await
}

/// A form content type without a charset.
const PLAIN_FORM: &str = "application/x-www-form-urlencoded";

async fn start() -> Simulator {
    Simulator::start(SimOptions::default()).await.unwrap()
}

#[tokio::test]
async fn signed_rebill_is_accepted_and_recorded() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let reply = rebill_json(&client, &sim, "订单-001 & x=1+2").await;
    assert_eq!(reply["code"], 0);
    assert_eq!(reply["message"], "重试成功");
    let recs = sim.rebill_requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].orderno, "订单-001 & x=1+2");
    assert_eq!(recs[0].tax_num, "91310117568051222X");
    assert!(recs[0].signature_ok && recs[0].verified);
    assert_eq!(recs[0].answered, "Accepted");
    assert!(sim
        .rebill_url()
        .ends_with("/gateway/nuonuo/invoice/rebillingnew"));
    sim.shutdown();
}

#[tokio::test]
async fn bad_rebill_requests_are_refused() {
    let sim = start().await;
    let opts = SimOptions::default();
    let client = reqwest::Client::new();
    let good = rebill_fields(&opts, "o-1", now());
    let set = |name: &str, value: &str| -> Vec<(String, String)> {
        good.iter()
            .map(|(k, v)| {
                if k == name {
                    (k.clone(), value.to_owned())
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect()
    };

    // Wrong signature.
    let r = post_form_json(&client, &sim, &set("sign", &"0".repeat(32))).await;
    assert_eq!(r["code"], 70601);
    assert!(r["message"].as_str().unwrap().contains("签名"));

    // Signed with the wrong secret.
    let other = SimOptions {
        rebill_secret: "nope".into(),
        ..SimOptions::default()
    };
    let r = post_form_json(&client, &sim, &rebill_fields(&other, "o-1", now())).await;
    assert_eq!(r["code"], 70601);

    // Wrong appid (correctly signed for it).
    let other = SimOptions {
        rebill_appid: "someone-else".into(),
        ..SimOptions::default()
    };
    let r = post_form_json(&client, &sim, &rebill_fields(&other, "o-1", now())).await;
    assert!(r["message"].as_str().unwrap().contains("appid"), "{r}");
    assert_ne!(r["code"], 0);

    // Stale timestamp, and one in milliseconds.
    for ts in [now() - 301, now() + 400, now() * 1000] {
        let r = post_form_json(&client, &sim, &rebill_fields(&opts, "o-1", ts)).await;
        assert!(r["message"].as_str().unwrap().contains("timestamp"), "{r}");
    }
    // Within the window is fine.
    let r = post_form_json(&client, &sim, &rebill_fields(&opts, "o-1", now() - 250)).await;
    assert_eq!(r["code"], 0);

    // Missing and extra fields are named.
    for missing in ["appid", "timestamp", "tax_num", "request_data", "sign"] {
        let fields: Vec<_> = good.iter().filter(|(k, _)| k != missing).cloned().collect();
        let r = post_form_json(&client, &sim, &fields).await;
        assert_ne!(r["code"], 0);
        assert!(r["message"].as_str().unwrap().contains(missing), "{r}");
    }
    let mut extra = good.clone();
    extra.push(("orderno".into(), "o-1".into()));
    let r = post_form_json(&client, &sim, &extra).await;
    assert!(r["message"].as_str().unwrap().contains("orderno"), "{r}");

    // request_data that is not an object with a string orderno (correctly signed).
    for data in [
        r#"["o-1"]"#,
        r#"{"orderno":1}"#,
        r#"{"order":"o-1"}"#,
        "orderno=o-1",
    ] {
        let f = signed_fields(&opts, "T1", data, now());
        let r = post_form_json(&client, &sim, &f).await;
        assert!(
            r["message"].as_str().unwrap().contains("request_data"),
            "{r}"
        );
    }

    // Not a form.
    let r: serde_json::Value = client
        .post(sim.rebill_url())
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(r["code"], 0);

    let recs = sim.rebill_requests();
    assert!(recs
        .iter()
        .any(|r| r.answered == "RejectedSign" && !r.signature_ok));
    assert!(recs.iter().any(|r| r.answered == "RejectedAppid"));
    assert!(recs.iter().any(|r| r.answered == "RejectedTimestamp"));
    assert!(recs.iter().any(|r| r.answered == "RejectedFields"));
    assert!(recs.iter().any(|r| r.answered == "RejectedRequestData"));
    assert!(recs.iter().any(|r| r.answered == "RejectedForm"));
    assert_eq!(recs.iter().filter(|r| r.verified).count(), 1);
}

#[tokio::test]
async fn scripted_steps_are_consumed_in_order_and_the_last_repeats() {
    let sim = start().await;
    let client = reqwest::Client::new();
    sim.script_rebill(
        "o-s",
        vec![
            RebillBehavior::Fail {
                code: 9999,
                message: "本次操作需登录电子发票服务平台,请先使用短信验证码登录".into(),
            },
            RebillBehavior::CodeAsString,
            RebillBehavior::Issued,
        ],
    );
    let r = rebill_json(&client, &sim, "o-s").await;
    assert_eq!(r["code"], 9999);
    assert!(r["message"].as_str().unwrap().contains("短信验证码"));
    let r = rebill_json(&client, &sim, "o-s").await;
    assert_eq!(r["code"], "0");
    let (no, url) = issued_invoice("o-s");
    assert_eq!(no.len(), 20);
    assert!(no.bytes().all(|b| b.is_ascii_digit()));
    for _ in 0..3 {
        let r = rebill_json(&client, &sim, "o-s").await;
        assert_eq!(r["code"], 100);
        assert_eq!(r["invoice_no"], no.as_str());
        assert_eq!(r["invoice_down_url"], url.as_str());
    }
    // Other orders are unaffected.
    assert_eq!(rebill_json(&client, &sim, "o-other").await["code"], 0);
    let answered: Vec<_> = sim.rebill_requests().iter().map(|r| r.answered).collect();
    assert_eq!(
        answered,
        [
            "Fail",
            "CodeAsString",
            "Issued",
            "Issued",
            "Issued",
            "Accepted"
        ]
    );
    // A refused request does not consume a step.
    sim.script_rebill(
        "o-t",
        vec![RebillBehavior::WrongTypes, RebillBehavior::Accepted],
    );
    let mut bad = rebill_fields(&SimOptions::default(), "o-t", now());
    bad[0].1 = "x".into();
    let _ = post_form(&client, &sim, &bad).await;
    let r = rebill_json(&client, &sim, "o-t").await;
    assert_eq!(r, serde_json::json!({"code":[1],"message":5}));
}

#[tokio::test]
async fn transport_level_behaviours() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let send = |orderno: &'static str| {
        let client = client.clone();
        let sim = sim.clone();
        async move {
            let fields = rebill_fields(&SimOptions::default(), orderno, now());
            post_form(&client, &sim, &fields).await
        }
    };

    sim.script_rebill("big", vec![RebillBehavior::Oversized]);
    let r = send("big").await;
    assert_eq!(r.status(), 200);
    assert!(r.content_length().is_none(), "oversized body is chunked");
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 2 * 1024 * 1024);

    sim.script_rebill("html", vec![RebillBehavior::Html]);
    let r = send("html").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("<html>"));

    sim.script_rebill("reset", vec![RebillBehavior::Reset]);
    let fields = rebill_fields(&SimOptions::default(), "reset", now());
    let outcome = form_request(&client, &sim, &fields, PLAIN_FORM)
        .send()
        .await;
    match outcome {
        Err(_) => {}
        Ok(r) => assert!(r.bytes().await.is_err(), "a reset must fail the body read"),
    }

    sim.script_rebill("garbage", vec![RebillBehavior::Garbage]);
    let text = send("garbage").await.text().await.unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());

    sim.script_rebill("empty", vec![RebillBehavior::Empty]);
    assert!(send("empty").await.bytes().await.unwrap().is_empty());

    sim.script_rebill("s502", vec![RebillBehavior::Status(502)]);
    assert_eq!(send("s502").await.status(), 502);

    sim.script_rebill(
        "429",
        vec![RebillBehavior::TooMany {
            retry_after_secs: 7,
        }],
    );
    let r = send("429").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    // Delay: a client with a short timeout gives up; two concurrent sends overlap.
    sim.script_rebill(
        "slow",
        vec![RebillBehavior::Delay(Duration::from_millis(300))],
    );
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let fields = rebill_fields(&SimOptions::default(), "slow", now());
    let err = form_request(&quick, &sim, &fields, PLAIN_FORM).send().await;
    assert!(err.is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = sim.overlapping_sends();
    let (a, b) = tokio::join!(send("slow"), send("slow"));
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 200);
    assert_eq!(sim.overlapping_sends(), before + 1);
    // Sequential sends never overlap.
    let before = sim.overlapping_sends();
    send("o-seq").await;
    send("o-seq").await;
    assert_eq!(sim.overlapping_sends(), before);
}

#[tokio::test]
async fn latency_is_added() {
    let sim = Simulator::start(SimOptions {
        latency: Duration::from_millis(150),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    assert_eq!(rebill_json(&client, &sim, "lat").await["code"], 0);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

// ----- title platform -----

struct TitleSession {
    client: reqwest::Client,
    base: String,
    token: String,
    open_id: String,
}

fn xml_text(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = doc.find(&open)? + open.len();
    let end = doc[start..].find(&close)? + start;
    Some(doc[start..end].to_owned())
}

async fn get_text(client: &reqwest::Client, url: String) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

async fn login(sim: &Simulator) -> TitleSession {
    let client = reqwest::Client::new();
    let base = sim.title_base_url();
    let opts = SimOptions::default();
    let url = format!(
        "{base}/TokenAction?sign=token&client_id={}&client_secret={}",
        enc(&opts.title_client_id),
        enc(&opts.title_client_secret)
    );
    let doc = get_text(&client, url).await;
    assert_eq!(
        xml_text(&doc, "REPLYCODE").as_deref(),
        Some("0000"),
        "{doc}"
    );
    let token = xml_text(&doc, "access_token").unwrap();
    let url = format!(
        "{base}/OpenAction?sign=open&client_id={}&access_token={}",
        enc(&opts.title_client_id),
        enc(&token)
    );
    let doc = get_text(&client, url).await;
    let open_id = xml_text(&doc, "openID").unwrap();
    TitleSession {
        client,
        base,
        token,
        open_id,
    }
}

fn json_payload(order_no: &str, serial: &str, gmf_mc: &str, remark: &str) -> String {
    serde_json::json!({"REQUEST": {"HEAD": "", "BODY": {
        "ORDER_NO": order_no, "INVOICETYPE": "1", "TTQQLSH": serial, "ATTACH": "661234567890",
        "GMF_MC": gmf_mc, "GMF_NSRSBH": "", "GMF_DZ": "", "GMF_DH": "", "GMF_YHZH": "",
        "GMF_YHMC": "", "REMARK": remark, "BY1": "", "BY2": "",
    }}})
    .to_string()
}

fn xml_payload(order_no: &str, serial: &str, gmf_mc: &str) -> String {
    use quick_xml::escape::escape;
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><REQUEST><HEAD></HEAD><BODY>\
         <ORDER_NO>{}</ORDER_NO><INVOICETYPE>2</INVOICETYPE><TTQQLSH>{}</TTQQLSH>\
         <ATTACH>661234567890</ATTACH><GMF_MC>{}</GMF_MC><GMF_NSRSBH>91110000600037341L</GMF_NSRSBH>\
         <GMF_DZ></GMF_DZ><REMARK>房间 1</REMARK></BODY></REQUEST>",
        escape(order_no),
        escape(serial),
        escape(gmf_mc)
    )
}

fn b64(payload: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(payload.as_bytes())
}

impl TitleSession {
    /// The thirdApi URL of this session with `sqm` and `data` (both already encoded).
    fn third_api_url(&self, sqm: &str, data: &str, data_type: &str) -> String {
        format!(
            "{}/thirdApi?sign=FPTT1001&client_id={}&access_token={}&openID={}&sqm={}&busiType=SQM_KPJL&data={}&dataType={}",
            self.base,
            enc(&SimOptions::default().title_client_id),
            enc(&self.token),
            enc(&self.open_id),
            sqm,
            data,
            data_type
        )
    }

    /// Sends `payload`; `set` decides how `data` is percent-encoded.
    async fn send_with(
        &self,
        payload: &str,
        data_type: &str,
        set: &'static AsciiSet,
    ) -> reqwest::Response {
        let data = b64(payload);
        let url = self.third_api_url(
            &enc("SQM-授权码+1"),
            &utf8_percent_encode(&data, set).to_string(),
            data_type,
        );
        self.client.post(url).send().await.unwrap()
    }

    /// POSTs to `url` and reads the answer as text.
    async fn post_text(&self, url: String) -> String {
        self.client
            .post(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn send(&self, payload: &str, data_type: &str) -> String {
        self.send_with(payload, data_type, JAVA_URLENCODE)
            .await
            .text()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn title_happy_path_json_and_xml() {
    let sim = start().await;
    let s = login(&sim).await;
    assert_eq!(sim.token_requests(), 1);
    assert_eq!(sim.open_requests(), 1);
    assert_eq!(s.open_id, sim.open_id());

    let name = "A&B <公司> \"引号\" 'x' +/=";
    let reply = s
        .send(&json_payload("T-1", "SIM0001", name, "r"), "0")
        .await;
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["head"]["service"]["replyCode"], "0000", "{reply}");
    assert_eq!(v["body"]["TTQQLSH"], "SIM0001");

    let reply = s.send(&xml_payload("T-2", "SIM0002", name), "1").await;
    assert_eq!(
        xml_text(&reply, "REPLYCODE").as_deref(),
        Some("0000"),
        "{reply}"
    );
    assert_eq!(xml_text(&reply, "TTQQLSH").as_deref(), Some("SIM0002"));

    assert_eq!(sim.accepted_serials(), ["SIM0001", "SIM0002"]);
    let recs = sim.title_requests();
    assert_eq!(recs.len(), 2);
    for (rec, dt) in recs.iter().zip(["0", "1"]) {
        assert_eq!(rec.gmf_mc, name);
        assert_eq!(rec.data_type, dt);
        assert_eq!(rec.sqm, "SQM-授权码+1");
        assert!(rec.payload_ok);
        assert_eq!(rec.reply_code, "0000");
        assert_eq!(rec.answered, "Ok");
    }
    assert_eq!(recs[1].order_no, "T-2");
}

#[tokio::test]
async fn unencoded_plus_in_data_is_corrupted() {
    let sim = start().await;
    let s = login(&sim).await;
    // Find a payload whose Base64 contains '+' (and '/').
    let mut payload = String::new();
    for i in 0..10_000 {
        payload = json_payload("T-plus", "SIMPLUS1", "购买方>>>??", &format!("备注{i}~~~"));
        if b64(&payload).contains('+') {
            break;
        }
    }
    let encoded = b64(&payload);
    assert!(encoded.contains('+'));

    let sloppy = s
        .send_with(&payload, "0", SLOPPY)
        .await
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&sloppy).unwrap();
    assert_ne!(v["head"]["service"]["replyCode"], "0000");
    assert!(
        v["head"]["service"]["replyMsg"]
            .as_str()
            .unwrap()
            .contains("Base64"),
        "{sloppy}"
    );
    assert!(sim.accepted_serials().is_empty());
    assert!(!sim.title_requests()[0].payload_ok);

    // Missing padding is refused too.
    let unpadded = encoded.trim_end_matches('=').to_owned();
    if unpadded.len() != encoded.len() {
        let text = s
            .post_text(s.third_api_url("x", &enc(&unpadded), "0"))
            .await;
        assert!(text.contains("Base64"), "{text}");
    }

    // Properly encoded, the same payload goes through.
    let ok = s.send(&payload, "0").await;
    assert!(ok.contains("\"0000\""), "{ok}");
    assert_eq!(sim.accepted_serials(), ["SIMPLUS1"]);
}

#[tokio::test]
async fn duplicate_serial_and_field_rules() {
    let sim = start().await;
    let s = login(&sim).await;
    let p = json_payload("T-d", "SIMDUP", "买方", "");
    assert!(s.send(&p, "0").await.contains("\"0000\""));
    let again = s.send(&p, "0").await;
    let v: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(v["head"]["service"]["replyCode"], "9001");
    assert!(v["head"]["service"]["replyMsg"]
        .as_str()
        .unwrap()
        .contains("重复"));
    // Same serial in XML too.
    let x = s.send(&xml_payload("T-d", "SIMDUP", "买方"), "1").await;
    assert!(xml_text(&x, "REPLYMSG").unwrap().contains("重复"));
    assert_eq!(sim.accepted_serials(), ["SIMDUP"]);

    // Field rules name the field.
    let long = json_payload("T-long", "SIMLONG", &"名".repeat(101), "");
    let r = s.send(&long, "0").await;
    assert!(r.contains("GMF_MC") && !r.contains("\"0000\""), "{r}");
    let long_serial = json_payload("T-ls", "S123456789012345678901", "买方", "");
    assert!(s.send(&long_serial, "0").await.contains("TTQQLSH"));
    let special = xml_payload("T-sp", "SIMSP", "买方")
        .replace("<GMF_NSRSBH>91110000600037341L</GMF_NSRSBH>", "");
    assert!(s.send(&special, "1").await.contains("GMF_NSRSBH"));
    // Wrong busiType / missing sqm.
    let url = s.third_api_url("", &enc(&b64(&p)), "0");
    assert!(s.post_text(url).await.contains("sqm"));
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let sim = start().await;
    let s = login(&sim).await;
    sim.expire_tokens();
    let r = s.send(&json_payload("T-e", "SIME1", "买方", ""), "0").await;
    assert!(r.contains("access_token无效"), "{r}");
    assert!(sim.accepted_serials().is_empty());

    // A fresh login works again.
    let s = login(&sim).await;
    assert_eq!(sim.token_requests(), 2);
    assert!(s
        .send(&json_payload("T-e", "SIME1", "买方", ""), "0")
        .await
        .contains("\"0000\""));

    // Scripted expiry: one refusal, then success; the serial is not used up by it.
    sim.script_title("T-x", vec![TitleBehavior::TokenExpired, TitleBehavior::Ok]);
    let r = s.send(&json_payload("T-x", "SIMX", "买方", ""), "0").await;
    assert!(r.contains("access_token无效"), "{r}");
    assert!(s
        .send(&json_payload("T-x", "SIMX", "买方", ""), "0")
        .await
        .contains("\"0000\""));

    // Wrong client credentials at TokenAction.
    let doc = get_text(
        &s.client,
        format!(
            "{}/TokenAction?sign=token&client_id=sandbox-client&client_secret=wrong",
            s.base
        ),
    )
    .await;
    assert_eq!(xml_text(&doc, "REPLYCODE").as_deref(), Some("1001"));
    assert!(doc.contains("client_secret"));
}

#[tokio::test]
async fn expired_token_as_http_401() {
    let sim = Simulator::start(SimOptions {
        token_reply_401: true,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let s = login(&sim).await;
    sim.expire_tokens();
    let r = s
        .send_with(
            &json_payload("T-4", "SIM401", "买方", ""),
            "0",
            JAVA_URLENCODE,
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(sim.title_requests()[0].reply_code, "HTTP 401");
}

#[tokio::test]
async fn title_scripted_shapes() {
    let sim = start().await;
    let s = login(&sim).await;
    sim.script_title("T-alt", vec![TitleBehavior::AltShape]);
    let r = s.send(&xml_payload("T-alt", "SIMALT", "买方"), "1").await;
    let v: serde_json::Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["ROOT"]["HEAD"]["SERVICE"]["REPLYCODE"], "0");

    sim.script_title("T-1000", vec![TitleBehavior::Code1000]);
    let r = s.send(&xml_payload("T-1000", "SIM1000", "买方"), "1").await;
    assert_eq!(xml_text(&r, "REPLYCODE").as_deref(), Some("1000"));
    assert_eq!(xml_text(&r, "Code").as_deref(), Some("0000"));

    sim.script_title("T-dup", vec![TitleBehavior::Duplicate]);
    assert!(s
        .send(&json_payload("T-dup", "SIMD", "买方", ""), "0")
        .await
        .contains("重复"));

    sim.script_title(
        "T-f",
        vec![
            TitleBehavior::Fail {
                code: "3001".into(),
                message: "授权码无效".into(),
            },
            TitleBehavior::Status(503),
            TitleBehavior::Garbage,
        ],
    );
    let p = json_payload("T-f", "SIMF", "买方", "");
    assert!(s.send(&p, "0").await.contains("3001"));
    assert_eq!(s.send_with(&p, "0", JAVA_URLENCODE).await.status(), 503);
    assert!(serde_json::from_str::<serde_json::Value>(&s.send(&p, "0").await).is_err());

    // Late: recorded as accepted before the answer arrives.
    sim.script_title(
        "T-late",
        vec![TitleBehavior::Late(Duration::from_millis(500))],
    );
    let p = json_payload("T-late", "SIMLATE", "买方", "");
    let sending = s.send(&p, "0");
    let check = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sim.accepted_serials()
    };
    let (reply, accepted_meanwhile) = tokio::join!(sending, check);
    assert!(accepted_meanwhile.contains(&"SIMLATE".to_owned()));
    assert!(reply.contains("\"0000\""));

    assert_eq!(
        sim.accepted_serials(),
        ["SIMALT", "SIM1000", "SIMD", "SIMLATE"]
    );
}

#[tokio::test]
async fn busy_and_echo_pages_come_after_verification() {
    let sim = start().await;
    let s = login(&sim).await;
    let p = json_payload("T-busy", "SIMBUSY", "买方", "");
    sim.script_title(
        "T-busy",
        vec![TitleBehavior::Busy {
            retry_after_secs: 9,
        }],
    );
    let r = s.send_with(&p, "0", JAVA_URLENCODE).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "9");
    let rec = sim.title_requests().pop().unwrap();
    assert_eq!(rec.payload, p);
    assert_eq!(rec.reply_code, "HTTP 503");
    assert_eq!(
        rec.query,
        s.third_api_url(&enc("SQM-授权码+1"), &enc(&b64(&p)), "0")
            .split_once('?')
            .unwrap()
            .1
    );

    let p = json_payload("T-page", "SIMPAGE", "买方", "");
    sim.script_title("T-page", vec![TitleBehavior::EchoQuery]);
    let r = s.send_with(&p, "0", JAVA_URLENCODE).await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    let rec = sim.title_requests().pop().unwrap();
    assert!(page.contains(&b64(&p)), "{page}");
    assert!(page.contains(&format!("for {}", s.token)), "{page}");
    assert!(page.contains(&rec.query), "{page}");
    assert!(sim.accepted_serials().is_empty());

    // An invalid token is refused as always, whatever the script says.
    sim.expire_tokens();
    let r = s.send(&p, "0").await;
    assert!(r.contains("access_token无效"), "{r}");
}

#[tokio::test]
async fn token_action_can_be_down_or_careless() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let opts = SimOptions::default();
    let url = |secret: &str| {
        format!(
            "{}/TokenAction?sign=token&client_id={}&client_secret={}",
            sim.title_base_url(),
            enc(&opts.title_client_id),
            enc(secret)
        )
    };
    sim.script_token(vec![TokenBehavior::Status(500), TokenBehavior::EchoSecret]);
    let r = client
        .get(url(&opts.title_client_secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    // EchoSecret quotes a wrong secret in its refusal and still issues on the right one.
    let doc = get_text(&client, url("wrong-secret")).await;
    assert_eq!(xml_text(&doc, "REPLYCODE").as_deref(), Some("1001"));
    assert!(doc.contains("wrong-secret"), "{doc}");
    let doc = get_text(&client, url(&opts.title_client_secret)).await;
    assert!(xml_text(&doc, "access_token").is_some(), "{doc}");
    // Without a script, refusals quote nothing.
    sim.script_token(Vec::new());
    let doc = get_text(&client, url("wrong-secret")).await;
    assert!(!doc.contains("wrong-secret"), "{doc}");
    assert_eq!(sim.token_requests(), 4);
}
