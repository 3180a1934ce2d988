//! Connection dispatch policies for a cluster of server processes, as pure state machines.
//!
//! A primary process accepts connections and hands them to worker processes. This crate
//! decides *which worker gets which connection*, and nothing else: it does no I/O, makes no
//! syscalls and reads no clock, so every decision is a function of the inputs alone. That is
//! what lets its rules be checked by property tests over random sequences of events, and lets
//! anyone drive it from their own transport. Workers and connections are opaque numbers
//! ([`WorkerId`], [`ConnId`]); the processes and file descriptors stay with the caller.
//!
//! # Shape
//!
//! In the style of sans-IO protocol crates such as `quinn-proto`, a dispatcher takes inputs
//! as method calls ([`worker_joined`](Dispatch::worker_joined),
//! [`incoming`](Dispatch::incoming), [`acked`](Dispatch::acked),
//! [`returned`](Dispatch::returned), [`worker_left`](Dispatch::worker_left), ...) and queues
//! [`Action`]s for the caller to carry out, taken with [`poll_action`](Dispatch::poll_action):
//! [`Handoff`](Action::Handoff) a batch of connections to a worker,
//! [`Close`](Action::Close) a connection, [`PauseAccept`](Action::PauseAccept),
//! [`ResumeAccept`](Action::ResumeAccept). After every input, poll until `None` and carry out
//! each action in order. None of the policies here needs time; one that did would take `now`
//! as an argument.
//!
//! # Policies
//!
//! - [`RoundRobin`]: Node's `SCHED_RR`, pipelined. Each worker may hold up to `window`
//!   un-acked connections (credits); workers with credit take connections in rotation, one
//!   per turn; a worker out of credit sits out until an ack comes back. With `window = 1` the
//!   handoffs are exactly Node's `RoundRobinHandle`'s.
//! - [`LeastConnections`]: the worker with the fewest open plus in-flight connections (from
//!   the workers' load reports) goes first, in rotation among equals, with the same credits.
//!
//! Both keep Node's good idea (a worker that does not ack gets nothing more) and fix its weak
//! spots: a worker that leaves gives its un-acked connections back for another worker instead
//! of leaking them; nothing is closed because no worker is there (connections wait for the
//! next one); and when no worker has credit and enough connections wait, accept pauses so the
//! kernel's backlog holds clients instead of the primary's memory. Choosing a worker costs
//! O(1) (round-robin) or O(log n) (least-connections) in the number of workers.
//!
//! The other two listen modes need bookkeeping, not dispatch: [`SharedSocket`] tracks which
//! workers share one listening socket, and [`ReusePortSlots`] which worker holds which
//! `SO_REUSEPORT` slot, so that a replacement inherits its predecessor's socket and queue.
//!
//! # Fairness
//!
//! How evenly connections spread depends on when workers ack as much as on the policy. In
//! delivered connections per worker (with no load reports, which make least-connections
//! balance open connections instead):
//!
//! - When every handoff is acked before the next connection arrives, counts differ by at
//!   most one, plus one per connection a worker returned instead of serving.
//! - When connections come in bursts and every worker acks all it holds between bursts,
//!   counts differ by at most one plus the returns, plus up to a window for every round of
//!   acks in which a backlog ran out, plus, for [`RoundRobin`] only, one for every round in
//!   which workers acked out of the order they were handed their connections. While
//!   connections wait every worker is out of credit, so each one goes to whoever acks first,
//!   as under any policy that never leaves a connection waiting beside a worker with credit;
//!   and round-robin's turns follow the order in which workers get credit back, as Node's do.
//!   A schedule that repeats either widens the gap without limit: no bound in the window
//!   alone holds.
//! - A worker that stops acking gets nothing beyond its window, whatever the others get: that
//!   is the back-pressure the window exists for.
//!
//! # Example
//!
//! Driving a round-robin dispatcher by hand, as a primary would from its event loop:
//!
//! ```
//! use std::num::NonZeroU32;
//!
//! use cluster_sched::{Action, ConnId, Dispatch, RoundRobin, WorkerId};
//!
//! # fn main() -> Result<(), cluster_sched::Error> {
//! let window = NonZeroU32::new(2).expect("2 is not zero");
//! let mut rr = RoundRobin::new(window);
//! rr.worker_joined(WorkerId(1))?;
//! rr.worker_joined(WorkerId(2))?;
//!
//! // Three connections arrive; they go out one per turn, not two to the first worker.
//! for conn in 1..=3 {
//!     rr.incoming(ConnId(conn));
//! }
//! let handoff = |worker, conns: &[u64]| Action::Handoff {
//!     worker: WorkerId(worker),
//!     conns: conns.iter().copied().map(ConnId).collect(),
//! };
//! assert_eq!(rr.poll_action(), Some(handoff(1, &[1])));
//! assert_eq!(rr.poll_action(), Some(handoff(2, &[2])));
//! assert_eq!(rr.poll_action(), Some(handoff(1, &[3])));
//! assert_eq!(rr.poll_action(), None);
//!
//! // Worker 2 acks its connection: the primary may now close its own copy of it.
//! assert_eq!(rr.acked(WorkerId(2), 1)?, vec![ConnId(2)]);
//!
//! // Worker 1 dies before acking: its connections go to worker 2, oldest first, one batch.
//! rr.worker_left(WorkerId(1))?;
//! assert_eq!(rr.poll_action(), Some(handoff(2, &[1, 3])));
//!
//! // Worker 2 is out of credit; once a window's worth waits, accept pauses...
//! rr.incoming(ConnId(4));
//! rr.incoming(ConnId(5));
//! assert_eq!(rr.poll_action(), Some(Action::PauseAccept));
//!
//! // ...until an ack brings credit back.
//! assert_eq!(rr.acked(WorkerId(2), 2)?, vec![ConnId(1), ConnId(3)]);
//! assert_eq!(rr.poll_action(), Some(handoff(2, &[4, 5])));
//! assert_eq!(rr.poll_action(), Some(Action::ResumeAccept));
//! assert_eq!(rr.poll_action(), None);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod credit;
mod dispatch;
mod error;
mod ids;
mod least_connections;
mod reuse_port;
mod round_robin;
mod shared;

pub use dispatch::{Action, Config, Dispatch, PendingBound, WorkerStatus};
pub use error::Error;
pub use ids::{ConnId, SlotId, WorkerId};
pub use least_connections::LeastConnections;
pub use reuse_port::{Drain, ReusePortSlots};
pub use round_robin::RoundRobin;
pub use shared::SharedSocket;
