"""Reduced reproduction of filter grafting on the full CIFAR-10, sized to a time budget on one GPU.

Every run is a `GraftingTrainer` on data decoded once onto the GPU (`DataArguments.data_on_device`:
pad-crop 4 + flip and normalisation on the device), bf16 autocast, channels_last where
`GraftingConfig` has that field, batch 128, SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4,
evaluation on the 10,000 test images after every epoch. Methods (the names of
`reproduce_small.py`):

  baseline       K=1 cifar_resnet20, graft_source none
  independent2   K=2, graft_source none, lr_spread cosine; its ensemble is the row `ensemble2`
  graft2         K=2, external grafting, lr_spread cosine; its ensemble is the row `graft2_ensemble`
  mnv2_baseline / mnv2_graft2   the same with cifar_mobilenetv2, seed 0, only if time is left

Plan: first a probe (40 training steps of K=2 cifar_resnet20 and one evaluation), which also warms
up the convolution shapes of every CIFAR ResNet; then the full-CIFAR-10 epoch time of
`cifar_resnet56` K=2 grafting with evaluation in each `--epoch-variants` (fused, fused with CUDA
graphs, fused compiled by inductor, loop; 2 epochs each if they fit in their share of
`--resnet56-share` of the budget, else 1);
then the number of epochs is chosen from the probe so that the three methods fit on 3 seeds (else 2,
else 1) in the time left, and the runs go seed by seed (an interrupted run leaves whole seeds). A run that would not fit in what is left is
skipped and listed as such; one that reaches the deadline stops and is reported as partial, outside
the tables. The markdown file is rewritten after every run.

Per seed, a method's value is the mean of its members' top-1 after the last epoch; the tables are
`stats.markdown_table` (paired differences to the baseline over seeds), as in every reproduction
table of this repository.

    python benchmarks/gpu_reproduce.py ../shared/data/cifar10 --out gpu_reproduce.md --time-budget 230
    python benchmarks/gpu_reproduce.py --quick --device cpu --out /tmp/r.md   # smoke run (tiny subset)
"""

from __future__ import annotations

import time

STARTED = time.time()  # the time budget counts from here, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "cifar10"

METHODS = {
    "baseline": {"student_model": "cifar_resnet20", "num_students": 1, "graft_source": "none"},
    "independent2": {"student_model": "cifar_resnet20", "num_students": 2, "graft_source": "none",
                     "lr_spread": ["cosine"]},
    "graft2": {"student_model": "cifar_resnet20", "num_students": 2, "graft_source": "external",
               "lr_spread": ["cosine"]},
    "mnv2_baseline": {"student_model": "cifar_mobilenetv2", "num_students": 1, "graft_source": "none"},
    "mnv2_graft2": {"student_model": "cifar_mobilenetv2", "num_students": 2, "graft_source": "external",
                    "lr_spread": ["cosine"]},
}
CORE = ["baseline", "independent2", "graft2"]
# execution variants of the cifar_resnet56 epoch timing (GraftingConfig fields)
EPOCH_VARIANTS = {
    "fused": {"member_execution": "fused"},
    "fused+graphs": {"member_execution": "fused", "torch_compile": True, "torch_compile_backend": "cudagraphs"},
    "fused+compile": {"member_execution": "fused", "torch_compile": True, "torch_compile_backend": "inductor",
                      "torch_compile_mode": "reduce-overhead"},
    "loop": {"member_execution": "loop"},
}
GRAPH_VARIANTS = ("fused+graphs", "fused+compile")
MNV2_COST = 2.5  # planning guess: a cifar_mobilenetv2 step against a cifar_resnet20 step


class Clock:
    """Wall time since start and the deadline of the whole script."""

    def __init__(self, budget: float):
        self.start = STARTED
        self.deadline = self.start + budget

    def left(self) -> float:
        return self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.start


