"""``python -m benchmarks [--quick] [--out DIR]``: run the suite, print the table, write latest.md/json."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from benchmarks.harness import render_markdown, write_results
from benchmarks.suite import FULL, QUICK, TINY, run_suite
from benchmarks.tools import Tools, clean_env, ensure_aws, find_runctl, find_s5cmd

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, 1-2 repetitions: under two minutes"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smallest data, one repetition (the suite's self-test)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where latest.md and latest.json go (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--no-install-aws",
        action="store_true",
        help="do not pip-install awscli when `aws` is missing",
    )
    parser.add_argument(
        "--server-dir",
        type=Path,
        default=None,
        help="where the S3 server keeps its data (default: /dev/shm when it has 8 GiB free, "
        "else the temp dir): it stands in for a remote S3, whose disk is not the client's",
    )
    args = parser.parse_args(argv)
    # A terminated run still stops its rclone server and removes its data (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = TINY if args.tiny else QUICK if args.quick else FULL

    aws = None if args.no_install_aws else ensure_aws()
    if aws is None:
        _log("aws-cli not found: its columns will say so")

    def tools_factory(scratch: Path, endpoint: str) -> Tools:
        return Tools(tuple(find_runctl()), find_s5cmd(), aws, endpoint, clean_env(scratch))

    rows, meta = run_suite(sizes, tools_factory, _log, server_dir=args.server_dir)
    meta["command"] = "python -m benchmarks" + (
        " --tiny" if args.tiny else " --quick" if args.quick else ""
    )
    table = render_markdown(rows)
    md_path, json_path = write_results(args.out, rows, meta, table)
    print(table)
    _log(f"wrote {md_path} and {json_path} in {meta['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
