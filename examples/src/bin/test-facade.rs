//! **Test helper, not an example.** A clustered program built on the facade
//! (`cluster_net::Cluster::builder().run`), for the end-to-end tests in `examples/tests/`:
//! they run it as the worker program of an in-process primary and pick what its worker closure
//! does with `TF_BEHAVIOUR`. Messages it exchanges with the primary are `(String, u64)` pairs
//! (a kind and a number), or raw bytes for `echo`.
//!
//! - `fail`: the closure returns an error at once (the worker must exit non-zero);
//! - `recv-burst:<n>`: reads `n` messages `("n", i)` with `recv_message` as fast as it can,
//!   then reports `("received", k)` where `k` counts those that arrived in order;
//! - `callback-burst:<n>`: the same through `on_message`;
//! - `send-burst:<n>`: sends `("n", i)` for i in 0..n in a tight loop, then `("sent", n)`;
//! - `echo`: sends every message back as it came (any size), until disconnected;
//! - `spawn-child`: runs this program again with `TF_BEHAVIOUR=standalone` and reports what it
//!   printed (`("child-clustered", 0 or 1)`, `("child-exit", code)`);
//! - `standalone`: runs with `workers(0)` and prints `clustered=<bool>` from inside its closure,
//!   which must run alone, in this process (not as a worker that adopts someone's fd 3).

use std::io::Write;
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::Duration;

use cluster_net::{Cluster, Error, Message};

type Msg = (String, u64);

const WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let behaviour = std::env::var("TF_BEHAVIOUR").unwrap_or_default();
    // Alone, the program must run in this process (a primary would start workers).
    let workers = if behaviour == "standalone" { 0 } else { 1 };
    let result = Cluster::builder()
        .workers(workers)
        .run(|worker| behave(worker, &behaviour));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("test-facade: {err}");
            ExitCode::FAILURE
        }
    }
}

fn behave(worker: &cluster_net::Worker, behaviour: &str) -> Result<(), Error> {
    let (name, count) = match behaviour.split_once(':') {
        Some((name, count)) => (name, count.parse::<u64>().map_err(Error::app)?),
        None => (behaviour, 0),
    };
    match name {
        "fail" => Err(Error::app("the worker's code failed on purpose")),
        "recv-burst" => {
            let inner = worker.inner().ok_or(Error::app("not clustered"))?;
            let mut in_order = 0;
            for expected in 0..count {
                let message = inner.recv_message(WAIT)?.ok_or(Error::app("no message"))?;
                if number(&message)? == expected {
                    in_order += 1;
                }
            }
            report(worker, "received", in_order)
        }
        "callback-burst" => {
            let (tx, rx) = mpsc::channel();
            worker.on_message(move |message| {
                let _ = tx.send(number(&message).unwrap_or(u64::MAX));
            })?;
            let mut in_order = 0;
            for expected in 0..count {
                if rx.recv_timeout(WAIT).map_err(Error::app)? == expected {
                    in_order += 1;
                }
            }
            report(worker, "received", in_order)
        }
        "send-burst" => {
            for i in 0..count {
                worker.send(&("n".to_owned(), i))?;
            }
            report(worker, "sent", count)
        }
        "echo" => {
            let inner = worker.inner().ok_or(Error::app("not clustered"))?;
            while !inner.is_disconnecting() {
                if let Some(message) = inner.recv_message(Duration::from_millis(100))? {
                    let bytes: Vec<u8> = message.decode().map_err(Error::app)?;
                    worker.send(&bytes)?;
                }
            }
            Ok(())
        }
        "spawn-child" => {
            let exe = std::env::current_exe()?;
            let output = Command::new(exe)
                .env("TF_BEHAVIOUR", "standalone")
                .output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let clustered = u64::from(!stdout.contains("clustered=false"));
            report(worker, "child-clustered", clustered)?;
            let code = output.status.code().map_or(u64::MAX, |code| code as u64);
            report(worker, "child-exit", code)?;
            worker.inner().map(|inner| inner.wait_disconnecting(WAIT));
            Ok(())
        }
        "standalone" => {
            let clustered = worker.is_clustered() || cluster_net::is_worker();
            let mut stdout = std::io::stdout();
            writeln!(stdout, "clustered={clustered}")?;
            Ok(())
        }
        other => Err(Error::app(format!("unknown behaviour {other:?}"))),
    }
}

fn number(message: &Message) -> Result<u64, Error> {
    let (_, n): Msg = message.decode().map_err(Error::app)?;
    Ok(n)
}

fn report(worker: &cluster_net::Worker, kind: &str, n: u64) -> Result<(), Error> {
    worker.send(&(kind.to_owned(), n))
}
