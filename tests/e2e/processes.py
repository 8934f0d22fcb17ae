"""Start, wait for and stop the two servers of the end-to-end test: Label Studio 1.23.2 (from its own cached
virtual environment) and the backend (gunicorn). Both are real processes on 127.0.0.1 with free ports, each in
its own process group so that stopping it also stops its children; their output goes to log files whose tail
is shown when something fails."""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

logger = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Variables of the calling environment that must not leak into a server's environment.
_DROP = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DJANGO_SETTINGS_MODULE", "LABEL_STUDIO_URL",
         "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "MODEL_DIR", "ADCLICK_NORMAL_DIR",
         "REDIS_URL", "ADCLICK_ADAPT", "ADCLICK_ADAPT_MINUTES")


def wait_for(what: str, probe, timeout_s: float, every_s: float = 1.0):
    """probe() until it returns something truthy (returned); an AssertionError naming `what` after timeout_s."""
    end = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def cache_dir() -> Path:
    """${XDG_CACHE_HOME:-~/.cache}/adclick-e2e: what the test keeps between runs, outside the repository."""
    return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache") / "adclick-e2e"


def default_ls_venv() -> Path:
    """Where the Label Studio environment lives: $ADCLICK_E2E_LS_VENV, else <cache_dir>/ls-<version>."""
    override = os.environ.get("ADCLICK_E2E_LS_VENV", "").strip()
    return Path(override).expanduser() if override else cache_dir() / f"ls-{LS_VERSION}"


def _ls_installed(venv: Path) -> bool:
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.version('label-studio'))"],
                           capture_output=True, text=True, timeout=120, check=False)
    return probe.returncode == 0 and probe.stdout.strip() == LS_VERSION


def ensure_ls_venv(venv: Path, timeout_s: float = 900.0) -> Path:
    """A virtual environment holding label-studio==LS_VERSION; created (pip install, ~2 min, ~1 GB) when
    missing or broken. An flock next to it makes concurrent test runs wait for one installation."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.parent / f".{venv.name}.lock"):
        if (venv / "bin" / "label-studio").exists() and _ls_installed(venv):
            return venv
        logger.info("installing label-studio==%s into %s (first run only)", LS_VERSION, venv)
        shutil.rmtree(venv, ignore_errors=True)
        python = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
        log = venv.parent / f"{venv.name}-install.log"
        with open(log, "w") as out:
            done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input",
                                   f"label-studio=={LS_VERSION}"], stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, env=_clean_env({}), check=False)
        if done.returncode != 0 or not _ls_installed(venv):
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"pip install label-studio=={LS_VERSION} failed:\n{log_tail(log)}")
        return venv


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update(extra)
    return env


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, path: str, timeout_s: float, ok: Callable[[requests.Response], bool]) -> None:
        end = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < end:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{log_tail(self.log)}")
            try:
                resp = requests.get(self.url + path, timeout=5)
                if ok(resp):
                    return
                last = f"{resp.status_code} {resp.text[:200]}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s ({last}):\n{log_tail(self.log)}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited after timeout_s."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


def _spawn(name: str, cmd: list[str], env: dict[str, str], log: Path, url: str,
           cwd: Path | None = None) -> Server:
    with open(log, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(name, url, proc, log)


@dataclass(frozen=True)
class LabelStudioConfig:
    venv: Path
    data_dir: Path  # LABEL_STUDIO_BASE_DATA_DIR (fresh per run)
    document_root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    token: str  # legacy API token of the admin user
    username: str = "e2e@example.com"
    password: str = "e2e-password-123"


def start_label_studio(cfg: LabelStudioConfig, log: Path, timeout_s: float = 240.0) -> Server:
    """Label Studio with the settings of LABEL_STUDIO.md; returns once /health answers and the token works."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = _clean_env({
        "LABEL_STUDIO_BASE_DATA_DIR": str(cfg.data_dir),
        "LABEL_STUDIO_USERNAME": cfg.username,
        "LABEL_STUDIO_PASSWORD": cfg.password,
        "LABEL_STUDIO_USER_TOKEN": cfg.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(cfg.document_root),
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",  # no error reports to the internet
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_HOST": url,
        "PATH": f"{cfg.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    cmd = [str(cfg.venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
           "-p", str(port)]
    server = _spawn("label-studio", cmd, env, log, url)
    try:
        server.wait_ready("/health", timeout_s, lambda r: r.status_code == 200)
        server.wait_ready("/api/current-user/whoami", 60, lambda r: True)  # the API is up, too
        who = requests.get(url + "/api/current-user/whoami", headers={"Authorization": f"Token {cfg.token}"},
                           timeout=10)
        if who.status_code != 200:
            raise RuntimeError(f"the legacy token is refused ({who.status_code}): {who.text[:300]}")
    except BaseException:
        server.stop()
        raise
    return server


def start_backend(env_extra: Mapping[str, str], log: Path, timeout_s: float = 120.0) -> Server:
    """The backend as it is deployed: gunicorn serving backend.wsgi:app from this checkout."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = _clean_env({"LOG_LEVEL": "INFO", **env_extra})
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:backend.gunicorn_conf", "--bind", f"127.0.0.1:{port}",
           "--workers", "1", "--threads", "32", "--timeout", "300", "--preload",
           "backend.wsgi:app"]  # as `make serve` runs it
    server = _spawn("backend", cmd, env, log, url, cwd=REPO_ROOT)
    try:
        server.wait_ready("/health", timeout_s, lambda r: r.status_code == 200)
    except BaseException:
        server.stop()
        raise
    return server


def ensure_ls_template(venv: Path, log: Path) -> tuple[Path, str]:
    """A migrated Label Studio data directory with its admin and legacy token, made once by a first boot
    (~1-2 min of database migrations) and cached in <cache_dir>/ls-<version>-template; returns (data dir, token).
    Each run starts from a copy, so it boots in seconds and still never sees an earlier run's projects."""
    root = cache_dir() / f"ls-{LS_VERSION}-template"
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        data, token_file = root / "data", root / "token"
        if token_file.exists() and (data / "label_studio.sqlite3").exists():
            return data, token_file.read_text().strip()
        shutil.rmtree(root, ignore_errors=True)
        (root / "files").mkdir(parents=True)
        token = secrets.token_hex(20)
        cfg = LabelStudioConfig(venv=venv, data_dir=root / "data.partial", document_root=root / "files", token=token)
        start_label_studio(cfg, log, timeout_s=600).stop()
        os.replace(root / "data.partial", data)
        token_file.write_text(token)
        return data, token


def start_label_studio_from_template(venv: Path, data_dir: Path, document_root: Path, log: Path) -> tuple[Server, str]:
    """Label Studio on a fresh copy of the cached template (see ensure_ls_template); returns (server, token)."""
    template, token = ensure_ls_template(venv, log.with_name(log.stem + "-first-boot.log"))
    shutil.copytree(template, data_dir)
    cfg = LabelStudioConfig(venv=venv, data_dir=data_dir, document_root=document_root, token=token)
    return start_label_studio(cfg, log), token
