"""Run any training script, watch its checkpoint directory, and hand finished checkpoints to the uploader."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat as stat_module
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runctl.checkpoints import (
    RUNCTL_DIR,
    dir_awaits_dcp_sign,
    dir_awaits_deepspeed_sign,
    dir_awaits_hf_sign,
    dir_format_check,
    format_check,
    has_completion_sign,
    is_recognised,
    local_checkpoint,
)
from runctl.exceptions import (
    EXIT_FAILED,
    FlushTimeout,
    RunctlError,
    UploadError,
    UsageError,
)
from runctl.s3url import NOT_UTF8, S3URL, not_utf8

if TYPE_CHECKING:
    from runctl.config import S3Config
    from runctl.uploader import CheckpointUploader, UploadHandle

log = logging.getLogger("runctl.local")

#: Variables `runctl local` sets for the script; the plain-loop helper and the callbacks read them as defaults.
ENV_CHECKPOINT_DIR = "RUNCTL_CHECKPOINT_DIR"  # absolute path of --checkpoint-dir
ENV_S3_URL = "RUNCTL_S3_URL"  # --upload-to, as a prefix (s3://bucket/run/)
ENV_KEEP_LAST_N = "RUNCTL_KEEP_LAST_N"  # --keep-last-n (S3 retention)
ENV_LOCAL_KEEP_LAST_N = "RUNCTL_LOCAL_KEEP_LAST_N"  # --local-keep-last-n
ENV_ENDPOINT_URL = "RUNCTL_ENDPOINT_URL"  # the resolved S3 endpoint, when not AWS itself
#: Set to "1" while `runctl local` itself uploads what appears in RUNCTL_CHECKPOINT_DIR.
ENV_WATCHED = "RUNCTL_LOCAL_WATCHING"

RUNS_DIR = "runs"
#: Under ``<dir>/.runctl/``: one file per process of the script that uploads the directory itself.
CLAIMS_DIR = "claims"

DEFAULT_SETTLE = 2.0
DEFAULT_INTERVAL = 0.5
DEFAULT_FLUSH_TIMEOUT = 600.0


# -- the command and its environment --------------------------------------------------------------


def build_command(script: str, args: Sequence[str] = ()) -> list[str]:
    """``python SCRIPT ARGS`` for a ``.py`` file (this interpreter), else the executable itself.

    Raises:
        UsageError: the script does not exist, or is not a ``.py`` file and not executable.

    Example:
        >>> build_command("train.py", ["--lr", "0.1"])[1:]  # doctest: +SKIP
        ['train.py', '--lr', '0.1']
    """
    if not script:
        raise UsageError("SCRIPT is empty: give a .py file or an executable")
    path = Path(script)
    if script.endswith(".py"):
        if not path.is_file():
            raise UsageError(f"SCRIPT {script!r} does not exist or is not a file")
        return [sys.executable, script, *args]
    if os.sep in script or (os.altsep and os.altsep in script) or path.exists():
        if not path.is_file():
            raise UsageError(f"SCRIPT {script!r} does not exist or is not a file")
        if not os.access(path, os.X_OK):
            raise UsageError(
                f"SCRIPT {script!r} is not executable: chmod +x it, or name its interpreter"
            )
        # As given when it names a directory ("./run.sh", not pathlib's "run.sh", which exec
        # would look up on PATH); a bare name found here runs as ./NAME.
        has_dir = os.sep in script or bool(os.altsep and os.altsep in script)
        return [script if has_dir else os.path.join(os.curdir, script), *args]
    found = shutil.which(script)
    if found is None:
        raise UsageError(f"SCRIPT {script!r} is neither a file nor a command on PATH")
    return [found, *args]


def script_env(
    base: Mapping[str, str] | None = None,
    *,
    checkpoint_dir: Path | None = None,
    s3_url: S3URL | None = None,
    keep_last_n: int | None = None,
    local_keep_last_n: int | None = None,
    endpoint_url: str | None = None,
    watching: bool = False,
    profile: str | None = None,
    region: str | None = None,
) -> dict[str, str]:
    """The script's environment: ``base`` plus the ``RUNCTL_*`` defaults it should use.

    ``profile`` and ``region`` (``runctl --profile/--region local``) go as ``AWS_PROFILE`` (and
    ``AWS_DEFAULT_PROFILE``, which botocore and aws read first) and ``AWS_REGION``/
    ``AWS_DEFAULT_REGION``, for the script's own uploads and any AWS tool it runs. A key pair
    in the environment is passed on as it is (a profile may assume a role from it,
    ``credential_source = Environment``), and outranks ``AWS_PROFILE`` in the script, as
    botocore reads them.

    Example:
        >>> env = script_env({}, checkpoint_dir=Path("/ckpt"), keep_last_n=3)
        >>> env["RUNCTL_CHECKPOINT_DIR"], env["RUNCTL_KEEP_LAST_N"]
        ('/ckpt', '3')
    """
    env = dict(os.environ if base is None else base)
    values = {
        ENV_CHECKPOINT_DIR: None
        if checkpoint_dir is None
        else str(Path(checkpoint_dir).absolute()),
        ENV_S3_URL: None if s3_url is None else str(s3_url.as_prefix()),
        ENV_KEEP_LAST_N: None if keep_last_n is None else str(keep_last_n),
        ENV_LOCAL_KEEP_LAST_N: None if local_keep_last_n is None else str(local_keep_last_n),
        ENV_ENDPOINT_URL: endpoint_url,
        ENV_WATCHED: "1" if watching else None,
    }
    if profile:
        values["AWS_PROFILE"] = values["AWS_DEFAULT_PROFILE"] = profile
    if region:
        values["AWS_REGION"] = values["AWS_DEFAULT_REGION"] = region
    for name, value in values.items():
        if value is not None:
            env[name] = value
    return env


# -- which files a process tree has open for writing -----------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields start after the last ')'.
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it (Linux /proc; just ``[pid]`` elsewhere)."""
    if not os.path.isdir("/proc"):
        return [pid]
    try:
        children = _ppid_map()
    except OSError:
        return [pid]
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def open_for_writing(pids: Sequence[int] | None, *, appending: bool = False) -> set[str] | None:
    """Real paths the given processes have open for writing; None when /proc cannot tell.

    ``pids=None``: every process whose descriptors this user may read (another user's
    processes are passed over: they cannot write this user's files unless shared).
    ``appending``: only those open for appending (``O_APPEND``: a log).

    Example:
        >>> isinstance(open_for_writing([os.getpid()]), (set, type(None)))
        True
    """
    if not os.path.isdir("/proc/self/fdinfo"):
        return None
    every = pids is None
    if pids is None:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    found: set[str] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            if every:
                continue
            return None  # not ours to look at: cannot tell
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                if not target.startswith("/"):  # a socket, a pipe: no file to ask about
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    flags_line = next((ln for ln in fh if ln.startswith("flags:")), "")
            except OSError:
                continue
            if not flags_line:
                continue
            flags = int(flags_line.split()[1], 8)
            if flags & (os.O_WRONLY | os.O_RDWR) and (flags & os.O_APPEND or not appending):
                found.add(target.removesuffix(" (deleted)"))
    return found


