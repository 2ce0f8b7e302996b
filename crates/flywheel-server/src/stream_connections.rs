//! Connections that open a long-lived stream, served without hyper.
//!
//! An idle server-sent-events stream held by hyper costs about 30 KB for as
//! long as it is open: the connection keeps an 8 KB read buffer, an 8 KB
//! header buffer and the dispatcher's state. A connection whose *first*
//! request is a `GET` of a stream route ([`STREAM_PATHS`]) is served here
//! instead: its request head is parsed from a peek (nothing is consumed
//! until the connection is known to be one), the request goes through the
//! same router and middleware as every other request, and the response is
//! written to the socket directly (chunked, `Connection: close`), holding
//! nothing but the response body between events.
//!
//! Every other connection is handed to hyper untouched, including a stream
//! opened on a connection that already carried other requests (a browser
//! reusing a pooled connection): that works as before, at hyper's cost.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri, Version};
use axum::Router;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::routes::growth::PeerAddr;

/// The routes whose responses are long-lived streams.
pub const STREAM_PATHS: [&str; 3] = ["/v1/stream", "/v1/flags/stream", "/v1/events/tail"];
/// The largest request head read from a peek; a bigger one goes to hyper.
const MAX_HEAD: usize = 16 * 1024;
/// How long a new connection may take to send its request head before it
/// is handed to hyper (which then applies its own rules).
const HEAD_WAIT: Duration = Duration::from_secs(10);
/// Between peeks at a head that arrived in pieces.
const PARTIAL_HEAD_RETRY: Duration = Duration::from_millis(2);
/// A client that accepts nothing for this long is disconnected (the hub
/// has cut it off by then anyway).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `draining`: stream connections are served
/// here (tracked by `tracker`), the rest are sent to `to_hyper`.
pub async fn accept(
    listener: TcpListener,
    draining: CancellationToken,
    to_hyper: mpsc::Sender<(TcpStream, SocketAddr)>,
    router: Router,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = draining.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((connection, peer)) => {
                tracker.spawn(route(connection, peer, to_hyper.clone(), router.clone()));
            }
            Err(error) => {
                // Typically EMFILE: back off rather than spin.
                tracing::warn!(error = %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn route(
    connection: TcpStream,
    peer: SocketAddr,
    to_hyper: mpsc::Sender<(TcpStream, SocketAddr)>,
    router: Router,
) {
    match stream_request(&connection).await {
        Some((request, head_len)) => serve(connection, peer, *request, head_len, router).await,
        // Anything else, including a connection closed or failed before
        // its head: hyper's, which answers or closes it as it always does.
        // The send fails only when the server is draining: the client
        // retries elsewhere.
        None => {
            let _ = to_hyper.send((connection, peer)).await;
        }
    }
}

/// Peeks at a new connection until its first request head is complete, or
/// it is clearly not a stream request, or [`HEAD_WAIT`] passes. The stream
/// request and its head's length, if it is one.
async fn stream_request(connection: &TcpStream) -> Option<(Box<Request<Body>>, usize)> {
    let deadline = tokio::time::Instant::now() + HEAD_WAIT;
    // Most connections are told apart by their first bytes: no buffer for
    // a whole head is allocated for them.
    let mut first = [0u8; 32];
    let peeked = tokio::time::timeout_at(deadline, connection.peek(&mut first))
        .await
        .ok()?
        .ok()?;
    if peeked == 0 || matches!(parse_head(&first[..peeked]), Peeked::Other) {
        return None;
    }
    let mut buffer = vec![0u8; MAX_HEAD];
    loop {
        let peeked = tokio::time::timeout_at(deadline, connection.peek(&mut buffer))
            .await
            .ok()?
            .ok()?;
        match parse_head(&buffer[..peeked]) {
            Peeked::Stream { request, head_len } => return Some((request, head_len)),
            Peeked::Other => return None,
            Peeked::Partial if peeked == buffer.len() => return None,
            Peeked::Partial => {
                // A peek returns at once while data waits, so wait for more
                // by time rather than by readiness.
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(PARTIAL_HEAD_RETRY).await;
            }
        }
    }
}

/// The reading of a peeked request head.
#[derive(Debug)]
enum Peeked {
    Stream {
        request: Box<Request<Body>>,
        head_len: usize,
    },
    Other,
    Partial,
}

fn is_stream_target(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    STREAM_PATHS.contains(&path)
}

fn parse_head(bytes: &[u8]) -> Peeked {
    const GET: &[u8] = b"GET ";
    let prefix = bytes.len().min(GET.len());
    if bytes[..prefix] != GET[..prefix] {
        return Peeked::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Request::new(&mut headers);
    let head_len = match head.parse(bytes) {
        Err(_) => return Peeked::Other,
        Ok(httparse::Status::Partial) => {
            return match head.path {
                Some(target) if !is_stream_target(target) => Peeked::Other,
                _ => Peeked::Partial,
            };
        }
        Ok(httparse::Status::Complete(head_len)) => head_len,
    };
    let (Some(target), Some(version)) = (head.path, head.version) else {
        return Peeked::Other;
    };
    if !is_stream_target(target) {
        return Peeked::Other;
    }
    let Ok(uri) = target.parse::<Uri>() else {
        return Peeked::Other;
    };
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    for field in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Peeked::Other;
        };
        // A body or a protocol switch is not a stream request: hyper's.
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return Peeked::Other;
        }
        request.headers_mut().append(name, value);
    }
    Peeked::Stream {
        request: Box::new(request),
        head_len,
    }
}

async fn serve(
    mut connection: TcpStream,
    peer: SocketAddr,
    mut request: Request<Body>,
    head_len: usize,
    router: Router,
) {
    // The head was read by peeking: consume it now.
    if discard(&mut connection, head_len).await.is_err() {
        return;
    }
    // Events are small and latency matters more than packet count.
    let _ = connection.set_nodelay(true);
    request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
    let chunked = request.version() != Version::HTTP_10;
    let Ok(response) = router.oneshot(request).await;
    let (parts, body) = response.into_parts();
    let (mut reader, mut writer) = connection.split();
    let head = encode_head(&parts, chunked);
    if write(&mut writer, &head).await.is_err() {
        return;
    }
    drop(head);
    let mut body = body.into_data_stream();
    // The client sends nothing more; a read only tells when it has gone.
    let mut probe = [0u8; 32];
    loop {
        tokio::select! {
            frame = body.next() => match frame {
                Some(Ok(bytes)) if bytes.is_empty() => {}
                Some(Ok(bytes)) => {
                    let sent = if chunked {
                        write(&mut writer, &encode_chunk(&bytes)).await
                    } else {
                        write(&mut writer, &bytes).await
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                // A failed body ends without the last chunk, so the client
                // sees a broken stream rather than a finished one.
                Some(Err(_)) => return,
                None => break,
            },
            read = reader.read(&mut probe) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
        }
    }
    if chunked {
        let _ = write(&mut writer, b"0\r\n\r\n").await;
    }
    let _ = writer.shutdown().await;
}

async fn discard(connection: &mut TcpStream, len: usize) -> io::Result<()> {
    let mut head = vec![0u8; len];
    connection.read_exact(&mut head).await.map(|_| ())
}

async fn write(writer: &mut tokio::net::tcp::WriteHalf<'_>, bytes: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// The status line and headers, with the framing this module uses.
fn encode_head(parts: &axum::http::response::Parts, chunked: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\nconnection: close\r\n");
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn encode_chunk(data: &[u8]) -> Vec<u8> {
    let size = format!("{:x}\r\n", data.len());
    let mut chunk = Vec::with_capacity(size.len() + data.len() + 2);
    chunk.extend_from_slice(size.as_bytes());
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(b"\r\n");
    chunk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(peeked: Peeked) -> (Request<Body>, usize) {
        match peeked {
            Peeked::Stream { request, head_len } => (*request, head_len),
            other => panic!("expected a stream request, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_stream_head_is_read_with_its_length_and_headers() {
        let head = b"GET /v1/stream?user_id=alice&key=pk_x HTTP/1.1\r\nHost: a\r\nLast-Event-ID: 7\r\n\r\n";
        let (request, head_len) = stream(parse_head(head));
        assert_eq!(head_len, head.len());
        assert_eq!(request.uri().path(), "/v1/stream");
        assert_eq!(request.uri().query(), Some("user_id=alice&key=pk_x"));
        assert_eq!(request.headers()["last-event-id"], "7");
        assert_eq!(request.version(), Version::HTTP_11);
    }

    #[test]
    fn bytes_after_the_head_are_not_part_of_it() {
        let head = b"GET /v1/flags/stream HTTP/1.0\r\n\r\n";
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\n");
        let (request, head_len) = stream(parse_head(&bytes));
        assert_eq!(head_len, head.len());
        assert_eq!(request.version(), Version::HTTP_10);
    }

    #[test]
    fn other_requests_are_recognised_from_their_first_bytes() {
        for bytes in [
            &b"P"[..],
            b"POST /v1/stream HTTP/1.1\r\n",
            b"GET /healthz HTTP/1.1\r\n",
            b"GET /v1/streams HTTP/1.1\r\n\r\n",
            b"GET /v1/stream/ HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /v1/stream HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /v1/stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /v1/stream HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /v1/stream HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET http://a/v1/stream HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bytes), Peeked::Other),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn a_head_that_may_still_be_a_stream_waits_for_more() {
        for bytes in [
            &b"G"[..],
            b"GET ",
            b"GET /v1/str",
            b"GET /v1/stream?user_id=a HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(
                matches!(parse_head(bytes), Peeked::Partial),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn an_empty_content_length_is_still_a_stream_request() {
        stream(parse_head(
            b"GET /v1/events/tail HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ));
    }

    #[test]
    fn the_head_carries_the_response_headers_and_this_framing() {
        let response = axum::http::Response::builder()
            .status(401)
            .header("content-type", "application/json")
            .header("content-length", "10")
            .header("connection", "keep-alive")
            .body(())
            .unwrap();
        let (parts, ()) = response.into_parts();
        let head = String::from_utf8(encode_head(&parts, true)).unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
        assert!(head.contains("content-type: application/json\r\n"));
        assert!(head.contains("connection: close\r\n"));
        assert!(head.contains("transfer-encoding: chunked\r\n"));
        assert!(!head.contains("content-length"));
        assert!(!head.contains("keep-alive"));
        assert!(head.ends_with("\r\n\r\n"));
        let plain = String::from_utf8(encode_head(&parts, false)).unwrap();
        assert!(!plain.contains("transfer-encoding"));
    }

    #[test]
    fn a_chunk_is_its_hex_size_then_the_data() {
        assert_eq!(encode_chunk(b"data: hi\n\n"), b"a\r\ndata: hi\n\n\r\n");
        assert_eq!(encode_chunk(&[b'x'; 255])[..4], *b"ff\r\n");
    }
}
