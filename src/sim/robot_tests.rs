//! The alert [`Poster`] against the simulated robots: signatures, refusals, scripts and
//! what arrives, for each of the four kinds.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;
use crate::alerts::{text, Event, EventKind, FailedRow, PostError, Poster};
use crate::config::{AlertKind, AlertTarget};
use crate::secret::Secret;

const KINDS: [AlertKind; 4] = [
    AlertKind::Wecom,
    AlertKind::Dingtalk,
    AlertKind::Feishu,
    AlertKind::Webhook,
];

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn start() -> (Simulator, Poster) {
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    (sim, Poster::new(Duration::from_secs(5)).unwrap())
}

fn url(sim: &Simulator, kind: AlertKind, key: &str) -> String {
    match kind {
        AlertKind::Wecom => sim.wecom_url(key),
        AlertKind::Dingtalk => sim.dingtalk_url(key),
        AlertKind::Feishu => sim.feishu_url(key),
        AlertKind::Webhook => sim.webhook_url(key),
    }
}

fn target(sim: &Simulator, kind: AlertKind, key: &str, secret: Option<&str>) -> AlertTarget {
    AlertTarget {
        name: format!("{}-test", kind.as_str()),
        kind,
        url: Secret::new(url(sim, kind, key)),
        secret: secret.map(Secret::new),
        events: None,
        rate_per_minute: 20,
    }
}

fn paused() -> Event {
    let mut e = Event::new(EventKind::SellerPaused, "rebill", now_ms());
    e.scope = Some("91310117568051222X".into());
    e.reason = Some("请先完成实人认证 \u{202E}evil\n@all".into());
    e.until = Some(now_ms() + 3_600_000);
    e
}

fn last(sim: &Simulator) -> RobotMessage {
    sim.robot_messages().pop().unwrap()
}

#[tokio::test]
async fn signed_messages_arrive_with_their_text() {
    let (sim, poster) = start().await;
    sim.require_robot_signature(true);
    let secret = SimOptions::default().robot_secret;
    let event = paused();
    for kind in KINDS {
        let t = target(&sim, kind, "key-1", Some(&secret));
        poster.post(&t, &event, now_ms()).await.unwrap();
        let m = last(&sim);
        assert_eq!(m.kind, kind.as_str());
        assert_eq!(m.key, "key-1");
        assert_eq!(m.text, text(&event), "{kind:?}");
        assert_eq!(m.answered, "Ok");
        // WeCom has no signature; the others carried a valid one.
        assert_eq!(m.signed, kind != AlertKind::Wecom, "{kind:?}");
    }
    let hook = last(&sim);
    assert_eq!(hook.body["event"], "seller_paused");
    assert_eq!(hook.body["scope"], "91310117568051222X");
}

#[tokio::test]
async fn unsigned_messages_pass_unless_a_signature_is_required() {
    let (sim, poster) = start().await;
    let event = Event::new(EventKind::Test, "", now_ms());
    for kind in KINDS {
        let t = target(&sim, kind, "plain", None);
        poster.post(&t, &event, now_ms()).await.unwrap();
        assert!(!last(&sim).signed);
    }
    sim.require_robot_signature(true);
    for kind in &KINDS[1..] {
        let t = target(&sim, *kind, "plain", None);
        let e = poster.post(&t, &event, now_ms()).await.unwrap_err();
        assert!(
            matches!(
                e,
                PostError::Refused {
                    code: 310000 | 19021,
                    ..
                } | PostError::Status(401)
            ),
            "{kind:?}: {e:?}"
        );
        assert_eq!(last(&sim).answered, "RejectedSign");
    }
}

#[tokio::test]
async fn a_wrong_secret_or_an_old_timestamp_is_refused() {
    let (sim, poster) = start().await;
    let secret = SimOptions::default().robot_secret;
    let two_hours_ago = now_ms() - 2 * 3_600_000;
    for kind in &KINDS[1..] {
        for (key, when) in [("wrong", now_ms()), (secret.as_str(), two_hours_ago)] {
            refused(&sim, &poster, *kind, key, when).await;
        }
    }
    let wecom = target(&sim, AlertKind::Wecom, "", None);
    let e = poster.post(&wecom, &paused(), now_ms()).await.unwrap_err();
    assert!(matches!(e, PostError::Refused { code: 93000, .. }), "{e:?}");
}

