//! The container image, run the way the Kubernetes pods run it. `ci/image-check`
//! builds the image from the unchanged Dockerfile and runs this test with
//! `STOCKGATE_IMAGE` naming it; the plain suite skips it (ignored), since
//! building the image takes most of ten minutes on this machine kind.
//!
//! Each container is started with podman from what the rendered base
//! manifests say, not from a copy of them: the container's args and
//! environment, the user and group, a read-only root, every capability
//! dropped, no new privileges, the ConfigMap's `stockgate.toml` and the
//! Secret's files mounted where the pod mounts them (mode and group as the
//! kubelet sets them), `/tmp` as a size-limited scratch volume, the memory
//! and CPU limits. What differs is only what a shared machine needs: each
//! container has its own network namespace (slirp4netns) whose published
//! ports the test picks, the backends are reached at the host's loopback
//! (10.0.2.2 inside), and the Redis key prefix and the queue name are the
//! test's own.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use stockgate::{
    config::Config,
    domain::{ReservationState, Sku},
    pb::{
        admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
        ReserveOutcome, SetStockRequest,
    },
};
use tonic::{Code, Request};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::harness::{
    amqp_url, connect, delete_rabbit, free_port, list_consumers as consumers, open_store,
    python_packages, redis_url, reserve, wipe_redis_prefix, TestDb, ROOT,
};

/// The host's loopback as slirp4netns shows it inside a container.
const HOST: &str = "10.0.2.2";
const TOKEN: &str = "image-check-admin-token";

fn image() -> String {
    std::env::var("STOCKGATE_IMAGE")
        .expect("STOCKGATE_IMAGE names the image to check: run ci/image-check")
}

/// The rendered base, every object as JSON.
fn rendered_base() -> Vec<Value> {
    let yaml = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/k8s/base")])
        .output()
        .expect("kubectl (with its built-in kustomize) is installed on this machine kind");
    assert!(yaml.status.success(), "{yaml:?}");
    let pyyaml = python_packages("pyyaml", "yaml", &["PyYAML==6.0.3"]);
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .env("PYTHONPATH", pyyaml)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python
        .stdin
        .take()
        .unwrap()
        .write_all(&yaml.stdout)
        .unwrap();
    let json = python.wait_with_output().unwrap();
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).unwrap()
}

fn object<'a>(objects: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* in the base"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Kubernetes quantities as podman takes them: `64Mi` → `64m`.
fn quantity(q: &str) -> String {
    match q.strip_suffix("Mi") {
        Some(mebibytes) => format!("{mebibytes}m"),
        None => panic!("a quantity this test does not translate: {q}"),
    }
}

/// One pod template's container, turned into `podman run` arguments.
struct PodTemplate {
    /// Security, limits and volumes: everything before the image.
    options: Vec<String>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    ports: Vec<u16>,
    /// What the process has after SIGTERM: the pod's grace period less the
    /// preStop sleep the kubelet runs first.
    after_sigterm: Duration,
}

/// What the test hands the pods: the Secret's files and the ConfigMap's.
struct Volumes {
    dir: tempfile::TempDir,
    secret: BTreeMap<&'static str, String>,
    config_map: BTreeMap<String, String>,
}

/// Fails on any key of `object` outside `known`: a manifest field this
/// test does not carry over to podman must not pass unnoticed.
fn only_known(what: &str, object: &Value, known: &[&str]) {
    for key in object.as_object().unwrap().keys() {
        assert!(
            known.contains(&key.as_str()),
            "{what}.{key} is not carried over to the container by this test"
        );
    }
}

