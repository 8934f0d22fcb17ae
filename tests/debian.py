"""System tools a test tier needs from Debian packages (chromium for the browser tier, nginx for the slow-client
proxy test): installed with apt-get when missing and the tests run as root (CI on a clean machine), else the test
is skipped with the command that installs it."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ensure_package(binary: Path, package: str) -> Path:
    """`binary` (an absolute path the package installs), installing `package` with apt-get when it is missing."""
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None:
        pytest.skip(f"{binary} is missing and there is no apt-get to install Debian's {package} package")
    if os.geteuid() != 0:
        pytest.skip(f"{binary} is missing; install it with `sudo apt-get install -y {package}` (the test "
                    "installs it itself only when it runs as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if not binary.exists():
        pytest.fail(f"apt-get installed {package} but {binary} is still missing")
    return binary
