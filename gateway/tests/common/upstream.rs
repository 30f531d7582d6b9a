//! A real HTTP upstream on 127.0.0.1:0 that records what reaches it.
//!
//! Behaviour is chosen by the request: `?delay_ms=N` answers after N ms, `?status=N` answers
//! with that status, path `/hold...` waits until [`Upstream::release_holds`], path `/redirect`
//! answers 302. Every request is counted, and concurrency is tracked overall and per
//! `X-Order-Id`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use tokio::net::TcpListener;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Inner {
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    per_order: Mutex<HashMap<String, (usize, usize)>>,
    seen: Mutex<Vec<Seen>>,
    holding: AtomicBool,
    held: AtomicUsize,
    fail: AtomicBool,
}

/// A running upstream.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Self::serve(listener)
    }

    /// On a fixed address, when it is free.
    pub async fn start_on(addr: &str) -> Option<Self> {
        Some(Self::serve(TcpListener::bind(addr).await.ok()?))
    }

    fn serve(listener: TcpListener) -> Self {
        let inner = Arc::new(Inner {
            holding: AtomicBool::new(true),
            ..Inner::default()
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that reached it.
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// Most requests it ever handled at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// Most requests for one `X-Order-Id` it ever handled at once.
    pub fn max_in_flight_for(&self, order: &str) -> usize {
        self.inner
            .per_order
            .lock()
            .unwrap()
            .get(order)
            .map(|e| e.1)
            .unwrap_or(0)
    }

    /// Requests currently waiting in `/hold`.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Lets every `/hold` request (present and future) answer.
    pub fn release_holds(&self) {
        self.inner.holding.store(false, Ordering::SeqCst);
    }

    /// While set, every request is answered 500.
    pub fn set_failing(&self, fail: bool) {
        self.inner.fail.store(fail, Ordering::SeqCst);
    }

    /// Everything it saw, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }
}

struct Track {
    inner: Arc<Inner>,
    order: Option<String>,
}

impl Drop for Track {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(o) = &self.order {
            self.inner.per_order.lock().unwrap().get_mut(o).unwrap().0 -= 1;
        }
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let n = inner.hits.fetch_add(1, Ordering::SeqCst) + 1;
    inner.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        uri: uri.to_string(),
        headers: headers.clone(),
        body: body.clone(),
    });
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let order = headers
        .get("x-order-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(o) = &order {
        let mut map = inner.per_order.lock().unwrap();
        let e = map.entry(o.clone()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }
    let _track = Track {
        inner: inner.clone(),
        order,
    };
    if uri.path().starts_with("/hold") {
        inner.held.fetch_add(1, Ordering::SeqCst);
        while inner.holding.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        inner.held.fetch_sub(1, Ordering::SeqCst);
    }
    if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if uri.path() == "/redirect" {
        return (
            StatusCode::FOUND,
            [("location", "http://127.0.0.1:1/elsewhere")],
        )
            .into_response();
    }
    if inner.fail.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "failing").into_response();
    }
    let status = q
        .get("status")
        .and_then(|v| v.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut resp = (
        status,
        [("content-type", "application/json"), ("x-upstream", "yes")],
        serde_json::json!({ "n": n, "path": uri.path() }).to_string(),
    )
        .into_response();
    if let Some(ra) = q.get("retry_after") {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    resp
}
