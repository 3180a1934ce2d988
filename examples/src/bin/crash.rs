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
use cluster_net::{Event, TcpListener, Worker};

struct OneRequest<'a> {
    worker: &'a Worker,
    body: String,
    work: u64,
    retired: bool,
}

impl Handler for OneRequest<'_> {
    fn respond(&mut self) -> String {
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
}

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    init_logging();
    let ready = args.clone();
    let result = args
        .builder()
        .on_event(move |_, event| {
            if let Event::Ready { addrs } = event {
                if let Some(addr) = addrs.first() {
                    println!("{}", ready.ready_line(*addr));
                }
            }
        })
        .run(|worker| {
            let listener = TcpListener::bind(args.addr())?;
            if !worker.is_clustered() {
                println!("{}", args.ready_line(listener.local_addr()?));
            }
            let body = format!("handled by process.{}\n", std::process::id());
            serve(
                listener,
                &mut OneRequest {
                    worker,
                    body,
                    work: args.work,
                    retired: false,
                },
            )?;
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("crash: {err}");
            ExitCode::FAILURE
        }
    }
}