def _is_written(path: str, is_dir: bool, writers: set[str] | None) -> bool:
    """Whether ``writers`` (``open_for_writing``) holds the file ``path``, or one inside the directory."""
    if not writers:
        return False
    real = os.path.realpath(path)
    if is_dir:
        inside = real.rstrip("/") + "/"
        return any(w.startswith(inside) for w in writers)
    return real in writers


#: File names that say a model or its state was saved in them (``unrecognised``).
_MODEL_FILE = re.compile(r"\.(pt|pth|ckpt|bin|safetensors|tar|pkl|pickle|h5|npz)$", re.IGNORECASE)

#: Why the final scan leaves out a checkpoint something still writes after the script exited.
OUTLIVED = (
    "still open for writing after the script exited (by a process it left running?): a later "
    "`runctl local` uploads it once it is written, or upload it by hand"
)


def being_written(root: Path, *, settle: float = DEFAULT_SETTLE) -> dict[str, str]:
    """The checkpoints directly under ``root`` that look unfinished, each with why.

    For a person's ``runctl checkpoint cleanup`` beside a training run: a checkpoint some
    process has open for writing, or that changed within the last ``settle`` seconds, is still
    being written, and must not count as the newest (nor be deleted). So is one whose format
    says it was cut short (``format_check``: a save a crash or a full disk stopped), though
    nothing writes it any more: counted, it made the whole one before it go.

    Example:
        >>> being_written(Path("checkpoints"))  # doctest: +SKIP
        {'step=6.ckpt': 'a process has it open for writing'}
    """
    now = time.time()
    writers = open_for_writing(None)
    found: dict[str, str] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name == RUNCTL_DIR or not is_recognised(entry.name, None):
            continue
        sig = _dir_signature(Path(entry.path)) if entry.is_dir() else None
        try:
            newest = sig[3] / 1e9 if sig is not None else entry.stat().st_mtime
        except OSError:
            continue
        if _is_written(entry.path, sig is not None, writers):
            found[entry.name] = "a process has it open for writing"
        elif now - newest < settle:
            found[entry.name] = f"it changed {max(0.0, now - newest):.1f} s ago"
        else:
            path = Path(entry.path)
            if sig is not None and dir_awaits_hf_sign(path):
                continue  # retention says why itself (no trainer_state.json yet)
            _, torn = dir_format_check(path) if sig is not None else format_check(path)
            if torn is not None:
                found[entry.name] = f"cut short: {torn}"
    return found


# -- the watcher ----------------------------------------------------------------------------------


@dataclass
class _Seen:
    signature: tuple[int, ...]
    since: float
    polls: int = 1
    submitted: tuple[int, ...] | None = None
    writing: bool = False
    #: The signature it had when last seen open for writing, and when it was first seen closed
    #: since without a change: closed by its writer, or by the death of its writer?
    open_seen: tuple[int, ...] | None = None
    closed_at: float | None = None
    #: ``(signature, (told, reason))`` of the last format check (``format_check``).
    checked: tuple[tuple[int, ...], tuple[bool, str | None]] | None = None


def _file_signature(st: os.stat_result) -> tuple[int, ...]:
    return (0, st.st_ino, st.st_size, st.st_mtime_ns)


def _dir_signature(path: Path) -> tuple[int, ...]:
    count = size = newest = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            count += 1
            newest = max(newest, st.st_mtime_ns)
            if stat_module.S_ISREG(st.st_mode):
                size += st.st_size
    return (1, count, size, newest)


