//! The daemon's small HTTP servers (metrics, health check node ports): HTTP/1 on a bound
//! listener, each request answered by a plain function of the request, so that the answers are
//! tested without a socket.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, header::CONTENT_TYPE, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, warn};

pub type Answer = Response<Full<Bytes>>;

/// Serves `respond`'s answers on `listener` until the returned task is aborted or the runtime
/// stops. `what` names the server in log lines.
pub fn serve(
    listener: TcpListener,
    what: &'static str,
    respond: impl Fn(&Request<Incoming>) -> Answer + Send + Sync + 'static,
) -> JoinHandle<()> {
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, say: pause rather than spin on the same error.
                    warn!(%error, server = what, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let respond = Arc::clone(&respond);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let answer = respond(&request);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    debug!(%error, server = what, "connection ended with an error");
                }
            });
        }
    })
}

/// A response with `body` of `content_type`.
pub fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}
