"""Person re-identification data: train, query and gallery splits as `datasets.Dataset`s.

Two sources, one result (`ReidData`):

* the standard folder layouts `market1501` (Market-1501) and `dukemtmc_reid` (DukeMTMC-reID): a
  `data_dir` holding `bounding_box_train/` (train), `query/` and `bounding_box_test/` (the gallery);
  identity and camera come from each image's file name (`0002_c1s1_000451_03.jpg`: identity 2,
  camera 1; `0005_c2_f0046985.jpg`: identity 5, camera 2). Other files in those folders (e.g.
  `Thumbs.db`) are not images and are passed over;
* any `datasets` dataset (Hub id, local folder, or a `save_to_disk` folder) with train, query and
  gallery splits and an image, an identity and a camera column, detected by type and name when that
  is unambiguous, named with `image_column` / `identity_column` / `camera_column` otherwise.

Every split comes out with the columns `image` (a `datasets.Image`), `identity` and `camera`
(integers); the training split also has `label`: its identities renumbered 0..N-1 in increasing
order, a `ClassLabel` named by the identities (`ReidData.identity_map` keeps the mapping). Junk
images (identity -1) are dropped from every split; distractors (Market's identity 0) stay where they
are, in the gallery, as images no query matches. No image is decoded here: `data.MemberOrderDataset`
serves any split (e.g. `MemberOrderDataset(data.train, transform, "image", "label")`) and names an
image that cannot be decoded, with its file, when it meets it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_graft.data.sampling import MemberOrderDataset

__all__ = [
    "EVAL_SPLIT_NAME",
    "JUNK_IDENTITY",
    "REID_LAYOUTS",
    "ReidData",
    "ReidEvalDataset",
    "identities_and_cameras",
    "load_reid_data",
    "load_reid_dataset",
    "load_reid_folder",
    "load_reid_run_data",
]

EVAL_SPLIT_NAME = "query and gallery"  # what a re-identification run is evaluated on (results, model card)
JUNK_IDENTITY = -1  # Market's mark for a detection too poor to be anyone: dropped from every split
SPLITS = ("train", "query", "gallery")
# the layouts' sub-folders, by split
LAYOUT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class _Layout:
    pattern: re.Pattern  # the file name without its extension; groups: identity, camera
    example: str


REID_LAYOUTS = {
    "market1501": _Layout(re.compile(r"(-?\d+)_c(\d+)s\d+_\d+_\d+"), "0002_c1s1_000451_03.jpg"),
    "dukemtmc_reid": _Layout(re.compile(r"(-?\d+)_c(\d+)_f\d+"), "0005_c2_f0046985.jpg"),
}

_IMAGE_COLUMN_GUESSES = ("image", "img", "image_path", "path", "file", "filename")
_IDENTITY_COLUMN_GUESSES = ("identity", "person_id", "pid", "id", "label", "labels")
_CAMERA_COLUMN_GUESSES = ("camera", "camera_id", "camid", "cam_id", "cam")


@dataclass
class ReidData:
    """The three splits of a re-identification dataset (`datasets.Dataset`s, images not decoded).

    `identity_map`: identity (as in the `identity` column) -> training label, for the training
    identities. Query and gallery identities need not be among them (Market's are disjoint from its
    training identities): evaluation compares identities, never labels.
    """

    train: Any
    query: Any
    gallery: Any
    identity_map: dict[int, int]
    source: str = ""
    image_column: str = field(default="image", init=False)
    label_column: str = field(default="label", init=False)

    @property
    def num_identities(self) -> int:
        """Training identities: the classes of a classifier trained on `train`."""
        return len(self.identity_map)

    @property
    def label_names(self) -> list[str]:
        """The training identities as strings, in label order (the classifier head's class names)."""
        return list(self.train.features[self.label_column].names)


def identities_and_cameras(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The `identity` and `camera` columns of a split as int64 tensors, read without decoding an image
    (what `reid_metrics` takes beside the features)."""
    return torch.tensor(_integers(dataset, "identity")), torch.tensor(_integers(dataset, "camera"))


def load_reid_data(dataset_name: str, data_dir: str | os.PathLike | None = None, *, dataset_config_name: str | None = None,
                   image_column: str | None = None, identity_column: str | None = None,
                   camera_column: str | None = None, train_split: str = "train", query_split: str = "query",
                   gallery_split: str = "gallery") -> ReidData:
    """A layout name (`market1501`, `dukemtmc_reid`) with its `data_dir`, or any `datasets` dataset
    (`load_reid_dataset`'s arguments)."""
    if dataset_name in REID_LAYOUTS:
        if data_dir is None:
            raise ValueError(f"data_dir: the {dataset_name} layout needs the folder that holds "
                             f"{', '.join(f'{f}/' for f in LAYOUT_FOLDERS.values())}")
        return load_reid_folder(dataset_name, data_dir)
    return load_reid_dataset(dataset_name, data_dir, dataset_config_name=dataset_config_name,
                             image_column=image_column, identity_column=identity_column,
                             camera_column=camera_column, train_split=train_split, query_split=query_split,
                             gallery_split=gallery_split)


# ----------------------------------------------------------------------------- folder layouts
def load_reid_folder(layout: str, data_dir: str | os.PathLike) -> ReidData:
    """Market-1501 / DukeMTMC-reID as unpacked: identities and cameras from the file names.

    Every sub-folder is checked and every file name parsed before a dataset is built; a missing
    sub-folder or a name that does not parse is a one-line error naming it.
    """
    if layout not in REID_LAYOUTS:
        raise ValueError(f"dataset_name: {layout!r} is not one of the layouts {sorted(REID_LAYOUTS)}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: {str(root)!r} is not a folder")
    missing = [f"{folder}/" for folder in LAYOUT_FOLDERS.values() if not (root / folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"data_dir: {str(root)!r} has no {', '.join(missing)} (a {layout} folder holds "
                                f"{', '.join(f'{f}/' for f in LAYOUT_FOLDERS.values())})")
    rows = {split: _parse_folder(root / folder, REID_LAYOUTS[layout], layout) for split, folder in LAYOUT_FOLDERS.items()}
    splits = {split: _folder_dataset(split, *columns) for split, columns in rows.items()}
    train, identity_map = _with_labels(splits["train"])
    return ReidData(train, splits["query"], splits["gallery"], identity_map, source=f"{layout} at {root}")


def _parse_folder(folder: Path, layout: _Layout, name: str) -> tuple[list[str], list[int], list[int]]:
    paths, identities, cameras = [], [], []
    with os.scandir(folder) as entries:
        files = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    for file in files:
        match = layout.pattern.fullmatch(os.path.splitext(file)[0])
        if match is None:
            raise ValueError(f"data_dir: {str(folder / file)!r} is not named as {name} images are "
                             f"(identity_camera..., e.g. {layout.example})")
        identity = int(match.group(1))
        if identity == JUNK_IDENTITY:
            continue
        if identity < 0:
            raise ValueError(f"data_dir: {str(folder / file)!r} names identity {identity}; allowed: >= 0, "
                             f"or {JUNK_IDENTITY} for junk")
        paths.append(str(folder / file))
        identities.append(identity)
        cameras.append(int(match.group(2)))
    if not paths:
        raise ValueError(f"data_dir: {str(folder)!r} holds no {name} images (other than junk)")
    return paths, identities, cameras


def _folder_dataset(split: str, paths: list[str], identities: list[int], cameras: list[int]):
    from datasets import Dataset, Features, Image, NamedSplit, Value

    features = Features({"image": Image(), "identity": Value("int64"), "camera": Value("int64")})
    return Dataset.from_dict({"image": paths, "identity": identities, "camera": cameras}, features=features,
                             split=NamedSplit(split))


def _with_labels(train) -> tuple[Any, dict[int, int]]:
    """The training split with `label`: its identities renumbered 0..N-1 in increasing order."""
    from datasets import ClassLabel

    identities = _integers(train, "identity")
    present = np.unique(identities)
    feature = train.features["identity"]
    names = [feature.int2str(int(v)) if isinstance(feature, ClassLabel) else str(int(v)) for v in present]
    labels = np.searchsorted(present, identities)
    train = train.add_column("label", labels.tolist(), feature=ClassLabel(names=names))
    return train, {int(v): k for k, v in enumerate(present)}


def _integers(dataset, column: str) -> np.ndarray:
    """An integer column as int64, in row order (an index mapping of `select` honoured), no image decoded."""
    import pyarrow as pa

    array = dataset.with_format("arrow")[column]
    if isinstance(array, pa.Table):
        array = array.column(0)
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)


# ----------------------------------------------------------------------------- any datasets dataset
def load_reid_dataset(name: str, data_dir: str | os.PathLike | None = None, *, dataset_config_name: str | None = None,
                      image_column: str | None = None, identity_column: str | None = None,
                      camera_column: str | None = None, train_split: str = "train", query_split: str = "query",
                      gallery_split: str = "gallery") -> ReidData:
    """A `datasets` dataset with train, query and gallery splits (Hub id, local folder, `save_to_disk` folder).

    Columns are found on the training split and must exist in all three: the image column by type
    (`datasets.Image`; file paths are cast to images) or name, the identity and camera columns by name
    (`identity`, `pid`, `person_id`, ...; `camera`, `camid`, ...); integer, `ClassLabel` or string
    values (strings are numbered in sorted order over the three splits).
    """
    raw = _load_raw(name, data_dir, dataset_config_name)
    split_names = {"train": train_split, "query": query_split, "gallery": gallery_split}
    for role, split in split_names.items():
        if split not in raw:
            raise ValueError(f"{role}_split: {split!r} is not one of the dataset's splits {list(raw)}")
    features = raw[train_split].features
    columns = {
        "image": _pick_image_column(features, image_column),
        "identity": _pick_column(features, identity_column, _IDENTITY_COLUMN_GUESSES, "identity", "identities"),
        "camera": _pick_column(features, camera_column, _CAMERA_COLUMN_GUESSES, "camera", "cameras"),
    }
    chosen = list(columns.values())
    if len(set(chosen)) < 3:
        raise ValueError(f"camera_column: image, identity and camera columns must differ, got {columns}")
    splits = {}
    for role, split in split_names.items():
        dataset = raw[split]
        for kind, column in columns.items():
            if column not in dataset.features:
                raise ValueError(f"{role}_split: split {split!r} has no {kind} column {column!r}; columns: "
                                 f"{list(dataset.features)}")
        dataset = dataset.select_columns(chosen)
        splits[role] = dataset.rename_columns({c: k for k, c in columns.items() if c != k})
    splits = _as_integers(splits, "identity", columns["identity"], split_names)
    splits = _as_integers(splits, "camera", columns["camera"], split_names)
    splits = _as_images(splits, columns["image"])
    for role in SPLITS:  # junk out, in every split
        identities = _integers(splits[role], "identity")
        if (identities < JUNK_IDENTITY).any():
            row = int(np.flatnonzero(identities < JUNK_IDENTITY)[0])
            raise ValueError(f"identity_column: split {split_names[role]!r}, column {columns['identity']!r}: identity "
                             f"{int(identities[row])} at row {row}; allowed: >= 0, or {JUNK_IDENTITY} for junk")
        if (identities == JUNK_IDENTITY).any():
            splits[role] = splits[role].select(np.flatnonzero(identities != JUNK_IDENTITY))
        if len(splits[role]) == 0:
            raise ValueError(f"{role}_split: split {split_names[role]!r} holds no images (other than junk)")
    train, identity_map = _with_labels(splits["train"])
    return ReidData(train, splits["query"], splits["gallery"], identity_map, source=str(name))


def _load_raw(name: str, data_dir, config_name: str | None):
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and (path / "state.json").is_file():
        raise ValueError(f"dataset_name: {name!r} is a single saved split; re-identification needs train, query "
                         "and gallery splits (save a DatasetDict)")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise FileNotFoundError(f"dataset_name: {name!r} is not a folder")
    try:  # a local folder of parquet/arrow/... files, or a Hub id
        loaded = datasets.load_dataset(str(path) if path.is_dir() else name, config_name,
                                       data_dir=None if data_dir is None else str(data_dir))
    except Exception as err:  # offline, unknown id, empty folder, ...: which dataset and why, in one line
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"dataset_name: could not load {name!r}: {cause}") from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"dataset_name: {name!r} loads as a single split; re-identification needs train, query "
                         "and gallery splits")
    return loaded


def _pick_image_column(features, wanted: str | None) -> str:
    from datasets import Image

    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise ValueError(f"image_column: {wanted!r} is not a column; columns: {columns}")
        return wanted
    typed = [c for c in columns if isinstance(features[c], Image)]
    if typed:  # several image columns: a conventional name decides, else the user
        candidates = [c for c in _IMAGE_COLUMN_GUESSES if c in typed][:1] or typed
    else:  # file paths under a conventional name
        candidates = [c for c in _IMAGE_COLUMN_GUESSES if c in features and _is_string(features[c])]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"image_column: no column looks like the images (columns: {columns}); set image_column")
    raise ValueError(f"image_column: cannot tell which column holds the images (candidates: {candidates}); "
                     "set image_column")


