//! The conformance suite: every queue operation of [`QueueStore`], written once and run
//! against both backends (a fresh SQLite file; a fresh database on the throwaway
//! PostgreSQL cluster, skipped loudly where no server is installed, a failure under
//! `CI=true`). What the queue machinery relies on must hold on both, to the row.

use std::time::Duration;

use super::admin::{Enqueued, NewRebill, NewTitle};
use super::claim::{ClaimBatch, ClaimParams};
use super::complete::{Completion, FinalStatus};
use super::driver::{
    AlertStore, HeldParams, InspectStore, PauseParams, PruneParams, QueueStore, RenewParams,
    RescueParams,
};
use super::pauses::{ClaimPlan, PauseChange, PauseRecord, ProbeStep};
use super::postgres::PgStore;
use super::rows::{RebillRow, TitleRow};
use super::test_support::accepted;
use super::{now_ms, QueueName, Store, StoreError};

/// Reads and writes around the interface, for setting up and checking (portable SQL with
/// literals only).
trait Raw {
    async fn exec(&self, sql: &str) -> Result<u64, StoreError>;
    async fn number(&self, sql: &str) -> Option<i64>;
    async fn text(&self, sql: &str) -> Option<String>;
}

/// Both stores' raw access, each sorting its own constraint errors.
macro_rules! raw_for {
    ($($store:ty => $classify:path),*) => {$(
        impl Raw for $store {
            async fn exec(&self, sql: &str) -> Result<u64, StoreError> {
                let done = sqlx::query(sql).execute(self.pool()).await.map_err($classify)?;
                Ok(done.rows_affected())
            }
            async fn number(&self, sql: &str) -> Option<i64> {
                let (v,): (Option<i64>,) =
                    sqlx::query_as(sql).fetch_one(self.pool()).await.expect(sql);
                v
            }
            async fn text(&self, sql: &str) -> Option<String> {
                let (v,): (Option<String>,) =
                    sqlx::query_as(sql).fetch_one(self.pool()).await.expect(sql);
                v
            }
        }
    )*};
}

raw_for!(Store => StoreError::classify, PgStore => StoreError::classify_pg);

const SELLER: &str = "91310117568051222X";
const OTHER: &str = "91110108MA01AAAA0X";

fn job(orderno: &str, seller: &str) -> NewRebill {
    NewRebill {
        orderno: orderno.into(),
        tax_num: seller.into(),
        max_attempts: None,
        not_before: None,
    }
}

async fn insert<S: QueueStore>(s: &S, orderno: &str, seller: &str) -> i64 {
    match s
        .enqueue_rebill(&job(orderno, seller), now_ms())
        .await
        .expect("insert")
    {
        Enqueued::Inserted(id) => id,
        Enqueued::AlreadyActive => panic!("{orderno} already active"),
    }
}

async fn claim_with<S: QueueStore>(
    s: &S,
    now: i64,
    limit: u32,
    lease: Duration,
    token: &str,
    plan: impl FnOnce(&[super::pauses::PauseView]) -> ClaimPlan + Send,
) -> ClaimBatch<RebillRow> {
    let p = ClaimParams {
        now,
        limit,
        lease,
        claim_token: token,
        claimed_by: "conformance",
    };
    s.claim::<RebillRow>(&p, plan).await.expect("claim")
}

async fn claim<S: QueueStore>(
    s: &S,
    limit: u32,
    lease: Duration,
    token: &str,
) -> ClaimBatch<RebillRow> {
    claim_with(s, now_ms(), limit, lease, token, |_| ClaimPlan::unpaused()).await
}

fn retry_in(id: i64, token: &str, now: i64, delay_ms: i64) -> Completion {
    let mut c = accepted(id, token, now);
    c.status = FinalStatus::Pending;
    c.outcome = None;
    c.next_attempt_at = now + delay_ms;
    c.last_code = Some("9999".into());
    c.last_message = Some("系统繁忙".into());
    c
}

const LEASE: Duration = Duration::from_secs(60);

async fn idempotent_insert_keeps_one_active_row_per_order<S: QueueStore + Raw>(s: S) {
    let first = insert(&s, "A-1", SELLER).await;
    assert_eq!(
        s.enqueue_rebill(&job("A-1", SELLER), now_ms())
            .await
            .unwrap(),
        Enqueued::AlreadyActive
    );
    // The same order of another seller is another order (due later, so that the claim
    // below has one oldest row).
    let mut other = job("A-1", OTHER);
    other.not_before = Some(now_ms() + 3_600_000);
    assert!(matches!(
        s.enqueue_rebill(&other, now_ms()).await.unwrap(),
        Enqueued::Inserted(_)
    ));
    let held = claim(&s, 1, LEASE, "t1").await;
    assert_eq!(held.rows[0].meta.id, first, "oldest due first");
    assert_eq!(
        s.enqueue_rebill(&job("A-1", SELLER), now_ms())
            .await
            .unwrap(),
        Enqueued::AlreadyActive,
        "a running row is active too"
    );
    assert_eq!(
        s.complete(QueueName::Rebill, &[accepted(first, "t1", now_ms())])
            .await
            .unwrap(),
        [true]
    );
    assert!(
        matches!(
            s.enqueue_rebill(&job("A-1", SELLER), now_ms())
                .await
                .unwrap(),
            Enqueued::Inserted(_)
        ),
        "a finished order may be sent again"
    );
}

async fn claims_take_due_rows_up_to_the_limit_oldest_first<S: QueueStore + Raw>(s: S) {
    // Due at distinct times, so that "oldest first" has one answer (rows due in the same
    // millisecond come in the index's order, which differs between the backends).
    let mut ids = Vec::new();
    for (orderno, seller, ago) in [
        ("B-1", SELLER, 3_000),
        ("B-2", SELLER, 2_000),
        ("B-3", OTHER, 1_000),
    ] {
        let mut j = job(orderno, seller);
        j.not_before = Some(now_ms() - ago);
        match s.enqueue_rebill(&j, now_ms()).await.unwrap() {
            Enqueued::Inserted(id) => ids.push(id),
            Enqueued::AlreadyActive => panic!("{orderno} already active"),
        }
    }
    let later = now_ms() + 3_600_000;
    let mut future = job("B-4", SELLER);
    future.not_before = Some(later);
    s.enqueue_rebill(&future, now_ms()).await.unwrap();

    let first = claim(&s, 2, LEASE, "t1").await;
    let rest = claim(&s, 8, LEASE, "t2").await;
    let got: Vec<i64> = first
        .rows
        .iter()
        .chain(&rest.rows)
        .map(|r| r.meta.id)
        .collect();
    assert_eq!(
        got, ids,
        "each due row once, oldest first, the future one not at all"
    );
    assert_eq!(first.rows.len(), 2);
    let meta = &first.rows[0].meta;
    assert_eq!((meta.attempts, meta.claim_token.as_str()), (1, "t1"));
    let recent: Vec<i64> = serde_json::from_str(&meta.recent_attempts).unwrap();
    assert_eq!(recent.len(), 1, "the attempt's time is recorded");
    assert!(
        (recent[0] - now_ms()).abs() < 5_000,
        "in the caller's clock: {recent:?}"
    );
    assert_eq!(first.rows[0].row.orderno, "B-1");
    assert_eq!(first.rows[0].row.tax_num, SELLER);
    assert!(claim(&s, 8, LEASE, "t3").await.rows.is_empty());
    let next = s
        .next_due_after(QueueName::Rebill, now_ms())
        .await
        .unwrap()
        .unwrap();
    assert!(
        (next - later).abs() < 5_000,
        "next due {next}, inserted for {later}"
    );
}

