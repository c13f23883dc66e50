"""`hf-graft analyze`: invalid filters and layer entropy of trained models, side by side.

    hf-graft analyze PATH [PATH ...] [--reference PATH] [--thresholds 0.001 0.01 0.1 1]
                     [--bins 10] [--json out.json] [--plot out.png] [--pretrained]

PATH is one of (the model names of `hf_graft.population.sources`)
  * an exported student folder (config.json + model.safetensors / pytorch_model.bin, loadable by
    `timm.create_model("local-dir:" + PATH, pretrained=True)`); `local-dir:PATH` works too;
  * a training checkpoint folder (holds graft_population.json): every member is analysed, as
    `PATH#member0`, `PATH#member1`, ...; `PATH#memberK` (or `PATH#K`) picks one member;
  * a timm model name (`resnet18`, `cifar_resnet20`), randomly initialised unless --pretrained;
  * an `hf-hub:` id, loaded with its pretrained weights.
With --reference, the valid/invalid split of every filter is decided by the reference model (a
single model: a checkpoint without `#memberK` means member 0), as in the paper's Table 8.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hf_graft.cli.plots import plot_reports
from hf_graft.graft.filters import DEFAULT_THRESHOLDS, FilterReport, filter_report, threshold_key
from hf_graft.population.sources import ACCEPTED, ModelSource, ModelSourceError, resolve_model_source
from hf_graft.models.registry import check_folder_architecture
from hf_graft.cli.arguments import ArgumentsError, CommandLineParser, command_parser, parse_arguments
from hf_graft.errors import HfGraftError, one_line

__all__ = ["AnalyzeArguments", "build_parser", "load_models", "main"]

PROG = "hf-graft analyze"
PLOT_EXTRA = 'pip install "hf_graft[plot]" (in a source checkout: pip install -e ".[plot]")'


def load_models(source: ModelSource, *, pretrained: bool = False) -> list[tuple[str, object]]:
    """(display name, nn.Module in eval mode) for every model a source stands for."""
    import timm

    if source.kind == "checkpoint":
        from hf_graft.population.students import load_checkpoint_members

        members = None if source.member is None else [source.member]
        _, models = load_checkpoint_members(source.location, members=members)
        indices = list(range(len(models))) if members is None else members
        return [(f"{source.location}#member{k}", m) for k, m in zip(indices, models)]
    # exported folders and Hub ids carry trained weights; bare timm names only with --pretrained
    if source.kind == "folder":
        check_folder_architecture(source.location, source.spec)
    model = timm.create_model(source.timm_name, pretrained=pretrained or source.kind != "timm")
    return [(source.spec, model.eval())]


# ----------------------------------------------------------------------------- table
def _fmt(value, kind: str = "float") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return str(int(value))
    if kind == "ratio":
        return f"{100.0 * value:.2f}%"
    return f"{value:.4g}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def format_table(named_reports: Sequence[tuple[str, FilterReport]], thresholds: Sequence[float]) -> str:
    """Models as columns; totals, then per threshold: invalid count, ratio, mean l1 valid / invalid."""
    with_reference = any(r.has_reference for _, r in named_reports)
    split = "ref-" if with_reference else ""
    rows: list[tuple[str, list[str]]] = [
        ("non-finite weights", [f"{r.total_nonfinite} / {r.num_weights}" for _, r in named_reports]),
        ("conv layers", [str(len(r.layers)) for _, r in named_reports]),
        ("total filters", [_fmt(r.total_filters, "int") for _, r in named_reports]),
        ("total entropy", [_fmt(r.total_entropy) for _, r in named_reports]),
    ]
    for t in thresholds:
        stats = [r.invalid_stats(t) for _, r in named_reports]
        key = threshold_key(t)
        rows.append((f"t={key} {split}invalid", [_fmt(s["count"], "int") for s in stats]))
        rows.append((f"t={key} {split}invalid ratio", [_fmt(s["ratio"], "ratio") for s in stats]))
        if with_reference:
            rows.append((f"t={key} own invalid ratio", [_fmt(s.get("own_ratio"), "ratio") for s in stats]))
        rows.append((f"t={key} mean l1 {split}valid", [_fmt(s["mean_l1_valid"]) for s in stats]))
        rows.append((f"t={key} mean l1 {split}invalid", [_fmt(s["mean_l1_invalid"]) for s in stats]))
    label_width = max(len(label) for label, _ in rows)
    headers = [_short(name, 36) for name, _ in named_reports]
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join([" " * label_width] + [h.rjust(w) for h, w in zip(headers, widths)])]
    lines.append("  ".join(["-" * label_width] + ["-" * w for w in widths]))
    for label, cells in rows:
        lines.append("  ".join([label.ljust(label_width)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    if with_reference:
        reference = next(r.reference_name for _, r in named_reports if r.has_reference)
        lines.append(f"(ref-: valid/invalid split fixed by the reference {reference}; means are each model's own l1)")
    return "\n".join(lines)


def format_nonfinite(named_reports: Sequence[tuple[str, FilterReport]]) -> str:
    """For every model holding NaN / inf weights: the total, and each tensor (layer) that holds them."""
    blocks = []
    for name, report in named_reports:
        if not report.total_nonfinite:
            continue
        lines = [f"WARNING {name}: {report.total_nonfinite} of {report.num_weights} weights are not finite (NaN or "
                 f"inf), in {len(report.nonfinite)} tensors; its filter statistics above do not describe a working "
                 "network"]
        width = max(len(tensor) for tensor in report.nonfinite)
        sizes = {layer.name: int(np.prod(layer.shape)) for layer in report.layers}
        for tensor, count in report.nonfinite.items():
            of = f" / {sizes[tensor]}" if tensor in sizes else ""
            lines.append(f"  {tensor.ljust(width)}  {count}{of} non-finite")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ----------------------------------------------------------------------------- entry point
@dataclass
class AnalyzeArguments:
    """The arguments of `hf-graft analyze`."""

    paths: list[str] = field(default_factory=list, metadata={"help": f"models to analyse: {ACCEPTED}",
                                                             "metavar": "PATH"})
    reference: str | None = field(default=None, metadata={
        "help": "model whose filter norms fix the valid/invalid split", "metavar": "PATH"})
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS), metadata={
        "help": "l1 thresholds", "metavar": "T"})
    bins: int = field(default=10, metadata={"help": "histogram bins of the layer entropy"})
    json: str | None = field(default=None, metadata={"help": "write the reports as a JSON list", "metavar": "FILE"})
    plot: str | None = field(default=None, metadata={
        "help": f"write the figures as a PNG (needs matplotlib: {PLOT_EXTRA})", "metavar": "FILE"})
    pretrained: bool = field(default=False, metadata={"help": "load pretrained weights for bare timm model names"})

    def __post_init__(self):
        if self.bins < 1:
            raise ValueError(f"--bins must be >= 1, got {self.bins}")
        if any(not (t > 0 and math.isfinite(t)) for t in self.thresholds):
            raise ValueError(f"--thresholds must be positive numbers, got {self.thresholds}")


def build_parser() -> CommandLineParser:
    return command_parser(
        AnalyzeArguments, prog=PROG, positional="paths",
        description="Invalid filters (l1 < threshold) and layer entropy of timm models (paper Section 4.2-4.3).",
    )


def _one_line_with_type(error: BaseException) -> str:
    return one_line(error, with_type=True)


def _error(message: str, error: BaseException | None = None, debug: bool = False) -> None:
    if debug and error is not None:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, debug = parse_arguments(build_parser(), AnalyzeArguments, argv, positional="paths")
    except ArgumentsError as error:
        _error(str(error))
        return 2
    if args.plot and not _has_matplotlib():
        _error(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}")
        return 2
    thresholds = sorted(set(args.thresholds))

    # resolve every argument before loading anything
    try:
        sources = [resolve_model_source(spec) for spec in args.paths]
        reference_source = resolve_model_source(args.reference) if args.reference else None
    except ModelSourceError as exc:
        _error(f"{exc}; expected {ACCEPTED}", exc, debug)
        return 2

    import torch

    reference_model, reference_name = None, None
    if reference_source is not None:
        if reference_source.kind == "checkpoint" and reference_source.member is None:
            reference_source.member = 0
        try:
            ((reference_name, reference_model),) = load_models(reference_source, pretrained=args.pretrained)
        except (HfGraftError, ValueError, OSError) as exc:
            _error(f"cannot load reference {reference_source.spec!r}: {_one_line_with_type(exc)}", exc, debug)
            return 1

    named_reports: list[tuple[str, FilterReport]] = []
    with torch.no_grad():
        for source in sources:
            try:
                models = load_models(source, pretrained=args.pretrained)
            except (HfGraftError, ValueError, OSError) as exc:
                _error(f"cannot load {source.spec!r}: {_one_line_with_type(exc)}", exc, debug)
                return 1
            for name, model in models:
                try:
                    report = filter_report(
                        model, thresholds, reference=reference_model, bins=args.bins, reference_name=reference_name
                    )
                except ValueError as exc:
                    _error(f"{name}: {exc}", exc, debug)
                    return 1
                named_reports.append((name, report))
                del model

    print(format_table(named_reports, thresholds))
    broken = format_nonfinite(named_reports)
    if broken:
        print(broken)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.to_dict(name) for name, r in named_reports], indent=1))
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_reports(named_reports, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
