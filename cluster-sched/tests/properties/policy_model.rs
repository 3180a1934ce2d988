//! A naive reference model of both policies, written without the crate's data structures:
//! every turn scans all workers for the one with credit that has the lowest
//! (load, time it started waiting), where "time" is a step counter. Round-robin is the same
//! with every load taken as zero. The crate must hand out exactly what this model hands out.

use std::collections::{BTreeMap, VecDeque};

use cluster_sched::{
    Action, Config, ConnId, Dispatch, Error, LeastConnections, PendingBound, RoundRobin, WorkerId,
    WorkerStatus,
};
use proptest::prelude::*;

use crate::harness::{Scenario, check_run, feed, scenario};

#[derive(Debug, Default)]
struct ModelWorker {
    in_flight: VecDeque<ConnId>,
    draining: bool,
    reported_open: u32,
    acked_since_report: u64,
    /// When the worker last started waiting for a turn: on joining, after each turn, and
    /// when an ack or a return gives credit back to a worker that had none.
    waiting_since: u64,
}

#[derive(Debug)]
pub struct NaivePolicy {
    least_connections: bool,
    config: Config,
    workers: BTreeMap<WorkerId, ModelWorker>,
    pending: VecDeque<ConnId>,
    actions: VecDeque<Action>,
    clock: u64,
    paused: bool,
    shut_down: bool,
}

impl NaivePolicy {
    pub fn new(config: Config, least_connections: bool) -> Self {
        let mut model = Self {
            least_connections,
            config,
            workers: BTreeMap::new(),
            pending: VecDeque::new(),
            actions: VecDeque::new(),
            clock: 0,
            paused: false,
            shut_down: false,
        };
        model.update_accept();
        model
    }

    fn window(&self) -> usize {
        self.config.window.get() as usize
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn has_credit(&self, worker: WorkerId) -> bool {
        self.workers
            .get(&worker)
            .is_some_and(|w| !w.draining && w.in_flight.len() < self.window())
    }

    fn load(worker: &ModelWorker) -> u64 {
        u64::from(worker.reported_open) + worker.acked_since_report + worker.in_flight.len() as u64
    }

    fn whose_turn(&self) -> Option<WorkerId> {
        self.workers
            .iter()
            .filter(|(id, _)| self.has_credit(**id))
            .min_by_key(|(_, w)| {
                let load = if self.least_connections {
                    Self::load(w)
                } else {
                    0
                };
                (load, w.waiting_since)
            })
            .map(|(id, _)| *id)
    }

    fn step(&mut self) {
        if !self.shut_down {
            let mut batches: Vec<(WorkerId, Vec<ConnId>)> = Vec::new();
            while !self.pending.is_empty() {
                let Some(worker) = self.whose_turn() else {
                    break;
                };
                let conn = self.pending.pop_front().unwrap();
                let now = self.tick();
                let entry = self.workers.get_mut(&worker).unwrap();
                entry.in_flight.push_back(conn);
                entry.waiting_since = now;
                match batches.iter_mut().find(|(w, _)| *w == worker) {
                    Some((_, conns)) => conns.push(conn),
                    None => batches.push((worker, vec![conn])),
                }
            }
            for (worker, conns) in batches {
                self.actions.push_back(Action::Handoff { worker, conns });
            }
        }
        self.update_accept();
    }

    fn update_accept(&mut self) {
        if self.shut_down {
            return;
        }
        let credit = self.workers.keys().any(|w| self.has_credit(*w));
        let pause = !credit && self.pending.len() >= self.pending_bound();
        if pause != self.paused {
            self.paused = pause;
            self.actions.push_back(if pause {
                Action::PauseAccept
            } else {
                Action::ResumeAccept
            });
        }
    }

    fn put_back(&mut self, conns: Vec<ConnId>) {
        if self.shut_down {
            self.actions.extend(conns.into_iter().map(Action::Close));
        } else {
            for conn in conns.into_iter().rev() {
                self.pending.push_front(conn);
            }
        }
    }

    fn known(&self, worker: WorkerId) -> Result<(), Error> {
        if self.workers.contains_key(&worker) {
            Ok(())
        } else {
            Err(Error::UnknownWorker { worker })
        }
    }

    /// A worker that had no credit and now has some starts waiting again.
    fn regained_credit(&mut self, worker: WorkerId, had_credit: bool) {
        if !had_credit && self.has_credit(worker) {
            let now = self.tick();
            self.workers.get_mut(&worker).unwrap().waiting_since = now;
        }
    }
}

impl Dispatch for NaivePolicy {
    fn worker_joined(&mut self, worker: WorkerId) -> Result<(), Error> {
        if self.workers.contains_key(&worker) {
            return Err(Error::DuplicateWorker { worker });
        }
        let waiting_since = self.tick();
        self.workers.insert(
            worker,
            ModelWorker {
                waiting_since,
                ..ModelWorker::default()
            },
        );
        self.step();
        Ok(())
    }

    fn worker_draining(&mut self, worker: WorkerId) -> Result<(), Error> {
        self.known(worker)?;
        self.workers.get_mut(&worker).unwrap().draining = true;
        self.step();
        Ok(())
    }

    fn worker_left(&mut self, worker: WorkerId) -> Result<(), Error> {
        self.known(worker)?;
        let gone = self.workers.remove(&worker).unwrap();
        self.put_back(gone.in_flight.into());
        self.step();
        Ok(())
    }

    fn incoming(&mut self, conn: ConnId) {
        if self.shut_down {
            self.actions.push_back(Action::Close(conn));
        } else {
            self.pending.push_back(conn);
            self.step();
        }
    }

