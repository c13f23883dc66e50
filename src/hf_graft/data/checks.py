"""What the data must satisfy before training, and how a bad example is named when it is found.

* Labels are checked on every split a run uses, before anything is trained: a label outside the
  classes (e.g. -1, datasets' mark for a missing label, or 7 with 3 class names) or a missing one is
  refused with one line naming the split, the column, the value and the first row holding it.
* Integer labels with gaps (e.g. {0, 1, 2, 7}) are renumbered 0..n-1 in increasing order and each
  class is named by its original value ("0", "1", "2", "7"), so the model has exactly the classes that
  occur and the exported `id2label` maps its outputs back to the dataset's values.
* An image that cannot be decoded stops the run with one line naming the split, the row and, where
  the dataset has one, the file (`CorruptImageError`); nothing is skipped silently.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Sequence

import numpy as np
from hf_graft import _compat
from hf_graft.errors import HfGraftError

__all__ = ["CorruptImageError", "DECODE_ERRORS", "LabelError", "prepare_labels", "undecodable_image"]

logger = logging.getLogger("hf_graft.data")


class LabelError(HfGraftError, ValueError):
    """A label that is not one of the classes; the message is one line naming split, column, value and row."""


# ----------------------------------------------------------------------------- labels
def _labels(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64, null mask) of a label column, in the dataset's row order, without decoding images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = dataset.with_format("arrow")[column]
    if isinstance(array, pa.Table):
        array = array.column(0)
    nulls = np.asarray(pc.is_null(array).to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(pc.fill_null(array, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return values, nulls


def _first_bad(split: str, column: str, values: np.ndarray, nulls: np.ndarray, bad: np.ndarray, allowed: str):
    row = int(np.flatnonzero(bad)[0])
    value = "a missing label (null)" if nulls[row] else f"label {int(values[row])}"
    if not nulls[row] and values[row] == -1:
        value += " (datasets' mark for a missing label)"
    count = int(bad.sum())
    raise LabelError(
        f"DataArguments.label_column: split {split!r}, column {column!r}: {value} at row {row} is not one of "
        f"the classes ({allowed}); {count} row(s) in all; fix or drop them"
    )


def prepare_labels(raw, splits: Sequence[str | None], column: str) -> tuple[Any, list[str] | None]:
    """Check the labels of the `splits` of the DatasetDict `raw` that a run uses; renumber sparse integers.

    Returns `(raw, names)`: `names` is the class names for integer labels that were renumbered (else None,
    and the caller names classes 0..max as before); `raw` holds the renumbered splits.
    """
    from datasets import ClassLabel, Value

    used = [s for s in dict.fromkeys(splits) if s is not None and s in raw]
    integer: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in used:
        feature = raw[split].features.get(column)
        if feature is None:
            continue  # a missing column is reported by the column checks
        if isinstance(feature, ClassLabel):
            values, nulls = _labels(raw[split], column)
            bad = nulls | (values < 0) | (values >= feature.num_classes)
            if bad.any():
                _first_bad(split, column, values, nulls, bad, f"0..{feature.num_classes - 1}, {feature.num_classes} names")
        elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
            values, nulls = _labels(raw[split], column)
            bad = nulls | (values < 0)
            if bad.any():
                _first_bad(split, column, values, nulls, bad, "integers >= 0")
            integer[split] = (values, nulls)
        elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            nulls = np.asarray(raw[split].with_format("arrow")[column].is_null().to_numpy(zero_copy_only=False))
            if nulls.any():
                _first_bad(split, column, np.zeros(len(nulls), np.int64), nulls, nulls, "the label strings")
    if not integer:
        return raw, None
    present = np.unique(np.concatenate([v for v, _ in integer.values()]))
    if present.size == 0 or present[-1] + 1 == present.size:  # 0..max all occur: the classes as they are
        return raw, None
    names = [str(int(v)) for v in present]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    logger.warning(
        "label_column %r: the integer labels {%s} are not 0..%d without gaps; renumbering them as classes 0..%d, "
        "each named by its original value", column, shown, present.size - 1, present.size - 1,
    )
    renumbered = dict(raw)
    for split, (values, _) in integer.items():
        dense = np.searchsorted(present, values)
        dataset = raw[split]
        feature = dataset.features[column]
        renumbered[split] = dataset.remove_columns(column).add_column(column, dense.tolist(), feature=feature)
    return type(raw)(renumbered), names


# ----------------------------------------------------------------------------- images
class CorruptImageError(HfGraftError, RuntimeError):
    """An image that cannot be decoded; `one_line()` is the message naming the split, the row and the file."""

    def one_line(self) -> str:
        # raised in a DataLoader worker, the error comes back with the worker's traceback in its message
        text = str(self)
        marker = f"{type(self).__name__}: "
        lines = [line for line in text.splitlines() if marker in line]
        if lines:
            return lines[-1].split(marker, 1)[1].strip()
        return text.strip().splitlines()[0] if text.strip() else type(self).__name__


def _decode_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, SyntaxError, EOFError, struct.error]
    try:
        from PIL import Image

        errors.append(Image.DecompressionBombError)
    except ImportError:
        pass
    return tuple(errors)


# what PIL raises for a file it cannot read (UnidentifiedImageError and truncated files are OSErrors)
DECODE_ERRORS = _decode_errors()


def _source_row(dataset, index: int) -> int:
    """The row in the split as loaded: subsets, shuffles and held-out parts are index maps into it."""
    indices = _compat.dataset_indices(dataset)
    if indices is None:
        return int(index)
    try:
        return int(indices.column(0)[int(index)].as_py())
    except Exception:  # noqa: BLE001 - fall back to the position in the subset
        return int(index)


def undecodable_image(dataset, index: int, column: str, error: BaseException) -> CorruptImageError:
    """The error for an example whose image cannot be decoded, naming the split, row and file."""
    where = f"row {_source_row(dataset, index)}"
    split = getattr(dataset, "split", None)
    if split is not None:
        where += f" of split {str(split)!r}"
    try:
        from datasets import Image

        stored = dataset.cast_column(column, Image(decode=False))[int(index)][column]
        path = stored.get("path") if isinstance(stored, dict) else None
    except Exception:  # noqa: BLE001 - the file name is a courtesy
        path = None
    if path:
        where += f", file {path}"
    cause = " ".join(str(error).split()) or type(error).__name__
    return CorruptImageError(
        f"cannot decode the image of {where} (column {column!r}): {type(error).__name__}: {cause}; "
        "remove or replace that image"
    )