class CheckpointWatcher:
    """Polls a directory and hands each finished checkpoint to ``submit``, once per version.

    A file is finished when its size and mtime have not changed for ``settle`` seconds and no
    process of the watched tree has it open for writing (checked in /proc where there is one).
    A directory is finished when its framework's completion sign exists (Hugging Face's
    ``trainer_state.json``; DeepSpeed's ``latest`` naming it) and nothing in it changed since
    the previous poll, or else when it has been quiet for ``settle`` seconds, unless it is the
    Hugging Face Trainer's or DeepSpeed's (``dir_awaits_hf_sign``, ``dir_awaits_deepspeed_sign``:
    then only its sign will do). Nothing whose format shows it cut short (``format_check``) is
    ever handed over. Checkpoints the
    journal already knows (verified, or pending or failed and so resumed by the uploader) are not
    re-sent.

    Example:
        >>> watcher = CheckpointWatcher(Path("ckpt"), uploader.submit, settle=1.0)  # doctest: +SKIP
        >>> watcher.start(); ...; watcher.stop(); watcher.final_scan(script_failed=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: Path,
        submit: Callable[[Path], object],
        *,
        settle: float = DEFAULT_SETTLE,
        interval: float = DEFAULT_INTERVAL,
        patterns: Sequence[str] | None = None,
        pids: Callable[[], Sequence[int]] | None = None,
    ) -> None:
        if settle < 0:
            raise UsageError(f"settle must be >= 0 seconds, got {settle!r}")
        if interval <= 0:
            raise UsageError(f"interval must be > 0 seconds, got {interval!r}")
        self.root = Path(root)
        self.submit = submit
        self.settle = settle
        self.interval = interval
        self.patterns = patterns
        self.pids = pids
        self._seen: dict[str, _Seen] = {}
        self._known = self._journal_known()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.skipped: dict[str, str] = {}
        #: Checkpoints the uploader refused (``submit`` raised): a failed upload, exit code 1.
        self.refused: dict[str, str] = {}

    def _journal_known(self) -> Callable[[str, int | None, float | None], bool]:
        from runctl.journal import Journal

        try:
            snapshot = Journal(self.root).snapshot()  # one replay for both questions
            # As the uploader resumes them: pending, and failed in an earlier process.
            pending = {e.name for e in snapshot.pending(failed=True)}
            verified = snapshot.was_verified
        except RunctlError as exc:
            log.warning("cannot read the journal in %s: %s", self.root, exc)
            return lambda name, size, mtime: False

        def known(name: str, size: int | None, mtime: float | None) -> bool:
            # What an earlier run left out as torn: the same version is not sent now either.
            if snapshot.torn(name, size, mtime):
                return True
            return name in pending or verified(name, size, mtime)

        return known

    # -- thread --

    def start(self) -> None:
        """Poll every ``interval`` seconds on a daemon thread until ``stop()``."""
        self._thread = threading.Thread(target=self._run, name="runctl-local-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # one bad poll must not end the watch
                log.warning("watching %s: %s", self.root, exc)

    # -- polling --

    def _candidates(self) -> list[os.DirEntry[str]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            (e for e in entries if e.name != RUNCTL_DIR and is_recognised(e.name, self.patterns)),
            key=lambda e: e.name,
        )

    def _signature(self, entry: os.DirEntry[str]) -> tuple[int, ...] | None:
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError:
            return None
        if stat_module.S_ISDIR(st.st_mode):
            return _dir_signature(Path(entry.path))
        if stat_module.S_ISREG(st.st_mode):
            return _file_signature(st)
        return None

    def _writers(self, *, anyone: bool = False) -> set[str] | None:
        """What the script's processes have open for writing (``anyone``: every process's)."""
        try:
            if anyone:
                return open_for_writing(None)
            return None if self.pids is None else open_for_writing(self.pids())
        except OSError:
            return None

    def poll(
        self, *, final: bool = False, script_failed: bool = False, killed: bool = False, errored: bool = False
    ) -> list[Path]:
        """One look at the directory; returns what was handed over.

        ``final`` (the script has exited, nothing writes any more) hands over everything not yet
        sent, except, when ``script_failed``, what the script still had open for writing at the
        previous poll (it may be torn); those are listed in ``skipped``.
        """
        with self._lock:
            return self._poll(final, script_failed, killed, errored)

    def _poll(self, final: bool, script_failed: bool, killed: bool = False, errored: bool = False) -> list[Path]:
        now = time.monotonic()
        writers: set[str] | None = None
        writers_read = False
        handed: list[Path] = []
        present: set[str] = set()
        for entry in self._candidates():
            sig = self._signature(entry)
            if sig is None:
                continue
            name = entry.name
            present.add(name)
            is_dir = sig[0] == 1
            state = self._seen.get(name)
            if state is None:
                state = self._seen[name] = _Seen(sig, now)
                if is_dir:  # as the uploader recorded it: the sum of its files, the newest mtime
                    size, mtime = _dir_version(Path(entry.path))
                else:
                    size, mtime = sig[2], sig[3] / 1e9
                if self._known(name, size, mtime) or (
                    not is_dir and self._known(name, size, _stat_mtime(entry))
                ):
                    state.submitted = sig
            elif state.signature != sig:
                state.signature, state.since, state.polls = sig, now, 1
            else:
                state.polls += 1
            if state.submitted == sig:
                continue
            path = Path(entry.path)
            unsigned_hf = is_dir and dir_awaits_hf_sign(path)
            unsigned_ds = is_dir and dir_awaits_deepspeed_sign(path)
            unsigned_dcp = is_dir and dir_awaits_dcp_sign(path)
            if final:
                why = None
                ended = killed or script_failed
                if not writers_read:
                    # Anyone's: a process the script started in the background outlives it, and
                    # the script's own tree no longer leads to it (resume pass: torn, "verified").
                    writers, writers_read = self._writers(anyone=True), True
                if unsigned_hf:
                    why = "no trainer_state.json, which the Hugging Face Trainer writes last: its save was cut short"
                elif unsigned_dcp:
                    why = "no .metadata, which torch.distributed.checkpoint writes last: its save was cut short"
                elif _is_written(entry.path, is_dir, writers):
                    # Not journaled as torn: a later run uploads it once it is written and closed.
                    self.skipped[name] = OUTLIVED
                    log.warning("not uploading %s: %s", name, OUTLIVED)
                    state.submitted = sig
                    continue
                elif (
                    script_failed
                    and (state.writing or state.open_seen == sig)
                    and not self._format(state, path, is_dir, sig)[0]
                ):
                    # Open when the script failed, in a format that cannot tell whether it is
                    # whole. One whose format says whole goes up (the last save before a crash).
                    why = "still being written when the script failed"
                elif (reason := self._format(state, path, is_dir, sig))[1] is not None:
                    why = f"cut short: {reason[1]}"
                elif ended and unsigned_ds:
                    why = "DeepSpeed's latest does not name it: its save was cut short"
                elif (
                    (killed or (is_dir and errored))
                    and not reason[0]
                    and not (is_dir and has_completion_sign(path))
                    and time.time() - sig[3] / 1e9 < self.settle
                ):
                    # One killed by a signal may be cut off before anyone saw it open; where
                    # the format cannot tell whether it is whole, what changed just before the
                    # end is left out. So is a directory when the script errored: a sharded
                    # save that raised at 2 of 4 shards (a full disk) closed its files, was
                    # marked complete, and retention deleted the step before it, in S3 and
                    # here (local pass). A file's own format decides (a script may fail right
                    # after a whole save), and a save on SIGINT or SIGTERM is no error.
                    why = "changed moments before the script " + ("was killed" if killed else "failed")
                if why is not None:
                    self._leave_out(name, sig, why)
                    state.submitted = sig
                    continue
            else:
                signed = is_dir and has_completion_sign(path)
                quiet_for = now - state.since
                if signed:
                    if state.polls < 2:
                        continue
                elif unsigned_hf or unsigned_ds or unsigned_dcp:
                    continue  # the Trainer's, DeepSpeed's or torch.distributed's, still without its sign
                elif quiet_for < self.settle or state.polls < 2:
                    continue
                if not writers_read:
                    writers, writers_read = self._writers(), True
                state.writing = _is_written(entry.path, is_dir, writers)
                if state.writing:
                    state.open_seen, state.closed_at = sig, None
                    continue
                if state.open_seen == sig:
                    # Open and quiet, now closed without a change: closed by its writer, or by
                    # the writer's death? Wait a settle time: a dead script is seen by then,
                    # and the final scan leaves the file out.
                    state.closed_at = state.closed_at or now
                    if now - state.closed_at < self.settle + self.interval:
                        continue
                torn = self._format(state, path, is_dir, sig)[1]
                if torn is not None:
                    # Closed, quiet and cut short (a save that raised half-way): never sent;
                    # a later save of the name is a new version. The final scan says so.
                    continue
            if not_utf8(name):  # the uploader refuses it: a failed upload, said once
                state.submitted = sig
                self.refused[name] = NOT_UTF8
                log.warning("not uploading %s: %s", name, NOT_UTF8)
                continue
            try:
                self.submit(Path(entry.path))
            except UsageError as exc:  # vanished between the look and the hand-over
                log.info("not handing over %s: %s", name, exc)
                continue
            state.submitted = sig
            handed.append(Path(entry.path))
        if not final:
            for name in list(self._seen):
                if name not in present:
                    del self._seen[name]
        return handed

    @staticmethod
    def _format(
        state: _Seen, path: Path, is_dir: bool, sig: tuple[int, ...]
    ) -> tuple[bool, str | None]:
        """``format_check`` of this version (once per version)."""
        if state.checked is None or state.checked[0] != sig:
            state.checked = (sig, dir_format_check(path) if is_dir else format_check(path))
        return state.checked[1]

    def unrecognised(self) -> dict[str, str]:
        """Files saved the way models are (``.pt``, ``.pth``, ``.ckpt``, ``.bin``, ``.safetensors``,
        ``.tar``, ``.pkl``) whose names runctl does not take for checkpoints, and why.

        ``checkpoint.pth.tar``, ``model_best.pth.tar`` or ``best.pt`` were never uploaded, and
        the run said "uploaded 0 checkpoints", exit 0, without naming them (local pass).
        """
        try:
            with os.scandir(self.root) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if _MODEL_FILE.search(e.name)
                    and e.is_file()
                    and not is_recognised(e.name, self.patterns)
                    and not e.name.startswith(".")
                )
        except OSError:
            return {}
        why = (
            "not taken for a checkpoint: runctl knows a checkpoint by a step or epoch in its "
            "name (step_N.pt, checkpoint_N.pth, epoch=E-step=S.ckpt) or an alias (last.ckpt)"
        )
        return {name: why for name in names}

    def _leave_out(self, name: str, sig: tuple[int, ...], why: str) -> None:
        """Not uploaded, and said so; a file's version is journaled, so a later run leaves it out too."""
        self.skipped[name] = why
        log.warning("not uploading %s: %s", name, why)
        if sig[0] == 0:
            from runctl.journal import TORN, Journal

            try:
                Journal(self.root).record(
                    name, "skipped", size=sig[2], mtime=sig[3] / 1e9, detail=f"{TORN}: {why}"
                )
            except RunctlError as exc:
                log.warning("cannot journal that %s was left out: %s", name, exc)

    def track_writers(self) -> None:
        """Remember which unsent checkpoints are open for writing now (called as the script ends)."""
        with self._lock:
            unsent = [(n, s) for n, s in self._seen.items() if s.submitted != s.signature]
            if not unsent:
                return
            writers = self._writers()
            for name, state in unsent:
                state.writing = _is_written(
                    str(self.root / name), state.signature[0] == 1, writers
                )

    def final_scan(self, *, script_failed: bool, killed: bool = False, errored: bool = False) -> list[Path]:
        """After the script exited: hand over everything finished that was not sent yet.

        Left out (and journaled, so a later run leaves them out too): a Trainer's directory
        without its ``trainer_state.json``, or a torch.distributed one without its
        ``.metadata``; what its format shows cut short; with ``script_failed``, what it was
        writing; with ``script_failed`` or ``killed``, a DeepSpeed directory ``latest`` names an
        earlier step than; and with ``killed``, what changed within ``settle`` seconds before in
        a format that cannot tell, as with ``errored`` (a failure other than an exit on SIGINT
        or SIGTERM, which a script that saved on the signal gives) a directory without a sign.
        """
        return self.poll(final=True, script_failed=script_failed, killed=killed, errored=errored)


