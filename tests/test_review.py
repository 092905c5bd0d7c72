"""Review jobs (issue #16): label errors injected by construction into exactly-labelled synthetic scenes are
found at the top of the ranked findings, the adapter's scores are cleanlab ObjectLab's own on the same
inputs, the dataset readers give back what the writers wrote, bad input is a 4xx, and a review job runs,
cancels and resumes after kill -9 like a pre-labeling job."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cleanlab.object_detection import rank

from models.detector import DetectorInfo
from models.shapes import RegionMask, Shape
from server.errors import ApiError
from server.formats.annotations import Annotation, read_annotations
from server.formats.datasets import write_output
from server.formats.files import ImageResult
from server.jobs.engine import LocalEngine
from server.jobs.spec import JobSpec
from server.services.review import ImageInput, objectlab_inputs, score_boxes
from tests.cvat_emulator import CvatEmulator
from tests.jobs_helpers import CLASS_NAMES, encode_png, make_scene, wait_for
from tests.review_helpers import (
    LABELS,
    Corpus,
    SeededRectDetector,
    colour_segmenter,
    hits,
    make_corpus,
    seeded_predictions,
    write_coco_dataset,
    write_mask_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
SCENES = 200


def inputs_of(corpus: Corpus) -> list[ImageInput]:
    return [
        ImageInput(i, name, anns, seeded_predictions(i, rects, w, h))
        for i, (name, w, h, rects, anns) in enumerate(corpus.frames)
    ]


def objectlab_alone(images: list[ImageInput]) -> list[tuple[float, str, int, str | None, tuple | None]]:
    """cleanlab's three per-box scores on the same inputs, merged into one list, lowest first: ObjectLab
    used alone, with no labelserve check (the baseline of the issue's targets)."""
    inputs = objectlab_inputs(images, LABELS)
    kwargs = {"labels": inputs.labels, "predictions": inputs.predictions}
    rows = []
    for kind, scores in (
        ("missing", rank.compute_overlooked_box_scores(**kwargs)),
        ("badloc", rank.compute_badloc_box_scores(**kwargs)),
        ("swap", rank.compute_swap_box_scores(**kwargs)),
    ):
        for i, per_image in enumerate(scores):
            for row, score in enumerate(per_image):
                if not np.isfinite(score):
                    continue
                if kind == "missing":
                    pred = images[i].predictions[inputs.pred_rows[i][row]]
                    rows.append((float(score), kind, i, None, pred.box))
                else:
                    rows.append((float(score), kind, i, images[i].annotations[row].shape_id, None))
    return sorted(rows, key=lambda r: r[0])


class _Found:
    """A baseline row in the shape hits() reads."""

    def __init__(self, row: tuple) -> None:
        _, self.kind, self.frame, self.shape_id, self.suggested_box = row


# -- ground truth by construction ------------------------------------------------------------------------


def test_injected_errors_rank_at_the_top_and_beat_objectlab_alone() -> None:
    corpus = make_corpus(SCENES)
    images = inputs_of(corpus)
    errors = corpus.injected.count()
    per_kind = {k: len(v) for k, v in corpus.injected.shape_ids.items()} | {
        "missing": len(corpus.injected.removed)
    }
    assert errors >= 40 and min(per_kind.values()) >= 8

    findings = score_boxes(images, LABELS)
    top = findings[: 2 * errors]
    ours = hits(top, corpus.injected)
    baseline = hits([_Found(r) for r in objectlab_alone(images)[: 2 * errors]], corpus.injected)
    precision_at_e = sum(hits(findings[:errors], corpus.injected).values()) / errors
    recall = sum(ours.values()) / errors
    recall_alone = sum(baseline.values()) / errors
    print(
        f"\nE={errors} {per_kind}; recall@2E labelserve {recall:.3f} {ours}; ObjectLab alone "
        f"{recall_alone:.3f} {baseline}; precision@E {precision_at_e:.3f}"
    )
    assert recall >= 0.6 and recall >= recall_alone
    for kind, n in per_kind.items():
        assert ours[kind] / n >= 0.6, kind
        assert ours[kind] >= baseline[kind], kind
    assert baseline["spurious"] == 0  # ObjectLab scores a box no detection overlaps as perfect
    assert precision_at_e >= 0.7
    # The kinds say what is wrong: each corrupted shape's finding has the kind its corruption calls for.
    expected = {"shift": "badloc", "scale": "badloc", "swap": "swap", "spurious": "spurious"}
    kind_of = {f.shape_id: f.kind for f in top}
    for injected_kind, ids in corpus.injected.shape_ids.items():
        right = sum(kind_of.get(i) == expected[injected_kind] for i in ids)
        assert right >= 0.8 * len(ids), (injected_kind, right, len(ids))


def test_a_clean_dataset_has_no_injected_errors_to_find_and_few_findings() -> None:
    corpus = make_corpus(SCENES, rate=0.0)
    assert corpus.injected.count() == 0
    findings = score_boxes(inputs_of(corpus), LABELS, max_score=0.3)
    boxes = sum(len(anns) for *_, anns in corpus.frames)
    assert len(findings) < 0.05 * boxes  # the detector's own false alarms and unsure boxes


# -- the adapter against cleanlab's own functions ----------------------------------------------------------


def by_hand(images: list[ImageInput]) -> tuple[list[dict], list[list[np.ndarray]]]:
    """cleanlab's documented input format, built directly (not through objectlab_inputs)."""
    labels, predictions = [], []
    for image in images:
        labels.append(
            {
                "bboxes": np.array([a.shape.box for a in image.annotations], dtype=float).reshape(-1, 4),
                "labels": np.array([LABELS.index(a.shape.label) for a in image.annotations], dtype=int),
            }
        )
        per_class = [
            np.array([[*p.box, p.score] for p in image.predictions if p.label == name], dtype=float).reshape(
                -1, 5
            )
            for name in LABELS
        ]
        predictions.append(per_class)
    return labels, predictions


def test_the_adapters_scores_are_objectlabs_own() -> None:
    corpus = make_corpus(60, seed=3)
    images = inputs_of(corpus)
    labels, predictions = by_hand(images)
    overlooked = rank.compute_overlooked_box_scores(labels=labels, predictions=predictions)
    badloc = rank.compute_badloc_box_scores(labels=labels, predictions=predictions)
    swap = rank.compute_swap_box_scores(labels=labels, predictions=predictions)
    findings = score_boxes(images, LABELS, max_score=1.0)
    assert findings
    checked = {"missing": 0, "badloc": 0, "swap": 0}
    for f in findings:
        image = images[f.frame]
        if f.kind == "missing":
            ordered = [p for name in LABELS for p in image.predictions if p.label == name]
            row = next(r for r, p in enumerate(ordered) if p.box == f.suggested_box)
            assert f.score == pytest.approx(overlooked[f.frame][row], abs=1e-12)
        elif f.kind in ("badloc", "swap"):
            row = next(r for r, a in enumerate(image.annotations) if a.shape_id == f.shape_id)
            assert f.score == pytest.approx((badloc if f.kind == "badloc" else swap)[f.frame][row], abs=1e-12)
        else:
            continue
        checked[f.kind] += 1
    assert min(checked.values()) > 0, checked
    # Every low cleanlab score became a finding (or was outscored on the same shape by a lower one).
    flagged = {(f.frame, f.shape_id) for f in findings}
    for i, image in enumerate(images):
        for row, annotation in enumerate(image.annotations):
            if min(badloc[i][row], swap[i][row]) < 1.0:
                assert (i, annotation.shape_id) in flagged


def test_images_without_labels_or_predictions() -> None:
    box = Shape("box", label="red", box=(10, 10, 30, 30))
    sure = Shape("box", label="red", score=0.99, box=(10, 10, 30, 30))
    images = [
        ImageInput(0, "no-labels", [], [sure]),  # the model sees a red box nobody drew
        ImageInput(1, "no-predictions", [Annotation("a", box)], []),
        ImageInput(2, "empty", [], []),
        ImageInput(3, "agree", [Annotation("b", box)], [sure]),
    ]
    findings = score_boxes(images, LABELS)
    assert [(f.kind, f.frame, f.shape_id) for f in findings] == [
        ("spurious", 1, "a"),
        ("missing", 0, None),
    ] or [(f.kind, f.frame, f.shape_id) for f in findings] == [("missing", 0, None), ("spurious", 1, "a")]
    # A class with no annotation and no detection anywhere is an empty array, not a gap in the list.
    inputs = objectlab_inputs(images, [*LABELS, "unused"])
    assert [len(p) for p in inputs.predictions] == [4, 4, 4, 4]
    assert score_boxes(images, [*LABELS, "unused"]) == findings


# -- the dataset readers ---------------------------------------------------------------------------------


def test_readers_give_back_what_the_writers_wrote(tmp_path: Path) -> None:
    info = DetectorInfo(name="rects", task="detect", class_names=dict(CLASS_NAMES))
    bitmap = np.zeros((20, 30), dtype=bool)
    bitmap[4:15, 6:20] = True
    bitmap[4:8, 6:9] = False
    shapes = [
        Shape("box", label="red", box=(1.5, 2.25, 20.0, 30.5)),
        Shape("polygon", label="green", polygon=[10.5, 10.5, 40.5, 12.5, 25.5, 35.5]),
        Shape("mask", label="blue", mask=RegionMask(bitmap, 10, 20, 64, 48)),
    ]
    results = [ImageResult(0, "a/one.png", 64, 48, shapes), ImageResult(1, "two.png", 64, 48, [])]
    for fmt, where in (("coco", "annotations.json"), ("cvat_images", "annotations.xml"), ("yolo", "")):
        out = tmp_path / fmt
        write_output(fmt, out, info, lambda: results)
        images = read_annotations(fmt, out / where if where else out)  # type: ignore[arg-type]
        names = sorted(i.name for i in images)
        assert names == (["a/one.txt", "two.txt"] if fmt == "yolo" else ["a/one.png", "two.png"]), fmt
        first = next(i for i in images if i.name.startswith("a/one"))
        got = [a.shape for a in first.in_pixels(64, 48)]
        assert len({a.shape_id for a in first.annotations}) == 3
        assert [s.label for s in got] == ["red", "green", "blue"]
        assert got[0].box == pytest.approx(shapes[0].box, abs=0.01 if fmt != "yolo" else 0.001 * 64)
        assert got[1].polygon == pytest.approx(shapes[1].polygon, abs=0.01 if fmt != "yolo" else 0.001 * 64)
        if fmt == "yolo":  # the mask's outline, as a polygon
            assert got[2].kind == "polygon" and got[2].bounds() == pytest.approx(
                (16.5, 24.5, 29.5, 34.5), abs=0.1
            )
        else:
            assert got[2].kind == "mask" and got[2].mask == shapes[2].mask


# -- review jobs -----------------------------------------------------------------------------------------


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., LocalEngine]]:
    engines: list[LocalEngine] = []

    def make(detector: SeededRectDetector | None = None, db: Path | None = None) -> LocalEngine:
        found = detector or SeededRectDetector()
        engine = LocalEngine(lambda _: found, state_db=db or tmp_path / "jobs.sqlite3", readers=2)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Corpus]:
    directory = tmp_path_factory.mktemp("review")
    corpus = make_corpus(80, seed=11)
    return directory, write_coco_dataset(directory, corpus), corpus


