//! The seed's benchmark server: every response is `handled by process.<pid>`.
//!
//! `hello --workers 4 --port 8080` runs a primary with four workers; `--workers 0` runs one
//! process with no cluster, the baseline. Once every worker listens the primary prints
//! `ready http://HOST:PORT workers=N mode=M` on stdout, once. `--help` lists the knobs that
//! show the lifecycle at work: `--boot-fail`, `--faults` (`GET /crash`, `GET /hang`),
//! `--max-requests`, `--max-memory`, `--hang-timeout`, `--shutdown-timeout`.

use std::process::ExitCode;

use clap::Parser;
use cluster_examples::http::{Handler, busy_work, serve};
use cluster_examples::{ServerArgs, init_logging};
use cluster_net::Worker;

struct Hello<'a> {
    worker: &'a Worker,
    body: String,
    work: u64,
    faults: bool,
}

impl Handler for Hello<'_> {
    fn respond(&mut self, path: &str) -> String {
        match path {
            "/crash" if self.faults => panic!("GET /crash: crashing on purpose (--faults)"),
            "/hang" if self.faults => {
                tracing::warn!("GET /hang: spinning forever on purpose (--faults)");
                loop {
                    std::hint::spin_loop();
                }
            }
            _ => {
                busy_work(self.work);
                self.body.clone()
            }
        }
    }

    fn on_panic(&mut self) {
        // Only the panicking request is lost; the worker finishes the others and is
        // replaced, counted as a failure.
        if self.worker.is_clustered() {
            if let Err(err) = self.worker.fail() {
                tracing::error!(%err, "could not retire after a panic; disconnecting");
                self.worker.disconnect();
            }
        }
    }

    fn keep_alive_allowed(&self) -> bool {
        !self.worker.is_disconnecting()
    }

    fn heartbeat(&mut self) {
        self.worker.heartbeat();
    }
}

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    init_logging(args.log_format);
    let body = cluster_examples::hello_body(std::process::id());
    cluster_examples::run(
        "hello",
        &args,
        |_, _| {},
        |worker, listener| {
            serve(
                listener,
                &mut Hello {
                    worker,
                    body,
                    work: args.work,
                    faults: args.faults,
                },
            )
        },
    )
}
