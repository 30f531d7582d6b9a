//! The per-resource lock middleware: requests naming the same resource (an order id from a
//! header, a path segment or a JSON field) reach the upstream one at a time, in arrival order,
//! each with a fencing token that is larger than every token granted before. A lease bounds how
//! long a dead gateway can block a resource; the token lets the upstream refuse a holder whose
//! lease ran out during a pause (the upstream must check it for that guarantee).

pub mod config;
mod key;
mod layer;
pub mod store;

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::response::IntoResponse;
use http::{HeaderName, HeaderValue, StatusCode};
use tower::Service;

pub use key::LockKeySource;
pub use layer::LockLayer;
pub use store::{LockStore, Ticket};

use crate::layer::{Inner, layer_service_types, take_ready};
use crate::{
    config::RouteConfig,
    problem::{self, GatewayRequest, GatewayResponse, Problem},
    proxy::ForwardPath,
};

/// How often a waiter asks the store again when no local release woke it.
const POLL: Duration = Duration::from_millis(25);

/// One route's lock behaviour.
#[derive(Debug, Clone)]
pub struct LockSettings {
    /// Route label; also namespaces lock names.
    pub route: String,
    /// Where the key comes from.
    pub source: LockKeySource,
    /// How long to queue (0: fail fast).
    pub wait_ms: u64,
    /// Lease of a held lock.
    pub lease_ms: u64,
    /// Header carrying the fencing token.
    pub token_header: HeaderName,
}

impl LockSettings {
    /// From a validated route that has a `lock` table.
    pub fn from_route(route: &RouteConfig) -> Option<Self> {
        let lock = route.lock.as_ref()?;
        Some(Self {
            route: route.prefix.clone(),
            source: LockKeySource::parse(&lock.key).expect("validated lock key"),
            wait_ms: lock.wait_ms,
            lease_ms: route.lock_lease_ms(),
            token_header: HeaderName::try_from(lock.token_header.as_str())
                .expect("validated header name"),
        })
    }
}

/// The middleware service.
#[derive(Clone)]
pub struct Lock<S> {
    inner: S,
    settings: Arc<LockSettings>,
    store: LockStore,
}

impl<S: Inner> Service<GatewayRequest> for Lock<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let inner = take_ready(&mut self.inner);
        let settings = self.settings.clone();
        let store = self.store.clone();
        Box::pin(async move { Ok(handle(inner, settings, store, req).await) })
    }
}

async fn handle<S>(
    mut inner: S,
    settings: Arc<LockSettings>,
    store: LockStore,
    mut req: GatewayRequest,
) -> GatewayResponse
where
    S: Service<GatewayRequest, Response = GatewayResponse, Error = Infallible>,
{
    let rest = req
        .extensions()
        .get::<ForwardPath>()
        .map(|p| p.0.as_str())
        .unwrap_or("/");
    let key = match settings.source.extract(req.headers(), rest, req.body()) {
        Ok(k) => k,
        Err(why) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "lock-key-missing",
                "Lock key missing",
            )
            .detail(format!(
                "route {} locks per resource, but {why}",
                settings.route
            ))
            .into_response();
        }
    };
    // The route is part of the name so two routes never share a lock by accident.
    let name = format!("{}\n{}", settings.route, key);
    let started = Instant::now();
    let ticket = match store.enqueue(&name, settings.wait_ms).await {
        Ok(t) => t,
        Err(e) => return problem::store_unavailable("locks", &e).into_response(),
    };
    let mut guard = Release {
        store: store.clone(),
        name: name.clone(),
        ticket: ticket.clone(),
        armed: true,
    };
    let deadline = started + Duration::from_millis(settings.wait_ms);
    let token = loop {
        match store.try_acquire(&name, &ticket, settings.lease_ms).await {
            Ok(Some(token)) => break token,
            Ok(None) => {}
            Err(e) => return problem::store_unavailable("locks", &e).into_response(),
        }
        let now = Instant::now();
        if now >= deadline {
            metrics::counter!("gateway_lock_busy_total", "route" => settings.route.clone())
                .increment(1);
            // Leave the line before answering, so a request arriving right after this one is
            // not queued behind an entry that has already given up.
            guard.armed = false;
            if let Err(e) = store.release(&name, &ticket).await {
                tracing::warn!(cause = %e, "leaving the lock line failed; the entry expires by itself");
            }
            return Problem::new(StatusCode::CONFLICT, "resource-locked", "Resource busy")
                .detail(format!(
                    "another request for `{key}` holds the lock; waited {} ms",
                    settings.wait_ms
                ))
                .retry_after(1)
                .into_response();
        }
        store.wait_turn(POLL.min(deadline - now)).await;
    };
    metrics::histogram!("gateway_lock_wait_seconds", "route" => settings.route.clone())
        .record(started.elapsed().as_secs_f64());
    req.headers_mut()
        .insert(settings.token_header.clone(), HeaderValue::from(token));
    let resp = match inner.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    guard.armed = false;
    if let Err(e) = store.release(&name, &ticket).await {
        tracing::error!(cause = %e, "lock release failed; it frees itself when its lease expires");
    }
    resp
}

/// Gives up a place in line or a held lock when the request ends early (dropped by the timeout
/// above or by a client that went away), instead of blocking the resource until the lease ends.
struct Release {
    store: LockStore,
    name: String,
    ticket: Ticket,
    armed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let name = std::mem::take(&mut self.name);
        let ticket = self.ticket.clone();
        rt.spawn(async move {
            if let Err(e) = store.release(&name, &ticket).await {
                tracing::error!(cause = %e, "lock release failed; it frees itself when its lease expires");
            }
        });
    }
}
