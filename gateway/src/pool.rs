//! Keep-alive HTTP/1.1 connections to one upstream, shared by every route that names it.
//!
//! A request takes the most recently parked connection (or opens one through the TLS-capable
//! connector) and sends on it with hyper's connection API; the connection goes back to the pool
//! when the response body has been read to its end, never earlier, so a connection is only ever
//! reused between whole exchanges. A response dropped half-read takes its connection with it.
//! Idle connections are closed after `idle_timeout`, at most `max_idle` are kept.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

/// The connector every pool opens connections with: plain TCP, or TLS for `https://`.
pub type Connector = HttpsConnector<HttpConnector>;

type Sender = SendRequest<Full<Bytes>>;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, unresolvable, TLS, connect timeout).
    #[error("cannot connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed or closed during the exchange.
    #[error("exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// The connections to one upstream (`scheme://authority`).
pub struct Pool {
    connector: Connector,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool for `target` (only its scheme and authority count). Must be called inside the
    /// runtime: a task closes idle connections past `idle_timeout` while the pool lives.
    pub fn new(
        connector: Connector,
        target: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            connector,
            target,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        });
        tokio::spawn(reap(Arc::downgrade(&pool), idle_timeout));
        pool
    }

    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(cause = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled or new connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, SendError> {
        // A parked connection may have been closed by the upstream meanwhile; a request that was
        // never written on it goes out on the next one, or on a new connection.
        while let Some(mut sender) = self.checkout() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
        // Boxed: the connect and TLS handshake states are large and rarely needed, and would
        // otherwise be moved around with every request's future.
        let mut sender = Box::pin(self.connect()).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(SendError::Exchange)?;
        Ok(self.wrap(resp, sender))
    }

    fn wrap(self: &Arc<Self>, resp: Response<Incoming>, sender: Sender) -> Response<PooledBody> {
        resp.map(|inner| {
            let mut body = PooledBody {
                inner,
                conn: Some((sender, self.clone())),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }

    /// Connections currently parked (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

async fn reap(pool: Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let timeout = pool.idle_timeout;
        pool.idle
            .lock()
            .expect("pool lock")
            .retain(|i| !i.sender.is_closed() && i.since.elapsed() < timeout);
    }
}

/// An upstream response body that hands its connection back to the pool once read to the end.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<(Sender, Arc<Pool>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("pooled", &self.conn.is_some())
            .finish()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.conn.take() {
            pool.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A broken body leaves the connection in an unknown state: never reuse it.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// An upstream that counts its connections and closes after answering `/close`.
    async fn upstream() -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let close = req.uri().path() == "/close";
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if close {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}/").parse().unwrap(), accepted)
    }

    fn request(path: &str, host: &Uri) -> Request<Full<Bytes>> {
        Request::builder()
            .uri(path)
            .header(http::header::HOST, host.authority().unwrap().as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn connector() -> Connector {
        let tls = crate::tls::client_config(crate::tls::TlsRoots::Webpki, None).unwrap();
        crate::proxy::connector(tls)
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_body_is_read() {
        let (target, accepted) = upstream().await;
        let pool = Pool::new(connector(), target.clone(), 4, Duration::from_secs(60));
        for _ in 0..3 {
            let resp = pool.send(request("/x", &target)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        // A response still being read keeps its connection: a second request opens another.
        let unread = pool.send(request("/x", &target)).await.unwrap();
        let resp = pool.send(request("/x", &target)).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Dropped half-read, the first one is not parked again.
        drop(unread);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        let (target, accepted) = upstream().await;
        let pool = Pool::new(connector(), target.clone(), 4, Duration::from_secs(60));
        let resp = pool.send(request("/close", &target)).await.unwrap();
        resp.into_body().collect().await.unwrap();
        // Let the connection task see the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let resp = pool.send(request("/x", &target)).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let target: Uri = format!("http://{addr}/").parse().unwrap();
        let pool = Pool::new(connector(), target.clone(), 4, Duration::from_secs(60));
        let err = pool.send(request("/x", &target)).await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
    }
}