/// Posts with `secret` at `when` and checks the robot refused the signature.
async fn refused(sim: &Simulator, poster: &Poster, kind: AlertKind, secret: &str, when: i64) {
    let event = paused();
    let t = target(sim, kind, "k", Some(secret));
    let e = poster.post(&t, &event, when).await.unwrap_err();
    match kind {
        AlertKind::Dingtalk => assert!(
            matches!(&e, PostError::Refused { code: 310000, message } if message == "sign not match"),
            "{e:?}"
        ),
        AlertKind::Feishu => {
            assert!(matches!(e, PostError::Refused { code: 19021, .. }), "{e:?}")
        }
        _ => assert_eq!(e, PostError::Status(401)),
    }
    let m = last(sim);
    assert!(!m.signed && m.answered == "RejectedSign", "{m:?}");
    assert!(!e.to_string().contains("wrong"), "{e}");
}

#[tokio::test]
async fn a_scripted_refusal_then_success() {
    let (sim, poster) = start().await;
    let secret = SimOptions::default().robot_secret;
    let event = Event::new(EventKind::QueuePaused, "title", now_ms());
    for kind in KINDS {
        let key = format!("scripted-{}", kind.as_str());
        sim.script_robot(
            &key,
            vec![
                RobotBehavior::Refuse {
                    code: 45009,
                    message: "api freq out of limit\nkey=scripted".into(),
                },
                RobotBehavior::Ok,
            ],
        );
        let t = target(&sim, kind, &key, Some(&secret));
        let e = poster.post(&t, &event, now_ms()).await.unwrap_err();
        match kind {
            // A webhook has no refusal format of its own: the status says it.
            AlertKind::Webhook => assert_eq!(e, PostError::Status(422)),
            _ => match &e {
                PostError::Refused { code, message } => {
                    assert_eq!(*code, 45009);
                    // Sanitised, and the key (part of the URL) is not repeated.
                    assert!(
                        !message.contains('\n') && !message.contains(&key),
                        "{message}"
                    );
                    assert!(message.starts_with("api freq out of limit"), "{message}");
                }
                other => panic!("{kind:?}: {other:?}"),
            },
        }
        poster.post(&t, &event, now_ms()).await.unwrap();
        poster.post(&t, &event, now_ms()).await.unwrap();
        let answered: Vec<_> = sim
            .robot_messages()
            .iter()
            .filter(|m| m.key == key)
            .map(|m| m.answered)
            .collect();
        assert_eq!(answered, ["Refuse", "Ok", "Ok"], "{kind:?}");
    }
}

#[tokio::test]
async fn a_deleted_robot_is_a_permanent_status() {
    let (sim, poster) = start().await;
    let event = Event::new(EventKind::Test, "", now_ms());
    for kind in KINDS {
        sim.script_robot("gone", vec![RobotBehavior::Status(404)]);
        let t = target(&sim, kind, "gone", None);
        let e = poster.post(&t, &event, now_ms()).await.unwrap_err();
        assert_eq!(e, PostError::Status(404));
        assert!(e.is_permanent_status());
        assert!(!format!("{e} {e:?}").contains("gone"), "{e:?}");
    }
}

#[tokio::test]
async fn a_long_digest_still_fits_wecom() {
    let (sim, poster) = start().await;
    let mut event = Event::new(EventKind::RowsFailed, "rebill", now_ms());
    event.count = Some(50);
    event.since = Some(now_ms() - 600_000);
    event.rows = (0..5)
        .map(|i| FailedRow {
            id: i,
            order: format!("ORDER-{i}-{}", "9".repeat(40)),
            seller: "91310117568051222X".into(),
            message: "购方税号与名称不匹配，请核对后重新提交".repeat(10),
        })
        .collect();
    assert!(text(&event).len() > 2048);
    let t = target(&sim, AlertKind::Wecom, "long", None);
    poster.post(&t, &event, now_ms()).await.unwrap();
    let m = last(&sim);
    assert!(
        m.text.len() <= 2048 && m.text.ends_with('…'),
        "{}",
        m.text.len()
    );
    // The other robots take the whole text.
    let t = target(&sim, AlertKind::Feishu, "long", None);
    poster.post(&t, &event, now_ms()).await.unwrap();
    assert_eq!(last(&sim).text, text(&event));
}
