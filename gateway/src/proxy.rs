//! The innermost service: sends a request to its route's upstream and nothing else. The target is
//! always built from the configured upstream plus the path after the route prefix, so neither an
//! absolute-form request target nor a `Host` header can point the gateway at another host, and
//! redirects are handed back to the client, never followed.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, response::IntoResponse};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;
use tracing::Instrument;

use crate::{
    config::{RouteConfig, Upstream, parse_upstream},
    headers::{RequestId, X_REQUEST_ID, strip_hop_by_hop},
    pool::{Connector, Pool},
    problem::{GatewayRequest, GatewayResponse, Problem, UpstreamOutcome},
};

/// The part of the request path after the route prefix, with the query, put in the request's
/// extensions by the front handler (`/pay/x?a=1` on route `/pay` gives `/x?a=1`).
#[derive(Debug, Clone)]
pub struct ForwardPath(pub String);

/// Builds the connector every upstream pool dials with: plain HTTP, or TLS with `tls` for
/// `https://` upstreams.
pub fn connector(tls: rustls::ClientConfig) -> Connector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    // The TLS wrapper decides by scheme; the inner connector must accept https URIs.
    http.enforce_http(false);
    HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The pool for an upstream: up to 64 idle keep-alive connections, closed after 60 s idle.
pub fn pool(connector: Connector, upstream: &Upstream) -> Arc<Pool> {
    let target = Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query("/")
        .build()
        .expect("validated upstream");
    Pool::new(connector, target, 64, Duration::from_secs(60))
}

/// Forwards to one upstream.
#[derive(Clone)]
pub struct Proxy(Arc<Route>);

/// What a [`Proxy`] needs per request, behind one `Arc`.
struct Route {
    pool: Arc<Pool>,
    upstream: Upstream,
    forward_authorization: bool,
    set_headers: HeaderMap,
    host: HeaderValue,
}

impl Proxy {
    /// For a validated route.
    pub fn new(pool: Arc<Pool>, route: &RouteConfig) -> Self {
        let upstream = parse_upstream(&route.upstream).expect("validated upstream");
        let mut set_headers = HeaderMap::new();
        for (k, v) in &route.set_headers {
            set_headers.insert(
                HeaderName::try_from(k.as_str()).expect("validated header name"),
                HeaderValue::try_from(v.as_str()).expect("validated header value"),
            );
        }
        // What the client would derive from the URI on every request: the host, and the port
        // unless it is the scheme's default.
        let default_port = if upstream.scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match upstream.authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", upstream.authority.host()),
            _ => upstream.authority.host().to_owned(),
        };
        let host = HeaderValue::try_from(host).expect("an authority is a valid Host value");
        Self(Arc::new(Route {
            pool,
            host,
            upstream,
            forward_authorization: route.forward_authorization,
            set_headers,
        }))
    }
}

impl Service<GatewayRequest> for Proxy {
    type Response = GatewayResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<GatewayResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pooled client queues internally; readiness is always immediate.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GatewayRequest) -> Self::Future {
        let route = self.0.clone();
        Box::pin(async move { Ok(route.forward(req).await) })
    }
}

impl Route {
    async fn forward(&self, req: GatewayRequest) -> GatewayResponse {
        let (mut parts, body) = req.into_parts();
        let rest = parts
            .extensions
            .remove::<ForwardPath>()
            .map(|p| p.0)
            .unwrap_or_else(|| "/".into());
        let target = if self.upstream.base_path.is_empty() {
            rest
        } else {
            let mut t = String::with_capacity(self.upstream.base_path.len() + rest.len());
            t.push_str(&self.upstream.base_path);
            t.push_str(&rest);
            t
        };
        // Origin form on the wire; the connection itself goes to the configured upstream.
        let uri = match http::uri::PathAndQuery::try_from(target) {
            Ok(pq) => Uri::from(pq),
            Err(e) => {
                return Problem::new(StatusCode::BAD_REQUEST, "bad-path", "Bad request path")
                    .detail(e.to_string())
                    .into_response();
            }
        };
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers);
        headers.insert(header::HOST, self.host.clone());
        // The body is already read in full; a 100-continue handshake with the upstream would
        // only add a round trip.
        headers.remove(header::EXPECT);
        if !self.forward_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        if let Some(id) = parts.extensions.get::<RequestId>() {
            headers.insert(X_REQUEST_ID.clone(), id.0.clone());
        }
        for (k, v) in self.set_headers.iter() {
            headers.insert(k.clone(), v.clone());
        }
        // One span per upstream attempt (a retry is a sibling); the upstream gets its context
        // as `traceparent`. Without span export the caller's `traceparent` passes unchanged.
        let span = tracing::info_span!(
            "upstream",
            otel.name = "gateway.upstream",
            otel.kind = "client",
            upstream = %self.upstream.authority,
            method = %parts.method,
        );
        telemetry::inject_http(&span, &mut headers);
        let mut out = http::Request::new(Full::new(body));
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;
        match self.pool.send(out).instrument(span).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The client's connection has its own protocol version; the upstream's (maybe
                // HTTP/1.0) must not leak into it.
                parts.version = http::Version::default();
                let outcome = if parts.status.is_server_error() {
                    UpstreamOutcome::Failure
                } else {
                    UpstreamOutcome::Success
                };
                parts.extensions.insert(outcome);
                http::Response::from_parts(parts, Body::new(body))
            }
            Err(err) => {
                tracing::warn!(upstream = %self.upstream.authority, cause = %error_chain(&err), "upstream request failed");
                let detail = if err.is_connect() {
                    format!("cannot connect to upstream {}", self.upstream.authority)
                } else {
                    format!(
                        "upstream {} closed the exchange before answering",
                        self.upstream.authority
                    )
                };
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unreachable",
                    "Bad gateway",
                )
                .detail(detail)
                .outcome(UpstreamOutcome::Failure)
                .into_response()
            }
        }
    }
}

/// "client error (Connect)" alone hides the cause (refused, DNS, certificate): print the chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
