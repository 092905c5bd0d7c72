"""The web console (docs/console.md) in a real browser: Debian's chromium driven by Playwright, against a real
`labelserve serve --random-init` on loopback (MobileSAM and the tests' small SAM 3 with seeded random weights,
the real person detector).

What the page shows is checked against what the API answers for the same request: the mask overlay's pixels
against the API's mask, the boxes drawn against the API's shapes. Screenshots of each screen go to
build/test-artifacts/console/."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cvat_sdk import models as cvat_models
from cvat_sdk.core.client import AccessTokenCredentials, Client
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from PIL import Image

from models.sam3 import TINY_CONFIG, sam3_config
from server.api.auth import hash_key, new_key
from server.formats.rle import cvat_rle_decode

from .conftest import encode_image, fall_checkpoint, ultralytics_asset
from .cvat_emulator import CvatEmulator
from .server_process import ROOT, ServerProcess
from .synthetic_video import SyntheticVideo, box_iou

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")

ARTIFACTS = ROOT / "build" / "test-artifacts" / "console"
WAIT_MS = 60_000  # the longest wait for one thing on the page: a MobileSAM encode on a busy 2-core host
MASK_ALPHA = 120  # stage.js: the overlay's alpha on mask pixels


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("console")
    sam3_config(TINY_CONFIG).save_pretrained(tmp / "weights" / "sam3")  # the tests' small SAM 3
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_MODELS": "mobile_sam,sam3",
        "LABELSERVE_DETECTOR_PATHS": json.dumps({"fall": str(fall_checkpoint())}),
        "LABELSERVE_URL_ALLOW_HOSTS": "127.0.0.1",  # the tests' own file server (file_server)
    }
    with ServerProcess(env, tmp / "server.log", random_init=True) as process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


class Console:
    """A page of the console, recording console errors, uncaught exceptions and every API call it makes."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 720})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.calls: list[tuple[str, str, int]] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("response", self._response)
        self.page.goto(url)

    def _response(self, response) -> None:
        path = response.url.split("//", 1)[1].partition("/")[2]
        self.calls.append((response.request.method, "/" + path, response.status))

    def wait_for(self, predicate: str, arg: object = None) -> object:
        # A function, not a string: the page's Content-Security-Policy forbids eval.
        return self.page.wait_for_function(predicate, arg=arg).json_value()

    def tab(self, name: str) -> None:
        self.page.click(f"#tab-button-{name}")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def models_listed(self) -> None:
        self.page.wait_for_selector("#try-model option:not([disabled])", state="attached")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser, server: ServerProcess) -> Iterator[Console]:
    page = Console(browser, server.url + "/")
    yield page
    page.close()


@contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """An http:// server of `directory` on loopback; yields its base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def scene(width: int, height: int) -> np.ndarray:
    """Smooth shading with a bright disc and a dark rectangle: compresses well at 4000x3000."""
    yy, xx = np.mgrid[:height, :width]
    shading = [xx * 200 // width, yy * 200 // height, np.full_like(xx, 90)]
    image = np.stack(shading, axis=-1).astype(np.uint8)
    disc = (xx - width * 0.3) ** 2 + (yy - height * 0.5) ** 2 < (min(width, height) * 0.2) ** 2
    image[disc] = (230, 200, 40)
    image[int(height * 0.2) : int(height * 0.6), int(width * 0.6) : int(width * 0.85)] = (20, 30, 160)
    return image


def test_serve_prints_the_console_url_and_the_page_loads_every_screen_with_no_console_errors(
    console: Console, server: ServerProcess
) -> None:
    assert f"web console: {server.url}/ " in server.log.read_text()
    console.models_listed()
    assert console.page.title() == "labelserve console"
    for name in ("jobs", "models", "server", "track", "try"):
        console.tab(name)
        console.page.wait_for_selector(f"#tab-{name}", state="visible")
        if name == "models":
            console.page.wait_for_selector("#models-table tr[data-model='mobile_sam'] .weights-random-init")
            console.page.wait_for_selector("#models-table tr[data-model='fall'] .weights-checkpoint")
        if name == "server":
            console.page.wait_for_selector("#stats [data-tier]")
        console.shot(f"screen-{name}")
    # The page asked the public API only, and nothing failed.
    asked = {path.partition("?")[0] for _, path, _ in console.calls if not path.startswith("/console/")}
    api = {"/v1/whoami", "/v1/models", "/v1/jobs", "/v1/prefetch", "/v1/cache/stats", "/v1/trackers"}
    assert asked <= {"/", "/readyz", *api}
    assert [call for call in console.calls if call[2] >= 400] == []
    assert console.errors == []


def test_a_click_on_a_4000x3000_image_shows_the_apis_mask_pixel_for_pixel(
    console: Console, server: ServerProcess, tmp_path: Path
) -> None:
    width, height = 4000, 3000
    photo = tmp_path / "scene.jpg"
    data = encode_image(scene(width, height), "JPEG", quality=90)
    photo.write_bytes(data)
    console.models_listed()
    console.page.select_option("#try-model", "mobile_sam")
    console.page.set_input_files("#try-file", str(photo))
    console.wait_for("() => document.querySelector('#try-embedding').textContent.startsWith('embedded')")
    shown = console.page.locator("#try-stage img").bounding_box()
    assert shown["width"] < 1280 and shown["height"] < 720  # a scaled view that fits the screen
    scale = width / shown["width"]
    target = (width * 0.3, height * 0.5)  # the disc's centre, in image pixels
    console.page.mouse.click(shown["x"] + target[0] / scale, shown["y"] + target[1] / scale)
    sent = json.loads(str(console.wait_for("() => document.querySelector('#try-stage').dataset.maskFor")))
    # The prompt went out in image pixels, within one screen pixel of the clicked point.
    (x, y), = sent["points"]  # fmt: skip
    assert abs(x - target[0]) <= scale and abs(y - target[1]) <= scale and sent["labels"] == [1]
    console.shot("try-sam-4000x3000")

    # The overlay canvas is in image pixels: read which of its pixels are painted.
    packed = console.page.evaluate(
        """(alpha) => {
            const canvas = document.querySelector('#try-stage canvas');
            const rgba = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            const bits = new Uint8Array(Math.ceil(rgba.length / 32));
            let odd = 0;  // alphas other than 0 and the mask's
            for (let i = 0, p = 3; p < rgba.length; i++, p += 4) {
                if (rgba[p]) bits[i >> 3] |= 128 >> (i & 7);
                if (rgba[p] && rgba[p] !== alpha) odd++;
            }
            let text = '';
            for (let i = 0; i < bits.length; i += 8192) {
                text += String.fromCharCode(...bits.subarray(i, i + 8192));
            }
            return {width: canvas.width, height: canvas.height, odd, bits: btoa(text)};
        }""",
        MASK_ALPHA,
    )  # fmt: skip
    assert (packed["width"], packed["height"]) == (width, height)
    assert packed["odd"] == 0
    overlay = np.unpackbits(np.frombuffer(base64.b64decode(packed["bits"]), np.uint8))[: width * height]
    overlay = overlay.reshape(height, width).astype(bool)

    # The API's mask for the same prompt, asked by a plain client.
    reply = server.http.post(
        "/v1/sam/mobile_sam/segment",
        json={"image": {"base64": base64.b64encode(data).decode()}, **sent, "refine": False},
    )
    assert reply.status_code == 200, reply.text
    best = reply.json()["masks"][0]
    expected = cvat_rle_decode(best["cvat"], width, height).to_full()
    assert 0 < expected.sum() < width * height  # a real mask, not an empty or a full one
    assert np.array_equal(overlay, expected)


def test_a_detector_run_draws_as_many_boxes_as_the_api_returns(
    console: Console, server: ServerProcess
) -> None:
    bus = ultralytics_asset("bus.jpg")
    console.models_listed()
    console.page.select_option("#try-model", "fall")
    console.page.set_input_files("#try-file", str(bus))
    counts = {}
    for conf in (0.25, 0.6):
        if conf != 0.25:
            console.page.locator("#try-conf").fill(str(conf))  # fires change: the page detects again
        console.wait_for("(c) => document.querySelector('#try-stage').dataset.detectConf === c", str(conf))
        drawn = console.page.locator("#try-stage .det-box").count()
        reply = server.http.post(
            "/v1/detect/fall", files={"file": bus.read_bytes()}, data={"params": json.dumps({"conf": conf})}
        )
        assert reply.status_code == 200, reply.text
        assert drawn == len([s for s in reply.json()["shapes"] if "box" in s])
        counts[conf] = drawn
        console.shot(f"try-detect-conf-{conf}")
    assert counts[0.25] > counts[0.6] > 0  # the slider changed what was drawn
    assert console.errors == []


def test_a_concept_query_draws_every_instance_the_api_returns(
    console: Console, server: ServerProcess
) -> None:
    bus = ultralytics_asset("bus.jpg")
    console.models_listed()
    console.page.select_option("#try-model", "sam3")
    console.page.fill("#try-phrases", "person, bus")
    console.page.locator("#try-score").fill("0.1")
    console.page.set_input_files("#try-file", str(bus))  # an opened image is queried at once
    sent = json.loads(str(console.wait_for("() => document.querySelector('#try-stage').dataset.conceptsFor")))
    assert sent["text"] == ["person", "bus"] and sent["score_threshold"] == 0.1
    reply = server.http.post(
        "/v1/concepts/sam3", files={"file": bus.read_bytes()}, data={"prompts": json.dumps(sent)}
    )
    assert reply.status_code == 200, reply.text
    instances = reply.json()["instances"]
    assert instances  # random weights still score some queries above 0.1: the check below is not 0 == 0
    boxes = console.page.locator("#try-stage .concept-box")
    assert boxes.count() == len(instances)
    drawn = [[float(boxes.nth(i).get_attribute(a)) for a in ("x", "y")] for i in range(boxes.count())]
    assert drawn == [pytest.approx(i["box"][:2]) for i in instances]  # where the API put them (image pixels)
    labels = console.page.locator("#try-stage .shape-label").all_text_contents()
    assert [label.split()[0] for label in labels] == [i["prompt"] for i in instances]
    console.shot("try-concepts")
    assert console.errors == []


def test_sam3_takes_clicks_and_find_all_like_this_draws_what_the_api_returns(
    console: Console, server: ServerProcess, tmp_path: Path
) -> None:
    """sam3 is a click model here too: a click shows its mask; "Find all like this" sends the clicks as the
    concept request's example and draws every instance the API returns for it, and the exemplar box."""
    width, height = 640, 480
    photo = tmp_path / "scene.png"
    data = encode_image(scene(width, height))
    photo.write_bytes(data)
    console.models_listed()
    assert "SAM" in console.page.locator("#try-model option[value='sam3']").inner_text()
    console.page.select_option("#try-model", "sam3")
    console.page.fill("#try-phrases", "")
    console.page.locator("#try-score").fill("0.1")
    console.page.set_input_files("#try-file", str(photo))
    console.wait_for("() => document.querySelector('#try-embedding').textContent.startsWith('embedded')")
    shown = console.page.locator("#try-stage img").bounding_box()
    scale = width / shown["width"]
    target = (width * 0.3, height * 0.5)  # the disc's centre
    console.page.mouse.click(shown["x"] + target[0] / scale, shown["y"] + target[1] / scale)
    console.wait_for("() => document.querySelector('#try-stage').dataset.maskFor")
    assert console.page.locator("#try-find-like").is_visible()
    console.page.click("#try-find-like")
    sent = json.loads(str(console.wait_for("() => document.querySelector('#try-stage').dataset.findLikeFor")))
    (x, y), = sent["example"]["points"]  # fmt: skip
    assert abs(x - target[0]) <= scale and abs(y - target[1]) <= scale and sent["example"]["labels"] == [1]
    assert sent["text"] == [] and sent["score_threshold"] == 0.1
    reply = server.http.post("/v1/concepts/sam3", files={"file": data}, data={"prompts": json.dumps(sent)})
    assert reply.status_code == 200, reply.text
    instances = reply.json()["instances"]
    assert instances  # random weights score every query about 0.25: above 0.1
    boxes = console.page.locator("#try-stage .concept-box")
    assert boxes.count() == len(instances)
    drawn = [[float(boxes.nth(i).get_attribute(a)) for a in ("x", "y")] for i in range(boxes.count())]
    assert drawn == [pytest.approx(i["box"][:2]) for i in instances]
    example = console.page.locator("#try-stage .example-box")
    assert [float(example.get_attribute(a)) for a in ("x", "y")] == pytest.approx(
        reply.json()["example"]["box"][:2]
    )
    console.shot("try-find-all-like-this")
    assert console.errors == []