def _dir_version(path: Path) -> tuple[int | None, float | None]:
    """A directory's size and mtime as the journal holds them (``local_checkpoint``'s)."""
    try:
        cp = local_checkpoint(path)
    except OSError:
        return None, None
    return cp.size, cp.mtime


def _stat_mtime(entry: os.DirEntry[str]) -> float | None:
    try:
        return entry.stat().st_mtime
    except OSError:
        return None


# -- the run record -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadRecord:
    """What became of one hand-over: ``state`` is verified, skipped, failed or pending.

    Example:
        >>> UploadRecord("step_1.pt", "verified", "s3://b/run/step_1.pt", 10).to_json()["state"]
        'verified'
    """

    name: str
    state: str
    url: str | None = None
    size: int | None = None
    seconds: float | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RunRecord:
    """One `runctl local` run: the command, when, how it ended, and what was uploaded.

    ``script_exit_code`` is the script's own (128+N when a signal N killed it); ``exit_code`` is
    what runctl exits with: 128+N when runctl forwarded signal N, else the script's code, else 1
    when an upload failed or is still pending.

    Example:
        >>> RunRecord(("python", "t.py"), 0.0, 1.0, 0, 0).to_json()["exit_code"]
        0
    """

    command: tuple[str, ...]
    start: float
    end: float
    exit_code: int
    script_exit_code: int
    signal: int | None = None
    checkpoint_dir: str | None = None
    s3_url: str | None = None
    uploads: tuple[UploadRecord, ...] = ()
    not_uploaded: Mapping[str, str] = field(default_factory=dict)
    upload_error: str | None = None
    record_path: str | None = None
    #: The pid of the script's process that uploaded the directory itself (runctl local stood aside).
    uploaded_by_script: int | None = None

    @property
    def failed_uploads(self) -> tuple[UploadRecord, ...]:
        """Checkpoints whose latest version failed or is still pending (an older failed version that
        a newer one replaced does not count)."""
        latest = {u.name: u for u in self.uploads}
        return tuple(u for u in latest.values() if u.state in ("failed", "pending"))

    @property
    def upload_failed(self) -> bool:
        return bool(self.failed_uploads) or self.upload_error is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "command": list(self.command),
            "start": self.start,
            "end": self.end,
            "seconds": round(self.end - self.start, 3),
            "exit_code": self.exit_code,
            "script_exit_code": self.script_exit_code,
            "signal": self.signal,
            "checkpoint_dir": self.checkpoint_dir,
            "s3_url": self.s3_url,
            "uploads": [u.to_json() for u in self.uploads],
            "not_uploaded": dict(self.not_uploaded),
            "upload_error": self.upload_error,
            "uploaded_by_script": self.uploaded_by_script,
        }


