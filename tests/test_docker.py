"""docker/: what can be checked without a Docker daemon or a cluster (none exists on these
machines): hadolint on both Dockerfiles, and the compose file and Kubernetes manifests
parsed and cross-checked. Building and running the images is not exercised here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKER / "Dockerfile.trainer"),
                        str(DOCKER / "Dockerfile.airflow")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.trainer", "Dockerfile.airflow"])
def test_images_run_as_non_root(dockerfile):
    users = re.findall(r"^USER\s+(\S+)", (DOCKER / dockerfile).read_text(), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_compose_stack_is_consistent():
    text = (DOCKER / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    for name in ("postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "mlflow", "minio"):
        assert name in services, name
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], f"{name}: undeclared volume {source}"
    ports = [p.split(":")[0] for svc in services.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports))
    commands = {name: svc.get("command") for name, svc in services.items()}
    assert commands["airflow-scheduler"] == ["scheduler"] and commands["airflow-dag-processor"] == ["dag-processor"]
    # secrets only through variables that must be set, all of them documented in .env.example
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {line.split("=")[0] for line in (DOCKER / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert required and required <= example
    assert not re.search(r"(PASSWORD|SECRET)\w*:\s*['\"]?(?!\$)\w", text)  # no literal secrets


def test_kubernetes_manifests_match_the_pod_spec():
    from ftlib.airflow.orchestrate import POD_DEFAULTS

    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "gpu-pool.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", POD_DEFAULTS["pvc"]) in kinds and ("Namespace", POD_DEFAULTS["namespace"]) in kinds
    values = yaml.safe_load((DOCKER / "k8s" / "airflow-values.yaml").read_text())
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["FTLIB_POD_PVC"] == POD_DEFAULTS["pvc"] and env["FTLIB_POD_NAMESPACE"] == POD_DEFAULTS["namespace"]
    assert "nvidia.com/gpu.present" in env["FTLIB_POD_NODE_SELECTOR"]
    assert all("secretName" in s for s in values["secret"])
