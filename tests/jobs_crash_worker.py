"""Runs one job with a slow RectDetector until it is killed: the first half of test_jobs' crash-resume test.

Usage: python tests/jobs_crash_worker.py STATE_DB SPEC_JSON CALLS_LOG DELAY_S [seeded]
("seeded": test_review's SeededRectDetector, for a review job.)
Prints the job id, then waits (the test kills it with SIGKILL midway).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.jobs.engine import LocalEngine  # noqa: E402
from server.jobs.spec import JobSpec  # noqa: E402
from tests.jobs_helpers import RectDetector  # noqa: E402


def main() -> None:
    state_db, spec_json, log, delay = sys.argv[1:5]
    if sys.argv[5:] == ["seeded"]:
        from tests.review_helpers import SeededRectDetector

        detector: RectDetector = SeededRectDetector(delay=float(delay), log=Path(log))
    else:
        detector = RectDetector("segment", delay=float(delay), log=Path(log))
    engine = LocalEngine(lambda _: detector, state_db=state_db, readers=2)
    status = engine.submit(JobSpec.model_validate_json(spec_json))
    print(status.id, flush=True)
    while engine.status(status.id).state in ("queued", "running"):
        time.sleep(0.05)


if __name__ == "__main__":
    main()
