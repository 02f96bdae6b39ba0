"""Everything the CLI prints: plain lines, newline-delimited JSON, rich tables and progress bars, errors."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from runctl.config import scrub

if TYPE_CHECKING:
    from rich.console import Console

#: Prefix of every error and warning line.
PROG = "runctl"

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int | float) -> str:
    """``1536`` -> ``1.5 KiB``; bytes stay whole.

    Example:
        >>> human_size(512), human_size(1536), human_size(3 * 1024**3)
        ('512 B', '1.5 KiB', '3.0 GiB')
    """
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


#: Control characters a message shows escaped (``\x1b``), never as themselves or as a space:
#: a key's ESC went to the terminal as it is, and its ``\x0b`` read as a space named another
#: object that exists (keys pass). Tabs and line breaks are a message's own, and collapse.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    r"""Collapse a message onto one line and remove every known credential.

    Example:
        >>> one_line("upload of s3://b/a\x1bb failed:\n  timeout")
        'upload of s3://b/a\\x1bb failed: timeout'
    """
    from runctl.config import scrub

    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", scrub(str(text)))
    return " ".join(text.split())


def debug_enabled() -> bool:
    """True when ``RUNCTL_DEBUG`` asks for tracebacks and debug logs."""
    return os.environ.get("RUNCTL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def _nowhere() -> IO[str]:
    """Where output goes when the stream is closed: on a descriptor above 2, or the closed
    stdout's would be taken, and `download URL /dev/stdout` then wrote there (diff review)."""
    import fcntl

    fd = os.open(os.devnull, os.O_WRONLY)
    if fd <= 2:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = high
    return open(fd, "w", encoding="utf-8")  # noqa: SIM115 - for the process's lifetime