impl PodTemplate {
    fn from(workload: &Value, volumes: &Volumes) -> Self {
        let pod = &workload["spec"]["template"]["spec"];
        assert!(pod.get("initContainers").is_none(), "init containers");
        assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
        let container = &pod["containers"][0];
        only_known(
            "container",
            container,
            &[
                "name",
                "image",
                "imagePullPolicy",
                "args",
                "ports",
                "env",
                "startupProbe",
                "readinessProbe",
                "livenessProbe",
                "lifecycle",
                "resources",
                "securityContext",
                "volumeMounts",
            ],
        );
        let pod_security = &pod["securityContext"];
        let security = &container["securityContext"];
        let id = |key: &str| {
            security[key]
                .as_u64()
                .or(pod_security[key].as_u64())
                .unwrap_or_else(|| panic!("{key} is set"))
        };
        assert_eq!(security["runAsNonRoot"], true);
        // seccomp: RuntimeDefault is the runtime's default profile, which
        // podman applies unless told otherwise.
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        let mut options = vec![format!("--user={}:{}", id("runAsUser"), id("runAsGroup"))];
        if let Some(group) = pod_security["fsGroup"].as_u64() {
            options.push(format!("--group-add={group}"));
        }
        if security["readOnlyRootFilesystem"] == true {
            // A pod gets no writable scratch it did not ask for.
            options.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        if security["allowPrivilegeEscalation"] == false {
            options.push("--security-opt=no-new-privileges".into());
        }
        assert_eq!(security["privileged"], false);
        only_known("capabilities", &security["capabilities"], &["drop"]);
        for cap in strings(&security["capabilities"]["drop"]) {
            options.push(format!("--cap-drop={cap}"));
        }
        let limits = &container["resources"]["limits"];
        if let Some(memory) = limits["memory"].as_str() {
            options.push(format!("--memory={}", quantity(memory)));
        }
        if let Some(cpu) = limits["cpu"].as_str() {
            let cpus = match cpu.strip_suffix('m') {
                Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
                None => cpu.parse().unwrap(),
            };
            options.push(format!("--cpus={cpus}"));
        }
        for mount in container["volumeMounts"].as_array().unwrap() {
            only_known("volumeMount", mount, &["name", "mountPath", "readOnly"]);
            let name = mount["name"].as_str().unwrap();
            let path = mount["mountPath"].as_str().unwrap();
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap();
            let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
            if volume.get("emptyDir").is_some() {
                only_known("emptyDir", &volume["emptyDir"], &["sizeLimit"]);
                let size = volume["emptyDir"]["sizeLimit"]
                    .as_str()
                    .map(quantity)
                    .unwrap_or_else(|| "64m".into());
                let mode = if read_only.is_empty() { "rw" } else { "ro" };
                options.push(format!("--tmpfs={path}:{mode},size={size},mode=1777"));
            } else {
                let dir = volumes.materialise(name, volume, pod_security["fsGroup"].as_u64());
                options.push(format!("--volume={}:{path}{read_only}", dir.display()));
            }
        }
        let env = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"]
                        .as_str()
                        .expect("plain values: secrets come as files")
                        .to_owned(),
                )
            })
            .collect();
        let ports = container["ports"]
            .as_array()
            .map(|ports| {
                ports
                    .iter()
                    .map(|p| p["containerPort"].as_u64().unwrap() as u16)
                    .collect()
            })
            .unwrap_or_default();
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        Self {
            options,
            env,
            args: strings(&container["args"]),
            ports,
            after_sigterm: Duration::from_secs(grace - pre_stop),
        }
    }
}

impl Volumes {
    fn new(config_map: &Value, secret: BTreeMap<&'static str, String>) -> Self {
        let config_map = config_map["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        Self {
            dir: tempfile::tempdir().unwrap(),
            secret,
            config_map,
        }
    }

