//! Mutual TLS between coordinator and workers, with certificates from `deploy/tls/make-dev-ca.sh`:
//! the cluster works with the right certificates, and every wrong one is refused.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use switchyard_tests::{fixtures, run, Worker};

fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/make-dev-ca.sh");
    let st = std::process::Command::new("bash")
        .arg(script)
        .arg(&out)
        .arg(name)
        .status()
        .unwrap();
    assert!(st.success(), "make-dev-ca.sh failed");
    out
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_str().unwrap().to_string()
}

fn tls_worker(model: &Path, ca: &Path, server: &Path, extra: &[&str]) -> Worker {
    let (cert, key, client_ca) = (
        p(server, "worker.crt"),
        p(server, "worker.key"),
        p(ca, "ca.crt"),
    );
    let mut args = vec![
        "--experts",
        "0-7",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ];
    args.extend_from_slice(extra);
    Worker::start_with(model, &args)
}

/// The health service's answer for the expert service at `addr`, dialled in plaintext.
fn plaintext_health(addr: &str) -> Result<i32, String> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "switchyard.v1.ExpertService".into(),
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.into_inner().status)
    })
}

fn forward(model: &Path, extra: &[String]) -> std::process::Output {
    let mut args: Vec<String> = [
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,415,2936,338",
        "--greedy",
        "4",
        "--expert-wait",
        "0s",
        "--rpc-timeout",
        "5s",
        // Compared bit for bit with embedded mode.
        "--wire-dtype",
        "f32",
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

#[test]
fn mutual_tls_works_with_the_dev_ca_and_refuses_wrong_certificates() {
    let model = fixtures().join("tiny-mixtral-trained");
    let tmp = tempfile::tempdir().unwrap();
    let good = make_ca(tmp.path(), "good");
    let rogue = make_ca(tmp.path(), "rogue");
    let health = format!("127.0.0.1:{}", switchyard_tests::free_port());
    let w = tls_worker(&model, &good, &good, &["--health-listen", &health]);
    let spec = format!("{}=0-7", w.addr);
    // Probes without a certificate get the health service on its own plaintext port, and
    // nothing from the gRPC port.
    assert_eq!(
        plaintext_health(&health),
        Ok(1),
        "SERVING on --health-listen"
    );
    assert!(
        plaintext_health(&w.addr).is_err(),
        "plaintext health answered on the TLS port"
    );
    let client = |ca: &Path, id: Option<&Path>| {
        let mut v = vec![
            "--workers".to_string(),
            spec.clone(),
            "--worker-tls-ca".into(),
            p(ca, "ca.crt"),
        ];
        if let Some(id) = id {
            v.extend([
                "--worker-tls-cert".into(),
                p(id, "coordinator.crt"),
                "--worker-tls-key".into(),
                p(id, "coordinator.key"),
            ]);
        }
        v
    };

    let embedded = forward(&model, &[]);
    assert!(embedded.status.success());
    let embedded = String::from_utf8(embedded.stdout).unwrap();
    let ok = forward(&model, &client(&good, Some(&good)));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8(ok.stdout).unwrap(), embedded);

    // A coordinator without a certificate, with one from another CA, or without TLS at all.
    for (what, args) in [
        ("no client certificate", client(&good, None)),
        (
            "a client certificate from another CA",
            client(&good, Some(&rogue)),
        ),
        ("plaintext", vec!["--workers".to_string(), spec.clone()]),
    ] {
        let out = forward(&model, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the worker accepted it");
        assert!(err.contains(&w.addr), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }

    // A worker whose certificate the coordinator's CA did not sign is refused.
    let impostor = tls_worker(&model, &good, &rogue, &[]);
    let out = forward(
        &model,
        &[
            vec!["--workers".to_string(), format!("{}=0-7", impostor.addr)],
            client(&good, Some(&good))[2..].to_vec(),
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a worker with a rogue certificate was used"
    );
    assert!(err.contains(&impostor.addr), "{err}");
}

/// etcd with TLS and client-certificate auth: a worker and a coordinator holding dev-CA
/// certificates register, route and answer; `cluster status` without a certificate, with one
/// from another CA, or in plaintext is refused.
#[test]
fn etcd_with_client_certificates_admits_only_members() {
    use switchyard_tests::Etcd;
    let tmp = tempfile::tempdir().unwrap();
    let good = make_ca(tmp.path(), "good");
    let rogue = make_ca(tmp.path(), "rogue");
    let etcd = Etcd::start_tls(&good);
    let model = fixtures().join("tiny-mixtral-trained");
    let member = |dir: &Path, who: &str| -> Vec<String> {
        let mut a = vec![
            "--etcd".to_string(),
            etcd.endpoint.clone(),
            "--cluster".into(),
            "tls".into(),
            "--etcd-ca".into(),
            p(&good, "ca.crt"),
        ];
        if !who.is_empty() {
            a.extend([
                "--etcd-cert".into(),
                p(dir, &format!("{who}.crt")),
                "--etcd-key".into(),
                p(dir, &format!("{who}.key")),
            ]);
        }
        a
    };
    let mut wargs = vec![
        "--experts".to_string(),
        "0-7".into(),
        "--lease-ttl".into(),
        "2s".into(),
    ];
    wargs.extend(member(&good, "worker"));
    let wrefs: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let _w = Worker::start_with(&model, &wrefs);
    let out = forward(&model, &member(&good, "coordinator"));
    assert!(
        out.status.success(),
        "a coordinator with a certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = |extra: Vec<String>| {
        let mut a = vec!["cluster".to_string(), "status".into(), "--json".into()];
        a.extend(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&refs)
    };
    let ok = status(member(&good, "coordinator"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"weight_format\""));
    let plaintext = vec![
        "--etcd".to_string(),
        etcd.endpoint.replace("https://", ""),
        "--cluster".into(),
        "tls".into(),
    ];
    for (what, args) in [
        ("no client certificate", member(&good, "")),
        ("another CA's certificate", member(&rogue, "coordinator")),
        ("plaintext", plaintext),
    ] {
        let out = status(args);
        assert!(!out.status.success(), "{what}: etcd answered");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("etcd") && !err.contains("panicked"),
            "{what}: {err}"
        );
    }
}

/// `--worker-tls-domain @address`: a worker's certificate must name the address it is dialled
/// at. The dev certificate names 127.0.0.1: a worker there is used; the same certificate served
/// from 127.0.0.2 is refused.
#[test]
fn a_worker_certificate_must_name_the_workers_address() {
    let model = fixtures().join("tiny-mixtral-trained");
    let tmp = tempfile::tempdir().unwrap();
    let ca = make_ca(tmp.path(), "good");
    let tls = [
        "--experts".to_string(),
        "0-7".into(),
        "--tls-cert".into(),
        p(&ca, "worker.crt"),
        "--tls-key".into(),
        p(&ca, "worker.key"),
        "--tls-client-ca".into(),
        p(&ca, "ca.crt"),
    ];
    let refs: Vec<&str> = tls.iter().map(String::as_str).collect();
    let named = Worker::start_at(&model, "127.0.0.1:0", &refs, &[]);
    let elsewhere = Worker::start_at(&model, "127.0.0.2:0", &refs, &[]);
    let client = |w: &Worker| {
        vec![
            "--workers".to_string(),
            format!("{}=0-7", w.addr),
            "--worker-tls-ca".into(),
            p(&ca, "ca.crt"),
            "--worker-tls-cert".into(),
            p(&ca, "coordinator.crt"),
            "--worker-tls-key".into(),
            p(&ca, "coordinator.key"),
            "--worker-tls-domain".into(),
            "@address".into(),
        ]
    };
    let ok = forward(&model, &client(&named));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = forward(&model, &client(&elsewhere));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a certificate for 127.0.0.1 served 127.0.0.2"
    );
    assert!(
        err.contains(&elsewhere.addr) && !err.contains("panicked"),
        "{err}"
    );
}

/// etcd access control from `switchyard cluster rbac` (run with the dev CA's root certificate):
/// members keep working with their own certificates, while a coordinator's certificate cannot
/// register a worker and a member's certificate cannot change the roles.
#[test]
fn etcd_roles_keep_each_member_to_its_own_keys() {
    use switchyard_tests::Etcd;
    let tmp = tempfile::tempdir().unwrap();
    let ca = make_ca(tmp.path(), "good");
    let etcd = Etcd::start_tls(&ca);
    let model = fixtures().join("tiny-mixtral-trained");
    let member = |cert: &str| -> Vec<String> {
        vec![
            "--etcd".to_string(),
            etcd.endpoint.clone(),
            "--cluster".into(),
            "rbac".into(),
            "--lease-ttl".into(),
            "2s".into(),
            "--etcd-ca".into(),
            p(&ca, "ca.crt"),
            "--etcd-cert".into(),
            p(&ca, &format!("{cert}.crt")),
            "--etcd-key".into(),
            p(&ca, &format!("{cert}.key")),
        ]
    };
    let cli = |cmd: &[&str], who: &str| {
        let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        a.extend(member(who));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&refs)
    };
    // Twice: the second run finds everything in place.
    for _ in 0..2 {
        let out = cli(&["cluster", "rbac"], "admin/root");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("auth enabled"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("switchyard-rbac-worker → user switchyard-worker"),
            "{text}"
        );
    }
    // Only root may change the roles now.
    let out = cli(&["cluster", "rbac"], "coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a coordinator changed the roles");
    assert!(
        err.contains("permission denied") && !err.contains("panicked"),
        "{err}"
    );

    let with = |extra: Vec<String>| {
        let mut a = vec!["--experts".to_string(), "0-7".into()];
        a.extend(extra);
        a
    };
    let good = with(member("worker"));
    let _w = Worker::start_with(&model, &good.iter().map(String::as_str).collect::<Vec<_>>());
    // A process holding the coordinators' certificate tries to register as a worker.
    let forged = with(member("coordinator"));
    let rogue = Worker::start_with(
        &model,
        &forged.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let out = forward(&model, &member("coordinator"));
    assert!(
        out.status.success(),
        "the coordinator with its certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !rogue.log().contains("permission denied") {
        assert!(
            std::time::Instant::now() < deadline,
            "the forged registration was not refused: {}",
            rogue.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = cli(&["cluster", "status", "--json"], "coordinator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{status}");
    assert_eq!(workers[0]["addr"], serde_json::json!(_w.addr), "{status}");
}