def _release(device: torch.device) -> None:
    """Free the finished run's population and optimizer before the next one is built."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _callbacks(device: torch.device, stop_at: float):
    """An epoch timer (train part, and the time between evaluations: graft + train + evaluation)
    and a stop at the deadline."""
    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.train_s, self.epoch_s, self.steps = [], [], []
            self._mark = self._begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._mark = time.time()

        def on_epoch_begin(self, args, state, control, **kwargs):
            _sync(device)
            self._begin = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                _sync(device)  # the last step of a probe: its time includes the GPU's queue
            self.steps.append(time.time())
            if time.time() > stop_at:
                control.should_training_stop = True

        def on_epoch_end(self, args, state, control, **kwargs):
            _sync(device)
            self.train_s.append(time.time() - self._begin)

        def on_evaluate(self, args, state, control, **kwargs):
            _sync(device)
            now = time.time()
            self.epoch_s.append(now - self._mark)
            self._mark = now

    return EpochTimer()


class Bench:
    def __init__(self, args):
        from hf_graft.config import GraftingConfig

        self.args = args
        self.device = torch.device(args.device)
        self.clock = Clock(args.time_budget)
        self.fields = {f.name for f in dataclasses.fields(GraftingConfig)}
        self.runs: list[dict] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.epoch_timings: list[dict] = []
        self.plan: dict = {}
        self.decode: dict = {}

    # ------------------------------------------------------------------ data
    def load(self) -> None:
        import timm

        from hf_graft.config import DataArguments
        from hf_graft.data.loading import load_image_data
        from hf_graft.data.transforms import resolve_student_data_config
        from hf_graft.data.on_device import decode_to_device

        a = self.args
        self.data_args = DataArguments(
            dataset_name=a.dataset, eval_split="test", data_on_device=True, train_augmentation="pad_crop",
            max_train_samples=a.train_samples, max_eval_samples=a.eval_samples, input_size=a.input_size,
        )
        start = time.time()
        self.data = load_image_data(self.data_args, seed=0)
        loaded = time.time() - start
        self.data_config = resolve_student_data_config(timm.create_model("cifar_resnet20"), a.input_size)
        start = time.time()
        self.splits = decode_to_device(self.data, self.data_args, self.data_config, self.device)
        _sync(self.device)
        self.decode = {"train": len(self.data.train), "eval": len(self.data.eval), "load_s": loaded,
                       "decode_s": time.time() - start, "cores": os.cpu_count(),
                       "shape": list(self.splits.train_images.shape[1:])}
        print(f"[gpu_reproduce] decoded {self.decode['train']} + {self.decode['eval']} images in "
              f"{self.decode['decode_s']:.1f} s", flush=True)

    # ------------------------------------------------------------------ one run
    def config(self, method: str, seed: int, epochs: int, **extra):
        from hf_graft.config import GraftingConfig

        a = self.args
        cuda = self.device.type == "cuda"
        kwargs = dict(
            output_dir=str(Path(a.work_dir) / f"{method}_seed{seed}"), num_train_epochs=epochs,
            per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=a.eval_batch_size,
            learning_rate=a.lr, lr_scheduler_type="cosine", weight_decay=5e-4, warmup_steps=0, seed=seed,
            save_strategy="no", eval_strategy="epoch", logging_strategy="no", report_to="none",
            disable_tqdm=True, export_student=False, use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0,
            dataloader_pin_memory=False, logging_nan_inf_filter=False,
            replace_output_dir=True,  # a timing run and a later run of the same method and seed share a folder
        )
        kwargs.update(METHODS[method])
        if "channels_last" in self.fields:
            kwargs["channels_last"] = cuda
        kwargs.update(extra)
        return GraftingConfig(**kwargs)

    def trainer(self, config, callbacks):
        from hf_graft.population.students import PopulationSpec, StudentPopulation
        from hf_graft.training.trainer import GraftingTrainer

        spec = PopulationSpec(config.student_model, config.num_students, self.data.num_classes,
                              label_names=self.data.label_names)
        spec.data_config = self.data_config
        population = StudentPopulation.from_spec(spec, seed=config.seed)
        train, evaluation = self.splits.datasets(num_members=config.num_students, order=config.data_order,
                                                 seed=config.seed)
        return GraftingTrainer(model=population, args=config, train_dataset=train, eval_dataset=evaluation,
                               callbacks=callbacks)

    def run(self, method: str, seed: int, epochs: int) -> dict:
        config = self.config(method, seed, epochs)
        timer = _callbacks(self.device, stop_at=self.clock.deadline - self.args.margin)
        start = time.time()
        trainer = self.trainer(config, [timer])
        trainer.train()
        wall = time.time() - start
        K = config.num_students
        evals = [e for e in trainer.state.log_history if "eval_member0_top1" in e]
        record = {
            "method": method, "seed": seed, "model": config.student_model, "K": K, "epochs": epochs,
            "epochs_done": len(evals) if trainer.state.epoch >= epochs - 1e-6 else len(evals) - 1,
            "member_top1": [[e[f"eval_member{k}_top1"] for k in range(K)] for e in evals],
            "ensemble_top1": [e["eval_ensemble_top1"] for e in evals],
            "epoch_s": timer.epoch_s, "train_s": timer.train_s, "wall_s": wall,
        }
        record["complete"] = record["epochs_done"] >= epochs
        del trainer
        _release(self.device)
        return record

    # ------------------------------------------------------------------ parts
    def time_resnet56_epochs(self, probe: dict) -> None:
        """cifar_resnet56 K=2 grafting on the whole training split, evaluation after every epoch, in each
        of `--epoch-variants` while their share of the budget lasts; after the probe, which has run the
        same convolution shapes (cifar_resnet20 has resnet56's widths)."""
        a = self.args
        estimate = probe["steps_per_epoch"] * probe["step_s_k2"] * 56 / 20 + probe["eval_s_k2"] * 56 / 20
        share = a.resnet56_share * a.time_budget / max(1, len(a.epoch_variants))
        epochs = a.resnet56_epochs or (2 if 2 * estimate <= share else 1)
        cap = time.time() + a.resnet56_share * a.time_budget
        for variant in a.epoch_variants:
            if variant in GRAPH_VARIANTS and self.device.type != "cuda":
                self.notes.append(f"cifar_resnet56 epoch timing, {variant}: CUDA only (not run on {self.device})")
                continue
            if time.time() + estimate > cap:
                self.notes.append(f"cifar_resnet56 epoch timing, {variant}: not run (its share of the budget is used)")
                continue
            extra = {"student_model": "cifar_resnet56", **EPOCH_VARIANTS[variant]}
            config = self.config("graft2", 0, epochs, **extra)
            timer = _callbacks(self.device, stop_at=min(cap, self.clock.deadline - a.margin))
            try:
                trainer = self.trainer(config, [timer])
                start = time.time()
                trainer.train()
            except Exception as err:  # e.g. a compile backend this machine cannot run: say so, try the next
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                self.notes.append(f"cifar_resnet56 epoch timing, {variant}: {type(err).__name__}: {first}")
                traceback.print_exc()
                _release(self.device)
                continue
            finally:
                if variant in GRAPH_VARIANTS:
                    torch._dynamo.reset()
            self.epoch_timings.append({
                "variant": variant, "epoch_s": timer.epoch_s, "train_s": timer.train_s,
                "wall_s": time.time() - start,
                "top1": [e["eval_ensemble_top1"] for e in trainer.state.log_history if "eval_ensemble_top1" in e],
                "complete": len(timer.train_s) >= epochs and trainer.state.epoch >= epochs - 1e-6})
            del trainer
            _release(self.device)

    def probe(self) -> dict:
        """Seconds per training step of K=2 cifar_resnet20 (after warm-up) and of one evaluation."""
        a = self.args
        steps = a.probe_steps
        config = self.config("graft2", 0, 1, max_steps=steps, eval_strategy="no")
        timer = _callbacks(self.device, stop_at=self.clock.deadline)
        trainer = self.trainer(config, [timer])
        trainer.train()
        warm = min(5, steps // 2)
        per_step = (timer.steps[-1] - timer.steps[warm - 1]) / (steps - warm) if steps > warm > 0 else math.nan
        start = time.time()
        trainer.evaluate()
        _sync(self.device)
        eval_s = time.time() - start
        del trainer
        _release(self.device)
        return {"step_s_k2": per_step, "eval_s_k2": eval_s,
                "steps_per_epoch": math.ceil(len(self.data.train) / a.batch_size)}

    def choose_epochs(self, probe: dict) -> None:
        a = self.args
        steps = probe["steps_per_epoch"]
        # planning estimates, not measurements: a K=1 step ~ 0.6 of a K=2 step; 4 s to build each run
        k2 = steps * probe["step_s_k2"] + probe["eval_s_k2"]
        k1 = steps * probe["step_s_k2"] * 0.6 + probe["eval_s_k2"] * 0.6
        per_seed_epoch = k1 + 2 * k2
        overhead = 4.0
        left = self.clock.left() - a.margin
        choice = None
        for seeds in (3, 2, 1):
            epochs = int((0.85 * left - seeds * 3 * overhead) // (seeds * per_seed_epoch))
            if epochs >= a.min_epochs or seeds == 1:
                choice = (seeds, max(2, min(epochs, a.max_epochs)))
                break
        if a.epochs:
            choice = (choice[0], a.epochs)
        if a.seeds is not None:
            choice = (len(a.seeds), choice[1])
        seeds = list(a.seeds) if a.seeds is not None else list(range(choice[0]))
        self.plan = {"epochs": choice[1], "seeds": seeds, "fixed": bool(a.epochs or a.seeds),
                     "fixed_seeds": a.seeds is not None,
                     "estimate_epoch_s": {"K=1": k1, "K=2": k2}, **probe}

    def reproduce(self) -> None:
        """The planned seeds, seed by seed; then more seeds (up to 3) while a whole seed's measured
        time still fits; then cifar_mobilenetv2 on the first seed if it fits."""
        epochs, seeds = self.plan["epochs"], self.plan["seeds"]
        estimate = {1: self.plan["estimate_epoch_s"]["K=1"], 2: self.plan["estimate_epoch_s"]["K=2"]}
        self.measured: dict[str, float] = {}

        def cost(method: str) -> float:
            guess = (epochs * estimate[METHODS[method]["num_students"]] + 4.0)
            return self.measured.get(method) or guess * (MNV2_COST if method.startswith("mnv2") else 1)

        for seed in seeds:
            for method in CORE:
                self._run_if_it_fits(method, seed, epochs, cost(method))
        extra = max(seeds) + 1
        while not self.plan["fixed_seeds"] and len(self.plan["seeds"]) < 3:
            if sum(cost(m) for m in CORE) > self.clock.left() - self.args.margin:
                break
            self.plan["seeds"].append(extra)
            self.plan["added_seeds"] = self.plan.get("added_seeds", 0) + 1
            for method in CORE:
                self._run_if_it_fits(method, extra, epochs, cost(method))
            extra += 1
        if not self.args.no_mnv2:
            for method in ("mnv2_baseline", "mnv2_graft2"):
                self._run_if_it_fits(method, seeds[0], epochs, cost(method))

    def _run_if_it_fits(self, method: str, seed: int, epochs: int, cost: float) -> None:
        if cost > self.clock.left() - self.args.margin:
            self.skipped.append(f"{method} seed {seed} (needs about {cost:.0f} s, {max(0, self.clock.left()):.0f} s left)")
            return
        print(f"[gpu_reproduce] {self.clock.elapsed():.0f} s: {method} seed {seed}, {epochs} epochs", flush=True)
        try:
            record = self.run(method, seed, epochs)
        except Exception as err:  # one failed run (out of memory, say) leaves the others standing
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.notes.append(f"{method} seed {seed} failed: {type(err).__name__}: {first}")
            traceback.print_exc()
            _release(self.device)
            self.write()
            return
        self.runs.append(record)
        self.measured[method] = record["wall_s"]
        print(f"[gpu_reproduce] {method} seed {seed}: top-1 {record['member_top1'][-1] if record['member_top1'] else '-'}"
              f" ({record['wall_s']:.0f} s)", flush=True)
        self.write()

    # ------------------------------------------------------------------ report
    def write(self, finished: bool = False) -> None:
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.args.out + ".tmp")
        tmp.write_text(report(self, finished))
        os.replace(tmp, self.args.out)
        with open(Path(self.args.work_dir) / "gpu_reproduce.json", "w") as f:
            json.dump({"runs": self.runs, "plan": self.plan, "decode": self.decode, "epoch_timings": self.epoch_timings,
                       "skipped": self.skipped, "notes": self.notes}, f, indent=1)


def _per_seed(runs: list[dict]) -> dict[str, dict[int, float]]:
    """{method: {seed: final value}}: mean of the members' last top-1; ensembles as their own rows."""
    table: dict[str, dict[int, float]] = {}
    for r in runs:
        if not r["complete"]:
            continue
        last = r["member_top1"][-1]
        table.setdefault(r["method"], {})[r["seed"]] = sum(last) / len(last)
        if r["K"] > 1:
            name = {"independent2": "ensemble2"}.get(r["method"], r["method"] + "_ensemble")
            table.setdefault(name, {})[r["seed"]] = r["ensemble_top1"][-1]
    order = ["baseline", "independent2", "ensemble2", "graft2", "graft2_ensemble", "mnv2_baseline", "mnv2_graft2",
             "mnv2_graft2_ensemble"]
    return {m: table[m] for m in order if m in table}


def _table(results: dict[str, dict[int, float]], baseline: str) -> str:
    from stats import markdown_table, mean_std

    try:
        return markdown_table(results, baseline)
    except ImportError as err:  # scipy (the t quantile) missing on this machine: means and spreads only
        lines = [f"(no interval: {err})", "", "| method | seeds | top-1 mean ± std |", "| --- | --- | --- |"]
        for name, per_seed in results.items():
            mean, std = mean_std(list(per_seed.values()))
            lines.append(f"| {name} | {','.join(map(str, sorted(per_seed)))} | {mean:.1f} ± {std:.1f} |")
        return "\n".join(lines)


def report(bench: Bench, finished: bool) -> str:
    a, plan = bench.args, bench.plan
    lines = [f"## Reduced reproduction on CIFAR-10{' (QUICK smoke run: tiny subset, not a result)' if a.quick else ''}",
             "", f"Status: {'finished' if finished else 'PARTIAL (rewritten after every run)'}; "
             f"{bench.clock.elapsed():.0f} s of a {a.time_budget:.0f} s budget.", ""]
    d = bench.decode
    if d:
        lines += [f"Data: `{a.dataset}`, {d['train']} training and {d['eval']} test images at "
                  f"{'x'.join(map(str, d['shape']))}, decoded once onto `{bench.device}` in {d['decode_s']:.1f} s "
                  f"({d['cores']} CPU cores; loading the dataset {d['load_s']:.1f} s).", ""]
    cl = "channels_last " if "channels_last" in bench.fields and bench.device.type == "cuda" else ""
    lines += [f"Setting: GraftingTrainer, data_on_device (pad-crop 4 + flip, normalisation on the device), "
              f"{'bf16 autocast, ' if bench.device.type == 'cuda' else ''}{cl}batch {a.batch_size}, SGD momentum 0.9, "
              f"lr {a.lr} cosine, weight decay 5e-4, logging_nan_inf_filter off (no host sync per step), evaluation on "
              "every test image after every epoch; data_order "
              "independent; K=2 methods: lr_spread cosine (members x0.5 / x1); grafting after every epoch but "
              "the last (entropy, A 0.4, c 500).", ""]
    if bench.epoch_timings:
        lines += ["### Epoch time: cifar_resnet56, K=2, grafting, the whole training split, with evaluation",
                  "", "Variants: fused = member_execution fused; +graphs = torch_compile on the cudagraphs backend; "
                  "+compile = torch_compile, inductor, mode reduce-overhead. Measured after the probe below has "
                  "warmed up the same convolution shapes; an epoch of a compiled variant includes its compilation "
                  "when it is the first; target <= 5 s per epoch on one H100.", "",
                  "| variant | epoch | train s | graft + train + evaluation s | ensemble top-1 |",
                  "| --- | --- | --- | --- | --- |"]
        for t in bench.epoch_timings:
            for e, total in enumerate(t["epoch_s"]):
                train = t["train_s"][e] if e < len(t["train_s"]) else math.nan
                top1 = t["top1"][e] if e < len(t["top1"]) else math.nan
                lines.append(f"| {t['variant']} | {e + 1} | {train:.2f} | {total:.2f} | {top1:.1f} |")
            if not t["complete"]:
                lines.append(f"| {t['variant']} | (stopped at its share of the budget before the planned epochs) "
                             "| | | |")
        lines.append("")
    if plan:
        how = "set on the command line" if plan["fixed"] else "as many as fit"
        if plan.get("added_seeds"):
            how += f"; {plan['added_seeds']} seed(s) added after the first ones ran faster than planned"
        lines += [f"Plan: {plan['epochs']} epochs x seeds {plan['seeds']} ({how}); probe: "
                  f"{plan['step_s_k2'] * 1000:.1f} ms per K=2 cifar_resnet20 training step (after warm-up), "
                  f"{plan['eval_s_k2']:.2f} s per K=2 evaluation, {plan['steps_per_epoch']} steps an epoch.", ""]
    results = _per_seed(bench.runs)
    if "baseline" in results:
        lines += [f"### Top-1 after {plan.get('epochs')} epochs (per seed: mean of the members; ensembles as their own rows)",
                  "", _table(results, "baseline"), ""]
    elif results:
        lines += ["(no complete baseline run: no paired table)", ""]
    if bench.runs:
        epochs = max(r["epochs"] for r in bench.runs)
        lines += ["### Top-1 after each epoch (mean of the run's members; evaluation precedes that boundary's graft)",
                  "", "| method | seed | " + " | ".join(f"ep{e + 1}" for e in range(epochs)) + " | s per epoch | run s |",
                  "| --- | --- | " + " | ".join("---" for _ in range(epochs)) + " | --- | --- |"]
        for r in bench.runs:
            cells = [f"{sum(m) / len(m):.1f}" for m in r["member_top1"]] + [""] * (epochs - len(r["member_top1"]))
            per_epoch = sum(r["epoch_s"][1:]) / max(1, len(r["epoch_s"]) - 1) if len(r["epoch_s"]) > 1 else \
                (r["epoch_s"][0] if r["epoch_s"] else math.nan)
            name = r["method"] + ("" if r["complete"] else " (partial)")
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(cells) + f" | {per_epoch:.1f} | {r['wall_s']:.0f} |")
        lines.append("")
    if bench.skipped:
        lines += ["Not run (time): " + "; ".join(bench.skipped) + ".", ""]
    if bench.notes:
        lines += ["Notes:", *[f"- {n}" for n in bench.notes], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", default=str(DEFAULT_DATASET),
                        help="a folder with the CIFAR-10 schema (img, label; train/test splits)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_reproduce.md"))
    parser.add_argument("--work-dir", default=None, help="run folders and the raw results (default: next to --out)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-budget", type=float, default=230.0, help="seconds for everything this script does")
    parser.add_argument("--margin", type=float, default=10.0, help="seconds kept free at the end")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None, help="fixed number of epochs (default: as many as fit)")
    parser.add_argument("--min-epochs", type=int, default=3, help="fewer seeds rather than fewer epochs than this")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="fixed seeds (default: as many as fit, <= 3)")
    parser.add_argument("--resnet56-epochs", type=int, default=None,
                        help="epochs of the cifar_resnet56 timing (default: 2 if they fit in its share, else 1)")
    parser.add_argument("--resnet56-share", type=float, default=0.3, help="most of the budget the epoch timing may use")
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--epoch-variants", nargs="+", choices=list(EPOCH_VARIANTS), default=None,
                        help="execution variants of the cifar_resnet56 epoch timing, in order (default: "
                        "fused+graphs fused on CUDA, fused on CPU)")
    parser.add_argument("--no-mnv2", action="store_true", help="skip the cifar_mobilenetv2 runs")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subset at 16 px, 2 epochs, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_samples, args.eval_samples, args.input_size = args.train_samples or 32, args.eval_samples or 32, 16
        args.epochs, args.seeds, args.probe_steps, args.batch_size, args.eval_batch_size = 2, [0], 3, 16, 32
        args.margin, args.no_mnv2, args.resnet56_epochs = min(args.margin, 2.0), True, 1
    if args.epoch_variants is None:
        args.epoch_variants = ["fused+graphs", "fused"] if args.device.startswith("cuda") else ["fused"]
    args.work_dir = args.work_dir or str(Path(args.out).resolve().parent / "gpu_reproduce_runs")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    import hf_graft  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quick:
        torch.set_num_threads(1)  # tiny convolutions: one thread beats several fighting for shared cores
    bench = Bench(args)
    bench.write()
    bench.load()
    bench.write()
    probe = bench.probe()
    bench.time_resnet56_epochs(probe)
    bench.write()
    bench.choose_epochs(probe)
    print(f"[gpu_reproduce] plan: {bench.plan}", flush=True)
    bench.write()
    bench.reproduce()
    bench.write(finished=True)
    results = _per_seed(bench.runs)
    summary = " | ".join(f"{m} {sum(v.values()) / len(v):.1f}" for m, v in results.items())
    epochs = ", ".join(f"{t['variant']} {t['epoch_s'][-1]:.2f} s" for t in bench.epoch_timings if t["epoch_s"])
    print(f"RESULT cifar_resnet56 K=2 epoch: {epochs or 'not measured'}; top-1 after {bench.plan['epochs']} epochs: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
