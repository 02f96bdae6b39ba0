"""Start-up stays light: `runctl s3 list --help` must not drag in heavy modules (benchmark row 6)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from runctl.cli.app import main
sys.argv = ["runctl", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = ("pydantic", "boto3", "botocore", "torch", "lightning", "transformers")
sys.stderr.write(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def loaded(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


def test_help_imports_no_heavy_module() -> None:
    assert loaded("--help") == []
    assert loaded("s3", "list", "--help") == []
    assert loaded("s3", "cleanup", "--help") == []


def test_only_the_program_skips_the_final_collection() -> None:
    # As the program (no argv), main() freezes the collector just before exiting; called
    # with arguments (tests, embedding code), it must leave the caller's collector alone.
    import gc

    from runctl.cli.app import main

    before = gc.get_freeze_count()
    try:
        main(["--version"])
    except SystemExit:
        pass
    assert gc.get_freeze_count() == before
    probe = (
        "import atexit, gc, sys\n"
        "from runctl.cli.app import main\n"
        "atexit.register(lambda: sys.stderr.write(str(gc.get_freeze_count() > 0)))\n"
        "sys.argv = ['runctl', '--version']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stderr.strip().endswith("True")
