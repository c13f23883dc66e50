"""Re-identification data: the Market-1501 and DukeMTMC-reID folder layouts (written here as tiny images),
any `datasets` DatasetDict saved to disk, the columns that come out, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from hf_graft import reid_metrics
from hf_graft.data.reid import ReidData, identities_and_cameras, load_reid_data

# one colour per identity: an image's mean colour is a feature that matches exactly its identity's images
COLOURS = {0: (200, 200, 200), 2: (255, 0, 0), 5: (0, 255, 0), 7: (0, 0, 255), 10: (255, 255, 0), -1: (0, 0, 0)}

MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.png", "0007_c3s1_000151_01.jpg",
                           "0010_c1s2_000026_02.png", "-1_c1s1_000401_03.jpg"],
    "query": ["0005_c1s1_001051_00.png", "0007_c2s1_000976_00.jpg"],
    "bounding_box_test": ["0005_c2s1_001101_01.jpg", "0005_c1s1_001101_04.jpg", "0007_c4s2_000551_02.png",
                          "0000_c1s1_000001_01.jpg", "0000_c6s1_000101_03.png", "-1_c1s1_000076_01.jpg"],
}
DUKE = {
    "bounding_box_train": ["0005_c2_f0046985.jpg", "0001_c1_f0000001.jpg", "0005_c5_f0100022.png"],
    "query": ["0010_c1_f0057703.jpg"],
    "bounding_box_test": ["0010_c3_f0061234.png", "0010_c1_f0057999.jpg", "0002_c8_f0000111.jpg"],
}


def _image(identity: int, size=(6, 12)) -> PILImage.Image:
    return PILImage.new("RGB", size, COLOURS.get(identity, (10, 20, 30)))


def _write(root: Path, layout: dict[str, list[str]], extra: dict[str, str] | None = None) -> Path:
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            _image(int(name.split("_")[0])).save(root / folder / name)
    for relative, text in (extra or {}).items():
        (root / relative).write_text(text)
    return root


def _rows(dataset) -> list[tuple[str, int, int]]:
    from datasets import Image

    paths = dataset.cast_column("image", Image(decode=False))["image"]
    return [(Path(p["path"]).name, i, c) for p, i, c in zip(paths, dataset["identity"], dataset["camera"])]


# ----------------------------------------------------------------------------- folder layouts
def test_market_layout_identities_cameras_junk_distractors_and_labels(tmp_path):
    root = _write(tmp_path / "Market-1501", MARKET, {"bounding_box_test/Thumbs.db": "not an image"})
    data = load_reid_data("market1501", root)
    assert isinstance(data, ReidData) and data.source == f"market1501 at {root}"
    # junk (-1) dropped from train and gallery; files in name order; identity and camera from the name
    assert _rows(data.train) == [
        ("0002_c1s1_000451_03.jpg", 2, 1), ("0002_c2s1_000301_01.png", 2, 2), ("0007_c3s1_000151_01.jpg", 7, 3),
        ("0010_c1s2_000026_02.png", 10, 1)]
    assert _rows(data.query) == [("0005_c1s1_001051_00.png", 5, 1), ("0007_c2s1_000976_00.jpg", 7, 2)]
    # the distractors (identity 0) stay in the gallery; Thumbs.db is not an image and is passed over
    assert _rows(data.gallery) == [("0000_c1s1_000001_01.jpg", 0, 1), ("0000_c6s1_000101_03.png", 0, 6),
                                   ("0005_c1s1_001101_04.jpg", 5, 1), ("0005_c2s1_001101_01.jpg", 5, 2),
                                   ("0007_c4s2_000551_02.png", 7, 4)]
    # training identities renumbered 0..N-1 in increasing order, named by the identity
    assert data.identity_map == {2: 0, 7: 1, 10: 2} and data.num_identities == 3
    assert data.train["label"] == [0, 0, 1, 2]
    assert data.train.features["label"].names == ["2", "7", "10"]
    assert data.query.column_names == data.gallery.column_names == ["image", "identity", "camera"]
    assert str(data.query.split) == "query"
    # images decode from their files (the PNG exactly)
    image = data.train[1]["image"]
    assert image.size == (6, 12) and np.asarray(image)[0, 0].tolist() == list(COLOURS[2])
    ids, cams = identities_and_cameras(data.gallery)
    assert ids.tolist() == [0, 0, 5, 5, 7] and cams.tolist() == [1, 6, 1, 2, 4] and ids.dtype == torch.int64


def test_duke_layout(tmp_path):
    data = load_reid_data("dukemtmc_reid", _write(tmp_path / "duke", DUKE))
    assert _rows(data.train) == [("0001_c1_f0000001.jpg", 1, 1), ("0005_c2_f0046985.jpg", 5, 2),
                                 ("0005_c5_f0100022.png", 5, 5)]
    assert data.identity_map == {1: 0, 5: 1} and data.train["label"] == [0, 1, 1]
    assert _rows(data.query) == [("0010_c1_f0057703.jpg", 10, 1)]
    assert [r[1:] for r in _rows(data.gallery)] == [(2, 8), (10, 1), (10, 3)]


def test_loaded_splits_feed_the_metric_and_the_training_dataset(tmp_path):
    """Query and gallery through `reid_metrics` with each image's mean colour as its feature: every identity
    has its own colour, so the relevant items come first (mAP 100); the one same-camera gallery image of
    query 0 (identity 5, camera 1) is left out, not counted."""
    from torchvision.transforms import PILToTensor

    from hf_graft.data.sampling import MemberOrderDataset

    data = load_reid_data("market1501", _write(tmp_path / "m", MARKET))

    def features(split):
        return torch.stack([torch.from_numpy(np.asarray(row["image"], dtype=np.float32).mean((0, 1))) for row in split])

    (q_ids, q_cams), (g_ids, g_cams) = identities_and_cameras(data.query), identities_and_cameras(data.gallery)
    result = reid_metrics(features(data.query), features(data.gallery), q_ids, g_ids, q_cams, g_cams)
    assert result == {"mAP": 100.0, "rank1": 100.0, "rank5": 100.0, "rank10": 100.0,
                      "valid_queries": 2, "skipped_queries": 0}
    train = MemberOrderDataset(data.train, PILToTensor(), data.image_column, data.label_column)
    item = train[3]
    assert item["labels"].item() == 2 and item["pixel_values"].shape == (3, 12, 6)
    assert item["pixel_values"][:, 0, 0].tolist() == list(COLOURS[10])


def test_a_file_name_that_does_not_parse_is_named(tmp_path):
    root = _write(tmp_path / "m", MARKET)
    _image(5).save(root / "query" / "0005_c1_f0000001.jpg")  # a Duke name in a Market folder
    with pytest.raises(ValueError, match=r"^data_dir: '.*/query/0005_c1_f0000001\.jpg' is not named as market1501 "
                                         r"images are \(identity_camera\.\.\., e\.g\. 0002_c1s1_000451_03\.jpg\)$"):
        load_reid_data("market1501", root)


def test_missing_sub_folders_are_named(tmp_path):
    root = tmp_path / "m"
    (root / "bounding_box_train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"^data_dir: '.*' has no query/, bounding_box_test/ \(a market1501 "
                                                r"folder holds bounding_box_train/, query/, bounding_box_test/\)$"):
        load_reid_data("market1501", root)
    with pytest.raises(FileNotFoundError, match=r"^data_dir: '.*/nowhere' is not a folder$"):
        load_reid_data("dukemtmc_reid", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^data_dir: the market1501 layout needs the folder"):
        load_reid_data("market1501")


def test_a_folder_with_only_junk_is_an_error(tmp_path):
    layout = dict(MARKET, query=["-1_c1s1_000001_00.jpg"])
    with pytest.raises(ValueError, match=r"^data_dir: '.*/query' holds no market1501 images \(other than junk\)$"):
        load_reid_data("market1501", _write(tmp_path / "m", layout))


# ----------------------------------------------------------------------------- any datasets dataset
def _saved_dataset(path: Path, *, identity="pid", camera="camid", extra=None, string_ids=False) -> Path:
    from datasets import Dataset, DatasetDict, Features, Image, Value

    def split(rows):
        columns = {"img": [_image(i, size=(4, 8)) for i, _ in rows],
                   identity: [f"p{i}" if string_ids else i for i, _ in rows],
                   camera: [c for _, c in rows], "frame": list(range(len(rows)))}
        for name in extra or ():
            columns[name] = [7] * len(rows)
        features = {"img": Image(), identity: Value("string" if string_ids else "int64"), camera: Value("int32"),
                    "frame": Value("int64"), **{name: Value("int64") for name in extra or ()}}
        return Dataset.from_dict(columns, features=Features(features))

    DatasetDict({
        "train": split([(2, 1), (7, 2), (2, 3), (-1, 1)]),
        "query": split([(7, 1), (5, 2)]),
        "gallery": split([(7, 2), (0, 1), (5, 1), (-1, 2), (5, 2)]),
    }).save_to_disk(str(path))
    return path


def test_saved_dataset_columns_detected_renamed_junk_dropped(tmp_path):
    data = load_reid_data(str(_saved_dataset(tmp_path / "saved")))
    assert data.train.column_names == ["image", "identity", "camera", "label"]
    assert data.query.column_names == data.gallery.column_names == ["image", "identity", "camera"]
    assert data.train["identity"] == [2, 7, 2] and data.train["camera"] == [1, 2, 3]
    assert data.train["label"] == [0, 1, 0] and data.identity_map == {2: 0, 7: 1}
    assert [t.tolist() for t in identities_and_cameras(data.gallery)] == [[7, 0, 5, 5], [2, 1, 1, 2]]
    assert data.gallery[3]["image"].size == (4, 8)


def test_string_identities_are_numbered_alike_in_every_split(tmp_path):
    data = load_reid_data(str(_saved_dataset(tmp_path / "saved", string_ids=True)))
    # the identities p-1, p0, p2, p5, p7 are numbered in sorted order over the three splits: 0..4
    # (a string identity is never junk: p-1 is an identity like any other)
    assert data.train["identity"] == [2, 4, 2, 0] and data.query["identity"] == [4, 3]
    assert data.gallery["identity"] == [4, 1, 3, 0, 3]
    assert data.train.features["label"].names == ["p-1", "p2", "p7"] and data.identity_map == {0: 0, 2: 1, 4: 2}


def test_ambiguous_identity_columns_name_the_candidates(tmp_path):
    path = _saved_dataset(tmp_path / "saved", extra=["person_id"])
    with pytest.raises(ValueError, match=r"^identity_column: cannot tell which column holds the identities "
                                         r"\(candidates: \['person_id', 'pid'\]\); set identity_column$"):
        load_reid_data(str(path))
    data = load_reid_data(str(path), identity_column="pid")  # named explicitly: no ambiguity
    assert data.query["identity"] == [7, 5]


def test_a_negative_identity_other_than_junk_is_named(tmp_path):
    from datasets import load_from_disk

    path = _saved_dataset(tmp_path / "saved")
    saved = load_from_disk(str(path))
    saved["query"] = saved["query"].map(lambda row: {"pid": -3 if row["pid"] == 5 else row["pid"]})
    saved.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"^identity_column: split 'query', column 'pid': identity -3 at row 1; "
                                         r"allowed: >= 0, or -1 for junk$"):
        load_reid_data(str(tmp_path / "bad"))


def test_missing_columns_and_splits_are_named(tmp_path):
    path = _saved_dataset(tmp_path / "saved", camera="view")
    with pytest.raises(ValueError, match=r"^camera_column: no column looks like the cameras \(columns: \['img', 'pid', "
                                         r"'view', 'frame'\]\); set camera_column$"):
        load_reid_data(str(path))
    assert load_reid_data(str(path), camera_column="view").query["camera"] == [1, 2]
    with pytest.raises(ValueError, match=r"^camera_column: 'cam' is not a column"):
        load_reid_data(str(path), camera_column="cam")
    with pytest.raises(ValueError, match=r"^gallery_split: 'test' is not one of the dataset's splits "
                                         r"\['train', 'query', 'gallery'\]$"):
        load_reid_data(str(path), camera_column="view", gallery_split="test")
    with pytest.raises(FileNotFoundError, match=r"^dataset_name: '/.*/absent' is not a folder$"):
        load_reid_data(str(tmp_path / "absent"))
