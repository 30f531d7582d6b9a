use std::sync::Arc;

use tower::Layer;

use super::{Lock, LockSettings, store::LockStore};

/// Wraps a route's inner stack in [`Lock`].
#[derive(Clone)]
pub struct LockLayer {
    settings: Arc<LockSettings>,
    store: LockStore,
}

impl LockLayer {
    /// With a route's settings and the shared store.
    pub fn new(settings: LockSettings, store: LockStore) -> Self {
        Self {
            settings: Arc::new(settings),
            store,
        }
    }
}

impl<S> Layer<S> for LockLayer {
    type Service = Lock<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock {
            inner,
            settings: self.settings.clone(),
            store: self.store.clone(),
        }
    }
}
