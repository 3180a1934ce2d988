//! The facade most users depend on (not built yet).
//!
//! This crate will offer one API that works in the primary, in a worker, or with no cluster
//! at all: `Cluster::builder().workers(n).run(|worker| ...)` and a `TcpListener::bind` that a
//! worker's primary answers. See `DESIGN.md` section 8.
//!
//! Nothing here works yet: the crate exists so the workspace has its final shape.
