"""deploy/: every overlay renders with `kubectl kustomize` and validates offline against the
Kubernetes schemas (kubernetes-validate ships them); a broken copy fails; and the manifests agree
with the binary (flags and env vars exist, ports match, probes hit real routes), as does the
Dockerfile."""
import re
import shutil
import subprocess
import urllib.request

import kubernetes_validate
import pytest
import yaml

from conftest import BIN, ROOT

K8S_VERSION = "1.30.0"
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir() if p.is_dir())


def render(path):
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(objects):
    """Errors of every object against the schemas (strict: unknown fields are errors)."""
    errors = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
        except (kubernetes_validate.utils.SchemaNotFoundError, kubernetes_validate.utils.InvalidSchemaError) as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e}")
    return errors


def containers(objects, only_switchyard=True):
    """(object, pod spec, container) of every (switchyard) container."""
    for o in objects:
        spec = o.get("spec", {}).get("template", {}).get("spec")
        if spec:
            for c in spec.get("containers", []):
                if not only_switchyard or c["image"].split("/")[-1].startswith("switchyard"):
                    yield o, spec, c


def subcommand(c):
    """`serve`, `worker`, `cluster rbac`: a container's args up to its first flag."""
    words = []
    for a in c["args"]:
        if a.startswith("-"):
            break
        words.append(a)
    return " ".join(words)


