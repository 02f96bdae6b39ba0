"""Checkpoint naming, step parsing, grouping of local and S3 listings, completeness and markers."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runctl._version import __version__
from runctl.exceptions import MarkerError, NoSuchKeyError, TransferError, UsageError
from runctl.s3url import S3URL
from runctl.transfer.base import ObjectInfo, PrefixInfo

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger("runctl.checkpoints")

#: Inside a directory checkpoint in S3: written LAST on upload, deleted FIRST by retention.
MARKER_NAME = ".runctl-manifest.json"
#: Where runctl keeps its own files (journal, lock) inside a local checkpoint directory.
RUNCTL_DIR = ".runctl"
#: Hugging Face's completion sign: written last into each checkpoint-N/ by the Trainer.
HF_SIGN = "trainer_state.json"
#: DeepSpeed writes ``latest`` (naming the tag) next to its ``global_stepN`` directories once one is whole.
DEEPSPEED_SIGN = "latest"
#: The Hugging Face Trainer writes this right after the model, long before ``HF_SIGN``: a
#: ``checkpoint-N`` directory holding it is the Trainer's, finished only once ``HF_SIGN`` is too.
HF_ARGS = "training_args.bin"
_HF_NAME = re.compile(r"checkpoint-\d+")
MANIFEST_FORMAT = "runctl-manifest"
MANIFEST_VERSION = 1

_EXT = r"\.(?:ckpt|pt|pth|bin|safetensors|pkl)"
#: Names of a word and a number that are not checkpoints: a tokenizer's vocabulary, and the
#: pieces Hugging Face and Accelerate save inside a checkpoint (``rng_state_0.pth``,
#: ``random_states_0.pkl``, ``optimizer_1.bin``, ``scheduler_1.bin``, ``scaler_1.pt``).
_NOT_CHECKPOINTS = (
    r"vocab|tokenizer|merges|rng_state|random_states?|optimizer|optim|scheduler|lr_scheduler"
    r"|scaler|sampler|dataloader|events?"
)

#: Regexes that must match a checkpoint's whole base name (a file name or a directory name).
#: Anything they do not match (logs, configs, event files, READMEs, *.json) is never deleted.
DEFAULT_PATTERNS: tuple[str, ...] = (
    # Files whose name carries a step or an epoch: epoch=3-step=1200.ckpt, step_100.pt,
    # global_step5.pt, checkpoint-7.pth, epoch=2.ckpt (also Lightning's DeepSpeed *.ckpt/ dirs).
    rf"(?i)(?!\.).*(?<![a-z])(?:step|epoch|checkpoint)[=_-]?\d+.*{_EXT}",
    # Letters, then one trailing number: model-00100.safetensors, ckpt_5.pt, net_g_5000.pth,
    # agent_100.pt. Not the files that sit beside checkpoints with a number of their own:
    # vocab_32000.bin once ranked as step 32,000 and a cleanup kept it as the newest.
    rf"(?i)(?!(?:{_NOT_CHECKPOINTS})[-_]\d)[a-z][a-z_-]*[-_]\d+{_EXT}",
    # Aliases: last.ckpt, last-v1.ckpt, latest.pt (always protected by retention).
    rf"(?i)(?:last|latest)(?:-v\d+)?{_EXT}",
    # Directories: checkpoint-500 (Hugging Face), global_step500 (DeepSpeed), step-100, iter_0001000.
    r"(?i)(?:checkpoint|global_step|step|iter)[=_-]?\d+",
    # Directories: epoch=3, epoch=3-step=1200, epoch_3-v1.
    r"(?i)epoch[=_-]?\d+(?:[-_]step[=_-]?\d+)?(?:-v\d+)?",
)

#: A number followed by a decimal point and a digit is a metric's value, not a step: Lightning
#: names a metric logged on_step ``train_loss_step``, and ``{train_loss_step:.2f}`` in a
#: filename gave ``epoch=2-train_loss_step=0.31.ckpt`` step 0, so a cleanup kept an older one.
_NOT_A_FRACTION = r"(?!\d|\.\d)"
_STEP_RE = re.compile(
    rf"(?<![a-z])(?:step|checkpoint|iter)[=_-]?(\d+){_NOT_A_FRACTION}", re.IGNORECASE
)
_EPOCH_RE = re.compile(rf"(?<![a-z])epoch[=_-]?(\d+){_NOT_A_FRACTION}", re.IGNORECASE)
_TRAILING_RE = re.compile(r"[a-z][a-z_-]*[-_](\d+)", re.IGNORECASE)
_EXT_RE = re.compile(rf"{_EXT}$", re.IGNORECASE)
_ALIAS_RE = re.compile(rf"(?:last|latest)(?:-v\d+)?(?:{_EXT})?", re.IGNORECASE)
_TEMP_SUFFIXES = (".tmp", ".partial")


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def parse_step(name: str) -> tuple[int | None, int | None]:
    """The ``(step, epoch)`` a checkpoint name carries; either may be None.

    ``step=N``, ``step_N``, ``step-N``, ``checkpoint-N``, ``global_stepN`` and ``iterN`` give
    the step (not ``step=0.31``: a metric's value); ``epoch=E`` the epoch; a name of letters
    plus one trailing number (``model-00100.safetensors``) gives that number as the step.

    Example:
        >>> parse_step("epoch=3-step=1200.ckpt"), parse_step("checkpoint-500"), parse_step("last.ckpt")
        ((1200, 3), (500, None), (None, None))
    """
    base = _base(name)
    step_match = _STEP_RE.search(base)
    epoch_match = _EPOCH_RE.search(base)
    step = int(step_match.group(1)) if step_match else None
    epoch = int(epoch_match.group(1)) if epoch_match else None
    if step is None and epoch is None:
        stem = _EXT_RE.sub("", base)
        trailing = _TRAILING_RE.fullmatch(stem)
        if trailing:
            step = int(trailing.group(1))
    return step, epoch


def numbered_by_name_only(name: str) -> bool:
    """True when a name's number comes from the "letters, then one trailing number" rule alone
    (``model-00100.safetensors``, ``embeddings_4096.pt``), not from a step or epoch marker.

    Example:
        >>> numbered_by_name_only("net_g_5000.pth"), numbered_by_name_only("step_100.pt")
        (True, False)
    """
    base = _base(name)
    if _STEP_RE.search(base) or _EPOCH_RE.search(base):
        return False
    return _TRAILING_RE.fullmatch(_EXT_RE.sub("", base)) is not None


def step_order(name: str) -> tuple[int, int]:
    """``parse_step`` as retention orders it: higher is newer, -1 for a number the name lacks.

    Example:
        >>> step_order("epoch=3-step=1200.ckpt"), step_order("last.ckpt")
        ((1200, 3), (-1, -1))
    """
    step, epoch = parse_step(name)
    return (-1 if step is None else step, -1 if epoch is None else epoch)


@lru_cache(maxsize=64)
def _compile(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"invalid checkpoint pattern {pattern!r}: {exc}") from None
    return tuple(compiled)


def compile_patterns(patterns: Sequence[str] | None = None) -> tuple[re.Pattern[str], ...]:
    """Compile checkpoint patterns (``DEFAULT_PATTERNS`` when None); ``UsageError`` names a bad one."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return _compile(tuple(DEFAULT_PATTERNS if patterns is None else patterns))


def has_completion_sign(path: Path) -> bool:
    """True when a framework has marked the local directory checkpoint ``path`` finished.

    Hugging Face writes ``trainer_state.json`` into it last; DeepSpeed writes ``latest``
    (naming the tag) beside its ``global_stepN`` directories once one is whole;
    torch.distributed.checkpoint writes ``.metadata`` after its shards.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "checkpoint-5"; d.mkdir()
        >>> has_completion_sign(d), (d / HF_SIGN).write_text("{}") > 0, has_completion_sign(d)
        (False, True, True)
    """
    if (path / HF_SIGN).is_file() or (path / DEEPSPEED_SIGN).is_file() or (path / DCP_SIGN).is_file():
        return True
    try:
        tag = (path.parent / DEEPSPEED_SIGN).read_text(errors="replace").strip()
    except OSError:
        return False
    return tag == path.name


def awaits_hf_sign(name: str, names: Collection[str]) -> bool:
    """True when the directory ``name``, holding these file names (relative to it), is a Hugging
    Face Trainer checkpoint still being written: ``checkpoint-N`` with ``training_args.bin`` and
    without ``trainer_state.json``.

    The Trainer saves the model and ``training_args.bin`` first, then the optimizer (on a
    large model, gathering its state can take many seconds with no file open), and
    ``trainer_state.json`` last. Until then the directory is not a checkpoint to mark complete,
    to count among the newest, or to hand over, however long it has been quiet. Only the
    Trainer's own name: ``save_model`` exports (``training_args.bin``, no state) go anywhere.

    Example:
        >>> awaits_hf_sign("checkpoint-5", {"model.safetensors", "training_args.bin"})
        True
        >>> awaits_hf_sign("checkpoint-5", {"training_args.bin", "trainer_state.json"})
        False
        >>> awaits_hf_sign("final", {"model.safetensors", "training_args.bin"})
        False
    """
    return HF_ARGS in names and HF_SIGN not in names and _HF_NAME.fullmatch(_base(name)) is not None


def dir_awaits_hf_sign(path: Path) -> bool:
    """``awaits_hf_sign`` for a local directory: looks for both files in it.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "checkpoint-5"; d.mkdir()
        >>> _ = (d / HF_ARGS).write_bytes(b"a"); dir_awaits_hf_sign(d)
        True
    """
    return awaits_hf_sign(path.name, {n for n in (HF_ARGS, HF_SIGN) if (path / n).is_file()})


_DS_NAME = re.compile(r"global_step(\d+)")


def dir_awaits_deepspeed_sign(path: Path) -> bool:
    """True when the local directory ``path`` is a DeepSpeed ``global_stepN`` save in progress.

    DeepSpeed writes ``latest`` (naming the tag) beside its ``global_stepN`` directories once
    every rank has saved: while it names an earlier step, this one is not known to be whole,
    however quiet. Without ``latest`` (``save_latest=False``), or with a tag of another form,
    there is no sign to wait for: False.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "global_step20").mkdir()
        >>> _ = (root / "latest").write_text("global_step10"); dir_awaits_deepspeed_sign(root / "global_step20")
        True
        >>> _ = (root / "latest").write_text("global_step20"); dir_awaits_deepspeed_sign(root / "global_step20")
        False
    """
    match = _DS_NAME.fullmatch(path.name)
    if match is None:
        return False
    try:
        tag = (path.parent / DEEPSPEED_SIGN).read_text(errors="replace").strip()
    except OSError:
        return False
    named = _DS_NAME.fullmatch(tag)
    return named is not None and int(named.group(1)) < int(match.group(1))


#: torch.distributed.checkpoint writes each rank's shards (``__0_0.distcp``), then ``.metadata``.
DCP_SIGN = ".metadata"
DCP_SHARD = ".distcp"


def dir_awaits_dcp_sign(path: Path) -> bool:
    """True when the local directory ``path`` holds torch.distributed.checkpoint shards and not
    yet the ``.metadata`` written after them: a save in progress, however quiet.

    A sharded save that paused between files longer than ``--settle`` was taken whole by
    ``runctl local``, marked complete in S3, and retention deleted the checkpoint before it
    (local pass).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()) / "step-200"; d.mkdir()
        >>> _ = (d / "__0_0.distcp").write_bytes(b"s"); dir_awaits_dcp_sign(d)
        True
        >>> _ = (d / DCP_SIGN).write_bytes(b"m"); dir_awaits_dcp_sign(d)
        False
    """
    try:
        with os.scandir(path) as entries:
            shards = any(e.name.endswith(DCP_SHARD) for e in entries)
    except OSError:
        return False
    return shards and not (path / DCP_SIGN).is_file()


_ZIP_MAGIC = b"PK\x03\x04"


def format_check(path: Path) -> tuple[bool, str | None]:
    """``(told, reason)``: whether the file's own format tells if it is whole, and if it is cut
    short, why (else None).

    ``torch.save`` (``.pt``, ``.pth``, Lightning's ``.ckpt``) writes a zip that ends with its
    central directory and holds ``data.pkl``: a save cut off mid-write lacks the first, and one
    that failed half-way (an object that cannot be pickled) the second, though its file is
    closed and quiet. A ``.safetensors`` file is exactly as long as its header says, and a
    ``.pkl`` (protocol 2 and up) ends with pickle's STOP. Other formats cannot tell:
    ``(False, None)``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "step_1.pt"; _ = p.write_bytes(b"PK\x03\x04 cut off")
        >>> format_check(p)
        (True, 'a zip file without its end (cut off mid-write)')
        >>> import pickle; q = p.with_name("state.pkl"); _ = q.write_bytes(pickle.dumps({"w": 1})[:-3])
        >>> format_check(q)
        (True, 'a pickle without its end (cut short)')
    """
    import zipfile

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False, None  # a FIFO's open would wait for a writer forever
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == _ZIP_MAGIC:
                try:
                    with zipfile.ZipFile(f) as archive:
                        names = archive.namelist()
                except (zipfile.BadZipFile, ValueError, EOFError):
                    return True, "a zip file without its end (cut off mid-write)"
                # torch's writer puts version and byteorder in every archive it finishes.
                torch = any(n.rpartition("/")[2] in ("version", "byteorder") for n in names)
                if torch and not any(n.rpartition("/")[2] == "data.pkl" for n in names):
                    return True, "a torch.save file without its data.pkl (the save failed half-way)"
                return True, None
            if path.name.endswith((".pkl", ".pickle")) and head[:1] == b"\x80":
                # pickle.dump (protocol 2 and up) opens with PROTO and ends with STOP ("."): a
                # dump that raised half-way was closed by its `with` and looked whole (local pass).
                f.seek(-1, os.SEEK_END)
                return True, None if f.read(1) == b"." else "a pickle without its end (cut short)"
            if not path.name.endswith(".safetensors"):
                return False, None
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                return True, "a safetensors file shorter than its header"
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
            if 8 + length + end != size:
                return True, f"a safetensors file of {size} bytes; its header says {8 + length + end}"
            return True, None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return True, "a safetensors file whose header cannot be read"
    except OSError:
        return False, None  # gone or unreadable: whoever reads it next says so


def dir_format_check(path: Path) -> tuple[bool, str | None]:
    """``format_check`` over the files in the directory ``path`` (and below).

    ``told`` only when every file's format tells; the reason is the first torn file's.
    """
    told = True
    for dirpath, _, files in os.walk(path):
        for name in sorted(files):
            file_told, reason = format_check(Path(dirpath) / name)
            if reason is not None:
                return True, f"{os.path.relpath(os.path.join(dirpath, name), path)}: {reason}"
            told = told and file_told
    return told, None


def is_temp_name(name: str) -> bool:
    """True for names runctl never treats as checkpoints: hidden, ``*.tmp``, ``*.partial``."""
    base = _base(name)
    return base.startswith(".") or base.endswith(_TEMP_SUFFIXES)


def is_recognised(name: str, patterns: Sequence[str] | None = None) -> bool:
    """True when a pattern matches the whole base name and it is not a hidden or temp name.

    Example:
        >>> is_recognised("step_100.pt"), is_recognised("checkpoint-500/"), is_recognised("train.log")
        (True, True, False)
    """
    base = _base(name)
    if not base or is_temp_name(base):
        return False
    return any(p.fullmatch(base) for p in compile_patterns(patterns))


def is_alias(name: str) -> bool:
    """True for ``last``-style aliases (``last.ckpt``, ``last-v1.ckpt``, ``latest``), always protected.

    Example:
        >>> is_alias("last-v1.ckpt"), is_alias("step_5.pt")
        (True, False)
    """
    return _ALIAS_RE.fullmatch(_base(name)) is not None


def newest_state(checkpoints: Sequence[Checkpoint]) -> Checkpoint | None:
    """The checkpoint to resume from: the highest step, unless an alias was written after it.

    Lightning's ``save_last`` keeps ``last.ckpt`` beside top-k files named by step: once the
    metric stops improving, the highest step among those is an old best, and ``last.ckpt``,
    written later, holds the newer state. A tie goes to the alias: S3 stamps objects to the
    whole second, and Lightning saves ``last.ckpt`` right after each top-k file, so a backlog
    after an outage lands both in one second.

    Example:
        >>> best = Checkpoint("epoch=0-step=8.ckpt", False, 8, 0, 100.0, 1, True, ())
        >>> last = Checkpoint("last.ckpt", False, None, None, 400.0, 1, True, ())
        >>> newest_state([best, last]).name
        'last.ckpt'
    """
    if not checkpoints:
        return None
    by_step = max(checkpoints, key=Checkpoint.order_key)
    later = [c for c in checkpoints if is_alias(c.name) and c.mtime >= by_step.mtime]
    return max(later, key=lambda c: c.mtime) if later else by_step


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: a single file or a directory, local or in S3.

    Locally ``files`` are paths relative to the scanned root; a directory's ``size`` is the sum of
    its files and its ``mtime`` the newest of its files' (the directory's own when empty). In S3
    ``files`` are full keys (marker excluded) and ``mtime`` is the marker's LastModified, else the
    newest object's.

    Example:
        >>> c = Checkpoint("step_5.pt", False, 5, None, 0.0, 10, True, ("step_5.pt",))
        >>> c.order_key()[:2]
        (5, -1)
    """

    name: str
    is_dir: bool
    step: int | None
    epoch: int | None
    mtime: float
    size: int
    complete: bool
    files: tuple[str, ...] = ()
    marker: str | None = None
    storage_class: str | None = None

    def order_key(self) -> tuple[int, int, float, str]:
        """Newest sorts last: by step, then epoch, then mtime (a missing number sorts first)."""
        return (
            -1 if self.step is None else self.step,
            -1 if self.epoch is None else self.epoch,
            self.mtime,
            self.name,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "is_dir": self.is_dir,
            "step": self.step,
            "epoch": self.epoch,
            "mtime": self.mtime,
            "size": self.size,
            "complete": self.complete,
            "files": list(self.files),
            "marker": self.marker,
            "storage_class": self.storage_class,
        }


@dataclass(frozen=True)
class S3Checkpoints:
    """A prefix's listing split into checkpoints (oldest first), pinned names and everything else."""

    checkpoints: tuple[Checkpoint, ...]
    others: tuple[ObjectInfo, ...] = ()
    #: Names pinned with an object ``<prefix>.runctl/pinned/<name>`` (``pin_url``).
    pinned: frozenset[str] = frozenset()


