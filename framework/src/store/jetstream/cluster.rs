//! Where partition leaders are: asking the cluster, and spreading them
//! over its servers with the floor/ceiling rule.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};

use super::errors::*;
use super::state::*;

/// One partition's stream as the cluster reports it
/// ([`JetStreamStore::partitions_info`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PartitionInfo {
    /// The partition's index.
    pub partition: u32,
    /// Its stream's name.
    pub stream: String,
    /// Whether the stream answered within the timeout.
    pub answered: bool,
    /// The server leading it, if one does.
    pub leader: Option<String>,
    /// Its other replicas.
    pub replicas: Vec<ReplicaInfo>,
    /// Messages its stream holds: one per append, whatever the number of
    /// events the append wrote.
    pub messages: u64,
}

/// A replica of a partition's stream that is not its leader.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ReplicaInfo {
    /// The server holding it.
    pub server: String,
    /// Whether it is caught up with the leader.
    pub current: bool,
    /// Whether its server is offline.
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
}

impl JetStreamStore {
    /// The server leading each partition's stream now, by partition:
    /// `None` for a stream without a leader (electing one, or most of its
    /// servers down: such a stream does not answer within the timeout). The
    /// streams are asked at once, so the answer comes within one timeout
    /// whatever the number of partitions.
    ///
    /// # Errors
    ///
    /// [`StoreError::Database`] when a stream's state cannot be read for
    /// another reason than an unanswered request (a stream deleted, say).
    pub async fn leaders(&self) -> Result<Vec<Option<String>>, StoreError> {
        Ok(self
            .partitions_info()
            .await?
            .into_iter()
            .map(|partition| partition.leader)
            .collect())
    }

