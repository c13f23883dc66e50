"""Small-scale reproduction of filter grafting on CIFAR-10 with cifar_resnet20 (issue 8, item 3).

Every method runs through hf_graft's own path (`hf_graft.train.run_training` with `DataArguments` +
`GraftingConfig`, i.e. `GraftingTrainer`), on a fixed subset of CIFAR-10 and a fixed epoch budget:

  baseline      K=1, graft_source none
  independent2  K=2, graft_source none, lr_spread cosine (the grafting run's rates, lr 0.05 / 0.1)
  ensemble2     the independent pair's eval_ensemble_top1 (mean of the two softmaxes)
  graft2        K=2, external grafting, lr_spread cosine
  graft3        K=3, external grafting, lr_spread cosine
and the knob variants (graft2 with one change each):
  graft2_shared_init   shared_init: true (one initialisation for both members)
  graft2_warmup        graft_start_epoch: W (members train alone for W epochs, then graft)
  graft2_avg           graft_A: 0 (plain averaging, the ablation of the entropy weighting)
  graft2_bnrecal       bn_recalibration_batches: 5 (BN running stats re-estimated after each graft)
  mnv2_baseline / mnv2_graft2   the same with cifar_mobilenetv2 (depthwise layers)

Per method: mean +- std (over seeds and members) of the members' final top-1, the best member,
the invalid-filter ratio (l1 < 1e-2 and < 0.1, `hf_graft.filters.filter_report`) of the final
networks, the alpha distribution of the grafts, and, for grafting runs, every member's top-1 on
the first 500 eval images right before and right after grafts 1, 2 and the last (and after the graft with
BatchNorm statistics recomputed on 5 training batches, on a copy; diagnostics only).

Results are appended run by run to `<work-dir>/runs.jsonl` (a rerun with the same --work-dir skips
runs already there) and the markdown table is rewritten after every run, so a partial table
survives an interrupted run.

Full-size command (the one that produced benchmarks/results/reproduce_small.md; about 2 hours on 2
shared CPU cores, ~40 minutes of it the cifar_mobilenetv2 runs, which --no-mnv2 skips):

    HF_HUB_OFFLINE=1 nohup python benchmarks/reproduce_small.py \
        --train-samples 2000 --eval-samples 1000 --epochs 8 --seeds 0 1 --knob-seeds 0 \
        --work-dir /tmp/hf_graft_repro > /tmp/hf_graft_repro.log 2>&1 &

The results file's findings section was added afterwards from the same work dir with
`--report-only --notes FINDINGS.md` (no training; the table is recomputed from runs.jsonl).

Quick smoke run (< 1 minute; used by tests/test_benchmarks.py):

    HF_HUB_OFFLINE=1 python benchmarks/reproduce_small.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = str((REPO.parent / "shared" / "data" / "cifar10").resolve())
if not os.path.isdir(DEFAULT_DATASET):
    DEFAULT_DATASET = "/work/shared/data/cifar10"

THRESHOLDS = (0.01, 0.1)
DIAG_EVAL_IMAGES = 500
DIAG_BN_BATCHES = 5

CORE_METHODS = ["baseline", "independent2", "graft2", "graft3"]
KNOB_METHODS = ["graft2_shared_init", "graft2_warmup", "graft2_avg", "graft2_bnrecal"]
MNV2_METHODS = ["mnv2_baseline", "mnv2_graft2"]


def method_overrides(name: str, epochs: int) -> dict:
    """GraftingConfig fields of one method (on top of the common settings)."""
    graft2 = {"num_students": 2, "graft_source": "external", "lr_spread": ["cosine"]}
    table = {
        "baseline": {"num_students": 1, "graft_source": "none"},
        "independent2": {"num_students": 2, "graft_source": "none", "lr_spread": ["cosine"]},
        "graft2": graft2,
        "graft3": {"num_students": 3, "graft_source": "external", "lr_spread": ["cosine"]},
        "graft2_shared_init": {**graft2, "shared_init": True},
        "graft2_warmup": {**graft2, "graft_start_epoch": max(2, epochs // 2)},
        "graft2_avg": {**graft2, "graft_A": 0.0},
        "graft2_bnrecal": {**graft2, "bn_recalibration_batches": 5},
        "mnv2_baseline": {"num_students": 1, "graft_source": "none", "student_model": "cifar_mobilenetv2"},
        "mnv2_graft2": {**graft2, "student_model": "cifar_mobilenetv2"},
    }
    if name not in table:
        raise SystemExit(f"reproduce_small.py: unknown method {name!r}; allowed: {', '.join(table)}")
    return table[name]


# ----------------------------------------------------------------------------- instrumentation
class _Capture:
    """Wraps GraftingTrainer.train / .graft (benchmark instrumentation only, the library is untouched):
    keeps the trainer of the current run and measures every member right before and after each graft."""

    trainer = None
    diagnostics: list = []
    enabled = True

    @classmethod
    def install(cls):
        from hf_graft.trainer import GraftingTrainer

        if getattr(GraftingTrainer, "_repro_wrapped", False):
            return
        train, graft = GraftingTrainer.train, GraftingTrainer.graft

        def wrapped_train(self, *args, **kwargs):
            cls.trainer = self
            return train(self, *args, **kwargs)

        def wrapped_graft(self, step):
            args = self.args
            last = int(args.num_train_epochs) - args.graft_start_epoch  # number of grafts of the run
            if not cls.enabled or step + 1 not in (1, 2, last):  # diagnostics at grafts 1, 2 and the last
                return graft(self, step)
            before = _member_top1(self.population.members, self.eval_dataset)
            report = graft(self, step)
            after = _member_top1(self.population.members, self.eval_dataset)
            recal = [copy.deepcopy(m) for m in self.population.members]
            _recalibrate(recal, self.train_dataset, self.args.per_device_train_batch_size, seed=step)
            after_bn = _member_top1(recal, self.eval_dataset)
            cls.diagnostics.append({"graft": step + 1, "before": before, "after": after, "after_bn_recal": after_bn})
            return report

        GraftingTrainer.train, GraftingTrainer.graft = wrapped_train, wrapped_graft
        GraftingTrainer._repro_wrapped = True


def _batches(dataset, indices, batch_size):
    from torch.utils.data import default_collate

    for start in range(0, len(indices), batch_size):
        yield default_collate([dataset[i] for i in indices[start:start + batch_size]])


@torch.no_grad()
def _member_top1(members, eval_dataset) -> list[float]:
    n = min(DIAG_EVAL_IMAGES, len(eval_dataset))
    correct = [0] * len(members)
    modes = [m.training for m in members]
    for m in members:
        m.eval()
    for batch in _batches(eval_dataset, list(range(n)), 250):
        x, y = batch["pixel_values"], batch["labels"]
        for k, m in enumerate(members):
            correct[k] += int((m(x).argmax(-1) == y).sum())
    for m, mode in zip(members, modes):
        m.train(mode)
    return [100.0 * c / n for c in correct]


@torch.no_grad()
def _recalibrate(members, train_dataset, batch_size, seed):
    generator = torch.Generator().manual_seed(1234 + seed)
    order = torch.randperm(len(train_dataset), generator=generator)[: DIAG_BN_BATCHES * batch_size].tolist()
    for m in members:
        for bn in m.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None
        m.train()
    for batch in _batches(train_dataset, order, batch_size):
        x = batch["pixel_values"]
        for k, m in enumerate(members):
            m(x[:, k] if x.ndim == 5 else x)


# ----------------------------------------------------------------------------- one run
def run_one(method: str, seed: int, args) -> dict:
    from hf_graft.config import DataArguments, GraftingConfig
    from hf_graft.filters import filter_report
    from hf_graft.train import run_training

    overrides = method_overrides(method, args.epochs)
    out_dir = Path(args.work_dir) / f"{method}_seed{seed}"
    data_args = DataArguments(
        dataset_name=args.dataset, eval_split="test", max_train_samples=args.train_samples,
        max_eval_samples=args.eval_samples,
    )
    config_kwargs = dict(
        output_dir=str(out_dir), student_model="cifar_resnet20", num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=250, learning_rate=args.lr,
        lr_scheduler_type="cosine", weight_decay=5e-4, seed=seed, data_seed=0,
        dataloader_num_workers=args.num_workers, save_strategy="no", export_student=False,
        logging_steps=10**6, disable_tqdm=True, report_to="none", filter_thresholds=list(THRESHOLDS),
    )
    config_kwargs.update(overrides)
    config = GraftingConfig(**config_kwargs)
    _Capture.trainer, _Capture.diagnostics = None, []
    _Capture.enabled = config.grafting_enabled
    start = time.time()
    results = run_training(data_args, config)
    wall = time.time() - start
    trainer = _Capture.trainer
    K = config.num_students
    members = list(trainer.population.members)
    filters = []
    for member in members:
        rep = filter_report(member, thresholds=THRESHOLDS)
        filters.append({str(t): rep.own_invalid_ratio(t) for t in THRESHOLDS} | {"total_filters": rep.total_filters})
    alphas = [
        [a for m in report.members for a in m.alpha_values] for report in trainer.graft_reports
    ]
    curves = {k: [] for k in range(K)}
    for entry in trainer.state.log_history:
        if "eval_member0_top1" in entry:
            for k in range(K):
                curves[k].append(entry[f"eval_member{k}_top1"])
    return {
        "method": method,
        "seed": seed,
        "student_model": config.student_model,
        "num_students": K,
        "lr_multipliers": config.lr_multipliers,
        "member_top1": [results[f"eval_member{k}_top1"] for k in range(K)],
        "ensemble_top1": results["eval_ensemble_top1"],
        "filters": filters,
        "alphas": alphas,
        "graft_diagnostics": _Capture.diagnostics,
        "eval_curves": curves,
        "train_runtime": results.get("train_runtime"),
        "wall_s": wall,
        "settings": {"train_samples": args.train_samples, "eval_samples": args.eval_samples, "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr},
    }


# ----------------------------------------------------------------------------- table
def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _ratio(values):
    values = [v for v in values if v is not None]
    return "n/a" if not values else f"{100 * statistics.mean(values):.2f}%"


def summarize(runs: list[dict]) -> list[dict]:
    order = CORE_METHODS[:2] + ["ensemble2"] + CORE_METHODS[2:] + KNOB_METHODS + MNV2_METHODS
    rows = []
    for method in order:
        source = "independent2" if method == "ensemble2" else method
        group = [r for r in runs if r["method"] == source]
        if not group:
            continue
        if method == "ensemble2":
            top1 = [r["ensemble_top1"] for r in group]
            best = top1
        else:
            top1 = [a for r in group for a in r["member_top1"]]
            best = [max(r["member_top1"]) for r in group]
        filters = [f for r in group for f in r["filters"]]
        alphas = [a for r in group for g in r["alphas"] for a in g]
        diag = [d for r in group for d in r["graft_diagnostics"]]
        first = [d for d in diag if d["graft"] == 1]
        row = {
            "method": method,
            "model": group[0]["student_model"],
            "K": group[0]["num_students"],
            "seeds": sorted({r["seed"] for r in group}),
            "top1": _mean_std(top1),
            "best": _mean_std(best),
            "inv_1e-2": "(ensemble)" if method == "ensemble2" else _ratio([f["0.01"] for f in filters]),
            "inv_0.1": "(ensemble)" if method == "ensemble2" else _ratio([f["0.1"] for f in filters]),
            "wall_min": sum(r["wall_s"] for r in group) / 60.0,
        }
        if alphas and method != "ensemble2":
            t = torch.tensor(alphas)
            row["alpha"] = (f"mean {t.mean():.3f}, share with abs(alpha - 0.5) > 0.15: "
                            f"{100 * float(((t - 0.5).abs() > 0.15).float().mean()):.0f}%, range {t.min():.2f}..{t.max():.2f}")
        if first and method != "ensemble2":
            row["first_graft"] = (
                f"{statistics.mean(x for d in first for x in d['before']):.1f} -> "
                f"{statistics.mean(x for d in first for x in d['after']):.1f} "
                f"(BN recal {statistics.mean(x for d in first for x in d['after_bn_recal']):.1f})"
            )
            later = [d for d in diag if d["graft"] > 1]
            if later:
                row["later_grafts"] = (
                    f"{statistics.mean(x for d in later for x in d['before']):.1f} -> "
                    f"{statistics.mean(x for d in later for x in d['after']):.1f} "
                    f"(BN recal {statistics.mean(x for d in later for x in d['after_bn_recal']):.1f})"
                )
        rows.append(row)
    return rows


def environment() -> str:
    import timm
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"transformers {transformers.__version__}; {os.cpu_count()} CPU cores ({cpu}), "
            f"torch threads {torch.get_num_threads()}; no GPU")


def write_markdown(path: Path, runs: list[dict], args, command: str, finished: bool, notes: str = "",
                   missing: list | None = None) -> None:
    rows = summarize(runs)
    lines = [
        "# Small-scale reproduction of filter grafting: CIFAR-10, cifar_resnet20 (and cifar_mobilenetv2)",
        "",
        f"Status: {'complete' if finished else 'PARTIAL (written after every run; the run was still going or was stopped)'}."
        + (f" Planned but not run: {', '.join(f'{m} (seed {s})' for m, s in missing)}." if missing else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {environment()}.",
        "",
        f"Setting: {args.train_samples} training images (fixed subset), the first {args.eval_samples} test images, "
        f"{args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, lr {args.lr} cosine, weight decay 5e-4, "
        "pad-crop + flip augmentation, data_order independent; grafting at every epoch boundary after the first "
        "(none after the last), entropy criterion, A 0.4, c 500; lr_spread cosine gives K=2 members lr x0.5 / x1 "
        "and K=3 members x0.25 / x0.75 / x1.",
        "",
        "| method | model | K | seeds | top-1 (mean ± std over seeds x members) | best member | invalid l1<1e-2 | "
        "invalid l1<0.1 | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['model']} | {r['K']} | {','.join(map(str, r['seeds']))} | {r['top1']} | {r['best']} | "
            f"{r['inv_1e-2']} | {r['inv_0.1']} | {r['wall_min']:.1f} |"
        )
    diag_rows = [r for r in rows if "alpha" in r or "first_graft" in r]
    if diag_rows:
        lines += [
            "",
            f"Graft diagnostics (members' top-1 on the first {DIAG_EVAL_IMAGES} eval images right before -> right "
            f"after a graft; in brackets after the graft with BatchNorm statistics re-estimated on "
            f"{DIAG_BN_BATCHES} training batches, on a copy), and the alphas of all anchors of all grafts:",
            "",
            "| method | first graft | later grafts (mean) | alpha |",
            "| --- | --- | --- | --- |",
        ]
        for r in diag_rows:
            lines.append(f"| {r['method']} | {r.get('first_graft', '')} | {r.get('later_grafts', '')} | {r.get('alpha', '')} |")
    curves = [r for r in runs if r["eval_curves"]]
    if curves:
        lines += ["", "Top-1 after each epoch (mean over the run's members; evaluation precedes the graft at "
                  "that boundary):", "", "| method | seed | " + " | ".join(f"ep{e + 1}" for e in range(args.epochs)) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in range(args.epochs)) + " |"]
        for r in curves:
            per_member = list(r["eval_curves"].values())
            epochs = min(len(c) for c in per_member)
            mean = [statistics.mean(c[e] for c in per_member) for e in range(min(epochs, args.epochs))]
            lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    lines += ["", "Per-run member top-1 after every epoch, filter ratios, alphas and graft diagnostics are in the "
              "work dir's runs.jsonl (not committed).", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def print_table(runs):
    rows = summarize(runs)
    for r in rows:
        print(f"  {r['method']:<20} K={r['K']} top1 {r['top1']:<14} best {r['best']:<14} inv@1e-2 {r['inv_1e-2']:<9} "
              f"inv@0.1 {r['inv_0.1']:<9} {r.get('first_graft', '')}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="CIFAR-10 schema dataset (img, label; train/test)")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the core methods")
    parser.add_argument("--knob-seeds", type=int, nargs="*", default=[0], help="seeds of the knob variants")
    parser.add_argument("--methods", nargs="+", default=None, help="core methods (default: all)")
    parser.add_argument("--knobs", nargs="*", default=None, help="knob variants (default: all)")
    parser.add_argument("--no-mnv2", action="store_true", help="skip the cifar_mobilenetv2 runs")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny convs here)")
    parser.add_argument("--work-dir", default="/tmp/hf_graft_repro")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "reproduce_small.md"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute), writes no results file")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rewrite the results file from the work dir's runs.jsonl")
    parser.add_argument("--notes", default=None, help="markdown file appended to the results file (findings)")
    parser.add_argument("--command", default=None, help="the command to quote in the results file (--report-only)")
    args = parser.parse_args(argv)
    command = "HF_HUB_OFFLINE=1 python benchmarks/reproduce_small.py " + " ".join(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    import hf_graft  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quick:
        args.train_samples, args.eval_samples, args.epochs = 256, 200, 2
        args.seeds, args.knob_seeds, args.num_workers = [0], [], 0
        args.work_dir = args.work_dir + "_quick"
        plan = [("baseline", 0), ("graft2", 0)]
    else:
        core = args.methods or CORE_METHODS
        knobs = KNOB_METHODS if args.knobs is None else args.knobs
        plan = [(m, args.seeds[0]) for m in core]
        plan += [(m, s) for s in args.knob_seeds for m in knobs]
        plan += [(m, s) for s in args.seeds[1:] for m in core]
        if not args.no_mnv2:
            plan += [(m, args.seeds[0]) for m in MNV2_METHODS]
    _Capture.install()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.jsonl"
    if args.quick and log.exists():
        log.unlink()
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["method"], r["seed"]) for r in runs}
    results_path = Path(args.results)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.report_only:
        missing = [p for p in plan if p not in done]
        write_markdown(results_path, runs, args, args.command or command, finished=not missing, notes=notes,
                       missing=missing)
        plan = []
    for method, seed in plan:
        if (method, seed) in done:
            continue
        print(f"[reproduce_small] {time.strftime('%H:%M:%S')} running {method} seed {seed}", flush=True)
        record = run_one(method, seed, args)
        runs.append(record)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[reproduce_small] {method} seed {seed}: members {[round(a, 1) for a in record['member_top1']]} "
              f"ensemble {record['ensemble_top1']:.1f} ({record['wall_s']:.0f} s)", flush=True)
        if not args.quick:
            write_markdown(results_path, runs, args, command, finished=False)
    if not args.quick and not args.report_only:
        write_markdown(results_path, runs, args, command, finished=True, notes=notes)
    rows = print_table(runs)
    summary = " | ".join(f"{r['method']} {r['top1']}" for r in rows)
    print(f"RESULT top-1 (mean over seeds x members): {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
