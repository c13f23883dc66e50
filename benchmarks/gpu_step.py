"""Training-step throughput of GraftingTrainer in each execution mode against a hand-written loop.

Member-images per second (members x images per member x steps / second) of:

  hand       K timm models (channels_last on CUDA) forwarded one after another on their own batches,
             losses summed, one backward, one `optimizer.step()` (SGD momentum 0.9, weight decay
             5e-4, bf16 autocast on CUDA, no clipping), fed by a DataLoader (workers, pinned memory
             on CUDA) over in-memory synthetic images;
  loop       GraftingTrainer, member_execution loop, channels_last off;
  loop_cl    GraftingTrainer, member_execution loop, channels_last on;
  loop_u8    loop_cl on uint8 images that the trainer normalises on the device
             (DataArguments.normalize_on_device: a quarter of the bytes to collate, pin and copy);
  fused      GraftingTrainer, member_execution fused (channels_last as the default: on for CUDA,
             off on CPU);
  fused_graphs   fused, with torch_compile on the "cudagraphs" backend: the forward and backward
             replayed as CUDA graphs, no kernel generation (CUDA only);
  fused_compile  fused, with torch_compile (inductor) in mode "reduce-overhead": generated kernels
             replayed as CUDA graphs (CUDA only);
  hand_dev   the hand loop on batches already on the device (no DataLoader).

Every side runs under the same cuDNN setting (`--cudnn-benchmark`, on by default as in
GraftingTrainer's CUDA default and timm's training script). A side that fails is reported as failed,
with the first line of its error, and the others go on.

`--diagnose` measures no rate: it profiles `--diagnose-steps` steps of each side after the warm-up
and reports, per step, the operators the host dispatched (top-level aten calls, backward included)
and, on CUDA, the kernels launched, the host synchronisations (cudaStreamSynchronize /
cudaDeviceSynchronize / cudaEventSynchronize / blocking cudaMemcpy) and the share of the wall time
the GPU spent in kernels: what separates a side bound by the host from one bound by the GPU.

Every side trains the same members (same seeds) on the same dataset object through the same
DataLoader settings (batch, workers, pinned memory, shuffling) with per-member batches
([B, K, C, H, W], data_order independent). The Trainer is measured through `trainer.train()`: a
callback reads the clock at step ends, so model building, Trainer setup and DataLoader start are
excluded; every side first runs warm-up steps, then `--windows` windows of `--window` steps, each
between two device synchronisations, and reports the median window (with `--rounds N`, every side
is measured N times in alternating order and the median of the N is reported). Configurations run
in order of importance and stop when `--time-budget` seconds are used; the output lists the ones
skipped.

    python benchmarks/gpu_step.py --device cuda --time-budget 200 --out benchmarks/results/gpu_step.md
    python benchmarks/gpu_step.py --device cpu --models cifar_resnet20 --ks 2 4 --batch-size 32 --rounds 2 \\
        --out benchmarks/results/gpu_step_cpu.md
    python benchmarks/gpu_step.py --device cpu --quick        # tests/test_benchmarks.py: < 1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIDES = ("hand", "loop", "loop_cl", "loop_u8", "fused", "fused_graphs", "fused_compile", "hand_dev")
GRAPH_SIDES = ("fused_graphs", "fused_compile")  # CUDA only
ALL = ("hand", "loop", "loop_cl", "fused", "hand_dev")
HAND_AND_FUSED = ("hand", "fused")
REST = ("loop", "loop_cl", "hand_dev")


@dataclass
class Row:
    """One (model, K) configuration and the sides to measure for it."""

    model: str
    K: int
    size: int
    batch: int
    sides: tuple[str, ...]
    rates: dict[str, list[float]] = field(default_factory=dict)  # side -> median window of every round
    errors: dict[str, str] = field(default_factory=dict)  # side -> first line of its error
    diagnosis: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> per-step counts (--diagnose)

    @property
    def results(self) -> dict[str, float]:
        """side -> member-images/s: the median over rounds of each round's median window."""
        return {side: statistics.median(r) for side, r in self.rates.items()}


