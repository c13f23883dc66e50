"""Throughput of GraftingTrainer against a plain hand-written PyTorch loop.

Trains the same K `cifar_resnet20` students (same seeds, same CIFAR-10 subset, same timm
transforms, same batch size, same DataLoader settings) twice per repeat, in one process:

  (a) hf_graft: `GraftingTrainer` (no evaluation, no checkpoints, logging only at the end; grafting
      off by default -- `graft_source: none` -- so that both sides do the same work; `--graft` turns
      the epoch-boundary graft on, whose cost `benchmarks/graft_cost.py` measures on its own);
  (b) plain: K models and K SGD optimizers (momentum 0.9, weight decay 5e-4, cosine schedule),
      one member after the other on each batch, fed by a hand-written Dataset that decodes the same
      images with the same transform and gives each member its own order (as data_order
      `independent` does).

The two alternate (a, b, b, a, ...) so that load from other processes on a shared machine hits both
alike; the epoch time is measured from the start of the epoch (before the DataLoader iterator is
created) to the end of its last optimizer step, and the median over repeats is reported. The last
line printed is the ratio `hf_graft time per epoch / plain loop time per epoch` (target <= 1.05).

With a CUDA GPU it also compares one member through GraftingTrainer (bf16) against timm's own
training step (channels_last + bf16 autocast) in images/s per member (target >= 0.9x).

Full-size command (the one behind benchmarks/results/throughput.md):

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --train-samples 2048 --epochs 1 --repeats 5

Quick smoke run (< 1 minute; tests/test_benchmarks.py):

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = str((REPO.parent / "shared" / "data" / "cifar10").resolve())
if not os.path.isdir(DEFAULT_DATASET):
    DEFAULT_DATASET = "/work/shared/data/cifar10"


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers of past epochs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------- data
def load_data(args):
    """The CIFAR subset (loaded once, shared by both sides) and, for the plain loop, the training
    transform GraftingTrainer's datasets use (timm's, for the student's data config)."""
    from hf_graft.training.builder import student_data_config
    from hf_graft.config import DataArguments, GraftingConfig
    from hf_graft.data.transforms import build_transform
    from hf_graft.data.loading import load_image_data

    data_args = DataArguments(dataset_name=args.dataset, eval_split="test", max_train_samples=args.train_samples,
                              max_eval_samples=16)
    data = load_image_data(data_args, seed=0)
    probe = GraftingConfig(output_dir=args.workdir, student_model=args.model, num_students=args.K,
                           graft_source="none", use_cpu=True)
    transform = build_transform(student_data_config(probe, data.num_classes), data_args, is_training=True)
    return data_args, data, transform


class PlainDataset(torch.utils.data.Dataset):
    """What a user would write by hand: member k reads example perm_k[i] (perm_0 = identity)."""

    def __init__(self, dataset, transform, image_column, label_column, num_members, seed=0):
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        n = len(dataset)
        self.perms = [list(range(n))] + [
            torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed + k)).tolist()
            for k in range(1, num_members)
        ]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        out = []
        for perm in self.perms:
            row = self.dataset[perm[i]]
            image = row[self.image_column]
            if image.mode != "RGB":
                image = image.convert("RGB")
            out.append((self.transform(image), row[self.label_column]))
        return out  # K (image, label) pairs; default_collate gives K [B, C, H, W] batches


# ----------------------------------------------------------------------------- (b) plain loop
def run_plain(args, data, transform, seed: int) -> list[float]:
    import timm

    from hf_graft.population.students import create_member

    models = [create_member(args.model, num_classes=data.num_classes, seed=seed + 1000 * k) for k in range(args.K)]
    base_lr = 0.1
    multipliers = [1.0] * args.K
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=base_lr * mult, momentum=0.9, weight_decay=5e-4)
        for m, mult in zip(models, multipliers)
    ]
    dataset = PlainDataset(data.train, transform, data.image_column, data.label_column, args.K, seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, pin_memory=False,
        drop_last=False, generator=torch.Generator().manual_seed(seed),
    )
    total_steps = args.epochs * math.ceil(len(dataset) / args.batch_size)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total_steps) for o in optimizers]
    del timm
    for m in models:
        m.train()
    epoch_times = []
    for _ in range(args.epochs):
        start, cpu = time.perf_counter(), cpu_seconds()
        for batch in loader:
            for k, (model, opt, sched) in enumerate(zip(models, optimizers, schedulers)):
                x, y = batch[k]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        del batch
        epoch_times.append((time.perf_counter() - start, cpu_seconds() - cpu))
    return epoch_times


