//! Runnable example programs for the cluster crates (not built yet).
//!
//! This package will hold `[[bin]]` targets: `hello` (the seed's benchmark HTTP server),
//! `crash` (workers that retire after one request) and `messages` (workers reporting to the
//! primary). They arrive with the primary, worker and facade crates.
