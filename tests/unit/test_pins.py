"""Pin files: who each is for, and what a process reads while another changes them."""

from __future__ import annotations

import time
from pathlib import Path

from runctl.checkpoints import PIN_DIR
from runctl.pins import LocalPins, local_pins, pin_locally, read_pins


def test_pins_are_read_for_their_owner_and_half_written_ones_are_skipped(tmp_path: Path) -> None:
    pin_locally(tmp_path, "a.pt", "s3://b/run/")
    pin_locally(tmp_path, "b.pt", "s3://b/other/", sent=True)
    pin_locally(tmp_path, "c.pt")  # the directory alone (a CheckpointManager without S3)
    (tmp_path / PIN_DIR / ".tmp-1-2").write_text("s3://b/run/\n")  # one being written
    (tmp_path / PIN_DIR / "d.pt").write_bytes(b"\xff\xfe")  # unreadable: protects, never sent
    pins = LocalPins(tmp_path, "s3://b/run/")
    assert pins.names() == {"a.pt", "c.pt", "d.pt"} and pins.unsent() == ["a.pt", "c.pt"]
    assert local_pins(tmp_path) == {"a.pt", "b.pt", "c.pt", "d.pt"}
    assert read_pins(tmp_path)["d.pt"] == (None, False)
    assert pins.mark_sent("a.pt") and pins.unsent() == ["c.pt"]
    # A name unpinned meanwhile (by another process) is not marked sent, nor brought back, and
    # its unpin is due again (the object just put must go).
    LocalPins(tmp_path, "s3://b/run/").unpin("c.pt")
    (tmp_path / ".runctl" / "unpinned" / "c.pt").unlink()  # (its unpin already carried out)
    assert not pins.mark_sent("c.pt") and "c.pt" not in local_pins(tmp_path)
    assert pins.unpins() == ["c.pt"]
    # A sent pin a listing begun after it was marked did not show was unpinned elsewhere; one
    # marked since the listing began may have been put after the listing passed it.
    assert pins.forget_gone(frozenset(), listed_at=time.time() - 60) == []
    assert pins.forget_gone(frozenset(), listed_at=time.time() + 5) == ["a.pt"]
    assert pins.names() == {"d.pt"}  # an unreadable one is kept, to be safe


def test_a_long_name_can_be_pinned(tmp_path: Path) -> None:
    name = "x" * 250 + ".pt"  # the temporary file's name must fit too
    pin_locally(tmp_path, name, "s3://b/run/")
    assert local_pins(tmp_path) == {name}
