#!/usr/bin/env python3
"""Throughput of the cold-start pipeline against a local scripted OpenAI-compatible server that
answers at once (every reply right): requests/s and records/s at several concurrencies, and the
client's own time per request (wall time per request at concurrency 1, less the server's).

    python tools/bench_coldstart.py [--records 600] [--concurrency 1 8 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' scripted server


def main() -> None:
    from omegaconf import OmegaConf
    from PIL import Image
    from scripted_server import ScriptedServer

    from megatron_vr1.coldstart.__main__ import main_async

    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    opts = parser.parse_args()
    thinking = " ".join(f"Step {k}: circle {k} sits beside label {k + 1}, so the tally is now {k + 1}." for k in range(5))
    served = {"seconds": 0.0}

    def script(body):
        start = time.perf_counter()
        reply = (f"<think>{thinking}</think> Final Answer: 5" if body["model"] == "reasoner"
                 else "The image shows five circles.")
        served["seconds"] += time.perf_counter() - start
        return 200, reply, {}

    with tempfile.TemporaryDirectory() as tmp, ScriptedServer(script) as server:
        tmp = Path(tmp)
        Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp / "img.png")
        with open(tmp / "records.jsonl", "w") as f:
            for i in range(opts.records):
                f.write(f'{{"id": "r{i}", "problem": "<image>How many circles?", "images": ["img.png"], '
                        f'"answer": "5"}}\n')
        print("| concurrency | requests/s | records/s | kept |\n| --- | --- | --- | --- |")
        for c in opts.concurrency:
            cfg = OmegaConf.load(ROOT / "conf" / "coldstart.yaml")
            del cfg["defaults"], cfg["hydra"]
            cfg.merge_with({"input": str(tmp / "records.jsonl"), "out": str(tmp / f"out{c}"), "progress": False,
                            "max_records_in_flight": c,
                            "mllm": {"base_url": server.url, "model": "mllm", "concurrency": c},
                            "reasoner": {"base_url": server.url, "model": "reasoner", "concurrency": c}})
            before = len(server.requests)
            served["seconds"] = 0.0
            start = time.perf_counter()
            report = asyncio.run(main_async(cfg))
            wall = time.perf_counter() - start
            requests = len(server.requests) - before
            print(f"| {c} | {requests / wall:.0f} | {opts.records / wall:.0f} | {report['kept']} |", flush=True)
            if c == 1:
                overhead = (wall - served["seconds"]) / requests
        print(f"\nclient and pipeline time per request at concurrency 1 (wall less the server's handler time): "
              f"{overhead * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
