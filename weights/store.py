"""Known model checkpoints: where they live on disk, how to fetch them, and proof they are the right bytes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BLOCK = 4 * 1024 * 1024
STAMP_SUFFIX = ".sha256-ok"
PART_SUFFIX = ".part"


@dataclass(frozen=True)
class WeightEntry:
    name: str
    architecture: str  # what the registry builds: sam_vit_b, mobile_sam, sam2.1_hiera_tiny, yolo11n, ...
    kind: str  # segmenter | detector | tracker: its first kind (SAM 2 segmenters also track)
    filename: str  # a file, or for a repository snapshot (`repo`) a directory holding its `files`
    url: str
    size: int | None  # bytes of the file (a snapshot: of its largest file, when a public source gives it)
    sha256: str | None  # None where no public source gives it (then the size and the loader's checks decide)
    license: str
    source: str
    # A Hugging Face repository snapshot instead of one file: the repository, its pinned revision, the files
    # fetched from it, and the environment variable holding the access token of a gated repository.
    repo: str | None = None
    revision: str | None = None
    files: tuple[str, ...] = ()
    token_env: str | None = None
    weights_file: str | None = None  # the snapshot's file `size` and `sha256` describe

    @property
    def is_snapshot(self) -> bool:
        return self.repo is not None


Manifest = Mapping[str, WeightEntry]
Progress = Callable[[int, int], None]  # (bytes done, bytes expected)


class WeightsError(Exception):
    """Base for every weights problem a user can act on; str() is the whole explanation."""


class UnknownWeights(WeightsError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown weights {name!r}; known: {', '.join(sorted(known))}")
        self.name = name


class DownloadError(WeightsError):
    pass


class MissingWeights(WeightsError):
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.fix_command = fetch_command(name, path.parent)
        super().__init__(f"weights {name!r} not found at {path}; fetch them with: {self.fix_command}")


class ChecksumMismatch(WeightsError):
    def __init__(
        self,
        name: str,
        path: Path,
        *,
        expected_sha256: str,
        actual_sha256: str | None,
        expected_size: int,
        actual_size: int,
        download_url: str | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        self.expected_size = expected_size
        self.actual_size = actual_size
        self.download_url = download_url
        self.fix_command = fetch_command(name, path.parent)
        actual = actual_sha256 or "not computed, size already differs"
        if download_url is None:
            subject, advice = str(path), "Delete it and re-fetch"
        else:
            subject = f"the download from {download_url} (for {path})"
            advice = "It was discarded; retry, or check the URL/mirror"
        super().__init__(
            f"{subject} is not the expected {name!r} checkpoint: expected sha256 {expected_sha256} "
            f"({expected_size} bytes), got sha256 {actual} ({actual_size} bytes). "
            f"{advice}: {self.fix_command}"
        )


def fetch_command(name: str, weights_dir: Path) -> str:
    return f"labelserve weights fetch {shlex.quote(name)} --dir {shlex.quote(str(weights_dir))}"


def default_weights_dir() -> Path:
    env = os.environ.get("LABELSERVE_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "labelserve" / "weights"


@functools.cache
def _parse_manifest() -> tuple[WeightEntry, ...]:
    raw = json.loads(resources.files("weights").joinpath("manifest.json").read_text(encoding="utf-8"))
    entries = tuple(WeightEntry(**{**item, "files": tuple(item.get("files", ()))}) for item in raw)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in weights manifest: {names}")
    return entries


def load_manifest() -> dict[str, WeightEntry]:
    # A fresh dict per call: callers (and tests) may edit it without corrupting the cached parse.
    return {e.name: e for e in _parse_manifest()}


def get_entry(name: str, manifest: Manifest | None = None) -> WeightEntry:
    manifest = load_manifest() if manifest is None else manifest
    try:
        return manifest[name]
    except KeyError:
        raise UnknownWeights(name, list(manifest)) from None


def weights_path(entry: WeightEntry, weights_dir: Path) -> Path:
    return Path(weights_dir) / entry.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def has_valid_stamp(entry: WeightEntry, path: Path, st: os.stat_result | None = None) -> bool:
    """True when a previous verification still applies: same expected hash, same size and mtime."""
    try:
        if st is None:
            st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        return (
            stamp["sha256"] == entry.sha256
            and stamp["size"] == st.st_size == entry.size
            and stamp["mtime_ns"] == st.st_mtime_ns
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_stamp(entry: WeightEntry, path: Path, st: os.stat_result) -> None:
    # `st` is taken before hashing, so a file changed mid-hash gets a stale stamp and is re-hashed next time.
    stamp = {"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError):  # read-only volume: still correct, we just hash again next time
        _stamp_path(path).write_text(json.dumps(stamp), encoding="utf-8")


def verify(entry: WeightEntry, path: Path, *, use_stamp: bool = True) -> None:
    """Raise ChecksumMismatch unless `path` holds exactly the manifest's bytes (MissingWeights if absent)."""
    path = Path(path)
    if entry.is_snapshot:
        _verify_snapshot(entry, path, use_stamp)
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MissingWeights(entry.name, path) from None
    _check_bytes(entry, path, st, use_stamp)


def _verify_snapshot(entry: WeightEntry, directory: Path, use_stamp: bool) -> None:
    """Every file of the snapshot is there, and its weights file has the recorded size and sha256 where the
    manifest has them. MissingWeights names the directory when a file is absent."""
    if not all((directory / name).is_file() for name in entry.files):
        raise MissingWeights(entry.name, directory)
    if entry.weights_file is None or entry.size is None:
        return
    path = directory / entry.weights_file
    _check_bytes(entry, path, path.stat(), use_stamp)


