//! The embedded profile's dedup store: one process, so a map and a
//! notifier. Its memory is bounded by `layers.dedup.memory_max_bytes`:
//! when a new record would pass it, expired records are dropped first; if
//! it is still full the call runs without dedup, as when a remote store is
//! down (the database's one order per (user, key) stands behind it).

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

/// A map entry's own cost beyond its strings (hash slot, allocations).
const ENTRY_OVERHEAD: usize = 160;

impl Entry {
    fn bytes(&self, key: &str) -> usize {
        ENTRY_OVERHEAD
            + key.len()
            + self.fingerprint.len()
            + self.token.len()
            + self.answer.as_ref().map_or(0, StoredAnswer::size)
    }
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, Entry>,
    /// Sum of `Entry::bytes` over `map`.
    bytes: usize,
}

impl Entries {
    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.map.remove(key) {
            self.bytes -= entry.bytes(key);
        }
    }

    fn retain_live(&mut self, now: Instant) {
        let mut bytes = 0;
        self.map.retain(|key, entry| {
            let live = entry.expires > now;
            if live {
                bytes += entry.bytes(key);
            }
            live
        });
        self.bytes = bytes;
    }
}

/// The embedded profile's store: one process, so a map and a notifier.
pub struct MemoryDedup {
    entries: Mutex<Entries>,
    notify: Notify,
    max_bytes: usize,
}

impl Default for MemoryDedup {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl MemoryDedup {
    /// A store holding at most about `max_bytes` of records.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: Mutex::default(),
            notify: Notify::new(),
            max_bytes,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the records take (as `memory_max_bytes` counts them).
    pub fn bytes(&self) -> usize {
        self.entries().bytes
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
    ) -> Result<Claim, String> {
        let now = Instant::now();
        let mut entries = self.entries();
        match entries.map.get(key) {
            Some(entry) if entry.expires > now => Ok(if entry.fingerprint != fingerprint {
                Claim::Mismatch
            } else if let Some(answer) = &entry.answer {
                Claim::Done(answer.clone())
            } else {
                Claim::InFlight
            }),
            _ => {
                entries.remove(key);
                let entry = Entry {
                    fingerprint: fingerprint.to_owned(),
                    token: token.to_owned(),
                    answer,
                    expires: now + lasts,
                };
                let bytes = entry.bytes(key);
                if entries.bytes + bytes > self.max_bytes {
                    entries.retain_live(now);
                    if entries.bytes + bytes > self.max_bytes {
                        return Err(format!(
                            "in-process dedup store full ({} bytes of records)",
                            entries.bytes
                        ));
                    }
                }
                entries.bytes += bytes;
                entries.map.insert(key.to_owned(), entry);
                Ok(Claim::Run)
            }
        }
    }

    /// Forgets lapsed claims and expired answers (bounded memory).
    pub fn sweep(&self) -> usize {
        let mut entries = self.entries();
        entries.retain_live(Instant::now());
        entries.map.len()
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
        self.put_new(key, fingerprint, token, None, in_flight)
    }

    async fn store_first(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<Claim, String> {
        let found = self.put_new(key, fingerprint, "", Some(answer.clone()), ttl)?;
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
        let stored = {
            let mut entries = self.entries();
            let entries = &mut *entries;
            match entries.map.get_mut(key) {
                Some(entry) if entry.token == token => {
                    let before = entry.bytes(key);
                    entry.answer = Some(answer.clone());
                    entry.expires = Instant::now() + ttl;
                    let after = entry.bytes(key);
                    if entries.bytes - before + after > self.max_bytes {
                        // Counted at its size before the answer.
                        entries.bytes -= before;
                        entries.map.remove(key);
                        Err("in-process dedup store full; the answer is not kept".to_owned())
                    } else {
                        entries.bytes = entries.bytes - before + after;
                        Ok(())
                    }
                }
                _ => Ok(()),
            }
        };
        self.notify.notify_waiters();
        stored
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<(), String> {
        {
            let mut entries = self.entries();
            if entries.map.get(key).is_some_and(|e| e.token == token) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records past the byte budget are refused (the call then runs
    /// without dedup); expired ones make room; the count matches the map.
    #[tokio::test]
    async fn the_store_stays_within_its_bytes() {
        let store = MemoryDedup::new(10_000);
        let long = Duration::from_secs(60);
        let mut kept = 0;
        for n in 0..1_000 {
            match store.claim(&format!("k{n}"), "fp", "token", long).await {
                Ok(Claim::Run) => kept += 1,
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
        }
        assert!((30..100).contains(&kept), "kept {kept}");
        assert!(store.bytes() <= 10_000);
        assert!(store.claim("more", "fp", "t", long).await.is_err());
        let short = MemoryDedup::new(10_000);
        for n in 0..kept {
            short
                .claim(&format!("k{n}"), "fp", "token", Duration::from_millis(1))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            short.claim("more", "fp", "t", long).await,
            Ok(Claim::Run),
            "expired records make room"
        );
        assert_eq!(short.sweep(), 1);
    }

    /// An answer that does not fit drops its claim and gives back exactly
    /// the bytes the claim took.
    #[tokio::test]
    async fn a_refused_answer_gives_back_its_claim_bytes() {
        let store = MemoryDedup::new(2_000);
        let long = Duration::from_secs(60);
        assert_eq!(store.claim("k", "fp", "t", long).await, Ok(Claim::Run));
        let answer = StoredAnswer {
            status: 200,
            headers: vec![],
            body: vec![0; 3_000],
            trailers: vec![],
        };
        assert!(store.complete("k", "fp", "t", &answer, long).await.is_err());
        assert_eq!(store.bytes(), 0);
        assert_eq!(store.sweep(), 0);
    }
}
