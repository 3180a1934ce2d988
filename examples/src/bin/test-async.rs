//! **Test helper, not an example.** A clustered axum server built on the facade's async path
//! (`cluster_net::Cluster::builder().run_async`), for the end-to-end tests in
//! `examples/tests/`. It is its own primary: it starts `TA_WORKERS` workers (default 1) and
//! prints, on its stdout, one line per event the tests wait for:
//!
//! - `fork <pid>` for each worker started;
//! - `ready <addr>` once every worker listens (on `127.0.0.1:0`);
//! - `slow-started` when a worker began serving `GET /slow` or `GET /disconnecting`;
//! - `exit <pid> <status>` when a worker exited (`code=N` or `signal=N`).
//!
//! It logs to stderr, filtered by `RUST_LOG`. Its workers serve `GET /` with `handled by process.<pid>` and hold `GET /slow` until the
//! worker is disconnecting, then answer `finished slow`. `GET /disconnecting` is held the
//! same way (`slow-started` too) but only until the worker's own disconnect (its listeners
//! closed), not the facade's graceful-shutdown signal, which can come later: its answer,
//! `disconnecting`, tells a client the worker has begun to disconnect while that signal may
//! still wait for an accepted connection's first read. They shut down gracefully
//! (`with_graceful_shutdown(worker.disconnected())`).

use std::io::Write;
use std::process::ExitCode;

use cluster_net::{Cluster, Error, Event, ExitStatus};

fn main() -> ExitCode {
    cluster_examples::init_logging(cluster_examples::LogFormat::Text);
    let workers = std::env::var("TA_WORKERS")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(1);
    let result = Cluster::builder()
        .workers(workers)
        .on_event(|_, event| {
            let line = match event {
                Event::Fork { pid, .. } => format!("fork {pid}"),
                Event::Ready { addrs } => match addrs.first() {
                    Some(addr) => format!("ready {addr}"),
                    None => return,
                },
                Event::Message { .. } => "slow-started".to_owned(),
                Event::Exit { pid, status, .. } => match status {
                    ExitStatus::Code(code) => format!("exit {pid} code={code}"),
                    ExitStatus::Signal(signal) => format!("exit {pid} signal={signal}"),
                },
                _ => return,
            };
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        })
        .run_async(serve);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("test-async: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(worker: cluster_net::Worker) -> Result<(), Error> {
    let slow_worker = worker.clone();
    let held_worker = worker.clone();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async { format!("handled by process.{}\n", std::process::id()) }),
        )
        .route(
            "/slow",
            axum::routing::get(move || {
                let worker = slow_worker.clone();
                async move {
                    worker.send("slow-started").map_err(|err| err.to_string())?;
                    worker.disconnected().await;
                    Ok::<_, String>("finished slow\n")
                }
            }),
        )
        .route(
            "/disconnecting",
            axum::routing::get(move || {
                let worker = held_worker.clone();
                async move {
                    worker.send("slow-started").map_err(|err| err.to_string())?;
                    let inner = worker.inner().ok_or("not clustered")?;
                    inner.disconnected().await;
                    Ok::<_, String>("disconnecting\n")
                }
            }),
        );
    let listener = cluster_net::tokio::TcpListener::bind("127.0.0.1:0")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(worker.disconnected())
        .await?;
    Ok(())
}