def plan(args) -> list[Row]:
    """Configurations in order of importance (the time budget cuts from the end)."""
    if args.diagnose:
        size = 16 if args.quick else None
        batch = 8 if args.quick else 128
        # eager sides only: a compiled side's capture would take most of a short window
        rows = [Row("cifar_resnet56" if not args.quick else "cifar_resnet20", 2, size or 32, batch,
                    ("hand", "loop_cl", "fused", "hand_dev")),
                Row("resnet50", 2, size or 224, batch, ("hand", "loop_cl", "loop_u8", "hand_dev"))]
        if args.quick:
            rows = rows[:1]
    elif args.quick:
        rows = [Row("cifar_resnet20", 2, 16, 8, ALL), Row("cifar_resnet20", 4, 16, 8, HAND_AND_FUSED)]
        rows[0].sides += ("loop_u8",)
    elif args.graphs_first:
        # the CUDA-graph sides of the launch-bound nets first, then the rest of the table
        big, small = 224, 32
        rows = [
            Row("cifar_resnet56", 2, small, 128, ("hand", "fused", "fused_graphs")),
            Row("cifar_resnet20", 4, small, 128, ("hand", "fused", "fused_graphs")),
            Row("cifar_resnet56", 4, small, 128, ("hand", "fused", "fused_graphs")),
            Row("resnet50", 2, big, 128, ("hand", "loop_cl", "loop_u8", "hand_dev")),
            Row("cifar_resnet56", 2, small, 128, ("loop_cl", "fused_compile")),
            Row("cifar_resnet20", 4, small, 128, ("fused_compile",)),
            Row("cifar_resnet20", 8, small, 128, ("hand", "fused", "fused_graphs")),
        ]
    else:
        big, small = 224, 32
        rows = [
            Row("resnet50", 2, big, 128, (*ALL, "loop_u8")),
            Row("cifar_resnet56", 2, small, 128, ALL),
            Row("cifar_resnet20", 4, small, 128, HAND_AND_FUSED),
            Row("cifar_resnet56", 4, small, 128, HAND_AND_FUSED),
            Row("cifar_resnet20", 2, small, 128, ALL),
            Row("cifar_resnet20", 4, small, 128, REST),
            Row("cifar_resnet56", 4, small, 128, REST),
            Row("cifar_resnet20", 8, small, 128, ALL),
            Row("cifar_resnet56", 8, small, 128, ALL),
            Row("cifar_resnet56", 2, small, 128, GRAPH_SIDES),
            Row("cifar_resnet20", 4, small, 128, GRAPH_SIDES),
            Row("cifar_resnet56", 4, small, 128, GRAPH_SIDES),
        ]
    for row in rows:
        if args.batch_size:
            row.batch = args.batch_size
        if args.image_size:
            row.size = args.image_size
    if args.models:
        rows = [r for r in rows if r.model in args.models]
    if args.ks:
        rows = [r for r in rows if r.K in args.ks]
    if args.device != "cuda":
        for row in rows:
            row.sides = tuple(side for side in row.sides if side not in GRAPH_SIDES)
        rows = [r for r in rows if r.sides]
    return rows


# ----------------------------------------------------------------------------- data
class SyntheticImages(torch.utils.data.Dataset):
    """In-memory images for K members: item i is {pixel_values [K, 3, S, S], labels [K]}, drawn from
    a pool of distinct random images (normalised pixel statistics; `uint8`: raw pixels, normalised by
    the trainer)."""

    def __init__(self, length: int, K: int, size: int, num_classes: int, pool: int = 256, seed: int = 0,
                 uint8: bool = False):
        generator = torch.Generator().manual_seed(seed)
        self.length = length
        if uint8:
            self.images = torch.randint(0, 256, (pool, K, 3, size, size), generator=generator, dtype=torch.uint8)
        else:
            self.images = torch.randn(pool, K, 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (pool, K), generator=generator)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i % len(self.images)
        return {"pixel_values": self.images[j], "labels": self.labels[j]}


def num_classes_of(model: str) -> int:
    return 10 if model.startswith("cifar_") else 1000


