"""`labelserve cvat corrections`: how people corrected a pre-labelled CVAT task, per class (accepted,
edited, deleted, missed, acceptance rate), as JSON (or CSV with --csv) on stdout.

Deleted pre-labels are counted only with the state database of the pre-labeling job that uploaded them
(`--state-db`, e.g. OUT/.labelserve-jobs.sqlite3 of `labelserve prelabel --out OUT`, or
LABELSERVE_DATA_DIR/prelabel-jobs.sqlite3 without --out, or a server's LABELSERVE_DATA_DIR/jobs.sqlite3);
`--job` picks one of its jobs, by default the newest completed one that uploaded into the task.
Credentials as for cvat-cli: CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD.

Exit codes: 0 reported, 1 CVAT could not be reached or refused, or the report could not be made (the message
on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "labelserve cvat corrections"


def add_corrections_command(cvat_sub: Any) -> None:
    p = cvat_sub.add_parser(
        "corrections",
        help="per class: pre-labels accepted, edited, deleted, and objects missed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cvat-task",
        required=True,
        metavar="URL",
        help="the task's page (https://cvat.example.com/tasks/42) or SERVER#ID",
    )
    p.add_argument("--cvat-org", metavar="SLUG", help="the organization the task belongs to")
    p.add_argument(
        "--state-db", type=Path, metavar="PATH", help="the pre-labeling job's state database (deletions)"
    )
    p.add_argument("--job", metavar="ID", help="the pre-labeling job in --state-db (default: the newest)")
    p.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    p.set_defaults(func=cmd_corrections)


def cmd_corrections(args: argparse.Namespace) -> int:
    # Imported here: `labelserve serve` builds this parser before anything may import torch.
    from pydantic import ValidationError

    from server.cli.prelabel import cvat_task_fields
    from server.errors import ApiError
    from server.formats.corrections import corrections_csv
    from server.jobs.corrections import CorrectionsRequest, corrections_report, latest_upload, report_rows
    from server.jobs.store import JobStore
    from server.settings import Settings

    if args.job is not None and args.state_db is None:
        return _fail("--job needs --state-db, the database that job is in", EXIT_USAGE)
    if args.state_db is not None and not args.state_db.is_file():
        return _fail(f"--state-db {str(args.state_db)!r} does not exist", EXIT_USAGE)
    try:
        settings = Settings()
        task = CorrectionsRequest(task=cvat_task_fields(args)).task
    except (ValueError, ValidationError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    store = JobStore(args.state_db) if args.state_db is not None else None
    try:
        job = args.job
        if job is None and store is not None:
            job = latest_upload(store, settings, task)
            if job is None:
                return _fail(
                    f"{args.state_db} has no completed job that uploaded into task {task.task_id}", EXIT_USAGE
                )
        report = corrections_report(store, settings, CorrectionsRequest(task=task, prelabel_job=job))
    except ApiError as exc:
        return _fail(exc.message, EXIT_FAILED)
    finally:
        if store is not None:
            store.close()
    print(corrections_csv(*report_rows(report)) if args.csv else json.dumps(report, indent=1), end="\n")
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
