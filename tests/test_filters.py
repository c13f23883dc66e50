"""Filter statistics (docs/method.md §10): invalid filters, reference-fixed splits, entropy, the analyse CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import hf_graft  # noqa: F401  (registers the cifar_* architectures)
from hf_graft.cli.analyze import main as analyze_main
from hf_graft.cli.plots import plot_reports
from hf_graft.graft.filters import filter_report

THRESHOLDS = (1e-3, 1e-2, 0.1, 1.0)
KEYS = ("0.001", "0.01", "0.1", "1.0")

# hand-set filter l1 norms per layer
DENSE_L1 = [0.0, 0.05, 0.5, 2.0]
GROUPED_L1 = [0.0, 3.0, 0.005, 4.0]
DEPTHWISE_L1 = [0.05, 0.0, 1.5, 0.0005]


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(3, 4, 3, bias=False)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)  # weight [4, 2, 3, 3]
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)  # weight [4, 1, 3, 3]
        self.pointwise = nn.Conv2d(4, 4, 1)  # dense 1x1
        self.head = nn.Linear(4, 2)  # not a conv: ignored

    def forward(self, x):
        x = self.pointwise(self.depthwise(self.grouped(self.dense(x))))
        return self.head(x.mean((2, 3)))


def _set_filter_norms(conv: nn.Conv2d, norms, generator) -> None:
    with torch.no_grad():
        for j, target in enumerate(norms):
            w = torch.randn(conv.weight[j].shape, generator=generator)
            conv.weight[j] = w / w.abs().sum() * target


def make_net(scale: float = 1.0, seed: int = 0, pointwise=None) -> TinyConvNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyConvNet()
    _set_filter_norms(net.dense, [v * scale for v in DENSE_L1], g)
    _set_filter_norms(net.grouped, [v * scale for v in GROUPED_L1], g)
    _set_filter_norms(net.depthwise, [v * scale for v in DEPTHWISE_L1], g)
    _set_filter_norms(net.pointwise, pointwise or [10.0, 20.0, 30.0, 40.0], g)
    return net


def _assert_split_stats(stats: dict, want: dict) -> None:
    """`invalid_stats(t)` against `_expected(...)`: count, ratio and the two mean l1 norms."""
    assert stats["count"] == want["count"]
    assert stats["ratio"] == pytest.approx(want["ratio"])
    assert _approx(stats["mean_l1_valid"], want["valid"])
    assert _approx(stats["mean_l1_invalid"], want["invalid"])


def _expected(l1_values, reference_values, t):
    l1 = np.asarray(l1_values, dtype=np.float64)
    invalid = np.asarray(reference_values) < t
    return {
        "count": int(invalid.sum()),
        "ratio": invalid.sum() / l1.size,
        "valid": l1[~invalid].mean() if (~invalid).any() else None,
        "invalid": l1[invalid].mean() if invalid.any() else None,
    }


def _approx(value, expected):
    if expected is None:
        return value is None
    return value == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_invalid_counts_ratios_and_means_on_hand_set_filters():
    net = make_net()
    report = filter_report(net, THRESHOLDS)
    pointwise = [10.0, 20.0, 30.0, 40.0]
    every = DENSE_L1 + GROUPED_L1 + DEPTHWISE_L1 + pointwise

    assert [layer.name for layer in report.layers] == [
        "dense.weight", "grouped.weight", "depthwise.weight", "pointwise.weight"
    ]
    assert [layer.kind for layer in report.layers] == ["dense", "grouped", "depthwise", "dense"]
    assert report.total_filters == 16
    np.testing.assert_allclose(report.layers[0].l1, DENSE_L1, rtol=1e-5, atol=1e-7)

    dense = report.layers[0]
    # a zeroed filter is invalid at every threshold
    assert all(dense.invalid_mask(t)[0] for t in THRESHOLDS)
    # the l1 = 0.05 filter: valid at 1e-3 and 1e-2, invalid at 0.1 and 1.0
    assert [bool(dense.invalid_mask(t)[1]) for t in THRESHOLDS] == [False, False, True, True]

    for t in THRESHOLDS:
        stats = report.invalid_stats(t)
        _assert_split_stats(stats, _expected(every, every, t))
        assert "own_count" not in stats

    # hand check of one threshold: invalid at 0.1 are 0, 0.05 | 0, 0.005 | 0.05, 0, 0.0005
    stats = report.invalid_stats(0.1)
    assert stats["count"] == 7 and stats["ratio"] == 7 / 16
    assert stats["mean_l1_invalid"] == pytest.approx((0.05 + 0.005 + 0.05 + 0.0005) / 7, rel=1e-5)
    assert stats["mean_l1_valid"] == pytest.approx((0.5 + 2 + 3 + 4 + 1.5 + 100) / 9, rel=1e-5)
    # at 1e-3 the invalid ones are exactly the three zeroed filters and the 0.0005 one
    assert report.invalid_stats(1e-3)["count"] == 4

    summary = report.summary()
    assert set(summary) == {f"invalid_ratio@{k}" for k in KEYS} | {"total_entropy"}
    assert summary["invalid_ratio@0.1"] == pytest.approx(7 / 16)
    assert summary["invalid_ratio@0.01"] == pytest.approx(5 / 16)
    assert report.summary([0.3]) == {"invalid_ratio@0.3": pytest.approx(7 / 16), "total_entropy": report.total_entropy}


def test_grouped_and_depthwise_are_counted_and_broken_out_by_kind():
    report = filter_report(make_net(), THRESHOLDS)
    pointwise = [10.0, 20.0, 30.0, 40.0]
    per_kind = {"dense": DENSE_L1 + pointwise, "grouped": GROUPED_L1, "depthwise": DEPTHWISE_L1}
    for t in THRESHOLDS:
        stats = report.invalid_stats(t)
        by_kind = stats["by_kind"]
        assert set(by_kind) == {"dense", "grouped", "depthwise"}
        assert sum(b["count"] for b in by_kind.values()) == stats["count"]
        assert sum(b["filters"] for b in by_kind.values()) == report.total_filters
        for kind, values in per_kind.items():
            want = _expected(values, values, t)
            assert by_kind[kind]["filters"] == len(values)
            assert by_kind[kind]["count"] == want["count"]
            assert by_kind[kind]["ratio"] == pytest.approx(want["ratio"])
            assert _approx(by_kind[kind]["mean_l1_valid"], want["valid"])
            assert _approx(by_kind[kind]["mean_l1_invalid"], want["invalid"])
    # a bare state dict: depthwise recognised by shape, the grouped conv reads as dense
    from_state = filter_report(make_net().state_dict(), THRESHOLDS)
    assert [layer.kind for layer in from_state.layers] == ["dense", "dense", "depthwise", "dense"]
    assert from_state.invalid_stats(0.1)["count"] == report.invalid_stats(0.1)["count"]


def test_reference_fixes_the_split_and_means_come_from_the_analysed_model():
    reference = make_net(seed=1)
    # the analysed model: every filter 3x the reference's plus 0.2, so its own split differs
    analysed_norms = {
        "dense": [3 * v + 0.2 for v in DENSE_L1],
        "grouped": [3 * v + 0.2 for v in GROUPED_L1],
        "depthwise": [3 * v + 0.2 for v in DEPTHWISE_L1],
    }
    analysed = make_net(seed=2)
    g = torch.Generator().manual_seed(3)
    for name, norms in analysed_norms.items():
        _set_filter_norms(getattr(analysed, name), norms, g)
    _set_filter_norms(analysed.pointwise, [1.0, 2.0, 3.0, 4.0], g)

    ref_every = DENSE_L1 + GROUPED_L1 + DEPTHWISE_L1 + [10.0, 20.0, 30.0, 40.0]
    own_every = analysed_norms["dense"] + analysed_norms["grouped"] + analysed_norms["depthwise"] + [1.0, 2.0, 3.0, 4.0]

    for ref_arg in (reference, reference.state_dict()):
        report = filter_report(analysed, THRESHOLDS, reference=ref_arg, reference_name="base")
        assert report.has_reference and report.reference_name == "base"
        for t in THRESHOLDS:
            stats = report.invalid_stats(t)
            _assert_split_stats(stats, _expected(own_every, ref_every, t))
            assert stats["own_count"] == int((np.asarray(own_every) < t).sum())
        # at t = 0.1 the reference says 7 invalid; the analysed model has none of its own
        stats = report.invalid_stats(0.1)
        assert stats["count"] == 7 and stats["own_count"] == 0
        invalid_own = [3 * v + 0.2 for v in (0.0, 0.05, 0.0, 0.005, 0.05, 0.0, 0.0005)]
        assert stats["mean_l1_invalid"] == pytest.approx(sum(invalid_own) / 7, rel=1e-5)
        # the logged ratio is the model's own
        assert report.summary()["invalid_ratio@0.1"] == 0.0

    # the split decided by the model itself differs from the reference-fixed one
    assert filter_report(analysed, THRESHOLDS).invalid_stats(0.1)["count"] == 0

    data = json.loads(json.dumps(filter_report(analysed, THRESHOLDS, reference=reference, reference_name="base").to_dict("m")))
    assert data["reference"] == "base"
    assert data["invalid"]["0.1"]["count"] == 7
    assert data["layers"][0]["own_invalid"]["0.1"] == 0


def test_reference_shape_mismatch_names_the_layer():
    other = make_net()
    other.grouped = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="grouped.weight"):
        filter_report(make_net(), THRESHOLDS, reference=other)
    missing = {k: v for k, v in make_net().state_dict().items() if not k.startswith("depthwise")}
    with pytest.raises(ValueError, match="depthwise.weight"):
        filter_report(make_net(), THRESHOLDS, reference=missing)


def _numpy_entropy(values: np.ndarray, bins: int) -> float:
    counts, _ = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    p = counts[counts > 0] / values.size
    return float(-(p * np.log(p)).sum())


def test_total_entropy_is_the_sum_of_layer_entropies_and_matches_numpy():
    torch.manual_seed(0)
    net = TinyConvNet()  # random init
    report = filter_report(net, THRESHOLDS, bins=10)
    assert report.total_entropy == pytest.approx(sum(layer.entropy for layer in report.layers))
    for name in ("dense", "grouped"):
        weight = getattr(net, name).weight.detach().numpy().astype(np.float64).ravel()
        layer = next(la for la in report.layers if la.name == f"{name}.weight")
        assert layer.entropy == pytest.approx(_numpy_entropy(weight, 10), abs=1e-5)
    assert filter_report(net, THRESHOLDS, bins=4).layers[0].entropy == pytest.approx(
        _numpy_entropy(net.dense.weight.detach().numpy().astype(np.float64).ravel(), 4), abs=1e-5
    )
    # a constant layer has entropy 0
    with torch.no_grad():
        net.dense.weight.fill_(0.25)
    assert filter_report(net, THRESHOLDS).layers[0].entropy == 0.0


def test_json_schema_and_empty_sets_are_null():
    report = filter_report(make_net(), THRESHOLDS)
    data = json.loads(json.dumps(report.to_dict("tiny")))
    assert data["name"] == "tiny" and data["total_filters"] == 16
    assert "reference" not in data
    assert data["total_entropy"] == pytest.approx(report.total_entropy)
    assert list(data["invalid"]) == list(KEYS)
    for key in KEYS:
        block = data["invalid"][key]
        assert {"count", "ratio", "mean_l1_valid", "mean_l1_invalid", "by_kind"} <= set(block)
    layer = data["layers"][2]
    assert layer["name"] == "depthwise.weight" and layer["shape"] == [4, 1, 3, 3]
    assert layer["kind"] == "depthwise" and layer["filters"] == 4 and len(layer["l1"]) == 4
    assert layer["invalid"] == {"0.001": 2, "0.01": 2, "0.1": 3, "1.0": 3}
    # nothing under 1e-3 in the grouped kind except the zero filter; nothing invalid at all below:
    high = filter_report(make_net(), [1e-9]).to_dict("x")["invalid"]["1e-09"]
    assert high["count"] == 3 and high["mean_l1_invalid"] == 0.0
    nothing = filter_report(make_net(), [1000.0]).to_dict("x")["invalid"]["1000.0"]
    assert nothing["mean_l1_valid"] is None and nothing["ratio"] == 1.0


def _assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes


def test_plot_reports_writes_a_png(tmp_path):
    reports = {"a": filter_report(make_net(), THRESHOLDS), "b": filter_report(make_net(scale=5.0), THRESHOLDS)}
    out = plot_reports(reports, tmp_path / "sub" / "filters.png")
    _assert_png(tmp_path / "sub" / "filters.png")
    assert out.endswith("filters.png")


def _small_timm_model() -> str:
    return "cifar_resnet20" if timm.is_model("cifar_resnet20") else "resnet10t"


def test_cli_on_a_timm_model_name(tmp_path, capsys):
    name = _small_timm_model()
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    rc = analyze_main([name, "--json", str(js), "--plot", str(png), "--thresholds", "0.01", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "total entropy" in printed and name in printed
    data = json.loads(js.read_text())
    assert isinstance(data, list) and len(data) == 1
    entry = data[0]
    assert entry["name"] == name and list(entry["invalid"]) == ["0.01", "1.0"]
    assert entry["total_filters"] == sum(layer["filters"] for layer in entry["layers"])
    assert entry["total_entropy"] == pytest.approx(sum(layer["entropy"] for layer in entry["layers"]))
    _assert_png(png)


def _write_checkpoint(folder, model_name: str, k: int) -> list[nn.Module]:
    from safetensors.torch import save_file

    from hf_graft.population.students import PopulationSpec, create_member

    PopulationSpec(student_model=model_name, num_students=k, num_classes=10).save(folder)
    members = [create_member(model_name, num_classes=10, seed=100 + i) for i in range(k)]
    state = {
        f"members.{i}.{key}": t.detach().contiguous().clone()
        for i, m in enumerate(members)
        for key, t in m.state_dict().items()
    }
    save_file(state, str(folder / "model.safetensors"))
    return members


def test_cli_on_a_training_checkpoint(tmp_path, capsys):
    name = _small_timm_model()
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    members = _write_checkpoint(ckpt, name, 3)
    js, png = tmp_path / "ckpt.json", tmp_path / "ckpt.png"
    rc = analyze_main([str(ckpt), "--json", str(js), "--plot", str(png)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert [d["name"] for d in data] == [f"{ckpt}#member{i}" for i in range(3)]
    for entry, member in zip(data, members):
        direct = filter_report(member, THRESHOLDS).to_dict("m")
        assert entry["total_filters"] == direct["total_filters"]
        assert entry["total_entropy"] == pytest.approx(direct["total_entropy"])
        assert list(entry["invalid"]) == list(KEYS)
        assert entry["layers"][0]["l1"] == pytest.approx(direct["layers"][0]["l1"])
    _assert_png(png)

    # one member, split fixed by another member
    js2 = tmp_path / "ref.json"
    rc = analyze_main([f"{ckpt}#member2", "--reference", f"{ckpt}#member0", "--json", str(js2)])
    assert rc == 0
    (entry,) = json.loads(js2.read_text())
    assert entry["name"] == f"{ckpt}#member2" and entry["reference"] == f"{ckpt}#member0"
    assert "ref-invalid" in capsys.readouterr().out


def test_cli_on_an_exported_student_folder(tmp_path):
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(_small_timm_model(), num_classes=10)
    folder = tmp_path / "student"
    save_for_hf(model, str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    js = tmp_path / "student.json"
    assert analyze_main([str(folder), "--json", str(js), "--bins", "8"]) == 0
    (entry,) = json.loads(js.read_text())
    direct = filter_report(model, THRESHOLDS, bins=8)
    assert entry["name"] == str(folder) and entry["bins"] == 8
    assert entry["total_filters"] == direct.total_filters
    assert entry["total_entropy"] == pytest.approx(direct.total_entropy)


def test_cli_rejects_bad_paths_before_loading(tmp_path, capsys):
    bad = tmp_path / "no-such-run"
    assert analyze_main([_small_timm_model(), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "hf-hub:" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert analyze_main([str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err

    assert analyze_main(["not_a_timm_model_xyz"]) == 2
    assert analyze_main([_small_timm_model(), "--reference", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_cli_hf_hub_offline_fails_with_one_line(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_id = "hf-hub:timm/not-a-real-model-for-hf-graft-tests"
    rc = analyze_main([hub_id])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and hub_id in err


def test_python_dash_m_entry_point(tmp_path):
    bad = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "-m", "hf_graft.cli.analyze", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