# ----------------------------------------------------------------------------- timing
class WindowClock:
    """Reads the clock after the warm-up and after every `window` steps, synchronising the device
    first; `rates()` gives member-images per second of each window."""

    def __init__(self, device: torch.device, warmup: int, window: int, windows: int, images_per_step: int):
        self.device, self.warmup, self.window, self.windows = device, warmup, window, windows
        self.images_per_step = images_per_step
        self.marks: list[float] = []

    @property
    def total_steps(self) -> int:
        return self.warmup + self.window * self.windows

    def step_end(self, step: int) -> None:
        """`step`: number of steps finished (1-based)."""
        if step >= self.warmup and (step - self.warmup) % self.window == 0 and len(self.marks) <= self.windows:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())

    def rates(self) -> list[float]:
        return [self.window * self.images_per_step / (b - a) for a, b in zip(self.marks, self.marks[1:])]


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class StepProfiler:
    """Profiles `steps` steps after `warmup` steps (--diagnose); `summary` holds the per-step counts."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.profile = None
        self.summary: dict[str, float] = {}

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_end(self, step: int) -> None:
        if step == self.warmup:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()
            self.profile = profile(activities=activities)
            self.profile.__enter__()
            self.started = time.perf_counter()
        elif step == self.total_steps and self.profile is not None:
            self._sync()
            wall = time.perf_counter() - self.started
            self.profile.__exit__(None, None, None)
            self.summary = summarize_profile(self.profile.events(), wall, self.steps)
            self.profile = None

    def rates(self) -> list[float]:
        return []


def summarize_profile(events, wall: float, steps: int) -> dict[str, float]:
    """Per step: top-level aten operators the host dispatched (an operator called from another is not
    counted again), CUDA kernels, host synchronisations, and the GPU's time in kernels over the wall time."""
    from torch.autograd import DeviceType

    host_ops = kernels = syncs = 0
    kernel_us = 0.0
    for event in events:
        if event.device_type == DeviceType.CUDA:
            if not event.name.startswith(("Memcpy", "Memset")):
                kernels += 1
                kernel_us += event.time_range.elapsed_us()
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                host_ops += 1
        elif event.name in SYNC_CALLS:
            syncs += 1
    return {
        "host_ops": host_ops / steps,
        "kernels": kernels / steps,
        "syncs": syncs / steps,
        "gpu_busy": kernel_us / 1e6 / wall if kernels else float("nan"),
        "ms": wall / steps * 1e3,
    }


def make_clock(row: Row, args, device: torch.device):
    if args.diagnose:
        return StepProfiler(device, args.warmup, args.diagnose_steps)
    return WindowClock(device, args.warmup, args.window, args.windows, row.batch * row.K)


# ----------------------------------------------------------------------------- sides
def _loader(dataset, row: Row, args, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=row.batch, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", drop_last=True,
    )


