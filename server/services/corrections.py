"""How people corrected a model's pre-labels in CVAT (issue #16, part 3), per class: accepted, edited,
deleted, and missed.

CVAT's `source` records what happened to each annotation: cvat-core keeps `auto` on a model's annotation
nobody touched and turns it into `semi-auto` when someone edits it (points, label, rotation, mask); what a
human draws is `manual` (or `semi-auto` when drawn with an AI tool, e.g. SAM clicks). A deleted pre-label
is simply gone, so deletions are known only against what was uploaded: the CVAT ids a pre-labeling job
recorded. With them:

- an uploaded id still there with source auto: **accepted**; with another source: **edited** (under the
  class it was uploaded with; `relabelled` counts those whose label changed);
- an uploaded id gone: **deleted** (a false positive, or one redrawn from scratch);
- any other manual or semi-auto annotation: **missed**, under its label (the model did not give it);
- anything else (auto annotations of another run, imports, consensus merges): **other**, not counted.

Without the ids, auto counts as accepted, semi-auto as edited (including shapes drawn with AI tools), manual
as missed, and deletions are unknown, so the acceptance rate is an upper bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.cvat.annotations import TaskObject

HUMAN_SOURCES = ("manual", "semi-auto")


@dataclass
class ClassCorrections:
    label: str
    accepted: int = 0
    edited: int = 0
    relabelled: int = 0  # edited ones whose label changed; counted under the label they were uploaded with
    deleted: int | None = 0  # None: unknown (no record of what was uploaded)
    missed: int = 0
    other: int = 0

    @property
    def prelabels(self) -> int:
        """The pre-labels of this class (those known: deletions only with a record)."""
        return self.accepted + self.edited + (self.deleted or 0)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / pre-labels; None for a class with no pre-label."""
        return self.accepted / self.prelabels if self.prelabels else None

    def add(self, other: ClassCorrections) -> None:
        self.accepted += other.accepted
        self.edited += other.edited
        self.relabelled += other.relabelled
        self.missed += other.missed
        self.other += other.other
        if self.deleted is not None and other.deleted is not None:
            self.deleted += other.deleted


@dataclass
class Corrections:
    classes: list[ClassCorrections]  # the task's labels in order, then label ids it no longer has
    total: ClassCorrections
    deletions_known: bool


def count_corrections(
    objects: Iterable[TaskObject],
    labels: Mapping[int, str],
    uploaded: Mapping[tuple[str, int], int] | None,
) -> Corrections:
    """Count per class. `labels`: the task's label id → name, in the task's order; `uploaded`: (kind, CVAT
    id) → CVAT label id of every annotation the pre-labeling job created, or None when unknown."""
    rows: dict[int, ClassCorrections] = {i: ClassCorrections(name) for i, name in labels.items()}

    def row(label_id: int) -> ClassCorrections:
        if label_id not in rows:
            rows[label_id] = ClassCorrections(f"label {label_id}")
        return rows[label_id]

    known = uploaded is not None
    ours = dict(uploaded or {})  # what is left of it once the annotations still there are taken out
    for obj in objects:
        original = ours.pop((obj.kind, obj.id), None)
        if original is not None:
            counted = row(original)
            if obj.source == "auto":
                counted.accepted += 1
            else:
                counted.edited += 1
                counted.relabelled += int(obj.label_id != original)
        elif known:
            counted = row(obj.label_id)
            if obj.source in HUMAN_SOURCES:
                counted.missed += 1
            else:
                counted.other += 1
        else:
            counted = row(obj.label_id)
            if obj.source == "auto":
                counted.accepted += 1
            elif obj.source == "semi-auto":
                counted.edited += 1
            elif obj.source == "manual":
                counted.missed += 1
            else:
                counted.other += 1
    for label_id in ours.values():
        counted = row(label_id)
        counted.deleted = (counted.deleted or 0) + 1
    classes = list(rows.values())
    for counted in classes:
        counted.deleted = counted.deleted if known else None
    total = ClassCorrections("total", deleted=0 if known else None)
    for counted in classes:
        total.add(counted)
    return Corrections(classes, total, known)


def has_prelabels(objects: Iterable[TaskObject]) -> bool:
    """Whether anything in the task came from a model (source auto or semi-auto)."""
    return any(obj.source in ("auto", "semi-auto") for obj in objects)


COLUMNS = ("label", "accepted", "edited", "relabelled", "deleted", "missed", "other", "acceptance_rate")


def row_of(counted: ClassCorrections) -> dict[str, object]:
    """One class as a report row (the COLUMNS); the rate rounded to 4 places, None without pre-labels."""
    rate = counted.acceptance_rate
    values = {name: getattr(counted, name) for name in COLUMNS[:-1]}
    return values | {"acceptance_rate": round(rate, 4) if rate is not None else None}