#: Where a pinned checkpoint's pin lives, under its prefix or directory: an empty object, or a
#: file named like the checkpoint (``runctl.pins``). Retention keeps what it names, in any run
#: and on any node (``runctl s3 cleanup`` and ``runctl checkpoint cleanup`` too).
PIN_DIR = f"{RUNCTL_DIR}/pinned"
#: An unpin not yet carried out in S3 (``CheckpointUploader.unprotect``): a file per name.
UNPIN_DIR = f"{RUNCTL_DIR}/unpinned"


def pin_url(prefix: S3URL, name: str) -> S3URL:
    """The S3 object that pins checkpoint ``name`` under ``prefix``.

    Example:
        >>> pin_url(S3URL("bkt", "run/"), "step_0.pt")
        S3URL(bucket='bkt', key='run/.runctl/pinned/step_0.pt')
    """
    return prefix.as_prefix().join(f"{PIN_DIR}/{name}")


def _dir_files(path: Path, root: Path) -> tuple[tuple[str, ...], int, float]:
    files: list[str] = []
    size = 0
    mtime = path.stat().st_mtime
    newest: float | None = None
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            try:
                st = full.stat()
            except OSError:  # vanished or a dangling link: not part of what is there now
                continue
            files.append(full.relative_to(root).as_posix())
            size += st.st_size
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return tuple(files), size, (mtime if newest is None else newest)


