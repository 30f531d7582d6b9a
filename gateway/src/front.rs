//! The front handler every request meets before its route's stack: the caller's token, the
//! route (404 outside every route, never forwarded), dot segments, the body read under the
//! route's size and time bounds, and the request id; plus the gateway's own `/healthz`,
//! `/readyz` and `/metrics`.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use sqlx::PgPool;

use crate::{
    caller::Callers,
    headers::{RequestId, X_REQUEST_ID, request_id},
    problem::Problem,
    proxy::ForwardPath,
    routes::{RouteTable, has_dot_segment},
};

/// What the front handler and the probes share.
pub(crate) struct Shared {
    pub(crate) routes: RouteTable,
    pub(crate) callers: Callers,
    pub(crate) pg: Option<PgPool>,
    pub(crate) redis: Option<redis::aio::MultiplexedConnection>,
}

/// The paths the [`Gateway::router`](crate::Gateway::router) answers itself.
pub(crate) fn is_admin_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

pub(crate) async fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
    .detail("/healthz, /readyz and /metrics answer GET only")
    .into_response()
}

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

pub(crate) async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let check = async {
        if let Some(pool) = &shared.pg {
            // The simple protocol: one round, safe behind a transaction pooler.
            sqlx::raw_sql("SELECT 1")
                .execute(pool)
                .await
                .map_err(|e| format!("postgres: {e}"))?;
        }
        if let Some(conn) = &shared.redis {
            let mut conn = conn.clone();
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => "ready".into_response(),
        Ok(Err(e)) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .detail(e)
            .into_response(),
        Err(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not-ready", "Not ready")
            .detail("store check timed out")
            .into_response(),
    }
}

pub(crate) async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(),
    )
        .into_response()
}

pub(crate) async fn front(State(shared): State<Arc<Shared>>, req: Request<Body>) -> Response {
    let id = request_id(req.headers());
    let mut resp = route_request(&shared, req, id.clone()).await;
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    resp
}

async fn route_request(shared: &Shared, req: Request<Body>, id: HeaderValue) -> Response {
    let started = std::time::Instant::now();
    let refuse = |route: &str, caller: &str, p: Problem| {
        crate::metrics::record_request(route, caller, p.status(), started.elapsed());
        p.into_response()
    };
    let (mut parts, body) = req.into_parts();
    let caller = match shared.callers.identify(&parts.headers) {
        Ok(c) => c,
        Err(p) => return refuse("", "", p),
    };
    if parts.method == http::Method::CONNECT {
        return refuse(
            "",
            &caller.0,
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect-refused",
                "CONNECT is not supported",
            )
            .detail("the gateway is a reverse proxy for its configured routes, not a tunnel"),
        );
    }
    // Only the path is used: an absolute-form target's scheme and authority, and the Host
    // header, never influence where the request goes.
    let path = parts.uri.path();
    let Some((entry, cut)) = shared.routes.find(path) else {
        return refuse(
            "",
            &caller.0,
            Problem::new(StatusCode::NOT_FOUND, "no-route", "No route")
                .detail(format!("no route is configured for {path}")),
        );
    };
    if has_dot_segment(path) {
        return refuse(
            &entry.prefix,
            &caller.0,
            Problem::new(StatusCode::BAD_REQUEST, "bad-path", "Bad request path")
                .detail("'.' and '..' path segments are not forwarded"),
        );
    }
    let rest = &path[cut..];
    let query = parts.uri.query();
    let mut forward = String::with_capacity(rest.len().max(1) + query.map_or(0, |q| q.len() + 1));
    forward.push_str(if rest.is_empty() { "/" } else { rest });
    if let Some(q) = query {
        forward.push('?');
        forward.push_str(q);
    }
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
        )
        .detail(format!(
            "this route accepts at most {} bytes",
            entry.max_body
        ))
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > entry.max_body as u64) {
        return refuse(&entry.prefix, &caller.0, too_large());
    }
    // A request without a body (most GETs) has nothing to read or bound.
    let bytes = if hyper::body::Body::is_end_stream(&body) {
        Bytes::new()
    } else {
        // A client trickling its body must not hold a connection and a buffer forever.
        let read =
            tokio::time::timeout(entry.timeout, Limited::new(body, entry.max_body).collect());
        let Ok(read) = read.await else {
            return refuse(
                &entry.prefix,
                &caller.0,
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body-timeout",
                    "Request body too slow",
                )
                .detail(format!(
                    "the body did not arrive within the route's timeout of {} ms",
                    entry.timeout.as_millis()
                )),
            );
        };
        match read {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(&entry.prefix, &caller.0, too_large());
            }
            Err(e) => {
                return refuse(
                    &entry.prefix,
                    &caller.0,
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "body-unreadable",
                        "Request body unreadable",
                    )
                    .detail(e.to_string()),
                );
            }
        }
    };
    // Keep only the origin form, so the fingerprint does not depend on how the target was written.
    if (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        && let Some(pq) = parts.uri.path_and_query().cloned()
    {
        parts.uri = http::Uri::from(pq);
    }
    parts.extensions.insert(caller);
    parts.extensions.insert(RequestId(id));
    parts.extensions.insert(ForwardPath(forward));
    let req = Request::from_parts(parts, bytes);
    match (entry.service)(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
