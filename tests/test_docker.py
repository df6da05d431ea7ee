"""docker/: what can be checked without a Docker daemon or a cluster (none exists on these
machines): hadolint on both Dockerfiles; `docker-compose config` where that validator is installed;
the compose file, the Dockerfiles and the Kubernetes manifests cross-checked against each other and
against the pod ftlib renders; and docker/init-project.sh run for real on a temp dir. Building and
running the images is not exercised here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from ftlib.airflow.orchestrate import POD_DEFAULTS, POD_GID, POD_UID
from tests.conftest import REPO

DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent


def stages(dockerfile: str) -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), one list per FROM."""
    out: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text()).splitlines():
        line = " ".join(line.split())
        if line and not line.startswith("#"):
            out += [[]] if line.startswith("FROM ") else []
            out[-1].append(line)
    return out


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())


def helm_values() -> dict:
    return yaml.safe_load((DOCKER / "k8s" / "airflow-values.yaml").read_text())


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(VENV_BIN / "hadolint")
    r = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKER / "Dockerfile.trainer"),
                        str(DOCKER / "Dockerfile.airflow")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="no compose validator (apt-get install docker-compose)")
def test_compose_file_passes_docker_compose_config():
    """docker-compose 1.29 (Debian's) validates the file against the compose schema offline, no daemon needed."""
    r = subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yaml"), "--env-file",
                        str(DOCKER / ".env.example"), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_images_and_pods_share_one_user():
    """Airflow workers, the init and the GPU pods write one shared volume: same uid and gid everywhere."""
    from ftlib.airflow.orchestrate import gpu_pod

    uid, gid = str(POD_UID), str(POD_GID)
    for dockerfile in ("Dockerfile.trainer", "Dockerfile.airflow"):
        final = stages(dockerfile)[-1]
        users = [line.split()[1] for line in final if line.startswith("USER ")]
        assert users[-1] == uid, dockerfile  # never root, and the uid the pods run as
        assert re.search(rf"chown (-R )?{uid}:{gid} |--chown={uid}:{gid} ", "\n".join(final)), dockerfile
    assert any(f"useradd --uid {uid} --gid {gid} " in line for line in stages("Dockerfile.trainer")[-1])
    assert re.search(r"^FROM apache/airflow:\S+$", "\n".join(s[0] for s in stages("Dockerfile.airflow")), re.M)  # its user is 50000:0
    sc = gpu_pod("train", ["train"], 1).build_pod_request_obj(dry_run=True).spec.security_context
    assert (sc.run_as_user, sc.run_as_group, sc.fs_group) == (POD_UID, POD_GID, POD_GID)
    values = helm_values()
    assert (values["uid"], values["gid"]) == (POD_UID, POD_GID)
    job = next(d for d in yaml.safe_load_all((DOCKER / "k8s" / "gpu-pool.yaml").read_text()) if d["kind"] == "Job")
    for pod in (values["securityContexts"]["pod"], job["spec"]["template"]["spec"]["securityContext"]):
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"], pod["runAsNonRoot"]) == (POD_UID, POD_GID, POD_GID, True)


def test_images_compile_llama_cpp_in_a_builder_stage_and_ship_the_converter_where_ftlib_looks(monkeypatch):
    from ftlib.stages import quantize

    monkeypatch.delenv("FTLIB_LLAMA_CPP", raising=False)
    for dockerfile, python in (("Dockerfile.trainer", "/opt/venv/bin/python"), ("Dockerfile.airflow", None)):
        *builders, final = stages(dockerfile)
        [llama] = [s for s in builders if s[0].endswith(" AS llama")]
        assert any("build-essential cmake" in line for line in llama), dockerfile  # the compiler stays here
        assert not any("build-essential" in line for line in final), dockerfile
        [build] = [line for line in llama if "build-llama-cpp.sh" in line and line.startswith("RUN ")]
        out = build.split()[-1]
        assert any(re.search(rf"pip install .*{re.escape('/tmp/wheels/*.whl')}", line) for line in final), dockerfile
        [conv] = [line.split()[-1] for line in final if line.startswith("COPY --from=llama") and f"{out}/llama.cpp" in line]
        env = {k: v for line in final if line.startswith("ENV ") for k, v in re.findall(r"(\w+)=(\S+)", line)}
        if "FTLIB_LLAMA_CPP" in env:
            monkeypatch.setenv("FTLIB_LLAMA_CPP", env["FTLIB_LLAMA_CPP"])
        else:
            assert any(f"-m venv {Path(python).parents[1]}" in line for line in final)
            monkeypatch.setattr(sys, "prefix", str(Path(python).parents[1]))
        assert str(quantize.converter_dir()) == conv, dockerfile
        monkeypatch.delenv("FTLIB_LLAMA_CPP", raising=False)


