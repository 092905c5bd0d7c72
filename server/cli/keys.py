"""`labelserve keys create`: a new random API key, printed once, and the line that grants it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from server.api.auth import KeysFileError, hash_key, new_key, parse_keys_file
from server.settings import ApiKeyEntry, Scope

EXIT_OK, EXIT_USAGE = 0, 2


def add_keys_commands(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="create API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "create",
        help="print a new key (stdout, once) and its keys-file line (stderr)",
        description="The key goes to stdout alone (KEY=$(labelserve keys create ...)); the server only ever "
        "stores its hash, so it cannot be shown again.",
    )
    p.add_argument("--id", required=True, help="who holds the key; the audit log names it")
    p.add_argument("--scopes", required=True, help=f"comma-separated, among {', '.join(get_args(Scope))}")
    p.add_argument(
        "--append",
        type=Path,
        metavar="KEYS_FILE",
        help="also append the line to this keys file (LABELSERVE_API_KEYS_FILE; created 0600)",
    )
    p.set_defaults(func=cmd_create)


def key_line(entry: ApiKeyEntry) -> str:
    return json.dumps(entry.model_dump(mode="json"), separators=(",", ":"))


def cmd_create(args: argparse.Namespace) -> int:
    key = new_key()
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    try:
        entry = ApiKeyEntry(id=args.id, hash=hash_key(key), scopes=scopes)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"labelserve keys create: {problems}", file=sys.stderr)
        return EXIT_USAGE
    line = key_line(entry)
    if args.append is not None:
        if args.append.exists():
            try:
                taken = {e.id for e in parse_keys_file(args.append.read_text(), str(args.append))}
            except (OSError, KeysFileError) as exc:
                print(f"labelserve keys create: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if entry.id in taken:
                print(
                    f"labelserve keys create: {args.append} already has a key {entry.id!r}", file=sys.stderr
                )
                return EXIT_USAGE
        descriptor = os.open(args.append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a") as keys_file:
            keys_file.write(line + "\n")
        print(f"Added to {args.append} (the server reads it again on its next request):", file=sys.stderr)
    else:
        print(
            "Add this line to LABELSERVE_API_KEYS_FILE (or the object to LABELSERVE_API_KEYS):",
            file=sys.stderr,
        )
    print(line, file=sys.stderr)
    print(f"The key for {entry.id!r} follows; it is shown only now:", file=sys.stderr)
    print(key)
    return EXIT_OK
