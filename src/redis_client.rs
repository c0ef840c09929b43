//! Redis connections as configured: over TLS for `rediss://` URLs (the
//! redis crate's rustls, trusting `redis.tls_ca_file` or the system roots,
//! presenting `redis.tls_cert_file` if set), and with a password that
//! follows a password file (`backends.gate_password_file`,
//! `backends.dedup_password_file`): the redis crate's streaming
//! credentials, fed by the file's watch, make every open connection
//! re-authenticate when SIGHUP brings a new password, and every
//! reconnection use it.

use std::pin::Pin;

use futures::{FutureExt, Stream, StreamExt};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    auth::{BasicAuth, StreamingCredentialsProvider},
    Client, ClientTlsConfig, Pipeline, RedisResult, TlsCertificates, Value,
};
use tokio::sync::watch;

use crate::config::secrets::{user_of, LiveUrl};

#[derive(Clone)]
struct FilePassword {
    user: String,
    password: watch::Receiver<String>,
}

impl StreamingCredentialsProvider for FilePassword {
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let user = self.user.clone();
        Box::pin(
            tokio_stream::wrappers::WatchStream::new(self.password.clone())
                .map(move |password| Ok(BasicAuth::new(user.clone(), password))),
        )
    }
}

/// A client for `url` as it is now: its current password, and its TLS
/// material when the URL is `rediss://`.
pub(crate) fn client(url: &LiveUrl) -> RedisResult<Client> {
    let current = url.current();
    match certificates(url) {
        Some(certificates) => Client::build_with_tls(current.as_str(), certificates),
        None => Client::open(current.as_str()),
    }
}

/// The CA and client certificate `url` is to present, when it asks for
/// TLS and its section names them.
fn certificates(url: &LiveUrl) -> Option<TlsCertificates> {
    let tls = url.tls().filter(|tls| url.is_tls() && tls.is_set())?;
    Some(TlsCertificates {
        client_tls: tls.identity.as_ref().map(|identity| ClientTlsConfig {
            client_cert: identity.0.clone(),
            client_key: identity.1.clone(),
        }),
        root_cert: tls.ca.as_ref().map(|ca| ca.to_vec()),
    })
}

/// The credentials that follow `url`'s password file, if it has one.
fn file_password(url: &LiveUrl, current: &str) -> Option<FilePassword> {
    let password = url.password()?;
    // Redis 6 ACLs: a password alone (requirepass) is the default user's.
    let user = user_of(current).unwrap_or("default").to_owned();
    Some(FilePassword { user, password })
}

/// A lazily connecting connection (one server or a cluster) whose
/// connects and replies each wait at most `timeout`, for the per-call
/// layers (dedup, fleet rate limits); errors name `key`, the setting the
/// URL came from.
pub(crate) fn connect_timed(
    url: &LiveUrl,
    timeout: std::time::Duration,
    key: &str,
) -> Result<RedisConn, String> {
    let timeouts = Timeouts {
        connect: timeout,
        response: timeout,
        retries: None,
    };
    RedisConn::connect(url, timeouts).map_err(|e| format!("{e} (Redis at {})", url.describe(key)))
}

/// A lazily connecting manager for one server with `config`, following
/// the password file if `url` has one. (Pub/sub connections take no
/// credentials stream: open each with a fresh [`client`].)
fn connect(url: &LiveUrl, mut config: ConnectionManagerConfig) -> RedisResult<ConnectionManager> {
    let client = client(url)?;
    if let Some(credentials) = file_password(url, &url.current()) {
        config = config.set_credentials_provider(credentials);
    }
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The scheme prefixes that name a Redis Cluster by its seed nodes:
/// `redis+cluster://[user[:password]@]host:port[,host:port…]`
/// (`rediss+cluster://` for TLS).
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// Whether `url` names a Redis Cluster rather than one server.
pub fn is_cluster_url(url: &str) -> bool {
    CLUSTER_SCHEMES
        .iter()
        .any(|(scheme, _)| url.starts_with(scheme))
}

/// The seed nodes of a cluster URL, each as a one-server URL carrying the
/// same user, password and options; `None` if `url` is not a cluster URL
/// or names no host.
pub fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let (scheme, plain) = CLUSTER_SCHEMES
        .iter()
        .find(|(scheme, _)| url.starts_with(scheme))?;
    let rest = &url[scheme.len()..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|host| !host.is_empty())
        .map(|host| format!("{plain}{userinfo}{host}{tail}"))
        .collect();
    (!seeds.is_empty()).then_some(seeds)
}

