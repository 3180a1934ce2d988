//! Connection dispatch policies as pure state machines (being built).
//!
//! This crate will decide which worker gets which connection, with no I/O at all: round-robin
//! with a credit window, least-connections, and the bookkeeping of the shared and reuse-port
//! listen modes. See `DESIGN.md` section 5.
#![forbid(unsafe_code)]