async fn completions_apply_only_under_their_own_claim<S: QueueStore + Raw>(s: S) {
    let a = insert(&s, "C-1", SELLER).await;
    let b = insert(&s, "C-2", SELLER).await;
    claim(&s, 2, LEASE, "mine").await;
    let now = now_ms();
    let mut done = accepted(a, "mine", now);
    done.outcome = Some("issued");
    done.invoice_no = Some("24312000000012345678".into());
    done.invoice_down_url = Some("https://fp.example/a.pdf".into());
    let stolen = accepted(b, "someone-else", now);
    assert_eq!(
        s.complete(QueueName::Rebill, &[done, stolen])
            .await
            .unwrap(),
        [true, false]
    );
    let row = format!("SELECT {{}} FROM rebill_orders WHERE id = {a}");
    assert_eq!(
        s.text(&row.replace("{}", "status")).await.as_deref(),
        Some("done")
    );
    assert_eq!(
        s.text(&row.replace("{}", "outcome")).await.as_deref(),
        Some("issued")
    );
    assert_eq!(
        s.text(&row.replace("{}", "invoice_no")).await.as_deref(),
        Some("24312000000012345678")
    );
    assert_eq!(s.text(&row.replace("{}", "claim_token")).await, None);
    assert!(s.number(&row.replace("{}", "finished_at")).await.is_some());
    let other = format!("SELECT status FROM rebill_orders WHERE id = {b}");
    assert_eq!(s.text(&other).await.as_deref(), Some("running"));
    // Once done, the same completion again changes nothing.
    assert_eq!(
        s.complete(QueueName::Rebill, &[accepted(a, "mine", now)])
            .await
            .unwrap(),
        [false]
    );
}

async fn a_retry_waits_its_backoff<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "D-1", SELLER).await;
    claim(&s, 1, LEASE, "t").await;
    let now = now_ms();
    assert_eq!(
        s.complete(QueueName::Rebill, &[retry_in(id, "t", now, 600_000)])
            .await
            .unwrap(),
        [true]
    );
    assert!(
        claim(&s, 8, LEASE, "t2").await.rows.is_empty(),
        "not due before its backoff"
    );
    let next = s
        .next_due_after(QueueName::Rebill, now_ms())
        .await
        .unwrap()
        .unwrap();
    assert!(
        (next - (now + 600_000)).abs() < 5_000,
        "due {next}, expected {}",
        now + 600_000
    );
    let row = format!("SELECT last_message FROM rebill_orders WHERE id = {id}");
    assert_eq!(s.text(&row).await.as_deref(), Some("系统繁忙"));
}

async fn an_expired_lease_is_rescued_and_its_claim_is_lost<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "E-1", SELLER).await;
    let held = claim(&s, 1, Duration::ZERO, "dead").await;
    assert_eq!(held.rows.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let rescued = s
        .rescue_expired(RescueParams {
            queue: QueueName::Rebill,
            now: now_ms(),
            default_max_attempts: 5,
        })
        .await
        .unwrap();
    assert_eq!(rescued, 1);
    let renewed = s
        .renew_leases(RenewParams {
            rows: HeldParams {
                queue: QueueName::Rebill,
                held: &[(id, "dead".into())],
                now: now_ms(),
            },
            lease_until: now_ms() + 60_000,
        })
        .await
        .unwrap();
    assert_eq!(renewed, [false], "a rescued row's lease cannot be renewed");
    assert_eq!(
        s.complete(QueueName::Rebill, &[accepted(id, "dead", now_ms())])
            .await
            .unwrap(),
        [false],
        "nor its old claim completed"
    );
    let again = claim(&s, 1, LEASE, "alive").await;
    assert_eq!(again.rows[0].meta.attempts, 2, "the lost attempt counts");
    let message = format!("SELECT last_message FROM rebill_orders WHERE id = {id}");
    assert!(s.text(&message).await.unwrap().contains("lease expired"));
    let history = format!(
        "SELECT COUNT(*) FROM attempt_history WHERE row_id = {id} AND action = 'lease_expired'"
    );
    assert_eq!(s.number(&history).await, Some(1));
    // Nothing else is rescued: the new holder's lease runs.
    let rescued = s
        .rescue_expired(RescueParams {
            queue: QueueName::Rebill,
            now: now_ms(),
            default_max_attempts: 5,
        })
        .await
        .unwrap();
    assert_eq!(rescued, 0);
}

async fn the_last_attempt_rescued_fails_the_row<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "F-1", SELLER).await;
    claim(&s, 1, Duration::ZERO, "dead").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let p = RescueParams {
        queue: QueueName::Rebill,
        now: now_ms(),
        default_max_attempts: 1,
    };
    assert_eq!(s.rescue_expired(p).await.unwrap(), 1);
    let status = format!("SELECT status FROM rebill_orders WHERE id = {id}");
    assert_eq!(s.text(&status).await.as_deref(), Some("failed"));
}

async fn renewed_leases_outlive_their_first_end<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "G-1", SELLER).await;
    claim(&s, 1, Duration::from_millis(200), "t").await;
    let renewed = s
        .renew_leases(RenewParams {
            rows: HeldParams {
                queue: QueueName::Rebill,
                held: &[(id, "t".into()), (id + 999, "t".into())],
                now: now_ms(),
            },
            lease_until: now_ms() + 60_000,
        })
        .await
        .unwrap();
    assert_eq!(renewed, [true, false]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = RescueParams {
        queue: QueueName::Rebill,
        now: now_ms(),
        default_max_attempts: 5,
    };
    assert_eq!(
        s.rescue_expired(p).await.unwrap(),
        0,
        "the renewed lease still runs"
    );
}

async fn a_release_gives_the_attempt_back<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "H-1", SELLER).await;
    claim(&s, 1, LEASE, "t").await;
    let held = [(id, "t".to_string()), (id, "stale".to_string())];
    let p = HeldParams {
        queue: QueueName::Rebill,
        held: &held,
        now: now_ms(),
    };
    assert_eq!(s.release(p).await.unwrap(), 1);
    let again = claim(&s, 1, LEASE, "t2").await;
    assert_eq!(
        again.rows[0].meta.attempts, 1,
        "the released attempt was given back"
    );
    let history =
        format!("SELECT COUNT(*) FROM attempt_history WHERE row_id = {id} AND action = 'released'");
    assert_eq!(s.number(&history).await, Some(1));
}

