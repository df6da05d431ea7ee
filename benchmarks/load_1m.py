"""Load: 1,000,000 examples through `ftlib validate` and `ftlib split` in bounded memory.

Generates an alpaca sentiment JSONL file (default 1,000,000 unique rows, ~150-200 bytes
each, 3 balanced labels; the rows of benchmarks/validate_throughput.py) in a temp dir,
then runs, as real processes with the repo's params.yaml (every rule, Data Docs on):

    python -m ftlib validate FILE --report-dir TMP/validated
    python -m ftlib split FILE --out-dir TMP/splits

and reads each process's own peak RSS from os.wait4 (ru_maxrss) and its wall time.
Baseline: the same two commands on --baseline-rows rows (10,000) in the same run; ratio =
peak RSS at --rows / peak RSS at the baseline (~1 means memory does not grow with the data).
Target: both peaks < 2 GB at 1M rows.

Prints a table, then one JSON line: rows, file_mb, validate_peak_rss_mb, split_peak_rss_mb,
validate_s, split_s, baseline, baseline_rows, baseline_validate_peak_rss_mb,
baseline_split_peak_rss_mb, ratio, target_met.

    python benchmarks/load_1m.py [--rows 1000000] [--baseline-rows 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from validate_throughput import make_data  # noqa: E402  (same rows as the throughput benchmark)

TARGET_MB = 2048


def run(args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, peak RSS in MB, seconds) of `python -m ftlib ARGS` run from the repo root."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t = time.perf_counter()
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "ftlib", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage, not all children's maximum
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t


def measure(rows: int, tmp: Path) -> dict[str, float]:
    d = tmp / f"rows{rows}"
    d.mkdir()
    data = d / "reviews.jsonl"
    make_data(data, rows)
    figures: dict[str, float] = {"rows": rows, "file_mb": data.stat().st_size / 2**20}
    for stage, args in (("validate", ["validate", str(data), "--report-dir", str(d / "validated")]),
                        ("split", ["split", str(data), "--out-dir", str(d / "splits")])):
        log = d / f"{stage}.log"
        code, rss, seconds = run(args, log)
        if code != 0:
            sys.exit(f"{stage} on {rows:,} rows exited {code}:\n{log.read_text()[-3000:]}")
        figures[f"{stage}_peak_rss_mb"], figures[f"{stage}_s"] = rss, seconds
    report = json.loads((d / "validated" / "report.json").read_text())
    written = sum(len((d / "splits" / f"{s}.jsonl").read_bytes().splitlines()) for s in ("train", "validation", "test"))
    assert report["valid"] and report["examples_valid"] == rows == written, (report["rules"], written)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="examples to generate (default 1000000)")
    ap.add_argument("--baseline-rows", type=int, default=10_000, help="examples for the baseline run (default 10000)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="ftlib-load-") as tmp:
        base = measure(args.baseline_rows, Path(tmp))
        big = measure(args.rows, Path(tmp))

    table = Table(title="validate + split as processes: peak RSS (own, from wait4) and wall time")
    for col in ("run", "rows", "file MB", "validate MB", "validate s", "split MB", "split s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, f in (("baseline", base), ("load", big)):
        table.add_row(name, f"{f['rows']:,}", f"{f['file_mb']:.0f}", f"{f['validate_peak_rss_mb']:,.0f}", f"{f['validate_s']:.1f}",
                      f"{f['split_peak_rss_mb']:,.0f}", f"{f['split_s']:.1f}")
    Console().print(table)
    peak = max(big["validate_peak_rss_mb"], big["split_peak_rss_mb"])
    ratio = peak / max(base["validate_peak_rss_mb"], base["split_peak_rss_mb"])
    print(f"peak RSS {peak:,.0f} MB at {args.rows:,} rows = {ratio:.2f}x the {args.baseline_rows:,}-row run; "
          f"target < {TARGET_MB} MB: {'met' if peak < TARGET_MB else 'NOT met'}")
    print(json.dumps({
        "rows": args.rows,
        "file_mb": round(big["file_mb"], 1),
        "validate_peak_rss_mb": round(big["validate_peak_rss_mb"], 1),
        "split_peak_rss_mb": round(big["split_peak_rss_mb"], 1),
        "validate_s": round(big["validate_s"], 1),
        "split_s": round(big["split_s"], 1),
        "baseline": f"the same commands on {args.baseline_rows:,} rows",
        "baseline_rows": args.baseline_rows,
        "baseline_validate_peak_rss_mb": round(base["validate_peak_rss_mb"], 1),
        "baseline_split_peak_rss_mb": round(base["split_peak_rss_mb"], 1),
        "ratio": round(ratio, 3),
        "target_met": peak < TARGET_MB,
    }))


if __name__ == "__main__":
    main()
