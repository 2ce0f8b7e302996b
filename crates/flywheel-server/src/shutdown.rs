//! Graceful shutdown without dropping requests that are already on their way.
//!
//! On SIGTERM the server first *drains*: the listening socket is closed (new
//! connections are refused at once, not left hanging in the backlog), and
//! every response on an existing connection carries `Connection: close`
//! (`AppState::draining`, read by `telemetry::track_http`), so
//! a keep-alive client finishes the request it sent and reconnects elsewhere
//! instead of having its next request cut off. After the drain window the
//! remaining (idle) connections are closed and in-flight requests finish.

use std::io;
use std::net::SocketAddr;

use axum::serve::Listener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The connections hyper serves: everything [`crate::stream_connections`]
/// accepted and did not keep. Its acceptor closes the listening socket once
/// draining starts; then this yields nothing more.
#[derive(Debug)]
pub struct DrainingListener {
    connections: mpsc::Receiver<(TcpStream, SocketAddr)>,
    address: SocketAddr,
}

impl DrainingListener {
    pub fn new(connections: mpsc::Receiver<(TcpStream, SocketAddr)>, address: SocketAddr) -> Self {
        Self {
            connections,
            address,
        }
    }
}

impl Listener for DrainingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // Draining: never accept again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.address)
    }
}
