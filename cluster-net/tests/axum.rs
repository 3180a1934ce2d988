//! axum's `Listener` over a cluster listener, against the stand-in primary of cluster-worker's
//! tests: connections come through, and once the worker disconnects `accept` stays pending
//! (graceful shutdown ends the serve) instead of failing and retrying with an error logged.
#![allow(clippy::unwrap_used)]

#[path = "../../cluster-worker/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_ipc::ListenerId;
use cluster_ipc::proto::{ToPrimary, ToWorker};
use support::{
    WAIT, connect_worker, finish, options, round_robin_listener, send_batch, tcp_connections,
};

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn axum_accept_serves_connections_then_stays_pending_once_the_worker_disconnects() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let (worker, mut primary) = connect_worker(options());
    let (listener, mut handoff) = round_robin_listener(&worker, &mut primary, 1, 4);
    let (clients, fds) = tcp_connections(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut listener = cluster_net::tokio::TcpListener::from_cluster(listener).unwrap();
        assert!(listener.is_clustered());
        send_batch(&mut handoff, &fds);
        let accept = axum::serve::Listener::accept(&mut listener);
        let (stream, peer) = tokio::time::timeout(WAIT, accept).await.unwrap();
        assert_eq!(peer, clients[0].local_addr().unwrap());
        drop(stream);

        primary
            .channel
            .send(None, &ToWorker::Disconnect, &[])
            .unwrap();
        tokio::time::timeout(WAIT, worker.disconnected())
            .await
            .unwrap();
        assert!(listener.is_closed());
        // Pending, not an error retried every second.
        let accept = axum::serve::Listener::accept(&mut listener);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), accept)
                .await
                .is_err()
        );
        drop(listener);
    });
    let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logged.is_empty(), "logged: {logged}");
    primary.expect(ToPrimary::CloseListener {
        listener: ListenerId(1),
    });
    drop((fds, handoff));
    finish(worker, primary);
}
