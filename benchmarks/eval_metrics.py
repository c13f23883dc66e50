"""The per-evaluation population metrics: the shipped `evaluate` metric (an Arrow round trip of every
logit) against the function it wraps, computed directly (what the trainer calls), on an ImageNet-size
evaluation: 50,000 images x K members x 1,000 classes of float32 logits. Same numbers, in one run.

    python benchmarks/eval_metrics.py [--images 50000] [--members 2] [--classes 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_graft.metrics import load_population_accuracy  # noqa: E402
from hf_graft.metrics.accuracy import population_accuracy  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.images, args.members, args.classes, generator=generator).numpy()
    labels = torch.randint(0, args.classes, (args.images,), generator=generator).numpy()
    metric = load_population_accuracy()
    times = {"evaluate metric": [], "direct": []}
    results = {}
    for _ in range(args.repeats):  # alternated
        start = time.perf_counter()
        results["evaluate metric"] = metric.compute(predictions=logits, references=labels)
        times["evaluate metric"].append(time.perf_counter() - start)
        start = time.perf_counter()
        results["direct"] = population_accuracy(torch.from_numpy(logits), torch.from_numpy(labels))
        times["direct"].append(time.perf_counter() - start)
    same = results["evaluate metric"] == results["direct"]
    slow, fast = statistics.median(times["evaluate metric"]), statistics.median(times["direct"])
    print(f"{args.images} images x {args.members} members x {args.classes} classes, median of {args.repeats}")
    print(f"evaluate metric: {slow:.2f} s; direct: {fast:.2f} s; ratio {slow / fast:.1f}x; same results: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
