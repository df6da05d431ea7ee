"""Messages and progress, one way for the whole package.

Messages go through `logging` (loggers named `ftlib.<module>`): the CLI shows them on stderr through
a rich handler (`setup_cli`), Airflow puts them in the task log at their level, a notebook or a
service routes them wherever its own handlers say. Long loops draw `progress_bar`: one rich bar on
stderr on a terminal; elsewhere (Airflow task logs, CI, files) `line_mode` is on and progress is an
INFO line at most every 30 s, since a redrawn bar there is a wall of carriage returns that Airflow
shows as red ERROR lines (it files everything on stderr under ERROR).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

LINE_EVERY_S = 30.0  # seconds between two progress lines in line mode


def on_terminal() -> bool:
    return sys.stderr.isatty()


def line_mode() -> None:
    """Off a terminal, turn off the tqdm bars of the libraries ftlib drives (datasets, transformers' Trainer and
    weight loading, huggingface_hub; child processes inherit it through the environment). ftlib's own long loops
    log progress lines instead (`progress_bar`, the training callback)."""
    if on_terminal():
        return
    os.environ.update({"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                       # MLflow otherwise installs its own stderr handler: its INFO lines would show as ERROR in Airflow
                       "MLFLOW_CONFIGURE_LOGGING": "false"})
    if "datasets" in sys.modules:  # read their env var at import: tell them directly too
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class ProgressLines:
    """Progress as log lines: `what: done/total (pct), elapsed, eta`, at most one every `every` seconds, and the last."""

    def __init__(self, logger: logging.Logger, what: str, total: int, every: float = LINE_EVERY_S):
        self.logger, self.what, self.total, self.every = logger, what, max(total, 0), every
        self.done, self.t0 = 0.0, time.monotonic()
        self.last = self.t0

    def __call__(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done and self.total else 0.0
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        self.logger.info(f"{self.what}: {self.done:,.0f}/{self.total:,}{pct}, {_clock(elapsed)} elapsed, eta {_clock(eta)}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def get(name: str) -> logging.Logger:
    """The logger of module `name` (pass __name__)."""
    return logging.getLogger(name)


def silence_known_noise() -> None:
    """Messages that ask nothing of the user: bitsandbytes' CPU backend failing to fetch an optional kernel from the
    hub on every adapter load (no hub access here; its own CPU kernel runs instead), PEFT reading transformers'
    renamed `is_gradient_checkpointing` (a FutureWarning for PEFT's authors), and the INFO chatter of GX's set-up and of MLflow's database migrations."""
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for chatty in ("great_expectations", "alembic"):  # GX's import and context set-up, MLflow's schema migrations
        logging.getLogger(chatty).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def setup_cli(level: int = logging.INFO) -> None:
    """INFO and up from every ftlib logger to stderr, one line each: through a rich handler on a terminal,
    as plain `LEVEL message` lines elsewhere (CI, files, Airflow), so a path in a message is never wrapped."""
    import sys

    from rich.console import Console
    from rich.logging import RichHandler

    silence_known_noise()
    line_mode()
    root = logging.getLogger("ftlib")
    for h in [h for h in root.handlers if getattr(h, "ftlib_cli", False)]:
        root.removeHandler(h)  # rebind to the current stderr (a test runner swaps it per command)
    console = Console(stderr=True, highlight=False)
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=False, keywords=[])
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.ftlib_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def progress_bar(total: int, description: str) -> tuple[Any, Callable[[float], None]]:
    """(bar, advance): a rich progress bar on stderr and its advance(n) callback (use the bar as a context
    manager). Off a terminal the bar is not drawn and advance(n) logs `ProgressLines` instead."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(description, total=total)
    if not console.is_terminal:
        return bar, ProgressLines(logging.getLogger("ftlib.progress"), description, total)
    return bar, lambda n: bar.advance(task, n)
