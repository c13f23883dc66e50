"""Cost of one population graft: `hf_graft.grafting.graft_members` against a
straightforward reference, on the same machine, in one process.

The reference does what the authors' public code does, written plainly:
  * the scion's weights are handed over through a checkpoint file: every member `torch.save`s its
    state dict, then every member `torch.load`s its scion's (the pre-graft one: in-parallel ring);
  * the entropy of a layer is a Python loop over the 10 bins, each a pair of comparisons over
    the whole layer and a sum; the layer's entropy is read back to the host with one `.item()`;
  * alpha = A/pi * arctan(c * dH) + 0.5 in Python; every floating entry is mixed with the most
    recent conv/linear alpha into a new state dict, which is loaded with `load_state_dict`.
It is also timed without the file hand-over ("reference in memory"), to show where the time goes.

hf_graft's side is `graft_members(members)` plus reading its report (the one host transfer).
Both start every repeat from the same pre-graft weights; they alternate (hf_graft, reference,
reference, hf_graft, ...) so that load from other processes hits both alike; the median of the
repeats is reported. Before timing, one graft of each is compared (max |difference| of the
grafted weights) to show that both do the same work.

In the full run it also measures a few training steps of a K = 2 `cifar_resnet56` population
(batch 128 per member, SGD, random 32x32 inputs: the time of a step does not depend on the pixel
values) and estimates the graft's share of a CIFAR-10 epoch (50,000 images per member) from the
measured step time and the measured graft time. This is an estimate from measured parts (it
leaves data loading and evaluation out, which makes a real epoch longer and the share smaller).

Full-size command (the one behind benchmarks/results/graft_cost.md):

    HF_HUB_OFFLINE=1 python benchmarks/graft_cost.py --repeats 5 --markdown benchmarks/results/graft_cost.md

Quick smoke run (< 1 minute; only cifar_resnet56, one repeat, no training-step estimate):

    HF_HUB_OFFLINE=1 python benchmarks/graft_cost.py --quick

The last line printed is the ratio reference time / hf_graft time (target >= 5x on CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import hf_graft  # noqa: E402,F401  (registers cifar_resnet56 in timm)
from hf_graft.graft.grafting import graft_members  # noqa: E402

CIFAR10_TRAIN_IMAGES = 50_000


# ----------------------------------------------------------------------------- the reference
def reference_entropy(weight: torch.Tensor, bins: int = 10) -> float:
    """Per-bin Python loop (two comparisons and a sum over the layer per bin), one host sync."""
    x = weight.detach().reshape(-1).float()
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / bins
    h = torch.zeros((), dtype=torch.float32)
    for i in range(bins):
        left = lo + i * scale
        inside = (x >= left) & ((x < left + scale) if i < bins - 1 else (x <= hi))  # max in the last bin
        p = inside.sum(dtype=torch.float32) / x.numel()
        h = h - torch.special.xlogy(p, p)
    return h.item()


def reference_graft(members, workdir: Path | None, bins: int = 10, A: float = 0.4, c: float = 500.0) -> None:
    """The ring graft k <- k-1, as the authors' code does it (file hand-over unless workdir is None)."""
    K = len(members)
    if workdir is not None:
        for k, m in enumerate(members):  # each member's end-of-epoch checkpoint = the hand-over file
            torch.save(m.state_dict(), workdir / f"member{k}.pt")
    else:
        snapshots = [{n: t.clone() for n, t in m.state_dict().items()} for m in members]
    for k, m in enumerate(members):
        j = (k - 1) % K
        scion = torch.load(workdir / f"member{j}.pt") if workdir is not None else snapshots[j]
        own = m.state_dict()
        new, alpha = {}, None
        for name, w in own.items():
            if not w.is_floating_point():
                new[name] = w
                continue
            if w.ndim >= 2:
                alpha = A / math.pi * math.atan(c * (reference_entropy(w, bins) - reference_entropy(scion[name], bins)))
                alpha += 0.5
            new[name] = alpha * w + (1 - alpha) * scion[name]
        m.load_state_dict(new)


