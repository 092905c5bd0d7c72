"""A sample job's ranked list of images to annotate next, as JSON and CSV; and how an image's embedding
vector is kept among its stored shapes until then."""

from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.shapes import Shape
from server.formats.files import RANKING_CSV, RANKING_JSON, atomic

EMBEDDING_TAG = "labelserve_embedding"  # the stored tag shape whose `vector` attribute holds the embedding


@dataclass(frozen=True)
class Pick:
    rank: int  # 1 = annotate first
    index: int  # the image's index in the job
    image: str  # its name in the source (relative path, object key, URL path)
    uncertainty: float


def embedding_shape(vector: np.ndarray) -> Shape:
    data = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return Shape("tag", label=EMBEDDING_TAG, attributes={"vector": data})


def embedding_of(shape: Shape) -> np.ndarray | None:
    if shape.kind != "tag" or shape.label != EMBEDDING_TAG:
        return None
    return np.frombuffer(base64.b64decode(shape.attributes["vector"]), dtype="<f4")


def write_ranking(directory: Path, picks: list[Pick], summary: dict[str, Any]) -> None:
    rows = [
        {"rank": p.rank, "index": p.index, "image": p.image, "uncertainty": round(p.uncertainty, 6)}
        for p in picks
    ]
    with atomic(directory / RANKING_JSON) as out:
        json.dump({"summary": summary, "images": rows}, out, ensure_ascii=False, indent=1)
        out.write("\n")
    with atomic(directory / RANKING_CSV) as out:
        writer = csv.DictWriter(out, fieldnames=["rank", "index", "image", "uncertainty"])
        writer.writeheader()
        writer.writerows(rows)