def local_checkpoint(path: Path, root: Path | None = None) -> Checkpoint:
    """Describe one local file or directory as a ``Checkpoint`` (complete unless ``awaits_hf_sign``,
    or a DeepSpeed ``global_stepN`` newer than the step its ``latest`` names).

    Use this wherever a local checkpoint's size and mtime are recorded, so that they compare
    equal to what ``scan_local`` sees later.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "step_3.pt").write_bytes(b"abc")
        >>> local_checkpoint(d / "step_3.pt").size
        3
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    step, epoch = parse_step(path.name)
    if path.is_dir():
        files, size, mtime = _dir_files(path, root)
        complete = not dir_awaits_hf_sign(path) and not dir_awaits_deepspeed_sign(path)
        return Checkpoint(path.name, True, step, epoch, mtime, size, complete, files)
    st = path.stat()
    rel = path.relative_to(root).as_posix()
    return Checkpoint(path.name, False, step, epoch, st.st_mtime, st.st_size, True, (rel,))


def scan_local(root: Path, patterns: Sequence[str] | None = None) -> list[Checkpoint]:
    """Recognised checkpoints among the direct children of ``root``, oldest first.

    Skips ``.runctl/``, hidden and temp names (``*.tmp``, ``*.partial``) and anything the
    patterns do not match.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "step_2.pt").write_bytes(b"x")
        >>> _ = (d / "train.log").write_text("x")
        >>> [c.name for c in scan_local(d)]
        ['step_2.pt']
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"checkpoint directory {str(root)!r} does not exist or is not a directory")
    compile_patterns(patterns)  # a bad pattern fails before any work
    found: list[Checkpoint] = []
    for entry in sorted(root.iterdir()):
        if entry.name == RUNCTL_DIR or not is_recognised(entry.name, patterns):
            continue
        try:
            found.append(local_checkpoint(entry, root))
        except FileNotFoundError:  # deleted while we looked (Lightning's top-k removal)
            continue
    return sorted(found, key=Checkpoint.order_key)


