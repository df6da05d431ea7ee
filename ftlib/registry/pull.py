"""What a registered version gives back: its pyfunc, loaded for `ftlib serve`, and its shipped GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from ftlib.registry.register import RegistryError, client, get_version, local_copy
from ftlib.serving.serve import RUNTIMES


def load_version(uri: str, runtime: str = "transformers") -> tuple[Any, Any]:
    """(the unwrapped pyfunc, its ModelVersion) for `ftlib serve`: the alias is resolved now, at load time."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: one of {RUNTIMES}, got {runtime!r}")

    mv = get_version(client(), uri)
    local = local_copy(f"models:/{mv.name}/{mv.version}")
    pyfunc = mlflow.pyfunc.load_model(str(local), model_config={"runtime": runtime})
    return pyfunc.unwrap_python_model(), mv


def pull_gguf(uri: str, out_dir: Path) -> list[Path]:
    """A version's shipped GGUF files and their Modelfile into out_dir: ready for
    `ollama create NAME -f Modelfile` or `python -m llama_cpp.server --model FILE.gguf`."""
    import shutil
    import tempfile

    mv = get_version(client(), uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="gguf", dst_path=tmp))
        except Exception as e:  # noqa: BLE001  (MLflow raises several types for a missing path)
            raise RegistryError(f"{uri}: v{mv.version} has no GGUF artifacts (none passed the benchmark's parity rule?): {e}") from None
        files = []
        for f in sorted(got.iterdir()):
            shutil.move(str(f), out_dir / f.name)
            files.append(out_dir / f.name)
    return files
