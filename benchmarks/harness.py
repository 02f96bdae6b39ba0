"""Timing machinery: run a command (wall time and peak RSS), alternate arms, summarise, render the table."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchError(RuntimeError):
    """A measured command failed or produced a wrong result; the row says so instead of a number."""


@dataclass(frozen=True)
class CmdResult:
    """One finished command: wall seconds, peak RSS of its largest process (bytes), exit code, output."""

    wall: float
    maxrss: int
    returncode: int
    stdout: str
    stderr: str


def run_cmd(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = 600.0,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    out_dir: Path | None = None,
) -> CmdResult:
    """Run ``cmd`` (no shell), timing it from spawn to exit; peak RSS comes from ``wait4``.

    stdout and stderr go to files (as with ``> file``), the same for every tool measured.
    ``wait4`` reports the largest of the process and its waited-for children (s5cmd under runctl).
    """
    tmp = out_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    tag = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    out_path, err_path = tmp / f"bench-out-{tag}", tmp / f"bench-err-{tag}"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    result = CmdResult(wall, int(usage.ru_maxrss) * 1024, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        tail = " | ".join(line for line in stderr.strip().splitlines()[-3:])
        raise BenchError(
            f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}... exited {result.returncode}: {tail[:300]}"
        )
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with 20 samples, p99 is the largest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass
class Arm:
    """One side of a comparison: a name, how many repetitions it gets, and one timed run.

    ``run(rep)`` returns seconds (and may stash extra figures in ``extra``); ``setup``/``teardown``
    run untimed around each repetition.
    """

    name: str
    run: Callable[[int], float]
    reps: int
    setup: Callable[[int], None] | None = None
    teardown: Callable[[int], None] | None = None
    samples: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    def record(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)

    @property
    def median(self) -> float | None:
        return median(self.samples) if self.samples else None


def alternate(arms: Sequence[Arm], log: Callable[[str], None]) -> None:
    """Run the arms interleaved, so drift on a noisy machine hits every arm alike.

    Each round starts one arm later among those still running (A B C, B C A, C A B; with two
    left, A B then B A): no arm always runs first, or always right after the same other one.
    Dirty pages are synced before every timed run, so no arm pays for the previous one's writes.

    An arm that fails stops (its error is kept); the others go on.
    """
    for rep in range(max((arm.reps for arm in arms), default=0)):
        active = [arm for arm in arms if rep < arm.reps and arm.error is None]
        if not active:
            continue
        shift = rep % len(active)
        for arm in [*active[shift:], *active[:shift]]:
            try:
                if arm.setup:
                    arm.setup(rep)
                # The last arm's writes (a GiB of dirty pages) are flushed now, untimed, rather
                # than by the kernel in the middle of whichever arm comes next.
                os.sync()
                seconds = arm.run(rep)
                arm.samples.append(seconds)
                log(f"    {arm.name:<28} rep {rep + 1}/{arm.reps}: {seconds:.3f}s")
            except BenchError as exc:
                arm.error = str(exc)
                log(f"    {arm.name:<28} FAILED: {exc}")
            finally:
                if arm.teardown:
                    try:
                        arm.teardown(rep)
                    except BenchError as exc:
                        arm.error = arm.error or str(exc)


NOT_IMPLEMENTED = "n/a (not implemented)"


@dataclass
class Row:
    """One line of the results table, with the raw numbers kept for the JSON file."""

    id: str
    measurement: str
    target: str
    runctl: str = ""
    baselines: str = ""
    ratios: str = ""
    met: str = ""
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "measurement": self.measurement,
            "runctl": self.runctl,
            "baselines": self.baselines,
            "ratios": self.ratios,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "data": self.data,
        }


def fmt_s(seconds: float | None) -> str:
    """Seconds with three significant figures; milliseconds below 0.1 s."""
    if seconds is None:
        return "—"
    if seconds < 0.1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    if ratio < 0.01:
        return f"{ratio:.2g}×"
    return f"{ratio:.2f}×"


def fmt_mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def met_text(checks: Sequence[bool | None]) -> str:
    """ "yes" when every check passed, "NO" when one failed, "n/a" when none could be made."""
    known = [c for c in checks if c is not None]
    if not known:
        return "n/a"
    if all(known):
        return "yes" if len(known) == len(checks) else "yes (partly measured)"
    return "NO"


HEADER = (
    "#",
    "measurement",
    "runctl (median s)",
    "baseline(s) (median s)",
    "ratio(s)",
    "target",
    "met?",
)


def render_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        cells = (
            row.id,
            row.measurement,
            row.runctl,
            row.baselines,
            row.ratios,
            row.target,
            row.met,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"- {row.id}: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return (text or "—").replace("|", "\\|").replace("\n", " ")


def write_results(
    out_dir: Path, rows: Sequence[Row], meta: Mapping[str, Any], table: str
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "latest.md", out_dir / "latest.json"
    md_path.write_text(_machine_line(meta) + "\n\n" + table + "\n", encoding="utf-8")
    doc = {"meta": dict(meta), "rows": [row.to_json() for row in rows]}
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return md_path, json_path


def _machine_line(meta: Mapping[str, Any]) -> str:
    return (
        f"runctl {meta.get('runctl_version')} · {meta.get('mode')} run · {meta.get('cpus')} CPUs "
        f"({meta.get('cpu_model')}) · server: {meta.get('server')} on loopback · "
        f"s5cmd {meta.get('s5cmd_version')} · {meta.get('aws_version')} · "
        f"took {meta.get('elapsed_s', 0):.0f} s · `{meta.get('command')}`"
    )