def test_a_job_reaches_100_percent_and_a_cancelled_one_shows_cancelled(
    console: Console, tmp_path: Path
) -> None:
    small = Image.open(ultralytics_asset("bus.jpg")).resize((203, 270))
    few, many = tmp_path / "few", tmp_path / "many"
    for folder, count in ((few, 4), (many, 400)):
        folder.mkdir()
        for i in range(count):
            small.save(folder / f"{i:04d}.jpg", quality=80)
    console.models_listed()
    console.tab("jobs")
    console.page.wait_for_selector("#job-detector option[value='fall']", state="attached")

    def submit(source: Path, out: Path) -> str:
        console.page.fill("#job-source", str(source))
        console.page.select_option("#job-detector", "fall")
        console.page.select_option("#job-format", "coco")
        console.page.fill("#job-output", str(out))
        console.page.click("#job-form button[type=submit]")
        status = console.page.locator("#job-form-status")
        status.filter(has_text="job ").wait_for()
        return status.inner_text().split()[1]

    first = submit(few, tmp_path / "out-few")
    row = console.page.locator(f"li[data-job='{first}']")
    row.locator(".badge.completed").wait_for()
    assert row.locator(".progress").get_attribute("aria-valuenow") == "100"
    assert "4/4 done, 0 failed" in row.inner_text()
    assert (tmp_path / "out-few" / "annotations.json").exists()
    console.shot("jobs-completed")

    second = submit(many, tmp_path / "out-many")
    row = console.page.locator(f"li[data-job='{second}']")
    row.locator(".badge.running").wait_for()
    row.locator("button.cancel").click()
    row.locator(".badge.cancelled").wait_for()
    assert int(row.locator(".progress").get_attribute("aria-valuenow")) < 100
    assert row.locator("button.resume").is_visible()  # a cancelled job offers to resume
    console.shot("jobs-cancelled")
    assert console.errors == []


