"""Messages and progress, one way for the whole package.

Messages go through `logging` (loggers named `ftlib.<module>`): the CLI shows them on stderr through
a rich handler (`setup_cli`), Airflow puts them in the task log at their level, a notebook or a
service routes them wherever its own handlers say. Long loops draw `progress_bar`: one rich bar on
stderr, drawn only on a terminal (so CI logs and Airflow logs stay readable).
"""

from __future__ import annotations

import logging
from typing import Any, Callable


def get(name: str) -> logging.Logger:
    """The logger of module `name` (pass __name__)."""
    return logging.getLogger(name)


def silence_known_noise() -> None:
    """Two messages every adapter load printed that ask nothing of the user: bitsandbytes' CPU backend failing to
    fetch an optional kernel from the hub (no hub access here; its own CPU kernel runs instead), and PEFT reading
    transformers' renamed `is_gradient_checkpointing` (a FutureWarning for PEFT's authors)."""
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def setup_cli(level: int = logging.INFO) -> None:
    """INFO and up from every ftlib logger to stderr, one line each: through a rich handler on a terminal,
    as plain `LEVEL message` lines elsewhere (CI, files, Airflow), so a path in a message is never wrapped."""
    import sys

    from rich.console import Console
    from rich.logging import RichHandler

    silence_known_noise()
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
    """(bar, advance): a rich progress bar on stderr (drawn only on a terminal; use the bar as a context
    manager) and its advance(n) callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
    task = bar.add_task(description, total=total)
    return bar, lambda n: bar.advance(task, n)
