//! `hello` on axum: the same flags, ready line and response body (`handled by
//! process.<pid>`), served by `axum::serve` on the cluster's listener in each worker.
//!
//! `axum_hello --workers 4 --port 8080` runs a primary with four workers, each with its own
//! tokio runtime (the primary has none); `--workers 0` runs one process with a multi-thread
//! runtime and no cluster, the baseline. A disconnect (SIGTERM, a roll-out, a stop) starts
//! axum's graceful shutdown: requests in flight finish, idle keep-alive connections close,
//! and the worker exits.

use std::process::ExitCode;

use axum::Router;
use axum::routing::get;
use clap::Parser;
use cluster_examples::http::busy_work;
use cluster_examples::{ServerArgs, init_logging};

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    init_logging(args.log_format);
    if args.faults {
        eprintln!("axum_hello: --faults is served by hello only");
        return ExitCode::from(2);
    }
    let work = args.work;
    cluster_examples::run_async("axum_hello", &args, move |worker, listener| async move {
        let body = cluster_examples::hello_body(std::process::id());
        let hello = move || {
            let body = body.clone();
            async move {
                busy_work(work);
                body
            }
        };
        let app = Router::new().fallback(get(hello));
        axum::serve(listener, app)
            .with_graceful_shutdown(worker.disconnected())
            .await?;
        Ok(())
    })
}
