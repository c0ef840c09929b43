//! WatchReservation. Each watched reservation has one feed per replica,
//! shared by all its watchers: one task hears the replica's events and, for
//! a WAITLISTED reservation (whose hand-off may happen on another replica),
//! reads it again once per [`WAITLIST_WATCH_POLL`], however many callers
//! watch it. The feed ends when its last watcher goes (a caller that hangs
//! up drops its stream), so nothing polls for callers who left. Open
//! watches are capped per replica and per user (`reservations.max_watches`,
//! `max_watches_per_user`); beyond, RESOURCE_EXHAUSTED.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use tokio::sync::{broadcast, watch};

use crate::{
    domain::{Reservation, ReservationId, ReservationState, UserId},
    error::ReservationError,
};

use super::{Event, Pipeline};

/// How often a WATCHED waitlisted reservation is read again (once per
/// replica, not per watcher).
const WAITLIST_WATCH_POLL: Duration = Duration::from_secs(1);

/// What a feed carries: the latest state, or the error that ended it
/// (shared by every watcher, hence the `Arc`).
pub type WatchUpdate = Result<Reservation, Arc<ReservationError>>;

type Feed = watch::Sender<WatchUpdate>;

/// The replica's open watches and their feeds.
pub(super) struct Watches {
    feeds: Mutex<HashMap<ReservationId, Feed>>,
    open: Mutex<OpenWatches>,
    max_open: usize,
    max_per_user: usize,
}

#[derive(Default)]
struct OpenWatches {
    total: usize,
    /// At most `max_open` entries: each stands for an open watch.
    per_user: HashMap<UserId, usize>,
}

/// One open watch, counted while it lives (dropped with the caller's
/// stream, however the stream ends).
struct Slot {
    watches: Arc<Watches>,
    user: UserId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.watches.open();
        open.total -= 1;
        if let Some(count) = open.per_user.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.per_user.remove(&self.user);
            }
        }
    }
}

impl Watches {
    pub(super) fn new(max_open: usize, max_per_user: usize) -> Self {
        Self {
            feeds: Mutex::default(),
            open: Mutex::default(),
            max_open,
            max_per_user,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenWatches> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<ReservationId, Feed>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_slot(self: &Arc<Self>, user: &UserId) -> Result<Slot, ReservationError> {
        let mut open = self.open();
        if open.total >= self.max_open {
            return Err(ReservationError::TooManyWatches {
                scope: "replica",
                max: self.max_open,
            });
        }
        let mine = open.per_user.get(user).copied().unwrap_or(0);
        if mine >= self.max_per_user {
            return Err(ReservationError::TooManyWatches {
                scope: "user",
                max: self.max_per_user,
            });
        }
        open.total += 1;
        open.per_user.insert(user.clone(), mine + 1);
        Ok(Slot {
            watches: Arc::clone(self),
            user: user.clone(),
        })
    }

    /// (open watches, live feeds) on this replica.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.open().total, self.feeds().len())
    }
}

/// One caller's view of a feed.
struct Watcher {
    updates: watch::Receiver<WatchUpdate>,
    _slot: Slot,
    last: Option<Reservation>,
    done: bool,
}

impl Watcher {
    /// The next state that differs from the last one sent; after a final
    /// state or an error, the end.
    async fn next(mut self) -> Option<(WatchUpdate, Self)> {
        if self.done {
            return None;
        }
        loop {
            let update = self.updates.borrow_and_update().clone();
            match update {
                Ok(reservation) if self.last.as_ref() != Some(&reservation) => {
                    self.done = reservation.state.is_final();
                    self.last = Some(reservation.clone());
                    return Some((Ok(reservation), self));
                }
                Ok(_) => {}
                Err(err) => {
                    self.done = true;
                    return Some((Err(err), self));
                }
            }
            // Err: the feed ended, and its last update was seen above.
            self.updates.changed().await.ok()?;
        }
    }
}

impl Pipeline {
    /// Streams the reservation until it reaches a final state, the feed
    /// fails, or the caller drops the stream.
    pub async fn watch(
        self: &Arc<Self>,
        id: ReservationId,
        user: UserId,
    ) -> Result<impl Stream<Item = WatchUpdate> + Send + 'static, ReservationError> {
        let slot = self.watches.take_slot(&user)?;
        // Subscribed before the read, so a feed started from this read
        // misses no change in between.
        let events = self.events.subscribe();
        let first = self.get(&id, &user).await?;
        // A line of a cart reads as its cart: follow the cart's id, which
        // the cart's changes carry.
        let updates = self.feed(first.id.clone(), first, events);
        Ok(futures::stream::unfold(
            Watcher {
                updates,
                _slot: slot,
                last: None,
                done: false,
            },
            Watcher::next,
        ))
    }

