"""scripts/setup.sh's OpenBLAS step, run for real on a copy whose library paths do not exist:
a second run only checks, apt-get runs at most once, a non-root user gets the hint once."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlxkv.device import _BLAS_CANDIDATES as LIBS  # the paths `import mlxkv` preloads from

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("bash") is None,
                                reason="the OpenBLAS step runs on Linux only")


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repo's setup.sh and pyproject.toml with mlxkv 'installed' (the stamp) and the
    models present (.venv/bin/python runs this interpreter), and no OpenBLAS at the paths it checks."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    script = (REPO / "scripts" / "setup.sh").read_text()
    for lib in LIBS:
        assert lib in script, f"setup.sh no longer checks {lib} (mlxkv/device.py's candidates)"
        script = script.replace(lib, str(tmp_path / "missing" / Path(lib).name))
    _executable(root / "scripts" / "setup.sh", script)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / ".venv" / "bin").mkdir(parents=True)
    _executable(root / ".venv" / "bin" / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    cksum = subprocess.run(["cksum", "pyproject.toml"], cwd=root, capture_output=True, text=True, check=True)
    (root / ".venv" / f".mlxkv-installed-{cksum.stdout.split()[0]}").touch()
    return root


def _run(root: Path, bin_dir: Path) -> str:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _bin(tmp_path: Path, uid: int) -> Path:
    """A PATH entry whose `id -u` says ``uid`` and whose apt-get logs its arguments and fails (offline)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "id", f'#!/bin/sh\necho {uid}\n')
    return bin_dir


def test_root_tries_apt_get_once_then_only_checks(checkout: Path, tmp_path: Path):
    bin_dir = _bin(tmp_path, 0)
    log = tmp_path / "apt.log"
    _executable(bin_dir / "apt-get", f'#!/bin/sh\necho "$@" >> "{log}"\nexit 100\n')  # no network
    first = _run(checkout, bin_dir)
    assert "installing OpenBLAS" in first and "could not install" in first
    second = _run(checkout, bin_dir)
    assert second == ""
    assert log.read_text().splitlines() == ["update -qq"]


def test_non_root_gets_the_hint_once(checkout: Path, tmp_path: Path):
    bin_dir = _bin(tmp_path, 1000)
    log = tmp_path / "apt.log"
    _executable(bin_dir / "apt-get", f'#!/bin/sh\necho "$@" >> "{log}"\nexit 100\n')
    first = _run(checkout, bin_dir)
    assert first.count("install libopenblas0-pthread") == 1
    assert _run(checkout, bin_dir) == ""
    assert not log.exists()