def write_run_record(root: Path, record: RunRecord) -> Path:
    """Write ``record`` as ``<root>/.runctl/runs/<UTC timestamp>.json`` (atomically); return the path.

    Example:
        >>> import tempfile
        >>> p = write_run_record(Path(tempfile.mkdtemp()), RunRecord(("x",), 0.0, 1.0, 0, 0))
        >>> p.parent.name
        'runs'
    """
    runs = Path(root) / RUNCTL_DIR / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(record.start))
    millis = int((record.start % 1) * 1000)
    base = f"{stamp}.{millis:03d}Z"
    path = runs / f"{base}.json"
    n = 1
    while path.exists():
        path = runs / f"{base}-{n}.json"
        n += 1
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# -- output tee -----------------------------------------------------------------------------------


class _Tee:
    """Copies a child's pipe to a stream and to the log file, chunk by chunk."""

    def __init__(
        self, source: IO[bytes], sink: IO[bytes], log_file: IO[bytes], lock: threading.Lock
    ) -> None:
        self.source, self.sink, self.log_file, self.lock = source, sink, log_file, lock
        self.thread = threading.Thread(target=self._run, name="runctl-local-tee", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = self.source.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            try:
                self.sink.write(chunk)
                self.sink.flush()
            except (OSError, ValueError):
                pass  # our own stdout went away: the log still gets everything
            with self.lock:
                self.log_file.write(chunk)
                self.log_file.flush()
        self.source.close()


# -- signals --------------------------------------------------------------------------------------


def terminal_delivers_to(child_pid: int) -> bool:
    """True when a Ctrl-C at the terminal already reached the child (same foreground process group).

    Used by whatever forwards signals to a child it started (``runctl local``, ``watch --exec``):
    a SIGINT the terminal delivered must not be sent again, one sent with ``kill`` must be.

    Example:
        >>> child = subprocess.Popen(["sleep", "5"], start_new_session=True)
        >>> terminal_delivers_to(child.pid)  # a session of its own: no Ctrl-C reaches it
        False
        >>> child.kill(); child.wait()
        -9
    """
    try:
        if os.getpgid(child_pid) != os.getpgrp():
            return False
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _SignalForwarder:
    """While the script runs: SIGINT/SIGTERM go to it (once), runctl waits for it to end."""

    SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.installed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _SignalForwarder:
        if self.installed:
            for sig in self.SIGNALS:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    # Started with it ignored (a shell's `train &` ignores SIGINT): so is the
                    # script, which inherited that, and runctl honours it too.
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.proc.poll() is not None:
            # The script is gone and we are flushing: Ctrl-C or SIGTERM stops waiting for
            # uploads, and runctl exits 128 + the signal, as it would have with the script running.
            if self.received is None:
                self.received = signum
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
        # A Ctrl-C at the terminal already went to the whole foreground group, the script
        # included: forwarding it too would interrupt the script's own clean-up. (A SIGINT sent
        # with kill while runctl is in the foreground is therefore not forwarded; SIGTERM always is.)
        if signum == signal.SIGINT and terminal_delivers_to(self.proc.pid):
            log.debug("SIGINT came from the terminal: the script got it too")
            return
        # SIGTERM (a preemption, a scheduler's stop) goes to every process below the script:
        # under train.sh, only the shell died, and its python trainer went on training and
        # saving after runctl had exited 143, none of it uploaded (resume review).
        targets = process_tree(self.proc.pid) if signum == getattr(signal, "SIGTERM", None) else [self.proc.pid]
        for pid in targets:
            try:
                os.kill(pid, signum)
            except OSError:  # gone meanwhile
                pass


# -- one run --------------------------------------------------------------------------------------


def _script_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


#: Signals no Python script exits with by choice: a wrapper shell's 128+N for these means its
#: program was killed (the OOM killer's SIGKILL) or crashed mid-save.
_KILLS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE})