    /// The reservation's feed on this replica, started from `first` if
    /// there is none.
    fn feed(
        self: &Arc<Self>,
        id: ReservationId,
        first: Reservation,
        events: broadcast::Receiver<Event>,
    ) -> watch::Receiver<WatchUpdate> {
        let mut feeds = self.watches.feeds();
        if let Some(feed) = feeds.get(&id) {
            // A feed past its end is removed under this lock, so one still
            // here is live.
            return feed.subscribe();
        }
        let (feed, updates) = watch::channel(Ok(first.clone()));
        feeds.insert(id.clone(), feed.clone());
        drop(feeds);
        crate::metrics::decision("watch", "feed_started");
        tokio::spawn(Arc::clone(self).run_feed(id, first, feed, events));
        updates
    }

    async fn run_feed(
        self: Arc<Self>,
        id: ReservationId,
        mut last: Reservation,
        feed: Feed,
        mut events: broadcast::Receiver<Event>,
    ) {
        let mut poll = tokio::time::interval(WAITLIST_WATCH_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        while !last.state.is_final() {
            let event = tokio::select! {
                () = feed.closed() => {
                    // The last watcher left; one may join under the lock.
                    if self.end_feed(&id, &feed) {
                        return;
                    }
                    continue;
                }
                event = events.recv() => event,
                _ = poll.tick(), if last.state == ReservationState::Waitlisted => {
                    Err(broadcast::error::RecvError::Lagged(0))
                }
            };
            let next = match event {
                // A cart's own row without its lines (the expiry sweep
                // moves rows one by one): read the whole cart below.
                Ok(Event::Changed(reservation))
                    if reservation.id == id
                        && !(reservation.is_cart() && reservation.lines.is_empty()) =>
                {
                    Some(*reservation)
                }
                Ok(Event::Changed(reservation)) if reservation.id == id => None,
                Ok(Event::Changed(_)) => continue,
                Ok(Event::QueueAdvanced) if last.state != ReservationState::Queued => continue,
                // Missed events, a queue move or a waitlist poll: read the
                // truth again.
                Ok(Event::QueueAdvanced) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let next = match next {
                Some(next) => next,
                None => match self.find(&id).await {
                    Ok(current) => current,
                    Err(err) => {
                        self.end_feed_with(&id, &feed, Err(Arc::new(err)));
                        return;
                    }
                },
            };
            if next != last {
                last = next;
                drop(feed.send_replace(Ok(last.clone())));
            }
        }
        self.end_feed_with(&id, &feed, Ok(last));
    }

    /// Removes the feed if nobody watches it; false when someone joined.
    fn end_feed(&self, id: &ReservationId, feed: &Feed) -> bool {
        let mut feeds = self.watches.feeds();
        if feed.receiver_count() > 0 {
            return false;
        }
        feeds.remove(id);
        true
    }

    /// Publishes the feed's last update and removes it, so the next watcher
    /// starts from a fresh read.
    fn end_feed_with(&self, id: &ReservationId, feed: &Feed, update: WatchUpdate) {
        self.watches.feeds().remove(id);
        drop(feed.send_replace(update));
    }

    /// (open watches, live feeds) on this replica.
    pub fn watch_counts(&self) -> (usize, usize) {
        self.watches.counts()
    }
}