def help_text(sub):
    out = subprocess.run([BIN, *sub.split(), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    objects = render(ROOT / "deploy" / "overlays" / overlay)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
            "HorizontalPodAutoscaler"} <= kinds, kinds
    assert validate(objects) == []


@pytest.mark.parametrize("old,new", [
    ("containerPort: 7001", "containerPort: seven-thousand"),                         # wrong type
    ("terminationGracePeriodSeconds: 30", "terminationGracePeriodSecs: 30"),         # unknown field
    ("kind: PodDisruptionBudget", "kind: PodDisruptionBudgett"),                      # unknown kind
])
def test_a_broken_manifest_fails_validation(tmp_path, old, new):
    copy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", copy)
    workers = copy / "base" / "workers.yaml"
    text = workers.read_text()
    assert old in text
    workers.write_text(text.replace(old, new, 1))
    try:
        errors = validate(render(copy / "overlays" / "cpu-dev"))
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        errors = [str(e)]
    assert errors, f"{new!r} passed validation"
    assert any(new.split(":")[-1].strip() in e or new.split(":")[0].strip() in e for e in errors), errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_use_only_flags_and_env_vars_the_binary_has(overlay):
    objects = render(ROOT / "deploy" / "overlays" / overlay)
    config = {}
    for o in objects:
        if o["kind"] == "ConfigMap":
            config.update(o["data"])
    used = 0
    shared_used = set()

    def is_option(name, text):
        return f"[env: {name}=" in text or f"[env: {name}]" in text

    for _, _, c in containers(objects):
        sub = subcommand(c)
        text = help_text(sub)
        for name in [e["name"] for e in c.get("env", [])]:
            if name.startswith("SWITCHYARD_"):
                assert is_option(name, text), f"{sub}: {name} is not an option"
                used += 1
        if c.get("envFrom"):
            shared_used |= {n for n in config if is_option(n, text)}
        for flag in [a for a in c["args"] if a.startswith("--")]:
            assert re.search(rf"\s{re.escape(flag.split('=')[0])}[\s,=]", text), f"{sub}: no {flag}"
    # The shared ConfigMap's settings are each read by some role.
    assert shared_used == {n for n in config if n.startswith("SWITCHYARD_")}, set(config) - shared_used
    assert used > 10


def test_ports_and_probes_match_the_binary(tmp_path):
    objects = render(ROOT / "deploy" / "overlays" / "cpu-dev")
    services = [o for o in objects if o["kind"] == "Service"]
    paths = set()
    for o, _, c in containers(objects):
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if c["args"][0] == "serve":
            assert ports["http"] == int(env["SWITCHYARD_PORT"])
            assert env["SWITCHYARD_HOST"] == "0.0.0.0"
        if c.get("args", [""])[0] == "worker":
            assert ports["grpc"] == int(env["SWITCHYARD_LISTEN"].rsplit(":", 1)[1])
            assert env["SWITCHYARD_ADVERTISE"].endswith(f":{ports['grpc']}")
            # The kubelet probes the plaintext health listener: the gRPC port requires a
            # client certificate.
            grpc = c["readinessProbe"]["grpc"]
            assert ports["health"] == int(env["SWITCHYARD_HEALTH_LISTEN"].rsplit(":", 1)[1])
            assert grpc["port"] == ports["health"]
            proto = (ROOT / "proto" / "switchyard" / "v1" / "expert.proto").read_text()
            pkg, svc = grpc["service"].rsplit(".", 1)
            assert f"package {pkg};" in proto and f"service {svc} " in proto
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            p = c.get(probe, {})
            if "httpGet" in p:
                port = p["httpGet"]["port"]
                assert port in ports or port in ports.values(), f"{probe} port {port}"
                paths.add(p["httpGet"]["path"])
    for s in services:
        sel = s["spec"]["selector"]
        targets = [c for o, _, c in containers(objects, only_switchyard=False)
                   if all(o["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        assert targets, f"Service {s['metadata']['name']} selects nothing"
        for p in s["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            assert any(t in [q["name"] for q in c["ports"]] or t in [q["containerPort"] for q in c["ports"]]
                       for c in targets), f"Service {s['metadata']['name']}: no container port {t}"
    # Every HTTP probe path of the coordinator is a real route: ask a real server.
    coordinator_paths = {p for p in paths if p in ("/ready", "/health", "/metrics")}
    assert coordinator_paths >= {"/ready", "/health"}
    from conftest import MODEL, Proc
    s = Proc("serve", str(MODEL), "--port", "0")
    try:
        for path in sorted(coordinator_paths):
            with urllib.request.urlopen(f"http://{s.addr}{path}", timeout=30) as r:
                assert r.status == 200, path
    finally:
        s.stop()


def test_dockerfile_builds_the_tested_binary_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines()]
    assert any(l.startswith("ARG VARIANT=") for l in lines)
    froms = [l for l in lines if l.startswith("FROM ")]
    assert froms[0].endswith(" AS build") and froms[-1] == "FROM run-${VARIANT}"
    # The build stage builds the package whose binary the tests run.
    assert "cargo build --release --locked -p switchyard" in text
    pkg = (ROOT / "cli" / "Cargo.toml").read_text()
    assert re.search(r'^name = "switchyard"$', pkg, re.M)
    runtime = text[text.rindex("FROM run-${VARIANT}"):]
    user = [l for l in runtime.splitlines() if l.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("0", "root"))
    assert 'ENTRYPOINT ["/usr/local/bin/switchyard"]' in runtime
    assert "protobuf-compiler" in text and "libprotobuf-dev" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in ignore


def _selects(policy, labels):
    want = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in want.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_fenced_by_network_policies(overlay):
    objects = render(ROOT / "deploy" / "overlays" / overlay)
    for o, spec, c in containers(objects, only_switchyard=False):
        name = f"{o['metadata']['name']}/{c['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("fsGroup"), f"{name}: mounted Secrets and volumes need the pod's group"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("readOnlyRootFilesystem") is True, name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
        if c.get("args", [""])[0] == "worker":
            assert "startupProbe" in c, f"{name}: loading experts takes minutes; liveness must wait"
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = [(o, o["spec"]["template"]["metadata"]["labels"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    for o, labels in pods:
        denied = [p for p in policies if _selects(p, labels) and "ingress" not in p["spec"]]
        assert denied, f"{o['metadata']['name']}: no default-deny policy selects its pods"
    coordinator = {"app.kubernetes.io/name": "switchyard-coordinator"}
    for o, labels in pods:
        if labels.get("app.kubernetes.io/name") != "switchyard-worker":
            continue
        rules = [r for p in policies if _selects(p, labels) for r in p["spec"].get("ingress", [])]
        assert rules, o["metadata"]["name"]
        for r in rules:
            sources = [f["podSelector"]["matchLabels"] for f in r["from"]]
            only_coordinators = all(s.items() >= coordinator.items() for s in sources)
            assert sources and only_coordinators, f"{o['metadata']['name']}: admits {sources}"
            assert [p["port"] for p in r["ports"]] == [7001]
    # The API admits the labelled namespaces (the ingress controller, Prometheus) only.
    for o, labels in pods:
        if labels.get("app.kubernetes.io/name") != "switchyard-coordinator":
            continue
        rules = [r for p in policies if _selects(p, labels) for r in p["spec"].get("ingress", [])]
        assert rules and all(r.get("from") for r in rules), f"{o['metadata']['name']}: the API is open to every pod"
        for r in rules:
            assert all(f.get("namespaceSelector", {}).get("matchLabels") == {"switchyard.io/api-client": "true"}
                       for f in r["from"]), r


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_etcd_requires_client_certificates_and_members_present_them(overlay):
    objects = render(ROOT / "deploy" / "overlays" / overlay)
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("switchyard-config"))
    assert config["data"]["SWITCHYARD_ETCD"].startswith("https://")
    etcd = [c for o, _, c in containers(objects, only_switchyard=False) if c["name"] == "etcd"]
    assert etcd
    for c in etcd:
        cmd = " ".join(c["command"])
        assert "--client-cert-auth" in cmd and "--listen-client-urls=https://" in cmd
        assert all(p["httpGet"]["port"] == "health" for p in (c["readinessProbe"], c["livenessProbe"]))
    for o, spec, c in containers(objects):
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        role = {"serve": "coordinator", "worker": "worker", "cluster rbac": "root"}[subcommand(c)]
        assert env["SWITCHYARD_ETCD_CERT"].endswith(f"/{role}.crt"), o["metadata"]["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        folder = "/etc/switchyard/admin" if role == "root" else "/etc/switchyard/tls"
        secret = next(v for v in spec["volumes"] if v["name"] == mounts[folder])
        assert secret["secret"]["secretName"] == ("switchyard-etcd-admin" if role == "root" else "switchyard-tls")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_need_client_certificates_etcd_peers_use_tls_and_roles_are_set(overlay):
    objects = render(ROOT / "deploy" / "overlays" / overlay)
    subs = set()
    for o, spec, c in containers(objects):
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        sub = subcommand(c)
        subs.add(sub)
        name = o["metadata"]["name"]
        if sub == "worker":
            assert env["SWITCHYARD_TLS_CERT"].endswith("/worker.crt"), name
            assert env["SWITCHYARD_TLS_CLIENT_CA"].endswith("/ca.crt"), name
        if sub == "serve":
            assert env["SWITCHYARD_WORKER_TLS_CA"].endswith("/ca.crt"), name
            assert env["SWITCHYARD_WORKER_TLS_CERT"].endswith("/coordinator.crt"), name
        # etcd's root key reaches the RBAC job alone.
        admin = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "switchyard-etcd-admin"]
        assert bool(admin) == (sub == "cluster rbac"), name
    assert {"serve", "worker", "cluster rbac"} <= subs, subs
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == ["switchyard-etcd-rbac"]
    for c in [c for _, _, c in containers(objects, only_switchyard=False) if c["name"] == "etcd"]:
        cmd = " ".join(c["command"])
        assert "--listen-peer-urls=https://" in cmd and "--peer-client-cert-auth" in cmd, cmd
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        assert "http://" not in env["ETCD_INITIAL_CLUSTER"], env


def test_the_service_monitor_selects_the_coordinators_metrics_port():
    monitor = yaml.safe_load((ROOT / "deploy" / "monitoring" / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    objects = render(ROOT / "deploy" / "overlays" / "cpu-dev")
    services = [o for o in objects if o["kind"] == "Service"
                and all(o["metadata"].get("labels", {}).get(k) == v
                        for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert [s["metadata"]["name"] for s in services] == ["switchyard"]
    ports = [p["name"] for p in services[0]["spec"]["ports"]]
    for e in monitor["spec"]["endpoints"]:
        assert e["port"] in ports and e["path"] == "/metrics"