# ----------------------------------------------------------------------------- timing
def make_members(name: str, K: int) -> list[torch.nn.Module]:
    members = []
    for k in range(K):
        torch.manual_seed(k)
        members.append(timm.create_model(name, pretrained=False).eval())
    return members


def restore(members, states) -> None:
    with torch.no_grad():
        for m, s in zip(members, states):
            for name, t in m.state_dict().items():
                t.copy_(s[name])


def hf_graft_once(members) -> None:
    report = graft_members(members)
    _ = report.members  # the report's one device -> host copy is part of the cost


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_model(name: str, K: int, repeats: int, workdir: Path) -> dict:
    members = make_members(name, K)
    params = sum(p.numel() for p in members[0].parameters())
    pre = [{n: t.clone() for n, t in m.state_dict().items()} for m in members]

    # same work: one graft of each from the same weights, compared
    hf_graft_once(members)
    ours = [{n: t.clone() for n, t in m.state_dict().items()} for m in members]
    restore(members, pre)
    reference_graft(members, workdir)
    diff = max((ours[k][n].float() - t.float()).abs().max().item()
               for k, m in enumerate(members) for n, t in m.state_dict().items() if t.is_floating_point())

    times = {"hf_graft": [], "reference": [], "reference_in_memory": []}
    cpu = {k: [] for k in times}
    for r in range(repeats):
        order = ["hf_graft", "reference", "reference_in_memory"]
        if r % 2:
            order.reverse()
        for which in order:
            restore(members, pre)
            if which == "hf_graft":
                wall, used = timed(lambda: hf_graft_once(members))
            elif which == "reference":
                wall, used = timed(lambda: reference_graft(members, workdir))
            else:
                wall, used = timed(lambda: reference_graft(members, None))
            times[which].append(wall)
            cpu[which].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": name, "params": params, "K": K, "max_abs_diff": diff, "times": times, "cpu": cpu,
            "median": med, "min": best, "median_cpu": med_cpu,
            "ratio": med["reference"] / med["hf_graft"],
            "ratio_min": best["reference"] / best["hf_graft"],
            "ratio_cpu": med_cpu["reference"] / med_cpu["hf_graft"],
            "ratio_in_memory": med["reference_in_memory"] / med["hf_graft"]}


def step_time_estimate(steps: int, batch: int = 128, K: int = 2) -> dict:
    """Median seconds of one training step of a K-member cifar_resnet56 population (SGD, batch
    `batch` per member, each member its own batch), after one warm-up step."""
    from hf_graft.population.students import PopulationSpec, StudentPopulation

    population = StudentPopulation.from_spec(PopulationSpec("cifar_resnet56", K, 10), seed=0).train()
    opt = torch.optim.SGD(population.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, K, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch, K), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        population(pixel_values=x, labels=y)["loss"].backward()
        opt.step()

    step()
    times = [timed(step)[0] for _ in range(steps)]
    med = statistics.median(times)
    return {"steps": steps, "batch": batch, "K": K, "times": times, "median": med, "images_per_s": batch / med}


def environment() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(), "loadavg": load,
    }


