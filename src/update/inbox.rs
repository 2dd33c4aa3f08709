//! The newest notice that arrived while an update runs. The agent's main loop puts every notice
//! here; the engine looks at it where an update may still be taken over (downloading, or waiting
//! for a window or a lock before the switch), and the main loop takes what is left once the
//! engine is idle again. Only the latest counts: a newer notice replaces an older one unread.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct NoticeSlot {
    latest: Mutex<Option<Vec<u8>>>,
    notify: Notify,
}

impl NoticeSlot {
    pub fn put(&self, raw: Vec<u8>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(raw);
        self.notify.notify_one();
    }

    /// Put `raw` unless a notice waits already (a newer one wins over one tried again).
    pub fn put_if_empty(&self, raw: Vec<u8>) {
        let mut slot = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(raw);
            drop(slot);
            self.notify.notify_one();
        }
    }

    pub fn take(&self) -> Option<Vec<u8>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The next notice put here (or one waiting already).
    pub async fn next(&self) -> Vec<u8> {
        loop {
            if let Some(raw) = self.take() {
                return raw;
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn latest_wins_and_waiters_wake() {
        let s = Arc::new(NoticeSlot::default());
        s.put(b"one".to_vec());
        s.put(b"two".to_vec());
        assert_eq!(s.next().await, b"two");
        assert_eq!(s.take(), None);
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.put(b"three".to_vec());
        assert_eq!(waiter.await.unwrap(), b"three");
        // A stale wake-up with nothing in the slot keeps waiting.
        s.put(b"four".to_vec());
        assert_eq!(s.take().unwrap(), b"four");
        let r = tokio::time::timeout(Duration::from_millis(50), s.next()).await;
        assert!(r.is_err());
    }
}