/// One group's replies, as (index in the pipeline, reply).
pub type GroupReplies<'a> = futures::future::BoxFuture<'a, Vec<(usize, RedisResult<Value>)>>;

/// Timeouts and retries for a connection, whichever kind it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub connect: std::time::Duration,
    pub response: std::time::Duration,
    /// Reconnection attempts within one command (one server, each wait
    /// at most `response`) or retries and redirections (a cluster); `None`
    /// for the client's defaults.
    pub retries: Option<u32>,
}

/// A connection to Redis as configured: one server through its connection
/// manager, or a cluster through the cluster client, which routes each
/// command to the master of its key's hash slot, follows MOVED and ASK
/// redirections and refreshes its slot map after a failover. Both
/// reconnect by themselves and are cheap to clone.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConn {
    /// Connects lazily to `url`, one server or a cluster, following the
    /// password file if `url` has one.
    pub(crate) fn connect(url: &LiveUrl, timeouts: Timeouts) -> RedisResult<Self> {
        if !is_cluster_url(&url.current()) {
            let mut config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeouts.response))
                .set_connection_timeout(Some(timeouts.connect));
            if let Some(retries) = timeouts.retries {
                config = config
                    .set_number_of_retries(retries as usize)
                    .set_max_delay(timeouts.response);
            }
            return connect(url, config).map(Self::Single);
        }
        // The cluster client follows MOVED and ASK and, after a lost
        // connection, sends a command again: a script that ran before the
        // loss runs twice, so every script and claim is safe to repeat
        // (docs/architecture.md, "Redis Cluster").
        let client = cluster_client(url, timeouts, None)?;
        Ok(Self::Cluster(
            client.get_pending_async_connection_with_config(cluster_config(timeouts)),
        ))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Sends `pipe` and returns each command's own reply, in order: its
    /// value, its error reply, or the error of the pipeline it went in (a
    /// lost connection, a timeout: whether it ran is then unknown, as for a
    /// direct call whose reply was lost). See [`RedisConn::query_groups`].
    pub async fn query_each(&self, pipe: Pipeline) -> Vec<RedisResult<Value>> {
        let mut out: Vec<RedisResult<Value>> = (0..pipe.len()).map(|_| Ok(Value::Nil)).collect();
        let mut groups = self.query_groups(pipe);
        while let Some(replies) = groups.next().await {
            for (index, reply) in replies {
                out[index] = reply;
            }
        }
        out
    }

    /// The replies to `pipe`'s commands, as (index in `pipe`, reply), a
    /// group at a time as each arrives. A cluster takes a pipeline only
    /// when all its commands hash to one slot, so there the commands are
    /// grouped by slot and each group sent as its own pipeline, all at
    /// once: a master that is down fails (or delays) only its own slots'
    /// commands, and the other groups' replies do not wait for it. Each
    /// command stays atomic on its own, as in any pipeline.
    pub fn query_groups(
        &self,
        pipe: Pipeline,
    ) -> futures::stream::FuturesUnordered<GroupReplies<'_>> {
        if !self.is_cluster() {
            let count = pipe.len();
            return std::iter::once(
                async move {
                    (0..count)
                        .zip(self.query_group(pipe, count).await)
                        .collect()
                }
                .boxed(),
            )
            .collect();
        }
        let mut groups: Vec<(Option<u16>, Pipeline, Vec<usize>)> = Vec::new();
        for (index, cmd) in pipe.cmd_iter().enumerate() {
            let slot = command_slot(cmd);
            let group = match groups.iter().position(|(s, ..)| *s == slot) {
                Some(found) => found,
                None => {
                    groups.push((slot, redis::pipe(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[group].1.add_command(cmd.clone());
            groups[group].2.push(index);
        }
        groups
            .into_iter()
            .map(|(_, sub, indexes)| {
                async move {
                    let replies = self.query_group(sub, indexes.len()).await;
                    indexes.into_iter().zip(replies).collect()
                }
                .boxed()
            })
            .collect()
    }

    /// One pipeline of `count` commands, each reply on its own.
    async fn query_group(&self, mut pipe: Pipeline, count: usize) -> Vec<RedisResult<Value>> {
        pipe.ignore_errors();
        let whole = match pipe.query_async::<Vec<Value>>(&mut self.clone()).await {
            Ok(values) if values.len() == count => {
                return values
                    .into_iter()
                    .map(|value| match value {
                        Value::ServerError(err) => Err(redis::RedisError::from(err)),
                        value => Ok(value),
                    })
                    .collect()
            }
            Ok(values) => redis::RedisError::from(std::io::Error::other(format!(
                "redis answered {} replies to {count} commands",
                values.len()
            ))),
            Err(err) => err,
        };
        (0..count).map(|_| Err(whole.clone())).collect()
    }
}

fn cluster_config(timeouts: Timeouts) -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new()
        .set_connection_timeout(timeouts.connect)
        .set_response_timeout(timeouts.response)
}

/// A cluster client for `url`'s seeds, with its TLS material, its password
/// file (every node connection re-authenticates when it changes) and, for
/// subscribers, RESP3 with `pushes` receiving the messages.
pub(crate) fn cluster_client(
    url: &LiveUrl,
    timeouts: Timeouts,
    pushes: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> RedisResult<redis::cluster::ClusterClient> {
    let current = url.current();
    let seeds = cluster_seeds(&current).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a cluster URL names its seed nodes: redis+cluster://host:port[,host:port…]",
        ))
    })?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(timeouts.connect)
        .response_timeout(timeouts.response);
    if let Some(retries) = timeouts.retries {
        builder = builder.retries(retries);
    }
    if let Some(certificates) = certificates(url) {
        builder = builder.certs(certificates);
    }
    if let Some(credentials) = file_password(url, &current) {
        builder = builder.set_credentials_provider(credentials);
    }
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder.build()
}

