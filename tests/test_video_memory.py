"""A 10,000-frame video pre-labelled end to end by `labelserve prelabel` (the real fall detector, ByteTrack,
CVAT for video output) in its own process, whose memory is sampled throughout: it must not grow with the
number of frames (frames are decoded one at a time, results go to SQLite, the writer streams)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from .conftest import fall_checkpoint
from .server_process import ROOT
from .video_helpers import people_scene

FRAMES = 10_000
MIB = 2**20


def running_job_done(db: Path) -> int | None:
    """Frames done while the job runs (its output is written before it completes); None otherwise, so that
    the command's start and its exit are not counted."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT done, state FROM jobs").fetchone()
    except sqlite3.Error:
        return None  # not created yet
    return row[0] if row and row[1] == "running" else None


@pytest.mark.slow
def test_10000_frames_tracked_end_to_end_in_flat_memory(tmp_path: Path) -> None:
    video = tmp_path / "long.mp4"
    started = time.monotonic()
    people_scene(FRAMES, scale=0.5, loop=120).write(video, preset="ultrafast")
    print(f"wrote {FRAMES} frames of 320x180 in {time.monotonic() - started:.0f} s")

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "server.cli", "prelabel", str(video), "--model", str(fall_checkpoint()),
        "--format", "cvat_video", "--out", str(out), "--imgsz", "160", "--batch-size", "16", "--no-progress",
    ]  # fmt: skip
    env = {"LABELSERVE_DATA_DIR": str(tmp_path / "data"), "LABELSERVE_MODELS": ""}
    samples: list[tuple[int, float]] = []  # (frames done, RSS in MiB)
    started = time.monotonic()
    with open(tmp_path / "cli.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
        watched = psutil.Process(process.pid)
        db = out / ".labelserve-jobs.sqlite3"
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss / MIB
            except psutil.NoSuchProcess:
                break
            done = running_job_done(db)
            if done is not None:
                samples.append((done, rss))
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert process.returncode == 0, (tmp_path / "cli.log").read_text()[-3000:]

    root = ET.parse(out / "annotations.xml").getroot()
    assert root.findtext("meta/task/size") == str(FRAMES)
    tracks = root.findall("track")
    seen = [
        int(box.attrib["frame"])
        for track in tracks
        for box in track.iter("box")
        if box.attrib["outside"] == "0"
    ]
    at_2000 = next(rss for done, rss in samples if done >= 2000)
    later = [rss for done, rss in samples if done >= 2000]
    print(f"{FRAMES} frames in {elapsed:.0f} s ({FRAMES / elapsed:.1f} frames/s), {len(tracks)} tracks, "
          f"{len(seen)} boxes; RSS {samples[0][1]:.0f} MiB when the job started, {at_2000:.0f} MiB after "
          f"frame 2,000, at most {max(later):.0f} MiB after, {later[-1]:.0f} MiB at the end")  # fmt: skip
    # People are tracked all along (the scene starts over every 120 frames, so tracks end and start again).
    assert len(tracks) >= FRAMES // 120 and len(seen) >= FRAMES // 2
    assert {frame // 1000 for frame in seen} == set(range(FRAMES // 1000))
    trend = {done // 1000 * 1000: round(rss) for done, rss in samples}  # the last sample of each thousand
    print(f"RSS (MiB) by frames done: {trend}")
    assert max(later) - at_2000 <= 24, trend
