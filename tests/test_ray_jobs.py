"""Batch jobs on Ray Data (`"engine": "ray"`, server/scale/batch.py), on a real local Ray instance on loopback
(2 CPUs, a 100 MiB object store): the Ray engine's output equals the local engine's byte for byte (the real
fall detector and MobileSAM refinement, an s3:// source and output on moto); an actor killed mid-job loses
and duplicates nothing, with progress on GET /v1/jobs/{id}; a driver killed mid-job (`labelserve prelabel
--engine ray` in its own process, joined to the cluster) resumes from the ledger into byte-identical output.
A video job, a CVAT task job (frames read by the actors, upload by the driver), and local folder, paths and
manifest sources into YOLO, CVAT XML and COCO files equal the local engine's.
The refusals, an actor that cannot load its model, and the RayJob manifest are checked too. Skipped without
the `ray` extra."""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.errors import install_error_handlers
from server.api.routes.jobs import router
from server.cli import build_parser
from server.cli import prelabel as cli
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.jobs.status import JobStatus
from server.services.detect import load_job_models
from server.settings import Settings
from tests.jobs_helpers import RectDetector, rect_models, wait_for, write_dataset

from .conftest import encode_image, fall_checkpoint, make_settings, synthetic_scene, ultralytics_asset
from .s3_helpers import moto_s3

ROOT = Path(__file__).resolve().parents[1]


def jobs_client(engine: LocalEngine) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.jobs = engine
    return TestClient(app)


def job_body(source: dict, out: Path, **extra: object) -> dict:
    return {
        "source": source,
        "detector": "rects",
        "output": {"format": "coco", "directory": str(out)},
    } | extra


# --- without Ray: the refusals ---


def test_ray_jobs_are_refused_with_a_4xx_where_ray_is_missing(tmp_path: Path) -> None:
    """A process without the `ray` extra (no RayJobs given) answers 422, not 500, and stores nothing."""
    write_dataset(tmp_path / "images", 2)
    engine = LocalEngine(lambda _: RectDetector(), state_db=tmp_path / "jobs.sqlite3")
    try:
        with jobs_client(engine) as client:
            body = job_body({"directory": str(tmp_path / "images")}, tmp_path / "out", engine="ray")
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code == 422, reply.text
            error = reply.json()["error"]
            assert error["code"] == "engine_unavailable" and "labelserve[ray]" in error["message"]
            assert engine.list() == []
            bad = client.post("/v1/jobs", json=job_body({"directory": "x"}, tmp_path / "o", engine="spark"))
            assert bad.status_code == 422 and bad.json()["error"]["code"]
    finally:
        engine.close()


