"""Evaluation metrics through `evaluate`: the shipped population_accuracy metric and extra metrics."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from hf_graft.config import GraftingConfig
from hf_graft.metrics import POPULATION_ACCURACY_PATH, PopulationMetrics, load_population_accuracy


def population_metrics(logits, labels, select_student: str = "best") -> dict[str, float]:
    """Reference: timm's `accuracy` member by member, the ensemble's mean softmax, the best top-1 by argmax."""
    from timm.utils import accuracy

    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels).long()
    topk = (1, min(5, logits.shape[-1]))
    metrics, top1 = {}, []
    for k in range(logits.shape[1]):
        acc1, acc5 = accuracy(logits[:, k], labels, topk=topk)
        metrics[f"member{k}_top1"], metrics[f"member{k}_top5"] = float(acc1), float(acc5)
        top1.append(float(acc1))
    ens1, ens5 = accuracy(torch.softmax(logits, dim=-1).mean(dim=1), labels, topk=topk)
    metrics["ensemble_top1"], metrics["ensemble_top5"] = float(ens1), float(ens5)
    selected = int(np.argmax(top1)) if select_student == "best" else int(select_student)
    metrics["selected_member"] = float(selected)
    metrics["top1"], metrics["top5"] = metrics[f"member{selected}_top1"], metrics[f"member{selected}_top5"]
    return metrics


# A real evaluate.Metric script: recall averaged over classes ("macro") or over examples ("micro"),
# and the per-class recalls as an array.
CLASS_RECALL = '''
"""Recall per class, and its macro / micro average."""

import datasets
import evaluate
import numpy


class ClassRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="recall per class",
            citation="",
            inputs_description="predictions, references: class indices",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro"):
        predictions = numpy.asarray(predictions)
        references = numpy.asarray(references)
        classes = numpy.unique(references)
        per_class = numpy.array([numpy.mean(predictions[references == c] == c) for c in classes])
        if average == "micro":
            value = float(numpy.mean(predictions == references))
        else:
            value = float(per_class.mean())
        return {"recall": value, "per_class_recall": per_class}
'''


@pytest.fixture(scope="module")
def class_recall(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics") / "class_recall"
    folder.mkdir()
    (folder / "class_recall.py").write_text(textwrap.dedent(CLASS_RECALL))
    return str(folder)


def _macro_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)]))


# ----------------------------------------------------------------------------- population_accuracy
@pytest.mark.parametrize(
    "n, k, c, integer_logits",
    [(200, 3, 10, False), (150, 2, 7, True), (64, 4, 3, False), (90, 2, 4, True), (50, 1, 2, True), (33, 5, 100, False)],
)
def test_population_accuracy_equals_population_metrics(n, k, c, integer_logits):
    generator = torch.Generator().manual_seed(n * 100 + c)
    if integer_logits:  # values in {-1, 0, 1}: many ties inside the top 1 and the top 5
        logits = torch.randint(-1, 2, (n, k, c), generator=generator).float()
    else:
        logits = torch.randn(n, k, c, generator=generator) * 3
    labels = torch.randint(0, c, (n,), generator=generator)
    metric = load_population_accuracy()
    expected = population_metrics(logits, labels)
    got = metric.compute(predictions=logits.numpy(), references=labels.numpy())
    assert got == expected  # identical numbers, every key
    assert set(got) == {f"member{i}_top{t}" for i in range(k) for t in (1, 5)} | {
        "ensemble_top1", "ensemble_top5", "selected_member", "top1", "top5"}
    if c < 5:  # top-5 of fewer than 5 classes is top-c: every example counts
        assert got["ensemble_top5"] == 100.0
    for index in range(k):
        fixed = metric.compute(predictions=logits.numpy(), references=labels.numpy(), select_student=str(index))
        assert fixed == population_metrics(logits, labels, select_student=str(index))


def test_population_accuracy_hand_computed_and_loaded_by_path():
    import evaluate

    # 4 examples, 2 members, 6 classes (the numbers are worked out in test_trainer)
    member0 = [[5, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0], [5, 4, 3, -9, 2, 1]]
    member1 = [[5, 0, 0, 0, 0, 0], [3, 2, 1, 0, -1, -2], [5, 4, -9, 3, 2, 1], [5, 4, 0, 3, -1, -2]]
    logits = np.transpose(np.array([member0, member1], dtype=np.float32), (1, 0, 2))
    metric = evaluate.load(str(POPULATION_ACCURACY_PATH))  # offline: HF_HUB_OFFLINE=1 in this suite
    m = metric.compute(predictions=logits, references=[0, 1, 2, 3])
    assert (m["member0_top1"], m["member0_top5"], m["member1_top1"], m["member1_top5"]) == (75.0, 75.0, 25.0, 75.0)
    assert (m["ensemble_top1"], m["ensemble_top5"], m["selected_member"], m["top1"]) == (75.0, 100.0, 0.0, 75.0)


def test_metric_script_imports_one_module_per_line():
    # evaluate checks that every module the script imports is installed; `import a, b` defeats that scan
    from evaluate.loading import get_imports

    script = POPULATION_ACCURACY_PATH / "population_accuracy.py"
    assert script.is_file()
    found = {name for kind, name, *_ in get_imports(str(script)) if kind == "library"}
    assert {"datasets", "evaluate", "numpy", "torch", "timm"} <= found
    for line in script.read_text().splitlines():
        if line.startswith("import "):
            assert "," not in line, line


# ----------------------------------------------------------------------------- extra metrics
def test_population_metrics_with_extra_metric_for_selected_and_ensemble(class_recall):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 3, 6, generator=generator)
    labels = torch.randint(0, 6, (300,), generator=generator)
    compute = PopulationMetrics("best", [class_recall])
    got = compute(logits.numpy(), labels.numpy())
    expected = population_metrics(logits, labels)
    assert {k: got[k] for k in expected} == expected
    selected = int(expected["selected_member"])
    y = labels.numpy()
    member_pred = logits[:, selected].argmax(-1).numpy()
    ensemble_pred = torch.softmax(logits, -1).mean(1).argmax(-1).numpy()
    assert got["recall"] == pytest.approx(_macro_recall(member_pred, y), abs=1e-12)
    assert got["ensemble_recall"] == pytest.approx(_macro_recall(ensemble_pred, y), abs=1e-12)
    assert isinstance(got["per_class_recall"], list) and len(got["per_class_recall"]) == 6
    # micro recall is accuracy: the same number as top-1, for the member and for the ensemble
    micro = PopulationMetrics("best", [class_recall], {class_recall: {"average": "micro"}})(logits.numpy(), y)
    assert 100 * micro["recall"] == pytest.approx(expected["top1"], abs=1e-4)
    assert 100 * micro["ensemble_recall"] == pytest.approx(expected["ensemble_top1"], abs=1e-4)


def test_trainer_logs_extra_metrics(make_trainer, class_recall):
    trainer = make_trainer(num_students=2, num_train_epochs=1, eval_strategy="no", extra_metrics=[class_recall],
                           extra_metric_kwargs={class_recall: {"average": "micro"}})
    trainer.train()
    metrics = trainer.evaluate()
    prediction = trainer.predict(trainer.eval_dataset)
    logits, labels = prediction.predictions, prediction.label_ids
    selected = int(metrics["eval_selected_member"])
    assert metrics["eval_recall"] == pytest.approx(np.mean(logits[:, selected].argmax(-1) == labels), abs=1e-12)
    assert 100 * metrics["eval_recall"] == pytest.approx(metrics["eval_top1"], abs=1e-4)
    assert 100 * metrics["eval_ensemble_recall"] == pytest.approx(metrics["eval_ensemble_top1"], abs=1e-4)
    assert len(metrics["eval_per_class_recall"]) == len(np.unique(labels))


def _one_line_error(**kwargs) -> str:
    """A metric is loaded (and refused) before any data is, by the builder's check; its arguments by the config."""
    from hf_graft.training.builder import check_run_inputs

    with pytest.raises(ValueError) as caught:
        check_run_inputs(GraftingConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_hub_metric_offline_fails_at_config_time_in_one_line():
    message = _one_line_error(extra_metrics=["f1"])
    assert message.startswith("GraftingConfig.extra_metrics:")
    assert "'f1'" in message and "Hub" in message and "local folder" in message


def test_bad_local_metric_and_kwargs_fail_at_config_time(tmp_path, class_recall):
    missing = str(tmp_path / "no_such_metric")
    message = _one_line_error(extra_metrics=[missing])
    assert repr(missing) in message and "metric script" in message
    message = _one_line_error(extra_metrics=[class_recall], extra_metric_kwargs={"f1": {"average": "macro"}})
    assert "extra_metric_kwargs" in message and "'f1'" in message
    message = _one_line_error(extra_metrics=[class_recall], extra_metric_kwargs={class_recall: "macro"})
    assert "must be a mapping" in message
    config = GraftingConfig(output_dir="unused", use_cpu=True, report_to="none", extra_metrics=[class_recall],
                            extra_metric_kwargs=f'{{"{class_recall}": {{"average": "micro"}}}}')  # JSON, as on the CLI
    assert config.extra_metric_kwargs == {class_recall: {"average": "micro"}}
