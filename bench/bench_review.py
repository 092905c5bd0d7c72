"""Review recall on errors injected by construction: labelserve's findings against cleanlab's ObjectLab used
alone, on the same predictions in the same run, over several seeds.

    python bench/bench_review.py [--scenes 1000] [--seeds 5] [--rate 0.1]

The scenes are tests/jobs_helpers.make_scene's, labelled exactly; `rate` of the boxes are then corrupted
(removed, shifted, scaled, class swapped, or a spurious box added beside them), and the seeded detector of
tests/review_helpers.py gives the predictions. Recall counts the injected errors among the top 2×E findings
(E = errors injected); precision@E is the share of the top E findings that are injected errors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.services.review import score_boxes  # noqa: E402
from tests.review_helpers import LABELS, hits, make_corpus  # noqa: E402
from tests.test_review import _Found, inputs_of, objectlab_alone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=0.1)
    args = parser.parse_args()
    ours_all, alone_all, precision_all, seconds = [], [], [], []
    kinds: dict[str, list[tuple[int, int, int]]] = {}
    for seed in range(args.seeds):
        corpus = make_corpus(args.scenes, rate=args.rate, seed=seed)
        images = inputs_of(corpus)
        errors = corpus.injected.count()
        started = time.perf_counter()
        findings = score_boxes(images, LABELS)
        seconds.append(time.perf_counter() - started)
        ours = hits(findings[: 2 * errors], corpus.injected)
        alone = hits([_Found(r) for r in objectlab_alone(images)[: 2 * errors]], corpus.injected)
        per_kind = {k: len(v) for k, v in corpus.injected.shape_ids.items()}
        per_kind["missing"] = len(corpus.injected.removed)
        for kind, n in per_kind.items():
            kinds.setdefault(kind, []).append((ours[kind], alone[kind], n))
        ours_all.append(sum(ours.values()) / errors)
        alone_all.append(sum(alone.values()) / errors)
        precision_all.append(sum(hits(findings[:errors], corpus.injected).values()) / errors)
        print(
            f"seed {seed}: E={errors} recall@2E labelserve {ours_all[-1]:.3f}, ObjectLab alone "
            f"{alone_all[-1]:.3f}, precision@E {precision_all[-1]:.3f}, scoring {seconds[-1]:.2f} s"
        )
    print(f"\n{args.scenes} scenes x {args.seeds} seeds, {args.rate:.0%} of boxes corrupted")
    print(f"{'kind':10} {'labelserve':>10} {'ObjectLab':>10}")
    for kind, rows in kinds.items():
        total = sum(n for *_, n in rows)
        print(f"{kind:10} {sum(r[0] for r in rows) / total:10.3f} {sum(r[1] for r in rows) / total:10.3f}")
    print(f"{'overall':10} {statistics.mean(ours_all):10.3f} {statistics.mean(alone_all):10.3f}")
    print(
        f"precision@E {statistics.mean(precision_all):.3f}; scoring {statistics.mean(seconds):.2f} s per run"
    )


if __name__ == "__main__":
    main()