async fn a_paused_seller_is_skipped_and_probed_once<S: QueueStore + Raw>(s: S) {
    let first = insert(&s, "P-1", SELLER).await;
    claim_with(&s, now_ms(), 1, LEASE, "t", |_| ClaimPlan::unpaused()).await;
    insert(&s, "P-2", SELLER).await;
    insert(&s, "P-3", SELLER).await;
    let other = insert(&s, "P-4", OTHER).await;
    let mut hit = retry_in(first, "t", now_ms(), 0);
    hit.refund_attempt = true;
    hit.pause = PauseChange::Start(PauseRecord {
        scope: SELLER.into(),
        until: now_ms() + 3_600_000,
        reason: "授权已过期".into(),
    });
    assert_eq!(s.complete(QueueName::Rebill, &[hit]).await.unwrap(), [true]);

    let during = claim(&s, 8, LEASE, "t2").await;
    let got: Vec<i64> = during.rows.iter().map(|r| r.meta.id).collect();
    assert_eq!(got, [other], "only the seller that is not paused");
    // The pause ends (set back rather than waited for: no race with a slow machine).
    s.exec("UPDATE pauses SET until_at = 0").await.unwrap();

    // The pause ended: two claims that both want to probe it; one row goes out.
    let probe = |_: &[super::pauses::PauseView]| ClaimPlan {
        hold: false,
        probes: vec![ProbeStep {
            scope: SELLER.into(),
            lift_when_idle: false,
        }],
        claim_rest: false,
    };
    let a = claim_with(&s, now_ms(), 8, LEASE, "probe-a", probe).await;
    let b = claim_with(&s, now_ms(), 8, LEASE, "probe-b", probe).await;
    assert_eq!(
        a.rows.len() + b.rows.len(),
        1,
        "one probe: {:?} {:?}",
        a.rows,
        b.rows
    );
    let probe_row = a.rows.first().or(b.rows.first()).unwrap();
    let token = probe_row.meta.claim_token.clone();
    let running = "SELECT COUNT(*) FROM rebill_orders WHERE status = 'running'";
    assert_eq!(
        s.number(running).await,
        Some(2),
        "the probe and the other seller's row"
    );
    let marked = "SELECT probe_row_id FROM pauses";
    assert_eq!(s.number(marked).await, Some(probe_row.meta.id));
    let mut through = accepted(probe_row.meta.id, &token, now_ms());
    through.pause = PauseChange::LiftProbed;
    assert_eq!(
        s.complete(QueueName::Rebill, &[through]).await.unwrap(),
        [true]
    );
    assert_eq!(
        s.number("SELECT COUNT(*) FROM pauses").await,
        Some(0),
        "lifted"
    );
    assert_eq!(
        claim(&s, 8, LEASE, "after").await.rows.len(),
        2,
        "the seller's rows flow again"
    );
}

/// The plan the worker uses, at `now`.
fn real_plan(now: i64) -> impl FnOnce(&[super::pauses::PauseView]) -> ClaimPlan + Send {
    move |views| crate::queue::pauses::claim_plan(views, now)
}

/// More ended seller pauses than one claim looks at: each seller sends one probe at most,
/// never its other rows, and the sellers not paused flow.
async fn an_ended_pause_lets_one_row_through_however_many_ended<S: QueueStore + Raw>(s: S) {
    const PAUSED: usize = 20;
    for k in 0..PAUSED {
        let seller = format!("9131011756805{k:04}X");
        insert(&s, &format!("E-{k}-a"), &seller).await;
        insert(&s, &format!("E-{k}-b"), &seller).await;
        s.exec(&format!(
            "INSERT INTO pauses (queue, scope, until_at, reason, created_at) \
             VALUES ('rebill', '{seller}', 0, 'quota', 0)"
        ))
        .await
        .unwrap();
    }
    let free = insert(&s, "E-free", OTHER).await;
    let now = now_ms();
    let first = claim_with(&s, now, 64, LEASE, "t1", real_plan(now)).await;
    let per_seller = "SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM rebill_orders \
                      WHERE status = 'running' GROUP BY tax_num) x";
    assert_eq!(s.number(per_seller).await, Some(1), "one row per seller");
    assert!(first.rows.iter().any(|r| r.meta.id == free));
    assert!(
        first.rows.len() < PAUSED + 1,
        "a claim looks at fewer ended pauses than there are: {}",
        first.rows.len()
    );
    // Later claims probe the pauses the first did not see, still one row each.
    let now = now_ms();
    claim_with(&s, now, 64, LEASE, "t2", real_plan(now)).await;
    assert_eq!(
        s.number(per_seller).await,
        Some(1),
        "still one row per seller"
    );
    let running = "SELECT COUNT(*) FROM rebill_orders WHERE status = 'running'";
    assert_eq!(
        s.number(running).await,
        Some(PAUSED as i64 + 1),
        "every seller probed"
    );
    let probing = "SELECT COUNT(*) FROM pauses WHERE probe_row_id IS NOT NULL";
    assert_eq!(s.number(probing).await, Some(PAUSED as i64));
}

async fn title_rows_claim_and_keep_their_serial<S: QueueStore + Raw>(s: S) {
    let mut t = NewTitle::default();
    t.fields.order_no = "T-1".into();
    t.fields.invoice_type = "1".into();
    t.fields.gmf_mc = "上海某某有限公司".into();
    t.sqm = Some("SQM-1".into());
    t.data_type = Some(1);
    let id = s.enqueue_title(&t).await.unwrap();
    let p = ClaimParams {
        now: now_ms(),
        limit: 4,
        lease: LEASE,
        claim_token: "t",
        claimed_by: "conformance",
    };
    let held = s
        .claim::<TitleRow>(&p, |_| ClaimPlan::unpaused())
        .await
        .unwrap();
    assert_eq!(held.rows.len(), 1);
    let row = &held.rows[0].row;
    assert_eq!(
        (row.id, row.fields.gmf_mc.as_str()),
        (id, "上海某某有限公司")
    );
    assert_eq!(
        (row.sqm.as_deref(), row.data_type),
        (Some("SQM-1"), Some(1))
    );
    assert!(s.set_title_serial(id, "t", "SERIAL-1").await.unwrap());
    assert!(
        !s.set_title_serial(id, "t", "SERIAL-2").await.unwrap(),
        "kept once set"
    );
    let mut dup = t.clone();
    dup.fields.ttqqlsh = Some("SERIAL-1".into());
    assert!(matches!(
        s.enqueue_title(&dup).await,
        Err(StoreError::Constraint(_))
    ));
}

