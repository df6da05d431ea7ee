"""Validation throughput: ftlib's full GX contract vs the course notes' plain loop.

Generates N alpaca sentiment examples (default 100,000, each unique: sample reviews with
a varied suffix), then in one process:
  baseline  the course notes' `validate_training_data` (section 3.2): json.loads per line,
            checks instruction/output present and output length >= 5. Nothing else.
  ftlib     `ftlib.stages.validate.validate_paths` with every rule on: JSON/UTF-8/line checks,
            required fields, types, non-empty, min output length, token length after the
            chat template with the real tokenizer, exact duplicates, contradictions,
            label set, class balance; report.json + quarantine.jsonl + Data Docs written.

Prints a table, then one JSON line: examples_per_s, seconds_100k, peak_rss_mb, ratio
(ftlib examples/s over baseline examples/s, so < 1 means ftlib is slower per example
because it checks far more), baseline_examples_per_s, n.

    python benchmarks/validate_throughput.py [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def course_validate_training_data(file_path: str) -> bool:
    """The course notes' validator (3.2), same checks, errors collected but not printed."""
    with open(file_path, "r", encoding="utf-8") as f:
        lines = f.readlines()
    errors = []
    for i, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
            if "instruction" not in data:
                errors.append(f"Línea {i}: Falta 'instruction'")
            if "output" not in data:
                errors.append(f"Línea {i}: Falta 'output'")
            if len(data.get("output", "")) < 5:
                errors.append(f"Línea {i}: Output muy corto")
        except json.JSONDecodeError:
            errors.append(f"Línea {i}: JSON inválido")
    return not errors


def make_data(path: Path, n: int) -> None:
    samples = [json.loads(l) for l in (ROOT / "data" / "raw" / "sentiment.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)
    tails = ["", " Lo recomiendo.", " Would buy again?", " (pedido #{})", " -- ref {}", " Entregado en {} días."]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            s = samples[i % len(samples)]
            text = f"{s['input']}{rng.choice(tails).format(i)} [{i}]"  # unique per row
            f.write(json.dumps({"instruction": s["instruction"], "input": text, "output": s["output"]}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="examples to generate (default 100000)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ftlib.core.config import load_params
    from ftlib.stages.validate import validate_paths

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.jsonl"
        make_data(data, args.n)

        t = time.perf_counter()
        assert course_validate_training_data(str(data))
        base_s = time.perf_counter() - t

        params = load_params(ROOT / "params.yaml")
        t = time.perf_counter()
        result = validate_paths([data], params, Path(tmp) / "validated")
        ftlib_s = time.perf_counter() - t
        assert result.ok, [str(i) for i in result.issues[:5]]
        assert result.n_valid == args.n

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    eps, base_eps = args.n / ftlib_s, args.n / base_s
    table = Table(title=f"validate {args.n:,} examples")
    for col in ("validator", "checks", "seconds", "examples/s"):
        table.add_column(col, justify="left" if col in ("validator", "checks") else "right")
    table.add_row("course notes loop (baseline)", "3 rules", f"{base_s:.2f}", f"{base_eps:,.0f}")
    table.add_row("ftlib validate (GX)", "all rules + tokens + docs", f"{ftlib_s:.2f}", f"{eps:,.0f}")
    Console().print(table)
    print(f"peak RSS {peak_mb:,.0f} MB; ftlib/baseline throughput ratio {eps / base_eps:.3f}")
    print(json.dumps({
        "examples_per_s": round(eps, 1),
        "seconds_100k": round(ftlib_s * 100_000 / args.n, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "ratio": round(eps / base_eps, 4),
        "baseline_examples_per_s": round(base_eps, 1),
        "n": args.n,
    }))


if __name__ == "__main__":
    main()
