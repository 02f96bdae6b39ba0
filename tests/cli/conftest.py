"""Every in-process CLI test here runs the command tree `runctl` itself runs (see cli_support)."""

import signal
from collections.abc import Iterator

import pytest

import tests.cli.cli_support  # noqa: F401  (routes typer's CliRunner to cli_command())


@pytest.fixture(autouse=True)
def _sigint_reaches_children() -> Iterator[None]:
    """Children get SIGINT's default action even when this run itself ignores SIGINT.

    A shell starts a background job (`pytest ... &`, `nohup pytest`) with SIGINT ignored, and
    an ignored signal stays ignored across exec: a runctl started by such a run never sees the
    SIGINT a test sends it (Python installs its KeyboardInterrupt handler only where SIGINT is
    not ignored), and the Ctrl-C tests waited for an exit that could not come.
    """
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
