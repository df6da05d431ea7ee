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


def setup_cli(level: int = logging.INFO) -> None:
    """INFO and up from every ftlib logger to stderr, one line each (never wrapped: paths stay greppable)."""
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger("ftlib")
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        console = Console(stderr=True, soft_wrap=True, highlight=False)
        root.addHandler(RichHandler(console=console, show_time=False, show_path=False, markup=False,
                                    show_level=True, keywords=[]))
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