def test_a_prefetch_started_from_the_page_embeds_every_image_and_a_rerun_finds_them_cached(
    console: Console, server: ServerProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):  # three distinct images: three encodes
        Image.fromarray(np.full((120, 160, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    console.models_listed()
    console.tab("jobs")
    console.page.wait_for_selector("#prefetch-model option[value='mobile_sam']", state="attached")

    def start() -> str:
        console.page.select_option("#prefetch-model", "mobile_sam")
        console.page.fill("#prefetch-source", str(folder))
        console.page.click("#prefetch-form button[type=submit]")
        status = console.page.locator("#prefetch-form-status")
        status.filter(has_text="prefetch ").wait_for()
        run = status.inner_text().split()[1]
        row = console.page.locator(f"li[data-prefetch='{run}']")
        row.locator(".badge.completed").wait_for()
        assert "3/3 done, 0 failed" in row.inner_text()
        return run

    first = start()
    assert server.http.get(f"/v1/prefetch/{first}").json()["encoded"] == 3
    second = start()
    assert "3 already cached, 0 encoded" in console.page.locator(f"li[data-prefetch='{second}']").inner_text()
    console.shot("prefetch")
    assert console.errors == []


def test_a_review_job_from_the_form_writes_its_findings(console: Console, tmp_path: Path) -> None:
    """Format "findings" shows the review fields; the job scores a COCO file against the detector."""
    small = Image.open(ultralytics_asset("bus.jpg")).resize((405, 540))
    images = tmp_path / "images"
    images.mkdir()
    small.save(images / "bus.jpg", quality=90)
    coco = {"images": [{"id": 1, "file_name": "bus.jpg", "width": 405, "height": 540}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 40, 20]}],
            "categories": [{"id": 1, "name": "Normal"}]}  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    console.models_listed()
    console.tab("jobs")
    console.page.wait_for_selector("#job-detector option[value='fall']", state="attached")
    assert not console.page.locator("#job-annotations").is_visible()
    console.page.fill("#job-source", str(images))
    console.page.select_option("#job-detector", "fall")
    console.page.select_option("#job-format", "findings")
    console.page.fill("#job-annotations", str(tmp_path / "coco.json"))
    console.page.fill("#job-output", str(tmp_path / "review"))
    console.page.click("#job-form button[type=submit]")
    status = console.page.locator("#job-form-status")
    status.filter(has_text="job ").wait_for()
    findings_job = status.inner_text().split()[1]
    row = console.page.locator(f"li[data-job='{findings_job}']")
    row.locator(".badge.completed").wait_for()
    findings = json.loads((tmp_path / "review" / "findings.json").read_text())
    assert findings["summary"]["conf"] == 0.01  # the review's default, not the form's 0.25
    assert any(f["shape_id"] == "7" and f["kind"] == "spurious" for f in findings["findings"])

    # A sample job from the same form: format "ranking", the budget, and SAM refine's model as embeddings.
    for i in range(3):
        small.rotate(90 * i).save(images / f"bus_{i}.jpg", quality=90)
    assert not console.page.locator("#job-budget").is_visible()
    console.page.select_option("#job-format", "ranking")
    console.page.fill("#job-budget", "2")
    console.page.select_option("#job-refine", "mobile_sam")
    console.page.fill("#job-output", str(tmp_path / "next"))
    console.page.click("#job-form button[type=submit]")
    status.filter(has_text="job ").filter(has_not_text=findings_job).wait_for()
    row = console.page.locator(f"li[data-job='{status.inner_text().split()[1]}']")
    row.locator(".badge.completed").wait_for()
    ranking = json.loads((tmp_path / "next" / "ranking.json").read_text())
    assert [r["rank"] for r in ranking["images"]] == [1, 2] and ranking["summary"]["pool"] == 4
    assert console.errors == []


def test_the_corrections_report_shows_the_apis_counts_for_a_reviewed_cvat_task(
    console: Console, server: ServerProcess, tmp_path: Path
) -> None:
    """A task pre-labelled by a job of this server, then reviewed through cvat-sdk (an edit, a deletion, an
    added object): the page's table holds the API's numbers for the same request, and the constructed ones."""
    token = "good-token"
    small = Image.open(ultralytics_asset("bus.jpg")).resize((405, 540))
    images = tmp_path / "frames"
    images.mkdir()
    for i in range(2):
        small.save(images / f"{i}.jpg", quality=90)
    names = sorted(p.name for p in images.iterdir())
    with CvatEmulator(token=token) as cvat:
        task = cvat.add_task(
            [{"name": "Normal"}, {"name": "Fall"}], [(n, (images / n).read_bytes()) for n in names]
        )
        connection = {"url": cvat.url, "task_id": task.id, "token": token}
        spec = {"source": {"directory": str(images)}, "detector": "fall", "output": {"cvat_task": connection}}
        created = server.http.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while (job := server.http.get(f"/v1/jobs/{job_id}").json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["state"] == "completed", job

        # The review, by construction: the first pre-label moved (semi-auto), the second deleted, one object
        # added by hand on a label of its own.
        labels = {label["name"]: label["id"] for label in task.labels}
        names = {number: name for name, number in labels.items()}
        with Client(cvat.url, check_server_version=False) as client:
            client.login(AccessTokenCredentials(token))
            proxy = client.tasks.retrieve(task.id)
            shapes = sorted(proxy.get_annotations().shapes, key=lambda s: s.id)
            assert len(shapes) >= 3 and all(s.source == "auto" for s in shapes)
            uploaded = Counter(names[s.label_id] for s in shapes)
            edited = cvat_models.LabeledShapeRequest(**shapes[0].to_dict())
            edited.points = [shapes[0].points[0] + 3, *shapes[0].points[1:]]
            edited.source = "semi-auto"
            proxy.update_annotations(
                cvat_models.PatchedLabeledDataRequest(shapes=[edited]), action=AnnotationUpdateAction.UPDATE
            )
            proxy.remove_annotations(ids=[shapes[1].id])
            added = cvat_models.LabeledShapeRequest(
                type="rectangle",
                frame=0,
                label_id=labels["Fall"],
                points=[1.0, 2.0, 30.0, 40.0],
                source="manual",
            )
            proxy.update_annotations(
                cvat_models.PatchedLabeledDataRequest(shapes=[added]), action=AnnotationUpdateAction.CREATE
            )
        first, second = (names[s.label_id] for s in shapes[:2])
        expected = {name: Counter(accepted=uploaded[name]) for name in labels}
        expected[first].update(edited=1, accepted=-1)
        expected[second].update(deleted=1, accepted=-1)
        expected["Fall"].update(missed=1)

        console.models_listed()
        console.tab("jobs")
        console.page.wait_for_selector(f"#corrections-job option[value='{job_id}']", state="attached")
        console.page.select_option("#corrections-job", job_id)  # fills in the task and CVAT's URL
        assert console.page.input_value("#corrections-task") == str(task.id)
        assert console.page.input_value("#corrections-url") == cvat.url
        console.page.fill("#corrections-token", token)
        columns = ("accepted", "edited", "relabelled", "deleted", "missed", "other")

        def table() -> dict[str, list[str]]:
            console.page.click("#corrections-form button[type=submit]")
            console.page.wait_for_selector("#corrections-table tr.total")
            found = console.page.eval_on_selector_all(
                "#corrections-table tr[data-label]",
                "rows => rows.map(r => [...r.children].map(c => c.textContent))",
            )  # fmt: skip
            return {row[0]: row[1:] for row in found}

        def shown(row: dict) -> list[str]:
            rate = row["acceptance_rate"]
            values = ["–" if row[c] is None else str(row[c]) for c in columns]
            return [*values, "–" if rate is None else f"{100 * rate:.1f} %"]

        body = {"task": connection, "prelabel_job": job_id}
        report = server.http.post("/v1/corrections", json=body).json()
        got = table()
        assert got == {row["label"]: shown(row) for row in [*report["classes"], report["total"]]}
        for name, want in expected.items():  # the API's numbers are the constructed ones
            row = next(r for r in report["classes"] if r["label"] == name)
            assert {c: row[c] for c in ("accepted", "edited", "deleted", "missed")} == {
                c: want[c] for c in ("accepted", "edited", "deleted", "missed")
            }
            if uploaded[name]:
                assert row["acceptance_rate"] == round(want["accepted"] / uploaded[name], 4)
        assert "Deleted unknown" not in console.page.inner_text("#corrections-note")
        console.shot("jobs-corrections")

        # The same request as CSV, downloaded: the API's bytes.
        with console.page.expect_download() as download:
            console.page.click("#corrections-csv")
        saved = Path(download.value.path()).read_text()
        assert saved == server.http.post("/v1/corrections?format=csv", json=body).text
        assert saved.splitlines()[0].startswith("label,accepted,edited")

        # Without the job: deletions unknown, as the API says.
        console.page.select_option("#corrections-job", "")
        alone = server.http.post("/v1/corrections", json={"task": connection}).json()
        assert alone["deletions_known"] is False
        got = table()
        assert got == {row["label"]: shown(row) for row in [*alone["classes"], alone["total"]]}
        assert got["total"][columns.index("deleted")] == "–"
        assert "Deleted unknown" in console.page.inner_text("#corrections-note")

        # An API error is shown as its message, and the table is cleared.
        console.page.fill("#corrections-token", "bad")
        console.page.click("#corrections-form button[type=submit]")
        status = console.page.locator("#corrections-status.error")
        status.filter(has_text="cvat_auth_failed").wait_for()
        assert console.page.locator("#corrections-table tr").count() == 0
    # The only failed call is the refused token's, which the browser logs as a failed load.
    assert [(m, p, s) for m, p, s in console.calls if s >= 400] == [("POST", "/v1/corrections", 400)]
    assert all("status of 400" in e for e in console.errors), console.errors


def test_with_keys_the_page_refuses_to_act_without_a_key_and_works_with_one(browser, tmp_path: Path) -> None:
    full, jobs_only, clicks_only = new_key(), new_key(), new_key()
    keys = [
        {"id": "annotator", "hash": hash_key(full), "scopes": ["interactive", "jobs"]},
        {"id": "batch", "hash": hash_key(jobs_only), "scopes": ["jobs"]},
        {"id": "clicks", "hash": hash_key(clicks_only), "scopes": ["interactive"]},
    ]
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp_path / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp_path / "data"),
        "LABELSERVE_MODELS": "",
        "LABELSERVE_DETECTOR_PATHS": json.dumps({"fall": str(fall_checkpoint())}),
        "LABELSERVE_API_KEYS": json.dumps(keys),
    }
    with ServerProcess(env, tmp_path / "server.log", random_init=True) as server:
        page = Console(browser, server.url + "/")
        try:
            # No key: the page says so, and asks nothing but who it is.
            page.page.wait_for_selector("#locked", state="visible")
            page.page.wait_for_selector("#key-form", state="visible")
            time.sleep(1.5)  # a live refresh would have happened by now
            assert [(m, p) for m, p, _ in page.calls if p.startswith("/v1/")] == [("GET", "/v1/whoami")]
            assert page.page.locator("#try-model option").count() == 0
            page.shot("keys-locked")

            # A wrong key is refused as such.
            page.page.fill("#key-input", "lsk_not-a-key")
            page.page.click("#key-form button")
            page.page.locator("#key-error").filter(has_text="not valid").wait_for()

            # A key without the interactive scope: Try says what it lacks instead of offering broken buttons.
            page.page.fill("#key-input", jobs_only)
            page.page.click("#key-form button")
            page.page.locator("#key-who-text").filter(has_text="batch").wait_for()
            assert page.page.locator("#try-denied").is_visible()
            assert "needs the interactive scope" in page.page.inner_text("#try-denied")
            assert page.page.locator("#try-file").is_disabled()
            page.tab("models")
            page.page.locator("#models-table tr[data-model='fall'] button").wait_for()
            assert page.page.locator("#models-table tr[data-model='fall'] button").is_disabled()
            assert "admin key needed" in page.page.inner_text("#models-table tr[data-model='fall']")
            page.tab("jobs")
            assert page.page.locator("#corrections-form button[type=submit]").is_enabled()  # jobs scope
            page.shot("keys-jobs-scope")

            # The annotator's key works: a detection is drawn.
            page.page.click("#key-forget")
            page.page.wait_for_selector("#key-form", state="visible")
            page.page.fill("#key-input", full)
            page.page.click("#key-form button")
            page.page.locator("#key-who-text").filter(has_text="annotator").wait_for()
            page.tab("try")
            page.models_listed()
            page.page.select_option("#try-model", "fall")
            page.page.set_input_files("#try-file", str(ultralytics_asset("bus.jpg")))
            page.wait_for("() => document.querySelector('#try-stage').dataset.detectConf")
            assert page.page.locator("#try-stage .det-box").count() > 0
            page.shot("keys-annotator")

            # A key without the jobs scope: the corrections report says what it lacks, its controls disabled.
            page.page.click("#key-forget")
            page.page.wait_for_selector("#key-form", state="visible")
            page.page.fill("#key-input", clicks_only)
            page.page.click("#key-form button")
            page.page.locator("#key-who-text").filter(has_text="clicks").wait_for()
            page.tab("jobs")
            assert "needs the jobs scope" in page.page.inner_text("#jobs-denied")
            for control in ("#corrections-task", "#corrections-csv", "#corrections-form button[type=submit]"):
                assert page.page.locator(control).is_disabled(), control
            # Every refusal was the server's own (401 without a valid key), not the page's guess.
            refused = {(p, s) for _, p, s in page.calls if s >= 400}
            assert refused == {("/v1/whoami", 401)}
            assert page.errors == [] or all("401" in e for e in page.errors)
        finally:
            page.close()