def _pick_column(features, wanted: str | None, guesses: tuple[str, ...], kind: str, plural: str) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise ValueError(f"{kind}_column: {wanted!r} is not a column; columns: {columns}")
        return wanted
    candidates = [c for c in guesses if c in features]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"{kind}_column: no column looks like the {plural} (columns: {columns}); set {kind}_column")
    raise ValueError(f"{kind}_column: cannot tell which column holds the {plural} (candidates: {candidates}); "
                     f"set {kind}_column")


def _is_string(feature) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _as_integers(splits: dict, column: str, source_column: str, split_names: dict) -> dict:
    """Integer values in `column` of every split: integers and ClassLabels as they are, strings numbered in
    sorted order over all splits; a missing value or any other type is an error naming the column."""
    import pyarrow.compute as pc
    from datasets import ClassLabel, Value

    kind = "identity" if column == "identity" else "camera"
    for role, dataset in splits.items():
        feature = dataset.features[column]
        if not (isinstance(feature, ClassLabel) or _is_string(feature)
                or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))):
            raise ValueError(f"{kind}_column: {source_column!r} holds {feature} in split {split_names[role]!r}; "
                             "allowed: integer, ClassLabel or string values")
        nulls = np.asarray(pc.is_null(dataset.with_format("arrow")[column]).to_numpy(zero_copy_only=False), dtype=bool)
        if nulls.any():
            raise ValueError(f"{kind}_column: split {split_names[role]!r}, column {source_column!r}: a missing value "
                             f"at row {int(np.flatnonzero(nulls)[0])}; {int(nulls.sum())} row(s) in all")
    kinds = {type(d.features[column]) for d in splits.values()}
    strings = [_is_string(d.features[column]) for d in splits.values()]
    if any(strings):
        if not all(strings):
            raise ValueError(f"{kind}_column: {source_column!r} holds strings in some splits and not in others")
        names = sorted(set().union(*(d.unique(column) for d in splits.values())))
        return {role: d.cast_column(column, ClassLabel(names=names)) for role, d in splits.items()}
    if kinds == {ClassLabel}:
        names = {tuple(d.features[column].names) for d in splits.values()}
        if len(names) > 1:
            raise ValueError(f"{kind}_column: the splits' ClassLabels of {source_column!r} name different values")
    return splits


