//! The embedded profile's dedup store: one process, so a map and a
//! notifier.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use tokio::{sync::Notify, time::Instant};

use super::{Claim, DedupStore, StoredAnswer};

struct Entry {
    fingerprint: String,
    token: String,
    answer: Option<StoredAnswer>,
    expires: Instant,
}

/// The embedded profile's store: one process, so a map and a notifier.
#[derive(Default)]
pub struct MemoryDedup {
    entries: Mutex<HashMap<String, Entry>>,
    notify: Notify,
}

impl MemoryDedup {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a record for `key` unless a live one is there, and says
    /// what the live one means for this request.
    fn put_new(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        answer: Option<StoredAnswer>,
        lasts: Duration,
    ) -> Claim {
        let now = Instant::now();
        let mut entries = self.entries();
        match entries.get(key) {
            Some(entry) if entry.expires > now => {
                if entry.fingerprint != fingerprint {
                    Claim::Mismatch
                } else if let Some(answer) = &entry.answer {
                    Claim::Done(answer.clone())
                } else {
                    Claim::InFlight
                }
            }
            _ => {
                entries.insert(
                    key.to_owned(),
                    Entry {
                        fingerprint: fingerprint.to_owned(),
                        token: token.to_owned(),
                        answer,
                        expires: now + lasts,
                    },
                );
                Claim::Run
            }
        }
    }

    /// Forgets lapsed claims and expired answers (bounded memory).
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut entries = self.entries();
        entries.retain(|_, entry| entry.expires > now);
        entries.len()
    }
}

#[async_trait]
impl DedupStore for MemoryDedup {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        in_flight: Duration,
    ) -> Result<Claim, String> {
        Ok(self.put_new(key, fingerprint, token, None, in_flight))
    }

    async fn store_first(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<Claim, String> {
        let found = self.put_new(key, fingerprint, "", Some(answer.clone()), ttl);
        if found == Claim::Run {
            self.notify.notify_waiters();
        }
        Ok(found)
    }

    async fn complete(
        &self,
        key: &str,
        _fingerprint: &str,
        token: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<(), String> {
        if let Some(entry) = self.entries().get_mut(key) {
            if entry.token == token {
                entry.answer = Some(answer.clone());
                entry.expires = Instant::now() + ttl;
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<(), String> {
        {
            let mut entries = self.entries();
            if entries.get(key).is_some_and(|e| e.token == token) {
                entries.remove(key);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn changed(&self) {
        // Bounded: a notification between the waiter's claim and this
        // call is missed, so look again soon anyway.
        let _ = tokio::time::timeout(Duration::from_millis(20), self.notify.notified()).await;
    }
}