def _check_bytes(entry: WeightEntry, path: Path, st: os.stat_result, use_stamp: bool) -> None:
    """The file's size, then (unless a valid stamp vouches for it) its sha256, against the manifest's; a
    manifest entry with a size but no sha256 (a snapshot no public source hashes) is checked by size only."""
    actual: str | None = None  # a size mismatch is conclusive, so the slow hash is skipped for it
    if st.st_size == entry.size:
        if entry.sha256 is None or (use_stamp and has_valid_stamp(entry, path, st)):
            return
        actual = sha256_file(path)
        if actual == entry.sha256:
            _write_stamp(entry, path, st)
            return
    raise ChecksumMismatch(
        entry.name,
        path,
        expected_sha256=entry.sha256 or "(none recorded)",
        actual_sha256=actual,
        expected_size=entry.size,
        actual_size=st.st_size,
    )


def status(entry: WeightEntry, weights_dir: Path) -> str:
    """Cheap (never hashes): 'missing', 'wrong-size', 'verified' (valid stamp) or 'present' (unverified)."""
    path = weights_path(entry, weights_dir)
    if entry.is_snapshot:
        return "present" if all((path / name).is_file() for name in entry.files) else "missing"
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != entry.size:
        return "wrong-size"
    return "verified" if has_valid_stamp(entry, path, st) else "present"


def resolve(name: str, weights_dir: Path, *, manifest: Manifest | None = None) -> Path:
    entry = get_entry(name, manifest)
    path = weights_path(entry, weights_dir)
    verify(entry, path)
    return path


def fetch(
    name: str,
    weights_dir: Path,
    *,
    url: str | None = None,
    timeout: float = 60,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
) -> Path:
    """Download `name` into `weights_dir` unless a verified copy is already there; returns its path."""
    entry = get_entry(name, manifest)
    weights_dir = Path(weights_dir)
    dest = weights_path(entry, weights_dir)
    if entry.is_snapshot:
        return _fetch_snapshot(entry, dest, timeout)
    if dest.exists():
        try:
            verify(entry, dest)
            return dest
        except ChecksumMismatch:
            pass  # replaced below, but only once a good copy has fully arrived
    weights_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    url = url or entry.url
    try:
        actual_size, actual_sha = _download(url, part, entry.size, timeout, progress)
        if actual_size != entry.size or actual_sha != entry.sha256:
            raise ChecksumMismatch(
                entry.name,
                dest,
                expected_sha256=entry.sha256,
                actual_sha256=actual_sha,
                expected_size=entry.size,
                actual_size=actual_size,
                download_url=url,
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)  # also on Ctrl-C: never leave a half file that looks like progress
        raise
    _write_stamp(entry, dest, dest.stat())
    return dest


def _fetch_snapshot(entry: WeightEntry, dest: Path, timeout: float) -> Path:
    """The snapshot's files at the pinned revision from the Hugging Face Hub, into `dest`. A gated repository
    takes the token from the environment variable `entry.token_env` (read here, never stored or logged)."""
    try:
        verify(entry, dest)
        return dest
    except MissingWeights:
        pass
    token = os.environ.get(entry.token_env) if entry.token_env else None
    if entry.token_env and not token:
        raise DownloadError(
            f"{entry.repo} is gated: accept its licence at https://huggingface.co/{entry.repo} with your "
            f"account, create a read token, and set {entry.token_env} to it before fetching {entry.name!r}"
        )
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    from huggingface_hub import snapshot_download  # lazily: only this command downloads snapshots
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot_download(
            repo_id=entry.repo,
            revision=entry.revision,
            allow_patterns=list(entry.files),
            local_dir=dest,
            token=token or False,
        )
    except HfHubHTTPError as exc:
        raise DownloadError(
            f"download of {entry.repo}@{entry.revision} failed: {exc}. A 401 or 403 means the token in "
            f"{entry.token_env} cannot read the gated repository (accept its licence first)."
        ) from exc
    except OSError as exc:
        raise DownloadError(f"download of {entry.repo}@{entry.revision} failed: {exc}") from exc
    verify(entry, dest, use_stamp=False)
    return dest


def _download(
    url: str, part: Path, expected_size: int, timeout: float, progress: Progress | None
) -> tuple[int, str | None]:
    """Stream `url` into `part`, hashing as it goes. Returns (size, sha256); sha256 None if cut short."""
    import httpx  # lazily: server start-up imports this module but rarely downloads

    digest = hashlib.sha256()
    done = 0
    # identity encoding keeps Content-Length equal to the file size, so a wrong file is caught before
    # its body is downloaded.
    headers = {"Accept-Encoding": "identity"}
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=timeout, headers=headers) as client,
            client.stream("GET", url) as response,
        ):
            response.raise_for_status()
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != expected_size:
                return int(length), None
            with open(part, "wb") as f:
                for chunk in response.iter_bytes(BLOCK):
                    done += len(chunk)
                    if done > expected_size:
                        return done, None  # do not fill the disk with a file that cannot be right
                    f.write(chunk)
                    digest.update(chunk)
                    if progress is not None:
                        progress(done, expected_size)
                f.flush()
                os.fsync(f.fileno())  # the rename below must not publish data still in the page cache
    except httpx.HTTPStatusError as exc:
        raise DownloadError(f"download of {url} failed: HTTP {exc.response.status_code}") from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {exc}") from exc
    return done, digest.hexdigest()