async fn the_tables_refuse_what_the_worker_could_not_send<S: QueueStore + Raw>(s: S) {
    let refused = [
        "INSERT INTO rebill_orders (orderno, tax_num) VALUES ('', 'X')",
        "INSERT INTO rebill_orders (orderno, tax_num) VALUES ('O', '')",
        "INSERT INTO rebill_orders (orderno, tax_num, status) VALUES ('O', 'X', 'sent')",
        "INSERT INTO rebill_orders (orderno, tax_num, max_attempts) VALUES ('O', 'X', 0)",
        "INSERT INTO rebill_orders (orderno) VALUES ('O')",
        "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc) VALUES ('O', '3', '', 'M')",
        "INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc, data_type) VALUES ('O', '1', '', 'M', 2)",
        "INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('other', '*', 0, 'r', 0)",
    ];
    for sql in refused {
        assert!(
            matches!(s.exec(sql).await, Err(StoreError::Constraint(_))),
            "accepted: {sql}"
        );
    }
    // What a writer needs, and the defaults it gets.
    s.exec("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('W-1', 'X')")
        .await
        .unwrap();
    let due = s
        .number("SELECT next_attempt_at FROM rebill_orders WHERE orderno = 'W-1'")
        .await;
    assert!(
        (due.unwrap() - now_ms()).abs() < 5_000,
        "due now by default: {due:?}"
    );
    let status = s
        .text("SELECT status FROM rebill_orders WHERE orderno = 'W-1'")
        .await;
    assert_eq!(status.as_deref(), Some("pending"));
    let idempotent =
        "INSERT INTO rebill_orders (orderno, tax_num) VALUES ('W-1', 'X') ON CONFLICT DO NOTHING";
    assert_eq!(s.exec(idempotent).await.unwrap(), 0);
}

async fn a_deleted_row_takes_its_history_along<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "K-1", SELLER).await;
    claim(&s, 1, LEASE, "t").await;
    let held = [(id, "t".to_string())];
    let p = HeldParams {
        queue: QueueName::Rebill,
        held: &held,
        now: now_ms(),
    };
    s.release(p).await.unwrap();
    let count = format!("SELECT COUNT(*) FROM attempt_history WHERE row_id = {id}");
    assert_eq!(s.number(&count).await, Some(1));
    s.exec(&format!("DELETE FROM rebill_orders WHERE id = {id}"))
        .await
        .unwrap();
    assert_eq!(s.number(&count).await, Some(0));
}

async fn a_hand_edited_attempt_list_never_stops_the_claims<S: QueueStore + Raw>(s: S) {
    let id = insert(&s, "J-1", SELLER).await;
    let other = insert(&s, "J-2", SELLER).await;
    s.exec(&format!(
        "UPDATE rebill_orders SET recent_attempts = 'not [json' WHERE id = {id}"
    ))
    .await
    .unwrap();
    s.exec(&format!(
        "UPDATE rebill_orders SET recent_attempts = '[1, 2' WHERE id = {other}"
    ))
    .await
    .unwrap();
    let held = claim(&s, 8, LEASE, "t").await;
    assert_eq!(held.rows.len(), 2);
    for row in &held.rows {
        let recent: Vec<i64> = serde_json::from_str(&row.meta.recent_attempts).unwrap();
        assert_eq!(
            recent.len(),
            1,
            "started afresh with this attempt: {recent:?}"
        );
    }
}

async fn pruning_deletes_only_old_finished_rows_in_batches<S: QueueStore + Raw>(s: S) {
    let now = now_ms();
    s.exec(&format!(
        "INSERT INTO rebill_orders (orderno, tax_num, status, finished_at) VALUES \
         ('O-1', 'X', 'done', {old}), ('O-2', 'X', 'done', {old}), ('O-3', 'X', 'done', {old}), \
         ('O-4', 'X', 'failed', {old}), ('O-5', 'X', 'done', {recent}), ('O-6', 'X', 'pending', NULL)",
        old = now - 40 * 86_400_000,
        recent = now - 86_400_000
    ))
    .await
    .unwrap();
    let p = PruneParams {
        queue: QueueName::Rebill,
        statuses: &["done"],
        finished_before: now - 30 * 86_400_000,
        batch: 2,
        now,
    };
    assert_eq!(s.prune_batch(p).await.unwrap(), 2, "one batch");
    assert_eq!(s.prune_batch(p).await.unwrap(), 1);
    assert_eq!(s.prune_batch(p).await.unwrap(), 0, "then nothing");
    let left = s.text("SELECT string_agg(orderno, ',') FROM (SELECT orderno FROM rebill_orders ORDER BY orderno) o").await;
    assert_eq!(
        left.as_deref(),
        Some("O-4,O-5,O-6"),
        "failed, recent and active rows stay"
    );
}

async fn a_rescue_racing_a_completion_never_undoes_it<S: QueueStore + Raw>(s: S) {
    for round in 0..40 {
        let id = insert(&s, &format!("RACE-{round}"), SELLER).await;
        // Expired at once: the rescuer may take it while its result is being written.
        claim(&s, 1, Duration::ZERO, "racing").await;
        let rescue = s.rescue_expired(RescueParams {
            queue: QueueName::Rebill,
            now: now_ms() + 1,
            default_max_attempts: 5,
        });
        let done = [accepted(id, "racing", now_ms())];
        let complete = s.complete(QueueName::Rebill, &done);
        let (rescued, applied) = tokio::join!(rescue, complete);
        let (rescued, applied) = (rescued.unwrap(), applied.unwrap()[0]);
        let status = s
            .text(&format!("SELECT status FROM rebill_orders WHERE id = {id}"))
            .await
            .unwrap();
        match (rescued, applied) {
            (0, true) => assert_eq!(status, "done"),
            (1, false) => assert_eq!(status, "pending"),
            other => panic!("round {round}: rescued/applied {other:?}, status {status}"),
        }
        s.exec(&format!("DELETE FROM rebill_orders WHERE id = {id}"))
            .await
            .unwrap();
    }
}

async fn counts_follow_the_rows<S: QueueStore + Raw>(s: S) {
    let empty = s.counts(QueueName::Rebill, now_ms()).await.unwrap();
    assert_eq!(
        (empty.count("pending"), empty.oldest_pending_age_ms),
        (0, None)
    );
    let mut old = job("N-1", SELLER);
    old.not_before = Some(now_ms() - 60_000);
    s.enqueue_rebill(&old, now_ms()).await.unwrap();
    insert(&s, "N-2", SELLER).await;
    insert(&s, "N-3", SELLER).await;
    let held = claim(&s, 1, LEASE, "t").await;
    let id = held.rows[0].meta.id;
    let c = s.counts(QueueName::Rebill, now_ms()).await.unwrap();
    assert_eq!((c.count("pending"), c.count("running")), (2, 1));
    s.complete(QueueName::Rebill, &[accepted(id, "t", now_ms())])
        .await
        .unwrap();
    let c = s.counts(QueueName::Rebill, now_ms()).await.unwrap();
    assert_eq!(
        (c.count("pending"), c.count("running"), c.count("done")),
        (2, 0, 1)
    );
    let age = c.oldest_pending_age_ms.unwrap();
    assert!((0..10_000).contains(&age), "the two due now: {age}");
}

