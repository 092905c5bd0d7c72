"""L2 on a local disk, for a single host without Redis: survives restarts, shared by the host's workers.

Layout under `<dir>/<namespace>/emb<version>/`: `ab/<sha256 of key>.emb` entries, `tmp/` for writes in
progress, `.bytes` (the total size of the entries) and `.lock`.
- Writes are atomic: a blob is written to tmp/ and renamed into place; a reader sees a whole entry or none.
- Recency is the file's mtime, bumped on every hit (atime is unreliable: noatime/relatime mounts).
- The byte cap holds across processes: the total and the eviction are updated under an flock, and each
  eviction recounts the files, so a total left wrong by a crashed process is corrected there.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.services.embeddings.l2.blob import VERSION
from server.services.embeddings.l2.breaker import Breaker
from server.services.embeddings.l2.tier import L2Tier

LOW_WATER = 0.9  # an eviction frees down to this share of the cap, so that it is not needed on every write
STALE_TMP_S = 3600  # write leftovers of a crashed process older than this are deleted at start


class DiskTier(L2Tier):
    kind = "disk"

    def __init__(self, directory: Path, *, namespace: str, max_bytes: int, breaker: Breaker) -> None:
        super().__init__(breaker)
        self.root = Path(directory) / namespace / f"emb{VERSION}"
        self.max_bytes = max_bytes
        self.evictions = 0  # by this process
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._total_path = self.root / ".bytes"
        self._thread_lock = threading.Lock()  # flock excludes other processes; this, our own threads
        self._lock_file = open(self.root / ".lock", "a+b")  # noqa: SIM115 (held open for the tier's life)
        with self._locked():
            self._remove_stale_tmp()
            self._save_total(sum(size for _, size, _ in self._entries()))

    # -- L2Tier --------------------------------------------------------------------------------------------
    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:  # never written, evicted, or evicted just now by another process
            return None
        return blob

    def _write(self, key: str, blob: bytes) -> bool:
        if len(blob) > self.max_bytes:
            return False
        path = self._path(key)
        tmp = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(blob)
            path.parent.mkdir(exist_ok=True)
            with self._locked():
                replaced = _size(path)
                os.replace(tmp, path)
                total = self._load_total() - replaced + len(blob)
                if total > self.max_bytes:
                    total = self._evict(int(self.max_bytes * LOW_WATER), keep=path)
                self._save_total(total)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._locked():
            size = _size(path)
            path.unlink(missing_ok=True)
            self._save_total(max(self._load_total() - size, 0))

    def _clear(self) -> int:
        with self._locked():
            cleared = 0
            for path, _, _ in self._entries():
                path.unlink(missing_ok=True)
                cleared += 1
            self._save_total(0)
        return cleared

    def _describe(self) -> dict:
        try:
            total: int | None = self._load_total()
        except OSError:
            total = None
        return {
            "directory": str(self.root),
            "bytes": total,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
        }

    def close(self) -> None:
        self._lock_file.close()

    # -- files ---------------------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.emb"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _entries(self) -> Iterator[tuple[Path, int, float]]:
        """(path, size, mtime) of every entry."""
        for shard in os.scandir(self.root):
            if not (shard.is_dir() and len(shard.name) == 2):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.endswith(".emb"):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    yield Path(entry.path), stat.st_size, stat.st_mtime

    def _evict(self, target: int, keep: Path) -> int:
        """Delete least recently used entries until at most `target` bytes remain; returns the new total."""
        entries = sorted(self._entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= target:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.evictions += 1
        return total

    def _load_total(self) -> int:
        try:
            return int(self._total_path.read_text())
        except (FileNotFoundError, ValueError):  # lost or torn by a crash: count again
            return sum(size for _, size, _ in self._entries())

    def _save_total(self, total: int) -> None:
        self._total_path.write_text(str(total))

    def _remove_stale_tmp(self) -> None:
        horizon = time.time() - STALE_TMP_S
        for entry in os.scandir(self._tmp):
            try:
                if entry.stat().st_mtime < horizon:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