class Output:
    """The CLI's one way to print, in human, JSON-lines or quiet mode.

    Human mode writes plain lines and rich tables to stdout; ``--json`` writes one JSON object per
    line (each with a ``"type"``); ``--quiet`` drops chatter and progress but keeps data and errors.

    Example:
        >>> out = Output(json=True)
        >>> out.record("upload", source="a.pt", destination="s3://b/a.pt")  # doctest: +SKIP
        {"type": "upload", "source": "a.pt", "destination": "s3://b/a.pt"}
    """

    def __init__(self, *, json: bool = False, quiet: bool = False) -> None:
        self.json = json
        self.quiet = quiet
        self._console: Console | None = None

    # -- streams (looked up at call time: test runners swap sys.stdout) --

    @property
    def stdout(self) -> IO[str]:
        # Closed (`runctl ... >&-`): Python's is None. The work is done, and every command then
        # failed with "internal error: AttributeError" (surface pass): what it says goes nowhere.
        return sys.stdout if sys.stdout is not None else _nowhere()

    @property
    def stderr(self) -> IO[str]:
        return sys.stderr if sys.stderr is not None else _nowhere()

    @property
    def human(self) -> bool:
        return not self.json

    def _is_tty(self) -> bool:
        try:
            return self.stdout.isatty()
        except (AttributeError, ValueError):
            return False

    def console(self) -> Console:
        """A rich console on stdout (colour only on a terminal without NO_COLOR)."""
        if self._console is None or self._console.file is not self.stdout:
            from rich.console import Console

            tty = self._is_tty()
            self._console = Console(
                file=self.stdout,
                width=None if tty else 200,
                no_color=bool(os.environ.get("NO_COLOR")) or None,
                highlight=False,
                soft_wrap=False,
            )
        return self._console

    # -- data --

    def line(self, text: str) -> None:
        """A human data line (a listing row, a planned action); skipped in JSON mode."""
        if self.human:
            self.stdout.write(text + "\n")

    def lines(self, texts: Iterable[str]) -> None:
        """Many human data lines in one write; skipped in JSON mode.

        A terminal's stdout is line-buffered: ``line`` once per transferred file is one write
        per file there.

        Example:
            >>> Output().lines(["upload: a.pt -> s3://b/a.pt", "upload: b.pt -> s3://b/b.pt"])  # doctest: +SKIP
        """
        if self.human:
            self.stdout.write("".join(f"{text}\n" for text in texts))

    def info(self, text: str) -> None:
        """Human chatter (a summary, a hint); skipped in JSON and quiet modes."""
        if self.human and not self.quiet:
            self.stdout.write(text + "\n")
            self.stdout.flush()

    def record(self, type_: str, /, **fields: Any) -> None:
        """One JSON line ``{"type": type_, **fields}``; skipped in human mode."""
        if self.json:
            self.stdout.write(json.dumps({"type": type_, **fields}, default=str) + "\n")

    def json_line(self, obj: Mapping[str, Any]) -> None:
        """One JSON line from a ready mapping; skipped in human mode."""
        if self.json:
            self.stdout.write(json.dumps(dict(obj), default=str) + "\n")

    def flush(self) -> None:
        self.stdout.flush()

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[object]],
        *,
        title: str | None = None,
        right: Sequence[str] = (),
        styles: Sequence[str | None] | None = None,
    ) -> None:
        """A table (human mode only); ``right`` names right-aligned columns, ``styles`` one per row.

        On a terminal, a rich table (styled, folded to the width); piped, plain aligned columns,
        one row per line and never folded, so ``grep`` and ``awk`` see whole rows (and rich's
        0.8 s for 1,000 rows is not spent). Cells are text, never markup.

        Example:
            >>> Output().table(("name", "size"), [("step_1.pt", "1.0 KiB")], right=("size",))  # doctest: +SKIP
            name          size
            step_1.pt  1.0 KiB
        """
        if not self.human:
            return
        cells = [[str(cell) for cell in row] for row in rows]
        if not self._is_tty():
            self._plain_table(columns, cells, title, right)
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left", overflow="fold")
        for i, row in enumerate(cells):
            table.add_row(*(Text(cell) for cell in row), style=styles[i] if styles else None)
        self.console().print(table)

    def _plain_table(
        self,
        columns: Sequence[str],
        cells: Sequence[Sequence[str]],
        title: str | None,
        right: Sequence[str],
    ) -> None:
        widths = [len(name) for name in columns]
        for row in cells:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]

        def fmt(values: Sequence[str]) -> str:
            return "  ".join(
                value.rjust(width) if name in right else value.ljust(width)
                for value, width, name in zip(values, widths, columns, strict=False)
            ).rstrip()

        lines = ([title] if title else []) + [fmt(columns)] + [fmt(row) for row in cells]
        self.stdout.write("\n".join(lines) + "\n")

    # -- progress --

    def progress_enabled(self) -> bool:
        return self.human and not self.quiet and self._is_tty()

    @contextmanager
    def progress(
        self, description: str, total: int | None = None
    ) -> Iterator[Callable[[int], None] | None]:
        """A byte progress bar while the block runs (only on a terminal); yields the callback or None."""
        if not self.progress_enabled():
            yield None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console(),
            transient=True,
        )
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)  # rich's Progress is thread-safe

        with bar:
            yield advance

    # -- errors --

    def warn(self, message: str) -> None:
        self.stderr.write(f"{PROG}: warning: {one_line(message)}\n")
        self.stderr.flush()

    def error(
        self, message: str, *, exit_code: int, failures: Mapping[str, str] | None = None
    ) -> None:
        """The one-line error on stderr (and, in JSON mode, an ``error`` record on stdout)."""
        text = one_line(message)
        if self.json:
            fields: dict[str, Any] = {"message": text, "exit_code": exit_code}
            if failures:
                # JSON carries a key's control characters escaped: the key as it is.
                fields["failures"] = {scrub(k): one_line(v) for k, v in failures.items()}
            self.record("error", **fields)
            self.flush()
        self.stderr.write(f"{PROG}: error: {text}\n")
        self.stderr.flush()

    def traceback(self, exc: BaseException) -> None:
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        from runctl.config import scrub

        self.stderr.write(scrub(text))
        self.stderr.flush()


