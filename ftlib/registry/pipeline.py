"""The whole pipeline through DVC, as `ftlib run` drives it: `dvc repro`, then where every output went."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `dvc` runs in: dvc.yaml's commands call `ftlib`, so the interpreter's bin dir (the
    venv) goes first on PATH."""
    return {**os.environ, **(extra or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def repro(force: bool = False, root: Path = Path(".")) -> int:
    """`dvc repro` of every stage in `root` (DVC skips what did not change), output streamed; its exit code.

    DVC deletes a stage's outputs before running it, so a failed or interrupted stage would leave no model at
    all; then the outputs dvc.lock still records (the last good run's) are checked out of DVC's cache again."""
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"no dvc.yaml in {root.resolve()}; run from the project root")
    try:
        code = subprocess.call([sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])], cwd=root, env=dvc_env())
    except KeyboardInterrupt:
        restore(root)
        raise
    if code != 0:
        restore(root)
    return code


def restore(root: Path = Path("."), *targets: str) -> None:
    """Check the outputs dvc.lock records back out of DVC's cache where they are missing (best effort)."""
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--quiet", *targets], cwd=root, env=dvc_env(),
                   capture_output=True, check=False)


def outputs(root: Path = Path(".")) -> list[tuple[str, str, int | None]]:
    """(stage, output path, bytes or None when missing) for every out, metric and plot in dvc.yaml."""
    import yaml

    rows = []
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            rows.append((name, str(path.relative_to(root)) + ("/" if path.is_dir() else ""),
                         sum(p.stat().st_size for p in files) if files else None))
    return rows
