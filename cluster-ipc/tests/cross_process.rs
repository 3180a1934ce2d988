//! A channel across a process boundary: a helper binary adopts its end from an inherited fd,
//! and the two processes exchange requests, replies and fds in both directions.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_ipc::{Channel, Frame, Kind, Requests};
use support::no_leak;

const PEER: &str = env!("CARGO_BIN_EXE_cluster-ipc-test-peer");
const FD_VAR: &str = "CLUSTER_IPC_TEST_FD";

fn spawn_peer() -> (Channel, std::process::Child) {
    spawn_peer_at(Some(3))
}

/// Spawns the peer with its channel end at fd `target` in the child; `None` keeps the end's
/// own number, the case where only clearing close-on-exec makes it inheritable.
fn spawn_peer_at(target: Option<i32>) -> (Channel, std::process::Child) {
    use std::os::fd::AsRawFd;
    let (ours, theirs) = Channel::pair().unwrap();
    let mut cmd = Command::new(PEER);
    cmd.stdin(Stdio::null());
    let fd = theirs.into_fd();
    let target = target.unwrap_or(fd.as_raw_fd());
    cluster_ipc::process::pass_channel(&mut cmd, fd, target, FD_VAR).unwrap();
    let child = cmd.spawn().unwrap();
    // The command owns the parent's copy of the child's end; dropping it leaves the child as
    // the only holder, so the child's exit reads as end of file here.
    drop(cmd);
    (ours, child)
}

fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

fn ask(channel: &mut Channel, text: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> String {
    channel
        .call(Kind::User, text, fds, deadline())
        .unwrap()
        .decode()
        .unwrap()
}

fn finish(mut channel: Channel, mut child: std::process::Child) {
    assert_eq!(ask(&mut channel, "exit", &[]), "bye");
    assert!(child.wait().unwrap().success());
    assert!(matches!(
        channel.recv(deadline()),
        Err(cluster_ipc::Error::Closed)
    ));
}

#[test]
fn requests_and_replies_cross_the_process_boundary() {
    no_leak(|| {
        let (mut channel, child) = spawn_peer();
        assert_eq!(ask(&mut channel, "echo:hello", &[]), "hello");
        finish(channel, child);
    });
}

#[test]
fn fds_pass_from_parent_to_child_and_work_there() {
    no_leak(|| {
        let (mut channel, child) = spawn_peer();
        let (readers, writers): (Vec<_>, Vec<_>) = (0..3).map(|_| std::io::pipe().unwrap()).unzip();
        let borrowed: Vec<_> = writers.iter().map(AsFd::as_fd).collect();
        assert_eq!(ask(&mut channel, "write", &borrowed), "wrote 3");
        drop(borrowed);
        drop(writers);
        for (i, mut reader) in readers.into_iter().enumerate() {
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            assert_eq!(text, format!("peer wrote {i}"));
        }
        finish(channel, child);
    });
}

#[test]
fn the_child_asks_the_parent_with_an_fd_while_the_parent_waits_for_its_own_reply() {
    no_leak(|| {
        let (mut channel, child) = spawn_peer();
        let mut requests = Requests::new();
        let ask_seq = channel.send(Kind::User, None, "ask", &[]).unwrap();
        requests.register(ask_seq, "ask", deadline()).unwrap();
        let answer: Frame = loop {
            let frame = channel.recv(deadline()).unwrap();
            let Some(request) = requests.on_frame(frame) else {
                break requests.poll_completion().unwrap().outcome.unwrap();
            };
            // The child's own request: fill the pipe it sent, then reply.
            assert_eq!(request.decode::<String>().unwrap(), "fill");
            assert_eq!(request.fds.len(), 1);
            let mut fds = request.fds;
            let mut pipe = std::fs::File::from(fds.remove(0));
            std::io::Write::write_all(&mut pipe, b"from the parent").unwrap();
            drop(pipe);
            channel
                .send(Kind::User, Some(request.header.seq), "filled", &[])
                .unwrap();
        };
        assert_eq!(
            answer.decode::<String>().unwrap(),
            "filled: from the parent"
        );
        finish(channel, child);
    });
}

#[test]
fn the_child_inherits_only_its_channel_and_keeps_it_close_on_exec() {
    no_leak(|| {
        let (mut channel, child) = spawn_peer();
        let parents_end = channel.as_fd().try_clone_to_owned().unwrap();
        let report = ask(&mut channel, "fds", &[]);
        let (list, cloexec) = report.split_once(" cloexec=").unwrap();
        assert_eq!(
            cloexec, "true",
            "the adopted fd must be close-on-exec again"
        );
        let fds: Vec<i32> = list
            .trim_matches(['[', ']'])
            .split(", ")
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(fds.contains(&3), "the channel is at fd 3: {fds:?}");
        use std::os::fd::AsRawFd;
        assert!(
            !fds.contains(&parents_end.as_raw_fd()),
            "the parent's end (fd {}) leaked into the child: {fds:?}",
            parents_end.as_raw_fd()
        );
        drop(parents_end);
        finish(channel, child);
    });
}

#[test]
fn the_parent_sees_the_child_die_as_end_of_file() {
    no_leak(|| {
        let (mut channel, mut child) = spawn_peer();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            channel.recv(deadline()),
            Err(cluster_ipc::Error::Closed)
        ));
    });
}

#[test]
fn a_channel_end_mapped_to_its_own_number_is_inherited() {
    no_leak(|| {
        let (mut channel, child) = spawn_peer_at(None);
        assert_eq!(ask(&mut channel, "echo:same number", &[]), "same number");
        let report = ask(&mut channel, "fds", &[]);
        assert!(report.ends_with("cloexec=true"), "{report}");
        finish(channel, child);
    });
}
