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
use cluster_examples::{LogFormat, ServerArgs, init_logging};
use cluster_net::Event;

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    init_logging(args.log_format);
    if args.faults {
        eprintln!("axum_hello: --faults is served by hello only");
        return ExitCode::from(2);
    }
    let ready = args.clone();
    let serving = args.clone();
    let result = args
        .builder()
        .on_event(move |_, event| {
            if let Event::Ready { addrs } = &event {
                if let Some(addr) = addrs.first() {
                    println!("{}", ready.ready_line(*addr));
                }
            }
        })
        .run_async(move |worker| async move {
            if serving.boot_fail && worker.is_clustered() {
                tracing::error!("--boot-fail: this worker cannot boot");
                std::process::exit(cluster_net::BOOT_FAILURE_EXIT_CODE);
            }
            let listener = cluster_net::tokio::TcpListener::bind(serving.addr())?;
            if !worker.is_clustered() {
                println!("{}", serving.ready_line(listener.local_addr()?));
            }
            let body = cluster_examples::hello_body(std::process::id());
            let work = serving.work;
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
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let chain = cluster_net::ErrorChain(&err);
            match args.log_format {
                LogFormat::Text => eprintln!("axum_hello: {chain}"),
                LogFormat::Json => tracing::error!(error = %chain, "axum_hello stopped"),
            }
            ExitCode::FAILURE
        }
    }
}