def _common_storage_class(objects: Sequence[ObjectInfo]) -> str | None:
    classes = {o.storage_class for o in objects if o.storage_class}
    if not classes:
        return None
    return classes.pop() if len(classes) == 1 else "MIXED"


def group_s3(
    objects: Iterable[ObjectInfo | PrefixInfo],
    prefix: S3URL,
    patterns: Sequence[str] | None = None,
    *,
    treat_unmarked_complete: bool = False,
    read_marker: Callable[[str], bytes] | None = None,
    read_markers: Callable[[Iterable[str]], Mapping[str, bytes | TransferError]] | None = None,
) -> S3Checkpoints:
    """Group a recursive listing of ``prefix`` into checkpoints and others.

    Only direct children of the prefix count: an object ``prefix/step_1.pt`` or a directory
    ``prefix/checkpoint-500/...``. Objects outside the prefix (``ckpt-old/`` for ``ckpt/``),
    unrecognised names and anything under an unrecognised directory go to ``others``.

    A directory checkpoint is complete only when its marker exists (and, when ``read_marker``
    is given, parses and matches the listed files); ``treat_unmarked_complete`` makes marker-less
    directories complete. ``read_marker(key)`` returns the marker's bytes, read as the listing
    shows each marker; ``read_markers(keys)`` instead reads every marker in one batch,
    mapping each key to its bytes or the error that kept it unread: it runs on a thread from
    the first marker on, and ``keys`` yields each marker as the listing shows it.

    Example:
        >>> from datetime import datetime, timezone
        >>> t = datetime(2024, 1, 1, tzinfo=timezone.utc)
        >>> objs = [ObjectInfo("bkt", "ckpt/step_1.pt", 5, t), ObjectInfo("bkt", "ckpt/train.log", 1, t)]
        >>> g = group_s3(objs, S3URL("bkt", "ckpt/"))
        >>> [c.name for c in g.checkpoints], [o.key for o in g.others]
        (['step_1.pt'], ['ckpt/train.log'])
    """
    compile_patterns(patterns)
    base = prefix.as_prefix().key
    singles: list[Checkpoint] = []
    dirs: dict[str, list[ObjectInfo]] = {}
    others: list[ObjectInfo] = []
    pinned: set[str] = set()
    pins = base + PIN_DIR + "/"
    known: dict[str, bool] = {}
    # Markers are read as the listing shows them, while the rest of it arrives: one at a time
    # on threads, or with read_markers in one batch that takes each as it comes.
    reads = _MarkerReads(read_marker) if read_marker is not None else None
    batch = _MarkerBatch(read_markers) if read_markers is not None and reads is None else None
    seen: set[str] = set()
    repeated = 0
    try:
        for obj in objects:
            if not isinstance(obj, ObjectInfo):
                continue
            if obj.key in seen:
                # A server that served a page twice (one restarting on a bad token): counted
                # twice, every size doubled, and --max-total-size deleted twice what it should
                # (retention pass).
                repeated += 1
                continue
            seen.add(obj.key)
            if obj.bucket != prefix.bucket or not obj.key.startswith(base) or obj.key == base:
                others.append(obj)
                continue
            if obj.key.startswith(pins) and obj.key != pins and "/" not in obj.key[len(pins) :]:
                pinned.add(obj.key[len(pins) :])
                continue
            rel = obj.key[len(base) :]
            top, sep, rest = rel.partition("/")
            recognised = known.get(top)
            if recognised is None:  # a directory checkpoint's name repeats once per file
                recognised = known[top] = is_recognised(top, patterns)
            if not recognised:
                others.append(obj)
            elif sep:
                dirs.setdefault(top, []).append(obj)
                if rest == MARKER_NAME and obj.size > 0:
                    if reads is not None:
                        reads.start(obj.key)
                    elif batch is not None:
                        batch.add(obj.key)
            else:
                step, epoch = parse_step(top)
                singles.append(
                    Checkpoint(
                        name=top,
                        is_dir=False,
                        step=step,
                        epoch=epoch,
                        mtime=obj.last_modified.timestamp(),
                        size=obj.size,
                        complete=True,
                        files=(obj.key,),
                        storage_class=obj.storage_class,
                    )
                )
        reader: Callable[[str], bytes] | None = reads
        if batch is not None:
            reader = batch_reader(batch.results())
        checkpoints = singles + [
            _group_dir(name, members, base, treat_unmarked_complete, reader)
            for name, members in dirs.items()
        ]
    finally:
        if reads is not None:
            reads.close()
        if batch is not None:
            batch.end()
    if repeated:
        log.warning("the listing of %s showed %d key(s) more than once: each counted once", prefix, repeated)
    checkpoints.sort(key=Checkpoint.order_key)
    return S3Checkpoints(tuple(checkpoints), tuple(others), frozenset(pinned))


