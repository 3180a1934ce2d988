//! The worker side of a cluster (not built yet).
//!
//! This crate will hold what runs inside a worker process: adopting the control channel
//! inherited from the primary, the Hello handshake, `listen(addr)` interception answered by
//! the primary, round-robin and shared listeners, user messages, and graceful disconnect.
//! See `DESIGN.md` section 6.
//!
//! Nothing here works yet: the crate exists so the workspace has its final shape.
