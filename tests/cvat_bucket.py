"""A CVAT task whose data lives in an S3 bucket, served by a `labelserve serve` process: moto's S3 on loopback
holds the frames and a CVAT manifest.jsonl, the CVAT emulator holds a project whose task uses that bucket as
its cloud storage, and a webhook from the project to the server is registered with `labelserve cvat webhook
register`, as an operator does. Used by tests/test_cvat_warmup.py and bench/bench_annotator.py."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.cli import main as labelserve

from .cvat_emulator import CvatEmulator, EmulatedTask
from .s3_helpers import moto_s3
from .server_process import ServerProcess

BUCKET = "cvat-data"
PROFILE = "cvat"
SECRET = "webhook-secret"


@dataclass
class CvatBucket:
    cvat: CvatEmulator
    server: ServerProcess
    task: EmulatedTask
    frames: list[bytes]  # the objects' (and CVAT's original frames') bytes, in frame order
    webhook_id: int | None

    @property
    def http(self) -> httpx.Client:
        return self.server.http

    def nuclio_click(
        self, frame: int, points: list[list[float]], model: str = "mobile_sam"
    ) -> httpx.Response:
        """CVAT's interactor call for a frame: its original bytes in base64, as CVAT sends them."""
        body = {"image": base64.b64encode(self.frames[frame]).decode(), "pos_points": points,
                "neg_points": [], "obj_bbox": []}  # fmt: skip
        function = f"labelserve-{model.replace('_', '-')}"
        return self.http.post("/api/function_invocations", json=body,
                              headers={"x-nuclio-function-name": function})  # fmt: skip


@contextlib.contextmanager
def cvat_bucket(
    frames: list[bytes],
    segment_size: int,
    *,
    webhook: bool = True,
    model: str = "mobile_sam",
    extra_profiles: dict | None = None,
    env: dict[str, str] | None = None,
    tmp: Path | None = None,
) -> Iterator[CvatBucket]:
    tmp = tmp or Path(tempfile.mkdtemp(prefix="labelserve-cvat-bucket-"))
    keys = [f"data/{i:06d}.jpg" for i in range(len(frames))]
    with moto_s3() as moto, CvatEmulator() as cvat:
        moto.create_bucket(BUCKET)
        s3 = moto.client()
        for key, data in zip(keys, frames, strict=True):
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        lines = ['{"version":"1.1"}', '{"type":"images"}']
        lines += [json.dumps({"name": k.removesuffix(".jpg"), "extension": ".jpg"}) for k in keys]
        s3.put_object(Bucket=BUCKET, Key="manifest.jsonl", Body="\n".join(lines).encode())
        storage = cvat.add_cloud_storage(BUCKET, endpoint_url=moto.endpoint, manifests=["manifest.jsonl"])
        project = cvat.add_project("warm")
        task = cvat.add_task([{"name": "thing"}], list(zip(keys, frames, strict=True)), project_id=project,
                             segment_size=segment_size, cloud_storage_id=storage)  # fmt: skip
        profiles = {PROFILE: {"url": cvat.url, "token": cvat.token, "webhook_secret": SECRET},
                    **(extra_profiles or {})}  # fmt: skip
        server_env = {
            "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
            "LABELSERVE_DATA_DIR": str(tmp / "data"),
            "LABELSERVE_MODELS": model,
            "LABELSERVE_STORAGE_PROFILES": json.dumps({"b2": moto.profile([BUCKET], moto.reader)}),
            "LABELSERVE_CVAT_PROFILES": json.dumps(profiles),
            **(env or {}),
        }
        with ServerProcess(server_env, tmp / "server.log", random_init=True, timeout=300) as server:
            webhook_id = register(cvat, server.url, project) if webhook else None
            yield CvatBucket(cvat, server, task, frames, webhook_id)


def register(cvat: CvatEmulator, url: str, project: int) -> int:
    """`labelserve cvat webhook register`, run as an operator runs it; the webhook's id from its stdout."""
    profiles = {PROFILE: {"url": cvat.url, "token": cvat.token, "webhook_secret": SECRET}}
    saved = os.environ.get("LABELSERVE_CVAT_PROFILES")
    os.environ["LABELSERVE_CVAT_PROFILES"] = json.dumps(profiles)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = labelserve(["cvat", "webhook", "register", "--profile", PROFILE, "--project", str(project),
                               "--target-url", url])  # fmt: skip
    finally:
        if saved is None:
            del os.environ["LABELSERVE_CVAT_PROFILES"]
        else:
            os.environ["LABELSERVE_CVAT_PROFILES"] = saved
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())["id"]
