//! The control socket's requests, carried out on the primary's loop. The server (in
//! `control::server`) reads and writes the lines; this turns each request into the call the
//! `Cluster` API already has, and decides nothing of its own.

use cluster_ipc::ErrorChain;

use super::{Primary, Waiter};
use crate::Error;
use crate::control::server::ControlServer;
use crate::control::{Failure, FailureKind, Request, failure_line, success_line};
use crate::shell::Source;

/// The control socket, seen from the loop: requests are read there, carried out here.
impl Primary {
    pub(super) fn open_control_socket(&mut self) -> Result<(), Error> {
        let Some(path) = self.cluster.shell.config.control_socket.clone() else {
            return Ok(());
        };
        let token = self.cluster.shell.allocate_token(Source::ControlSocket);
        let server = ControlServer::open(&path, &self.cluster.shell.registry, token)?;
        self.control = Some(server);
        Ok(())
    }

    pub(super) fn accept_control_clients(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let shell = &mut self.cluster.shell;
        let registry = match shell.registry.try_clone() {
            Ok(registry) => registry,
            Err(err) => {
                tracing::warn!(error = %ErrorChain(&err), "control socket: cannot accept clients");
                return;
            }
        };
        control.accept(&registry, |client| {
            shell.allocate_token(Source::ControlClient(client))
        });
        self.forget_closed_control_clients();
    }

    pub(super) fn serve_control_client(&mut self, client: u64) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        for request in control.read(client) {
            let answer = match request {
                Ok(request) => self.carry_out_request(client, request),
                Err(failure) => Some(failure_line(&failure)),
            };
            if let Some(line) = answer {
                self.reply_control(client, &line);
            }
            self.cluster.pump();
        }
    }

    /// Carries out one request; its reply line, or `None` when the answer comes later (a
    /// reload, once the roll-out is over).
    fn carry_out_request(&mut self, client: u64, request: Request) -> Option<String> {
        let refused = |err: Error| {
            let message = ErrorChain(&err).to_string();
            Some(failure_line(&Failure::new(FailureKind::Refused, message)))
        };
        let cluster = &mut self.cluster;
        match request {
            Request::Status => {
                let status = serde_json::to_value(cluster.status()).unwrap_or_default();
                Some(success_line(fields([("status", status)])))
            }
            Request::Metrics => {
                let metrics = cluster.status().to_prometheus();
                Some(success_line(fields([("metrics", metrics.into())])))
            }
            Request::Scale { workers } => {
                let from = cluster.core.target_workers();
                tracing::info!(from, to = workers, "scaling asked on the control socket");
                match cluster.set_workers(workers) {
                    Ok(()) => Some(success_line(fields([
                        ("from", from.into()),
                        ("to", workers.into()),
                    ]))),
                    Err(err) => refused(err),
                }
            }
            Request::Reload => {
                tracing::info!("rolling restart asked on the control socket");
                match cluster.reload() {
                    Ok(id) => {
                        self.rollout_waiters.push((id, Waiter::Control(client)));
                        None
                    }
                    Err(err) => refused(err),
                }
            }
            Request::Stop { graceful } => {
                tracing::info!(graceful, "stop asked on the control socket");
                // Answered first: the stop may end the loop before another turn.
                self.reply_control(client, &success_line(fields([])));
                self.cluster.stop(graceful);
                None
            }
        }
    }

    pub(super) fn reply_control(&mut self, client: u64, line: &str) {
        if let Some(control) = self.control.as_mut() {
            control.reply(client, line);
        }
        self.forget_closed_control_clients();
    }

    pub(super) fn forget_closed_control_clients(&mut self) {
        if let Some(control) = self.control.as_mut() {
            for token in control.take_closed() {
                self.cluster.shell.release_token(token);
            }
        }
    }

    /// The one line an operator reads at start: who, how many, how, where.
    pub(super) fn log_start(&self) {
        let config = &self.cluster.shell.config;
        tracing::info!(
            pid = std::process::id(),
            workers = config.workers,
            mode = ?config.mode,
            policy = ?config.policy,
            program = %config.program.display(),
            control = config.control_socket.as_ref().map(|p| p.display().to_string()),
            "primary starting"
        );
    }
}

/// A reply's fields.
pub(super) fn fields<const N: usize>(
    pairs: [(&str, serde_json::Value); N],
) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}
