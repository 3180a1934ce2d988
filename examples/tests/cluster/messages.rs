//! What reaches a worker (arguments, environment, working directory) and messages both ways.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cluster_primary::{Event, WorkerId};

use crate::support::{Harness, builder, decode, msg};

#[test]
fn env_args_and_cwd_reach_the_worker() {
    // A variable of this process that workers inherit, one the builder sets, one it removes.
    let inherited = std::env::vars().find(|(name, _)| {
        name != "PATH" && !name.starts_with("TW_") && !name.starts_with("CLUSTER_")
    });
    let mut report_env = vec!["TW_PROBE".to_owned(), "PATH".to_owned()];
    report_env.extend(inherited.iter().map(|(name, _)| name.clone()));
    let args = ["--alpha", "two words", "ünïcödé", "", "--", "-x"];
    let dir = std::env::temp_dir().canonicalize().unwrap();
    let builder = builder(2)
        .args(args)
        .env("TW_PROBE", "a value = with spaces")
        .env("TW_REPORT_ENV", report_env.join(","))
        .env_remove("PATH")
        .current_dir(&dir);
    let mut cluster = Harness::start(builder);
    for _ in 0..2 {
        let (worker, report) = cluster.wait_message(None, "report");
        assert!(report.contains(&format!("id={}", worker.0)), "{report:?}");
        assert!(report.contains(&"env.TW_PROBE=a value = with spaces".to_owned()));
        assert!(
            !report.iter().any(|field| field.starts_with("env.PATH=")),
            "PATH was removed: {report:?}"
        );
        if let Some((name, value)) = &inherited {
            assert!(
                report.contains(&format!("env.{name}={value}")),
                "{name} is inherited: {report:?}"
            );
        }
        assert!(
            report.contains(&format!("cwd={}", dir.display())),
            "{report:?}"
        );
        let (_, got) = cluster.wait_message(Some(worker), "args");
        assert_eq!(got, args);
    }
    cluster.stop();
}

#[test]
fn messages_go_both_ways_and_broadcast() {
    // On the loop: a message to each worker as soon as it is online (before its code reads
    // messages: it must wait for it, not be lost), and a broadcast once all are ready.
    let broadcast_count = Arc::new(Mutex::new(None));
    let unknown_refused = Arc::new(Mutex::new(false));
    let (count, refused) = (Arc::clone(&broadcast_count), Arc::clone(&unknown_refused));
    let mut cluster = Harness::start_with(builder(3), move |cluster, event| match event {
        Event::Online { worker } => {
            let text = format!("online {}", worker.0);
            cluster
                .send(*worker, &msg("echo", [text.as_str()]))
                .unwrap();
        }
        Event::Ready { .. } => {
            *count.lock().unwrap() = Some(cluster.broadcast(&msg("echo", ["ready"])).unwrap());
            *refused.lock().unwrap() = cluster.send(WorkerId(999), &msg("echo", [])).is_err();
        }
        _ => {}
    });
    cluster.wait_ready();
    assert_eq!(*broadcast_count.lock().unwrap(), Some(3));
    assert!(*unknown_refused.lock().unwrap());

    let workers: Vec<WorkerId> = cluster.status().workers.iter().map(|w| w.id).collect();
    assert_eq!(workers.len(), 3);
    for &worker in &workers {
        // Worker to primary, unprompted.
        cluster.wait_message(Some(worker), "report");
        // Primary to worker and back: from the hook, and from a handle on another thread.
        wait_echo(&mut cluster, Some(worker), &format!("online {}", worker.0));
        let text = format!("to {}", worker.0);
        cluster.send(worker, &msg("echo", [text.as_str()]));
        wait_echo(&mut cluster, Some(worker), &text);
    }
    // The broadcasts, from the hook and from a handle, reached every worker once.
    cluster.handle.broadcast(&msg("echo", ["all"])).unwrap();
    for text in ["ready", "all"] {
        let answered: BTreeSet<WorkerId> = (0..3)
            .map(|_| wait_echo(&mut cluster, None, text))
            .collect();
        assert_eq!(answered, workers.iter().copied().collect(), "{text}");
    }
    // Nothing was answered twice: four messages to each of three workers, twelve echoes.
    let events = cluster.stop();
    let echoes = events
        .iter()
        .filter(|event| match event {
            Event::Message { message, .. } => decode(message).0 == "echo",
            _ => false,
        })
        .count();
    assert_eq!(echoes, 3 * 4);
}

/// Waits for a worker's echo of `text`; returns the worker.
fn wait_echo(cluster: &mut Harness, from: Option<WorkerId>, text: &str) -> WorkerId {
    cluster.wait_for(&format!("an echo of {text:?} from {from:?}"), |event| {
        let Event::Message { worker, message } = event else {
            return None;
        };
        let (kind, fields) = decode(message);
        let matches = kind == "echo" && fields == [text] && from.is_none_or(|from| from == *worker);
        matches.then_some(*worker)
    })
}