    /// Each partition's stream with its leader, its other replicas and its
    /// message count, as the cluster reports them now (asked at once, like
    /// [`leaders`](Self::leaders)); a stream that does not answer within
    /// the timeout is listed without a leader and with `answered: false`.
    ///
    /// # Errors
    ///
    /// As [`leaders`](Self::leaders).
    pub async fn partitions_info(&self) -> Result<Vec<PartitionInfo>, StoreError> {
        let asked = self.inner.streams.iter().map(|stream| {
            self.patiently(|| async {
                stream
                    .get_info()
                    .await
                    .map_err(|e| nats_error("read a stream's state", e))
            })
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .enumerate()
            .map(|(partition, answer)| {
                let partition = partition as u32;
                let stream = self.stream_name(partition).unwrap_or_default().to_owned();
                match answer {
                    Ok(info) => {
                        let cluster = info.cluster.unwrap_or_default();
                        Ok(PartitionInfo {
                            partition,
                            stream,
                            answered: true,
                            leader: cluster.leader,
                            replicas: cluster
                                .replicas
                                .into_iter()
                                .map(|peer| ReplicaInfo {
                                    server: peer.name,
                                    current: peer.current,
                                    offline: peer.offline,
                                    lag: peer.lag.unwrap_or(0),
                                })
                                .collect(),
                            messages: info.state.messages,
                        })
                    }
                    Err(error) if error.is_unavailable() => Ok(PartitionInfo {
                        partition,
                        stream,
                        answered: false,
                        leader: None,
                        replicas: Vec::new(),
                        messages: 0,
                    }),
                    Err(error) => Err(error),
                }
            })
            .collect()
    }

    /// Each partition stream's cluster state (leader and replicas) now.
    pub(super) async fn clusters(
        &self,
    ) -> Result<Vec<Option<async_nats::jetstream::stream::ClusterInfo>>, StoreError> {
        let mut clusters = Vec::with_capacity(self.inner.streams.len());
        for stream in &self.inner.streams {
            let info = self
                .patiently(|| async {
                    stream
                        .get_info()
                        .await
                        .map_err(|e| nats_error("read a stream's leader", e))
                })
                .await?;
            clusters.push(info.cluster);
        }
        Ok(clusters)
    }

    /// Moves partition leaders until they are spread by the floor/ceiling
    /// rule — no server leads two more streams than another, one that leads
    /// none included (4 partitions on 3 servers: 2/1/1) — so that appends
    /// to different partitions are led by different servers: a stream whose
    /// leader leads too many is asked to step down, and the cluster elects
    /// another of its replicas. [`build`](super::JetStreamStoreBuilder::build) does
    /// it; call it again after servers came back (the survivors then lead
    /// everything). Returns the leaders by partition.
    ///
    /// # Errors
    ///
    /// As [`leaders`](Self::leaders); a stream that does not step down or
    /// elect a leader within the timeout gives [`StoreError::Unavailable`].
    pub async fn spread_leaders(&self) -> Result<Vec<Option<String>>, StoreError> {
        let rounds = 4 * self.inner.streams.len() + 4;
        for _ in 0..rounds {
            let clusters = self.clusters().await?;
            let leaders: Vec<Option<String>> = clusters
                .iter()
                .map(|c| c.as_ref().and_then(|c| c.leader.clone()))
                .collect();
            if leaders.iter().any(Option::is_none) {
                // A stream still electing its first (or next) leader.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let mut servers: Vec<String> = Vec::new();
            for cluster in clusters.iter().flatten() {
                servers.extend(cluster.leader.iter().cloned());
                servers.extend(cluster.replicas.iter().map(|p| p.name.clone()));
            }
            servers.sort();
            servers.dedup();
            let replicas = self
                .inner
                .streams
                .first()
                .map_or(1, |s| s.cached_info().config.num_replicas);
            if servers.len() < replicas.min(2) {
                return Ok(leaders);
            }
            let peers_known = clusters
                .iter()
                .flatten()
                .all(|c| c.replicas.len() + 1 >= replicas);
            if !peers_known {
                // The streams' replicas are not all reported yet.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let Some(partition) = overloaded(&leaders, &servers) else {
                return Ok(leaders);
            };
            let name = self
                .stream(partition as u32)
                .cached_info()
                .config
                .name
                .clone();
            let answer: serde_json::Value = self
                .inner
                .js
                .request(
                    format!("STREAM.LEADER.STEPDOWN.{name}"),
                    &serde_json::json!({}),
                )
                .await
                .map_err(|e| nats_error("ask a stream's leader to step down", e))?;
            if let Some(error) = answer.get("error") {
                return Err(StoreError::database(
                    "ask a stream's leader to step down",
                    ErrorKind::Infrastructure,
                    format!("stream {name}: {error}"),
                ));
            }
            // Until another server leads it.
            let old = leaders[partition].clone();
            let deadline = tokio::time::Instant::now() + self.inner.timeout;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let info = self.stream(partition as u32).get_info().await;
                let leader = info.ok().and_then(|i| i.cluster).and_then(|c| c.leader);
                if leader.is_some() && leader != old {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(StoreError::Unavailable {
                        operation: "spread the partitions' leaders",
                        source: format!("stream {name} elected no leader").into(),
                    });
                }
            }
        }
        self.leaders().await
    }
}

/// The floor/ceiling rule for leaders, as the runner's fair share: a
/// partition to hand over while some server leads two more partitions than
/// another (which may lead none), led by one of the busiest servers; `None`
/// when the leaders are spread.
pub(super) fn overloaded(leaders: &[Option<String>], servers: &[String]) -> Option<usize> {
    let mut led: HashMap<&str, usize> = servers.iter().map(|s| (s.as_str(), 0)).collect();
    for leader in leaders.iter().flatten() {
        *led.entry(leader.as_str()).or_default() += 1;
    }
    let most = led.values().copied().max()?;
    let least = led.values().copied().min()?;
    if most < least + 2 {
        return None;
    }
    leaders
        .iter()
        .position(|leader| leader.as_deref().is_some_and(|l| led.get(l) == Some(&most)))
}
