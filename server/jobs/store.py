"""Job state in one SQLite file (WAL): jobs, and one row per image with its status and stored result.

One connection guarded by a lock serves every thread; writes are few and batched (one transaction per
detector batch), so the lock is never the bottleneck. WAL with synchronous=NORMAL keeps every committed
batch through a process crash (kill -9), which is what resuming relies on.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
ItemStatus = Literal["pending", "done", "failed"]
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")
JOBS_DB_NAME = "jobs.sqlite3"  # the file under the data directory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    ref TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    width INTEGER,
    height INTEGER,
    result TEXT,
    error TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_status ON items (job_id, status, idx);
-- Credentials given inline in a spec (the stored spec has them redacted), kept until the job completes.
CREATE TABLE IF NOT EXISTS job_secrets (
    job_id TEXT PRIMARY KEY,
    secrets TEXT NOT NULL
);
-- Uploading into a CVAT task, in chunks of whole items: `confirmed` is the last item index whose chunk CVAT
-- acknowledged; `started` is the last index of a chunk sent but not acknowledged (it may or may not have
-- landed: resuming checks the task before sending it again).
CREATE TABLE IF NOT EXISTS uploads (
    job_id TEXT PRIMARY KEY,
    confirmed INTEGER NOT NULL DEFAULT -1,
    started INTEGER,
    shapes INTEGER NOT NULL DEFAULT 0,
    tags INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0
);
-- What each acknowledged chunk created in CVAT: the annotation's kind ('shape' or 'tag'), CVAT id, CVAT
-- label id and frame. A corrections report compares them with the task's annotations now: an id gone is a
-- pre-label someone deleted.
CREATE TABLE IF NOT EXISTS uploaded (
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    cvat_id INTEGER NOT NULL,
    label_id INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    PRIMARY KEY (job_id, kind, cvat_id)
) WITHOUT ROWID;
-- A review job's annotations as they were at submit (server.formats.annotations.dump_dataset): what it
-- scores, however the file or CVAT task changes while it runs or before it is resumed.
CREATE TABLE IF NOT EXISTS annotations (
    job_id TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
-- The CVAT task a sample job made of its picks, so that a job resumed after making it does not make another.
CREATE TABLE IF NOT EXISTS created_tasks (
    job_id TEXT PRIMARY KEY,
    task_id INTEGER NOT NULL,
    url TEXT NOT NULL
);
-- Video jobs: the tracker's state after item next_index - 1, committed with that item's result, and where the
-- decoder stood (JSON); resuming restores the tracker and decodes on from there.
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT PRIMARY KEY,
    next_index INTEGER NOT NULL,
    position TEXT NOT NULL,
    state BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    spec: str
    state: JobState
    created: float
    started: float | None
    finished: float | None
    error: str | None
    total: int
    done: int
    failed: int


@dataclass(frozen=True)
class ItemRow:
    index: int
    ref: str
    name: str
    status: ItemStatus
    width: int | None
    height: int | None
    result: str | None
    error: str | None


@dataclass(frozen=True)
class UploadRow:
    confirmed: int  # last item index uploaded and acknowledged; -1 for none
    started: int | None  # last item index of a chunk sent but not acknowledged
    shapes: int  # annotations acknowledged so far
    tags: int
    skipped: int  # shapes left out (no CVAT label, or a kind the label cannot hold)


@dataclass(frozen=True)
class UploadedAnnotation:
    kind: Literal["shape", "tag"]
    cvat_id: int
    label_id: int
    frame: int


@dataclass(frozen=True)
class Checkpoint:
    next_index: int  # the first item not covered
    position: str  # JSON, the engine's own
    state: bytes


@dataclass(frozen=True)
class Outcome:
    """What processing one item produced: `result` (shapes JSON) when done, `error` when failed."""

    index: int
    width: int | None = None
    height: int | None = None
    result: str | None = None
    error: str | None = None


_JOB_COLUMNS = "id, spec, state, created, started, finished, error, total, done, failed"
_ITEM_COLUMNS = "idx, ref, name, status, width, height, result, error"


class JobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ------------------------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        spec: str,
        entries: Iterable[tuple[str, str]],
        now: float,
        secrets: str | None = None,
        annotations: bytes | None = None,
    ) -> int:
        """Insert a queued job and all its items (and a review's annotations) in one transaction: a crash
        never leaves half a job."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, spec, state, created) VALUES (?, ?, 'queued', ?)",
                    (job_id, spec, now),
                )
                if secrets is not None:
                    self._db.execute(
                        "INSERT INTO job_secrets (job_id, secrets) VALUES (?, ?)", (job_id, secrets)
                    )
                if annotations is not None:
                    self._db.execute(
                        "INSERT INTO annotations (job_id, data) VALUES (?, ?)", (job_id, annotations)
                    )
                cur = self._db.executemany(
                    "INSERT INTO items (job_id, idx, ref, name) VALUES (?, ?, ?, ?)",
                    ((job_id, i, ref, name) for i, (ref, name) in enumerate(entries)),
                )
                total = cur.rowcount
                self._db.execute("UPDATE jobs SET total = ? WHERE id = ?", (total, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return total

    def job(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRow(*row) if row else None

    def jobs(
        self, states: Iterable[str] | None = None, limit: int | None = None, oldest_first: bool = False
    ) -> list[JobRow]:
        """Newest first by default; oldest first is the order to run them in."""
        query, args = f"SELECT {_JOB_COLUMNS} FROM jobs", []
        states = list(states) if states is not None else None
        if states is not None:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args += states
        query += " ORDER BY created " + ("ASC" if oldest_first else "DESC") + ", id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._lock:
            return [JobRow(*r) for r in self._db.execute(query, args).fetchall()]

    def purge_finished(self, before: float) -> int:
        """Deletes the jobs that finished before `before` (epoch seconds), with their items, credentials,
        upload and checkpoint rows. Returns how many jobs went."""
        finished = "SELECT id FROM jobs WHERE state NOT IN ('queued', 'running') AND finished < ?"
        with self._lock:
            ids = [row[0] for row in self._db.execute(finished, (before,)).fetchall()]
            if not ids:
                return 0
            self._db.execute("BEGIN")
            tables = (
                "items",
                "job_secrets",
                "uploads",
                "uploaded",
                "created_tasks",
                "annotations",
                "checkpoints",
            )
            for table in tables:
                self._db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in ids])
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
            return len(ids)

    def state_counts(self) -> dict[str, int]:
        """How many jobs are in each state (for /metrics)."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def active_progress(self) -> list[tuple[str, str, int, int, int]]:
        """(id, state, total, done, failed) of each queued or running job, without their specs."""
        marks = ", ".join("?" * len(ACTIVE_STATES))
        query = f"SELECT id, state, total, done, failed FROM jobs WHERE state IN ({marks}) ORDER BY created"
        with self._lock:
            return self._db.execute(query, ACTIVE_STATES).fetchall()

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        only_from: Iterable[JobState],
        now: float | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a job to `to` if it is in one of `only_from`; False when it was not (someone got there first).

        Running sets `started` once; terminal states set `finished`; queued clears `finished` and `error`.
        """
        sets = ["state = ?"]
        args: list[object] = [to]
        if to == "running":
            sets.append("started = COALESCE(started, ?)")
            args.append(now)
        elif to == "queued":
            sets += ["finished = NULL", "error = NULL"]
        else:
            sets += ["finished = ?", "error = ?"]
            args += [now, error]
        only = list(only_from)
        query = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({', '.join('?' * len(only))})"
        with self._lock:
            return self._db.execute(query, [*args, job_id, *only]).rowcount == 1

    # -- items -----------------------------------------------------------------------------------------

    def pending(self, job_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        """(index, ref) of pending items with index > `after`, in index order: keyset pages."""
        with self._lock:
            return self._db.execute(
                "SELECT idx, ref FROM items WHERE job_id = ? AND status = 'pending' AND idx > ? "
                "ORDER BY idx LIMIT ?",
                (job_id, after, limit),
            ).fetchall()

    def record(self, job_id: str, outcomes: list[Outcome], checkpoint: Checkpoint | None = None) -> None:
        """Store a batch of outcomes and bump the job's counters, in one transaction, with the checkpoint they
        lead to if any. Only pending items change, and the counters count what changed, so recording an
        outcome twice is harmless."""
        if not outcomes and checkpoint is None:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                done = self._db.executemany(
                    "UPDATE items SET status = 'done', width = ?, height = ?, result = ? "
                    "WHERE job_id = ? AND idx = ? AND status = 'pending'",
                    [(o.width, o.height, o.result, job_id, o.index) for o in outcomes if o.error is None],
                ).rowcount
                failed = self._db.executemany(
                    "UPDATE items SET status = 'failed', error = ? "
                    "WHERE job_id = ? AND idx = ? AND status = 'pending'",
                    [(o.error, job_id, o.index) for o in outcomes if o.error is not None],
                ).rowcount
                self._db.execute(
                    "UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                    (max(done, 0), max(failed, 0), job_id),
                )
                if checkpoint is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO checkpoints (job_id, next_index, position, state) "
                        "VALUES (?, ?, ?, ?)",
                        (job_id, checkpoint.next_index, checkpoint.position, checkpoint.state),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def fail_pending(self, job_id: str, error: str) -> int:
        """Fail every item still pending with `error` (a video that cannot be decoded past some frame)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                failed = self._db.execute(
                    "UPDATE items SET status = 'failed', error = ? WHERE job_id = ? AND status = 'pending'",
                    (error, job_id),
                ).rowcount
                self._db.execute("UPDATE jobs SET failed = failed + ? WHERE id = ?", (failed, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return failed

    def checkpoint(self, job_id: str) -> Checkpoint | None:
        with self._lock:
            row = self._db.execute(
                "SELECT next_index, position, state FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchone()
        return Checkpoint(row[0], row[1], bytes(row[2])) if row else None

    def drop_checkpoint(self, job_id: str) -> None:
        """A completed job is never resumed: its tracker state is dead weight."""
        with self._lock:
            self._db.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))

    def items(self, job_id: str, status: ItemStatus | None = None, page: int = 1000) -> Iterator[ItemRow]:
        """Items in index order, fetched page by page so millions never sit in memory at once."""
        after = -1
        where = "job_id = ? AND idx > ?" + (" AND status = ?" if status else "")
        while True:
            args: list[object] = [job_id, after] + ([status] if status else []) + [page]
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE {where} ORDER BY idx LIMIT ?", args
                ).fetchall()
            yield from (ItemRow(*r) for r in rows)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def failures(self, job_id: str, limit: int) -> list[ItemRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE job_id = ? AND status = 'failed' "
                "ORDER BY idx LIMIT ?",
                (job_id, limit),
            ).fetchall()
        return [ItemRow(*r) for r in rows]

    # -- secrets ---------------------------------------------------------------------------------------

    def secrets(self, job_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT secrets FROM job_secrets WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def set_secrets(self, job_id: str, secrets: str | None) -> None:
        """Replace a job's stored credentials; None forgets them."""
        with self._lock:
            if secrets is None:
                self._db.execute("DELETE FROM job_secrets WHERE job_id = ?", (job_id,))
            else:
                self._db.execute(
                    "INSERT INTO job_secrets (job_id, secrets) VALUES (?, ?) "
                    "ON CONFLICT (job_id) DO UPDATE SET secrets = excluded.secrets",
                    (job_id, secrets),
                )

    # -- uploads -----------------------------------------------------------------------------------------

    def upload(self, job_id: str) -> UploadRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT confirmed, started, shapes, tags, skipped FROM uploads WHERE job_id = ?", (job_id,)
            ).fetchone()
        return UploadRow(*row) if row else None

    def upload_started(self, job_id: str, last: int) -> None:
        """Mark the chunk ending at item `last` as sent: committed before the request goes out."""
        with self._lock:
            self._db.execute(
                "INSERT INTO uploads (job_id, started) VALUES (?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET started = excluded.started",
                (job_id, last),
            )

    def upload_confirmed(
        self,
        job_id: str,
        last: int,
        shapes: int,
        tags: int,
        skipped: int,
        created: Iterable[UploadedAnnotation] = (),
    ) -> None:
        """CVAT acknowledged the chunk ending at item `last`, holding these counts; `created` are the CVAT
        annotations it made (committed in the same transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO uploads (job_id, confirmed, shapes, tags, skipped) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET confirmed = excluded.confirmed, started = NULL, "
                "shapes = shapes + excluded.shapes, tags = tags + excluded.tags, "
                "skipped = skipped + excluded.skipped",
                (job_id, last, shapes, tags, skipped),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO uploaded (job_id, kind, cvat_id, label_id, frame) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job_id, a.kind, a.cvat_id, a.label_id, a.frame) for a in created],
            )
            self._db.execute("COMMIT")

    def uploaded(self, job_id: str) -> list[UploadedAnnotation]:
        """The CVAT annotations the job's confirmed chunks created, by kind and id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, cvat_id, label_id, frame FROM uploaded WHERE job_id = ? ORDER BY kind, cvat_id",
                (job_id,),
            ).fetchall()
        return [UploadedAnnotation(*row) for row in rows]

    def annotations(self, job_id: str) -> bytes | None:
        """A review job's annotations as stored at submit; None for a job stored without them."""
        with self._lock:
            row = self._db.execute("SELECT data FROM annotations WHERE job_id = ?", (job_id,)).fetchone()
        return bytes(row[0]) if row else None

    def created_task(self, job_id: str) -> tuple[int, str] | None:
        """(CVAT task id, its page) of the task the job made, if it made one."""
        with self._lock:
            row = self._db.execute(
                "SELECT task_id, url FROM created_tasks WHERE job_id = ?", (job_id,)
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def set_created_task(self, job_id: str, task_id: int, url: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO created_tasks (job_id, task_id, url) VALUES (?, ?, ?)",
                (job_id, task_id, url),
            )

    def done_through(self, job_id: str, last: int) -> int:
        """How many items up to index `last` are done."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM items WHERE job_id = ? AND status = 'done' AND idx <= ?", (job_id, last)
            ).fetchone()[0]
