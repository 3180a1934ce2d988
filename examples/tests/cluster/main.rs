//! End-to-end tests of the cluster: real primaries (in this process, on a thread, or in a
//! process of their own) running the `test-worker` helper and the example programs, with
//! real TCP clients. Ports are `:0`, every wait has a deadline, and waits are for events (or,
//! where nothing announces a state, a polled status), never sleeps.
//!
//! This process makes itself a child subreaper (see `support::init`), so the workers of a
//! primary that dies come back to it and can be reaped and examined.
#![allow(clippy::unwrap_used)]

mod support;

mod asynch;
mod control;
mod death;
mod examples;
mod handback;
mod handoff;
mod hello;
mod issue9;
mod lifecycle;
mod listen;
mod messages;
mod observe;
mod operations;
