//! Seller and queue pauses, the state machine: a pause holds its scope's rows until it
//! ends; then exactly one row probes (the store marks a probe only where none is in
//! flight); a probe answered without a new pause lifts the pause it probed, one answered
//! with a pause extends it, and a rejected probe (never sent) proves nothing either way.
//! A seller pause with no pending row left ends by itself.

use crate::store::pauses::{
    ClaimPlan, PauseChange, PauseRecord, PauseView, ProbeStep, WHOLE_QUEUE,
};

use super::decide::Processed;

/// What a claim does, given the pauses that matter at `now` (the queue-wide pause and the
/// seller pauses that ended with no probe in flight).
pub fn claim_plan(pauses: &[PauseView], now: i64) -> ClaimPlan {
    if let Some(queue) = pauses.iter().find(|p| p.scope == WHOLE_QUEUE) {
        // Nothing of the queue moves while it is paused or while its probe is out; once it
        // ended, one row probes and the rest waits for the answer.
        let ended = queue.until <= now && !queue.probing;
        return ClaimPlan {
            hold: !ended,
            probes: if ended {
                vec![ProbeStep {
                    scope: WHOLE_QUEUE.to_string(),
                    lift_when_idle: false,
                }]
            } else {
                Vec::new()
            },
            claim_rest: false,
        };
    }
    let probes = pauses
        .iter()
        .filter(|p| p.until <= now && !p.probing)
        .map(|p| ProbeStep {
            scope: p.scope.clone(),
            lift_when_idle: true,
        })
        .collect();
    ClaimPlan {
        hold: false,
        probes,
        claim_rest: true,
    }
}

/// What one attempt's result does to pauses: `pause` is the pause its answer asked for.
pub fn change_after(processed: &Processed, pause: Option<PauseRecord>) -> PauseChange {
    match (pause, processed) {
        (Some(pause), _) => PauseChange::Start(pause),
        // A rejected row was never sent, so as a probe it proves nothing either way.
        (None, Processed::Rejected(_)) => PauseChange::Nothing,
        // A probe that did not ask for a pause again lifts the pause it probed.
        (None, Processed::Attempted(_)) => PauseChange::LiftProbed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::action::Attempted;
    use crate::validate::Rejection;

    fn view(scope: &str, until: i64, probing: bool) -> PauseView {
        PauseView {
            scope: scope.into(),
            until,
            probing,
        }
    }

    fn probe(scope: &str, lift_when_idle: bool) -> ProbeStep {
        ProbeStep {
            scope: scope.into(),
            lift_when_idle,
        }
    }

    #[test]
    fn no_pause_claims_everything_due() {
        let plan = claim_plan(&[], 1_000);
        assert_eq!(
            plan,
            ClaimPlan {
                hold: false,
                probes: vec![],
                claim_rest: true
            }
        );
    }

    #[test]
    fn a_queue_pause_holds_until_it_ends_then_one_row_probes() {
        assert!(claim_plan(&[view("*", 2_000, false)], 1_000).hold);
        assert!(
            claim_plan(&[view("*", 500, true)], 1_000).hold,
            "probe in flight"
        );
        let ended = claim_plan(&[view("*", 500, false), view("S", 100, false)], 1_000);
        assert_eq!(
            ended,
            ClaimPlan {
                hold: false,
                probes: vec![probe("*", false)],
                claim_rest: false
            },
            "the queue's probe goes alone; seller pauses wait for it"
        );
    }

    #[test]
    fn ended_seller_pauses_probe_and_the_rest_is_claimed() {
        let plan = claim_plan(
            &[
                view("ENDED", 900, false),
                view("PROBING", 900, true),
                view("LATER", 5_000, false),
            ],
            1_000,
        );
        assert_eq!(plan.probes, vec![probe("ENDED", true)]);
        assert!(plan.claim_rest && !plan.hold);
    }

    #[test]
    fn only_a_sent_probe_lifts_its_pause() {
        let pause = PauseRecord {
            scope: "S".into(),
            until: 9,
            reason: "r".into(),
        };
        let sent = Processed::Attempted(Attempted::transient(Some(500), "boom"));
        let rejected = Processed::Rejected(Rejection::new("orderno", "empty"));
        assert_eq!(change_after(&sent, None), PauseChange::LiftProbed);
        assert_eq!(change_after(&rejected, None), PauseChange::Nothing);
        assert_eq!(
            change_after(&sent, Some(pause.clone())),
            PauseChange::Start(pause)
        );
    }
}
