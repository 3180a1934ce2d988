//! Workers and the primary talking: each worker reports every request to the primary, which
//! keeps the cluster-wide count and broadcasts it; every response carries the latest count
//! the worker heard.
//!
//! Same flags and ready line as `hello`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use cluster_examples::http::{Handler, busy_work, serve};
use cluster_examples::{ServerArgs, init_logging};
use cluster_net::{Event, PrimaryCluster, Worker};
use serde::{Deserialize, Serialize};

/// Worker to primary: one more request was served.
#[derive(Serialize, Deserialize)]
struct Served;

/// Primary to workers: the cluster-wide count of requests served.
#[derive(Serialize, Deserialize)]
struct Total(u64);

struct Counting<'a> {
    worker: &'a Worker,
    total: Arc<AtomicU64>,
    work: u64,
}

impl Handler for Counting<'_> {
    fn respond(&mut self, _path: &str) -> String {
        busy_work(self.work);
        let total = if self.worker.is_clustered() {
            if let Err(err) = self.worker.send(&Served) {
                tracing::warn!(%err, "could not report a request");
            }
            // The primary's count arrives asynchronously; this is the latest one heard, plus
            // the request being answered.
            self.total.load(Ordering::Relaxed) + 1
        } else {
            self.total.fetch_add(1, Ordering::Relaxed) + 1
        };
        format!(
            "handled by process.{}\nrequests served by the cluster: {total}\n",
            std::process::id()
        )
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
    let mut total = 0u64;
    let count = move |cluster: &mut PrimaryCluster, event: &Event| {
        if let Event::Message { worker, message } = event {
            match message.decode::<Served>() {
                Ok(Served) => {
                    total += 1;
                    if let Err(err) = cluster.broadcast(&Total(total)) {
                        tracing::warn!(%err, "could not broadcast the total");
                    }
                }
                Err(err) => tracing::warn!(%worker, %err, "unexpected message"),
            }
        }
    };
    cluster_examples::run("messages", &args, count, |worker, listener| {
        let total = Arc::new(AtomicU64::new(0));
        if worker.is_clustered() {
            let heard = Arc::clone(&total);
            worker
                .on_message(move |message| {
                    if let Ok(Total(count)) = message.decode::<Total>() {
                        heard.fetch_max(count, Ordering::Relaxed);
                    }
                })
                .map_err(std::io::Error::other)?;
        }
        serve(
            listener,
            &mut Counting {
                worker,
                total,
                work: args.work,
            },
        )
    })
}
