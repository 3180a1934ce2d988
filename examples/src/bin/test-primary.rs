//! **Test helper, not an example.** A cluster primary in a process of its own, for the
//! end-to-end tests in `examples/tests/` that need a primary they can kill (the primary-death
//! tests): it runs `cluster_primary::Builder` with `test-worker` (or any program) as the
//! worker program and prints every event on stdout, one line each, so the test learns the
//! workers' pids and knows when they are up:
//!
//! ```text
//! fork <id> <pid> <slot>
//! online <id>
//! listening <id> <addr>
//! ready
//! message <id> <kind> <field>...      (a test-worker message, fields separated by tabs)
//! disconnect <id>
//! exit <id> <status>
//! ```
//!
//! Flags: `--worker-program PATH` (required), `--workers N` (default 1), `--no-pdeathsig`
//! (the workers get no parent-death signal: only the end of their control channel tells them
//! the primary died), `--no-respawn`. Workers inherit this process's environment, so the test
//! picks their behaviour with the `TW_*` variables (see `test-worker`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cluster_net::primary::{Builder, Event};

#[derive(Debug, Parser)]
struct Args {
    /// The worker program.
    #[arg(long)]
    worker_program: PathBuf,
    /// How many workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Give workers no parent-death signal.
    #[arg(long)]
    no_pdeathsig: bool,
    /// Do not replace workers that exit.
    #[arg(long)]
    no_respawn: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut builder = Builder::new()
        .workers(args.workers)
        .program(&args.worker_program)
        .args(Vec::<String>::new())
        .respawn(!args.no_respawn);
    if args.no_pdeathsig {
        builder = builder.parent_death_signal(None);
    }
    let primary = match builder.build() {
        Ok(primary) => primary,
        Err(err) => {
            eprintln!("test-primary: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = primary.run(|_, event| match event {
        Event::Fork { worker, pid, slot } => println!("fork {} {pid} {}", worker.0, slot.0),
        Event::Online { worker } => println!("online {}", worker.0),
        Event::Listening { worker, addr } => println!("listening {} {addr}", worker.0),
        Event::Ready { .. } => println!("ready"),
        Event::Message { worker, message } => match message.decode::<(String, Vec<String>)>() {
            Ok((kind, fields)) => {
                println!("message {} {kind} {}", worker.0, fields.join("\t"));
            }
            Err(err) => println!("message {} undecodable {err}", worker.0),
        },
        Event::Disconnect { worker } => println!("disconnect {}", worker.0),
        Event::Exit { worker, status, .. } => println!("exit {} {status:?}", worker.0),
        other => println!("other {other:?}"),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("test-primary: {err}");
            ExitCode::FAILURE
        }
    }
}
