//! `Q.dlq` for operators: read with `basic.get` on a connection of its own
//! per call. A message looked at stays unacknowledged on that connection
//! and goes back to the queue when it closes, so a listing changes nothing
//! and a call that dies midway loses nothing.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::time::Instant;

use async_trait::async_trait;
use chrono::DateTime;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Confirmation,
};
use sha2::{Digest, Sha256};

use super::{open, persistent_json, ready_messages, salvage, Link, RabbitQueue};
use crate::queue::{
    dead_letters::{
        DeadLetter, DeadLetters, Moved, Selection, MAX_LIST, MAX_MOVE, MAX_SCAN, PREVIEW_BYTES,
    },
    QueueError, QueuedOrder,
};

/// Why the processor gave up, on each dead-lettered message.
const ERROR_HEADER: &str = "x-stockgate-error";
/// Marks a message an operator sent back to the order queue.
const REDRIVEN_HEADER: &str = "x-stockgate-redriven";

/// Past its budget, how long a call may still wait for the confirms of
/// what it already published before it gives up on them.
const CONFIRM_GRACE: Duration = Duration::from_secs(5);

/// The properties of a dead-lettered copy: persistent, the reason, the
/// time set aside (seconds), and the reservation id as message id where
/// the body still names one.
pub(super) fn dead_letter_properties(body: &[u8], reason: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    let id = salvage(body).map(|queued| queued.order.id.as_str().to_owned());
    persistent_json(id.as_deref())
        .with_headers(headers)
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
}

/// Whether an operator sent this delivery back from the dead-letter queue.
pub(super) fn is_redriven(properties: &BasicProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.contains_key(REDRIVEN_HEADER))
}

