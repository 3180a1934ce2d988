//! The seed's benchmark server: every response is `handled by process.<pid>`.
//!
//! `hello --workers 4 --port 8080` runs a primary with four workers; `--workers 0` runs one
//! process with no cluster, the baseline. Once every worker listens the primary prints
//! `ready http://HOST:PORT workers=N mode=M` on stdout, once.

use std::process::ExitCode;

use clap::Parser;
use cluster_examples::http::{Handler, busy_work, serve};
use cluster_examples::{ServerArgs, init_logging};
use cluster_net::Worker;

struct Hello<'a> {
    worker: &'a Worker,
    body: String,
    work: u64,
}

impl Handler for Hello<'_> {
    fn respond(&mut self) -> String {
        busy_work(self.work);
        self.body.clone()
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
    init_logging();
    let body = format!("handled by process.{}\n", std::process::id());
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
                },
            )
        },
    )
}
