//! Redis connections whose password follows a password file
//! (`backends.gate_password_file`, `backends.dedup_password_file`): the
//! redis crate's streaming credentials, fed by the file's watch, make every
//! open connection re-authenticate when SIGHUP brings a new password, and
//! every reconnection use it.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    auth::{BasicAuth, StreamingCredentialsProvider},
    Client, RedisResult,
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

/// A lazily connecting manager with `config`, following the password
/// file if `url` has one. (Pub/sub connections take no credentials
/// stream: open each with a client made from [`LiveUrl::current`].)
pub(crate) fn connect(
    url: &LiveUrl,
    mut config: ConnectionManagerConfig,
) -> RedisResult<ConnectionManager> {
    let current = url.current();
    let client = Client::open(current.as_str())?;
    if let Some(password) = url.password() {
        // Redis 6 ACLs: a password alone (requirepass) is the default user's.
        let user = user_of(&current).unwrap_or("default").to_owned();
        config = config.set_credentials_provider(FilePassword { user, password });
    }
    ConnectionManager::new_lazy_with_config(client, config)
}
