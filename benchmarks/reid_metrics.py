"""Time of `hf_graft.metrics.reid.reid_metrics` (mAP and CMC, Market-1501 protocol) against a
straightforward per-query NumPy implementation of the same protocol, at Market-1501's size.

The features are synthetic, shaped like Market-1501's evaluation set: 3,368 queries and 15,913
gallery images (2,793 of them distractors, identity 0), 750 identities, 6 cameras, 2,048-d
features. Each identity has a centre; an image's feature is its identity's centre plus noise
(a distractor's, noise alone), so that retrieval is far from perfect and far from chance. Every
value is a small integer stored as float32: distances are then exact integers (below 2^24) however
they are summed, both sides rank identical distances, and the results must agree to the last digit
(the check below allows 1e-6); ties in distance occur and are ordered by gallery index on both sides.

The reference (`reference_metrics`, written plainly in this file) takes one query at a time: its
squared distances to the whole gallery (`((gallery - query) ** 2).sum(1)`), a stable argsort, the
gallery images of its identity and camera left out, the first match for the CMC, and the average
precision. Two more per-query variants show where the time goes: the distances by a matrix-vector
product (`|g|^2 + |q|^2 - 2 g.q`), and all distances by one matrix product computed up front (the
[3,368 x 15,913] matrix, 214 MB) followed by the per-query ranking.

The sides alternate (hf_graft, reference, ..., then reversed) and the median of the repeats is
reported; both run on `--threads` threads (torch's and the BLAS's, default 1: the machine's cores
are shared).

Full-size command (the one behind benchmarks/results/reid_metrics.md; about 15 minutes on 2 cores):

    HF_HUB_OFFLINE=1 python benchmarks/reid_metrics.py --repeats 3 --markdown benchmarks/results/reid_metrics.md

Quick smoke run (< 1 minute; 300 queries, 1,500 gallery images, 256-d, one repeat):

    HF_HUB_OFFLINE=1 python benchmarks/reid_metrics.py --quick

The last line printed is the ratio reference time / hf_graft time (target >= 10x).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_graft.metrics.reid import reid_metrics  # noqa: E402

RANKS = (1, 5, 10)


# ----------------------------------------------------------------------------- synthetic Market-sized features
def synthetic_market(num_query: int, num_gallery: int, num_distractors: int, dim: int, identities: int,
                     cameras: int, signal: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Integer-valued float32 features: identity centre in {-1, 0, 1} on a random fraction `signal` of the
    dimensions, plus noise in {-2..2}; identities 1..`identities`, distractors identity 0 (noise only)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(-1, 2, size=(identities + 1, dim)) * (rng.random((identities + 1, dim)) < signal)
    centres[0] = 0  # distractors: no identity
    q_ids = rng.integers(1, identities + 1, size=num_query)
    g_ids = np.concatenate([np.zeros(num_distractors, np.int64),
                            rng.integers(1, identities + 1, size=num_gallery - num_distractors)])
    rng.shuffle(g_ids)

    def features(ids):
        return (centres[ids] + rng.integers(-2, 3, size=(len(ids), dim))).astype(np.float32)

    return {"qf": features(q_ids), "gf": features(g_ids), "q_ids": q_ids, "g_ids": g_ids,
            "q_cams": rng.integers(1, cameras + 1, size=num_query), "g_cams": rng.integers(1, cameras + 1, size=num_gallery)}


# ----------------------------------------------------------------------------- the reference
def _rank_one(d, q_id, q_cam, g_ids, g_cams):
    """(rank of the first match, AP) of one query from its distances; None when it has no match."""
    order = np.argsort(d, kind="stable")  # ties: lower gallery index first
    kept = ~((g_ids[order] == q_id) & (g_cams[order] == q_cam))
    match = (g_ids[order] == q_id)[kept]
    if not match.any():
        return None
    positions = np.flatnonzero(match) + 1  # 1-based ranks of the matches among the kept images
    return positions[0], float(np.mean(np.arange(1, len(positions) + 1) / positions))


def _summary(per_query, num_query):
    valid = [r for r in per_query if r is not None]
    first = np.array([r[0] for r in valid])
    result = {"mAP": 100.0 * float(np.mean([r[1] for r in valid]))}
    result.update({f"rank{k}": 100.0 * float(np.mean(first <= k)) for k in RANKS})
    result.update(valid_queries=len(valid), skipped_queries=num_query - len(valid))
    return result


def reference_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams):
    """One query at a time: squared distances to the gallery, then `_rank_one`."""
    return _summary([_rank_one(((gf - q) ** 2).sum(1), q_ids[i], q_cams[i], g_ids, g_cams)
                     for i, q in enumerate(qf)], len(qf))


def reference_matvec(qf, gf, q_ids, g_ids, q_cams, g_cams):
    """One query at a time, its distances by a matrix-vector product."""
    g_sq = (gf * gf).sum(1)
    return _summary([_rank_one(g_sq + q @ q - 2.0 * (gf @ q), q_ids[i], q_cams[i], g_ids, g_cams)
                     for i, q in enumerate(qf)], len(qf))


def reference_precomputed(qf, gf, q_ids, g_ids, q_cams, g_cams):
    """All distances by one matrix product, then one query at a time."""
    dist = (qf * qf).sum(1)[:, None] + (gf * gf).sum(1)[None, :] - 2.0 * (qf @ gf.T)
    return _summary([_rank_one(dist[i], q_ids[i], q_cams[i], g_ids, g_cams) for i in range(len(qf))], len(qf))


def hf_graft_metrics(data):
    return reid_metrics(data["qf_t"], data["gf_t"], data["q_ids_t"], data["g_ids_t"], data["q_cams_t"],
                        data["g_cams_t"], ranks=RANKS)


# ----------------------------------------------------------------------------- timing
def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - t0, time.process_time() - c0


def environment(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu_count": os.cpu_count(), "threads": threads, "processor": platform.processor() or platform.machine(),
            "loadavg": tuple(round(x, 2) for x in load) if load else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 queries, 1,500 gallery images, 256-d, 1 repeat")
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--distractors", type=int, default=2793)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--identities", type=int, default=750)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--signal", type=float, default=0.5,
                        help="fraction of the dimensions that carry an identity's centre (sets how hard retrieval is)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["matvec", "precomputed"],
                        choices=["matvec", "precomputed"], help="reference variants timed beside the reference")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads, both sides")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results as a markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.gallery, args.distractors, args.dim, args.identities, args.repeats = 300, 1500, 260, 256, 70, 1
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    torch.set_num_threads(args.threads)

    env = environment(args.threads)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    data = synthetic_market(args.queries, args.gallery, args.distractors, args.dim, args.identities, args.cameras,
                            args.signal)
    data.update({f"{k}_t": torch.from_numpy(v) for k, v in list(data.items())})
    numpy_args = [data[k] for k in ("qf", "gf", "q_ids", "g_ids", "q_cams", "g_cams")]
    sides = {"hf_graft": lambda: hf_graft_metrics(data), "reference": lambda: reference_metrics(*numpy_args)}
    variants = {"matvec": reference_matvec, "precomputed": reference_precomputed}
    for name in args.variants:
        sides[f"reference_{name}"] = (lambda fn: lambda: fn(*numpy_args))(variants[name])

    # a warm-up of every side on the first 20 queries (first-call costs: allocator, lazy initialisation)
    warm = {k: (v[:20] if k in ("qf", "q_ids", "q_cams") else v) for k, v in data.items()}
    warm.update({f"{k}_t": torch.from_numpy(warm[k]) for k in ("qf", "q_ids", "q_cams")})
    hf_graft_metrics(warm)
    for name in args.variants:
        variants[name](*[warm[k] for k in ("qf", "gf", "q_ids", "g_ids", "q_cams", "g_cams")])
    reference_metrics(*[warm[k] for k in ("qf", "gf", "q_ids", "g_ids", "q_cams", "g_cams")])

    times = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    results = {}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            result, wall, used = timed(sides[name])
            times[name].append(wall)
            cpu[name].append(used)
            results.setdefault(name, result)
            print(f"repeat {r}: {name} {wall:.3f} s", flush=True)
    ours = results["hf_graft"]
    differences = {name: max(abs(float(res[k]) - float(ours[k])) for k in ours) for name, res in results.items()}
    same = all(set(res) == set(ours) for res in results.values()) and max(differences.values()) <= 1e-6
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print("results: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ours.items()))
    for name in sides:
        print(f"{name}: median {med[name]:.3f} s [{', '.join(f'{t:.3f}' for t in times[name])}], CPU median "
              f"{med_cpu[name]:.3f} s, max |difference| to hf_graft {differences[name]:.1e}")
    if not same:
        print(f"MISMATCH: results differ from hf_graft's by up to {max(differences.values()):.2e}")
    if args.markdown:
        write_markdown(args.markdown, env, args, ours, times, cpu, med, med_cpu, differences, same)
    others = ", ".join(f"{name} {med[name] / med['hf_graft']:.1f}x" for name in sides if name.startswith("reference_"))
    print(f"RATIO reference / hf_graft reid_metrics time (median wall, {args.queries} x {args.gallery}, {args.dim}-d): "
          f"{med['reference'] / med['hf_graft']:.1f}x, CPU time {med_cpu['reference'] / med_cpu['hf_graft']:.1f}x"
          + (f"; {others}" if others else "") + f"; same results: {'yes' if same else 'NO'} (target >= 10x)")
    if not same:
        raise SystemExit(1)


def write_markdown(path, env, args, ours, times, cpu, med, med_cpu, differences, same) -> None:
    argv = " ".join(sys.argv[1:])
    lines = [
        "# reid_metrics against a per-query NumPy reference",
        "",
        f"Command: `HF_HUB_OFFLINE=1 python benchmarks/reid_metrics.py {argv}`",
        "",
        f"Environment: Python {env['python']}, torch {env['torch']}, NumPy {env['numpy']}, {env['cpu_count']} CPUs "
        f"visible, {env['threads']} torch / BLAS thread(s) on both sides, load average at start {env['loadavg']}.",
        "",
        f"Data: {args.queries} queries x {args.gallery} gallery images ({args.distractors} distractors), {args.dim}-d "
        f"integer-valued float32 features, {args.identities} identities, {args.cameras} cameras.",
        "",
        "Results (every side the same: " + ("yes" if same else "**NO**") + "): "
        + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ours.items()) + ".",
        "",
        "| side | median wall s | min wall s | median CPU s | ratio to hf_graft (median wall) | ratio (median CPU) "
        "| max abs difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in times:
        lines.append(f"| {name} | {med[name]:.3f} | {min(times[name]):.3f} | {med_cpu[name]:.3f} | "
                     f"{med[name] / med['hf_graft']:.1f}x | {med_cpu[name] / med_cpu['hf_graft']:.1f}x | "
                     f"{differences[name]:.1e} |")
    lines += ["", "Every repeat, wall seconds (CPU seconds of the process):", ""]
    for name in times:
        lines.append(f"- {name}: " + ", ".join(f"{w:.3f} ({c:.3f})" for w, c in zip(times[name], cpu[name])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