def test_tracker_steps_through_an_image_sequence(console: Console, tmp_path: Path) -> None:
    """Median Flow follows a textured patch that moves 6 px right on each frame."""
    patch = np.random.default_rng(3).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    frames = []
    for i in range(3):
        frame = scene(320, 240)
        frame[60:140, 180 + 6 * i : 260 + 6 * i] = patch
        frames.append(tmp_path / f"frame-{i}.png")
        frames[-1].write_bytes(encode_image(frame))
    console.models_listed()
    console.tab("track")
    console.page.wait_for_selector("#track-tracker option[value='medianflow']", state="attached")
    console.page.set_input_files("#track-files", [str(f) for f in frames])
    console.page.locator("#track-frame").filter(has_text="frame 1 of 3").wait_for()
    shown = console.page.locator("#track-stage img").bounding_box()
    scale = 320 / shown["width"]
    console.page.mouse.move(shown["x"] + 180 / scale, shown["y"] + 60 / scale)
    console.page.mouse.down()
    console.page.mouse.move(shown["x"] + 260 / scale, shown["y"] + 140 / scale, steps=4)
    console.page.mouse.up()
    assert console.page.locator("#track-stage .track-box").count() == 1
    console.page.click("#track-start")
    console.page.locator("#track-status").filter(has_text="following 1 object").wait_for()
    for frame in (2, 3):
        console.page.click("#track-step")
        console.page.locator("#track-status").filter(has_text=f"frame {frame}: 1 found").wait_for()
    x = float(console.page.locator("#track-stage .track-box").get_attribute("x"))
    assert abs(x - (180 + 12)) <= 3  # moved with the patch, in image pixels
    console.shot("track-step")
    assert console.errors == []


