#!/usr/bin/env python
"""Dependency audit for CI: pip-audit on this environment, one decision.

  exit 1  a known vulnerability has a fixed version: upgrade the pin in constraints.txt
  exit 0  no known vulnerability, or only ones without a fix (listed, so someone decides)
  exit 0  the audit could NOT be performed (vulnerability service unreachable, every
          dependency skipped): said loudly, because pip-audit itself then prints
          "No known vulnerabilities found" - a clean bill it never checked - and a
          network outage must not fail CI either
  exit 2  pip-audit is not installed (`make venv` installs it with the dev extra)

    python scripts/audit.py                      # audit the installed environment (.ci/run)
    python scripts/audit.py --report audit.json  # decide on a saved `pip-audit -f json` output
    python scripts/audit.py -- -s osv            # extra arguments go to pip-audit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

TIMEOUT_S = 150  # pip-audit's own socket timeout is lower; this bounds the whole run in CI


def run_pip_audit(extra: list[str]) -> tuple[dict[str, Any] | None, str]:
    """(parsed JSON report or None, why there is none)."""
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", "--timeout", "10",
           "--skip-editable", *extra]  # skip-editable: ftlib itself is not on PyPI
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None, f"pip-audit did not finish in {TIMEOUT_S} s"
    try:  # exit 1 with a JSON report is "vulnerabilities found"; anything else without one is a failure to check
        return json.loads(proc.stdout), ""
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"pip-audit exit {proc.returncode}: {tail[-1] if tail else 'no output'}"


def decide(report: dict[str, Any] | None, error: str = "") -> tuple[int, list[str]]:
    """(exit code, lines to print) for a `pip-audit -f json` report."""
    if report is None:
        return 0, [f"dependency audit NOT performed: {error}"]
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    skipped = [d for d in deps if "skip_reason" in d]
    if not audited:
        reasons = Counter(d["skip_reason"].split(":")[0] for d in skipped)
        why = "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) or "pip-audit found no dependencies"
        return 0, [f"dependency audit NOT performed: all {len(deps)} dependencies were skipped ({why}). "
                   "The vulnerability service was not reachable from here; audit elsewhere: "
                   "pip-audit -r constraints.txt --no-deps"]
    findings = [(d["name"], d["version"], v["id"], v.get("fix_versions") or [])
                for d in audited for v in d.get("vulns", [])]
    lines = [f"audited {len(audited)} dependencies"
             + (f"; {len(skipped)} could not be audited: {', '.join(sorted(d['name'] for d in skipped))}" if skipped else "")]
    if findings:
        rows = [("package", "version", "vulnerability", "fixed in")] + [
            (n, ver, vid, ", ".join(fix) or "no fix yet") for n, ver, vid, fix in sorted(findings)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    fixable = [f for f in findings if f[3]]
    if fixable:
        lines.append(f"FAILED: {len(fixable)} known vulnerabilit{'y' if len(fixable) == 1 else 'ies'} with a fix: "
                     "raise the pins in constraints.txt (and pyproject.toml if it caps them)")
        return 1, lines
    lines.append(f"ok: {len(findings)} known vulnerabilit{'y' if len(findings) == 1 else 'ies'} without a fix (listed above)"
                 if findings else "ok: no known vulnerabilities")
    return 0, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="Decide on this saved `pip-audit -f json` output instead of running pip-audit.")
    parser.add_argument("extra", nargs="*", help="Arguments passed to pip-audit (after --).")
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            report, error = json.loads(args.report.read_text(encoding="utf-8")), ""
        except (OSError, ValueError) as e:
            report, error = None, f"{args.report}: {e}"
    elif importlib.util.find_spec("pip_audit") is None:
        print("error: pip-audit is not installed in this environment; run `make venv` (it installs the dev extra)", file=sys.stderr)
        return 2
    else:
        report, error = run_pip_audit(args.extra)
    code, lines = decide(report, error)
    print("\n".join(lines), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
