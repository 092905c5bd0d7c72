"""`labelserve` command line: serve, manage weights and API keys, pre-label."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.cli.serve import serve
    from server.ops.logs import configure_logging
    from server.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if args.random_init:
        overrides["random_init"] = True
    if args.models:
        overrides["models"] = args.models.split(",")
    settings = Settings(**overrides)
    configure_logging(settings)
    if args.engine == "ray":
        from server.scale.ray_app import run

        run(overrides)  # the replicas build the app, each with its own models
        return 0
    serve(create_app(settings), settings)
    return 0


def _prelabel_runtime(model: str, sam_refine: str | None):  # -> (get_detector, refine)
    """Models for `labelserve prelabel`, loaded in this process. MODEL is a manifest name or a local
    checkpoint path (.pt), as in LABELSERVE_DETECTOR_PATHS."""
    from server.services.detect import job_runtime
    from server.settings import Settings

    return job_runtime(Settings(), model, sam_refine)


def _sample_runtime(model: str, sam: str | None):  # -> (get_detector, embed)
    """Models for `labelserve prelabel --sample`: the detector, and the SAM model whose pooled image
    embeddings are the images' vectors (none: the detector's own features)."""
    registry, detect = _load_models(model, sam)
    return registry.detector, detect.pooled_embedding_for_job if detect is not None and sam else None


def _load_models(model: str, sam: str | None):  # -> (ModelRegistry, DetectService | None)
    from server.services.detect import load_job_models
    from server.settings import Settings

    return load_job_models(Settings(), model, sam)


def _preload_allocator(argv: list[str]) -> None:
    """Before anything imports torch: the allocator cannot change once the process allocates."""
    from pydantic import ValidationError

    from server.ops import allocator
    from server.settings import Settings

    try:
        choice = Settings().allocator
    except ValidationError:
        return  # the serve command itself reports the bad settings
    allocator.preload(choice, argv)


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: `serve` may re-execute itself before anything imports torch.
    from server.cli.cvat_webhook import add_cvat_commands
    from server.cli.keys import add_keys_commands
    from server.cli.prelabel import add_prelabel_command
    from weights.cli import add_weights_commands

    parser = argparse.ArgumentParser(prog="labelserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (settings: LABELSERVE_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--models", help="comma-separated model names (default: LABELSERVE_MODELS)")
    serve.add_argument(
        "--random-init",
        action="store_true",
        help="build models whose weights are missing with seeded random weights (tests/benchmarks only)",
    )
    serve.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default): this process under uvicorn; ray: worker replicas on Ray Serve, clicks routed "
        "to the replica holding the image (needs the `ray` extra; docs/scale-out.md)",
    )
    serve.set_defaults(func=_serve)
    add_weights_commands(commands)
    add_keys_commands(commands)
    add_prelabel_command(commands, _prelabel_runtime, _sample_runtime)
    add_cvat_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        _preload_allocator(argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