def run_hand(row: Row, dataset, args, device: torch.device, on_device: bool, clock) -> list[float]:
    from hf_graft.population.students import create_member

    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    models = [
        create_member(row.model, num_classes=num_classes_of(row.model), seed=args.seed + 1000 * k)
        .to(device).to(memory_format=memory_format).train()
        for k in range(row.K)
    ]
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    if on_device:
        from torch.utils.data import default_collate

        batches = []
        for i in range(2):
            items = default_collate([dataset[j] for j in range(i * row.batch, (i + 1) * row.batch)])
            batches.append({k: v.to(device) for k, v in items.items()})
        source = (batches[i % 2] for i in range(clock.total_steps))
    else:
        source = iter(_loader(dataset, row, args, device))
    for step in range(1, clock.total_steps + 1):
        batch = next(source)
        x = batch["pixel_values"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with autocast():
            loss = sum(
                F.cross_entropy(model(x[:, k].contiguous(memory_format=memory_format)), y[:, k])
                for k, model in enumerate(models)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step_end(step)
    del source
    return clock.rates()


def run_trainer(row: Row, dataset, args, device: torch.device, side: str, workdir: str, clock) -> list[float]:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from hf_graft.config import GraftingConfig
    from hf_graft.population.students import PopulationSpec, StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer

    cuda = device.type == "cuda"
    compiled = {"fused_graphs": dict(torch_compile=True, torch_compile_backend="cudagraphs"),
                "fused_compile": dict(torch_compile=True, torch_compile_backend="inductor",
                                      torch_compile_mode="reduce-overhead")}.get(side, {})

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            clock.step_end(state.global_step)

    config = GraftingConfig(
        output_dir=workdir, student_model=row.model, num_students=row.K, per_device_train_batch_size=row.batch,
        max_steps=clock.total_steps, learning_rate=0.1, seed=args.seed, data_order="independent",
        member_execution="fused" if side.startswith("fused") else "loop",
        channels_last={"loop": False, "loop_cl": True, "loop_u8": True}.get(side), cudnn_benchmark=args.cudnn_benchmark == "on",
        bf16=cuda, use_cpu=not cuda, dataloader_num_workers=args.workers, dataloader_pin_memory=cuda,
        dataloader_drop_last=True, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, export_student=False, **compiled,
    )
    spec = PopulationSpec(row.model, row.K, num_classes_of(row.model))
    spec.data_config = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # for loop_u8's batches
    population = StudentPopulation.from_spec(spec, seed=args.seed)
    trainer = GraftingTrainer(model=population, args=config, train_dataset=dataset, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training line would interleave with the report
    trainer.train()
    del trainer, population
    return clock.rates()


def measure(row: Row, side: str, args, device: torch.device):
    """The side's window rates, or with --diagnose its per-step profile summary."""
    clock = make_clock(row, args, device)
    dataset = SyntheticImages((clock.total_steps + 2) * row.batch, row.K, row.size, num_classes_of(row.model),
                              pool=64 if row.size > 64 else 256, seed=args.seed, uint8=side == "loop_u8")
    torch.manual_seed(args.seed)
    try:
        if side in ("hand", "hand_dev"):
            # the setting the trainer sides get from GraftingConfig.cudnn_benchmark (set for a run, then restored)
            previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, args.cudnn_benchmark == "on"
            try:
                run_hand(row, dataset, args, device, on_device=side == "hand_dev", clock=clock)
            finally:
                torch.backends.cudnn.benchmark = previous
        else:
            with tempfile.TemporaryDirectory(prefix="gpu_step_") as workdir:
                run_trainer(row, dataset, args, device, side, workdir, clock=clock)
        return clock.summary if args.diagnose else clock.rates()
    finally:
        if side in GRAPH_SIDES:
            torch._dynamo.reset()  # frees the side's graphs and their memory pool
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report
LABELS = {
    "hand": "hand loop",
    "loop": "trainer, loop",
    "loop_cl": "trainer, loop + channels_last",
    "loop_u8": "trainer, loop + channels_last, uint8 batches",
    "fused": "trainer, fused",
    "fused_graphs": "trainer, fused + CUDA graphs",
    "fused_compile": "trainer, fused + inductor reduce-overhead",
    "hand_dev": "hand loop, batch on the device",
}


def _fused_label(device: torch.device) -> str:
    return "trainer, fused + channels_last" if device.type == "cuda" else "trainer, fused"


def environment(device: torch.device) -> list[str]:
    import accelerate
    import timm
    import transformers

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        machine = f"CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"
    return [
        f"- device: {machine}",
        f"- torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, Python {platform.python_version()}",
    ]


def report(rows: list[Row], skipped: list[str], args, device: torch.device, elapsed: float) -> str:
    cuda = device.type == "cuda"
    title = "profile" if args.diagnose else "throughput"
    lines = [f"# Training-step {title}: GraftingTrainer vs a hand loop (benchmarks/gpu_step.py)", ""]
    lines += environment(device)
    lines += [
        f"- settings: SGD momentum 0.9, weight decay 5e-4, lr 0.1, {'bf16 autocast' if cuda else 'float32'}, no "
        f"clipping; synthetic in-memory images, one batch per member (data_order independent), DataLoader with "
        f"{args.workers} worker(s){', pinned memory' if cuda else ''}; hand loop models in "
        f"{'channels_last' if cuda else 'contiguous memory'}"
        + (f"; cuDNN autotuning (torch.backends.cudnn.benchmark) {args.cudnn_benchmark} for every side" if cuda else ""),
        (f"- profile: {args.warmup} warm-up steps, then {args.diagnose_steps} steps under torch.profiler"
         if args.diagnose else
         f"- timing: {args.warmup} warm-up steps, then the median of {args.windows} windows of {args.window} steps, "
         f"each between two device synchronisations"
         + (f"; median over {args.rounds} rounds in alternating side order" if args.rounds > 1 else "")
         + "; member-images/s (ratio to the hand loop of the row)"),
        f"- command: `python benchmarks/gpu_step.py {' '.join(args.argv)}` ({elapsed:.0f} s)",
        "",
    ]
    merged: dict[tuple, dict] = {}
    for row in rows:  # a (model, K) split over several rows of the plan is one line of the table
        key = (row.model, row.size, row.K, row.batch)
        merged.setdefault(key, {}).update(row.results)
    errors: dict[tuple, dict] = {}
    for row in rows:
        errors.setdefault((row.model, row.size, row.K, row.batch), {}).update(row.errors)
    if args.diagnose:
        return "\n".join(lines + diagnosis_table(rows, device)) + "\n"
    measured = [s for s in SIDES if any(s in r.rates or s in r.errors for r in rows)] or ["hand"]
    header = ["model", "px", "K", "batch/member"] + [
        _fused_label(device) if s == "fused" else LABELS[s] for s in measured
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, size, K, batch), results in merged.items():
        failed = errors[(model, size, K, batch)]
        if not results and not failed:
            continue
        base = results.get("hand")
        cells = []
        for side in measured:
            value = results.get(side)
            if side in failed:
                cells.append("failed")
            elif value is None:
                cells.append("-")
            elif side == "hand" or not base:
                cells.append(f"{value:.0f}")
            else:
                cells.append(f"{value:.0f} ({value / base:.2f}x)")
        lines.append(f"| `{model}` | {size} | {K} | {batch} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in rows:
        for side, error in row.errors.items():
            lines.append(f"- failed: `{row.model}` K={row.K}, {LABELS[side]}: {error}")
    if any(row.errors for row in rows):
        lines.append("")
    if skipped:
        lines.append(f"Skipped (time budget of {args.time_budget:.0f} s used): " + "; ".join(skipped) + ".")
    else:
        lines.append("Skipped: none.")
    lines += [
        "",
        "Targets: `resnet50` K=2 trainer >= 0.95x the hand loop; `cifar_resnet56` K=2 >= 1.0x; "
        "fused K=4 `cifar_resnet20` / `cifar_resnet56` >= 2x the hand loop (one GPU).",
    ]
    return "\n".join(lines) + "\n"


def diagnosis_table(rows: list[Row], device: torch.device) -> list[str]:
    cuda = device.type == "cuda"
    lines = [
        "Per training step, over the profiled steps: top-level aten operators the host dispatched (backward "
        "included)" + ("; CUDA kernels launched; host synchronisations (cudaStreamSynchronize, "
                       "cudaDeviceSynchronize, cudaEventSynchronize, blocking cudaMemcpy); the share of the wall "
                       "time the GPU spent in kernels" if cuda else "") + "; wall ms per step (under the profiler).",
        "",
        "| model | px | K | side | host ops | " + ("kernels | syncs | GPU busy | " if cuda else "") + "ms/step |",
        "|---|---|---|---|---|" + ("---|---|---|" if cuda else "") + "---|",
    ]
    for row in rows:
        for side in row.sides:
            if side in row.errors:
                lines.append(f"| `{row.model}` | {row.size} | {row.K} | {LABELS[side]} | failed: {row.errors[side]} |")
                continue
            d = row.diagnosis.get(side)
            if not d:
                continue
            gpu = f"{d['kernels']:.0f} | {d['syncs']:.1f} | {100 * d['gpu_busy']:.0f}% | " if cuda else ""
            lines.append(f"| `{row.model}` | {row.size} | {row.K} | {LABELS[side]} | {d['host_ops']:.0f} | {gpu}"
                         f"{d['ms']:.1f} |")
    return lines


def _write(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(text)
    partial.replace(target)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny CPU-sized run (< 1 minute)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later configurations are skipped")
    parser.add_argument("--models", nargs="+", help="only these models")
    parser.add_argument("--ks", nargs="+", type=int, help="only these K")
    parser.add_argument("--batch-size", type=int, help="images per member and step (default: 128; quick: 8)")
    parser.add_argument("--image-size", type=int, help="pixels (default: 224 for resnet50, 32 otherwise; quick: 16)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per side")
    parser.add_argument("--window", type=int, help="steps per timed window")
    parser.add_argument("--windows", type=int, help="timed windows per side (the median is reported)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every side this many times, alternating their order (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                        help="cuDNN autotuning for every side (default on, GraftingTrainer's CUDA default)")
    parser.add_argument("--graphs-first", action="store_true",
                        help="on CUDA, measure the CUDA-graph sides of the small nets first (a short window)")
    parser.add_argument("--diagnose", action="store_true", help="profile each side instead of timing it")
    parser.add_argument("--diagnose-steps", type=int, default=5, help="steps profiled per side (--diagnose)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.rounds < 1:
        parser.error(f"--rounds: got {args.rounds}; allowed: an integer >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible here (use --device cpu)")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    quick_or_cpu = args.quick or device.type == "cpu"
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 3 if quick_or_cpu else 8))
    args.window = args.window if args.window is not None else (2 if args.quick else 5 if quick_or_cpu else 15)
    args.windows = args.windows if args.windows is not None else (2 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)

    import transformers

    import hf_graft  # noqa: F401  (registers the cifar_* models)

    transformers.logging.set_verbosity_error()
    rows = plan(args)
    if not rows:
        parser.error("--models/--ks: no configuration left to run")
    start = time.perf_counter()
    durations: dict[str, list[float]] = {}
    skipped: list[str] = []
    for round_index in range(args.rounds):
        for row in rows:
            label = f"{row.model} K={row.K} {row.size}px batch {row.batch}"
            if args.time_budget is not None:
                elapsed = time.perf_counter() - start
                seen = durations.get(row.model) or [d for ds in durations.values() for d in ds]
                estimate = len(row.sides) * statistics.mean(seen) if seen else 0.0
                if elapsed + estimate > args.time_budget:
                    skipped.append(f"{label}: {', '.join(row.sides)}"
                                   + (f" (round {round_index + 1})" if args.rounds > 1 else ""))
                    continue
            # alternate the order of the sides from round to round: slow drifts of the machine hit all alike
            for side in row.sides if round_index % 2 == 0 else tuple(reversed(row.sides)):
                side_start = time.perf_counter()
                try:
                    rates = measure(row, side, args, device)
                except Exception as err:  # one failing side (a compile backend, memory) leaves the others
                    first = (str(err).strip().splitlines() or [""])[0][:300]
                    row.errors[side] = f"{type(err).__name__}: {first}"
                    print(f"{label:<40} {side:<9} failed: {row.errors[side]}", flush=True)
                    continue
                finally:
                    durations.setdefault(row.model, []).append(time.perf_counter() - side_start)
                if args.diagnose:
                    if rates:
                        row.diagnosis[side] = rates
                    else:  # the run ended before the profiled steps
                        row.errors[side] = "no profiled steps"
                    print(f"{label:<40} {side:<9} {rates or row.errors[side]}", flush=True)
                    continue
                if not rates:  # the run ended before its first timed window
                    row.errors[side] = "no timed window"
                    print(f"{label:<40} {side:<9} failed: {row.errors[side]}", flush=True)
                    continue
                row.rates.setdefault(side, []).append(statistics.median(rates))
                spread = f"{min(rates):.0f}..{max(rates):.0f}"
                print(f"{label:<40} {side:<9} {statistics.median(rates):10.1f} member-images/s (windows {spread}, "
                      f"round {round_index + 1}, {time.perf_counter() - side_start:.1f} s)", flush=True)
            if args.out:  # after every configuration, so that a run stopped from outside still leaves a report
                _write(args.out, report(rows, skipped, args, device, time.perf_counter() - start))
    text = report(rows, skipped, args, device, time.perf_counter() - start)
    print()
    print(text, end="")
    if args.out:
        _write(args.out, text)
    if args.diagnose:
        first = next((r for r in rows if r.diagnosis), None)
        if first is None:
            print("RESULT nothing profiled")
            return 1
        ops = ", ".join(f"{side} {d['host_ops']:.0f}" for side, d in first.diagnosis.items())
        print(f"RESULT {first.model} K={first.K}: host ops per step: {ops}")
        return 0
    first = next((r for r in rows if r.results.get("hand")), None)
    if first is None:
        print("RESULT nothing measured")
        return 1
    ratios = ", ".join(f"{side} {first.results[side] / first.results['hand']:.2f}x"
                       for side in SIDES if side != "hand" and side in first.results)
    print(f"RESULT {first.model} K={first.K}: hand loop {first.results['hand']:.1f} member-images/s; {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
