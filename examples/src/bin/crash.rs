//! The seed's multi-process example, done right: every worker answers one request, then
//! retires. Retiring asks the primary to start the replacement first, then stops taking
//! connections, finishes the ones it has (un-served ones go back to the primary for another
//! worker) and exits, so clients never see a refused or dropped connection.
//!
//! Same flags and ready line as `hello`.

use std::process::ExitCode;

use clap::Parser;
use cluster_examples::http::{Handler, busy_work, serve};
use cluster_examples::{ServerArgs, init_logging};
use cluster_net::Worker;

struct OneRequest<'a> {
    worker: &'a Worker,
    body: String,
    work: u64,
    retired: bool,
}

impl Handler for OneRequest<'_> {
    fn respond(&mut self, _path: &str) -> String {
        busy_work(self.work);
        if !self.retired && self.worker.is_clustered() {
            self.retired = true;
            tracing::info!("served my request; retiring");
            if let Err(err) = self.worker.retire() {
                tracing::warn!(%err, "could not retire; disconnecting");
                self.worker.disconnect();
            }
        }
        self.body.clone()
    }

    fn keep_alive_allowed(&self) -> bool {
        // One request per connection: the worker leaves right after it.
        false
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
        "crash",
        &args,
        |_, _| {},
        |worker, listener| {
            serve(
                listener,
                &mut OneRequest {
                    worker,
                    body,
                    work: args.work,
                    retired: false,
                },
            )
        },
    )
}