# ----------------------------------------------------------------------------- (a) GraftingTrainer
def run_trainer(args, data_args, data, seed: int, workdir: str) -> list[float]:
    """GraftingTrainer on a run built as the command line builds it (`build_population_and_datasets`)."""
    from transformers import TrainerCallback

    from hf_graft.training.builder import build_population_and_datasets
    from hf_graft.config import GraftingConfig
    from hf_graft.training.trainer import GraftingTrainer

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_epoch_begin(self, args_, state, control, **kwargs):
            self.start = (time.perf_counter(), cpu_seconds())

        def on_epoch_end(self, args_, state, control, **kwargs):
            self.times.append((time.perf_counter() - self.start[0], cpu_seconds() - self.start[1]))

    graft = args.graft and args.K >= 2
    config = GraftingConfig(
        output_dir=workdir, student_model=args.model, num_students=args.K,
        graft_source="external" if graft else "none", num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=0.1, lr_scheduler_type="cosine",
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=args.num_workers, dataloader_pin_memory=args.cuda, seed=seed,
        data_order="independent" if args.K > 1 else "shared", bf16=args.bf16, use_cpu=not args.cuda,
        export_student=False, replace_output_dir=True,  # every timed run writes into the same workdir
    )
    population, dataset, _ = build_population_and_datasets(config, data_args, data=data)
    timer = EpochTimer()
    # no eval_dataset: the end of the run evaluates nothing and the timed work is training alone
    trainer = GraftingTrainer(model=population, args=config, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    return timer.times


# ----------------------------------------------------------------------------- GPU: one member vs timm
def run_timm_gpu_step(args, data, transform, seed: int) -> list[float]:
    """timm's own training step on one member: channels_last + bf16 autocast (GPU only)."""
    from hf_graft.population.students import create_member

    device = torch.device("cuda")
    model = create_member(args.model, num_classes=data.num_classes, seed=seed).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dataset = PlainDataset(data.train, transform, data.image_column, data.label_column, 1, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.num_workers, pin_memory=True, drop_last=False)
    times = []
    for _ in range(args.epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in loader:
            x, y = batch[0]
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start, float("nan")))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per repeat and side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny convs here)")
    parser.add_argument("--graft", action="store_true", help="graft at epoch boundaries on side (a) (needs --epochs >= 2)")
    parser.add_argument("--workdir", default="/tmp/hf_graft_throughput")
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute)")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_samples, args.repeats, args.epochs, args.num_workers = 128, 2, 1, 0
    args.cuda, args.bf16 = False, False

    torch.set_num_threads(args.threads)
    import transformers

    import hf_graft  # noqa: F401

    transformers.logging.set_verbosity_error()
    data_args, data, transform = load_data(args)
    images = len(data.train)
    print(f"throughput: {args.model}, K={args.K}, batch {args.batch_size}, {images} images x {args.epochs} epoch(s), "
          f"{args.repeats} repeats, {args.num_workers} loader worker(s), torch threads {torch.get_num_threads()}, "
          f"graft {'on' if args.graft else 'off'}", flush=True)

    trainer_times, plain_times = [], []  # (wall s, cpu s) per epoch
    for r in range(args.repeats):
        order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
        for side in order:
            if side == "trainer":
                t = run_trainer(args, data_args, data, seed=r, workdir=os.path.join(args.workdir, f"r{r}"))
                trainer_times += t
            else:
                t = run_plain(args, data, transform, seed=r)
                plain_times += t
            print(f"  repeat {r} {side:<7}: " + ", ".join(f"{w:.2f} s wall / {c:.2f} s cpu" for w, c in t), flush=True)

    med_a, med_b = (statistics.median(w for w, _ in trainer_times), statistics.median(w for w, _ in plain_times))
    cpu_a, cpu_b = (statistics.median(c for _, c in trainer_times), statistics.median(c for _, c in plain_times))
    print(f"hf_graft GraftingTrainer: median {med_a:.2f} s/epoch wall ({cpu_a:.2f} s cpu), {images / med_a:.1f} images/s "
          f"({images * args.K / med_a:.1f} member-images/s)")
    print(f"plain PyTorch loop:       median {med_b:.2f} s/epoch wall ({cpu_b:.2f} s cpu), {images / med_b:.1f} images/s "
          f"({images * args.K / med_b:.1f} member-images/s)")

    if torch.cuda.is_available() and not args.quick:
        # one member: GraftingTrainer (bf16) against timm's channels_last + bf16 autocast step
        gpu_args = argparse.Namespace(**{**vars(args), "K": 1, "cuda": True, "bf16": True, "graft": False})
        torch.set_num_threads(os.cpu_count() or 1)
        gpu_trainer, gpu_timm = [], []
        for r in range(args.repeats):
            gpu_trainer += run_trainer(gpu_args, data_args, data, seed=r, workdir=os.path.join(args.workdir, f"g{r}"))
            gpu_timm += run_timm_gpu_step(gpu_args, data, transform, seed=r)
        ips_a = images / statistics.median(w for w, _ in gpu_trainer)
        ips_b = images / statistics.median(w for w, _ in gpu_timm)
        print(f"GPU one member: GraftingTrainer {ips_a:.0f} images/s, timm channels_last+bf16 {ips_b:.0f} images/s; "
              f"ratio {ips_a / ips_b:.3f} (target >= 0.9)")

    print(f"RATIO hf_graft/plain time per epoch: {med_a / med_b:.3f} wall (target <= 1.05), "
          f"{cpu_a / cpu_b:.3f} cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
