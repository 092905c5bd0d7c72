"""A sample job's picks as a new CVAT task (issue #16, part 2): made through the real cvat-sdk against the
CVAT emulation from the CVAT cloud storage of the pool's bucket (moto's S3 on loopback), with the picked
keys in rank order, the storage's manifest and `sorting_method: predefined`; no image bytes go to CVAT."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.cli import prelabel as cli
from server.errors import ApiError
from server.jobs.engine import LocalEngine
from server.jobs.sample_job import write_sample
from server.jobs.spec import JobSpec
from server.settings import Settings
from tests.cvat_emulator import CvatEmulator
from tests.jobs_helpers import RectDetector, encode_png, wait_for
from tests.s3_helpers import MotoS3, moto_s3
from tests.test_sampling import colour_embedding

BUCKET = "pool-bucket"
TOKEN = "good-token"
LOOKS = 6


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def cvat() -> Iterator[CvatEmulator]:
    with CvatEmulator(token=TOKEN) as emulator:
        yield emulator


def pool(moto: MotoS3, tmp_path: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """24 images of 6 looks under s3://BUCKET/pool/ and a CVAT manifest listing them at the bucket's root."""
    rng = np.random.default_rng(0)
    looks = rng.integers(0, 256, (LOOKS, 3))
    objects, look_of = {}, {}
    s3 = moto.client()
    for i in range(4 * LOOKS):
        image = np.clip(looks[i % LOOKS] + rng.normal(0, 6, (40, 50, 3)), 0, 255).astype(np.uint8)
        key = f"pool/p_{i:03d}.png"
        objects[key] = encode_png(image)
        look_of[key] = i % LOOKS
        s3.put_object(Bucket=BUCKET, Key=key, Body=objects[key])
    lines = ['{"version":"1.1"}', '{"type":"images"}']
    lines += [json.dumps({"name": k.removesuffix(".png"), "extension": ".png"}) for k in objects]
    s3.put_object(Bucket=BUCKET, Key="manifest.jsonl", Body="\n".join(lines).encode())
    (tmp_path / "local").mkdir()
    for key, data in objects.items():
        (tmp_path / "local" / Path(key).name).write_bytes(data)
    return objects, look_of


def engine_for(moto: MotoS3, tmp_path: Path) -> LocalEngine:
    detector = RectDetector("detect")
    settings = Settings(
        storage_profiles={"b2": moto.profile([BUCKET])}, data_dir=tmp_path / "data", cvat_timeout_s=10
    )
    return LocalEngine(
        lambda _: detector,
        embed=colour_embedding,
        check_refine=lambda n: {"sam_x": 1}[n],
        state_db=tmp_path / "jobs.sqlite3",
        settings=settings,
        readers=0,
    )


def spec(tmp_path: Path, source: dict[str, Any], new_task: dict[str, Any], budget: int = LOOKS) -> JobSpec:
    return JobSpec.model_validate(
        {"source": source, "detector": "rects",
         "sample": {"budget": budget, "embeddings": "sam_x", "prefilter": 0, "cvat_task": new_task},
         "output": {"format": "ranking", "directory": str(tmp_path / "next")}}
    )  # fmt: skip


