"""Pins on disk: which checkpoints of a directory retention must keep, in any run, and for whom.

A pin is a file ``<root>/.runctl/pinned/<name>`` holding who it is for (an uploader's S3
prefix, or nothing for the directory alone) and, once its object
``<prefix>.runctl/pinned/<name>`` is in S3, a second line ``sent``. An unpin not yet carried
out in S3 is a file ``<root>/.runctl/unpinned/<name>``. The files are the truth: every process
on the directory reads them afresh, under one lock, so no process's memory brings back what
another unpinned.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from runctl.checkpoints import PIN_DIR, UNPIN_DIR
from runctl.locking import brief_lock

_SENT = "sent"
_LOCK_NAME = "pins.lock"
#: A holder takes the lock for a few file operations: one held longer is stopped (Ctrl-Z).
_LOCK_WAIT = 2.0


def pin_locally(root: Path, name: str, owner: str = "", *, sent: bool = False, kind: str = PIN_DIR) -> None:
    """Write the pin (``kind=UNPIN_DIR``: the unpin) of ``name`` for ``owner``, atomically.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); pin_locally(root, "step_0.pt"); local_pins(root)
        {'step_0.pt'}
    """
    directory = Path(root) / kind
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}-{threading.get_ident()}"  # short: any name fits
    tmp.write_text(f"{owner}\n{_SENT}\n" if sent else f"{owner}\n", encoding="utf-8")
    os.replace(tmp, directory / name)


def read_pins(root: Path, kind: str = PIN_DIR) -> dict[str, tuple[str | None, bool]]:
    """Each pin (or unpin) of a directory: name -> (who it is for, whether it was sent).

    Who is None when the file cannot be read (it still protects, but no uploader takes it up);
    a file gone since the listing is left out.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); pin_locally(root, "step_0.pt", "s3://b/run/", sent=True)
        >>> read_pins(root)
        {'step_0.pt': ('s3://b/run/', True)}
    """
    found: dict[str, tuple[str | None, bool]] = {}
    try:
        names = os.listdir(Path(root) / kind)
    except OSError:
        return found
    for name in names:
        if name.startswith("."):  # one being written
            continue
        try:
            lines = (Path(root) / kind / name).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            found[name] = (None, False)
            continue
        found[name] = (lines[0].strip() if lines else "", _SENT in lines[1:])
    return found


def local_pins(root: Path) -> set[str]:
    """The names pinned in a local checkpoint directory, for whomever (what local retention keeps)."""
    return set(read_pins(root))


@contextlib.contextmanager
def pins_lock(root: Path) -> Iterator[None]:
    """Hold the pins of a directory still while reading and changing them (threads and processes)."""
    lock_dir = Path(root) / ".runctl"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with brief_lock(lock_dir / _LOCK_NAME, _LOCK_WAIT, f"the pins of {root}"):
        yield


class LocalPins:
    """The pins of one directory as one uploader (``owner``: its S3 prefix) sees them.

    Example:
        >>> import tempfile
        >>> pins = LocalPins(Path(tempfile.mkdtemp()), "s3://b/run/")
        >>> pins.pin("step_0.pt"); sorted(pins.names()), pins.unsent()
        (['step_0.pt'], ['step_0.pt'])
    """

    def __init__(self, root: Path, owner: str) -> None:
        self.root = Path(root)
        self.owner = owner

    def _mine(self, owner: str | None) -> bool:
        return owner in ("", self.owner)

    def _read_one(self, name: str, kind: str = PIN_DIR) -> tuple[str | None, bool] | None:
        """One pin (or unpin) file as ``read_pins`` reads it; None when there is none."""
        try:
            lines = (self.root / kind / name).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return (None, False)
        return (lines[0].strip() if lines else "", _SENT in lines[1:])

    def names(self) -> set[str]:
        """The names pinned for this owner, for the directory alone, or in a file that cannot
        be read (kept, to be safe)."""
        return {name for name, (owner, _) in read_pins(self.root).items() if owner is None or self._mine(owner)}

    def unsent(self) -> list[str]:
        """Pins for this owner whose object is not (known to be) in S3 yet."""
        return sorted(n for n, (owner, sent) in read_pins(self.root).items() if self._mine(owner) and not (sent and owner))

    def unpins(self) -> list[str]:
        """Unpins for this owner not yet carried out in S3."""
        return sorted(n for n, (owner, _) in read_pins(self.root, UNPIN_DIR).items() if owner == self.owner)

    def pin(self, name: str) -> None:
        with pins_lock(self.root):
            pin_locally(self.root, name, self.owner)
            with contextlib.suppress(FileNotFoundError):
                (self.root / UNPIN_DIR / name).unlink()

    def unpin(self, name: str) -> None:
        with pins_lock(self.root):
            pin_locally(self.root, name, self.owner, kind=UNPIN_DIR)
            with contextlib.suppress(FileNotFoundError):
                (self.root / PIN_DIR / name).unlink()

    def mark_sent(self, name: str) -> bool:
        """Record that ``name``'s object is in S3; False when it was unpinned meanwhile, and
        then its unpin is due again (the object just put must go, by the usual path)."""
        with pins_lock(self.root):
            found = self._read_one(name)
            if found is not None and found[0] is not None and self._mine(found[0]):
                pin_locally(self.root, name, self.owner, sent=True)
                return True
            if found is None:
                pin_locally(self.root, name, self.owner, kind=UNPIN_DIR)
            return False

    def unpin_done(self, name: str) -> None:
        """Its object is gone from S3: the unpin is carried out (unless pinned again meanwhile)."""
        with pins_lock(self.root):
            found = self._read_one(name, UNPIN_DIR)
            if found is not None and found[0] == self.owner:
                with contextlib.suppress(FileNotFoundError):
                    (self.root / UNPIN_DIR / name).unlink()

    def forget_gone(
        self,
        in_s3: frozenset[str] | set[str],
        listed_at: float,
        still_there: Callable[[list[str]], Iterable[str]] | None = None,
    ) -> list[str]:
        """Sent pins for this owner that a listing begun at ``listed_at`` (``time.time()``) did
        not show were unpinned elsewhere: remove them. One marked sent since may have been put
        after the listing passed it (another process's), so it stays; so does one that
        ``still_there(names)`` finds in S3 after all (s5cmd's listing leaves out an object dated
        after it began: ``Transfer.unlisted``)."""
        if still_there is not None:
            unseen = [
                name
                for name, (owner, sent) in read_pins(self.root).items()
                if sent and owner == self.owner and name not in in_s3
            ]
            if unseen:
                in_s3 = set(in_s3) | set(still_there(unseen))
        gone = []
        with pins_lock(self.root):
            for name, (owner, sent) in read_pins(self.root).items():
                if not (sent and owner == self.owner and name not in in_s3):
                    continue
                path = self.root / PIN_DIR / name
                try:
                    if path.stat().st_mtime >= listed_at - 1.0:  # (a coarse clock's second)
                        continue
                    path.unlink()
                except FileNotFoundError:
                    continue
                gone.append(name)
        return gone
