"""Small-scale reproduction of filter grafting on CIFAR-10, over several seeds, with paired intervals.

Every method runs through hf_graft's own path (`hf_graft.train.run_training` with `DataArguments` +
`GraftingConfig`, i.e. `GraftingTrainer`) on a fixed subset of CIFAR-10 and a fixed epoch budget, once
per seed; seed s of every method shares the data subset, the evaluation images and the members'
initialisation stream, so methods are compared seed by seed. Methods (default: the first four):

  baseline            K=1, graft_source none
  independent2        K=2, graft_source none, lr_spread cosine (the grafting runs' rates, lr x0.5 / x1)
  graft2              K=2, external grafting, lr_spread cosine (members from different initialisations)
  graft2_shared_init  graft2 with shared_init: true (both members start from one initialisation)
  graft3, graft2_warmup, graft2_avg, graft2_bnrecal   further variants, run only when named in --methods

What one seed of a method contributes (benchmarks/stats.py turns these into mean ± std over seeds and
paired per-seed differences with a 95% Student-t interval):
  - the mean top-1 of its members (the main table; for K=1 the single network);
  - separately, for K >= 2, its best member (chosen on the evaluation images themselves, so biased
    upward) and its ensemble (mean of the members' softmaxes), each as its own row;
  - the K=2 grafting methods are also compared with independent2 (same K, rates and seeds; no grafts).

Descriptive only (no intervals, not findings): invalid-filter ratios (l1 < 1e-2, < 0.1) of the final
networks, the alphas of the grafts, each member's top-1 after every epoch, and graft diagnostics: the
members' top-1 on the first 500 evaluation images right before and right after grafts 1, 2 and the
last, and after that graft on a copy whose BatchNorm statistics are re-estimated on 5 training
batches (`GraftDiagnostics`, a callback on the trainer's graft events).

Runs are appended one by one to `<work-dir>/runs.jsonl` (a rerun with the same --work-dir skips
finished runs), the plan to `<work-dir>/plan.json`, and the results file is rewritten after every run.
`--report-only --work-dir DIR` rewrites the results file from DIR alone (no training).

Command (see benchmarks/README.md for the budget and what it can support):

    HF_HUB_OFFLINE=1 python benchmarks/reproduce_small.py --train-samples 1500 --eval-samples 1000 \
        --epochs 6 --seeds 0 1 2 3 4 --work-dir /tmp/hf_graft_repro

Quick smoke run (2 methods x 2 seeds on a few images; used by tests/test_benchmarks.py):

    HF_HUB_OFFLINE=1 python benchmarks/reproduce_small.py --quick --work-dir /tmp/hf_graft_repro
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import markdown_table, mean_std, paired_difference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = str((REPO.parent / "shared" / "data" / "cifar10").resolve())
if not os.path.isdir(DEFAULT_DATASET):
    DEFAULT_DATASET = "/work/shared/data/cifar10"

THRESHOLDS = (0.01, 0.1)
DIAG_EVAL_IMAGES = 500
DIAG_BN_BATCHES = 5
DEFAULT_METHODS = ["baseline", "independent2", "graft2", "graft2_shared_init"]
BASELINE, PAIR = "baseline", "independent2"
SETTINGS = ("model", "train_samples", "eval_samples", "epochs", "batch_size", "lr")


def method_overrides(name: str, epochs: int) -> dict:
    """GraftingConfig fields of one method (on top of the common settings)."""
    graft2 = {"num_students": 2, "graft_source": "external", "lr_spread": ["cosine"]}
    table = {
        "baseline": {"num_students": 1, "graft_source": "none"},
        "independent2": {"num_students": 2, "graft_source": "none", "lr_spread": ["cosine"]},
        "graft2": graft2,
        "graft2_shared_init": {**graft2, "shared_init": True},
        "graft3": {"num_students": 3, "graft_source": "external", "lr_spread": ["cosine"]},
        "graft2_warmup": {**graft2, "graft_start_epoch": max(2, epochs // 2)},
        "graft2_avg": {**graft2, "graft_A": 0.0},
        "graft2_bnrecal": {**graft2, "bn_recalibration_batches": DIAG_BN_BATCHES},
    }
    if name not in table:
        raise SystemExit(f"reproduce_small.py: --methods: unknown method {name!r}; allowed: {', '.join(table)}")
    return table[name]


# ----------------------------------------------------------------------------- graft diagnostics
class GraftDiagnostics(TrainerCallback):
    """Measures every member right before and right after grafts 1, 2 and the last, and after that
    graft on a copy whose BatchNorm statistics are re-estimated (`recalibrate_batchnorm`); also keeps
    the alphas of every graft and each evaluation's member top-1 (the curves)."""

    def __init__(self, eval_images: int = DIAG_EVAL_IMAGES, bn_batches: int = DIAG_BN_BATCHES):
        self.eval_images, self.bn_batches = eval_images, bn_batches
        self.eval_dataset = None
        self.records: list[dict] = []
        self.alphas: list[list[float]] = []
        self.curves: dict[float, list[float]] = {}
        self._before: list[float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        # the epoch-end evaluation precedes the graft at that boundary, so the images are known in time
        if self.eval_dataset is None and eval_dataloader is not None:
            self.eval_dataset = eval_dataloader.dataset
        members = sorted(int(k[len("eval_member"):-len("_top1")]) for k in metrics or {}
                         if k.startswith("eval_member") and k.endswith("_top1"))
        if members:
            self.curves[round(state.epoch, 3)] = [metrics[f"eval_member{k}_top1"] for k in members]

    @staticmethod
    def _measured(args, graft_index: int) -> bool:
        last_boundary = int(args.num_train_epochs) - 1
        grafts = (last_boundary - args.graft_start_epoch) // args.graft_every_epochs + 1
        return graft_index in {0, 1, grafts - 1}

    def on_graft_begin(self, args, state, control, *, model, graft_index, **kwargs):
        self._before = self.member_top1(model, args.device) if self._measured(args, graft_index) else None

    def on_graft_end(self, args, state, control, *, model, graft_index, train_dataset, report=None, **kwargs):
        from hf_graft.population.recalibration import recalibrate_batchnorm

        if report is not None:
            self.alphas.append([a for member in report.members for a in member.alpha_values])
        if self._before is None:
            return
        after = self.member_top1(model, args.device)
        copy_ = copy.deepcopy(model)
        recalibrate_batchnorm(copy_, train_dataset, num_batches=self.bn_batches,
                              batch_size=args.per_device_train_batch_size, device=args.device,
                              seed=args.seed + 7919 + graft_index)
        self.records.append({"graft": graft_index + 1, "before": self._before, "after": after,
                             "after_bn_recal": self.member_top1(copy_, args.device)})
        self._before = None

    @torch.no_grad()
    def member_top1(self, population, device) -> list[float]:
        """Each member's top-1 (percent) on the first `eval_images` evaluation images."""
        from torch.utils.data import default_collate

        if self.eval_dataset is None:
            raise RuntimeError("GraftDiagnostics: no evaluation images seen before the graft (eval_strategy 'epoch' needed)")
        n = min(self.eval_images, len(self.eval_dataset))
        was_training = population.training
        population.eval()
        correct = None
        for start in range(0, n, 250):
            batch = default_collate([self.eval_dataset[i] for i in range(start, min(n, start + 250))])
            logits = population(pixel_values=batch["pixel_values"].to(device))["logits"]  # [B, K, classes]
            hits = (logits.argmax(-1) == batch["labels"].to(device)[:, None]).sum(0)
            correct = hits if correct is None else correct + hits
        population.train(was_training)
        return [100.0 * float(c) / n for c in correct]


# ----------------------------------------------------------------------------- one run
def run_one(method: str, seed: int, args) -> dict:
    from hf_graft.config import DataArguments, GraftingConfig
    from hf_graft.graft.filters import threshold_key
    from hf_graft.cli.train import run_training

    out_dir = Path(args.work_dir) / f"{method}_seed{seed}"
    data_args = DataArguments(dataset_name=args.dataset, eval_split="test", max_train_samples=args.train_samples,
                              max_eval_samples=args.eval_samples)
    config = GraftingConfig(
        output_dir=str(out_dir), student_model=args.model, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=250, learning_rate=args.lr,
        lr_scheduler_type="cosine", weight_decay=5e-4, seed=seed, data_seed=0, eval_strategy="epoch",
        dataloader_num_workers=args.num_workers, save_strategy="no", export_student=False,
        logging_steps=10**6, disable_tqdm=True, report_to="none", filter_thresholds=list(THRESHOLDS),
        replace_output_dir=True,  # a rerun of the benchmark replaces its earlier run of this method and seed
        **method_overrides(method, args.epochs),
    )
    diagnostics = GraftDiagnostics()
    start = time.time()
    results = run_training(data_args, config, callbacks=[diagnostics])
    wall = time.time() - start
    K = config.num_students
    filters = [{str(t): results["filters"][f"member{k}"][f"invalid_ratio@{threshold_key(t)}"] for t in THRESHOLDS}
               for k in range(K)]
    epochs = sorted(diagnostics.curves)
    return {
        "method": method,
        "seed": seed,
        "student_model": config.student_model,
        "num_students": K,
        "lr_multipliers": config.lr_multipliers,
        "member_top1": [results[f"eval_member{k}_top1"] for k in range(K)],
        "ensemble_top1": results["eval_ensemble_top1"],
        "filters": filters,
        "alphas": diagnostics.alphas,
        "graft_diagnostics": diagnostics.records,
        "eval_curves": {str(k): [diagnostics.curves[e][k] for e in epochs] for k in range(K)},
        "wall_s": wall,
        "load_average": os.getloadavg()[0],
        "settings": settings_of(args),
    }


def settings_of(args) -> dict:
    return {name: getattr(args, name) for name in SETTINGS}


# ----------------------------------------------------------------------------- per-seed numbers
def per_seed(runs: list[dict], method: str, value) -> dict[int, float]:
    return {r["seed"]: value(r) for r in runs if r["method"] == method}


def members_mean(r):
    return statistics.mean(r["member_top1"])


def seed_tables(runs: list[dict], methods: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """The per-seed numbers of every table: {table: {row: {seed: top-1}}}."""
    present = [m for m in methods if any(r["method"] == m for r in runs)]
    main = {m: per_seed(runs, m, members_mean) for m in present}
    multi = [m for m in present if next(r for r in runs if r["method"] == m)["num_students"] > 1]
    tables = {"members": main}
    if BASELINE in main and multi:
        extra = {BASELINE: main[BASELINE]}
        for m in multi:
            extra[f"{m} best member"] = per_seed(runs, m, lambda r: max(r["member_top1"]))
            extra[f"{m} ensemble"] = per_seed(runs, m, lambda r: r["ensemble_top1"])
        tables["best_and_ensemble"] = extra
    grafting = [m for m in multi if m != PAIR and m.startswith("graft") and next(
        r for r in runs if r["method"] == m)["num_students"] == 2]
    if PAIR in main and grafting:
        tables["against_pair"] = {PAIR: main[PAIR], **{m: main[m] for m in grafting}}
    return tables


# ----------------------------------------------------------------------------- report
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


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {std:.1f}"


def _diag_cell(records: list[dict]) -> str:
    """before -> after (BN re-estimated), each the mean over seeds of the members' mean."""
    if not records:
        return ""
    parts = [_ms([statistics.mean(d[key]) for d in records]) for key in ("before", "after", "after_bn_recal")]
    return f"{parts[0]} -> {parts[1]} ({parts[2]})"


def complete_seed_runs(runs: list[dict], plan: dict) -> tuple[list[dict], list[dict]]:
    """(runs of the seeds on which every planned method ran, the other runs): only complete seeds enter
    the tables, so every row and every paired difference is over the same seeds."""
    complete = {seed for seed in plan["seeds"]
                if all(any(r["method"] == m and r["seed"] == seed for r in runs) for m in plan["methods"])}
    return [r for r in runs if r["seed"] in complete], [r for r in runs if r["seed"] not in complete]


def report_lines(runs: list[dict], plan: dict, finished: bool) -> list[str]:
    methods, s = plan["methods"], plan["settings"]
    missing = [(m, seed) for seed in plan["seeds"] for m in methods
               if not any(r["method"] == m and r["seed"] == seed for r in runs)]
    runs, left_out = complete_seed_runs(runs, plan)
    complete = sorted({r["seed"] for r in runs})
    left_out_names = ", ".join(f"{r['method']} (seed {r['seed']})" for r in left_out)
    tables = seed_tables(runs, methods)
    loads = [r["load_average"] for r in runs if "load_average" in r]
    lines = [
        f"# Small-scale reproduction of filter grafting: CIFAR-10, {s['model']}, "
        f"seeds {','.join(map(str, complete)) or 'none yet'}",
        "",
        "Status: " + ("complete." if finished and not missing else
                      "PARTIAL (rewritten after every run)." + (
                          f" Not run yet: {', '.join(f'{m} (seed {seed})' for m, seed in missing)}." if missing else "")
                      + (f" Finished runs of incomplete seeds, left out of every table: {left_out_names}."
                         if left_out else "")),
        "",
        f"Command: `{plan['command']}`",
        "",
        f"Environment: {environment()}."
        + (f" 1-minute load average at the end of the runs: {min(loads):.1f} to {max(loads):.1f}." if loads else ""),
        "",
        f"Setting: {s['train_samples']} training images (a fixed subset), the first {s['eval_samples']} test images, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, SGD momentum 0.9, lr {s['lr']} cosine, weight decay 5e-4, "
        "pad-crop + flip augmentation, data_order independent; grafting at every epoch boundary after the first "
        "(none after the last), entropy criterion, A 0.4, c 500; lr_spread cosine gives K=2 members lr x0.5 / x1.",
        "",
        "How to read: one seed of a method contributes the mean top-1 of its members (for K=1 the one network); "
        "mean ± std are over seeds; the difference to the reference is taken seed by seed (same data subset, "
        "evaluation images and initialisation stream) and its 95% interval is Student's t with n - 1 degrees of "
        "freedom. A row whose interval contains 0 shows no difference at this number of seeds. "
        f"With {s['eval_samples']} test images one run's top-1 alone has a binomial standard error of about "
        f"{100 * (0.4 * 0.6 / max(1, s['eval_samples'])) ** 0.5:.1f} points.",
        "",
    ]
    if "members" in tables:
        lines += ["## Members' mean top-1 against the single baseline", "",
                  markdown_table(tables["members"], BASELINE, metric="top-1 (members' mean)")
                  if BASELINE in tables["members"] else "(no baseline run yet)", ""]
    if "best_and_ensemble" in tables:
        lines += ["## Best member and ensemble of the K=2 runs against the single baseline", "",
                  "The best member is picked on the evaluation images themselves (an upward-biased choice of 2); the "
                  "ensemble averages the members' softmaxes (2 networks' compute at inference).", "",
                  markdown_table(tables["best_and_ensemble"], BASELINE), ""]
    if "against_pair" in tables:
        lines += ["## Grafting against two independent members (same K, rates and seeds; no grafts)", "",
                  markdown_table(tables["against_pair"], PAIR, metric="top-1 (members' mean)"), ""]

    lines += ["## Descriptive (no intervals: not findings)", "",
              "| method | K | seeds | invalid l1<1e-2 | invalid l1<0.1 | minutes per run (shared CPU) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m in [m for m in methods if any(r["method"] == m for r in runs)]:
        group = [r for r in runs if r["method"] == m]
        f = [x for r in group for x in r["filters"]]
        lines.append(f"| {m} | {group[0]['num_students']} | {','.join(str(r['seed']) for r in group)} | "
                     f"{100 * statistics.mean(x['0.01'] for x in f):.2f}% | {100 * statistics.mean(x['0.1'] for x in f):.2f}% | "
                     f"{statistics.mean(r['wall_s'] for r in group) / 60:.1f} |")
    grafted = [m for m in methods if any(r["method"] == m and r["graft_diagnostics"] for r in runs)]
    if grafted:
        lines += ["", f"Graft diagnostics: members' top-1 on the first {min(DIAG_EVAL_IMAGES, s['eval_samples'])} "
                  "evaluation images right "
                  f"before -> right after a graft (in brackets: after it, on a copy with BatchNorm statistics "
                  f"re-estimated on {DIAG_BN_BATCHES} training batches); mean ± std over seeds of the members' mean. "
                  "Alphas: all anchors of all grafts.", "",
                  "| method | first graft | later grafts (mean) | alpha |", "| --- | --- | --- | --- |"]
        for m in grafted:
            group = [r for r in runs if r["method"] == m]
            first = [d for r in group for d in r["graft_diagnostics"] if d["graft"] == 1]
            later = [{key: [statistics.mean(x for d in r["graft_diagnostics"] if d["graft"] > 1 for x in d[key])]
                      for key in ("before", "after", "after_bn_recal")}
                     for r in group if any(d["graft"] > 1 for d in r["graft_diagnostics"])]
            alphas = torch.tensor([a for r in group for g in r["alphas"] for a in g])
            alpha = (f"mean {alphas.mean():.3f}, share with abs(alpha - 0.5) > 0.15: "
                     f"{100 * float(((alphas - 0.5).abs() > 0.15).float().mean()):.0f}%, "
                     f"range {alphas.min():.2f}..{alphas.max():.2f}") if alphas.numel() else ""
            lines.append(f"| {m} | {_diag_cell(first)} | {_diag_cell(later)} | {alpha} |")
    lines += ["", "Top-1 after each epoch (mean of the run's members; the evaluation precedes the graft at that "
              "boundary):", "", "| method | seed | " + " | ".join(f"ep{e + 1}" for e in range(s["epochs"])) + " |",
              "| --- | --- | " + " | ".join("---" for _ in range(s["epochs"])) + " |"]
    for r in sorted(runs, key=lambda r: (methods.index(r["method"]) if r["method"] in methods else 99, r["seed"])):
        curves = list(r["eval_curves"].values())
        n = min(min(len(c) for c in curves), s["epochs"])
        lines.append(f"| {r['method']} | {r['seed']} | "
                     + " | ".join(f"{statistics.mean(c[e] for c in curves):.1f}" for e in range(n)) + " |")
    lines += ["", "Every run's member top-1 after every epoch, filter ratios, alphas and graft diagnostics are in "
              "the work dir's runs.jsonl (not committed).", ""]
    return lines


def write_report(path: Path, runs: list[dict], plan: dict, finished: bool, notes: str = "") -> None:
    lines = report_lines(runs, plan, finished)
    if notes:
        lines += [notes.rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def summary_line(runs: list[dict], plan: dict) -> str:
    main = seed_tables(complete_seed_runs(runs, plan)[0], plan["methods"]).get("members", {})
    cells = []
    for m, values in main.items():
        cell = f"{m} {statistics.mean(values.values()):.1f}"
        if m != BASELINE and BASELINE in main:
            d = paired_difference(values, main[BASELINE])
            interval = f", 95% t [{d.low:+.1f}, {d.high:+.1f}]" if d.n > 1 else ""
            cell += f" (vs {BASELINE} {d.mean:+.1f}{interval}: {d.verdict(BASELINE)})"
        cells.append(cell)
    return "RESULT top-1 (members' mean per seed, mean over seeds): " + " | ".join(cells)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="CIFAR-10 schema dataset (img, label; train/test)")
    parser.add_argument("--model", default="cifar_resnet20", help="student model of every method")
    parser.add_argument("--train-samples", type=int, default=1500)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="the first is run first on every seed")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny convs here)")
    parser.add_argument("--work-dir", default="/tmp/hf_graft_repro")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "reproduce_small.md"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: baseline and graft2 on 2 seeds, a few images; results into the work dir")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rewrite the results file from the work dir's plan.json and runs.jsonl")
    parser.add_argument("--notes", default=None, help="markdown file appended to the results file (findings)")
    args = parser.parse_args(argv)
    command = "HF_HUB_OFFLINE=1 python benchmarks/reproduce_small.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for m in args.methods:
        method_overrides(m, args.epochs)  # an unknown method fails here, before any training
    if len(args.seeds) != len(set(args.seeds)):
        raise SystemExit(f"reproduce_small.py: --seeds: repeated seed in {args.seeds}")

    torch.set_num_threads(args.threads)
    import hf_graft  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quick:
        args.train_samples, args.eval_samples, args.epochs, args.batch_size = 128, 100, 2, 64
        args.seeds, args.methods, args.num_workers = [0, 1], ["baseline", "graft2"], 0
        args.work_dir = args.work_dir + "_quick"
        args.results = str(Path(args.work_dir) / "reproduce_small.md")

    work = Path(args.work_dir)
    log, plan_path = work / "runs.jsonl", work / "plan.json"
    results_path = Path(args.results)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.report_only:
        if not plan_path.is_file():
            raise SystemExit(f"reproduce_small.py: --report-only: {plan_path} not found (not a reproduce_small work dir)")
        plan = json.loads(plan_path.read_text())
        runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        finished = all(any(r["method"] == m and r["seed"] == s for r in runs) for s in plan["seeds"] for m in plan["methods"])
        write_report(results_path, runs, plan, finished, notes)
        print(f"wrote {results_path} from {len(runs)} runs")
        print(summary_line(runs, plan))
        return 0

    if args.quick and work.exists():
        for path in (log, plan_path):
            path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan = {"command": command, "settings": settings_of(args), "methods": args.methods, "seeds": args.seeds}
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old["settings"] != plan["settings"]:
            raise SystemExit(f"reproduce_small.py: --work-dir {work} holds runs with other settings "
                             f"({old['settings']}); use another work dir")
        plan["methods"] = old["methods"] + [m for m in args.methods if m not in old["methods"]]
        plan["seeds"] = old["seeds"] + [s for s in args.seeds if s not in old["seeds"]]
    plan_path.write_text(json.dumps(plan, indent=1))
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["method"], r["seed"]) for r in runs}
    for seed in args.seeds:  # seed by seed: a stopped run leaves complete pairs
        for method in args.methods:
            if (method, seed) in done:
                continue
            print(f"[reproduce_small] {time.strftime('%H:%M:%S')} running {method} seed {seed}", flush=True)
            record = run_one(method, seed, args)
            runs.append(record)
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[reproduce_small] {time.strftime('%H:%M:%S')} {method} seed {seed}: members "
                  f"{[round(a, 1) for a in record['member_top1']]} ensemble {record['ensemble_top1']:.1f} "
                  f"({record['wall_s']:.0f} s)", flush=True)
            write_report(results_path, runs, plan, finished=False, notes=notes)
    write_report(results_path, runs, plan, finished=True, notes=notes)
    print(summary_line(runs, plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
