"""What the data must satisfy before training, and how a bad example is named when it is found.

* Labels are checked on every split a run uses, before anything is trained: a label outside the
  classes (e.g. -1, datasets' mark for a missing label, or 7 with 3 class names) or a missing one is
  refused with one line naming the split, the column, the value and the first row holding it.
* The training and evaluation splits must share one label space: the same kind of labels (a
  `ClassLabel` with the same names, integers, or strings) and no evaluation label that the training split
  lacks (a class seen only in evaluation cannot be learned, and would be a class of the model all the
  same). Integers without names in one split are read as indices of the other split's `ClassLabel` names
  when they are in its range. Anything else is refused with one line naming both splits and the values.
* Integer labels with gaps (e.g. {0, 1, 2, 7}), where every split used has integer labels, are renumbered
  0..n-1 in increasing order and each class is named by its original value ("0", "1", "2", "7"), so the
  model has exactly the classes that occur and the exported `id2label` maps its outputs back to the
  dataset's values.
* A run needs at least two classes, and at least two of them among its training examples.
* 16-bit grayscale images are scaled to 8 bits (PIL's own conversion would clip them at 255).
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

__all__ = [
    "CorruptImageError", "DECODE_ERRORS", "LabelError", "as_rgb", "check_classes", "prepare_labels",
    "undecodable_image",
]

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


def _shown(values, limit: int = 8) -> str:
    values = list(values)
    text = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:limit])
    return "{" + text + (f", ... ({len(values)} in all)" if len(values) > limit else "") + "}"


def _space(kind: str, feature, values) -> str:
    if kind == "classlabel":
        return f"a ClassLabel of {feature.num_classes} names {_shown(feature.names)} (0..{feature.num_classes - 1})"
    return f"{'integer' if kind == 'int' else 'string'} labels {_shown(values)}"


def _check_one_label_space(column: str, spaces: dict[str, tuple[str, Any, Any]]) -> list[str] | None:
    """Refuse (one line) a training and an evaluation split that disagree on the labels; returns the class
    names when integers without names are read as another split's ClassLabel indices (else None)."""
    if len(spaces) < 2:
        return None
    (train, (kind_a, feature_a, values_a)), (other, (kind_b, feature_b, values_b)) = list(spaces.items())[:2]

    def refuse(why: str):
        raise LabelError(
            f"DataArguments.label_column: splits {train!r} and {other!r} disagree on the labels of column {column!r} "
            f"({why}): {train!r} has {_space(kind_a, feature_a, values_a)}, {other!r} has "
            f"{_space(kind_b, feature_b, values_b)}; give both splits the same label space"
        )

    if kind_a == kind_b == "classlabel":
        if list(feature_a.names) != list(feature_b.names):
            refuse("different class names")
        return None
    if {kind_a, kind_b} == {"classlabel", "int"}:
        named, (_, _, numbers) = (feature_a, spaces[other]) if kind_a == "classlabel" else (feature_b, spaces[train])
        if numbers and max(numbers) >= named.num_classes:
            refuse("integers outside the ClassLabel's range")
        logger.warning("label_column %r: the integer labels of one split are read as indices of the other split's "
                       "class names %s", column, _shown(named.names))
        return list(named.names)
    if kind_a != kind_b:
        refuse("different kinds of labels")
    missing = sorted(set(values_b) - set(values_a))
    if missing:
        raise LabelError(
            f"DataArguments.label_column: split {other!r} has label(s) {_shown(missing)} that split {train!r} lacks "
            f"({train!r} has {_shown(values_a)}); a class seen only in evaluation cannot be learned and would count "
            "as an error for every such row: drop those rows, or add them to the training split"
        )
    return None


def prepare_labels(raw, splits: Sequence[str | None], column: str) -> tuple[Any, list[str] | None]:
    """Check the labels of the `splits` of the DatasetDict `raw` that a run uses (the training split first);
    renumber sparse integers.

    Returns `(raw, names)`: `names` is the class names for integer labels that were renumbered, or that are
    indices of the other split's ClassLabel (else None, and the caller names classes 0..max as before);
    `raw` holds the renumbered splits.
    """
    from datasets import ClassLabel, Value

    used = [s for s in dict.fromkeys(splits) if s is not None and s in raw]
    integer: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    spaces: dict[str, tuple[str, Any, Any]] = {}  # split -> (kind, feature, the distinct values)
    for split in used:
        feature = raw[split].features.get(column)
        if feature is None:
            continue  # a missing column is reported by the column checks
        if isinstance(feature, ClassLabel):
            values, nulls = _labels(raw[split], column)
            bad = nulls | (values < 0) | (values >= feature.num_classes)
            if bad.any():
                _first_bad(split, column, values, nulls, bad, f"0..{feature.num_classes - 1}, {feature.num_classes} names")
            spaces[split] = ("classlabel", feature, [int(v) for v in np.unique(values)])
        elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
            values, nulls = _labels(raw[split], column)
            bad = nulls | (values < 0)
            if bad.any():
                _first_bad(split, column, values, nulls, bad, "integers >= 0")
            integer[split] = (values, nulls)
            spaces[split] = ("int", feature, [int(v) for v in np.unique(values)])
        elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            nulls = np.asarray(raw[split].with_format("arrow")[column].is_null().to_numpy(zero_copy_only=False))
            if nulls.any():
                _first_bad(split, column, np.zeros(len(nulls), np.int64), nulls, nulls, "the label strings")
            spaces[split] = ("string", feature, sorted(raw[split].unique(column)))
    named = _check_one_label_space(column, spaces)
    if named is not None:
        return raw, named
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


def check_classes(data) -> None:
    """A run's data (`loading.ImageData`) has at least two classes, and its training examples at least two of
    them: with one, the loss is 0 and top-1 100 whatever the network learns."""
    names = [str(n) for n in data.label_names]
    if len(names) < 2:
        raise LabelError(f"DataArguments.label_column: the data has a single class ({_shown(names)}); a classifier "
                         "needs at least 2 (with one, its loss is 0 and its top-1 100 whatever it learns)")
    present = np.unique(np.asarray(data.train.with_format("numpy")[data.label_column]))
    if present.size < 2:
        which = [names[int(v)] for v in present if 0 <= int(v) < len(names)]
        raise LabelError(
            f"DataArguments.label_column: the training examples ({len(data.train)}) hold a single class "
            f"{_shown(which)} of {len(names)}; train on examples of at least 2 classes (max_train_samples, train_split)"
        )


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

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def as_rgb(image):
    """A decoded PIL image as 8-bit RGB. 16-bit grayscale is scaled (65535 -> 255): PIL's `convert("RGB")`
    clips it at 255, which turns most such images white. 32-bit integer or float pixels outside 0..255 have
    no known 8-bit scale and raise ValueError (named with the file by `undecodable_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        from PIL import Image

        pixels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        pixels = np.asarray(image)
        low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
        if low < 0 or high > 255:
            kind = "32-bit integer" if image.mode == "I" else "floating-point"
            raise ValueError(f"{kind} pixels (PIL mode {image.mode}) in {low:g}..{high:g}, which have no known 8-bit "
                             "scale; save the image with 8 or 16 bits per channel")
    return image.convert("RGB")


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