def review_spec(images: Path, annotations: Path, out: Path, **review: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "source": {"directory": str(images)},
            "detector": "rects",
            "review": {"annotations": str(annotations), "format": "coco"} | review,
            "output": {"format": "findings", "directory": str(out)},
            "batch_size": 4,
        }
    )


def coco_ids_to_shape_ids(annotations: Path) -> dict[str, str]:
    data = json.loads(annotations.read_text())
    return {str(a["id"]): a["attributes"]["shape_id"] for a in data["annotations"]}


def test_a_review_job_finds_the_injected_errors(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    images, annotations, corpus = coco
    detector = SeededRectDetector()
    engine = make_engine(detector)
    job = engine.submit(review_spec(images, annotations, tmp_path / "out"))
    assert job.total == 80
    status = wait_for(engine, job.id)
    assert (status.state, status.done, status.failed) == ("completed", 80, 0)
    assert status.outputs == [str(tmp_path / "out" / "findings.json"), str(tmp_path / "out" / "report.html")]
    assert set(detector.confs) == {0.01}  # low-confidence boxes kept
    document = json.loads((tmp_path / "out" / "findings.json").read_text())
    summary, listed = document["summary"], document["findings"]
    assert "not trained on these labels" in summary["note"]
    assert summary["images"] == 80 and summary["listed"] == len(listed) == summary["findings"]
    ids = coco_ids_to_shape_ids(annotations)

    class Row:
        def __init__(self, d: dict) -> None:
            self.kind, self.frame = d["kind"], d["frame"]
            self.shape_id = ids[d["shape_id"]] if d["shape_id"] is not None else None
            self.suggested_box = d["suggested_box"]

    errors = corpus.injected.count()
    found = hits([Row(d) for d in listed[: 2 * errors]], corpus.injected)
    assert sum(found.values()) / errors >= 0.6, found
    scores = [d["score"] for d in listed]
    assert scores == sorted(scores)
    # The same ranking as the scoring service on the same inputs.
    direct = score_boxes(inputs_of(corpus), LABELS)
    assert [(d["kind"], d["frame"]) for d in listed] == [(f.kind, f.frame) for f in direct]
    assert [ids.get(d["shape_id"]) for d in listed if d["shape_id"]] == [
        f.shape_id for f in direct if f.shape_id
    ]

    report = (tmp_path / "out" / "report.html").read_text()
    for kind in ("missing", "badloc", "swap", "spurious"):  # grouped by kind, every finding listed
        assert f"<h2 id='{kind}'>" in report
        assert report.count(f"{kind} score") == sum(d["kind"] == kind for d in listed)
    assert report.count("<img alt='annotated'") == min(len(listed), 200)

    capped = engine.submit(review_spec(images, annotations, tmp_path / "top", top_k=5))
    assert wait_for(engine, capped.id).state == "completed"
    top = json.loads((tmp_path / "top" / "findings.json").read_text())
    assert top["findings"] == listed[:5] and top["summary"]["findings"] == len(listed)


def test_review_bad_input_is_a_4xx(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    images, annotations, _ = coco
    engine = make_engine()

    def code(spec: JobSpec) -> tuple[int, str]:
        with pytest.raises(ApiError) as err:
            engine.submit(spec)
        return err.value.status, err.value.code

    elsewhere = tmp_path / "few"
    elsewhere.mkdir()
    (elsewhere / "scene_000.png").write_bytes((images / "scene_000.png").read_bytes())
    assert code(review_spec(elsewhere, annotations, tmp_path / "o1")) == (400, "images_missing")
    assert code(review_spec(images, tmp_path / "none.json", tmp_path / "o2")) == (
        400,
        "annotations_not_found",
    )
    (tmp_path / "bad.json").write_text('{"images": [], "annotations": [{"id": 1, "image_id": 9}]}')
    assert code(review_spec(images, tmp_path / "bad.json", tmp_path / "o3")) == (400, "bad_annotations")
    renamed = json.loads(annotations.read_text())
    for c in renamed["categories"]:
        c["name"] = "thing-" + c["name"]
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    assert code(review_spec(images, tmp_path / "renamed.json", tmp_path / "o4")) == (422, "labels_unmapped")
    bad_map = {"label_mapping": {"purple": "thing-red"}}
    assert code(review_spec(images, tmp_path / "renamed.json", tmp_path / "o5", **bad_map)) == (
        422,
        "bad_label_mapping",
    )
    mapping = {"label_mapping": {n: "thing-" + n for n in LABELS}}
    job = engine.submit(review_spec(images, tmp_path / "renamed.json", tmp_path / "o6", **mapping))
    assert wait_for(engine, job.id).state == "completed"
    listed = json.loads((tmp_path / "o6" / "findings.json").read_text())["findings"]
    assert listed and all(d["label"].startswith("thing-") for d in listed)
    with pytest.raises(ValueError, match="findings format is for review jobs"):
        JobSpec.model_validate(
            {
                "source": {"directory": str(images)},
                "detector": "rects",
                "output": {"format": "findings", "directory": "x"},
            }
        )


def test_a_review_job_cancels_and_resumes_after_kill_9(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    images, annotations, _ = coco
    db, log = tmp_path / "crash.sqlite3", tmp_path / "calls.log"
    crash = review_spec(images, annotations, tmp_path / "resumed")
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "jobs_crash_worker.py"), str(db), crash.model_dump_json(),
         str(log), "0.1", "seeded"],
        stdout=subprocess.PIPE, cwd=ROOT, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        job_id = worker.stdout.readline().strip()
        assert job_id
        deadline = time.monotonic() + 60
        with sqlite3.connect(db) as reader:
            while reader.execute("SELECT done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] < 12:
                assert time.monotonic() < deadline and worker.poll() is None
                time.sleep(0.02)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            done_at_kill = reader.execute("SELECT done FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert 12 <= done_at_kill < 80
    assert not (tmp_path / "resumed" / "findings.json").exists()

    detector = SeededRectDetector()
    engine = make_engine(detector, db=db)
    assert engine.resume_unfinished() == [job_id]
    assert wait_for(engine, job_id).state == "completed"
    assert sum(detector.calls.values()) == 80 - done_at_kill  # nothing redone
    straight = make_engine(SeededRectDetector(), db=tmp_path / "straight.sqlite3")
    again = straight.submit(review_spec(images, annotations, tmp_path / "straight"))
    assert wait_for(straight, again.id).state == "completed"
    resumed = (tmp_path / "resumed" / "findings.json").read_bytes()
    assert resumed == (tmp_path / "straight" / "findings.json").read_bytes()

    slow = make_engine(SeededRectDetector(delay=0.05), db=tmp_path / "cancel.sqlite3")
    job = slow.submit(review_spec(images, annotations, tmp_path / "cancelled"))
    while slow.status(job.id).done < 4:
        time.sleep(0.01)
    assert slow.cancel(job.id).state == "cancelled"
    time.sleep(0.3)
    final = slow.status(job.id)
    assert final.state == "cancelled" and final.done < 80
    assert not (tmp_path / "cancelled" / "findings.json").exists()


# -- masks and polygons: the SAM check -------------------------------------------------------------------


def test_eroded_and_dilated_masks_are_flagged_by_the_sam_check(tmp_path: Path) -> None:
    directory = tmp_path / "masks"
    directory.mkdir()
    annotations, sloppy = write_mask_dataset(directory, 60)
    assert len(sloppy) >= 8
    prompts: list[int] = []

    def refine(model: str, data: bytes, image: np.ndarray, shapes: list[Shape]) -> list[Shape]:
        assert model == "colour" and data and all(s.kind == "box" for s in shapes)
        prompts.append(len(shapes))
        return colour_segmenter(model, data, image, shapes)

    detector = SeededRectDetector()
    engine = LocalEngine(
        lambda _: detector, refine=refine, check_refine=lambda n: {"colour": 1}[n], state_db=tmp_path / "j.db"
    )
    try:
        with pytest.raises(ApiError) as unknown:
            engine.submit(review_spec(directory, annotations, tmp_path / "x", sam="other"))
        assert unknown.value.status == 404
        job = engine.submit(review_spec(directory, annotations, tmp_path / "out", sam="colour"))
        assert wait_for(engine, job.id).state == "completed"
    finally:
        engine.close()
    masks = len(json.loads(annotations.read_text())["annotations"])
    assert sum(prompts) == masks  # one prompt per mask annotation
    listed = json.loads((tmp_path / "out" / "findings.json").read_text())["findings"]
    edges = [d for d in listed if d["kind"] == "sloppy_edge"]
    flagged = [int(d["shape_id"]) for d in edges]
    recall = len(set(flagged[: 2 * len(sloppy)]) & sloppy) / len(sloppy)
    precision = len(set(flagged[: len(sloppy)]) & sloppy) / len(sloppy)
    polygons = sum(i % 2 for i in sloppy)
    print(f"\nsloppy masks and polygons {len(sloppy)} ({polygons} polygons) of {masks}: "
          f"recall@2E {recall:.3f}, precision@E {precision:.3f}")  # fmt: skip
    assert 0 < polygons < len(sloppy)
    assert recall >= 0.6 and set(flagged) == sloppy  # clean masks match the object exactly: IoU 1
    for d in edges:
        assert d["iou"] == d["score"] < 0.9 and d["suggested_mask"]["size"]


def test_without_sam_a_review_is_refused_a_sam_check(coco: tuple[Path, Path, Corpus], tmp_path: Path) -> None:
    images, annotations, _ = coco
    engine = LocalEngine(lambda _: SeededRectDetector(), state_db=tmp_path / "j.db")
    try:
        with pytest.raises(ApiError) as err:
            engine.submit(review_spec(images, annotations, tmp_path / "o", sam="mobile_sam"))
        assert (err.value.status, err.value.code) == (422, "refine_unavailable")
    finally:
        engine.close()


# -- CVAT issues -----------------------------------------------------------------------------------------


def test_findings_become_cvat_issues_once(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    from cvat_sdk import make_client

    images, annotations, _ = coco
    names = [f"scene_{i:03d}.png" for i in range(80)]
    with CvatEmulator(token="t0ken", page_size=7) as cvat:
        task = cvat.add_task(
            [{"name": n, "type": "rectangle"} for n in LABELS],
            [(f"data/{n}", (images / n).read_bytes()) for n in names],  # matched by file name
            segment_size=40,
        )
        first, second = task.jobs
        issues = {"url": cvat.url, "token": "t0ken", "job_id": second.id, "top_k": 12, "per_frame": 1}
        engine = make_engine()
        with pytest.raises(ApiError) as no_job:
            engine.submit(
                review_spec(images, annotations, tmp_path / "x", cvat_issues=issues | {"job_id": 999})
            )
        assert (no_job.value.status, no_job.value.code) == (400, "cvat_job_not_found")

        job = engine.submit(review_spec(images, annotations, tmp_path / "out", cvat_issues=issues))
        assert "t0ken" not in engine.store.job(job.id).spec  # the credentials are stored apart
        assert wait_for(engine, job.id).state == "completed"
        document = json.loads((tmp_path / "out" / "findings.json").read_text())
        on_second = [d for d in document["findings"] if d["frame"] >= 40]
        one_per_frame = [
            d for k, d in enumerate(on_second) if d["frame"] not in {e["frame"] for e in on_second[:k]}
        ]
        assert document["summary"]["cvat_issues"]["written"] == 12
        assert len(cvat.issues) == 12

        with make_client(cvat.url, access_token="t0ken") as client:  # read back as CVAT's own client would
            written = client.jobs.retrieve(second.id).get_issues()
            assert {i.frame for i in written} == {d["frame"] for d in one_per_frame[:12]}
            for issue in written:
                finding = next(d for d in one_per_frame if d["frame"] == issue.frame)
                assert issue.job == second.id and not issue.resolved
                assert issue.position == pytest.approx(finding["box"] or finding["suggested_box"])
                message = issue.get_comments()[0].message
                assert message.startswith(f"[labelserve review v1 kind={finding['kind']} ")
                assert "key=" in message and "model=rects" in message
            assert client.jobs.retrieve(first.id).get_issues() == []  # the other job's frames are left alone

        rerun = engine.submit(review_spec(images, annotations, tmp_path / "again", cvat_issues=issues))
        assert wait_for(engine, rerun.id).state == "completed"
        again = json.loads((tmp_path / "again" / "findings.json").read_text())["summary"]["cvat_issues"]
        assert (again["written"], again["existing"], len(cvat.issues)) == (0, 12, 12)
        more = engine.submit(
            review_spec(images, annotations, tmp_path / "more", cvat_issues=issues | {"top_k": 15})
        )
        assert wait_for(engine, more.id).state == "completed"
        assert len(cvat.issues) == 15  # three more, none repeated


def test_a_cvat_job_reviewed_in_place(make_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """Source: a CVAT task's frames and current annotations (one job's frames); findings keep the CVAT shape
    ids, and the issues go on that job."""
    corpus = make_corpus(24, rate=0.15, seed=2)
    with CvatEmulator(token="t0ken") as cvat:
        frames = [(name, encode_png(make_scene(i)[0])) for i, (name, *_) in enumerate(corpus.frames)]
        task = cvat.add_task([{"name": n, "type": "rectangle"} for n in LABELS], frames, segment_size=12)
        label_ids = {label["name"]: label["id"] for label in task.labels}
        shapes, ours = [], {}  # ours: CVAT shape id -> the corpus's shape id
        for i, (*_, anns) in enumerate(corpus.frames):
            for a in anns:
                shapes.append({"type": "rectangle", "frame": i, "label_id": label_ids[a.shape.label],
                               "points": list(a.shape.box)})  # fmt: skip
        stored = cvat._store(task, {"shapes": shapes}, replace=True)["shapes"]
        everything = [a for *_, anns in corpus.frames for a in anns]
        for shape, a in zip(stored, everything, strict=True):
            ours[str(shape["id"])] = a.shape_id
        second = task.jobs[1]
        connection = {"url": cvat.url, "token": "t0ken"}
        spec = JobSpec.model_validate(
            {
                "source": {
                    "cvat_task": connection | {"task_id": task.id},
                    "frames": {"start": 12, "stop": 23},
                },
                "detector": "rects",
                "review": {"format": "cvat_task", "cvat_issues": connection | {"job_id": second.id}},
                "output": {"format": "findings", "directory": str(tmp_path / "out")},
            }
        )
        engine = make_engine()
        status = wait_for(engine, engine.submit(spec).id)
        assert (status.state, status.total) == ("completed", 12)
        document = json.loads((tmp_path / "out" / "findings.json").read_text())
        listed = document["findings"]
        assert {d["image"] for d in listed} <= {name for name, *_ in corpus.frames[12:]}
        injected = corpus.injected
        in_job = {k: {s for s in v if int(s.split(":")[0]) >= 12} for k, v in injected.shape_ids.items()}
        wanted = set().union(*in_job.values())
        flagged = {ours[d["shape_id"]] for d in listed if d["shape_id"] is not None}
        assert wanted and wanted <= flagged  # every corrupted shape of the job, by its CVAT id
        assert document["summary"]["cvat_issues"]["written"] == len(cvat.issues) > 0
        assert {i["job"] for i in cvat.issues.values()} == {second.id}
        assert all(12 <= i["frame"] <= 23 for i in cvat.issues.values())

    bad = spec.model_dump(mode="json") | {"review": {"format": "cvat_task", "annotations": "x.json"}}
    with pytest.raises(ValueError, match="except with the cvat_task format"):
        JobSpec.model_validate(bad)


# -- the CLI ---------------------------------------------------------------------------------------------


def test_the_cli_runs_a_review(
    coco: tuple[Path, Path, Corpus], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from server.cli import prelabel as cli

    images, annotations, _ = coco
    detector = SeededRectDetector()
    asked: list[str | None] = []

    def runtime(model: str, sam: str | None):  # the main CLI's: the detector lookup and SAM, if asked
        asked.append(sam)
        return (lambda name: {"rects": detector}[name]), colour_segmenter

    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        cli.add_prelabel_command(parser.add_subparsers(dest="command"), runtime)
        args = parser.parse_args(["prelabel", *argv, "--no-progress"])
        return args.func(args)

    out = tmp_path / "review"
    assert (
        run(str(images), "--model", "rects", "--out", str(out), "--review", str(annotations), "--top-k", "7")
        == 0
    )
    assert capsys.readouterr().out.split() == [str(out / "findings.json"), str(out / "report.html")]
    document = json.loads((out / "findings.json").read_text())
    assert len(document["findings"]) == 7 and document["summary"]["conf"] == 0.01
    assert asked == [None]
    assert run(str(images), "--model", "rects", "--out", str(tmp_path / "s"), "--review", str(annotations),
               "--review-sam", "colour") == 0  # fmt: skip
    assert asked[-1] == "colour"
    assert run(str(images), "--model", "rects", "--out", str(tmp_path / "m"), "--review", str(annotations),
               "--review-map", "oops") == 2  # fmt: skip
    assert "--review-map wants CLASS=LABEL" in capsys.readouterr().err
    assert run(str(images), "--model", "rects", "--out", str(tmp_path / "f"), "--format", "coco",
               "--review", str(annotations)) == 2  # fmt: skip


def test_the_http_route_answers_bad_reviews_with_4xx_json(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.api.errors import install_error_handlers
    from server.api.routes.jobs import router

    images, annotations, _ = coco
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.jobs = make_engine()
    body = review_spec(images, annotations, tmp_path / "out").model_dump(mode="json", exclude_none=True)
    with TestClient(app) as client:
        cases = [
            (
                body | {"review": {"annotations": "/nope.json", "format": "coco"}},
                400,
                "annotations_not_found",
            ),
            (
                body | {"review": {"annotations": "/x\x00y", "format": "coco"}},
                400,
                "annotations_not_found",
            ),
            (body | {"review": {"annotations": str(annotations), "format": "voc"}}, 422, "invalid_request"),
            (body | {"output": {"format": "coco", "directory": str(tmp_path / "o")}}, 422, "invalid_request"),
        ]
        for sent, status, code in cases:
            reply = client.post("/v1/jobs", json=sent)
            assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
            assert reply.json()["error"]["message"]
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 201
        assert wait_for(app.state.jobs, created.json()["id"]).state == "completed"


# -- the annotations: a snapshot at submit, and s3:// --------------------------------------------------------


def test_a_review_scores_the_annotations_as_they_were_at_submit(
    coco: tuple[Path, Path, Corpus], make_engine: Callable[..., LocalEngine], tmp_path: Path
) -> None:
    """The file is changed, then deleted, while the job runs: the findings are those of the file at submit."""
    images, original, _ = coco
    annotations = tmp_path / "annotations.json"
    annotations.write_bytes(original.read_bytes())
    straight = make_engine(SeededRectDetector(), db=tmp_path / "straight.sqlite3")
    job = straight.submit(review_spec(images, annotations, tmp_path / "straight"))
    assert wait_for(straight, job.id).state == "completed"

    slow = make_engine(SeededRectDetector(delay=0.05), db=tmp_path / "slow.sqlite3")
    job = slow.submit(review_spec(images, annotations, tmp_path / "changed"))
    data = json.loads(annotations.read_text())
    data["annotations"] = data["annotations"][: len(data["annotations"]) // 2]  # half the boxes gone
    annotations.write_text(json.dumps(data))
    while slow.status(job.id).done < 8:
        time.sleep(0.01)
    annotations.unlink()
    assert wait_for(slow, job.id).state == "completed"
    assert (tmp_path / "changed" / "findings.json").read_bytes() == (
        tmp_path / "straight" / "findings.json"
    ).read_bytes()


def test_annotations_from_s3_review_as_the_local_file_does(
    coco: tuple[Path, Path, Corpus], tmp_path: Path
) -> None:
    from server.settings import Settings
    from tests.s3_helpers import moto_s3

    images, annotations, _ = coco
    with moto_s3() as moto:
        moto.create_bucket("labels")
        moto.client().put_object(Bucket="labels", Key="set/annotations.json", Body=annotations.read_bytes())
        settings = Settings(storage_profiles={"b2": moto.profile(["labels"])}, data_dir=tmp_path / "data")
        engine = LocalEngine(
            lambda _: SeededRectDetector(), state_db=tmp_path / "s3.sqlite3", settings=settings
        )
        try:
            local = engine.submit(review_spec(images, annotations, tmp_path / "local"))
            remote = engine.submit(
                review_spec(images, "s3://labels/set/annotations.json", tmp_path / "remote")
            )  # type: ignore[arg-type]
            for job in (local, remote):
                assert wait_for(engine, job.id).state == "completed"
            with pytest.raises(ApiError) as missing:
                engine.submit(review_spec(images, "s3://labels/set/nope.json", tmp_path / "x"))  # type: ignore[arg-type]
            assert (missing.value.status, missing.value.code) == (400, "annotations_not_found")
        finally:
            engine.close()
    assert (tmp_path / "remote" / "findings.json").read_bytes() == (
        tmp_path / "local" / "findings.json"
    ).read_bytes()
