"""Pin files: who each is for, and what a process reads while another changes them."""

from __future__ import annotations

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
    assert pins.names() == {"a.pt", "c.pt"} and pins.unsent() == ["a.pt", "c.pt"]
    assert local_pins(tmp_path) == {"a.pt", "b.pt", "c.pt", "d.pt"}
    assert read_pins(tmp_path)["d.pt"] == (None, False)
    assert pins.mark_sent("a.pt") and pins.unsent() == ["c.pt"]
    # A name unpinned meanwhile (by another process) is not marked sent, nor brought back.
    LocalPins(tmp_path, "s3://b/run/").unpin("c.pt")
    assert not pins.mark_sent("c.pt") and "c.pt" not in local_pins(tmp_path)
    assert pins.unpins() == ["c.pt"]
    # A sent pin S3 no longer lists was unpinned elsewhere; an unsent one is not.
    assert pins.forget_gone(frozenset()) == ["a.pt"] and pins.names() == set()


def test_a_long_name_can_be_pinned(tmp_path: Path) -> None:
    name = "x" * 250 + ".pt"  # the temporary file's name must fit too
    pin_locally(tmp_path, name, "s3://b/run/")
    assert local_pins(tmp_path) == {name}