async fn operators_retry_finished_rows_and_cancel_pending_ones<S: QueueStore + Raw>(s: S) {
    let failed = insert(&s, "M-1", SELLER).await;
    claim(&s, 1, LEASE, "t").await;
    let mut fail = accepted(failed, "t", now_ms());
    fail.status = FinalStatus::Failed;
    fail.outcome = None;
    s.complete(QueueName::Rebill, &[fail]).await.unwrap();
    let pending = insert(&s, "M-2", SELLER).await;
    assert_eq!(
        s.retry(QueueName::Rebill, &[failed, pending])
            .await
            .unwrap(),
        [failed]
    );
    let row = format!("SELECT attempts FROM rebill_orders WHERE id = {failed}");
    assert_eq!(s.number(&row).await, Some(0), "a fresh budget");
    let running = claim(&s, 1, LEASE, "t2").await.rows[0].meta.id;
    let other = if running == failed { pending } else { failed };
    assert_eq!(
        s.cancel(QueueName::Rebill, &[running, other])
            .await
            .unwrap(),
        [other],
        "a running row finishes its attempt first"
    );
    let status = format!("SELECT status FROM rebill_orders WHERE id = {other}");
    assert_eq!(s.text(&status).await.as_deref(), Some("cancelled"));
}

async fn an_operators_pause_holds_the_seller_until_resumed<S: QueueStore + Raw>(s: S) {
    insert(&s, "V-1", SELLER).await;
    let until = now_ms() + 3_600_000;
    let p = PauseParams {
        queue: QueueName::Rebill,
        scope: SELLER,
        until,
        reason: "证书更换",
        now: now_ms(),
    };
    s.pause(p).await.unwrap();
    let shown = s.pauses(now_ms()).await.unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(
        (shown[0].scope.as_str(), shown[0].reason.as_str()),
        (SELLER, "证书更换")
    );
    assert!(
        (shown[0].until_at - until).abs() < 5_000,
        "in the caller's clock"
    );
    assert!(claim(&s, 8, LEASE, "t").await.rows.is_empty(), "held");
    assert!(s.resume(QueueName::Rebill, SELLER, now_ms()).await.unwrap());
    assert!(
        !s.resume(QueueName::Rebill, SELLER, now_ms()).await.unwrap(),
        "nothing left"
    );
    assert_eq!(claim(&s, 8, LEASE, "t").await.rows.len(), 1);
}

async fn the_rescuer_is_needed_only_for_expired_leases<S: QueueStore + Raw>(s: S) {
    insert(&s, "U-1", SELLER).await;
    assert!(!s.rescue_needed(QueueName::Rebill, now_ms()).await.unwrap());
    claim(&s, 1, LEASE, "t").await;
    assert!(
        !s.rescue_needed(QueueName::Rebill, now_ms()).await.unwrap(),
        "its lease runs"
    );
    s.exec("UPDATE rebill_orders SET lease_expires_at = 0")
        .await
        .unwrap();
    assert!(s.rescue_needed(QueueName::Rebill, now_ms()).await.unwrap());
}

async fn an_alert_is_delivered_once_and_retried_until_it_is<S: QueueStore + AlertStore + Raw>(
    s: S,
) {
    use crate::alerts::{Event, EventKind};
    use crate::store::outbox::AlertDelivery;
    let event = Event::new(EventKind::Test, "rebill", now_ms());
    s.raise_alert(&event).await.unwrap();
    let lease = Duration::from_secs(60);
    let first = s.claim_alerts(now_ms(), lease, "d1", 8).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].event.as_str(), first[0].attempts), ("test", 1));
    assert!(
        (first[0].created_at - now_ms()).abs() < 5_000,
        "in the caller's clock"
    );
    assert!(
        s.claim_alerts(now_ms(), lease, "d2", 8)
            .await
            .unwrap()
            .is_empty(),
        "held by the first deliverer"
    );
    let retry = AlertDelivery::Retry {
        at: now_ms(),
        error: "robot: HTTP 502".into(),
    };
    let id = first[0].id;
    assert!(s
        .finish_alert(id, "d1", &["ops".into()], &retry, now_ms())
        .await
        .unwrap());
    assert!(
        !s.finish_alert(id, "d1", &[], &retry, now_ms())
            .await
            .unwrap(),
        "claim spent"
    );
    let report = s.alert_report(now_ms()).await.unwrap();
    assert_eq!(
        (report.pending, report.last_error.as_deref()),
        (1, Some("robot: HTTP 502"))
    );
    let second = s.claim_alerts(now_ms() + 10, lease, "d3", 8).await.unwrap();
    assert_eq!((second.len(), second[0].attempts), (1, 2));
    assert_eq!(
        second[0].delivered(),
        ["ops"],
        "a retry skips the targets that have it"
    );
    assert!(s
        .finish_alert(
            id,
            "d3",
            &["ops".into(), "dev".into()],
            &AlertDelivery::Delivered,
            now_ms()
        )
        .await
        .unwrap());
    assert_eq!(s.next_alert_due(now_ms()).await.unwrap(), None);
    s.record_target("ops", Some("HTTP 502"), now_ms())
        .await
        .unwrap();
    s.record_target("dev", None, now_ms()).await.unwrap();
    let report = s.alert_report(now_ms()).await.unwrap();
    assert_eq!(report.pending, 0);
    let health: Vec<(&str, bool)> = report
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.failing_since.is_some()))
        .collect();
    assert_eq!(health, [("dev", false), ("ops", true)]);
    let pruned = s
        .prune_alerts(now_ms() + 60_000, 100, now_ms())
        .await
        .unwrap();
    assert_eq!(pruned, 1);
}

