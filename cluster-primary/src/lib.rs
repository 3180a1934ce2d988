//! The primary process of a cluster (not built yet).
//!
//! This crate will hold the supervisor: a single-threaded `mio` loop that spawns worker
//! processes (fork+exec, one process group each), watches them through pidfds, respawns the
//! ones that die, owns every listening socket and hands connections to workers according to a
//! `cluster-sched` policy, and stops everything gracefully. See `DESIGN.md` section 7.
//!
//! Nothing here works yet: the crate exists so the workspace has its final shape.
