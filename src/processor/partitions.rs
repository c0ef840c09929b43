//! Partitioned order queues (`rabbitmq.partitions` above 1): each running
//! processor consumes its share of the partitions, and takes a dead one's
//! share over.
//!
//! Shares come from leases in PostgreSQL ([`LeaseSession`]): every
//! `rabbitmq.lease_poll_ms` a processor counts the running processors
//! (N), finds its rank among them (r), and holds `P / N` partitions, one
//! more when `r < P % N`. Above its share it gives the highest ones up
//! (the batch in hand finished and its consumer closed first); below it
//! takes free ones. A dead processor's session ends with it, so its
//! leases are free at the others' next look. RabbitMQ 3.10 has no
//! consumer-priority handover, and each partition keeps its single active
//! consumer: two processors never consume one partition at once, even
//! while one cut off from PostgreSQL has not yet noticed.
//!
//! The holder of partition 0 also drains the one queue `<queue>`: orders
//! replicas published there before the move to partitions, and dead
//! letters an operator redrove.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use super::{run_watched, Activity};
use crate::{
    config::secrets::LiveUrl,
    queue::{ticket, OrderSource, QueueNames, RabbitQueue, RabbitSource},
    reserve::Pipeline,
    store::{LeaseSession, LineProgress, Store},
};

/// What a partitioned processor needs besides the pipeline.
pub(crate) struct Partitioned {
    pub store: Store,
    pub uri: LiveUrl,
    pub names: QueueNames,
    pub prefetch: u16,
    pub reconnect_delay: Duration,
    pub batch_size: usize,
    pub linger: Duration,
    pub lease_poll: Duration,
    /// Longest an API replica takes from numbering an order to hearing
    /// the broker's answer (`rabbitmq.publish_timeout_ms` twice, plus a
    /// connect to every listed broker).
    pub publish_bound: Duration,
    /// This process's publishing side, which sends pass marks.
    pub queue: Arc<RabbitQueue>,
}

/// One partition this processor holds: its consumers (partition 0 has the
/// one queue's too) and what stops them.
struct Held {
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    lines: Vec<Line>,
}

/// One queue a held partition's loops consume, watched for tickets that
/// will never come.
struct Line {
    /// `None`: the one queue.
    partition: Option<u16>,
    activity: Arc<Activity>,
    /// The line's last ticket number when its loop was last seen idle,
    /// with the loop's batch count and when.
    idle: Option<(u64, u64, Instant)>,
    /// The loop's batch count when a pass mark was last sent: none again
    /// until the loop has taken a batch.
    marked: Option<u64>,
}

/// Longest one look at the lines' progress may take.
const STEP: Duration = Duration::from_secs(5);

/// Waited beyond the publish bound before a pass mark, for a message
/// written just before its caller's deadline to reach the broker.
const PASS_MARGIN: Duration = Duration::from_secs(1);

/// How many of `partitions` the processor ranked `rank` of `count`
/// holds.
pub(crate) fn share(partitions: u16, count: usize, rank: usize) -> usize {
    let partitions = usize::from(partitions);
    let count = count.max(1);
    partitions / count + usize::from(rank < partitions % count)
}