/// The publish's trace context, when the call was traced.
pub(super) fn traceparent(properties: &BasicProperties) -> Option<String> {
    header_text(properties, crate::telemetry::trace::TRACEPARENT)
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// What redrive and purge select a message by.
fn key_of(body: &[u8], order: Option<&QueuedOrder>) -> String {
    match order {
        Some(queued) => queued.order.id.as_str().to_owned(),
        None => {
            let digest = Sha256::digest(body);
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

fn describe(delivery: &Delivery) -> DeadLetter {
    let body = &delivery.data;
    let order = salvage(body);
    DeadLetter {
        key: key_of(body, order.as_ref()),
        order,
        error: text_prefix(
            header_text(&delivery.properties, ERROR_HEADER)
                .unwrap_or_default()
                .as_bytes(),
        ),
        dead_lettered_at: delivery
            .properties
            .timestamp()
            .and_then(|secs| DateTime::from_timestamp(i64::try_from(secs).ok()?, 0))
            .map(|at| at.naive_utc()),
        body_bytes: body.len(),
        preview: text_prefix(body),
    }
}

/// `bytes` as text (invalid UTF-8 replaced), cut at a character boundary
/// to at most [`PREVIEW_BYTES`] bytes.
fn text_prefix(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(PREVIEW_BYTES * 2)]);
    let mut end = text.len().min(PREVIEW_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A selected message, held unacknowledged by the call's channel.
struct Taken {
    letter: DeadLetter,
    tag: u64,
    /// Kept only when the call sends it on.
    body: Option<Vec<u8>>,
}

fn unavailable(err: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(err.to_string())
}

/// The dead-letter queue of one deployment's order queue.
pub struct RabbitDeadLetters {
    queue: Arc<RabbitQueue>,
    budget: Duration,
}

impl RabbitDeadLetters {
    /// Each call stops taking messages once it has run for `budget` (keep
    /// it below the request deadline, so the answer says what was done).
    pub fn new(queue: Arc<RabbitQueue>, budget: Duration) -> Self {
        Self { queue, budget }
    }

    fn dlq(&self) -> &str {
        &self.queue.publisher.names.dead_letters
    }

    /// Runs `work` on a connection of its own, then closes it, which puts
    /// back whatever `work` looked at and did not acknowledge, whether it
    /// finished or failed. `work` gets the depth and its deadline.
    async fn session<T>(
        &self,
        work: impl AsyncFnOnce(&Link, u64, Instant) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let deadline = Instant::now() + self.budget;
        let link = open(&self.queue.publisher.uri, &self.queue.publisher.names)
            .await
            .map_err(QueueError::Unavailable)?;
        let result = async {
            let depth = ready_messages(&link.channel, self.dlq())
                .await
                .map_err(unavailable)?;
            // Only for a broker that stops answering altogether: the work
            // itself stops at its deadline and reports what it did.
            let backstop = self.budget + CONFIRM_GRACE * 2;
            match tokio::time::timeout(backstop, work(&link, depth, deadline)).await {
                Ok(result) => result,
                Err(_) => Err(QueueError::Unavailable(format!(
                    "the broker did not answer within {backstop:?}"
                ))),
            }
        }
        .await;
        link.close().await;
        result
    }

    /// Takes the selected messages off the dead-letter queue, unacknowledged,
    /// looking at no more than [`MAX_SCAN`] and stopping at `deadline`.
    /// Returns them, the keys asked for that were not found, and why it
    /// stopped short, if it did (then nothing counts as not found).
    async fn take(
        &self,
        link: &Link,
        which: &Selection,
        keep_bodies: bool,
        deadline: Instant,
    ) -> Result<(Vec<Taken>, Vec<String>, Option<String>), QueueError> {
        let (wanted, most) = match which {
            Selection::Keys(keys) => (
                Some(keys.iter().map(String::as_str).collect::<HashSet<_>>()),
                MAX_MOVE,
            ),
            Selection::First(n) => (None, (*n).min(MAX_MOVE)),
        };
        let mut taken = Vec::new();
        let mut found = HashSet::new();
        let mut stopped = None;
        for looked in 0..MAX_SCAN {
            if taken.len() >= most {
                break;
            }
            if Instant::now() >= deadline {
                stopped = Some(format!(
                    "time budget of {:?} spent after looking at {looked} messages; run it again for the rest",
                    self.budget
                ));
                break;
            }
            let got = link
                .channel
                .basic_get(self.dlq().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(unavailable)?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let letter = describe(&delivery);
            if let Some(wanted) = &wanted {
                if !wanted.contains(letter.key.as_str()) {
                    continue;
                }
                found.insert(letter.key.clone());
            }
            taken.push(Taken {
                letter,
                tag: delivery.delivery_tag,
                body: keep_bodies.then_some(delivery.data),
            });
        }
        let not_found = match which {
            Selection::Keys(keys) if stopped.is_none() => keys
                .iter()
                .filter(|key| !found.contains(key.as_str()))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        Ok((taken, not_found, stopped))
    }
}

/// Removes a taken message from the dead-letter queue and records it as
/// moved; false (the reason recorded) when the broker refused, which ends
/// the call.
async fn remove(link: &Link, message: &Taken, moved: &mut Moved) -> bool {
    match link
        .channel
        .basic_ack(message.tag, BasicAckOptions::default())
        .await
    {
        Ok(()) => {
            moved.keys.push(message.letter.key.clone());
            true
        }
        Err(err) => {
            moved.interrupted.get_or_insert(err.to_string());
            false
        }
    }
}

#[async_trait]
impl DeadLetters for RabbitDeadLetters {
    async fn depth(&self) -> Result<u64, QueueError> {
        self.queue
            .count(self.dlq())
            .await
            .ok_or_else(|| QueueError::Unavailable("the broker did not count the queue".into()))
    }

    async fn list(&self, limit: usize) -> Result<(Vec<DeadLetter>, u64), QueueError> {
        self.session(async |link, depth, deadline| {
            let first = Selection::First(limit.min(MAX_LIST));
            let (taken, _, _) = self.take(link, &first, false, deadline).await?;
            Ok((taken.into_iter().map(|t| t.letter).collect(), depth))
        })
        .await
    }

    async fn redrive(&self, which: &Selection) -> Result<Moved, QueueError> {
        self.session(async |link, depth, deadline| {
            let (taken, not_found, stopped) = self.take(link, which, true, deadline).await?;
            // Every publish first, then the confirms: the broker confirms
            // a run of publishes at once.
            let mut confirms = Vec::with_capacity(taken.len());
            let mut interrupted = stopped;
            for message in &taken {
                let mut headers = FieldTable::default();
                headers.insert(REDRIVEN_HEADER.into(), AMQPValue::Boolean(true));
                let properties = persistent_json(Some(&message.letter.key)).with_headers(headers);
                let published = link
                    .channel
                    .basic_publish(
                        "".into(),
                        self.queue.publisher.names.orders.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        message.body.as_deref().unwrap_or_default(),
                        properties,
                    )
                    .await;
                match published {
                    Ok(confirm) => confirms.push(confirm),
                    Err(err) => {
                        // The ones already sent are still confirmed below.
                        interrupted.get_or_insert(err.to_string());
                        break;
                    }
                }
            }
            let mut moved = Moved {
                not_found,
                interrupted,
                ..Moved::default()
            };
            // Every confirm is awaited, a refusal or two included, so that
            // what is in the order queue leaves the dead-letter queue.
            for (message, confirm) in taken.iter().zip(confirms) {
                let confirmed =
                    match tokio::time::timeout_at(deadline + CONFIRM_GRACE, confirm).await {
                        Ok(confirmed) => confirmed,
                        Err(_) => {
                            moved.interrupted.get_or_insert(format!(
                                "no confirm from the order queue within {CONFIRM_GRACE:?} past the budget"
                            ));
                            break;
                        }
                    };
                match confirmed {
                    Ok(Confirmation::Ack(None)) => {}
                    other => {
                        moved.interrupted.get_or_insert(format!(
                            "the order queue did not take {}: {other:?}",
                            message.letter.key
                        ));
                        continue;
                    }
                }
                // Only once the order queue holds it.
                if !remove(link, message, &mut moved).await {
                    break;
                }
            }
            moved.remaining = depth.saturating_sub(moved.keys.len() as u64);
            Ok(moved)
        })
        .await
    }

    async fn purge(&self, which: &Selection) -> Result<Moved, QueueError> {
        self.session(async |link, depth, deadline| {
            let (taken, not_found, stopped) = self.take(link, which, false, deadline).await?;
            let mut moved = Moved {
                not_found,
                interrupted: stopped,
                ..Moved::default()
            };
            for message in &taken {
                if !remove(link, message, &mut moved).await {
                    break;
                }
            }
            moved.remaining = depth.saturating_sub(moved.keys.len() as u64);
            Ok(moved)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_keyed_by_its_reservation_or_by_its_body() {
        let id = crate::domain::ReservationId::generate();
        let body = serde_json::json!({
            "v": 99, "id": id.as_str(), "sku": "S", "user": "u", "quantity": 1
        })
        .to_string();
        let order = salvage(body.as_bytes());
        assert_eq!(key_of(body.as_bytes(), order.as_ref()), id.as_str());
        let unreadable = b"\xff not json";
        let key = key_of(unreadable, salvage(unreadable).as_ref());
        assert!(key.starts_with("sha256:") && key.len() == 7 + 16, "{key}");
        assert_ne!(key, key_of(b"other", None));
    }

    #[test]
    fn previews_stop_at_a_character_boundary_within_the_budget() {
        let text = "é".repeat(PREVIEW_BYTES);
        let preview = text_prefix(text.as_bytes());
        assert_eq!(preview.len(), PREVIEW_BYTES);
        assert!(preview.chars().all(|c| c == 'é'));
        let junk = vec![0xffu8; PREVIEW_BYTES * 4];
        let preview = text_prefix(&junk);
        assert!(preview.len() <= PREVIEW_BYTES, "{}", preview.len());
        assert!(preview.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
        assert_eq!(text_prefix(b"short"), "short");
    }

    #[test]
    fn a_dead_lettered_copy_carries_its_reason_time_and_id() {
        let id = crate::domain::ReservationId::generate();
        let body = serde_json::json!({"id": id.as_str(), "sku": "S", "user": "u", "quantity": 2})
            .to_string();
        let properties = dead_letter_properties(body.as_bytes(), "it broke");
        assert_eq!(
            header_text(&properties, ERROR_HEADER).as_deref(),
            Some("it broke")
        );
        assert_eq!(
            properties.message_id().as_ref().map(|m| m.as_str()),
            Some(id.as_str())
        );
        assert!(properties.timestamp().is_some());
        assert!(!is_redriven(&properties));
    }
}