def render_retention(
    out: Output, plan: Any, *, location: str, dry_run: bool, durable_in: str | None = None
) -> None:
    """Show a RetentionPlan: a keep/delete table with reasons (human) or one record per checkpoint (JSON).

    Every checkpoint appears once, oldest first, as ``keep`` or ``delete``, with the reason.
    """
    from runctl.checkpoints import Checkpoint

    items = sorted(
        [("delete", c) for c in plan.delete] + [("keep", c) for c in plan.keep],
        key=lambda item: Checkpoint.order_key(item[1]),
    )
    for action, cp in items:
        out.record(action, **cp.to_json(), reason=plan.reasons.get(cp.name, ""), dry_run=dry_run)
    freed = sum(c.size for c in plan.delete)
    not_durable = [c.name for c in plan.keep if plan.reasons.get(c.name) == "not durable in S3"]
    out.record(
        "summary",
        action="cleanup",
        location=location,
        deleted=len(plan.delete),
        kept=len(plan.keep),
        bytes_freed=freed,
        over_max_total_size=plan.over_size,
        not_durable=not_durable,
        dry_run=dry_run,
    )
    over = plan.over_size
    if over:
        kept = plan.max_total_size + over
        out.warn(
            f"{'would keep' if dry_run else 'kept'} {human_size(kept)} in {location}, "
            f"{human_size(over)} over --max-total-size {human_size(plan.max_total_size)}: the "
            "newest whole step, protected checkpoints, aliases and steps not yet whole are "
            "never deleted for size"
        )
    if not out.human or out.quiet:
        return
    if not items:
        out.info(f"no checkpoints under {location}")
        return
    verb = "would delete" if dry_run else "delete"
    rows = [
        (
            verb if action == "delete" else "keep",
            cp.name + ("/" if cp.is_dir else ""),
            "" if cp.step is None else cp.step,
            human_size(cp.size),
            len(cp.files),
            "yes" if cp.complete else "no",
            plan.reasons.get(cp.name, ""),
        )
        for action, cp in items
    ]
    styles = ["red" if action == "delete" else None for action, _ in items]
    out.table(
        ("action", "checkpoint", "step", "size", "files", "complete", "reason"),
        rows,
        right=("step", "size", "files"),
        styles=styles,
    )
    n = len(plan.delete)
    noun = "checkpoint" if n == 1 else "checkpoints"
    head = f"dry run: would delete {n} {noun}" if dry_run else f"deleted {n} {noun}"
    out.info(f"{head} ({human_size(freed)}) in {location}; kept {len(plan.keep)}")
    if not_durable:
        out.info(
            f"kept {len(not_durable)} not yet durable in S3 (no verified upload of this version in the journal"
            + (f", nor a matching copy in {durable_in}" if durable_in else "")
            + "): "
            + ", ".join(not_durable)
            + "; --force deletes them anyway"
        )


class _StderrHandler(logging.Handler):
    """Library log records as ``runctl: warning: ...`` on the current stderr, scrubbed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            sys.stderr.write(f"{PROG}: {level}: {one_line(scrub(record.getMessage()))}\n")
        except Exception:  # a log line must never break a command
            self.handleError(record)


def configure_logging(*, quiet: bool = False) -> None:
    """Send the library's warnings (debug logs with RUNCTL_DEBUG=1) to stderr, once.

    The ``runctl`` logger keeps propagating and keeps its level (unless debugging), so a program
    embedding the CLI, or a test's log capture, sees the same records.
    """
    logger = logging.getLogger("runctl")
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    if debug_enabled():
        logger.setLevel(logging.DEBUG)
        handler.setLevel(logging.DEBUG)
    else:
        handler.setLevel(logging.ERROR if quiet else logging.WARNING)