def _as_images(splits: dict, source_column: str) -> dict:
    from datasets import Image

    result = {}
    for role, dataset in splits.items():
        feature = dataset.features["image"]
        if _is_string(feature):  # file paths: decoded as images, on the fly like any Image column
            dataset = dataset.cast_column("image", Image())
        elif not isinstance(feature, Image):
            raise ValueError(f"image_column: {source_column!r} holds {feature}; allowed: a datasets.Image column or "
                             "image file paths")
        result[role] = dataset
    return result


# ----------------------------------------------------------------------------- a run's data
# the loaders' messages start with the argument they are about; a run names the DataArguments field
_ARGUMENT_FIELDS = ("dataset_name", "data_dir", "train_split", "query_split", "gallery_split", "image_column",
                    "identity_column", "camera_column")


def load_reid_run_data(args, seed: int = 42) -> ReidData:
    """The data of a re-identification run from its `DataArguments` (task reid): `load_reid_data`, its
    one-line errors naming the `DataArguments.<field>`, and `max_train_samples` drawn from the training
    split with `seed` (the labels stay those of the whole split, so the classifier keeps every identity)."""
    try:
        data = load_reid_data(args.dataset_name, args.data_dir, dataset_config_name=args.dataset_config_name,
                              image_column=args.image_column, identity_column=args.identity_column,
                              camera_column=args.camera_column, train_split=args.train_split,
                              query_split=args.query_split, gallery_split=args.gallery_split)
    except (ValueError, OSError, RuntimeError) as error:
        message = str(error)
        if message.split(":", 1)[0] in _ARGUMENT_FIELDS:
            raise type(error)(f"DataArguments.{message}") from error
        raise
    if args.max_train_samples is not None and args.max_train_samples < len(data.train):
        data.train = data.train.shuffle(seed=seed).select(range(args.max_train_samples))
    return data


class ReidEvalDataset(MemberOrderDataset):
    """The query split then the gallery split, as one evaluation set for the Trainer's own loop (its
    batching, gathering across processes and logging): item i is `pixel_values` and `labels` =
    [identity, camera, is_query] (int64), from which `metrics.ReidMetrics` splits query and gallery again."""

    def __init__(self, query, gallery, transform):
        from datasets import concatenate_datasets

        columns = ["image", "identity", "camera"]
        both = concatenate_datasets([query.select_columns(columns), gallery.select_columns(columns)])
        super().__init__(both, transform, "image", "identity")
        identities, cameras = identities_and_cameras(both)
        is_query = torch.zeros(len(both), dtype=torch.int64)
        is_query[: len(query)] = 1
        self.reid_labels = torch.stack([identities, cameras, is_query], dim=1)
        self.num_query, self.num_gallery = len(query), len(gallery)
        self.split_name = EVAL_SPLIT_NAME

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index) % len(self.dataset)
        pixels, _ = self._example(i)
        return {"pixel_values": pixels, "labels": self.reid_labels[i]}