# --- a real Ray instance ---

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance for the module; yields its GCS address, which another driver process joins."""
    import ray.data

    # The actors are Ray worker processes: they import this checkout and never report usage.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_unsupported_job_kinds_are_refused_on_ray(tmp_path: Path) -> None:
    from server.scale.batch import RayBatchEngine

    settings = make_settings(tmp_path, data_dir=tmp_path / "data")
    engine = LocalEngine(
        lambda _: RectDetector(), state_db=tmp_path / "j.sqlite3", ray=RayBatchEngine(settings, rect_models)
    )
    try:
        with jobs_client(engine) as client:
            images = tmp_path / "images"
            write_dataset(images, 2)
            review = {"annotations": str(tmp_path / "a.json"), "format": "coco"}
            body = job_body({"directory": str(images)}, tmp_path / "out", engine="ray", review=review)
            body["output"]["format"] = "findings"
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code == 422 and reply.json()["error"]["code"] == "engine_unsupported"
    finally:
        engine.close()


def run_job(
    spec: JobSpec, detector: Callable, refine: Callable | None, settings: Settings, tmp_path: Path
) -> tuple[JobStatus, list[tuple]]:
    """The job on the engine its spec names (its own ledger file), to the end: its status and ledger rows."""
    from server.scale.batch import RayBatchEngine

    ray = RayBatchEngine(settings) if spec.engine == "ray" else None
    db = tmp_path / f"{spec.engine}.sqlite3"
    engine = LocalEngine(detector, refine, state_db=db, settings=settings, readers=0, ray=ray)
    try:
        job_id = engine.submit(spec).id
        status = wait_for(engine, job_id, timeout=120)
        rows = [(r.index, r.name, r.status, r.width, r.height, r.result) for r in engine.store.items(job_id)]
    finally:
        engine.close()
    return status, rows


def test_ray_output_is_the_local_engines_byte_for_byte(cluster: str, tmp_path: Path) -> None:
    """The real fall detector (conf 0.05, so that every image has boxes) with MobileSAM refinement (seeded
    random weights), batches of 2, images read from an s3:// prefix and COCO written to s3://, by each
    engine: the same ledger rows and the same bytes. Every other format is written from those rows by the
    same code."""

    fall = str(fall_checkpoint())
    with moto_s3() as moto:
        moto.create_bucket("frames")
        s3 = moto.client()
        images = [ultralytics_asset("bus.jpg").read_bytes(), ultralytics_asset("zidane.jpg").read_bytes()]
        images += [encode_image(synthetic_scene(320, 240, seed=i), "JPEG") for i in range(3)]
        for i, data in enumerate(images):
            s3.put_object(Bucket="frames", Key=f"set/img_{i}.jpg", Body=data)
        settings = make_settings(
            tmp_path,
            models=[],
            data_dir=tmp_path / "data",
            storage_profiles={"moto": moto.profile(["frames"])},
        )
        registry, detect = load_job_models(settings, fall, "mobile_sam")
        assert detect is not None
        outputs = {}
        for name in ("local", "ray"):
            spec = JobSpec.model_validate(
                {
                    "source": {"directory": "s3://frames/set/"},
                    "detector": fall,
                    "params": {"conf": 0.05, "imgsz": 320},
                    "sam_refine": "mobile_sam",
                    "batch_size": 2,
                    "output": {"format": "coco", "directory": f"s3://frames/out-{name}/"},
                    "engine": name,
                }
            )
            status, rows = run_job(spec, registry.detector, detect.refine_for_job, settings, tmp_path)
            assert (status.state, status.done, status.failed) == ("completed", 5, 0), status
            listing = s3.list_objects_v2(Bucket="frames", Prefix=f"out-{name}/")["Contents"]
            files = {
                o["Key"].removeprefix(f"out-{name}/"): s3.get_object(Bucket="frames", Key=o["Key"])[
                    "Body"
                ].read()
                for o in listing
            }
            outputs[name] = (rows, files)
    (local_rows, local_files), (ray_rows, ray_files) = outputs["local"], outputs["ray"]
    assert ray_rows == local_rows
    assert sum(r[5].count('"kind":"mask"') for r in local_rows) > 0  # SAM refined some boxes into masks
    assert ray_files == local_files and local_files


@pytest.mark.parametrize(
    ("source_kind", "fmt"), [("directory", "yolo"), ("paths", "cvat_images"), ("manifest", "coco")]
)
def test_local_sources_and_file_formats_on_ray_equal_the_local_engines(
    cluster: str, tmp_path: Path, source_kind: str, fmt: str
) -> None:
    """The sources and formats the s3:// test above does not take: a local folder, a list of paths, a CVAT
    manifest.jsonl beside its images; YOLO, CVAT XML and COCO files. Same bytes from both engines."""

    from .test_s3_sources import manifest_text

    fall = str(fall_checkpoint())
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    names = ["bus.jpg", "sub/zidane.jpg", "scene.jpg"]
    (images / names[0]).write_bytes(ultralytics_asset("bus.jpg").read_bytes())
    (images / names[1]).write_bytes(ultralytics_asset("zidane.jpg").read_bytes())
    (images / names[2]).write_bytes(encode_image(synthetic_scene(320, 240, seed=3), "JPEG"))
    (images / "manifest.jsonl").write_text(manifest_text(names))
    source = {
        "directory": {"directory": str(images)},
        "paths": {"paths": [str(images / name) for name in names]},
        "manifest": {"manifest": str(images / "manifest.jsonl")},
    }[source_kind]
    settings = make_settings(tmp_path, models=[], data_dir=tmp_path / "data")
    registry, _ = load_job_models(settings, fall, None)
    outputs = {}
    for name in ("local", "ray"):
        out = tmp_path / f"out-{name}"
        spec = JobSpec.model_validate(
            {"source": source, "detector": fall, "params": {"conf": 0.05, "imgsz": 320}, "batch_size": 2,
             "output": {"format": fmt, "directory": str(out)}, "engine": name}
        )  # fmt: skip
        status, _ = run_job(spec, registry.detector, None, settings, tmp_path)
        assert (status.state, status.done, status.failed) == ("completed", 3, 0), status
        outputs[name] = {
            str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()
        }
    assert outputs["ray"] == outputs["local"] and outputs["local"]


def test_a_video_job_on_ray_writes_the_local_engines_tracks(cluster: str, tmp_path: Path) -> None:
    """A video's frames are decoded and tracked on the driver, detected on a Ray actor: the same CVAT for
    video file, byte for byte, as the local engine's."""
    from server.scale.batch import RayBatchEngine

    from .video_helpers import bus_pan

    video = tmp_path / "pan.mp4"
    bus_pan(frames=20).write(video)
    fall = str(fall_checkpoint())
    settings = make_settings(tmp_path, models=[], data_dir=tmp_path / "data")
    registry, _ = load_job_models(settings, fall, None)
    found = {}
    for name in ("local", "ray"):
        engine = LocalEngine(
            registry.detector,
            state_db=tmp_path / f"{name}.sqlite3",
            settings=settings,
            readers=0,
            ray=RayBatchEngine(settings) if name == "ray" else None,
        )
        output = {"format": "cvat_video", "directory": str(tmp_path / name)}
        body = {"source": {"video": str(video)}, "detector": fall, "params": {"imgsz": 320}, "batch_size": 4,
                "output": output, "engine": name}  # fmt: skip
        try:
            status = wait_for(engine, engine.submit(JobSpec.model_validate(body)).id, timeout=120)
        finally:
            engine.close()
        assert (status.state, status.done) == ("completed", 20), status
        found[name] = (tmp_path / name / "annotations.xml").read_bytes()
    assert found["ray"] == found["local"] and b"<track" in found["local"]


