//! Backend credentials from files (mounted Kubernetes Secrets) rather than
//! URLs in the environment: `backends.<name>_file` holds a backend's whole
//! URL (read at start-up), `backends.<name>_password_file` its password,
//! put into the URL in place of any there. Password files are re-read on
//! SIGHUP ([`Passwords::reload`]): each backend's new connections use the
//! new password, and Redis re-authenticates its open ones, so a rotation
//! needs no restart. Neither ever reaches a log or `check-config`.

use std::fmt::Write as _;

use tokio::sync::watch;

use super::{invalid, BackendsConfig, ConfigError};

/// A backend whose URL may come from files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Store,
    Gate,
    Dedup,
    Queue,
    RateLimit,
}

impl Backend {
    pub const ALL: [Backend; 5] = [
        Backend::Store,
        Backend::Gate,
        Backend::Dedup,
        Backend::Queue,
        Backend::RateLimit,
    ];

    /// The URL key, the URL's file key and the password's file key, each
    /// with its value in `backends`.
    fn settings(self, backends: &BackendsConfig) -> [(&'static str, &str); 3] {
        match self {
            Backend::Store => [
                ("backends.store", &backends.store),
                ("backends.store_file", &backends.store_file),
                (
                    "backends.store_password_file",
                    &backends.store_password_file,
                ),
            ],
            Backend::Gate => [
                ("backends.gate", &backends.gate),
                ("backends.gate_file", &backends.gate_file),
                ("backends.gate_password_file", &backends.gate_password_file),
            ],
            Backend::Dedup => [
                ("backends.dedup", &backends.dedup),
                ("backends.dedup_file", &backends.dedup_file),
                (
                    "backends.dedup_password_file",
                    &backends.dedup_password_file,
                ),
            ],
            Backend::Queue => [
                ("backends.queue", &backends.queue),
                ("backends.queue_file", &backends.queue_file),
                (
                    "backends.queue_password_file",
                    &backends.queue_password_file,
                ),
            ],
            Backend::RateLimit => [
                ("backends.rate_limit", &backends.rate_limit),
                ("backends.rate_limit_file", &backends.rate_limit_file),
                (
                    "backends.rate_limit_password_file",
                    &backends.rate_limit_password_file,
                ),
            ],
        }
    }

    /// The URL in force: `<name>_file`'s content if set, else `<name>`,
    /// with `<name>_password_file`'s password put in if set.
    pub fn url(self, backends: &BackendsConfig) -> Result<String, ConfigError> {
        let [(_, url), (url_file_key, url_file), (password_key, password_file)] =
            self.settings(backends);
        let url = if url_file.is_empty() {
            url.to_owned()
        } else {
            read_secret(url_file_key, url_file)?
        };
        if password_file.is_empty() {
            return Ok(url);
        }
        if url == super::EMBEDDED {
            return Err(invalid(
                password_key,
                "the backend is embedded: there is no server to log in to",
            ));
        }
        let password = read_secret(password_key, password_file)?;
        with_password(&url, &password).ok_or_else(|| {
            invalid(
                password_key,
                "the backend's URL has no host to put a password before",
            )
        })
    }
}

/// A secret file's content without surrounding whitespace (editors and
/// `kubectl create secret --from-file` add a newline).
fn read_secret(key: &'static str, path: &str) -> Result<String, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid(key, format!("cannot be read: {e}")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(key, "the file is empty"));
    }
    Ok(text.to_owned())
}

/// `url` (`scheme://[user[:old]@]host…`) with `password` as its password,
/// percent-encoded; `None` if it is not of that shape.
pub fn with_password(url: &str, password: &str) -> Option<String> {
    let (scheme, user, host, tail) = split_url(url)?;
    if host.is_empty() {
        return None;
    }
    let mut out = format!("{scheme}://{user}:");
    for byte in password.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    let _ = write!(out, "@{host}{tail}");
    Some(out)
}

