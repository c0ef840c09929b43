//! `stockgate bench --tls-…`: what TLS to the backends costs. Two servers in
//! this process, one with plaintext URLs and one with TLS URLs to the same
//! PostgreSQL, Redis and RabbitMQ servers (each listening both ways), are
//! measured in alternating order every round: Reserve with stock (gate,
//! dedup, queue and commit all cross TLS) and sold out (answered from the
//! sold-out cache, so only dedup's claim and answer cross TLS, to Redis).

use super::{
    server_config,
    sides::{self, Side},
    tempfile_dir, BenchOptions, Measured,
};

/// The TLS side: URLs to the same servers as the plaintext ones in
/// [`BenchOptions`], and the files every backend's TLS uses.
#[derive(Debug, Clone)]
pub struct TlsBackends {
    pub store: String,
    pub redis_url: String,
    pub queue: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

pub async fn run(options: BenchOptions, tls: TlsBackends) -> anyhow::Result<Vec<Measured>> {
    let dir = tempfile_dir()?;
    let base = format!("sg-bench-tls-{}", uuid::Uuid::now_v7().simple());
    let mut sides = Vec::new();
    for (side, label, secure) in [
        ("plain", "plaintext backends", false),
        ("tls", "TLS to all three", true),
    ] {
        let prefix = format!("{base}-{side}");
        let mut side_options = options.clone();
        if secure {
            side_options.store = tls.store.clone();
            side_options.redis_url = tls.redis_url.clone();
            side_options.queue = tls.queue.clone();
        }
        let mut config = server_config(&side_options, &prefix, &dir.join(format!("{side}.db")))?;
        config.backends.dedup = side_options.redis_url.clone();
        config.layers.dedup.enabled = true;
        config.layers.queue.capacity = options.requests.max(1) * 2;
        for (ca, cert, key) in [
            (
                &mut config.store.tls_ca_file,
                &mut config.store.tls_cert_file,
                &mut config.store.tls_key_file,
            ),
            (
                &mut config.redis.tls_ca_file,
                &mut config.redis.tls_cert_file,
                &mut config.redis.tls_key_file,
            ),
            (
                &mut config.rabbitmq.tls_ca_file,
                &mut config.rabbitmq.tls_cert_file,
                &mut config.rabbitmq.tls_key_file,
            ),
        ] {
            *ca = tls.ca_file.clone();
            *cert = tls.cert_file.clone();
            *key = tls.key_file.clone();
        }
        // Both sides' keys are on the same Redis: the plaintext URL reaches them.
        sides.push(Side::start(label, config, prefix, options.redis_url.clone(), &options).await?);
    }
    sides::run(sides, &options, &dir).await
}

pub fn render(results: &[Measured], options: &BenchOptions, tls: &TlsBackends) -> String {
    let header = format!(
        "{}\nplaintext: store={} gate/dedup={} queue={}\nTLS:       store={} gate/dedup={} queue={}",
        sides::load_line(options),
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.redis_url),
        stockgate::config::redact_url(&options.queue),
        stockgate::config::redact_url(&tls.store),
        stockgate::config::redact_url(&tls.redis_url),
        stockgate::config::redact_url(&tls.queue),
    );
    sides::render(
        results,
        &header,
        "TLS / plaintext (target with stock >= 0.85)",
    )
}
