"""`labelserve cvat webhook register`: the CVAT webhook that tells this server when a job starts.

CVAT then posts its events (by default `update:job`) to TARGET_URL/v1/cvat/webhooks/PROFILE, signed with
the profile's webhook_secret from LABELSERVE_CVAT_PROFILES, which the server checks on every delivery. The
webhook is created through cvat-sdk with the profile's credentials, for one project or a whole organization.

Exit codes: 0 created (its id and target printed on stdout as one JSON line), 1 CVAT could not be reached or
refused (its message on stderr), 2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from server.cli.corrections import add_corrections_command

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "labelserve cvat webhook register"
WEBHOOK_PATH = "/v1/cvat/webhooks/"  # the server's route; the profile name follows it
DESCRIPTION = "labelserve: warm embeddings for jobs that start"


def add_cvat_commands(subparsers: Any) -> None:
    cvat = subparsers.add_parser("cvat", help="set up CVAT servers to work with this one")
    cvat_sub = cvat.add_subparsers(dest="cvat_command", required=True, metavar="COMMAND")
    webhook = cvat_sub.add_parser("webhook", help="CVAT webhooks that notify this server")
    webhook_sub = webhook.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")
    p = webhook_sub.add_parser(
        "register",
        help="create a CVAT webhook that posts to this server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--profile",
        required=True,
        help="a LABELSERVE_CVAT_PROFILES name: the CVAT server, its credentials and the webhook_secret",
    )
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--project", type=int, metavar="ID", help="the CVAT project whose events are sent")
    scope.add_argument(
        "--org", metavar="SLUG", help="the CVAT organization whose events are sent (all its projects)"
    )
    p.add_argument(
        "--target-url",
        required=True,
        metavar="URL",
        help="this server's address as CVAT reaches it, e.g. https://labelserve.example.com",
    )
    p.add_argument("--events", default="update:job", help="comma-separated CVAT events (default: update:job)")
    p.add_argument(
        "--no-verify-ssl",
        action="store_true",
        help="CVAT does not verify this server's TLS certificate (a self-signed one)",
    )
    p.set_defaults(func=cmd_register)
    add_corrections_command(cvat_sub)


def cmd_register(args: argparse.Namespace) -> int:
    # Imported here: `labelserve serve` builds this parser before anything may import torch.
    from pydantic import ValidationError

    from server.cvat.tasks import Connections, cvat_errors
    from server.errors import ApiError
    from server.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(f"bad settings: {exc}", EXIT_USAGE)
    profile = settings.cvat_profiles.get(args.profile)
    if profile is None:
        known = ", ".join(sorted(settings.cvat_profiles)) or "none"
        return _fail(f"no CVAT profile {args.profile!r} (LABELSERVE_CVAT_PROFILES has: {known})", EXIT_USAGE)
    if profile.webhook_secret is None:
        return _fail(
            f"CVAT profile {args.profile!r} has no webhook_secret: set one in LABELSERVE_CVAT_PROFILES "
            "(the server refuses deliveries it cannot verify), then register again",
            EXIT_USAGE,
        )
    events = [event.strip() for event in args.events.split(",") if event.strip()]
    if not events:
        return _fail("--events names no event", EXIT_USAGE)
    target_url = args.target_url.rstrip("/") + WEBHOOK_PATH + quote(args.profile, safe="")
    kind = "project" if args.project is not None else "organization"
    try:
        with Connections(settings) as connections:
            client = connections.client_for_profile(args.profile, organization=args.org)
            from cvat_sdk.api_client import exceptions, models  # importable: the client exists

            try:
                request = models.WebhookWriteRequest(
                    target_url=target_url,
                    type=models.WebhookType(kind),
                    events=[models.EventsEnum(event) for event in events],
                    content_type=models.WebhookContentType("application/json"),
                    secret=profile.webhook_secret.get_secret_value(),
                    is_active=True,
                    enable_ssl=not args.no_verify_ssl,
                    description=DESCRIPTION,
                    **({"project_id": args.project} if args.project is not None else {}),
                )
            except exceptions.OpenApiException as exc:  # cvat-sdk checks event names itself
                return _fail(f"--events: {exc}", EXIT_USAGE)
            with cvat_errors("creating the webhook", client.api_map.host):
                created, _ = client.api_client.webhooks_api.create(request)
    except ApiError as exc:
        return _fail(exc.message, EXIT_FAILED)
    where = {"project_id": args.project} if args.project is not None else {"organization": args.org}
    summary = {
        "id": created.id,
        "target_url": created.target_url,
        "events": [str(event) for event in created.events],
        "type": kind,
        **where,
    }
    print(json.dumps(summary))
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code