async fn failed_rows_are_digested_once<S: QueueStore + AlertStore + Raw>(s: S) {
    let every = Duration::ZERO;
    assert!(
        s.digest_failed(QueueName::Rebill, now_ms(), every)
            .await
            .unwrap()
            .is_none(),
        "the first look only starts the window"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    for n in 0..2 {
        let id = insert(&s, &format!("X-{n}"), SELLER).await;
        claim(&s, 1, LEASE, "t").await;
        let mut fail = accepted(id, "t", now_ms());
        fail.status = FinalStatus::Failed;
        fail.outcome = None;
        fail.last_message = Some("纳税人识别号不存在".into());
        s.complete(QueueName::Rebill, &[fail]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let digest = s
        .digest_failed(QueueName::Rebill, now_ms(), every)
        .await
        .unwrap();
    let digest = digest.expect("a digest of the two");
    assert_eq!(digest.count, Some(2));
    assert_eq!(digest.rows[0].message, "纳税人识别号不存在");
    assert_eq!(digest.rows[0].seller, SELLER);
    assert!(s
        .digest_failed(QueueName::Rebill, now_ms(), every)
        .await
        .unwrap()
        .is_none());
    let raised = s
        .number("SELECT COUNT(*) FROM alert_outbox WHERE event = 'rows_failed'")
        .await;
    assert_eq!(raised, Some(1));
}

async fn a_stuck_queue_is_alerted_once_and_its_recovery_too<S: QueueStore + AlertStore + Raw>(
    s: S,
) {
    let after = Duration::from_secs(60);
    let mut old = job("Y-1", SELLER);
    old.not_before = Some(now_ms() - 600_000);
    s.enqueue_rebill(&old, now_ms()).await.unwrap();
    let stuck = s
        .watch_stuck(QueueName::Rebill, now_ms(), after)
        .await
        .unwrap();
    let stuck = stuck.expect("stuck for ten minutes");
    assert_eq!(stuck.count, Some(1));
    let since = stuck.since.unwrap();
    assert!(
        (since - (now_ms() - 600_000)).abs() < 5_000,
        "since, in the caller's clock"
    );
    assert!(s
        .watch_stuck(QueueName::Rebill, now_ms(), after)
        .await
        .unwrap()
        .is_none());
    claim(&s, 1, LEASE, "t").await;
    let moved = s
        .watch_stuck(QueueName::Rebill, now_ms(), after)
        .await
        .unwrap();
    assert!(matches!(
        moved.map(|e| e.event),
        Some(crate::alerts::EventKind::QueueRecovered)
    ));
    assert!(s
        .watch_stuck(QueueName::Rebill, now_ms(), after)
        .await
        .unwrap()
        .is_none());
}

async fn an_attempt_is_in_the_rows_history_and_its_minute<S: QueueStore + InspectStore + Raw>(
    s: S,
) {
    use crate::store::history::AttemptFacts;
    let id = insert(&s, "H-9", SELLER).await;
    claim(&s, 1, LEASE, "t").await;
    let now = now_ms();
    let mut c = retry_in(id, "t", now, 60_000);
    c.attempt = Some(AttemptFacts {
        attempt: 1,
        instance: "host-a".into(),
        started_at: now - 120,
        duration_ms: 118,
        http_status: 200,
        action: "retry",
        message: "系统繁忙".into(),
    });
    s.complete(QueueName::Rebill, &[c]).await.unwrap();
    let history = s.attempt_history(QueueName::Rebill, id).await.unwrap();
    assert_eq!(history.len(), 1);
    let h = &history[0];
    assert_eq!(
        (h.attempt, h.http_status, h.action.as_str()),
        (1, 200, "retry")
    );
    assert_eq!(
        (h.status.as_str(), h.instance.as_deref()),
        ("pending", Some("host-a"))
    );
    assert_eq!(
        (h.code.as_deref(), h.message.as_deref()),
        (Some("9999"), Some("系统繁忙"))
    );
    assert_eq!(h.duration_ms, Some(118));
    let minutes = s
        .attempts_per_minute(QueueName::Rebill, now - 120_000)
        .await
        .unwrap();
    assert_eq!(minutes.iter().map(|m| m.attempts).sum::<i64>(), 1);
    let detail = s
        .show(QueueName::Rebill, id)
        .await
        .unwrap()
        .expect("the row");
    assert_eq!(detail.value("orderno"), Some("H-9"));
    assert_eq!(detail.value("status"), Some("pending"));
    assert_eq!(detail.value("invoice_no"), None);
    assert_eq!(detail.history, history);
    assert!(s
        .show(QueueName::Rebill, id + 1000)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        s.prune_minutes(now + 120_000).await.unwrap(),
        minutes.len() as u64
    );
    assert_eq!(
        s.prune_orphaned_history().await.unwrap(),
        0,
        "its row is there"
    );
    s.optimize().await.unwrap();
}

async fn a_title_row_shows_its_private_fields_masked<S: QueueStore + InspectStore + Raw>(s: S) {
    let mut t = NewTitle::default();
    t.fields.order_no = "T-9".into();
    t.fields.invoice_type = "1".into();
    t.fields.gmf_mc = "上海某某有限公司".into();
    t.fields.gmf_dh = Some("13800138000".into());
    t.fields.gmf_yhzh = Some("6222021234567890123".into());
    let id = s.enqueue_title(&t).await.unwrap();
    let detail = s
        .show(QueueName::Title, id)
        .await
        .unwrap()
        .expect("the row");
    assert_eq!(detail.value("gmf_mc"), Some("上海某某有限公司"));
    for private in ["gmf_dh", "gmf_yhzh"] {
        let shown = detail.value(private).unwrap();
        assert!(
            !shown.contains("13800138000") && !shown.contains("6222021234567890123"),
            "{private}: {shown}"
        );
    }
}

async fn failed_rows_are_listed_and_retried_all_or_by_seller<S: QueueStore + Raw>(s: S) {
    let now = now_ms();
    s.exec(&format!(
        "INSERT INTO rebill_orders (orderno, tax_num, status, attempts, finished_at, last_message) VALUES \
         ('Z-1', '{SELLER}', 'failed', 5, {now}, '授权已过期'), ('Z-2', '{OTHER}', 'failed', 5, {now}, 'x'), \
         ('Z-3', '{OTHER}', 'failed', 5, {now}, 'x'), ('Z-4', '{OTHER}', 'done', 1, {now}, 'ok')"
    ))
    .await
    .unwrap();
    let failed = s.list(QueueName::Rebill, Some("failed"), 10).await.unwrap();
    let orders: Vec<&str> = failed.iter().map(|r| r.order.as_str()).collect();
    assert_eq!(orders, ["Z-3", "Z-2", "Z-1"], "newest first");
    let first = &failed[2];
    assert_eq!((first.key.as_deref(), first.attempts), (Some(SELLER), 5));
    assert_eq!(first.last_message.as_deref(), Some("授权已过期"));
    assert_eq!(
        (first.finished_at, first.problem.as_deref()),
        (Some(now), None)
    );
    assert_eq!(
        s.list(QueueName::Rebill, None, 2).await.unwrap().len(),
        2,
        "the limit"
    );
    assert_eq!(
        s.retry_failed(QueueName::Rebill, Some(SELLER))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.retry_failed(QueueName::Rebill, None).await.unwrap(), 2);
    assert_eq!(s.retry_failed(QueueName::Rebill, None).await.unwrap(), 0);
    let pending = s
        .list(QueueName::Rebill, Some("pending"), 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 3);
    assert!(pending
        .iter()
        .all(|r| r.attempts == 0 && r.finished_at.is_none()));
    assert_eq!(claim(&s, 8, LEASE, "t").await.rows.len(), 3, "due at once");
}

/// Runs each scenario as one test per backend.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let (_db, store) = crate::store::test_support::temp_store().await;
                    super::$scenario(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let Some(cluster) = crate::store::postgres::cluster::shared() else {
                        return;
                    };
                    let store = cluster.scratch_store().await.expect("scratch database");
                    super::$scenario(store.clone()).await;
                    store.close().await;
                }
            )*
        }
    };
}

