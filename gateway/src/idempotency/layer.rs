use std::sync::Arc;

use tower::Layer;

use super::{Idempotency, IdempotencySettings, store::RecordStore};

/// Wraps a route's inner stack in [`Idempotency`].
#[derive(Clone)]
pub struct IdempotencyLayer {
    settings: Arc<IdempotencySettings>,
    store: RecordStore,
}

impl IdempotencyLayer {
    /// With a route's settings and the shared store.
    pub fn new(settings: IdempotencySettings, store: RecordStore) -> Self {
        Self {
            settings: Arc::new(settings),
            store,
        }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            settings: self.settings.clone(),
            store: self.store.clone(),
        }
    }
}
