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
    """`dvc repro` of every stage in `root` (DVC skips what did not change), output streamed; its exit code."""
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"no dvc.yaml in {root.resolve()}; run from the project root")
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])], cwd=root, env=dvc_env())


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