    fn requeue_front(&mut self, conns: &[ConnId]) {
        if self.shut_down {
            self.actions
                .extend(conns.iter().copied().map(Action::Close));
        } else {
            // Spelled out rather than through `put_back`: the given ids, in order, then
            // everything that was already waiting.
            let mut queue: VecDeque<ConnId> = conns.iter().copied().collect();
            queue.extend(self.pending.drain(..));
            self.pending = queue;
            self.step();
        }
    }

    fn acked(&mut self, worker: WorkerId, count: usize) -> Result<Vec<ConnId>, Error> {
        self.known(worker)?;
        let had_credit = self.has_credit(worker);
        let entry = self.workers.get_mut(&worker).unwrap();
        if count > entry.in_flight.len() {
            return Err(Error::AckExceedsInFlight {
                worker,
                acked: count,
                in_flight: entry.in_flight.len(),
            });
        }
        let delivered: Vec<ConnId> = entry.in_flight.drain(..count).collect();
        entry.acked_since_report += count as u64;
        self.regained_credit(worker, had_credit);
        self.step();
        Ok(delivered)
    }

    fn returned(&mut self, worker: WorkerId, conns: &[ConnId]) -> Result<(), Error> {
        self.known(worker)?;
        let had_credit = self.has_credit(worker);
        let entry = self.workers.get_mut(&worker).unwrap();
        for (i, conn) in conns.iter().enumerate() {
            if !entry.in_flight.contains(conn) || conns[..i].contains(conn) {
                return Err(Error::NotInFlight {
                    worker,
                    conn: *conn,
                });
            }
        }
        let back: Vec<ConnId> = entry
            .in_flight
            .iter()
            .copied()
            .filter(|c| conns.contains(c))
            .collect();
        entry.in_flight.retain(|c| !conns.contains(c));
        self.regained_credit(worker, had_credit);
        self.put_back(back);
        self.step();
        Ok(())
    }

    fn load_report(&mut self, worker: WorkerId, open: u32) -> Result<(), Error> {
        self.known(worker)?;
        let entry = self.workers.get_mut(&worker).unwrap();
        entry.reported_open = open;
        entry.acked_since_report = 0;
        Ok(())
    }

    fn shutdown(&mut self) {
        if !self.shut_down {
            self.shut_down = true;
            let pending: Vec<ConnId> = self.pending.drain(..).collect();
            self.actions.extend(pending.into_iter().map(Action::Close));
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn config(&self) -> Config {
        self.config
    }

    fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn pending_conns(&self) -> Vec<ConnId> {
        self.pending.iter().copied().collect()
    }

    fn pending_bound(&self) -> usize {
        match self.config.pending_bound {
            PendingBound::PerWorker => {
                self.workers.values().filter(|w| !w.draining).count().max(1) * self.window()
            }
            PendingBound::Fixed(bound) => bound,
        }
    }

    fn is_accept_paused(&self) -> bool {
        self.paused
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down
    }

    fn workers(&self) -> Vec<WorkerId> {
        self.workers.keys().copied().collect()
    }

    fn worker_count(&self) -> usize {
        self.workers.len()
    }

    fn worker_status(&self, worker: WorkerId) -> Option<WorkerStatus> {
        let window = self.window();
        self.workers.get(&worker).map(|w| WorkerStatus {
            in_flight: w.in_flight.len(),
            credit: if w.draining {
                0
            } else {
                window - w.in_flight.len()
            },
            draining: w.draining,
            reported_open: w.reported_open,
        })
    }

    fn in_flight_conns(&self, worker: WorkerId) -> Option<Vec<ConnId>> {
        self.workers
            .get(&worker)
            .map(|w| w.in_flight.iter().copied().collect())
    }
}

/// Feeds the same scenario to the crate's policy and to the model; every reply and every
/// action must be the same.
fn same_as_model(real: &mut dyn Dispatch, least_connections: bool, scenario: &Scenario) {
    let mut model = NaivePolicy::new(scenario.config, least_connections);
    assert_eq!(real.take_actions(), model.take_actions(), "on construction");
    // The ledger only resolves random events into inputs here; the policies are compared
    // with each other, not checked.
    let mut ledger = crate::harness::Ledger::new(scenario.config);
    for op in &scenario.ops {
        let Some(input) = ledger.resolve(op) else {
            continue;
        };
        let expected = feed(&mut model, &input);
        let got = feed(real, &input);
        assert_eq!(got, expected, "after {input:?}");
        assert_eq!(
            real.pending_bound(),
            model.pending_bound(),
            "after {input:?}"
        );
        for worker in model.workers() {
            assert_eq!(real.worker_status(worker), model.worker_status(worker));
        }
        let _ = ledger.observe(&model, &input, &expected.0, &expected.1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_robin_hands_out_what_the_naive_model_does(scenario in scenario(4, 120)) {
        same_as_model(&mut RoundRobin::with_config(scenario.config), false, &scenario);
    }

    #[test]
    fn least_connections_hands_out_what_the_naive_model_does(scenario in scenario(4, 120)) {
        same_as_model(&mut LeastConnections::with_config(scenario.config), true, &scenario);
    }

    /// The model itself keeps every property, so a disagreement points at the crate.
    #[test]
    fn the_naive_model_keeps_the_properties(
        scenario in scenario(4, 120),
        least_connections in any::<bool>(),
    ) {
        let mut model = NaivePolicy::new(scenario.config, least_connections);
        if let Err(failure) = check_run(&mut model, &scenario) {
            prop_assert!(false, "{}", failure);
        }
    }
}
