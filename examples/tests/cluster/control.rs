//! The control socket of a running `hello` (`--control PATH`), driven with `clusterctl` and
//! by hand: status, scale, reload and metrics under load with no failed request; garbage,
//! oversized lines, idle clients and other users refused without disturbing anything.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::hello::{HELLO, Hello, Load};
use crate::support::WAIT;

/// `clusterctl`, built beside the examples by `cargo test --workspace` (the examples enable
/// `cluster-net`'s `cli` feature, which builds it).
fn clusterctl_program() -> PathBuf {
    let path = Path::new(HELLO).with_file_name("clusterctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p cluster-net --features cli` (the \
         README's `cargo test --workspace` does)",
        path.display()
    );
    path
}

fn clusterctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(clusterctl_program())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

/// `clusterctl` that must succeed; its stdout.
fn clusterctl_ok(socket: &Path, args: &[&str]) -> String {
    let output = clusterctl(socket, args);
    assert!(
        output.status.success(),
        "clusterctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A fresh path for a control socket.
fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cluster-control-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ctl.sock")
}

/// One request line on a connection of its own, and the reply line.
fn ask_raw(socket: &Path, request: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line:?}"))
}

/// The pids a `status --json` reply lists.
fn status_pids(socket: &Path) -> BTreeSet<u32> {
    let reply: Value = serde_json::from_str(&clusterctl_ok(socket, &["status", "--json"])).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    reply["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| u32::try_from(w["pid"].as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn clusterctl_status_scale_reload_and_metrics_under_load_without_a_failed_request() {
    let socket = socket_path("operate");
    let socket_arg = socket.to_str().unwrap();
    let hello = Hello::start(&["--workers", "2", "--control", socket_arg]);
    let first = hello.wait_workers(2, &BTreeSet::new());
    let metadata = std::fs::metadata(&socket).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    assert_eq!(metadata.uid(), nix::unistd::geteuid().as_raw());
    let load = Load::start(hello.addr, 4, false);
    load.wait_for_more(50);

    assert_eq!(status_pids(&socket), first, "every worker with its pid");
    let table = clusterctl_ok(&socket, &["status"]);
    for pid in &first {
        assert!(table.contains(&pid.to_string()), "{table}");
    }

    clusterctl_ok(&socket, &["scale", "3"]);
    let three = hello.wait_workers(3, &BTreeSet::new());
    assert!(
        first.is_subset(&three),
        "scaling up keeps the workers there"
    );

    // Garbage, a line too long, and a client that says nothing: each is answered or
    // ignored, and none of them stalls the loop.
    let idle = UnixStream::connect(&socket).unwrap();
    let garbage = ask_raw(&socket, b"\x00\x01 not json\n");
    assert_eq!(garbage["ok"], false, "{garbage}");
    assert_eq!(garbage["kind"], "bad_request", "{garbage}");
    let wrong_version = ask_raw(&socket, b"{\"version\":99,\"command\":\"status\"}\n");
    assert_eq!(
        wrong_version["kind"], "unsupported_version",
        "{wrong_version}"
    );
    let too_long = ask_raw(&socket, &vec![b'x'; 100 * 1024]);
    assert_eq!(too_long["kind"], "too_long", "{too_long}");
    let refused = ask_raw(
        &socket,
        b"{\"version\":1,\"command\":\"scale\",\"workers\":0}\n",
    );
    assert_eq!(refused["kind"], "refused", "{refused}");
    assert_eq!(status_pids(&socket).len(), 3, "still answering");

    let output = clusterctl_ok(&socket, &["reload"]);
    assert!(output.contains("done"), "{output}");
    let rolled = hello.wait_workers(3, &three);
    assert_eq!(status_pids(&socket), rolled);
    load.wait_for_more(50);

    let metrics = clusterctl_ok(&socket, &["metrics"]);
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let samples = metrics.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(
        scrape.samples.len(),
        samples,
        "every line parses:\n{metrics}"
    );
    let acked = scrape
        .samples
        .iter()
        .find(|s| s.metric == "cluster_connections_acked_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => panic!("not a counter"),
        })
        .unwrap();
    assert!(acked >= 100.0, "{acked}");

    drop(idle);
    let (ok, failures) = load.finish();
    assert_eq!(failures, Vec::<String>::new(), "after {ok} answered");
    hello.stop();
    assert!(!socket.exists(), "the socket is removed at the end");
    let _ = std::fs::remove_dir(socket.parent().unwrap());
}

#[test]
fn another_user_is_refused_by_the_socket_and_by_the_peer_check() {
    let socket = socket_path("users");
    let hello = Hello::start(&["--workers", "1", "--control", socket.to_str().unwrap()]);
    hello.wait_workers(1, &BTreeSet::new());
    if !nix::unistd::geteuid().is_root() {
        // Only root can act as another user here. The socket's mode keeps others out, and
        // the peer check's decision is tested in `cluster-primary`.
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        eprintln!("not root: another user cannot be impersonated; checked the mode only");
        hello.stop();
        return;
    }
    let nobody = 65534;
    let as_nobody = || {
        Command::new(clusterctl_program())
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"])
            .uid(nobody)
            .gid(nobody)
            .output()
            .unwrap()
    };
    // The file's mode stops it first.
    let output = as_nobody();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(stderr.contains("permission denied"), "{stderr}");
    // With the mode opened up (and the directory), the primary's own check refuses it.
    let dir = socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = as_nobody();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("permission_denied"), "{stdout} {stderr}");
    assert!(stderr.contains(&format!("uid {nobody}")), "{stderr}");
    // The owner is still served.
    assert_eq!(status_pids(&socket).len(), 1);
    hello.stop();
    let _ = std::fs::remove_dir(dir);
}
