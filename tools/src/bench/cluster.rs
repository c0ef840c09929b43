//! `stockgate bench --cluster URL`: the gate and the dedup store on a
//! Redis Cluster next to one Redis server, both on this machine, through
//! two servers in this process that differ in nothing else (see
//! [`super::sides`]).

use super::{
    server_config,
    sides::{self, Side},
    tempfile_dir, BenchOptions, Measured,
};

pub async fn run(options: BenchOptions, cluster_url: &str) -> anyhow::Result<Vec<Measured>> {
    let dir = tempfile_dir()?;
    let base = format!("sg-bench-cluster-{}", uuid::Uuid::now_v7().simple());
    let mut sides = Vec::new();
    for (side, label, redis_url) in [
        ("single", "one Redis server", options.redis_url.clone()),
        ("cluster", "Redis Cluster", cluster_url.to_owned()),
    ] {
        let prefix = format!("{base}-{side}");
        let side_options = BenchOptions {
            redis_url: redis_url.clone(),
            ..options.clone()
        };
        let mut config = server_config(&side_options, &prefix, &dir.join(format!("{side}.db")))?;
        config.backends.dedup = redis_url.clone();
        config.layers.dedup.enabled = true;
        config.layers.queue.capacity = options.requests.max(1) * 2;
        sides.push(Side::start(label, config, prefix, redis_url, &options).await?);
    }
    sides::run(sides, &options, &dir).await
}

pub fn render(results: &[Measured], options: &BenchOptions, cluster_url: &str) -> String {
    let header = format!(
        "{}\nstore={} queue={}\none server: {}\ncluster:    {}",
        sides::load_line(options),
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        stockgate::config::redact_url(&options.redis_url),
        stockgate::config::redact_url(cluster_url),
    );
    sides::render(results, &header, "cluster / one server (target >= 0.9)")
}
