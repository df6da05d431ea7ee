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


def run_profile(params, profile, raw_dir: Path = Path("data/raw"), root: Path = Path(".")) -> dict[str, Path]:
    """Every stage in order, in this process, for a profile with an output root of its own (`ftlib run --profile
    smoke`): the DAG's task order, without DVC (whose outputs it must not touch). `params` already holds the
    profile's overrides. Invalid data stops it before anything else runs; returns where each output went."""
    from ftlib.core import log as logs
    from ftlib.core.errors import InvalidData
    from ftlib.stages.benchmark import benchmark
    from ftlib.stages.evaluate import evaluate
    from ftlib.stages.quantize import quantize
    from ftlib.stages.split import split_paths
    from ftlib.stages.train import train
    from ftlib.stages.validate import validate_paths

    log = logs.get("ftlib.run")
    where = {name: root / profile.path(default) for name, default in (
        ("validated", "data/validated"), ("splits", "data/splits"), ("reports", "reports"),
        ("merged", "models/merged"), ("quantized", "models/quantized"))}
    adapter = root / params.train.output_dir
    p = params
    log.info(f"[1/6] validate {raw_dir} -> {where['validated']}")
    checked = validate_paths([root / raw_dir], p, where["validated"])
    if not checked.ok:
        raise InvalidData(f"{len(checked.errors)} validation errors in {raw_dir} (report: {where['validated'] / 'report.json'}); "
                          "nothing else ran", [str(e) for e in checked.errors], root / raw_dir)
    log.info(f"[2/6] split -> {where['splits']}")
    split_paths([root / raw_dir], p, where["splits"])
    log.info(f"[3/6] train -> {adapter}")
    train(p, where["splits"], where["reports"])
    log.info(f"[4/6] quantize {', '.join(p.quantize.variants)} -> {where['quantized']}")
    quantize(adapter, where["quantized"], where["merged"], p.quantize.variants, p.quantize.merged_dtype,
             allow_pickle_weights=p.allow_pickle_weights)
    log.info("[5/6] benchmark")
    benchmark(p, str(adapter), str(where["quantized"]), str(where["splits"]), str(where["reports"] / "benchmark.json"),
              p.benchmark.include_base)
    log.info("[6/6] evaluate on the test split")
    evaluate(str(adapter), where["splits"] / "test.jsonl", labels=p.data.labels, task=p.data.task, template=p.template,
             predictions_csv=where["reports"] / "predictions.csv", progress=True,
             metrics_json=where["reports"] / "metrics.json", confusion_png=where["reports"] / "plots" / "confusion_matrix.png")
    return {**where, "adapter": adapter}
