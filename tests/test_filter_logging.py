"""Filter health during training (docs/method.md §10): logged at every graft and evaluation, and the
per-member alpha histogram reaches TensorBoard."""

from __future__ import annotations

import math

import pytest

from hf_graft.graft.filters import filter_report


def test_filter_metrics_at_graft_and_eval_and_alpha_histograms(make_trainer, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))  # transformers 5: where TensorBoard writes
    trainer = make_trainer(num_train_epochs=2, report_to=["tensorboard"],
                           filter_thresholds=[0.01, 0.1, 5.0], eval_strategy="epoch")
    trainer.train()
    history = trainer.state.log_history

    grafts = [e for e in history if "graft/count" in e]
    assert len(grafts) == 1
    for k in (0, 1):
        for t in ("0.01", "0.1", "5.0"):
            assert 0.0 <= grafts[0][f"graft/member{k}_invalid_ratio@{t}"] <= 1.0
        assert grafts[0][f"graft/member{k}_total_entropy"] > 0
    evals = [e for e in history if "eval_member0_top1" in e]
    assert len(evals) == 2
    # the last evaluation's filter metrics are those of the final weights, computed independently here
    for k, member in enumerate(trainer.population.members):
        expected = filter_report(member, thresholds=[0.01, 0.1, 5.0]).summary()
        for name, value in expected.items():
            assert math.isclose(evals[-1][f"eval_member{k}_{name}"], value, rel_tol=1e-6, abs_tol=1e-9), name
    # the ratio is monotone in the threshold
    for e in evals:
        assert e["eval_member0_invalid_ratio@0.01"] <= e["eval_member0_invalid_ratio@0.1"] <= e["eval_member0_invalid_ratio@5.0"]

    runs = [p.parent for p in logdir.rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file written"
    tags = set()
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"histograms": 0})
        acc.Reload()
        tags |= set(acc.Tags().get("histograms", []))
        for tag in acc.Tags().get("histograms", []):
            (event,) = acc.Histograms(tag)
            # one alpha per anchor layer of cifar_resnet20, each in (0.5 - A/2, 0.5 + A/2)
            report = trainer.graft_reports[0].members[int(tag[-len("_alpha") - 1])]
            assert event.histogram_value.num == len(report.alphas)
            assert 0.3 - 1e-6 <= event.histogram_value.min <= event.histogram_value.max <= 0.7 + 1e-6
    assert {"graft/member0_alpha", "graft/member1_alpha"} <= tags