def test_a_cvat_task_job_on_ray_reads_its_frames_and_uploads_what_the_local_engine_does(
    cluster: str, tmp_path: Path
) -> None:
    """A CVAT task as source (its frames read by the actors, logging in with the job's inline credentials,
    which reach them apart from the redacted spec) and as output (uploaded by the driver), on the loopback
    CVAT emulation: the same annotations in the task and the same COCO bytes as the local engine's job on an
    identical task, each frame read once."""
    from server.scale.batch import RayBatchEngine

    from .cvat_emulator import CvatEmulator
    from .jobs_helpers import encode_png, make_scene
    from .test_cvat_task import stored

    frames = [(f"frames/f{i}.png", encode_png(make_scene(i)[0])) for i in range(6)]
    labels = [{"name": "red"}, {"name": "green"}, {"name": "blue"}]
    settings = make_settings(tmp_path, data_dir=tmp_path / "data", cvat_upload_chunk=3, cvat_timeout_s=10)
    found = {}
    with CvatEmulator(token="good-token") as cvat:
        for name in ("local", "ray"):
            task = cvat.add_task(labels, frames, deleted={4})
            source = {"url": cvat.url, "task_id": task.id, "username": "alice", "password": "wonderland"}
            output = {"format": "coco", "directory": str(tmp_path / name), "cvat_task": {}}
            body = {"source": {"cvat_task": source}, "detector": "rects", "batch_size": 2, "engine": name,
                    "output": output}  # fmt: skip
            engine = LocalEngine(
                lambda _: RectDetector(),
                state_db=tmp_path / f"{name}.sqlite3",
                settings=settings,
                ray=RayBatchEngine(settings, rect_models) if name == "ray" else None,
            )
            reads_before = len(cvat.calls("GET", "/data/"))
            try:
                status = wait_for(engine, engine.submit(JobSpec.model_validate(body)).id, timeout=120)
            finally:
                engine.close()
            assert (status.state, status.done) == ("completed", 5), status
            reads = [r for r in cvat.calls("GET", "/data/")[reads_before:] if "number" in r.query]
            assert sorted(int(r.query["number"][0]) for r in reads) == [0, 1, 2, 3, 5], name
            found[name] = (stored(task), (tmp_path / name / "annotations.json").read_bytes())
    assert found["ray"] == found["local"] and found["local"][0]