    /// The volume's files, as the kubelet projects them: the listed items
    /// only, `defaultMode`, group `fsGroup`.
    fn materialise(&self, name: &str, volume: &Value, fs_group: Option<u64>) -> std::path::PathBuf {
        let (source, data): (&Value, BTreeMap<&str, &str>) = if volume.get("secret").is_some() {
            (
                &volume["secret"],
                self.secret.iter().map(|(k, v)| (*k, v.as_str())).collect(),
            )
        } else if volume.get("configMap").is_some() {
            (
                &volume["configMap"],
                self.config_map
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            )
        } else {
            panic!("a volume kind this test does not project: {volume}");
        };
        let dir = self
            .dir
            .path()
            .join(format!("{name}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        only_known(
            "volume source",
            source,
            &["name", "secretName", "defaultMode", "items"],
        );
        let mode = match source.get("defaultMode") {
            Some(mode) => mode.as_u64().expect("defaultMode is a number") as u32,
            None => 0o644,
        };
        for item in source["items"].as_array().unwrap() {
            only_known("volume item", item, &["key", "path"]);
            let key = item["key"].as_str().unwrap();
            let file = dir.join(item["path"].as_str().unwrap());
            let content = data
                .get(key)
                .unwrap_or_else(|| panic!("the pod wants {key}, which the test does not provide"));
            std::fs::write(&file, content).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            if let Some(group) = fs_group {
                std::os::unix::fs::chown(&file, Some(0), Some(group as u32)).unwrap();
            }
        }
        dir
    }
}

/// A running container, removed when dropped.
struct Pod {
    name: String,
    child: std::process::Child,
    after_sigterm: Duration,
    /// Container port → the host port it is published on.
    ports: BTreeMap<u16, u16>,
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.stdin(Stdio::null());
    command
}

/// This machine kind's VM has no CAP_SYS_RESOURCE, so a container cannot
/// get more open files than the test has (podman's default asks for more),
/// and `RLIMIT_NPROC` only below what podman's own processes run under.
fn ulimits() -> [String; 2] {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let files = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|hard| hard.parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    [
        format!("--ulimit=nofile={files}:{files}"),
        "--ulimit=nproc=8192:8192".into(),
    ]
}

/// `podman run` of `template` with `args` instead of the template's
/// (when given), plus the test's own key prefix and queue.
fn podman_run(
    template: &PodTemplate,
    args: Option<&[&str]>,
    extra_env: &[(String, String)],
) -> (Command, String, BTreeMap<u16, u16>) {
    let name = format!("sg-image-check-{}", uuid::Uuid::now_v7().simple());
    let mut command = podman();
    // runc: Debian 12's crun refuses resource limits on this machine's
    // hybrid cgroup layout.
    command.args([
        "run",
        "--runtime=runc",
        "--rm",
        "--pull=never",
        "--name",
        &name,
    ]);
    command.arg("--network=slirp4netns:allow_host_loopback=true");
    command.args(ulimits());
    command.args(&template.options);
    let mut ports = BTreeMap::new();
    for &port in &template.ports {
        let host = free_port();
        command.arg(format!("--publish=127.0.0.1:{host}:{port}"));
        ports.insert(port, host);
    }
    for (key, value) in template.env.iter().chain(extra_env) {
        command.arg(format!("--env={key}={value}"));
    }
    command.arg(image());
    match args {
        Some(args) => command.args(args),
        None => command.args(&template.args),
    };
    (command, name, ports)
}

impl Pod {
    fn start(
        template: &PodTemplate,
        extra_env: &[(String, String)],
        log: &std::path::Path,
    ) -> Self {
        let (mut command, name, ports) = podman_run(template, None, extra_env);
        let log = std::fs::File::create(log).unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("podman runs");
        Self {
            name,
            child,
            ports,
            after_sigterm: template.after_sigterm,
        }
    }

    fn port(&self, container: u16) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.ports[&container])
            .parse()
            .unwrap()
    }

    /// What the kubelet sends to stop a pod, then the exit status, which
    /// must come within the pod's grace.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let within = self.after_sigterm;
        let status = podman()
            .args(["kill", "--signal", "TERM", &self.name])
            .status()
            .unwrap();
        assert!(status.success(), "podman kill {}", self.name);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?} of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time=0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // A podman that had not made the container yet would wait on.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Health of the whole server on `addr`, once the port answers gRPC.
