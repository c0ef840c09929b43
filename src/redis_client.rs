//! Redis connections as configured: over TLS for `rediss://` URLs (the
//! redis crate's rustls, trusting `redis.tls_ca_file` or the system roots,
//! presenting `redis.tls_cert_file` if set), and with a password that
//! follows a password file (`backends.gate_password_file`,
//! `backends.dedup_password_file`): the redis crate's streaming
//! credentials, fed by the file's watch, make every open connection
//! re-authenticate when SIGHUP brings a new password, and every
//! reconnection use it.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    auth::{BasicAuth, StreamingCredentialsProvider},
    Client, ClientTlsConfig, RedisResult, TlsCertificates,
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
    match url.tls() {
        Some(tls) if url.is_tls() && tls.is_set() => Client::build_with_tls(
            current.as_str(),
            TlsCertificates {
                client_tls: tls.identity.as_ref().map(|identity| ClientTlsConfig {
                    client_cert: identity.0.clone(),
                    client_key: identity.1.clone(),
                }),
                root_cert: tls.ca.as_ref().map(|ca| ca.to_vec()),
            },
        ),
        _ => Client::open(current.as_str()),
    }
}

/// A lazily connecting manager whose connects and replies each wait at
/// most `timeout`, for the per-call layers (dedup, fleet rate limits);
/// errors name `key`, the setting the URL came from.
pub(crate) fn connect_timed(
    url: &LiveUrl,
    timeout: std::time::Duration,
    key: &str,
) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout));
    connect(url, config).map_err(|e| format!("{e} (Redis at {})", url.describe(key)))
}

/// A lazily connecting manager with `config`, following the password
/// file if `url` has one. (Pub/sub connections take no credentials
/// stream: open each with a fresh [`client`].)
pub(crate) fn connect(
    url: &LiveUrl,
    mut config: ConnectionManagerConfig,
) -> RedisResult<ConnectionManager> {
    let current = url.current();
    let client = client(url)?;
    if let Some(password) = url.password() {
        // Redis 6 ACLs: a password alone (requirepass) is the default user's.
        let user = user_of(&current).unwrap_or("default").to_owned();
        config = config.set_credentials_provider(FilePassword { user, password });
    }
    ConnectionManager::new_lazy_with_config(client, config)
}