/// Runs until `stop`: holds this processor's share of the partitions and
/// processes their orders.
pub(crate) async fn run_partitioned(
    pipeline: Arc<Pipeline>,
    settings: Partitioned,
    mut stop: watch::Receiver<bool>,
) {
    let mut session: Option<LeaseSession> = None;
    let mut held: BTreeMap<u16, Held> = BTreeMap::new();
    loop {
        let looked = settings
            .rebalance(&pipeline, &mut session, &mut held, &stop)
            .await;
        if let Err(err) = looked {
            // The session is gone and its leases with it: stop consuming,
            // so that whoever takes them over is not kept waiting.
            tracing::warn!(error = %err, "no partition leases (the PostgreSQL session is lost or cannot open); consuming none");
            release_all(&mut held).await;
            session = None;
        }
        if session.is_some() {
            // Bounded so that a slow broker or database does not hold the
            // next look at the leases (or the stop) up for long; a line
            // cut short is looked at again next time.
            let _ = tokio::time::timeout(STEP, settings.pass_unpublished(&mut held)).await;
        }
        ::metrics::gauge!("stockgate_processor_partitions").set(held.len() as f64);
        tokio::select! {
            _ = tokio::time::sleep(settings.lease_poll) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    release_all(&mut held).await;
    if let Some(session) = session {
        session.close().await;
    }
    ::metrics::gauge!("stockgate_processor_partitions").set(0.0);
}

impl Partitioned {
    /// One look at the leases: join if not yet a member, then give up or
    /// take partitions until this processor holds its share.
    async fn rebalance(
        &self,
        pipeline: &Arc<Pipeline>,
        session: &mut Option<LeaseSession>,
        held: &mut BTreeMap<u16, Held>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), crate::store::StoreError> {
        let lease = match session {
            Some(lease) => lease,
            None => session.insert(LeaseSession::open(&self.store, &self.names.orders).await?),
        };
        let members = lease.members().await?;
        let target = share(self.names.partitions, members.count, members.rank);
        while held.len() > target {
            let Some((partition, partition_loops)) = held.pop_last() else {
                break;
            };
            stop_loops(partition_loops).await;
            lease.give_up(partition).await?;
            tracing::info!(partition, target, "partition handed over");
        }
        // Start at this processor's rank so that processors joining
        // together try different partitions first.
        let partitions = self.names.partitions;
        let start = u16::try_from(members.rank % usize::from(partitions)).unwrap_or(0);
        for offset in 0..partitions {
            if held.len() >= target || *stop.borrow() {
                break;
            }
            let partition = (start + offset) % partitions;
            if held.contains_key(&partition) || !lease.try_take(partition).await? {
                continue;
            }
            tracing::info!(
                partition,
                target,
                processors = members.count,
                "partition taken"
            );
            held.insert(partition, self.start(pipeline, partition));
        }
        Ok(())
    }

    /// Starts consuming partition `partition` (and, for partition 0, the
    /// one queue).
    fn start(&self, pipeline: &Arc<Pipeline>, partition: u16) -> Held {
        let (stop, stopped) = watch::channel(false);
        let mut queues = vec![(Some(partition), self.names.partition(partition))];
        if partition == 0 {
            let one_queue = QueueNames {
                partitions: 1,
                ..self.names.clone()
            };
            queues.push((None, one_queue));
        }
        let mut loops = Vec::new();
        let mut lines = Vec::new();
        for (line, names) in queues {
            let source: Box<dyn OrderSource> = Box::new(RabbitSource::new(
                self.uri.clone(),
                &names,
                self.prefetch,
                self.reconnect_delay,
            ));
            let activity = Arc::new(Activity::default());
            loops.push(tokio::spawn(run_watched(
                Arc::clone(pipeline),
                source,
                self.batch_size,
                self.linger,
                stopped.clone(),
                Arc::clone(&activity),
            )));
            lines.push(Line {
                partition: line,
                activity,
                idle: None,
                marked: None,
            });
        }
        Held { stop, loops, lines }
    }

    /// A ticket numbered for a publish that then failed never arrives, and
    /// its line's progress would stay below it until a later order of the
    /// line is processed; a partition may get none, so the queue's backlog
    /// would never read 0 again (the reconciler and `stockgate check` wait
    /// for 0). When a line's loop has waited with nothing in hand, taking
    /// no batch, for longer than any publish takes, every order numbered
    /// before that wait began is either stored in the queue or never will
    /// be: a pass mark for the last of them, published behind them, moves
    /// the line's progress once it is delivered (after every stored one,
    /// those a dead consumer held included). Moving the progress at once
    /// would count orders a standby's predecessor still holds as done.
    async fn pass_unpublished(&self, held: &mut BTreeMap<u16, Held>) {
        // Every line's progress, read once a line needs it.
        let mut progress: Option<Vec<LineProgress>> = None;
        for line in held.values_mut().flat_map(|held| held.lines.iter_mut()) {
            let Some(batches) = line.activity.idle_after() else {
                line.idle = None;
                continue;
            };
            match line.idle {
                Some((seen, _, _)) if seen != batches => line.idle = None,
                Some((_, last, since)) => {
                    if since.elapsed() < self.publish_bound + PASS_MARGIN
                        || line.marked == Some(batches)
                    {
                        continue;
                    }
                    let queue = line.partition.map_or_else(
                        || self.names.orders.clone(),
                        |p| self.names.partition_queue(p),
                    );
                    let through = ticket(line.partition, last);
                    match self.queue.publish_pass(&queue, through).await {
                        Ok(()) => {
                            tracing::info!(%queue, through = last, "pass mark sent past tickets whose publish failed");
                            line.marked = Some(batches);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, %queue, "pass mark not sent");
                            // Tried again a whole wait later, not every look.
                            line.idle = Some((batches, last, Instant::now()));
                        }
                    }
                }
                None => {
                    if progress.is_none() {
                        progress = Some(self.store.queue_lines().await.unwrap_or_default());
                    }
                    line.idle = progress
                        .iter()
                        .flatten()
                        .find(|p| p.partition == line.partition && p.last_ticket > p.done_through)
                        .map(|p| (batches, p.last_ticket, Instant::now()));
                }
            }
        }
    }
}

/// Stops a partition's consumers once their batch in hand is done; what
/// they hold unacknowledged goes back to the partition's queue.
async fn stop_loops(held: Held) {
    let _ = held.stop.send(true);
    for handle in held.loops {
        if let Err(err) = handle.await {
            tracing::error!(error = %err, "a partition consumer ended abnormally");
        }
    }
}

/// Stops every partition's consumers at once, then waits for them all.
async fn release_all(held: &mut BTreeMap<u16, Held>) {
    let held = std::mem::take(held);
    for partition in held.values() {
        let _ = partition.stop.send(true);
    }
    for (_, partition) in held {
        stop_loops(partition).await;
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_every_partition_and_differ_by_one_at_most() {
        assert_eq!(share(4, 2, 0), 2);
        assert_eq!(share(4, 2, 1), 2);
        assert_eq!(share(4, 1, 0), 4);
        assert_eq!(share(4, 0, 0), 4, "no member seen: hold them all");
        for partitions in 1..=64u16 {
            for count in 1..=10 {
                let shares: Vec<usize> = (0..count).map(|r| share(partitions, count, r)).collect();
                assert_eq!(shares.iter().sum::<usize>(), usize::from(partitions));
                let (low, high) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(high - low <= 1, "{partitions} over {count}: {shares:?}");
            }
        }
    }
}
