//! The `Idempotency-Key` middleware (IETF draft "The Idempotency-Key HTTP Header Field").
//!
//! A request carrying a key claims a record before it is forwarded. While the record is in
//! flight, the same key answers 409; once completed, the stored response is replayed with
//! `Idempotent-Replayed: true`; the key with another method, path or body answers 422. If this
//! service's future is dropped before the upstream answered (the route timeout fired above it,
//! or the client went away) a guard settles the record in the background as the route says:
//! a stored 504 or a released key.

pub mod config;
mod key;
mod layer;
pub mod postgres;
pub mod redis;
pub mod store;

use std::{convert::Infallible, sync::Arc};

use axum::{body::Body, response::IntoResponse};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use tower::Service;
use uuid::Uuid;

pub use key::{MAX_KEY_LEN, fingerprint, parse_sf_string, upstream_key};
pub use layer::IdempotencyLayer;
pub use store::{Begin, RecordSpec, RecordStore, StoreError, StoredResponse};

use self::config::OutcomePolicy;
use crate::layer::{Inner, layer_service_types, take_ready};
use crate::{
    caller::Caller,
    config::RouteConfig,
    headers::strip_hop_by_hop,
    problem::{self, GatewayProblem, GatewayRequest, GatewayResponse, Problem, UpstreamOutcome},
};

/// The header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on a replayed response.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Put in a request's extensions when an idempotency key is attached: the request may be
/// retried because the upstream receives the same key each time.
#[derive(Debug, Clone, Copy)]
pub struct KeyAttached;

/// One route's idempotency behaviour.
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// Route label for logs and metrics.
    pub route: String,
    /// A covered request without a key is refused.
    pub required: bool,
    /// Methods covered.
    pub methods: Vec<Method>,
    /// Record lifetime.
    pub ttl_secs: u64,
    /// Lease of an in-flight record.
    pub lease_ms: u64,
    /// The route timeout: by then a live owner has settled its record.
    pub timeout_ms: u64,
    /// 5xx handling.
    pub server_errors: OutcomePolicy,
    /// Timeout handling.
    pub timeouts: OutcomePolicy,
    /// Largest stored response.
    pub max_response_bytes: usize,
}

impl IdempotencySettings {
    /// From a validated route that has an `idempotency` table.
    pub fn from_route(route: &RouteConfig) -> Option<Self> {
        let idem = route.idempotency.as_ref()?;
        Some(Self {
            route: route.prefix.clone(),
            required: idem.required,
            methods: idem
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("validated method"))
                .collect(),
            ttl_secs: idem.ttl_secs,
            lease_ms: route.idempotency_lease_ms(),
            timeout_ms: route.timeout_ms,
            server_errors: idem.server_errors,
            timeouts: idem.timeouts,
            max_response_bytes: idem.max_response_bytes,
        })
    }
}

/// The middleware service.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    settings: Arc<IdempotencySettings>,
    store: RecordStore,
}

impl<S: Inner> Service<GatewayRequest> for Idempotency<S> {
    layer_service_types!();

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let inner = take_ready(&mut self.inner);
        let settings = self.settings.clone();
        let store = self.store.clone();
        Box::pin(async move { Ok(handle(inner, settings, store, req).await) })
    }
}

fn bad_key(detail: impl Into<String>) -> GatewayResponse {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "idempotency-key-invalid",
        "Invalid Idempotency-Key",
    )
    .detail(detail)
    .into_response()
}