def _killed(returncode: int) -> bool:
    """Whether the script died of a signal, or a wrapper shell reports its program killed.

    Not 130 or 143: a script that handled Ctrl-C or SIGTERM, saved and exited with it, left
    its checkpoint whole (diff review).
    """
    return returncode < 0 or (returncode - 128) in _KILLS


def _outcomes(handles: Sequence[UploadHandle]) -> list[UploadRecord]:
    found = []
    for handle in handles:
        if not handle.done():
            found.append(
                UploadRecord(handle.name, "pending", detail="still uploading when runctl stopped")
            )
            continue
        error = handle.exception(0)
        if error is not None:
            from runctl.config import scrub

            found.append(UploadRecord(handle.name, "failed", detail=scrub(str(error))))
            continue
        outcome = handle.result(0)
        found.append(
            UploadRecord(
                outcome.name,
                outcome.state,
                outcome.url,
                outcome.size,
                round(outcome.seconds, 3),
                outcome.detail,
            )
        )
    return found


def claim_directory(root: Path) -> Path:
    """Tell an enclosing ``runctl local`` that this process uploads ``root`` itself.

    A callback or ``CheckpointManager`` knows what ``runctl local``'s watcher cannot (the best
    checkpoint, the one resumed from, its own keep-last-N), so the watcher stands aside for a
    claim made by a process of its script: each checkpoint then goes up once, by the one that
    knows it. Returns the claim file (``<root>/.runctl/claims/<pid>``).

    Example:
        >>> import tempfile
        >>> claim_directory(Path(tempfile.mkdtemp())).parent.name
        'claims'
    """
    folder = Path(root) / RUNCTL_DIR / CLAIMS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / str(os.getpid())
    path.write_text(f"{os.getpid()}\n")
    return path


def claimed_by(root: Path, pids: Sequence[int]) -> int | None:
    """The pid among ``pids`` (the script's processes) that claimed ``root``, if any.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); _ = claim_directory(root)
        >>> claimed_by(root, [os.getpid()]) == os.getpid(), claimed_by(root, [1])
        (True, None)
    """
    try:
        names = os.listdir(Path(root) / RUNCTL_DIR / CLAIMS_DIR)
    except OSError:
        return None
    alive = set(pids)
    return next((int(n) for n in names if n.isdigit() and int(n) in alive), None)