async fn health(addr: std::net::SocketAddr, within: Duration) -> ServingStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
        {
            if let Ok(answer) = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                return ServingStatus::try_from(answer.into_inner().status).unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr} did not answer health within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn serving(addr: std::net::SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while health(addr, within).await != ServingStatus::Serving {
        assert!(
            Instant::now() < deadline,
            "{addr} not SERVING within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn held_rows(config: &Config, sku: &str) -> usize {
    held_by_user(config, sku).await.values().sum()
}

/// Held reservations of `sku`, counted by the user who made them.
async fn held_by_user(config: &Config, sku: &str) -> BTreeMap<String, usize> {
    let mut held = BTreeMap::new();
    for row in open_store(config)
        .reservations_of(&Sku::parse(sku).unwrap())
        .await
        .unwrap()
    {
        if row.state == ReservationState::Held {
            *held.entry(row.user.as_str().to_owned()).or_insert(0) += 1;
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the image: ci/image-check builds it and runs this test"]
async fn the_image_runs_as_the_pods_do() {
    let image = image();
    let scratch = tempfile::tempdir().unwrap();
    let log = |name: &str| scratch.path().join(format!("{name}.log"));

    // The image's own user is the nonroot one, which `runAsNonRoot` needs.
    let user = podman()
        .args(["image", "inspect", "--format", "{{.Config.User}}", &image])
        .output()
        .unwrap();
    assert!(user.status.success(), "{user:?}");
    let user = String::from_utf8_lossy(&user.stdout).trim().to_owned();
    assert!(
        user == "65532" || user.starts_with("65532:"),
        "the image runs as {user:?}"
    );

    let objects = rendered_base();
    // Made after everything that can fail outside the cleanup below.
    let db = TestDb::create().await;
    let prefix = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
    let queue = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
    let inside = |url: &str| url.replace("127.0.0.1", HOST).replace("localhost", HOST);
    let secret = BTreeMap::from([
        ("admin-token", TOKEN.to_owned()),
        ("store-url", inside(&db.url)),
        ("gate-url", inside(&redis_url())),
        ("queue-url", inside(&amqp_url())),
    ]);
    let volumes = Volumes::new(object(&objects, "ConfigMap", "stockgate-config"), secret);
    let api = PodTemplate::from(object(&objects, "Deployment", "stockgate-api"), &volumes);
    let processor = PodTemplate::from(
        object(&objects, "Deployment", "stockgate-processor"),
        &volumes,
    );
    let migrate = PodTemplate::from(object(&objects, "Job", "stockgate-migrate"), &volumes);
    let ours = vec![
        ("STOCKGATE_REDIS__KEY_PREFIX".to_owned(), prefix.clone()),
        ("STOCKGATE_RABBITMQ__QUEUE".to_owned(), queue.clone()),
    ];
    // What the test reads back through its own config.
    let mut config = Config::default();
    config.backends.store = db.url.clone();
    config.rabbitmq.queue = queue.clone();

    let result = async {
        // `--version` names the revision the build was given.
        let (mut command, _, _) = podman_run(&api, Some(&["--version"]), &[]);
        let version = command.output().unwrap();
        assert!(version.status.success(), "{version:?}");
        let version = String::from_utf8_lossy(&version.stdout);
        let package = stockgate::VERSION.split(' ').next().unwrap();
        assert!(
            version.contains(&format!("stockgate {package} (")),
            "{version}"
        );
        if let Ok(revision) = std::env::var("STOCKGATE_IMAGE_REVISION") {
            assert!(version.contains(&revision), "{version} lacks {revision}");
        }

        // The shipped config with the pod's environment is valid, and the
        // environment took effect.
        let (mut command, _, _) = podman_run(&api, Some(&["check-config"]), &ours);
        let checked = command.output().unwrap();
        assert!(checked.status.success(), "{checked:?}");
        let checked = String::from_utf8_lossy(&checked.stdout);
        for line in [
            "role = \"api\"",
            "token_file = \"/var/run/secrets/stockgate/admin-token\"",
            "store_file = \"/var/run/secrets/stockgate/store-url\"",
        ] {
            assert!(checked.contains(line), "{line} not in {checked}");
        }

        // Before the migration the API runs and says NOT_SERVING.
        let mut api_pod = Pod::start(&api, &ours, &log("api"));
        let grpc = api_pod.port(50051);
        assert_eq!(
            health(grpc, Duration::from_secs(60)).await,
            ServingStatus::NotServing,
            "health before the migration"
        );

        // The migration Job's pod, then SERVING.
        let mut job = Pod::start(&migrate, &[], &log("migrate"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = job.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the migration ran over a minute");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            status.success(),
            "the migration Job's pod exited with {status:?}"
        );
        serving(grpc, Duration::from_secs(60)).await;

        // Two processors: one active consumer, one standby.
        let mut first = Pod::start(&processor, &ours, &log("processor-1"));
        serving(first.port(50051), Duration::from_secs(60)).await;
        wait_for(
            "the first processor consuming",
            Duration::from_secs(30),
            || consumers(&queue) == vec![true],
        )
        .await;
        let second = Pod::start(&processor, &ours, &log("processor-2"));
        serving(second.port(50051), Duration::from_secs(60)).await;
        wait_for("two consumers, one active", Duration::from_secs(30), || {
            consumers(&queue) == vec![false, true]
        })
        .await;

        // Reserve through the image: stock set on the admin listener with
        // the token from the Secret, orders committed by the processor.
        let admin_channel = connect(api_pod.port(50052)).await;
        let set_stock = |stock: i64| {
            let mut admin = AdminServiceClient::new(admin_channel.clone());
            async move {
                let mut request = Request::new(SetStockRequest {
                    sku: "IMAGE".into(),
                    stock,
                    max_per_user: 0,
                });
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
                admin.set_stock(request).await.unwrap();
            }
        };
        set_stock(5).await;
        let mut inventory = InventoryServiceClient::new(connect(grpc).await);
        let mut outcomes = BTreeMap::new();
        for i in 0..8 {
            let answer = reserve(&mut inventory, "IMAGE", 1, &format!("buyer-{i}"))
                .await
                .unwrap();
            *outcomes.entry(answer.outcome()).or_insert(0) += 1;
        }
        assert_eq!(
            outcomes,
            BTreeMap::from([(ReserveOutcome::Queued, 5), (ReserveOutcome::SoldOut, 3)])
        );
        let mut held = 0;
        for _ in 0..150 {
            held = held_rows(&config, "IMAGE").await;
            if held == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(held, 5, "the processor committed every queued order");

        // SIGTERM to the active processor: it exits cleanly and the
        // standby takes the queue over.
        let status = tokio::task::spawn_blocking(move || first.terminate())
            .await
            .unwrap();
        assert!(
            status.success(),
            "the first processor exited with {status:?}"
        );
        wait_for("the standby active", Duration::from_secs(30), || {
            consumers(&queue) == vec![true]
        })
        .await;

        // SIGTERM to the API in the middle of calls: it drains and exits
        // cleanly; every call is answered until the stop, and every
        // admitted order is committed by the standby, no other.
        // More stock than the calls can take: each is admitted. The one
        // call that fails may still have been admitted: its answer can be
        // lost with the connection, and a caller who retries it with its
        // key finds its order.
        set_stock(1_000_000).await;
        let stopping = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn({
            let stopping = Arc::clone(&stopping);
            async move {
                let mut admitted = 0;
                for i in 0.. {
                    match reserve(&mut inventory, "IMAGE", 1, &format!("drain-{i}")).await {
                        Ok(answer) if answer.outcome() == ReserveOutcome::Queued => admitted += 1,
                        Ok(answer) => panic!("unexpected {:?}", answer.outcome()),
                        Err(status) => {
                            eprintln!("drain-{i} failed at the stop: {status:?}");
                            assert!(
                                stopping.load(Ordering::SeqCst),
                                "a caller saw {status:?} before the stop"
                            );
                            // UNAVAILABLE from the draining server, or the
                            // connection refused or reset once it has gone
                            // (the published port's forwarder resets).
                            assert!(
                                matches!(status.code(), Code::Unavailable | Code::Cancelled)
                                    || status.message() == "transport error",
                                "a caller saw {status:?}"
                            );
                            break;
                        }
                    }
                }
                admitted
            }
        });
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        stopping.store(true, Ordering::SeqCst);
        let status = tokio::task::spawn_blocking(move || api_pod.terminate())
            .await
            .unwrap();
        assert!(status.success(), "the API exited with {status:?}");
        let admitted = load.await.unwrap();
        assert!(admitted > 0, "the load ran before the stop");
        let mut held = BTreeMap::new();
        for _ in 0..150 {
            held = held_by_user(&config, "IMAGE").await;
            if (0..admitted).all(|i| held.contains_key(&format!("drain-{i}"))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let unanswered = format!("drain-{admitted}");
        let stray: Vec<_> = held
            .iter()
            .filter(|(user, count)| {
                let admitted_user = user.starts_with("buyer-")
                    || user
                        .strip_prefix("drain-")
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i < admitted);
                **count != 1 || !(admitted_user || **user == unanswered)
            })
            .collect();
        assert!(stray.is_empty(), "orders no admitted call made: {stray:?}");
        let missing: Vec<_> = (0..admitted)
            .map(|i| format!("drain-{i}"))
            .filter(|user| !held.contains_key(user))
            .collect();
        assert!(missing.is_empty(), "admitted calls lost: {missing:?}");
        assert_eq!(
            held.keys()
                .filter(|user| user.starts_with("buyer-"))
                .count(),
            5,
            "the first five buyers' orders"
        );
        drop(second);
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    if outcome.is_err() {
        for entry in std::fs::read_dir(scratch.path()).unwrap() {
            let path = entry.unwrap().path();
            eprintln!(
                "--- {}\n{}",
                path.display(),
                std::fs::read_to_string(&path).unwrap_or_default()
            );
        }
    }
    db.drop_now().await;
    delete_rabbit(&config).await;
    wipe_redis_prefix(&prefix).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