on_both_backends!(
    idempotent_insert_keeps_one_active_row_per_order,
    claims_take_due_rows_up_to_the_limit_oldest_first,
    completions_apply_only_under_their_own_claim,
    a_retry_waits_its_backoff,
    an_expired_lease_is_rescued_and_its_claim_is_lost,
    the_last_attempt_rescued_fails_the_row,
    renewed_leases_outlive_their_first_end,
    a_release_gives_the_attempt_back,
    a_paused_seller_is_skipped_and_probed_once,
    an_ended_pause_lets_one_row_through_however_many_ended,
    title_rows_claim_and_keep_their_serial,
    the_tables_refuse_what_the_worker_could_not_send,
    a_deleted_row_takes_its_history_along,
    a_hand_edited_attempt_list_never_stops_the_claims,
    pruning_deletes_only_old_finished_rows_in_batches,
    a_rescue_racing_a_completion_never_undoes_it,
    counts_follow_the_rows,
    operators_retry_finished_rows_and_cancel_pending_ones,
    an_operators_pause_holds_the_seller_until_resumed,
    the_rescuer_is_needed_only_for_expired_leases,
    an_alert_is_delivered_once_and_retried_until_it_is,
    failed_rows_are_digested_once,
    a_stuck_queue_is_alerted_once_and_its_recovery_too,
    an_attempt_is_in_the_rows_history_and_its_minute,
    a_title_row_shows_its_private_fields_masked,
    failed_rows_are_listed_and_retried_all_or_by_seller,
);

/// What only the server backend has: logins, a clock of its own, notifications.
mod postgres_only {
    use super::*;
    use crate::secret::Secret;
    use crate::store::postgres::cluster::{self, SUPERUSER_PASSWORD};
    use crate::store::postgres::PgConnect;

    #[tokio::test]
    async fn a_wrong_password_is_refused_at_connect_and_never_shown() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let url = cluster
            .url("postgres")
            .replace(SUPERUSER_PASSWORD, "wrong-pass%21word");
        let err = PgStore::connect(&PgConnect::new(url)).await.unwrap_err();
        let shown = err.to_string();
        assert!(
            matches!(err, StoreError::Connect { auth: true, .. }),
            "{err:?}"
        );
        assert!(shown.contains("[database] url"), "{shown}");
        assert!(!shown.contains("wrong-pass"), "{shown}");