/// The hash slot `cmd` is routed by: its first key's (the first key after
/// the key count for EVAL and EVALSHA); `None` for a command without keys.
pub fn command_slot(cmd: &redis::Cmd) -> Option<u16> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = if name.starts_with(b"EVAL") || name.starts_with(b"FCALL") {
        let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
        if keys == 0 {
            return None;
        }
        args.get(3)?
    } else {
        args.get(1)?
    };
    Some(key_slot(key))
}

/// Redis Cluster's hash slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// text between the first `{` and the next `}`, when not empty) or of the
/// whole key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let inner = &key[open + 1..];
            let close = inner.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &inner[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % 16_384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_spec() {
        // The spec's own check value, and slots CLUSTER KEYSLOT gives.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"p:{sku-1}:inv"), key_slot(b"sku-1"));
        assert_eq!(key_slot(b"p:{sku-1}:res:9"), key_slot(b"q:{sku-1}:users"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"a{}b"), crc16_xmodem(b"a{}b") % 16_384);
        let mut eval = redis::cmd("EVALSHA");
        eval.arg("abc").arg(2).arg("p:{s}:inv").arg("p:{t}:inv");
        assert_eq!(command_slot(&eval), Some(key_slot(b"s")));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("abc").arg(0);
        assert_eq!(command_slot(&keyless), None);
        let mut set = redis::cmd("SET");
        set.arg("foo").arg(1);
        assert_eq!(command_slot(&set), Some(12_182));
    }

    #[test]
    fn cluster_urls_name_their_seeds() {
        assert!(is_cluster_url("redis+cluster://a:1"));
        assert!(!is_cluster_url("redis://a:1"));
        assert_eq!(
            cluster_seeds("redis+cluster://u:p@a:1,b:2/?protocol=resp3").unwrap(),
            [
                "redis://u:p@a:1/?protocol=resp3",
                "redis://u:p@b:2/?protocol=resp3"
            ]
        );
        assert_eq!(
            cluster_seeds("rediss+cluster://a:1").unwrap(),
            ["rediss://a:1"]
        );
        assert_eq!(cluster_seeds("redis+cluster://"), None);
        assert_eq!(cluster_seeds("redis://a:1"), None);
    }
}
