//! Graceful shutdown without dropping requests that are already on their way.
//!
//! On SIGTERM the server first *drains*: the listening socket is closed (new
//! connections are refused at once, not left hanging in the backlog), and
//! every response on an existing connection carries `Connection: close`, so
//! a keep-alive client finishes the request it sent and reconnects elsewhere
//! instead of having its next request cut off. After the drain window the
//! remaining (idle) connections are closed and in-flight requests finish.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::http::header::CONNECTION;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP listener that closes its socket once draining starts.
#[derive(Debug)]
pub struct DrainingListener {
    inner: Option<TcpListener>,
    address: SocketAddr,
    draining: CancellationToken,
}

impl DrainingListener {
    pub fn new(inner: TcpListener, draining: CancellationToken) -> io::Result<Self> {
        Ok(Self {
            address: inner.local_addr()?,
            inner: Some(inner),
            draining,
        })
    }
}

impl Listener for DrainingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some(listener) = self.inner.as_mut() else {
                // Draining: never accept again.
                return std::future::pending().await;
            };
            let draining = &self.draining;
            let accepted = tokio::select! {
                _ = draining.cancelled() => None,
                accepted = TcpListener::accept(listener) => Some(accepted),
            };
            match accepted {
                None => self.inner = None,
                Some(Ok(connection)) => return connection,
                Some(Err(error)) => {
                    // Typically EMFILE: back off rather than spin.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.address)
    }
}

/// Marks responses `Connection: close` while draining.
pub async fn close_connections_when_draining(
    draining: std::sync::Arc<CancellationToken>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if draining.is_cancelled() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
