//! Ordered mode: one lane per ordering key. A lane runs its key's deliveries one after another
//! in arrival order; lanes of different keys run concurrently (bounded by the consumer's
//! concurrency). A lane exists only while its key has work, so memory follows the keys in
//! flight, not every key ever seen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use lapin::message::Delivery;
use tokio_util::task::TaskTracker;

use crate::context::{Session, Shared};
use crate::settle;

#[derive(Default)]
pub(crate) struct Lanes {
    waiting: Mutex<HashMap<String, VecDeque<Delivery>>>,
}

impl Lanes {
    /// Queues `delivery` behind its key's running lane, or starts a lane for it.
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        key: String,
        delivery: Delivery,
        shared: &Arc<Shared>,
        session: &Arc<Session>,
        tracker: &TaskTracker,
    ) {
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(queue) = waiting.get_mut(&key) {
                queue.push_back(delivery);
                return;
            }
            waiting.insert(key.clone(), VecDeque::new());
        }
        let lanes = Arc::clone(self);
        let shared = Arc::clone(shared);
        let session = Arc::clone(session);
        tracker.spawn(async move {
            let mut next = Some(delivery);
            while let Some(delivery) = next {
                settle::handle(Arc::clone(&shared), Arc::clone(&session), delivery).await;
                next = lanes.next_for(&key, session.stop.is_cancelled());
            }
        });
    }

    /// The key's next delivery, or `None` after closing the lane. When the session is
    /// stopping, the waiting deliveries are dropped unacked: the broker requeues them in order.
    fn next_for(&self, key: &str, stopping: bool) -> Option<Delivery> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let queue = waiting.get_mut(key)?;
        match queue.pop_front() {
            Some(delivery) if !stopping => Some(delivery),
            _ => {
                waiting.remove(key);
                None
            }
        }
    }
}