def fmt_times(v) -> str:
    return ", ".join(f"{t:.3f}" for t in v)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="cifar_resnet56 only, 1 repeat, no step estimate")
    parser.add_argument("--models", nargs="+", default=["resnet50", "cifar_resnet56"])
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps for the epoch-share estimate (0: skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a shared CPU, several threads per op "
                             "wait for the slowest one; 0 keeps torch's own choice)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results as a markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.steps = ["cifar_resnet56"], 1, 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    results = []
    with tempfile.TemporaryDirectory(prefix="graft_cost_") as tmp:
        for name in args.models:
            res = bench_model(name, args.members, args.repeats, Path(tmp))
            results.append(res)
            med = res["median"]
            print(f"{name} ({res['params'] / 1e6:.2f} M params, K={res['K']}): hf_graft median {med['hf_graft']:.4f} s "
                  f"[{fmt_times(res['times']['hf_graft'])}]; reference median {med['reference']:.4f} s "
                  f"[{fmt_times(res['times']['reference'])}]; reference in memory median "
                  f"{med['reference_in_memory']:.4f} s; CPU time medians {res['median_cpu']['hf_graft']:.4f} / "
                  f"{res['median_cpu']['reference']:.4f} s; same result: max |diff| {res['max_abs_diff']:.2e}")
    estimate = None
    if args.steps > 0:
        torch.set_grad_enabled(True)
        estimate = step_time_estimate(args.steps)
        graft = next((r["median"]["hf_graft"] for r in results if r["model"] == "cifar_resnet56"), None)
        steps_per_epoch = math.ceil(CIFAR10_TRAIN_IMAGES / estimate["batch"])
        estimate["steps_per_epoch"] = steps_per_epoch
        estimate["epoch_s"] = steps_per_epoch * estimate["median"]
        estimate["graft_s"] = graft
        if graft is not None:
            estimate["share"] = graft / estimate["epoch_s"]
        print(f"ESTIMATE cifar_resnet56 K=2 training step (batch {estimate['batch']} per member): median "
              f"{estimate['median']:.3f} s [{fmt_times(estimate['times'])}] = {estimate['images_per_s']:.1f} images/s "
              f"per member; epoch of {CIFAR10_TRAIN_IMAGES} images = {steps_per_epoch} steps ~ {estimate['epoch_s']:.0f} s"
              + (f"; graft {graft:.4f} s = {100 * estimate['share']:.4f}% of the epoch (target < 0.5%)" if graft else ""))
    if args.markdown:
        write_markdown(args.markdown, env, results, estimate, args)
    ratios = ", ".join(f"{r['model']} {r['ratio']:.1f}x (min {r['ratio_min']:.1f}x, CPU time {r['ratio_cpu']:.1f}x)"
                       for r in results)
    print(f"RATIO reference / hf_graft graft time (K={args.members}, median wall): {ratios} (target >= 5x)")


def write_markdown(path: Path, env: dict, results: list[dict], estimate: dict | None, args) -> None:
    argv = " ".join(sys.argv[1:])
    lines = [
        "# Cost of one population graft",
        "",
        f"Command: `HF_HUB_OFFLINE=1 python benchmarks/graft_cost.py {argv}`",
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, timm {env['timm']}, "
        f"{env['cpu_count']} CPUs visible, {env['torch_threads']} torch threads, "
        f"load average at start {env['loadavg']}.",
        "",
        "| model | params | K | hf_graft median (min) s | reference median (min) s | reference in memory median s "
        "| **ratio ref / hf_graft** (median wall) | ratio (min wall) | ratio (median CPU time) | ratio in memory "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, b = r["median"], r["min"]
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['K']} | {m['hf_graft']:.4f} ({b['hf_graft']:.4f}) | "
                     f"{m['reference']:.4f} ({b['reference']:.4f}) | {m['reference_in_memory']:.4f} | "
                     f"**{r['ratio']:.1f}x** | {r['ratio_min']:.1f}x | {r['ratio_cpu']:.1f}x | "
                     f"{r['ratio_in_memory']:.1f}x | {r['max_abs_diff']:.1e} |")
    lines += ["", "Every repeat, wall seconds (CPU seconds of the process):", ""]
    for r in results:
        for k, v in r["times"].items():
            pairs = ", ".join(f"{w:.3f} ({c:.3f})" for w, c in zip(v, r["cpu"][k]))
            lines.append(f"- {r['model']} {k}: {pairs}")
    if estimate:
        lines += [
            "",
            "## Graft share of a CIFAR-10 epoch (ESTIMATE from measured parts)",
            "",
            f"- measured: one training step of a K=2 cifar_resnet56 population, batch {estimate['batch']} per member "
            f"(forward, backward, SGD step; random inputs), median of {estimate['steps']} steps after a warm-up: "
            f"{estimate['median']:.3f} s [{fmt_times(estimate['times'])}] = {estimate['images_per_s']:.1f} images/s per member",
            f"- estimated epoch: {estimate['steps_per_epoch']} steps x {estimate['median']:.3f} s = {estimate['epoch_s']:.0f} s "
            "(without data loading and evaluation)",
        ]
        if estimate.get("graft_s") is not None:
            lines.append(f"- measured graft (above): {estimate['graft_s']:.4f} s -> **{100 * estimate['share']:.4f}% of the "
                         "epoch** (target < 0.5%)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