async fn handle<S>(
    mut inner: S,
    settings: Arc<IdempotencySettings>,
    store: RecordStore,
    mut req: GatewayRequest,
) -> GatewayResponse
where
    S: Service<GatewayRequest, Response = GatewayResponse, Error = Infallible>,
{
    if !settings.methods.contains(req.method()) {
        return call(&mut inner, req).await;
    }
    let mut values = req.headers().get_all(&IDEMPOTENCY_KEY).iter();
    let key = match (values.next(), values.next()) {
        (None, _) if settings.required => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency-key-missing",
                "Idempotency-Key required",
            )
            .detail(format!(
                "{} requests on {} must carry an Idempotency-Key header",
                req.method(),
                settings.route
            ))
            .into_response();
        }
        (None, _) => return call(&mut inner, req).await,
        (Some(_), Some(_)) => return bad_key("the Idempotency-Key header must appear once"),
        (Some(v), None) => match parse_sf_string(v.as_bytes()) {
            Ok(k) => k,
            Err(why) => return bad_key(format!("Idempotency-Key {why}")),
        },
    };
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let spec = RecordSpec {
        caller: caller.0.to_string(),
        key,
        fingerprint: fingerprint(req.method(), path, req.body()),
        lease_ms: settings.lease_ms,
        settle_ms: settings.timeout_ms,
        ttl_secs: settings.ttl_secs,
    };
    let conflict = |kind: &'static str| {
        metrics::counter!("gateway_idempotency_conflicts_total", "route" => settings.route.clone(), "caller" => spec.caller.clone(), "kind" => kind)
            .increment(1);
    };
    let token = match store.begin(&spec).await {
        Err(err) => {
            tracing::error!(cause = %err, route = %settings.route, "idempotency store failed");
            return problem::store_unavailable("idempotency records", &err).into_response();
        }
        Ok(Begin::Started { token }) => token,
        Ok(Begin::Mismatch) => {
            conflict("mismatch");
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused with another request",
            )
            .detail("this key was first used with another method, path or body")
            .into_response();
        }
        Ok(Begin::InFlight {
            lease_left_ms,
            outcome_unknown,
        }) => {
            let kind = if outcome_unknown {
                "outcome_unknown"
            } else {
                "in_flight"
            };
            conflict(kind);
            let problem = Problem::new(
                StatusCode::CONFLICT,
                "idempotency-key-in-flight",
                "A request with this Idempotency-Key is in progress",
            );
            return if outcome_unknown {
                problem
                    .detail(format!(
                        "outcome unknown: the gateway handling the first request stopped before it finished; the key may be retried when its lease expires in {lease_left_ms} ms"
                    ))
                    .retry_after(lease_left_ms.div_ceil(1000))
                    .into_response()
            } else {
                problem
                    .detail("the first request with this key has not finished; retry shortly")
                    .retry_after(1)
                    .into_response()
            };
        }
        Ok(Begin::Completed(stored)) => {
            metrics::counter!("gateway_idempotency_replays_total", "route" => settings.route.clone(), "caller" => spec.caller.clone())
                .increment(1);
            return replay(stored);
        }
    };

    let upstream = upstream_key(&spec.caller, &spec.key);
    req.headers_mut().insert(
        IDEMPOTENCY_KEY.clone(),
        HeaderValue::try_from(upstream).expect("hex digest is a valid header value"),
    );
    req.extensions_mut().insert(KeyAttached);
    let mut guard = Settle {
        store: store.clone(),
        spec: spec.clone(),
        token,
        timeouts: settings.timeouts,
        timeout_ms: settings.timeout_ms,
        armed: true,
    };
    let resp = call(&mut inner, req).await;
    let from_upstream = resp.extensions().get::<UpstreamOutcome>().is_some();
    let gateway_made = resp.extensions().get::<GatewayProblem>().is_some();
    let keep = from_upstream
        && !(resp.status().is_server_error() && settings.server_errors == OutcomePolicy::Release);
    // An answer the gateway made below this layer without reaching the upstream (the lock was
    // busy, a lock key was missing) says nothing about the request's effect: free the key.
    let keep = keep || (!from_upstream && !gateway_made);
    let (parts, body) = resp.into_parts();
    let bytes = match Limited::new(body, settings.max_response_bytes)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(err) => {
            guard.armed = false;
            if let Err(e) = store.release(&spec, token).await {
                tracing::error!(cause = %e, "idempotency release failed");
            }
            return Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-response-unstorable",
                "Upstream response could not be stored",
            )
            .detail(format!(
                "reading the upstream response failed or it exceeded {} bytes: {err}",
                settings.max_response_bytes
            ))
            .into_response();
        }
    };
    guard.armed = false;
    if keep {
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            headers: storable_headers(&parts.headers),
            body: bytes.to_vec(),
        };
        match store.complete(&spec, token, &stored).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                route = %settings.route,
                "idempotency record was taken over before completion (lease too short?)"
            ),
            Err(e) => tracing::error!(cause = %e, "storing idempotent response failed"),
        }
    } else if let Err(e) = store.release(&spec, token).await {
        tracing::error!(cause = %e, "idempotency release failed");
    }
    http::Response::from_parts(parts, Body::from(bytes))
}

async fn call<S>(inner: &mut S, req: GatewayRequest) -> GatewayResponse
where
    S: Service<GatewayRequest, Response = GatewayResponse, Error = Infallible>,
{
    match inner.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn storable_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    h.remove(http::header::DATE);
    h.remove(http::header::CONTENT_LENGTH);
    h.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

fn replay(stored: StoredResponse) -> GatewayResponse {
    let mut resp = http::Response::new(Body::from(stored.body));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    for (k, v) in stored.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            h.append(k, v);
        }
    }
    h.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    resp
}

/// Settles a record whose request future was dropped mid-flight.
struct Settle {
    store: RecordStore,
    spec: RecordSpec,
    token: Uuid,
    timeouts: OutcomePolicy,
    timeout_ms: u64,
    armed: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let spec = self.spec.clone();
        let token = self.token;
        let policy = self.timeouts;
        let timeout_ms = self.timeout_ms;
        rt.spawn(async move {
            let result = match policy {
                OutcomePolicy::Release => store.release(&spec, token).await,
                OutcomePolicy::Store => {
                    let p = problem::upstream_timeout(timeout_ms);
                    let stored = StoredResponse {
                        status: p.status().as_u16(),
                        headers: vec![(
                            "content-type".into(),
                            http_common::problem::CONTENT_TYPE.into(),
                        )],
                        body: serde_json::to_vec(&p.body()).unwrap_or_default(),
                    };
                    store.complete(&spec, token, &stored).await
                }
            };
            if let Err(e) = result {
                tracing::error!(cause = %e, "settling an interrupted idempotent request failed; the key stays blocked until its lease expires");
            }
        });
    }
}