def test_the_picks_become_a_cvat_task_in_rank_order_without_copying_images(
    moto: MotoS3, cvat: CvatEmulator, tmp_path: Path
) -> None:
    objects, look_of = pool(moto, tmp_path)
    storage = cvat.add_cloud_storage(
        BUCKET, endpoint_url=moto.endpoint, manifests=["manifest.jsonl"], objects=objects
    )
    new_task = {
        "url": cvat.url, "token": TOKEN, "name": "annotate next", "cloud_storage_id": storage,
        "labels": [{"name": "thing", "type": "rectangle"}], "segment_size": 4,
    }  # fmt: skip
    engine = engine_for(moto, tmp_path)
    try:
        job = engine.submit(spec(tmp_path, {"directory": f"s3://{BUCKET}/pool/"}, new_task))
        status = wait_for(engine, job.id)
        assert status.state == "completed", status.error
        ranking = json.loads((tmp_path / "next" / "ranking.json").read_text())
        picked = [f"pool/{row['image']}" for row in ranking["images"]]
        assert {look_of[key] for key in picked} == set(range(LOOKS))  # one image of every look

        created = [t for t in cvat.tasks.values() if t.name == "annotate next"]
        assert len(created) == 1
        task = created[0]
        page = f"{cvat.url}/tasks/{task.id}"
        assert status.outputs[-1] == page and ranking["summary"]["cvat_task"] == page
        request = task.data_request
        assert request is not None
        assert request["server_files"] == [*picked, "manifest.jsonl"]  # rank order, then the manifest
        assert request["sorting_method"] == "predefined" and request["cloud_storage_id"] == storage
        assert request["use_cache"] is True and not request.get("client_files")
        # No image bytes went to CVAT: its only data request is that JSON, far smaller than one image.
        data_calls = cvat.calls("POST", "/data/")
        assert len(data_calls) == 1 and data_calls[0].body == request
        assert len(json.dumps(request)) < min(len(v) for v in objects.values())
        assert not cvat.calls("PUT") and not cvat.calls("PATCH")
        assert [f.name for f in task.frames] == picked and task.cloud_storage_id == storage
        assert [(j.start_frame, j.stop_frame) for j in task.jobs] == [(0, 3), (4, 5)]
        assert [label["name"] for label in task.labels] == ["thing"]

        # Writing the outputs again (a job resumed after making the task) makes no second task.
        job_spec = spec(tmp_path, {"directory": f"s3://{BUCKET}/pool/"}, new_task)
        again = write_sample(
            engine.store, job.id, job_spec.with_secrets(job_spec.secrets()), engine._settings
        )
        assert again == page and len(cvat.calls("POST", "/api/tasks")) == 2  # the task, and its data
    finally:
        engine.close()


def test_bad_new_task_requests_are_refused_before_anything_runs(
    moto: MotoS3, cvat: CvatEmulator, tmp_path: Path
) -> None:
    objects, _ = pool(moto, tmp_path)
    storage = cvat.add_cloud_storage(
        BUCKET, endpoint_url=moto.endpoint, manifests=["manifest.jsonl"], objects=objects
    )
    other = cvat.add_cloud_storage("elsewhere", endpoint_url=moto.endpoint, manifests=["manifest.jsonl"])
    bare = cvat.add_cloud_storage(BUCKET, endpoint_url=moto.endpoint, manifests=[])
    base = {"url": cvat.url, "token": TOKEN, "name": "next", "labels": [{"name": "thing"}]}
    s3_pool = {"directory": f"s3://{BUCKET}/pool/"}
    engine = engine_for(moto, tmp_path)

    def refused(source: dict[str, Any], **new_task: Any) -> tuple[int, str, str]:
        with pytest.raises(ApiError) as caught:
            engine.submit(spec(tmp_path, source, base | new_task))
        return caught.value.status, caught.value.code, caught.value.message

    try:
        status, code, message = refused({"directory": str(tmp_path / "local")}, cloud_storage_id=storage)
        assert (status, code) == (
            400,
            "pool_not_in_cloud_storage",
        ) and "put a local pool in the bucket" in message
        assert refused(s3_pool, cloud_storage_id=other)[:2] == (400, "wrong_bucket")
        assert refused(s3_pool, cloud_storage_id=bare)[:2] == (400, "manifest_not_attached")
        assert refused(s3_pool, cloud_storage_id=storage, manifest="other.jsonl")[:2] == (
            400,
            "manifest_not_attached",
        )
        assert refused(s3_pool, cloud_storage_id=999)[:2] == (400, "cvat_cloud_storage_not_found")
        assert refused(s3_pool)[:2] == (422, "cloud_storage_required")
        assert refused(s3_pool, cloud_storage_id=storage, token="bad")[:2] == (400, "cvat_auth_failed")
        assert engine.list() == [] and not cvat.calls("POST", "/api/tasks")
    finally:
        engine.close()
    with pytest.raises(ValueError, match="labels, or a project_id"):
        spec(tmp_path, s3_pool, base | {"cloud_storage_id": storage, "project_id": 3})


