"""Every in-process CLI test here runs the command tree `runctl` itself runs (see cli_support)."""

import tests.cli.cli_support  # noqa: F401  (routes typer's CliRunner to cli_command())