def _clear_claims(root: Path) -> None:
    """Remove claims left by earlier runs (their processes are gone)."""
    folder = Path(root) / RUNCTL_DIR / CLAIMS_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        try:
            (folder / name).unlink()
        except OSError:
            pass


def run_local(
    command: Sequence[str],
    *,
    checkpoint_dir: Path | None = None,
    s3_url: S3URL | None = None,
    keep_last_n: int | None = None,
    local_keep_last_n: int | None = None,
    settle: float = DEFAULT_SETTLE,
    interval: float = DEFAULT_INTERVAL,
    log_file: Path | None = None,
    config: S3Config | None = None,
    use_s5cmd: bool = True,
    flush_timeout: float | None = DEFAULT_FLUSH_TIMEOUT,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
    uploader_factory: Callable[..., CheckpointUploader] | None = None,
    script_stdout_to_stderr: bool = False,
) -> RunRecord:
    """Run ``command`` to the end; with ``checkpoint_dir`` and ``s3_url``, upload what it saves.

    The script inherits stdin/stdout/stderr (with ``log_file``, its output goes through pipes
    and is copied to the file too); ``script_stdout_to_stderr`` sends its stdout to stderr (the
    CLI's ``--json`` keeps stdout for its own records). SIGINT/SIGTERM received meanwhile go to the script, which is
    waited for. Then a final scan, a flush (bounded by ``flush_timeout``; after a signal or a
    failed script, also ended once nothing has reached S3 for 30 s) and, with a checkpoint
    directory, a run record under ``<dir>/.runctl/runs/``.

    Raises:
        UsageError: inconsistent arguments (nothing is run).

    Example:
        >>> rec = run_local(build_command("train.py"), checkpoint_dir=Path("ckpt"),  # doctest: +SKIP
        ...                 s3_url=S3URL.parse("s3://bucket/run-7/"), keep_last_n=3)
        >>> rec.exit_code, [u.name for u in rec.uploads]  # doctest: +SKIP
        (0, ['step_1.pt', 'step_2.pt'])
    """
    if not command:
        raise UsageError("no command to run")
    if s3_url is not None and checkpoint_dir is None:
        raise UsageError("--upload-to needs --checkpoint-dir DIR (the directory to watch)")
    if (
        checkpoint_dir is not None
        and Path(checkpoint_dir).exists()
        and not Path(checkpoint_dir).is_dir()
    ):
        raise UsageError(f"--checkpoint-dir {str(checkpoint_dir)!r} is a file, not a directory")
    for value, argument in (
        (keep_last_n, "--keep-last-n"),
        (local_keep_last_n, "--local-keep-last-n"),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{argument} must be at least 1, got {value}")
    if (keep_last_n is not None or local_keep_last_n is not None) and s3_url is None:
        raise UsageError("--keep-last-n / --local-keep-last-n need --upload-to S3URL")
    if settle < 0:
        raise UsageError(f"--settle must be >= 0 seconds, got {settle}")

    root = None if checkpoint_dir is None else Path(checkpoint_dir).absolute()
    if root is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a bare "[Errno 2] ... '/proc/nope'" said nothing of the option
            raise UsageError(
                f"--checkpoint-dir {str(checkpoint_dir)!r}: cannot make the directory "
                f"({exc.strerror or exc})"
            ) from None

    uploader: CheckpointUploader | None = None
    if s3_url is not None and root is not None:
        if uploader_factory is None:
            from runctl.uploader import CheckpointUploader

            uploader_factory = CheckpointUploader
        _clear_claims(root)
        # Retention waits for the first checkpoint this process uploads: when the script's own
        # uploader claims the directory instead, only its retention (which knows the best
        # checkpoint and the one resumed from) may delete anything.
        uploader = uploader_factory(
            root,
            s3_url,
            keep_last_n=keep_last_n,
            local_keep_last_n=local_keep_last_n,
            config=config,
            use_s5cmd=use_s5cmd,
            failure_policy="warn",
            hold_retention=True,
        )

    child_env = script_env(
        env,
        checkpoint_dir=root,
        s3_url=s3_url,
        keep_last_n=keep_last_n,
        local_keep_last_n=local_keep_last_n,
        endpoint_url=config.endpoint_url if config is not None else None,
        watching=uploader is not None,
        # A script whose own uploader claims the directory (runctl then stands aside) signed
        # with the default credentials and region (config pass).
        profile=config.profile if config is not None else None,
        region=config.region if config is not None and not config.region_guessed else None,
    )
    # Uploads an earlier, interrupted run left pending resume at once: the summary counts them.
    handles: list[UploadHandle] = list(uploader.resumed) if uploader is not None else []
    watcher: CheckpointWatcher | None = None
    log_fh: IO[bytes] | None = None
    tees: list[_Tee] = []
    start = time.time()
    proc: subprocess.Popen[bytes] | None = None
    forwarder: _SignalForwarder | None = None
    upload_error: str | None = None
    script_code = EXIT_FAILED
    claimant: int | None = None  # the script's process that uploads the directory itself
    try:
        if log_file is not None:
            try:
                log_fh = open(log_file, "ab")
            except OSError as exc:
                raise UsageError(
                    f"--log {str(log_file)!r}: cannot open it: {exc.strerror}"
                ) from None
        pipe = subprocess.PIPE if log_fh is not None else None
        out_to: int | None = pipe
        if script_stdout_to_stderr and log_fh is None:
            out_to = stderr.fileno() if stderr is not None else sys.stderr.fileno()
        try:
            proc = subprocess.Popen(list(command), env=child_env, stdout=out_to, stderr=pipe)
        except OSError as exc:
            if uploader is not None:  # what it resumed stays journaled for the next run
                try:
                    uploader.close(0)
                except RunctlError:
                    pass
            raise UsageError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        if log_fh is not None:
            lock = threading.Lock()
            assert proc.stdout is not None and proc.stderr is not None
            script_out = (stderr or sys.stderr.buffer) if script_stdout_to_stderr else (stdout or sys.stdout.buffer)
            tees.append(_Tee(proc.stdout, script_out, log_fh, lock))
            tees.append(_Tee(proc.stderr, stderr or sys.stderr.buffer, log_fh, lock))
        running = proc
        if uploader is not None and root is not None:
            active, watched = uploader, root

            def submit(path: Path) -> None:
                nonlocal claimant
                if claimant is None:
                    claimant = claimed_by(watched, process_tree(running.pid))
                    if claimant is not None:
                        log.info(
                            "the script (pid %d) uploads %s itself: runctl local leaves it to it",
                            claimant,
                            watched,
                        )
                if claimant is not None:
                    return
                handles.append(active.submit(path))
                active.release_retention()

            watcher = CheckpointWatcher(
                root,
                submit,
                settle=settle,
                interval=interval,
                pids=lambda: process_tree(running.pid),
            )
            watcher.start()
        with _SignalForwarder(proc) as forwarder:
            while True:
                try:
                    proc.wait(timeout=interval)
                    break
                except subprocess.TimeoutExpired:
                    if watcher is not None:
                        # Remember what is open right now: if the script then dies, those may be torn.
                        watcher.track_writers()
            for tee in tees:
                tee.thread.join(10.0)
            script_code = _script_code(proc.returncode)
            if watcher is not None:
                watcher.stop()
                if claimant is None:
                    watcher.final_scan(
                        # A shell reports a child killed by signal N as 128+N (train.sh
                        # running python killed by the OOM killer: 137): killed too.
                        script_failed=script_code != 0,
                        killed=_killed(proc.returncode),
                        errored=script_code not in (0, 130, 143),
                    )
            if uploader is not None:
                from runctl.uploader import FAILING_TIMEOUT

                # After a signal or a failure, as the callbacks do on a training error: stop
                # waiting once nothing has reached S3 for 30 s; the journal keeps the rest.
                ended_badly = forwarder.received is not None or script_code != 0
                try:
                    uploader.close(
                        flush_timeout, failing_timeout=FAILING_TIMEOUT if ended_badly else None
                    )
                except FlushTimeout as exc:
                    upload_error = str(exc)
                except UploadError as exc:
                    upload_error = str(exc)
                except KeyboardInterrupt:
                    # close() already stopped the worker; the journal keeps the rest pending.
                    upload_error = "interrupted while waiting for uploads"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if watcher is not None:
            watcher.stop()
        if log_fh is not None:
            for tee in tees:
                tee.thread.join(5.0)
            log_fh.close()

    end = time.time()
    received = forwarder.received if forwarder is not None else None
    if received is not None:
        exit_code = 128 + received
    else:
        exit_code = script_code
    uploads = tuple(_outcomes(handles))
    if watcher is not None and watcher.refused:
        refused = "; ".join(f"{name}: {why}" for name, why in sorted(watcher.refused.items()))
        upload_error = f"{upload_error}; {refused}" if upload_error else refused
    if claimant is not None and root is not None:
        # runctl stood aside, but a run whose own uploads did not land is no success (resume
        # pass: S3 unreachable, "the script uploaded ... itself", exit 0).
        left = _left_pending_since(root, start)
        if left:
            unsent = (
                f"the script's own uploader left {len(left)} checkpoint(s) not uploaded: "
                f"{', '.join(left)} (pending in the journal: the next run resumes them)"
            )
            upload_error = f"{upload_error}; {unsent}" if upload_error else unsent
    record = RunRecord(
        command=tuple(command),
        start=start,
        end=end,
        exit_code=exit_code,
        script_exit_code=script_code,
        signal=received,
        checkpoint_dir=None if root is None else str(root),
        s3_url=None if s3_url is None else str(s3_url.as_prefix()),
        uploads=uploads,
        not_uploaded={**watcher.skipped, **watcher.refused, **watcher.unrecognised()} if watcher is not None else {},
        upload_error=upload_error,
        uploaded_by_script=claimant,
    )
    if exit_code == 0 and record.upload_failed:
        record = _replace(record, exit_code=EXIT_FAILED)
    if root is not None:
        try:
            path = write_run_record(root, record)
        except OSError as exc:
            log.warning("cannot write the run record under %s: %s", root, exc)
        else:
            record = _replace(record, record_path=str(path))
    return record


def _left_pending_since(root: Path, start: float) -> list[str]:
    """Names whose latest journal line, written since ``start``, leaves them not uploaded."""
    from runctl.journal import Journal

    try:
        pending = Journal(root).pending(failed=True)
    except RunctlError as exc:
        log.warning("cannot read the journal of %s to see what the script uploaded: %s", root, exc)
        return []
    return [e.name for e in pending if e.time >= start]


def _replace(record: RunRecord, **changes: Any) -> RunRecord:
    from dataclasses import replace

    return replace(record, **changes)
