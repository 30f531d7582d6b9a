//! What every layer of a route's stack shares as a tower `Service`: the request and response
//! types ([`GatewayRequest`] in, [`GatewayResponse`] out, never an error), the boxed future,
//! readiness taken from the inner service, and the tower way of calling the instance that
//! `poll_ready` made ready ([`take_ready`]).

use std::convert::Infallible;

use futures::future::BoxFuture;
use tower::Service;

use crate::problem::{GatewayRequest, GatewayResponse};

/// The future every layer returns.
pub type GatewayFuture = BoxFuture<'static, Result<GatewayResponse, Infallible>>;

/// The rest of the route's stack, as a layer sees it.
pub trait Inner:
    Service<GatewayRequest, Response = GatewayResponse, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S
where
    S: Service<GatewayRequest, Response = GatewayResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
}

/// The instance `poll_ready` made ready, leaving a fresh clone behind for the next call (as
/// tower-service's docs show; cloning inside `call` would use a service nobody polled).
pub fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// The associated types of a layer's `Service` and its `poll_ready`, which asks the inner
/// service (a layer that holds requests back does it in `call`, answering with a response).
macro_rules! layer_service_types {
    () => {
        type Response = $crate::problem::GatewayResponse;
        type Error = ::std::convert::Infallible;
        type Future = $crate::layer::GatewayFuture;

        fn poll_ready(
            &mut self,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<Result<(), ::std::convert::Infallible>> {
            self.inner.poll_ready(cx)
        }
    };
}
pub(crate) use layer_service_types;
