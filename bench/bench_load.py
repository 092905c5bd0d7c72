"""Many annotators at once against one `labelserve serve` process: each opens its own image (embed, the
warm-up), then clicks on it with think time for a minute. Prints warm-up time, click latency and the server's
RSS over the minute, per number of annotators.

    python bench/bench_load.py --model mobile_sam --clients 16 --seconds 60
    python bench/bench_load.py --model sam_vit_h --clients 16 32 --device cuda   # on a GPU host

The same harness backs tests/test_reliability.py, which asserts what this only reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.annotators import run_annotators  # noqa: E402
from tests.server_process import ServerProcess  # noqa: E402


def one_run(model: str, clients: int, seconds: float, device: str, cache_mib: int, stagger_s: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="labelserve-load-"))
    env = {
        "LABELSERVE_WEIGHTS_DIR": str(tmp / "weights"),
        "LABELSERVE_DATA_DIR": str(tmp / "data"),
        "LABELSERVE_MODELS": model,
        "LABELSERVE_DEVICE": device,
        "LABELSERVE_CACHE_BYTES": str(cache_mib * 2**20),
    }
    with ServerProcess(env, tmp / "server.log", random_init=True, timeout=300) as server:
        report = asyncio.run(
            run_annotators(server.url, server.process.pid, clients, seconds, stagger_s=stagger_s, model=model)
        )
    summary = report.summary()
    steady = [mib for t, mib in report.rss_mib if t >= 10]
    half = len(steady) // 2
    summary["rss_first_half_mib"] = statistics.median(steady[:half]) if half else None
    summary["rss_second_half_mib"] = statistics.median(steady[half:]) if half else None
    summary["clicks_per_s"] = len(report.click_ms) / seconds
    summary["model"] = model
    del summary["rss_mib"]
    return summary


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--clients", type=int, nargs="+", default=[16])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-mib", type=int, default=2048)
    parser.add_argument("--stagger", type=float, default=1.0, help="seconds between annotators' first embeds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    host = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"{args.model} on {host}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| annotators | warm-up (all embedded, starts staggered) | embed p50 / p95 | clicks/s | "
          "click p50 / p95 | errors | RSS median, 1st / 2nd half of the minute |")  # fmt: skip
    print("|---|---|---|---|---|---|---|", flush=True)
    results = []
    for clients in args.clients:
        r = one_run(args.model, clients, args.seconds, args.device, args.cache_mib, args.stagger)
        results.append(r)
        errors = sum(r["errors"].values()) + r["busy_503"]
        print(f"| {clients} | {r['warmup_s']:.1f} s ({r['opened']}/{clients}) | "
              f"{r['embed_p50_ms']:.0f} / {r['embed_p95_ms']:.0f} ms | {r['clicks_per_s']:.1f} | "
              f"{r['click_p50_ms']:.0f} / {r['click_p95_ms']:.0f} ms | {errors} | "
              f"{r['rss_first_half_mib']:.0f} / {r['rss_second_half_mib']:.0f} MiB |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