def test_both_images_install_the_s3_extra_and_it_is_locked():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    assert extras["s3"] and all(re.split(r"[<>=\[ ]", dep)[0].lower() in pins for dep in extras["s3"])
    for dockerfile in ("Dockerfile.trainer", "Dockerfile.airflow"):
        assert re.search(r"pip install .*\[(\w+,)*s3\]", "\n".join(stages(dockerfile)[-1])), dockerfile


def test_compose_stack_is_consistent():
    text = (DOCKER / "docker-compose.yaml").read_text()
    c = compose()
    services = c["services"]
    for name in ("postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "mlflow", "minio", "minio-init"):
        assert name in services, name
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source} missing"
            else:
                assert source in c["volumes"], f"{name}: undeclared volume {source}"
    ports = [p.split(":")[0] for svc in services.values() for p in svc.get("ports", [])]
    assert len(ports) == len(set(ports))
    commands = {name: svc.get("command") for name, svc in services.items()}
    assert commands["airflow-scheduler"] == ["scheduler"] and commands["airflow-dag-processor"] == ["dag-processor"]
    # secrets only through variables that must be set, all of them documented in .env.example
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = {line.split("=")[0] for line in (DOCKER / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert required and required <= example
    assert not re.search(r"(PASSWORD|SECRET)\w*:\s*['\"]?(?!\$)\w", text)  # no literal secrets


def test_compose_initialises_airflow_and_the_project_before_airflow_starts():
    services = compose()["services"]
    airflow = {n: s for n, s in services.items() if s.get("image") == "ftlib-airflow:latest" and n != "airflow-init"}
    assert set(airflow) >= {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}
    for name, svc in airflow.items():
        assert svc["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}, name
        assert "work:/work" in svc["volumes"] and svc["environment"]["FTLIB_PROJECT_DIR"] == "/work", name
    init = services["airflow-init"]
    script = " ".join(init["command"])
    steps = [script.index(s) for s in ("airflow db migrate", "airflow users create", "init-project.sh /opt/ftlib/project /work")]
    assert steps == sorted(steps) and "--role Admin" in script
    # `airflow users create` is the FAB auth manager's command (Airflow 3's default SimpleAuthManager has none)
    assert init["environment"]["AIRFLOW__CORE__AUTH_MANAGER"].endswith("fab_auth_manager.FabAuthManager")
    assert "$$AIRFLOW_ADMIN_PASSWORD" in script and "AIRFLOW_ADMIN_PASSWORD" in init["environment"]
    assert "work:/work" in init["volumes"]
    # the script and template the command names are where the Airflow image puts them
    copies = [line.split()[-1] for line in stages("Dockerfile.airflow")[-1] if line.startswith("COPY ")]
    assert "/opt/ftlib/" in copies and any(c.startswith("/opt/ftlib/project/") for c in copies)
    assert "COPY --chown=50000:0 docker/init-project.sh /opt/ftlib/" in stages("Dockerfile.airflow")[-1]


def test_compose_mlflow_uses_postgres_and_minio_and_minio_is_the_dvc_remote():
    services = compose()["services"]
    buckets = re.findall(r"local/(\w+)", services["minio-init"]["command"][0])
    mlflow = services["mlflow"]
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql\+psycopg2://airflow:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres/mlflow", store)
    assert "CREATE DATABASE mlflow;" in (DOCKER / "postgres-init.sql").read_text()
    assert "./postgres-init.sql:/docker-entrypoint-initdb.d/mlflow.sql:ro" in services["postgres"]["volumes"]
    assert mlflow["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert mlflow["image"].endswith("-full")  # psycopg2 and boto3 are only in the -full image
    artifacts = re.search(r"--artifacts-destination s3://(\w+)/", mlflow["command"]).group(1)
    assert artifacts in buckets and mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    client = services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"]
    assert client.removeprefix("http://") in re.search(r"--allowed-hosts (\S+)", mlflow["command"]).group(1).split(",")
    env = services["airflow-init"]["environment"]
    assert env["FTLIB_DVC_REMOTE"].removeprefix("s3://").split("/")[0] in buckets
    assert env["FTLIB_DVC_ENDPOINT"] == "http://minio:9000" and "9000:9000" in services["minio"]["ports"]


def test_kubernetes_manifests_match_the_pod_spec():
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "gpu-pool.yaml").read_text()))
    ns = POD_DEFAULTS["namespace"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", POD_DEFAULTS["pvc"]) in kinds and ("Namespace", ns) in kinds
    # one namespace: the workers (Helm release, RoleBinding subject) mount the PVC the pods mount
    assert all(d["metadata"].get("namespace", ns) == ns for d in docs)
    [binding] = [d for d in docs if d["kind"] == "RoleBinding"]
    assert [s["namespace"] for s in binding["subjects"]] == [ns]
    header = (DOCKER / "k8s" / "airflow-values.yaml").read_text()
    assert re.search(rf"helm upgrade --install airflow \S+ -n {ns} ", header)
    values = helm_values()
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["FTLIB_POD_PVC"] == POD_DEFAULTS["pvc"] and env["FTLIB_POD_NAMESPACE"] == ns
    assert {k.removeprefix("FTLIB_POD_").lower() for k in env if k.startswith("FTLIB_POD_")} <= set(POD_DEFAULTS)  # no typos
    assert env["FTLIB_POD_HF_SECRET"] and "FTLIB_POD_IMAGE_PULL_SECRETS" in env
    assert "nvidia.com/gpu.present" in env["FTLIB_POD_NODE_SELECTOR"]
    assert all("secretName" in s for s in values["secret"])
    assert "optional: true" in values["extraEnv"] and "HF_TOKEN" in values["extraEnv"]
    for part in ("workers", "dagProcessor"):
        [vol] = values[part]["extraVolumes"]
        [mount] = values[part]["extraVolumeMounts"]
        assert vol["persistentVolumeClaim"]["claimName"] == POD_DEFAULTS["pvc"] and mount["name"] == vol["name"]
        assert mount["mountPath"] == env["FTLIB_PROJECT_DIR"] == POD_DEFAULTS["workdir"]
    assert env["FTLIB_LANDING_DIR"].startswith(POD_DEFAULTS["workdir"] + "/")  # on the PVC, seen by every worker pod
    # the init Job lays the project out on that PVC with the Airflow image
    [job] = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    image = values["images"]["airflow"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
    assert container["command"][1:] == ["/opt/ftlib/init-project.sh", "/opt/ftlib/project", POD_DEFAULTS["workdir"]]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == POD_DEFAULTS["pvc"]


def template_from_dockerfile(dest: Path) -> None:
    """The project template as Dockerfile.airflow builds it: its COPY lines into /opt/ftlib/project/."""
    ignore = shutil.ignore_patterns("__pycache__")
    for line in stages("Dockerfile.airflow")[-1]:
        parts = [p for p in line.split()[1:] if not p.startswith("--")]
        *sources, target = parts
        if not target.startswith("/opt/ftlib/project/"):
            continue
        to = dest / target.removeprefix("/opt/ftlib/project/")
        for src in sources:
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, to, ignore=ignore)
            else:
                to.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, to / Path(src).name)


def test_init_script_lays_the_project_out_once(tmp_path):
    template, work = tmp_path / "template", tmp_path / "work"
    template_from_dockerfile(template)
    (work / "lost+found").mkdir(parents=True)  # an ext4 PVC is not empty, yet holds no project
    remote = compose()["services"]["airflow-init"]["environment"]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "FTLIB_DVC_REMOTE": remote["FTLIB_DVC_REMOTE"],
           "FTLIB_DVC_ENDPOINT": remote["FTLIB_DVC_ENDPOINT"], "DVC_NO_ANALYTICS": "1"}
    script = ["bash", str(DOCKER / "init-project.sh"), str(template), str(work)]
    r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    config = (work / ".dvc" / "config").read_text()
    assert "remote = storage" in config and f"url = {remote['FTLIB_DVC_REMOTE']}" in config
    assert f"endpointurl = {remote['FTLIB_DVC_ENDPOINT']}" in config
    assert "dvc-storage" not in config and "secret" not in config.lower()  # the template's remote is gone; no keys
    git = lambda *a: subprocess.run(["git", "-C", str(work), *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
    assert len(git("log", "--oneline").splitlines()) == 1 and git("status", "--porcelain") == ""
    # the template is complete: every dependency in dvc.yaml is in it, or an output of an earlier stage
    pipeline = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    made = {next(iter(o)) if isinstance(o, dict) else o for s in pipeline.values()
            for key in ("outs", "metrics", "plots") for o in s.get(key, [])}
    deps = {d for s in pipeline.values() for d in s["deps"]}
    assert deps - made and all((work / d).exists() for d in deps - made), sorted(d for d in deps - made if not (work / d).exists())
    assert (work / "data" / "raw" / "sentiment.jsonl").is_file()
    # a second start (or a second deployment on the volume) leaves the project as it is
    (work / "params.yaml").write_text("edited: true\n")
    r = subprocess.run(script, env={**env, "FTLIB_DVC_REMOTE": "s3://other"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "left as it is" in r.stdout
    assert (work / "params.yaml").read_text() == "edited: true\n" and "s3://other" not in (work / ".dvc" / "config").read_text()