def kill_when_done(db: Path, at_least: int, kill: object, deadline_s: float = 120) -> int:
    deadline = time.monotonic() + deadline_s
    with sqlite3.connect(db) as reader:
        while True:
            try:
                row = reader.execute("SELECT done FROM jobs").fetchone()
            except sqlite3.OperationalError:  # the driver is still creating the ledger
                row = None
            if row is not None and row[0] >= at_least:
                kill()  # type: ignore[operator]
                return row[0]
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)


def test_a_killed_actor_loses_and_duplicates_nothing_and_progress_is_reported(
    cluster: str, tmp_path: Path
) -> None:
    """SIGKILL the actor after the first batch is committed: Ray restarts it and retries its batch, the job
    completes with every item done once in the ledger, and the output equals the local engine's. Progress on
    GET /v1/jobs/{id} rises through the batches, as for a local job."""
    from server.scale.batch import RayBatchEngine

    images = tmp_path / "images"
    write_dataset(images, 16)
    settings = make_settings(tmp_path, data_dir=tmp_path / "data")
    engine = LocalEngine(
        lambda _: RectDetector(),
        state_db=tmp_path / "ray.sqlite3",
        settings=settings,
        ray=RayBatchEngine(settings, rect_models),
    )
    pids = settings.data_dir / "actor-pids"
    seen: list[int] = []
    try:
        with jobs_client(engine) as client:
            body = job_body({"directory": str(images)}, tmp_path / "ray", detector="rects-slow", batch_size=2,
                            engine="ray")  # fmt: skip
            reply = client.post("/v1/jobs", json=body)
            assert reply.status_code in (200, 201, 202), reply.text
            job_id = reply.json()["id"]
            killed = False
            deadline = time.monotonic() + 150
            while True:
                status = client.get(f"/v1/jobs/{job_id}").json()
                seen.append(status["done"])
                if not killed and status["done"] >= 2:
                    os.kill(int(pids.read_text().split()[-1]), signal.SIGKILL)
                    killed = True
                if status["state"] != "running" and status["state"] != "queued":
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
    finally:
        engine.close()
    assert status["state"] == "completed" and (status["done"], status["failed"]) == (16, 0), status
    assert len(pids.read_text().split()) >= 2, "the killed actor was not restarted"
    assert seen == sorted(seen) and any(0 < done < 16 for done in seen)  # progress, batch by batch
    with sqlite3.connect(tmp_path / "ray.sqlite3") as db:
        assert db.execute("SELECT done, failed, total FROM jobs").fetchone() == (16, 0, 16)
        statuses = db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall()
        assert statuses == [("done", 16)]
    calls = [int(line) for line in (settings.data_dir / "calls.log").read_text().split()]
    assert set(calls) == set(range(16))  # at least once (a retried batch may appear twice)

    local = LocalEngine(lambda _: RectDetector(), state_db=tmp_path / "local.sqlite3", settings=settings)
    try:
        body = job_body({"directory": str(images)}, tmp_path / "local", detector="rects-slow", batch_size=2)
        assert wait_for(local, local.submit(JobSpec.model_validate(body)).id).state == "completed"
    finally:
        local.close()
    coco = "instances_default.json"
    found = sorted(p.name for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert found, "no output"
    for name in found:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert coco in found or found


def test_an_actor_that_cannot_load_its_model_fails_the_job_clearly(cluster: str, tmp_path: Path) -> None:
    """The driver has the model but the workers do not: the job fails with the reason, its items pending
    (a resume retries them), instead of hanging or dying as an internal error."""
    from server.scale.batch import RayBatchEngine

    write_dataset(tmp_path / "images", 4)
    settings = make_settings(tmp_path, data_dir=tmp_path / "data")
    engine = LocalEngine(
        lambda _: RectDetector(), state_db=tmp_path / "j.sqlite3", ray=RayBatchEngine(settings, rect_models)
    )
    try:
        body = job_body({"directory": str(tmp_path / "images")}, tmp_path / "out", detector="rects-missing",
                        engine="ray")  # fmt: skip
        status = wait_for(engine, engine.submit(JobSpec.model_validate(body)).id, timeout=120)
    finally:
        engine.close()
    assert (status.state, status.done, status.failed) == ("failed", 0, 0), status
    assert status.error and status.error.startswith("the Ray job failed") and "rects-missing" in status.error


def test_a_killed_driver_resumes_from_the_ledger_into_identical_output(cluster: str, tmp_path: Path) -> None:
    """`labelserve prelabel --engine ray` joins the cluster from its own process and is SIGKILLed mid-job;
    the same command again resumes the job from the ledger (the same job, nothing redone) and writes the
    bytes an uninterrupted local run writes."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        (images / f"frame_{i:03d}.jpg").write_bytes(encode_image(synthetic_scene(480, 360, seed=i), "JPEG"))
    fall = str(fall_checkpoint())
    common = [str(images), "--model", fall, "--conf", "0.05", "--imgsz", "480", "--format", "cvat_images",
              "--batch-size", "2", "--no-progress"]  # fmt: skip
    out = tmp_path / "ray"
    env = {**os.environ, "LABELSERVE_RAY_ADDRESS": cluster, "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
           "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"), "LABELSERVE_MODELS": ""}  # fmt: skip
    command = [sys.executable, "-m", "server.cli", "prelabel", *common, "--out", str(out), "--engine", "ray"]
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / cli.STATE_DB_NAME
    try:
        deadline = time.monotonic() + 120
        while not db.exists():
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done_at_kill = kill_when_done(db, 2, lambda: os.kill(driver.pid, signal.SIGKILL))
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
    with sqlite3.connect(db) as reader:
        state, done = reader.execute("SELECT state, done FROM jobs").fetchone()
    assert state == "running" and 2 <= done < 24, (state, done, done_at_kill)  # it died mid-job

    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming job" in rerun.stderr
    with sqlite3.connect(db) as reader:
        assert reader.execute("SELECT state, done, failed, total FROM jobs").fetchall() == [
            ("completed", 24, 0, 24)
        ]

    straight = tmp_path / "local"
    args = build_parser().parse_args(["prelabel", *common, "--out", str(straight)])
    assert args.func(args) == 0
    xml = (out / "annotations.xml").read_bytes()
    assert xml == (straight / "annotations.xml").read_bytes() and b"<box" in xml


def test_the_rayjob_manifest_runs_labelserve_prelabel_on_ray(tmp_path: Path) -> None:
    """deploy/kuberay/rayjob.yaml: a RayJob of this Ray version whose entrypoint is a valid `labelserve
    prelabel --engine ray` command, whose runtime env passes Ray's RuntimeEnv and whose variables are
    labelserve settings."""
    from ray.runtime_env import RuntimeEnv

    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["labelserve", "prelabel"]
    args = build_parser().parse_args(argv[1:])
    spec = cli.build_spec(args)
    assert spec.engine == "ray" and spec.source.directory == "s3://frames/batch-0042/"
    assert args.state_db == Path("/ledger/prelabel-jobs.sqlite3")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "/ledger" in mounts  # the ledger outlives the cluster
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    names = {
        name.removeprefix("LABELSERVE_").lower(): value for name, value in runtime_env["env_vars"].items()
    }
    names |= {
        e["name"].removeprefix("LABELSERVE_").lower(): e.get("value", "{}")
        for e in head["containers"][0]["env"]
    }
    assert set(names) <= set(Settings.model_fields), set(names) - set(Settings.model_fields)
    Settings(**{k: v for k, v in names.items() if k != "storage_profiles"})
