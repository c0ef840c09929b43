//! What a Kubernetes rollout relies on: a server told to stop (SIGTERM)
//! under load answers every caller and keeps every order it accepted; and
//! the manifests render and pass strict schema validation.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use stockgate::{
    config::Config,
    domain::{ReservationState, Sku},
    pb::{admin_service_client::AdminServiceClient, ReserveOutcome, SetStockRequest},
};
use tonic::{transport::Endpoint, Code};

use crate::harness::{is_admitted, open_store, with_user};

/// The real binary under a steady stream of Reserve calls gets SIGTERM, as
/// a rolling update sends it. Every call ends: with a result, or, once the
/// server stopped taking calls, UNAVAILABLE (connection refused) or
/// CANCELLED (the client had the call queued on a connection the server
/// closed after its last in-flight call) — never a hang or another error.
/// Every caller told RESERVED or QUEUED finds its order in the database
/// after the server exited (the queue drained before exit), and there is
/// no other order: so the refused calls were not processed, and a retry
/// (with the same idempotency key) is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_caller_and_keeps_every_accepted_order() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let sqlite = dir.path().join("drain.db").display().to_string();
    let file = dir.path().join("stockgate.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_ms = 10000\n[store]\nsqlite_path = \"{sqlite}\"\n[metrics]\nlisten = \"\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .args(["--config", file.to_str().unwrap(), "serve"])
        .env_remove("STOCKGATE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    let mut admin =
        AdminServiceClient::new(Endpoint::from_shared(addr.clone()).unwrap().connect_lazy());
    let mut ready = false;
    for _ in 0..200 {
        let set = admin
            .set_stock(SetStockRequest {
                sku: "DRAIN".into(),
                stock: 1_000_000,
                max_per_user: 0,
            })
            .await;
        if set.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the server did not start");

    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            Endpoint::from_shared(addr.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..32)
        .map(|caller| {
            let channel = channels[caller % channels.len()].clone();
            let stopping = stopping.clone();
            tokio::spawn(async move {
                let mut client =
                    stockgate::pb::inventory_service_client::InventoryServiceClient::new(channel);
                let mut answers = Vec::new();
                for call in 0.. {
                    let mut request = with_user(
                        stockgate::pb::ReserveRequest {
                            sku: "DRAIN".into(),
                            quantity: 1,
                            ..Default::default()
                        },
                        &format!("c{caller}-{call}"),
                        None,
                    );
                    // A hang shows as DEADLINE_EXCEEDED, which fails the test.
                    request.set_timeout(Duration::from_secs(20));
                    let answer = client.reserve(request).await.map(|r| r.into_inner());
                    let failed = answer.is_err();
                    answers.push(answer);
                    if failed && stopping.load(Ordering::Relaxed) {
                        break;
                    }
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stopping.store(true, Ordering::Relaxed);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    let mut told: HashMap<String, ReserveOutcome> = HashMap::new();
    let mut errors: HashMap<Code, usize> = HashMap::new();
    let mut answered = 0;
    for caller in callers {
        for answer in caller.await.unwrap() {
            match answer {
                Ok(response) => {
                    answered += 1;
                    let outcome = response.outcome();
                    if is_admitted(outcome) {
                        told.insert(response.reservation.unwrap().reservation_id, outcome);
                    }
                }
                Err(status) if refused_by_goaway(&status) => {
                    *errors.entry(Code::Unavailable).or_default() += 1;
                }
                Err(status) => {
                    if !matches!(status.code(), Code::Unavailable | Code::Cancelled) {
                        eprintln!("unexpected answer: {status:?}");
                    }
                    *errors.entry(status.code()).or_default() += 1;
                }
            }
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "{answered} answered, {} admitted, errors {errors:?}",
        told.len()
    );
    assert!(status.success(), "the server exited with {status:?}");
    assert!(answered > 100, "the load ran before the stop");
    assert!(
        errors
            .keys()
            .all(|code| matches!(code, Code::Unavailable | Code::Cancelled)),
        "callers saw {errors:?}"
    );

    let mut config = Config::default();
    config.store.sqlite_path = sqlite;
    let rows = open_store(&config)
        .reservations_of(&Sku::parse("DRAIN").unwrap())
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        told.len(),
        "one order per admitted caller, no other"
    );
    for row in &rows {
        assert_eq!(row.state, ReservationState::Held);
        assert!(
            told.contains_key(row.id.as_str()),
            "an order no caller was told about"
        );
    }
}

/// kubernetes-validate, pinned.
fn kubernetes_validate() -> String {
    crate::harness::python_packages(
        "kubernetes-validate",
        "kubernetes_validate",
        &["kubernetes-validate==1.37.0"],
    )
}

fn render(tree: &str) -> String {
    let output = Command::new("kubectl")
        .args(["kustomize", &format!("{}/k8s/{tree}", crate::harness::ROOT)])
        .output()
        .expect("kubectl (with its built-in kustomize) is installed on this machine kind");
    assert!(
        output.status.success(),
        "kubectl kustomize {tree}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The base and both overlays render with kustomize and every object passes
/// strict schema validation offline (unknown fields are errors, and so is a
/// kind without a schema), for the oldest Kubernetes release with the
/// native preStop sleep and the newest the validator knows. The rendered
/// base carries what a rollout relies on, and the shipped config file
/// names only keys the service knows.
#[test]
fn manifests_render_and_pass_strict_validation() {
    let kv = kubernetes_validate();
    let status = Command::new(format!("{}/k8s/validate.sh", crate::harness::ROOT))
        .env("KV_PATH", &kv)
        .status()
        .unwrap();
    assert!(status.success(), "k8s/validate.sh failed (see its output)");

    let base = render("base");
    for needle in [
        "kind: Deployment",
        "kind: Service",
        "kind: Job",
        "kind: HorizontalPodAutoscaler",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "appProtocol: grpc",
        "grpc:",
        "startupProbe:",
        "sleep:",
        "terminationGracePeriodSeconds: 30",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "topologySpreadConstraints:",
        // Service links would inject STOCKGATE_*_PORT variables, which the
        // config would refuse as unknown keys.
        "enableServiceLinks: false",
        // Backend URLs carry passwords: files from the Secret, not env.
        "STOCKGATE_BACKENDS__STORE_FILE",
        "secretName: stockgate-backends",
    ] {
        assert!(base.contains(needle), "the base lacks `{needle}`");
    }
    assert!(
        !base.contains("secretKeyRef"),
        "a secret reaches a stockgate pod through its environment"
    );
    // Egress for default-deny clusters: every stockgate pod's policy
    // allows DNS and the backends' ports, nothing else.
    assert_eq!(
        base.matches("  - Egress\n").count(),
        3,
        "an egress policy per pod kind"
    );
    assert_eq!(base.matches("- port: 53\n      protocol: UDP").count(), 3);
    assert_eq!(base.matches("- port: 5432\n").count(), 3);
    let pods = base.matches("\n    spec:\n").count() + base.matches("\n      spec:\n").count();
    assert!(pods >= 3, "pod templates found: {pods}");
    assert_eq!(
        base.matches("enableServiceLinks: false").count(),
        3,
        "every stockgate pod (api, processor, migrate) turns service links off"
    );

    // The TLS overlay: mutual TLS on the listeners, and every probe on the
    // plaintext health-only port (the kubelet's gRPC probes speak no TLS).
    let tls = render("overlays/prod-tls");
    assert_eq!(
        tls.matches("STOCKGATE_SERVER__TLS__CLIENT_CA_PATH").count(),
        2
    );
    assert_eq!(tls.matches("value: 0.0.0.0:50053").count(), 2);
    let probes_on = |rendered: &str, port: u16| {
        rendered
            .matches(&format!("grpc:\n            port: {port}\n"))
            .count()
    };
    assert_eq!(probes_on(&render("overlays/prod"), 50051), 6);
    assert_eq!(probes_on(&tls, 50053), 6, "3 probes x 2 Deployments");
    assert_eq!(probes_on(&tls, 50051), 0, "a probe left on the TLS port");

    let file = std::fs::read_to_string(format!("{}/k8s/base/stockgate.toml", crate::harness::ROOT))
        .unwrap();
    let config: Config = toml::from_str(&file).expect("k8s/base/stockgate.toml uses known keys");
    assert!(!config.store.migrate_on_start, "a Job migrates");
    assert_eq!(config.metrics.listen, "0.0.0.0:9464");
}

/// A release replaces the migration Job rather than updating it (its
/// template is immutable): the manifests carry Argo CD's and Flux's
/// annotations for that and no TTL (GitOps tools would rerun a Job the TTL
/// deleted), and `k8s/deploy.sh`, run against a kubectl stand-in that
/// records its calls, deletes the old Job, applies, waits for the
/// migration, then for the rollout; a failed migration stops it there.
#[test]
fn a_release_replaces_the_migration_job() {
    let base = render("base");
    let job = &base[base.find("kind: Job").unwrap()..];
    let job = &job[..job.find("\n---").unwrap_or(job.len())];
    for needle in [
        "argocd.argoproj.io/hook: Sync",
        "argocd.argoproj.io/sync-wave: \"1\"",
        "argocd.argoproj.io/hook-delete-policy: BeforeHookCreation",
        "kustomize.toolkit.fluxcd.io/force: enabled",
    ] {
        assert!(job.contains(needle), "the Job lacks `{needle}`");
    }
    assert!(!job.contains("ttlSecondsAfterFinished"), "{job}");
    // Argo CD syncs the Deployments after the Job's wave.
    assert_eq!(
        base.matches("argocd.argoproj.io/sync-wave: \"2\"").count(),
        2
    );

    let scratch = tempfile::tempdir().unwrap();
    let calls = scratch.path().join("calls");
    let fake = scratch.path().join("kubectl");
    std::fs::write(
        &fake,
        format!(
            "#!/usr/bin/env bash\n\
             if [ \"$1\" = kustomize ]; then exec kubectl \"$@\"; fi\n\
             echo \"$*\" >> {calls}\n\
             if [ \"$1\" = apply ]; then grep -c '^kind: Job$' >> {calls}; fi\n\
             if [ \"$1 $2 $3\" = \"-n stockgate wait\" ] && [ -n \"$FAIL_MIGRATION\" ]; then exit 1; fi\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let deploy = |fail: bool| {
        let _ = std::fs::remove_file(&calls);
        let mut command = Command::new(format!("{}/k8s/deploy.sh", crate::harness::ROOT));
        command.arg("overlays/prod").env("KUBECTL", &fake);
        if fail {
            command.env("FAIL_MIGRATION", "1");
        }
        let status = command.status().unwrap();
        (status.success(), std::fs::read_to_string(&calls).unwrap())
    };
    let (ok, log) = deploy(false);
    assert!(ok, "{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [
            "-n stockgate delete job -l app.kubernetes.io/component=migrate --ignore-not-found --wait=true --cascade=foreground",
            "apply -f -",
            "1",
            "-n stockgate wait --for=condition=complete job/stockgate-migrate --timeout=15m",
            "-n stockgate rollout status deployment/stockgate-api --timeout=15m",
            "-n stockgate rollout status deployment/stockgate-processor --timeout=15m",
        ]
    );
    let (ok, log) = deploy(true);
    assert!(!ok);
    assert!(
        !log.contains("rollout"),
        "rolled out past a failed migration: {log}"
    );
}

/// checkov (pinned) finds nothing in the overlays: prod with no check
/// skipped, dev skipping only what its `.checkov.yaml` lists and justifies.
/// The base is not checked on its own: it is never applied without an
/// overlay (no namespace, no image).
#[test]
fn overlays_pass_checkov() {
    let checkov = crate::harness::python_packages("checkov", "checkov", &["checkov==3.2.500"]);
    let scratch = tempfile::tempdir().unwrap();
    for overlay in ["dev", "prod", "prod-tls"] {
        let rendered = scratch.path().join(format!("{overlay}.yaml"));
        std::fs::write(&rendered, render(&format!("overlays/{overlay}"))).unwrap();
        let mut command = Command::new("python3");
        command
            .args([
                "-c",
                "import sys; from checkov.main import Checkov; sys.exit(Checkov().run())",
            ])
            .args(["--framework", "kubernetes", "--quiet", "--compact"])
            .args(["-f", rendered.to_str().unwrap()])
            .env("PYTHONPATH", &checkov);
        let config = format!(
            "{}/k8s/overlays/{overlay}/.checkov.yaml",
            crate::harness::ROOT
        );
        if std::path::Path::new(&config).exists() {
            command.args(["--config-file", &config]);
        }
        let output = command.output().unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "checkov on overlays/{overlay}:\n{report}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        !std::path::Path::new(&format!(
            "{}/k8s/overlays/prod/.checkov.yaml",
            crate::harness::ROOT
        ))
        .exists(),
        "prod skips no check"
    );
}

/// The alert rules load in Prometheus's own checker, and their unit tests
/// (`stockgate-alerts.test.yaml`: a target down, no metrics at all) pass.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = crate::harness::debian_binary("prometheus", "promtool");
    let dir = format!("{}/deploy/prometheus", crate::harness::ROOT);
    for args in [
        ["check", "rules", "stockgate-alerts.yaml"],
        ["test", "rules", "stockgate-alerts.test.yaml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The image runs the binary in a distroless `cc` base (glibc, libgcc)
/// plus the SQLite library the Dockerfile copies in: the binary must need
/// nothing else (no OpenSSL: TLS is rustls).
#[test]
fn the_binary_needs_only_what_the_runtime_image_has() {
    let output = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_stockgate"))
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let provided = [
        "linux-vdso.so",
        "ld-linux",
        "libc.so",
        "libm.so",
        "libgcc_s.so",
        "libpthread.so",
        "libdl.so",
        "librt.so",
        "libsqlite3.so.0",
    ];
    for line in text.lines() {
        let library = line.split_whitespace().next().unwrap_or_default();
        let library = library.rsplit('/').next().unwrap_or_default();
        assert!(
            provided.iter().any(|p| library.starts_with(p)),
            "the image lacks {library}"
        );
    }
    let dockerfile =
        std::fs::read_to_string(format!("{}/Dockerfile", crate::harness::ROOT)).unwrap();
    assert!(dockerfile.contains("libsqlite3.so.0"));
    assert!(dockerfile.contains("distroless/cc"));
}

/// A call the client sent after the server's final GOAWAY (NO_ERROR) was on
/// the wire but before the client read it: its stream is above the last
/// stream id the server accepted, so the server never saw it (RFC 9113
/// 6.8: safe to retry). tonic reports it as INTERNAL ("h2 protocol
/// error"); for the caller it is UNAVAILABLE, and counted so.
fn refused_by_goaway(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = err.source();
    }
    false
}
