"""The container's entrypoint (`labelserve-entrypoint`): catch what a misconfigured deployment gets wrong,
with a message that says how to fix it, before the slow start of torch; then become `labelserve serve`.

    labelserve-entrypoint [serve options]   checks, then exec `labelserve serve --host 0.0.0.0 [options]`
    labelserve-entrypoint weights|prelabel  secret files only, then exec that `labelserve` command
    labelserve-entrypoint healthcheck       exit 0 when /healthz answers (the image's HEALTHCHECK)

Checks, in order: `NAME_FILE` secrets are read into `NAME`; the data directory is writable; the weights
directory is usable; with LABELSERVE_FETCH_MISSING=1 the enabled models' missing checkpoints are fetched
(sha256-checked); every checkpoint present is verified, and a corrupt one stops the start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path

from pydantic import ValidationError

from server.settings import Settings
from weights import cli as weights_cli
from weights import store

EXIT_CONFIG = 2  # the deployment is wrong: a message says what to change
SECRET_PREFIXES = ("LABELSERVE_", "CVAT_")  # CVAT_ACCESS_TOKEN, CVAT_PASSWORD: read by `labelserve prelabel`
LABELSERVE_COMMANDS = ("weights", "prelabel")


class DeploymentError(Exception):
    """A problem the operator fixes in the deployment; str() says what and how."""


def load_secret_files(environ: MutableMapping[str, str]) -> list[str]:
    """Docker/Kubernetes secrets: `NAME_FILE=/run/secrets/x` sets NAME to the file's content (one trailing
    newline dropped), so that no secret has to sit in the environment of `docker inspect`. Returns the names
    set. Nested settings (`__`) and settings whose own name ends in _FILE are left alone: storage profiles
    already read `secret_file` themselves, at each use."""
    own_fields = {f"LABELSERVE_{name.upper()}" for name in Settings.model_fields}
    loaded = []
    for variable in sorted(environ):
        if not variable.endswith("_FILE") or not variable.startswith(SECRET_PREFIXES):
            continue
        name = variable.removesuffix("_FILE")
        if "__" in variable or variable in own_fields:
            continue
        if name in environ:
            raise DeploymentError(f"both {name} and {variable} are set; keep one of them")
        path = Path(environ[variable])
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DeploymentError(
                f"{variable}={path} cannot be read ({exc.strerror}); mount the secret there, readable by "
                f"uid {os.getuid()}"
            ) from None
        environ[name] = value.removesuffix("\n")
        loaded.append(name)
    return loaded


def check_data_dir(data_dir: Path) -> None:
    """The job database and ultralytics' settings live here: without write access every job would fail."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        raise DeploymentError(
            f"LABELSERVE_DATA_DIR={data_dir} is not writable by uid {os.getuid()} ({exc.strerror}). Mount a "
            f"volume there that this user owns (e.g. `chown {os.getuid()} DIR` on the host), or run the "
            "container with --user set to the directory's owner."
        ) from None


def check_weights_dir(weights_dir: Path, need_write: bool) -> None:
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        os.listdir(weights_dir)
    except OSError as exc:
        raise DeploymentError(
            f"LABELSERVE_WEIGHTS_DIR={weights_dir} cannot be used by uid {os.getuid()} ({exc.strerror}); "
            "mount the checkpoints there (read-only is fine)."
        ) from None
    if need_write and not os.access(weights_dir, os.W_OK):
        raise DeploymentError(
            f"LABELSERVE_FETCH_MISSING=1 needs LABELSERVE_WEIGHTS_DIR={weights_dir} writable by uid "
            f"{os.getuid()}; make the volume writable, or fetch the weights beforehand and unset it."
        )


def missing_checkpoints(models: Iterable[str], weights_dir: Path) -> list[str]:
    """Enabled models from the manifest whose checkpoint is not on disk (local .pt detectors are not ours)."""
    manifest = store.load_manifest()
    return [
        name
        for name in models
        if name in manifest and not store.weights_path(manifest[name], weights_dir).exists()
    ]


def fetch_missing(
    models: Iterable[str],
    weights_dir: Path,
    fetch: Callable[[argparse.Namespace], int] = weights_cli.cmd_fetch,
) -> list[str]:
    """Fetch what is missing; returns the names that failed. A failure does not stop the start: the server
    then lists the model as unavailable with the command that fixes it, as `make serve` does."""
    failed = []
    for name in missing_checkpoints(models, weights_dir):
        print(f"labelserve-entrypoint: fetching {name} into {weights_dir}", file=sys.stderr)
        if fetch(argparse.Namespace(dir=weights_dir, name=name, url=None, timeout=60.0)) != 0:
            failed.append(name)
    return failed


def verify_present(weights_dir: Path) -> None:
    """`labelserve weights verify`: the sha256 of every known checkpoint present (stamps skip re-hashing)."""
    if weights_cli.cmd_verify(argparse.Namespace(dir=weights_dir, names=[], rehash=False)) != 0:
        raise DeploymentError(
            f"a checkpoint in LABELSERVE_WEIGHTS_DIR={weights_dir} is not the file the manifest names "
            "(above). It is never loaded: delete it and fetch it again with the command shown."
        )


def prepare_serve(environ: MutableMapping[str, str]) -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        raise DeploymentError(f"invalid LABELSERVE_* settings:\n{exc}") from None
    fetch = environ.get("LABELSERVE_FETCH_MISSING", "").lower() in ("1", "true", "yes")
    check_data_dir(settings.data_dir)
    check_weights_dir(settings.weights_dir, need_write=fetch)
    if fetch:
        failed = fetch_missing(settings.models, settings.weights_dir)
        if failed:
            print(
                f"labelserve-entrypoint: could not fetch {', '.join(failed)}; starting without them "
                "(GET /v1/models shows how to add them)",
                file=sys.stderr,
            )
    verify_present(settings.weights_dir)


def healthcheck(environ: MutableMapping[str, str]) -> int:
    url = f"http://127.0.0.1:{environ.get('LABELSERVE_PORT', '8080')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["healthcheck"]:
        return healthcheck(os.environ)
    try:
        load_secret_files(os.environ)
        if args[:1] and args[0] in LABELSERVE_COMMANDS:
            command = args
        else:
            prepare_serve(os.environ)
            host = os.environ.get("LABELSERVE_HOST", "0.0.0.0")  # a container must listen beyond loopback
            command = ["serve", "--host", host, *(args[1:] if args[:1] == ["serve"] else args)]
    except DeploymentError as exc:
        print(f"labelserve-entrypoint: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.flush()
    sys.stderr.flush()
    # exec: the server becomes this process, so `docker stop`'s SIGTERM reaches uvicorn directly.
    os.execv(sys.executable, [sys.executable, "-m", "server.cli", *command])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
