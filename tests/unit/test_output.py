"""The CLI's tables: plain whole rows when piped, rich on a terminal, cells never read as markup."""

from __future__ import annotations

import io

import pytest

from runctl.cli.output import Output


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, rows: list[tuple[str, str]]) -> str:
    monkeypatch.setattr("sys.stdout", stream)
    monkeypatch.setenv("NO_COLOR", "1")
    Output().table(("key", "size"), rows, title="Checkpoints", right=("size",))
    return stream.getvalue()


def test_piped_table_is_aligned_whole_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    long_key = "run/" + "x" * 300 + ".pt"
    text = render(monkeypatch, io.StringIO(), [("a.pt", "1.0 KiB"), (long_key, "12 B")])
    width = len(long_key)
    assert text.splitlines() == [
        "Checkpoints",
        "key".ljust(width) + "     size",
        "a.pt".ljust(width) + "  1.0 KiB",
        long_key + "     12 B",
    ]


def test_cells_are_text_not_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [("ckpt[bold]x[/bold].pt", "1 B"), ("[red]step_2.pt", "2 B")]
    for stream in (io.StringIO(), Terminal()):
        text = render(monkeypatch, stream, rows)
        assert "ckpt[bold]x[/bold].pt" in text
        assert "[red]step_2.pt" in text


def test_json_mode_prints_no_table(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stdout", stream)
    Output(json=True).table(("key",), [("a.pt",)])
    assert stream.getvalue() == ""