def batch_reader(found: Mapping[str, bytes | TransferError]) -> Callable[[str], bytes]:
    """``read_marker`` over the result of one batch read (a key it lacks was not read)."""

    def read(key: str) -> bytes:
        got = found.get(key)
        if isinstance(got, bytes):
            return got
        raise got if got is not None else TransferError(f"marker {key} was not read")

    return read


class _MarkerBatch:
    """``read_markers`` run on a thread from the first key on, fed each key as it comes.

    A 100-checkpoint cleanup read its 100 markers after the listing, in 0.1 s on top of it;
    fed as the listing shows them, one s5cmd process reads them while the listing goes on.

    Example:
        >>> batch = _MarkerBatch(lambda keys: {k: b"{}" for k in keys}); batch.add("c-1/m")
        >>> batch.results()
        {'c-1/m': b'{}'}
    """

    _END = object()

    def __init__(
        self, read_markers: Callable[[Iterable[str]], Mapping[str, bytes | TransferError]]
    ) -> None:
        self._read = read_markers
        self._keys: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._found: Mapping[str, bytes | TransferError] = {}
        self._error: BaseException | None = None
        self._ended = False

    def add(self, key: str) -> None:
        """Hand ``key`` to the batch, starting it with the first."""
        self._keys.put(key)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="runctl-markers", daemon=True)
            self._thread.start()

    def _incoming(self) -> Iterator[str]:
        while (key := self._keys.get()) is not self._END:
            yield str(key)

    def _run(self) -> None:
        try:
            self._found = self._read(self._incoming())
        except BaseException as exc:  # noqa: BLE001 - raised by results() on the caller's thread
            self._error = exc

    def end(self) -> None:
        """No more keys: the batch finishes those it has (a listing that failed waits for none)."""
        if not self._ended:
            self._ended = True
            self._keys.put(self._END)

    def results(self) -> Mapping[str, bytes | TransferError]:
        """Each key's bytes or the error that kept it unread, once every key is read.

        Raises:
            TransferError: the batch failed as a whole.
        """
        self.end()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._found


