//! Property tests for `cluster-sched`: random sequences of events, checked step by step
//! against an independent ledger of where every connection is, against a naive model of
//! each policy, and against Node's `RoundRobinHandle`.
#![allow(clippy::unwrap_used)]

mod fairness;
mod harness;
mod node_model;
mod policy_model;
mod sabotage;

use cluster_sched::{Dispatch, LeastConnections, RoundRobin};
use proptest::prelude::*;

use harness::{Ledger, Scenario, check_run, feed, scenario};

fn assert_keeps_every_property(dispatcher: &mut dyn Dispatch, scenario: &Scenario) {
    if let Err(failure) = check_run(dispatcher, scenario) {
        panic!("{failure}");
    }
}

/// Every reply and action of a whole run, to compare runs.
fn transcript(dispatcher: &mut dyn Dispatch, scenario: &Scenario) -> Vec<String> {
    let mut ledger = Ledger::new(scenario.config);
    let mut lines = vec![format!("{:?}", dispatcher.take_actions())];
    for op in &scenario.ops {
        let Some(input) = ledger.resolve(op) else {
            continue;
        };
        let (reply, actions) = feed(dispatcher, &input);
        lines.push(format!("{input:?} {reply:?} {actions:?}"));
        let _ = ledger.observe(dispatcher, &input, &reply, &actions);
    }
    lines
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_robin_keeps_every_property(scenario in scenario(4, 160)) {
        assert_keeps_every_property(&mut RoundRobin::with_config(scenario.config), &scenario);
    }

    #[test]
    fn least_connections_keeps_every_property(scenario in scenario(4, 160)) {
        assert_keeps_every_property(&mut LeastConnections::with_config(scenario.config), &scenario);
    }

    #[test]
    fn runs_are_deterministic(scenario in scenario(4, 80), least_connections in any::<bool>()) {
        let make = || -> Box<dyn Dispatch> {
            if least_connections {
                Box::new(LeastConnections::with_config(scenario.config))
            } else {
                Box::new(RoundRobin::with_config(scenario.config))
            }
        };
        prop_assert_eq!(transcript(&mut *make(), &scenario), transcript(&mut *make(), &scenario));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn wide_windows_keep_every_property(
        scenario in scenario(16, 300),
        least_connections in any::<bool>(),
    ) {
        let mut dispatcher: Box<dyn Dispatch> = if least_connections {
            Box::new(LeastConnections::with_config(scenario.config))
        } else {
            Box::new(RoundRobin::with_config(scenario.config))
        };
        assert_keeps_every_property(&mut *dispatcher, &scenario);
    }
}