        // A password given apart wins over the URL's, and is not shown either.
        let mut apart = PgConnect::new(cluster.url("postgres"));
        apart.password = Some(Secret::new("another-wrong-one"));
        let err = PgStore::connect(&apart).await.unwrap_err().to_string();
        assert!(
            !err.contains("another-wrong-one") && !err.contains(SUPERUSER_PASSWORD),
            "{err}"
        );
        apart.password = Some(Secret::new(SUPERUSER_PASSWORD));
        let ok = PgStore::connect(&apart).await.expect("the right password");
        assert!(ok.ping().await);
        assert!(!ok.url().contains(SUPERUSER_PASSWORD), "{}", ok.url());
        ok.close().await;
    }

    #[tokio::test]
    async fn a_statement_running_past_the_timeout_is_cancelled() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let mut c = PgConnect::new(cluster.url("postgres"));
        c.statement_timeout = Duration::from_millis(100);
        let store = PgStore::connect(&c).await.unwrap();
        let err = store.exec("SELECT pg_sleep(2)").await.unwrap_err();
        assert!(err.to_string().contains("statement timeout"), "{err}");
        assert!(
            store.ping().await,
            "the pool goes on after a cancelled statement"
        );
        store.close().await;
    }

    /// One daemon's host clock is an hour ahead, another's an hour behind: due times,
    /// leases and backoffs are the database's, so both see exactly the same queue.
    #[tokio::test]
    async fn a_host_whose_clock_is_an_hour_off_sees_the_same_queue() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        const HOUR: i64 = 3_600_000;
        let ahead = || now_ms() + HOUR;
        let behind = || now_ms() - HOUR;
        // Due in ten minutes by the clock of the host that inserted it (ahead).
        let mut later = job("S-1", SELLER);
        later.not_before = Some(ahead() + 600_000);
        s.enqueue_rebill(&later, ahead()).await.unwrap();
        let due_now = insert(&s, "S-2", SELLER).await;

        // The host an hour ahead must not take the row due in ten minutes.
        let held = claim_with(&s, ahead(), 8, Duration::from_secs(30), "ahead", |_| {
            ClaimPlan::unpaused()
        })
        .await;
        let got: Vec<i64> = held.rows.iter().map(|r| r.meta.id).collect();
        assert_eq!(got, [due_now]);
        let recent: Vec<i64> = serde_json::from_str(&held.rows[0].meta.recent_attempts).unwrap();
        assert!(
            (recent[0] - ahead()).abs() < 5_000,
            "attempt times come back in the caller's clock"
        );
        let lease = s.number(&format!("SELECT lease_expires_at - invoice_worker_now_ms() FROM rebill_orders WHERE id = {due_now}")).await.unwrap();
        assert!(
            (25_000..=30_000).contains(&lease),
            "a 30 s lease by the database's clock: {lease}"
        );

        // The host an hour behind must not rescue it (its lease runs by the database's clock).
        let p = RescueParams {
            queue: QueueName::Rebill,
            now: behind(),
            default_max_attempts: 5,
        };
        assert_eq!(QueueStore::rescue_expired(&s, p).await.unwrap(), 0);
        // Backoff of 5 minutes, computed by the host ahead: 5 minutes by the database.
        let c = retry_in(due_now, "ahead", ahead(), 300_000);
        assert_eq!(s.complete(QueueName::Rebill, &[c]).await.unwrap(), [true]);
        let wait = s.number(&format!("SELECT next_attempt_at - invoice_worker_now_ms() FROM rebill_orders WHERE id = {due_now}")).await.unwrap();
        assert!((295_000..=300_000).contains(&wait), "{wait}");
        // And the host behind sees both rows not yet due, the first at ten minutes.
        assert!(
            claim_with(&s, behind(), 8, LEASE, "behind", |_| ClaimPlan::unpaused())
                .await
                .rows
                .is_empty()
        );
        let next = s
            .next_due_after(QueueName::Rebill, behind())
            .await
            .unwrap()
            .unwrap();
        assert!(
            (next - (behind() + 300_000)).abs() < 5_000,
            "the earlier, in the caller's clock"
        );
        s.close().await;
    }

    /// Eight claimers at once on one table: no row is claimed twice, none is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claimers_at_once_never_share_a_row() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        s.exec("INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) SELECT 'R-' || g, 'X', 0 FROM generate_series(1, 400) g")
            .await
            .unwrap();
        let claimers: Vec<_> = (0..8)
            .map(|k| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let token = format!("c{k}-{}", mine.len());
                        let batch = claim(&s, 7, LEASE, &token).await;
                        if batch.rows.is_empty() {
                            return mine;
                        }
                        mine.extend(batch.rows.iter().map(|r| r.meta.id));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for c in claimers {
            all.extend(c.await.unwrap());
        }
        let claimed = all.len();
        all.sort();
        all.dedup();
        assert_eq!(
            (claimed, all.len()),
            (400, 400),
            "claimed {claimed}, distinct {}",
            all.len()
        );
        s.close().await;
    }

    /// While another daemon's claim holds an ended pause (it is claiming the probe, not yet
    /// committed), a claim skips the pause and must leave its seller's rows alone too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_locked_by_another_claim_keeps_its_seller_out() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        insert(&s, "L-1", SELLER).await;
        insert(&s, "L-2", SELLER).await;
        let free = insert(&s, "L-3", OTHER).await;
        s.exec(&format!("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', '{SELLER}', 0, 'quota', 0)"))
            .await
            .unwrap();
        let mut other = s.pool().begin().await.unwrap();
        sqlx::query("SELECT scope FROM pauses FOR UPDATE")
            .execute(&mut *other)
            .await
            .unwrap();
        let now = now_ms();
        let batch = claim_with(&s, now, 8, LEASE, "t", real_plan(now)).await;
        let got: Vec<i64> = batch.rows.iter().map(|r| r.meta.id).collect();
        assert_eq!(got, [free], "only the seller that is not paused");
        other.rollback().await.unwrap();
        // Once the lock is gone, the next claim sends the probe: one row.
        let now = now_ms();
        let probe = claim_with(&s, now, 8, LEASE, "t2", real_plan(now)).await;
        assert_eq!(probe.rows.len(), 1, "{:?}", probe.rows);
        s.close().await;
    }

    /// Claimers racing to probe one ended pause: one probe goes out, whoever wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claimers_racing_for_a_probe_send_one() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        s.exec(&format!("INSERT INTO rebill_orders (orderno, tax_num, next_attempt_at) SELECT 'Q-' || g, '{SELLER}', 0 FROM generate_series(1, 50) g"))
            .await
            .unwrap();
        s.exec(&format!("INSERT INTO pauses (queue, scope, until_at, reason, created_at) VALUES ('rebill', '{SELLER}', 0, 'quota', 0)"))
            .await
            .unwrap();
        let racers: Vec<_> = (0..8)
            .map(|k| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut sent = 0;
                    for round in 0..5 {
                        let token = format!("p{k}-{round}");
                        let batch = claim_with(&s, now_ms(), 8, LEASE, &token, |_| ClaimPlan {
                            hold: false,
                            probes: vec![ProbeStep {
                                scope: SELLER.into(),
                                lift_when_idle: false,
                            }],
                            claim_rest: false,
                        })
                        .await;
                        sent += batch.rows.len();
                    }
                    sent
                })
            })
            .collect();
        let mut sent = 0;
        for r in racers {
            sent += r.await.unwrap();
        }
        assert_eq!(sent, 1, "probes sent");
        let running = s
            .number("SELECT COUNT(*) FROM rebill_orders WHERE status = 'running'")
            .await;
        assert_eq!(running, Some(1), "the losers put their rows back");
        let attempts = s
            .number("SELECT COUNT(*) FROM rebill_orders WHERE attempts > 0")
            .await;
        assert_eq!(attempts, Some(1), "and gave their attempts back");
        s.close().await;
    }

    /// The roles docs/operations.md gives: a writer with INSERT and SELECT alone can insert
    /// work (the insert trigger's notification included) and read it back, and can change
    /// nothing the daemon works on.
    #[tokio::test]
    async fn a_writer_with_insert_and_select_can_insert_and_nothing_more() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        let (database,): (String,) = sqlx::query_as("SELECT current_database()")
            .fetch_one(s.pool())
            .await
            .unwrap();
        let writer = format!("writer_{database}");
        for sql in [
            format!("CREATE ROLE {writer} LOGIN PASSWORD 'writer-pass'"),
            format!("GRANT CONNECT ON DATABASE {database} TO {writer}"),
            format!("GRANT SELECT, INSERT ON rebill_orders, title_submissions TO {writer}"),
        ] {
            s.exec(&sql).await.unwrap();
        }
        let url = format!(
            "postgres://{writer}:writer-pass@127.0.0.1:{}/{database}",
            cluster.port()
        );
        let w = PgStore::connect(&PgConnect::new(url)).await.unwrap();
        w.exec("INSERT INTO rebill_orders (orderno, tax_num) VALUES ('W-1', 'X') ON CONFLICT DO NOTHING")
            .await
            .expect("a writer inserts");
        w.exec("INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc) VALUES ('W-2', '1', '', 'M')")
            .await
            .expect("into both tables");
        assert_eq!(
            w.text("SELECT status FROM rebill_orders WHERE orderno = 'W-1'")
                .await
                .as_deref(),
            Some("pending")
        );
        for sql in [
            "UPDATE rebill_orders SET status = 'done'",
            "DELETE FROM rebill_orders",
            "DELETE FROM pauses",
        ] {
            let err = w.exec(sql).await.unwrap_err().to_string();
            assert!(err.contains("permission denied"), "{sql}: {err}");
        }
        w.close().await;
        s.close().await;
    }

    /// The insert trigger notifies once per statement, whatever its row count, naming the
    /// queue; a daemon LISTENing wakes once per writer's statement, not per row.
    #[tokio::test]
    async fn an_insert_statement_notifies_once_naming_its_queue() {
        let Some(cluster) = cluster::shared() else {
            return;
        };
        let s = cluster.scratch_store().await.unwrap();
        let mut listener = sqlx::postgres::PgListener::connect_with(s.pool())
            .await
            .unwrap();
        listener.listen("invoice_worker").await.unwrap();
        s.exec("INSERT INTO rebill_orders (orderno, tax_num) SELECT 'N-' || g, 'X' FROM generate_series(1, 50) g")
            .await
            .unwrap();
        s.exec("INSERT INTO title_submissions (order_no, invoice_type, attach, gmf_mc) VALUES ('N', '1', '', 'M')")
            .await
            .unwrap();
        let first = listener.recv().await.unwrap();
        let second = listener.recv().await.unwrap();
        assert_eq!((first.payload(), second.payload()), ("rebill", "title"));
        let more = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
        assert!(more.is_err(), "a third notification: {more:?}");
        s.close().await;
    }
}