#: Markers read at once: one small GET each, so a listing of a hundred directory checkpoints
#: costs a few round trips rather than a hundred.
MARKER_READERS = 16


class _MarkerReads:
    """``read_marker`` with reads started early, ``MARKER_READERS`` at a time (errors re-raised on use).

    Example:
        >>> reads = _MarkerReads(lambda key: b"{}"); reads.start("run/c-1/.runctl-manifest.json")
        >>> reads("run/c-1/.runctl-manifest.json"), reads.close()
        (b'{}', None)
    """

    def __init__(self, read_marker: Callable[[str], bytes]) -> None:
        self._read = read_marker
        self._pool: Any = None
        self._started: dict[str, Future[bytes]] = {}

    def start(self, key: str) -> None:
        """Begin reading ``key`` on a thread (once)."""
        if key in self._started:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(MARKER_READERS, thread_name_prefix="runctl-marker")
        self._started[key] = self._pool.submit(self._read, key)

    def __call__(self, key: str) -> bytes:
        future = self._started.get(key)
        return self._read(key) if future is None else future.result()

    def close(self) -> None:
        """Drop reads not begun; wait for those under way."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _group_dir(
    name: str,
    members: list[ObjectInfo],
    base: str,
    treat_unmarked_complete: bool,
    read_marker: Callable[[str], bytes] | None,
) -> Checkpoint:
    dir_key = f"{base}{name}/"
    marker_key = dir_key + MARKER_NAME
    marker = next((o for o in members if o.key == marker_key), None)
    files = sorted((o for o in members if o.key != marker_key), key=lambda o: o.key)
    if marker is not None:
        complete = marker_ok(marker, files, dir_key, read_marker)
        mtime = marker.last_modified.timestamp()
    else:
        top = {o.key[len(dir_key) :] for o in files if "/" not in o.key[len(dir_key) :]}
        complete = treat_unmarked_complete and not awaits_hf_sign(name, top)
        mtime = max((o.last_modified.timestamp() for o in files), default=0.0)
    step, epoch = parse_step(name)
    return Checkpoint(
        name=name,
        is_dir=True,
        step=step,
        epoch=epoch,
        mtime=mtime,
        size=sum(o.size for o in files),
        complete=complete,
        files=tuple(o.key for o in files),
        marker=marker.key if marker is not None else None,
        storage_class=_common_storage_class(files),
    )


def marker_ok(
    marker: ObjectInfo,
    files: Sequence[ObjectInfo],
    dir_key: str,
    read_marker: Callable[[str], bytes] | None,
) -> bool:
    """Whether a directory checkpoint's marker makes it complete; why not is logged as a warning.

    A non-empty marker counts when ``read_marker`` is None; otherwise it must be readable, parse,
    and match ``files`` (the objects listed under ``dir_key``) in size and, where both have one,
    ETag.

    Example:
        >>> from datetime import datetime, timezone
        >>> t = datetime(2024, 1, 1, tzinfo=timezone.utc)
        >>> m = ObjectInfo("b", "run/c-1/" + MARKER_NAME, 90, t)
        >>> body = Manifest("c-1", 1, {"w.bin": FileEntry(3)}, "0.1", 0.0).to_bytes()
        >>> marker_ok(m, [ObjectInfo("b", "run/c-1/w.bin", 3, t)], "run/c-1/", lambda key: body)
        True
    """
    if marker.size == 0:
        log.warning("marker %s is empty: treating the checkpoint as incomplete", marker.key)
        return False
    if read_marker is None:
        return True
    try:
        manifest = Manifest.from_bytes(read_marker(marker.key))
    except NoSuchKeyError:  # deleted since the listing: retention or a cleanup at work, no news
        log.info("marker %s was deleted after it was listed: the checkpoint is going", marker.key)
        return False
    except TransferError as exc:  # unreadable now: not proof of a whole checkpoint
        log.warning("cannot read marker %s (%s): treating the checkpoint as incomplete", marker.key, exc)
        return False
    except MarkerError as exc:
        log.warning("marker %s is invalid (%s): treating the checkpoint as incomplete", marker.key, exc)
        return False
    found = {o.key[len(dir_key) :]: o for o in files}
    problems = verify_against_manifest(manifest, found)
    if problems:
        log.warning(
            "checkpoint %s does not match its marker (%s): treating it as incomplete",
            dir_key,
            "; ".join(problems[:5]),
        )
        return False
    extra = unlisted_files(manifest.files, found)
    if extra:
        # A version saved again under the same name with fewer files (save_only_model, one GPU
        # fewer) left the older one's optimizer.pt beside it (Hugging Face pass).
        log.warning(
            "checkpoint %s holds %d file(s) its marker does not list (%s): left from an older "
            "version? They are not part of it, and a restore leaves them out",
            dir_key,
            len(extra),
            ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else ""),
        )
    return True


def unlisted_files(listed: Collection[str], found: Iterable[str]) -> list[str]:
    """Paths under a directory checkpoint (relative to it) that are not among ``listed`` (its
    marker's files, or the version being uploaded), the marker itself aside.

    Example:
        >>> unlisted_files({"a.bin": FileEntry(3)}, ["a.bin", "optimizer.pt", MARKER_NAME])
        ['optimizer.pt']
    """
    return sorted(rel for rel in found if rel not in listed and rel != MARKER_NAME)


@dataclass(frozen=True)
class FileEntry:
    """One file of a directory checkpoint as its marker records it."""

    size: int
    etag: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The marker of a directory checkpoint: every file with its size (and ETag), the step, the version.

    Example:
        >>> m = Manifest("checkpoint-5", 5, {"model.bin": FileEntry(3)}, "0.1", 0.0)
        >>> Manifest.from_bytes(m.to_bytes()) == m
        True
    """

    name: str
    step: int | None
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    runctl_version: str = __version__
    created: float = 0.0

    def to_bytes(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "name": self.name,
            "step": self.step,
            "runctl_version": self.runctl_version,
            "created": self.created,
            "files": {
                rel: {"size": entry.size, "etag": entry.etag} for rel, entry in sorted(self.files.items())
            },
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a marker; ``MarkerError`` says what is wrong with it."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MarkerError(f"marker is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise MarkerError(f"marker is not a runctl manifest (format {_field(doc, 'format')!r})")
        name, step, files = doc.get("name"), doc.get("step"), doc.get("files")
        version, created = doc.get("runctl_version"), doc.get("created")
        if not isinstance(name, str) or not name:
            raise MarkerError(f"marker has no valid name (got {name!r})")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise MarkerError(f"marker step must be an integer or null (got {step!r})")
        if not isinstance(version, str):
            raise MarkerError(f"marker runctl_version must be a string (got {version!r})")
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise MarkerError(f"marker created must be a number (got {created!r})")
        if not isinstance(files, dict):
            raise MarkerError(f"marker files must be an object (got {type(files).__name__})")
        entries: dict[str, FileEntry] = {}
        for rel, entry in files.items():
            size = entry.get("size") if isinstance(entry, dict) else None
            etag = entry.get("etag") if isinstance(entry, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise MarkerError(f"marker entry {rel!r} has no valid size (got {entry!r})")
            if etag is not None and not isinstance(etag, str):
                raise MarkerError(f"marker entry {rel!r} has an invalid etag {etag!r}")
            entries[rel] = FileEntry(size, etag)
        return cls(name, step, entries, version, float(created))


def _field(doc: object, key: str) -> object:
    return doc.get(key) if isinstance(doc, dict) else type(doc).__name__


def build_manifest(
    local_dir: Path, name: str, step: int | None, etags: Mapping[str, str] | None = None
) -> Manifest:
    """The manifest of a local directory: every regular file (the marker itself excluded).

    ``etags`` maps paths relative to ``local_dir`` (posix) to the ETag S3 reported.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"abcd")
        >>> build_manifest(d, "checkpoint-1", 1).files["w.bin"].size
        4
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise UsageError(f"cannot build a manifest: {str(local_dir)!r} is not a directory")
    etags = etags or {}
    files: dict[str, FileEntry] = {}
    for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=False):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath) / fname
            rel = full.relative_to(local_dir).as_posix()
            if rel == MARKER_NAME or not full.is_file():
                continue
            files[rel] = FileEntry(full.stat().st_size, _clean_etag(etags.get(rel)))
    return Manifest(name, step, files, __version__, time.time())


def _clean_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def verify_against_manifest(manifest: Manifest, objects: Mapping[str, ObjectInfo]) -> list[str]:
    """Problems between a manifest and the objects found (keyed by path relative to the directory).

    Sizes always; ETags when both sides have one. ``[]`` means everything matches; extra objects
    that the manifest does not list are not a problem.

    Example:
        >>> from datetime import datetime, timezone
        >>> m = Manifest("c", 1, {"a.bin": FileEntry(3)}, "0.1", 0.0)
        >>> verify_against_manifest(m, {})
        ['a.bin: missing']
    """
    problems: list[str] = []
    for rel, entry in sorted(manifest.files.items()):
        obj = objects.get(rel)
        if obj is None:
            problems.append(f"{rel}: missing")
        elif obj.size != entry.size:
            problems.append(f"{rel}: size {obj.size} but the manifest says {entry.size}")
        elif entry.etag and obj.etag and _clean_etag(obj.etag) != _clean_etag(entry.etag):
            problems.append(f"{rel}: ETag {_clean_etag(obj.etag)} but the manifest says {entry.etag}")
    return problems