/// The user name in `url`'s userinfo, if any.
pub fn user_of(url: &str) -> Option<&str> {
    let (_, user, ..) = split_url(url)?;
    (!user.is_empty()).then_some(user)
}

/// The hosts (`host:port`) a URL's authority lists, in order; empty
/// entries (`h1,,h2`) kept, so validation can refuse them.
pub fn hosts_of(url: &str) -> Vec<&str> {
    split_url(url).map_or_else(Vec::new, |(_, _, hosts, _)| hosts.split(',').collect())
}

/// `url` once per host when its authority lists several
/// (`amqp://u:p@h1:5672,h2:5672/vhost`: one URL for `h1`, one for `h2`,
/// each with the same credentials and tail); `[url]` otherwise.
pub fn per_host(url: &str) -> Vec<String> {
    let Some((scheme, _, hosts, tail)) = split_url(url) else {
        return vec![url.to_owned()];
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    let userinfo = {
        let rest = &url[scheme.len() + 3..];
        rest[..rest.len() - tail.len() - hosts.len()].to_owned()
    };
    hosts
        .split(',')
        .map(|host| format!("{scheme}://{userinfo}{host}{tail}"))
        .collect()
}

/// `scheme://[user[:password]@]host[tail]` as (scheme, user or "", host,
/// tail from the first `/`, `?` or `#`).
fn split_url(url: &str) -> Option<(&str, &str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (userinfo.split_once(':').map_or(userinfo, |(u, _)| u), host),
        None => ("", authority),
    };
    Some((scheme, user, host, tail))
}

/// How to reach one backend: its URL, whose password may be rotated at run
/// time (each connection attempt asks for [`LiveUrl::current`]), and the
/// TLS material its section names, used when the URL asks for TLS.
#[derive(Clone)]
pub struct LiveUrl {
    url: String,
    password: Option<watch::Receiver<String>>,
    tls: Option<crate::tls::TlsPem>,
    /// Of a URL listing several hosts, the one to try first: the last that
    /// answered, shared by every clone (a replica's publisher, processor
    /// and dead-letter sessions), starting at a random one so a fleet
    /// spreads over the hosts.
    first_host: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LiveUrl {
    /// `url` as is, or with the password from `password` as it changes.
    pub fn new(url: &str, password: Option<watch::Receiver<String>>) -> Self {
        Self {
            url: url.to_owned(),
            password,
            tls: None,
            first_host: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(
                rand::random::<u16>().into(),
            )),
        }
    }

    /// [`Self::current`] once per host, in the order to try them: from
    /// the one that answered last (or a random one) onwards, each with its
    /// index for [`Self::answered`].
    pub fn hosts(&self) -> Vec<(usize, String)> {
        let urls = per_host(&self.current());
        let first = self.first_host.load(std::sync::atomic::Ordering::Relaxed) % urls.len();
        let mut order: Vec<(usize, String)> = urls.into_iter().enumerate().collect();
        order.rotate_left(first);
        order
    }

    /// Host `index` of [`Self::hosts`] answered: try it first next time.
    pub fn answered(&self, index: usize) {
        self.first_host
            .store(index, std::sync::atomic::Ordering::Relaxed);
    }

    /// With the CA and client certificate of `tls` for TLS connections.
    pub fn with_tls(mut self, tls: crate::tls::TlsPem) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The TLS material configured for this backend, if any.
    pub fn tls(&self) -> Option<&crate::tls::TlsPem> {
        self.tls.as_ref()
    }

    /// Whether the URL asks for TLS (`rediss://`, `rediss+cluster://`,
    /// `amqps://`).
    pub fn is_tls(&self) -> bool {
        ["rediss://", "rediss+cluster://", "amqps://"]
            .iter()
            .any(|scheme| self.url.starts_with(scheme))
    }

    /// Which keys decide how this connection is made, for errors: a failed
    /// handshake or a plaintext client at a TLS port is fixed there.
    pub fn describe(&self, url_key: &str) -> String {
        match (&self.tls, self.is_tls()) {
            (_, false) => format!("{url_key}, plaintext"),
            (Some(tls), true) => tls.hint(url_key),
            (None, true) => format!("TLS per {url_key}, verified with the system roots"),
        }
    }

