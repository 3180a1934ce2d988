//! `hello` on hyper's own server connection API (no axum): the same flags, ready line and
//! response body (`handled by process.<pid>`) as `hello` and `axum_hello`.
//!
//! Each worker accepts on the cluster's listener (`cluster_net::tokio::TcpListener`) and
//! serves every connection in a task of its own with `hyper::server::conn::http1` (keep-alive
//! on), watched by hyper-util's `GracefulShutdown`. `--workers 0` runs one process with a
//! multi-thread runtime and no cluster, the baseline. A disconnect (SIGTERM, a roll-out, a
//! stop) ends the accept loop; once `worker.disconnected()` resolves (every accepted
//! connection was read from once, so none is closed before its first request is read) every
//! connection shuts down gracefully: requests in flight finish, idle keep-alive connections
//! close, and the worker exits.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cluster_examples::http::busy_work;
use cluster_examples::{ServerArgs, init_logging};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;

/// How long the accept loop pauses after an accept error other than the end of accepting (a
/// full fd table, say) before it tries again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);

fn main() -> ExitCode {
    let args = ServerArgs::parse();
    init_logging(args.log_format);
    if args.faults {
        eprintln!("hyper_hello: --faults is served by hello only");
        return ExitCode::from(2);
    }
    let work = args.work;
    cluster_examples::run_async("hyper_hello", &args, move |worker, listener| async move {
        let body = Bytes::from(cluster_examples::hello_body(std::process::id()));
        let graceful = GracefulShutdown::new();
        let disconnected = worker.disconnected();
        tokio::pin!(disconnected);
        let mut signalled = false;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut disconnected => {
                    signalled = true;
                    break;
                }
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                // The worker disconnects: its listener is closed for good.
                Err(_) if listener.is_closed() => break,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let body = body.clone();
            let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
                let body = body.clone();
                async move {
                    busy_work(work);
                    let mut response = Response::new(Full::new(body));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(error = %err, "connection failed");
                }
            });
        }
        drop(listener);
        // The listener closes before the signal, which waits for the connections accepted
        // so far to be read from once: shutting them down earlier would close those as
        // idle, failing the requests on their way.
        if !signalled {
            disconnected.await;
        }
        graceful.shutdown().await;
        Ok(())
    })
}