def test_tracker_steps_and_propagates_through_a_short_video(
    console: Console, server: ServerProcess, tmp_path: Path
) -> None:
    """A 1280x720 H.264 clip uploaded through the page (shown scaled, boxes in image pixels): its frames come
    from POST /v1/video/frame, Median Flow follows the green square step by step and then by propagation, and
    each box drawn is the one the API answers a plain client for the same requests, near the truth by
    construction. Then the same clip by URL."""
    clip = tmp_path / "clip.mp4"
    truth = [boxes[1] for boxes in SyntheticVideo(width=1280, height=720, frames=16).write(clip)]
    console.models_listed()
    console.tab("track")
    console.page.wait_for_selector("#track-tracker option[value='medianflow']", state="attached")
    console.page.set_input_files("#track-files", str(clip))
    console.page.locator("#track-frame").filter(has_text="frame 1 of 16: clip.mp4").wait_for()

    def drag(box: tuple[float, ...]) -> list[float]:
        """Drags `box` (image pixels) on the shown frame; returns the box the page drew, in image pixels."""
        shown = console.page.locator("#track-stage img").bounding_box()
        assert shown["width"] < 1280 and shown["y"] + shown["height"] <= 720  # scaled to fit the screen
        scale = 1280 / shown["width"]
        console.page.mouse.move(shown["x"] + box[0] / scale, shown["y"] + box[1] / scale)
        console.page.mouse.down()
        console.page.mouse.move(shown["x"] + box[2] / scale, shown["y"] + box[3] / scale, steps=4)
        console.page.mouse.up()
        return drawn()

    def drawn() -> list[float]:
        rect = console.page.locator("#track-stage .track-box")
        assert rect.count() == 1
        x, y, w, h = (float(rect.get_attribute(name)) for name in ("x", "y", "width", "height"))
        return [x, y, x + w, y + h]

    # Step by step, then one frame back.
    box = drag(truth[0])
    assert box_iou(tuple(box), truth[0]) > 0.95
    console.page.click("#track-start")
    console.page.locator("#track-status").filter(has_text="following 1 object").wait_for()
    for frame in (2, 3, 4):
        console.page.click("#track-step")
        console.page.locator("#track-status").filter(has_text=f"frame {frame}: 1 found").wait_for()
    on_page = drawn()
    console.page.click("#track-back")
    console.page.locator("#track-frame").filter(has_text="frame 3 of 16").wait_for()
    back = drawn()

    # The same requests from a plain client: frames as PNGs, then start and step with them.
    frames = []
    for number in range(4):
        reply = server.http.post(
            "/v1/video/frame",
            files={"file": clip.read_bytes()},
            data={"params": json.dumps({"frame": number})},
        )
        assert reply.status_code == 200 and reply.headers["x-labelserve-video-frames"] == "16"
        frames.append(reply.content)
    shapes = [{"type": "rectangle", "points": box}]
    reply = server.http.post(
        "/v1/track/medianflow", files={"file": frames[0]}, data={"params": json.dumps({"shapes": shapes})}
    )
    states = reply.json()["states"]
    answered = []
    for data in frames[1:]:
        reply = server.http.post(
            "/v1/track/medianflow/step", files={"file": data}, data={"params": json.dumps({"states": states})}
        )
        answered.append(reply.json()["shapes"][0]["points"])
    assert np.allclose(on_page, answered[2], atol=1e-6) and np.allclose(back, answered[1], atol=1e-6)
    assert box_iou(tuple(on_page), truth[3]) > 0.85

    # Reset, the same box on the first frame, and propagate to the end in one streamed request.
    console.page.click("#track-reset")
    console.page.locator("#track-frame").filter(has_text="frame 1 of 16").wait_for()
    assert drag(truth[0]) == box
    console.page.click("#track-play")
    console.page.locator("#track-status").filter(
        has_text="propagated frames 1 to 16; frame 16: 1 found"
    ).wait_for()
    console.page.locator("#track-frame").filter(has_text="frame 16 of 16").wait_for()
    last = drawn()
    console.shot("track-video")
    params = {"start": 0, "shapes": shapes}
    reply = server.http.post(
        "/v1/track/medianflow/propagate",
        files={"file": clip.read_bytes()},
        data={"params": json.dumps(params)},
    )
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert [line["frame"] for line in lines] == list(range(16))
    assert np.allclose(last, lines[-1]["shapes"][0]["points"], atol=1e-6)
    assert box_iou(tuple(last), truth[15]) > 0.85
    # Stepping and propagating see the same pixels: frame 4's box is the same both ways.
    assert np.allclose(answered[2], lines[3]["shapes"][0]["points"], atol=1e-6)

    # The same clip by URL: the page sends {"video": {"url": ...}} to /v1/video/frame and /propagate.
    with file_server(tmp_path) as base:
        console.page.fill("#track-url", f"{base}/clip.mp4")
        console.page.click("#track-url-form button")
        console.page.locator("#track-frame").filter(has_text=f"frame 1 of 16: {base}/clip.mp4").wait_for()
        assert drag(truth[0]) == box
        console.page.click("#track-play")
        console.page.locator("#track-status").filter(has_text="propagated frames 1 to 16").wait_for()
    assert np.allclose(drawn(), lines[-1]["shapes"][0]["points"], atol=1e-6)
    asked = {path for method, path, status in console.calls if method == "POST" and status == 200}
    assert {"/v1/video/frame", "/v1/track/medianflow/step", "/v1/track/medianflow/propagate"} <= asked
    assert [call for call in console.calls if call[2] >= 400] == []
    assert console.errors == []
    # A file that is not a video: the API's refusal is what the page says.
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    console.page.set_input_files("#track-files", str(junk))
    console.page.locator("#track-status.error").filter(
        has_text="400 bad_video: The video cannot be opened"
    ).wait_for()
    assert [call for call in console.calls if call[2] >= 400] == [("POST", "/v1/video/frame", 400)]
    assert all("400" in error for error in console.errors)  # the browser's own line for a failed request