    /// The URL to connect with now.
    pub fn current(&self) -> String {
        match &self.password {
            Some(password) => {
                with_password(&self.url, &password.borrow()).unwrap_or_else(|| self.url.clone())
            }
            None => self.url.clone(),
        }
    }

    /// The password as it changes, if it comes from a file.
    pub fn password(&self) -> Option<watch::Receiver<String>> {
        self.password.clone()
    }
}

impl std::fmt::Debug for LiveUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveUrl")
            .field("url", &super::redact_url(&self.url))
            .field("password_file", &self.password.is_some())
            .field("tls", &self.tls)
            .finish()
    }
}

impl From<&str> for LiveUrl {
    fn from(url: &str) -> Self {
        Self::new(url, None)
    }
}

impl From<&String> for LiveUrl {
    fn from(url: &String) -> Self {
        Self::new(url, None)
    }
}

/// The password files in force, one watch per backend that has one: its
/// users read the current password when they connect (or, for Redis,
/// re-authenticate when it changes).
#[derive(Default)]
pub struct Passwords {
    files: Vec<(Backend, String, watch::Sender<String>)>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<_> = self.files.iter().map(|(_, path, _)| path).collect();
        f.debug_struct("Passwords").field("files", &files).finish()
    }
}

impl Passwords {
    /// Reads every `<name>_password_file` (already validated by
    /// [`Backend::url`]).
    pub fn from_config(backends: &BackendsConfig) -> Result<Self, ConfigError> {
        let mut files = Vec::new();
        for backend in Backend::ALL {
            let [.., (key, path)] = backend.settings(backends);
            if path.is_empty() {
                continue;
            }
            let password = read_secret(key, path)?;
            files.push((backend, path.to_owned(), watch::Sender::new(password)));
        }
        Ok(Self { files })
    }

    /// The password of `backend` as it changes, if it comes from a file.
    pub fn watch(&self, backend: Backend) -> Option<watch::Receiver<String>> {
        self.files
            .iter()
            .find(|(b, ..)| *b == backend)
            .map(|(_, _, tx)| tx.subscribe())
    }

