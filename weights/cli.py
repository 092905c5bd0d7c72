"""`labelserve weights list|fetch|verify`: registered onto the main CLI's argparse sub-parsers."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from weights import store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_weights_commands(subparsers: Any) -> None:
    """`subparsers` is what `ArgumentParser.add_subparsers()` returned; each leaf sets `func(args) -> int`."""
    weights = subparsers.add_parser("weights", help="list, fetch and verify model checkpoints")
    sub = weights.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    # Resolved when the command runs, not here, so the env var is read at the last moment.
    common.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="weights directory (default: $LABELSERVE_WEIGHTS_DIR or ~/.cache/labelserve/weights)",
    )

    p = sub.add_parser("list", parents=[common], help="known checkpoints and whether they are on disk")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fetch", parents=[common], help="download a checkpoint and verify its sha256")
    p.add_argument("name")
    p.add_argument("--url", help="download from here instead of the manifest URL (a mirror)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("verify", parents=[common], help="check size and sha256 of present checkpoints")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every checkpoint present")
    p.add_argument("--rehash", action="store_true", help="ignore verification stamps and hash again")
    p.set_defaults(func=cmd_verify)


def _dir(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else store.default_weights_dir()


def cmd_list(args: argparse.Namespace) -> int:
    weights_dir = _dir(args)
    rows = [("NAME", "ARCHITECTURE", "SIZE MB", "STATUS", "LICENSE")]
    for e in store.load_manifest().values():
        size = "?" if e.size is None else f"{e.size / 1e6:.1f}"
        rows.append((e.name, e.architecture, size, store.status(e, weights_dir), e.license))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"weights dir: {weights_dir}")
    for r in rows:
        cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        print("  ".join(cells).rstrip())
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    weights_dir = _dir(args)
    progress = _Progress(args.name)
    try:
        path = store.fetch(args.name, weights_dir, url=args.url, timeout=args.timeout, progress=progress)
    except store.UnknownWeights as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (store.WeightsError, OSError) as exc:
        progress.end_line()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok  {args.name}  {path}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    weights_dir = _dir(args)
    manifest = store.load_manifest()
    try:
        entries = [store.get_entry(n, manifest) for n in args.names]
    except store.UnknownWeights as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not entries:
        entries = [e for e in manifest.values() if store.weights_path(e, weights_dir).exists()]
        if not entries:
            print(f"no known checkpoints present in {weights_dir}")
            return EXIT_OK
    failed = False
    for e in entries:
        try:
            store.verify(e, store.weights_path(e, weights_dir), use_stamp=not args.rehash)
            print(f"ok        {e.name}")
        except store.MissingWeights as exc:
            failed = True  # explicitly named, so absence is a failure
            print(f"MISSING   {e.name}: {exc}")
        except store.ChecksumMismatch as exc:
            failed = True
            print(f"MISMATCH  {e.name}: {exc}")
    return EXIT_FAILED if failed else EXIT_OK


class _Progress:
    """Percentage on stderr: rewritten in place on a terminal, a line per 10% in logs."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_step = -1
        self.last_time = 0.0
        self.mid_line = False

    def end_line(self) -> None:
        if self.mid_line:
            print(file=self.stream)
            self.mid_line = False

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if self.tty:
            if now - self.last_time < 0.2 and done < total:
                return
            self.mid_line = done < total
            end = "" if self.mid_line else "\n"
            print(
                f"\r{self.name}: {pct:5.1f}% ({done / 1e6:.1f}/{total / 1e6:.1f} MB)",
                end=end,
                file=self.stream,
                flush=True,
            )
        elif (step := int(pct // 10)) > self.last_step:
            print(f"{self.name}: {step * 10}% ({done / 1e6:.1f}/{total / 1e6:.1f} MB)", file=self.stream)
        else:
            return
        self.last_time, self.last_step = now, int(pct // 10)