def test_a_cvat_task_pool_in_a_cloud_storage_gives_a_task_of_its_picked_frames(
    cvat: CvatEmulator, tmp_path: Path
) -> None:
    """The pool is a CVAT task whose data are in a cloud storage: its frame names are the objects' keys, and
    the new task takes the picked ones from the same storage (cloud_storage_id may be left out)."""
    rng = np.random.default_rng(3)
    looks = rng.integers(0, 256, (LOOKS, 3))
    objects, look_of = {}, {}
    for i in range(3 * LOOKS):
        image = np.clip(looks[i % LOOKS] + rng.normal(0, 6, (30, 40, 3)), 0, 255).astype(np.uint8)
        key = f"frames/f_{i:03d}.png"
        objects[key], look_of[key] = encode_png(image), i % LOOKS
    storage = cvat.add_cloud_storage(
        BUCKET, endpoint_url="http://127.0.0.1:9", manifests=["frames/manifest.jsonl"], objects=objects
    )
    pool_task = cvat.add_task([{"name": "thing"}], list(objects.items()), cloud_storage_id=storage)
    local = cvat.add_task([{"name": "thing"}], list(objects.items()))
    detector = RectDetector("detect")
    engine = LocalEngine(
        lambda _: detector, embed=colour_embedding, check_refine=lambda n: {"sam_x": 1}[n],
        state_db=tmp_path / "jobs.sqlite3", settings=Settings(data_dir=tmp_path / "data", cvat_timeout_s=10),
        readers=0,
    )  # fmt: skip
    connection = {"url": cvat.url, "token": TOKEN}
    new_task = connection | {"name": "from the task", "project_id": cvat.add_project("next")}
    try:
        job = engine.submit(spec(tmp_path, {"cvat_task": connection | {"task_id": pool_task.id}}, new_task))
        status = wait_for(engine, job.id)
        assert status.state == "completed", status.error
        ranking = json.loads((tmp_path / "next" / "ranking.json").read_text())
        picked = [row["image"] for row in ranking["images"]]
        assert {look_of[key] for key in picked} == set(range(LOOKS))
        (task,) = [t for t in cvat.tasks.values() if t.name == "from the task"]
        assert task.data_request is not None and task.project_id is not None
        assert task.data_request["server_files"] == [*picked, "frames/manifest.jsonl"]
        assert task.data_request["cloud_storage_id"] == storage
        assert [f.name for f in task.frames] == picked

        with pytest.raises(ApiError) as local_pool:
            engine.submit(spec(tmp_path, {"cvat_task": connection | {"task_id": local.id}}, new_task))
        assert (local_pool.value.status, local_pool.value.code) == (400, "pool_not_in_cloud_storage")
        with pytest.raises(ApiError) as other:
            engine.submit(
                spec(tmp_path, {"cvat_task": connection | {"task_id": pool_task.id}},
                     new_task | {"cloud_storage_id": storage + 100})
            )  # fmt: skip
        assert (other.value.status, other.value.code) == (400, "wrong_cloud_storage")
    finally:
        engine.close()


def test_the_cli_flags_describe_the_same_new_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`labelserve prelabel --sample … --new-task NAME …` builds the spec the API test above runs."""
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", TOKEN)
    parser = argparse.ArgumentParser()
    cli.add_prelabel_command(parser.add_subparsers(), lambda model, sam: ({}.__getitem__, None))
    argv = ["prelabel", f"s3://{BUCKET}/pool/", "--model", "rects", "--out", str(tmp_path / "next"),
            "--sample", str(LOOKS), "--sample-embeddings", "sam_x", "--prefilter", "0",
            "--new-task", "annotate next", "--new-task-server", "https://cvat.example.com",
            "--new-task-labels", "thing:rectangle,other", "--new-task-cloud-storage", "7",
            "--new-task-segment-size", "4"]  # fmt: skip
    built = cli.build_spec(parser.parse_args(argv))
    new_task = {
        "url": "https://cvat.example.com", "token": TOKEN, "name": "annotate next", "cloud_storage_id": 7,
        "labels": [{"name": "thing", "type": "rectangle"}, {"name": "other"}], "segment_size": 4,
    }  # fmt: skip
    expected = spec(tmp_path, {"directory": f"s3://{BUCKET}/pool/"}, new_task)
    assert built.sample == expected.sample and built.output == expected.output
    assert built.sample is not None and built.sample.cvat_task is not None
    assert built.sample.cvat_task.token is not None  # the environment's credentials reached the spec

    orphan = [*argv[: argv.index("--new-task")], "--new-task-project", "3"]
    with pytest.raises(ValueError, match="--new-task NAME"):
        cli.build_spec(parser.parse_args(orphan))
    no_server = [a for a in argv if a not in ("--new-task-server", "https://cvat.example.com")]
    with pytest.raises(ValueError, match="--new-task-server"):
        cli.build_spec(parser.parse_args(no_server))