    /// Re-reads the files (SIGHUP). A file that cannot be read keeps the
    /// old password; a backend whose file moved, or that gained or lost
    /// one, changes only at restart.
    pub fn reload(&self, backends: &BackendsConfig) {
        for backend in Backend::ALL {
            let [.., (key, path)] = backend.settings(backends);
            let running = self.files.iter().find(|(b, ..)| *b == backend);
            match running {
                Some((_, running_path, tx)) if running_path == path => {
                    match read_secret(key, path) {
                        Ok(password) => {
                            let changed = tx.send_if_modified(|old| {
                                let changed = *old != password;
                                *old = password;
                                changed
                            });
                            if changed {
                                tracing::info!(
                                    key,
                                    "reload: password file changed; new connections use it"
                                );
                            }
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "reload: keeping the old password")
                        }
                    }
                }
                None if path.is_empty() => {}
                _ => tracing::warn!(
                    key,
                    "reload: a password file added, moved or removed takes effect at restart"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_goes_into_the_url_encoded() {
        assert_eq!(
            with_password(
                "postgres://app:old@db:5432/sale?sslmode=require",
                "n3w/p@ss:wd"
            )
            .unwrap(),
            "postgres://app:n3w%2Fp%40ss%3Awd@db:5432/sale?sslmode=require"
        );
        assert_eq!(
            with_password("redis://127.0.0.1:6379/0", "s").unwrap(),
            "redis://:s@127.0.0.1:6379/0"
        );
        assert_eq!(
            with_password("amqp://guest@rabbit:5672/%2f", "x y").unwrap(),
            "amqp://guest:x%20y@rabbit:5672/%2f"
        );
        assert_eq!(with_password("embedded", "x"), None);
        assert_eq!(user_of("redis://ops:pw@h:1"), Some("ops"));
        assert_eq!(user_of("redis://:pw@h:1"), None);
        assert_eq!(user_of("redis://h:1"), None);
    }

    #[test]
    fn a_url_of_several_hosts_is_tried_host_by_host_from_the_last_that_answered() {
        assert_eq!(
            per_host("amqp://u:p%40@a:1,b:2,[::1]:3/%2f?heartbeat=5"),
            [
                "amqp://u:p%40@a:1/%2f?heartbeat=5",
                "amqp://u:p%40@b:2/%2f?heartbeat=5",
                "amqp://u:p%40@[::1]:3/%2f?heartbeat=5",
            ]
        );
        assert_eq!(per_host("amqp://a:1/%2f"), ["amqp://a:1/%2f"]);
        assert_eq!(per_host("amqp://a,,b"), ["amqp://a", "amqp://", "amqp://b"]);

        let (_tx, rx) = watch::channel("rotated".to_owned());
        let url = LiveUrl::new("amqp://u@a:1,b:2,c:3/v", Some(rx));
        let urls = |url: &LiveUrl| url.hosts().into_iter().map(|(_, u)| u).collect::<Vec<_>>();
        url.answered(1);
        let clone = url.clone();
        assert_eq!(
            urls(&clone),
            [
                "amqp://u:rotated@b:2/v",
                "amqp://u:rotated@c:3/v",
                "amqp://u:rotated@a:1/v"
            ]
        );
        assert_eq!(clone.hosts()[2].0, 0);
        clone.answered(2);
        assert_eq!(url.hosts()[0].1, "amqp://u:rotated@c:3/v");
    }

    #[test]
    fn debug_output_shows_no_password() {
        let (tx, rx) = watch::channel("rotated-secret".to_owned());
        let url = LiveUrl::new("redis://:inline-secret@h:6379", Some(rx));
        let shown = format!("{url:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let passwords = Passwords {
            files: vec![(Backend::Gate, "/run/pw".into(), tx)],
        };
        let shown = format!("{passwords:?}");
        assert!(
            !shown.contains("secret") && shown.contains("/run/pw"),
            "{shown}"
        );
    }

    #[test]
    fn urls_and_passwords_come_from_files_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        let password_file = dir.path().join("password");
        std::fs::write(&url_file, "postgres://app:inline@db/sale\n").unwrap();
        std::fs::write(&password_file, "  s3cret\n").unwrap();
        let mut backends = BackendsConfig {
            store_file: url_file.display().to_string(),
            store_password_file: password_file.display().to_string(),
            ..BackendsConfig::default()
        };
        assert_eq!(
            Backend::Store.url(&backends).unwrap(),
            "postgres://app:s3cret@db/sale"
        );
        let passwords = Passwords::from_config(&backends).unwrap();
        let mut watch = passwords.watch(Backend::Store).unwrap();
        assert!(passwords.watch(Backend::Gate).is_none());
        std::fs::write(&password_file, "rotated").unwrap();
        passwords.reload(&backends);
        assert!(watch.has_changed().unwrap());
        assert_eq!(*watch.borrow_and_update(), "rotated");
        // An unreadable file keeps the old password.
        std::fs::remove_file(&password_file).unwrap();
        passwords.reload(&backends);
        assert!(!watch.has_changed().unwrap());

        backends.gate_password_file = dir.path().join("missing").display().to_string();
        backends.gate = "redis://127.0.0.1:6379".into();
        let err = Backend::Gate.url(&backends).unwrap_err().to_string();
        assert!(err.contains("backends.gate_password_file"), "{err}");
        backends.gate = "embedded".into();
        std::fs::write(dir.path().join("missing"), "x").unwrap();
        let err = Backend::Gate.url(&backends).unwrap_err().to_string();
        assert!(err.contains("embedded"), "{err}");
    }
}
