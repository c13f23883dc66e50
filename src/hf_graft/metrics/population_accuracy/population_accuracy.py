"""population_accuracy: top-1/top-5 of every member of a population, of its ensemble and of the selected member.

An `evaluate` metric (load it with `evaluate.load(<this folder>)`; hf_graft ships it and
`hf_graft.metrics.load_population_accuracy()` finds it). The evaluate loader scans the imports of this
file, one module per line, to check that they are installed.
"""

import datasets
import evaluate
import numpy
import torch
import timm.utils

_DESCRIPTION = """
Top-1 and top-5 accuracy (percent) of each of the K members of a population of classifiers, of their
ensemble (the mean of the members' softmax) and of one selected member: the member with the best top-1
(`select_student="best"`, ties to the lowest index) or a member index. Top-5 is top-min(5, C) when there
are fewer than 5 classes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: logits, one [K, C] list (K members, C classes) per example.
    references: the class index of each example.
    select_student: "best" (default) or a member index.
Returns:
    member{k}_top1, member{k}_top5 for every member k, ensemble_top1, ensemble_top5,
    selected_member (the selected index, as a float), top1 and top5 (of the selected member).
Example:
    >>> metric = evaluate.load("population_accuracy")  # a path to this folder
    >>> metric.compute(predictions=[[[2.0, 1.0], [0.0, 3.0]]], references=[0])
    {'member0_top1': 100.0, 'member0_top5': 100.0, 'member1_top1': 0.0, ...}
"""

_CITATION = """
@article{cheng2020filter,
  title={Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation},
  author={Cheng, Hao and Meng, Fanxu and Li, Ke and Gao, Yuting and Lu, Guangming and Sun, Xing and Ji, Rongrong},
  journal={arXiv preprint arXiv:2004.12311},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PopulationAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, select_student="best"):
        logits = torch.from_numpy(numpy.asarray(predictions, dtype=numpy.float32))
        labels = torch.as_tensor(numpy.asarray(references, dtype=numpy.int64))
        if logits.ndim != 3 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"population_accuracy: predictions must be [N, K, C] logits for N references, got shape "
                f"{tuple(logits.shape)} for {labels.shape[0]} references"
            )
        topk = (1, min(5, logits.shape[-1]))
        results = {}
        top1 = []
        for k in range(logits.shape[1]):
            acc1, acc5 = timm.utils.accuracy(logits[:, k], labels, topk=topk)
            results[f"member{k}_top1"] = float(acc1)
            results[f"member{k}_top5"] = float(acc5)
            top1.append(float(acc1))
        ens1, ens5 = timm.utils.accuracy(torch.softmax(logits, dim=-1).mean(dim=1), labels, topk=topk)
        results["ensemble_top1"] = float(ens1)
        results["ensemble_top5"] = float(ens5)
        selected = int(numpy.argmax(top1)) if str(select_student) == "best" else int(select_student)
        if not 0 <= selected < logits.shape[1]:
            raise ValueError(f"population_accuracy: select_student={select_student!r}, members 0..{logits.shape[1] - 1}")
        results["selected_member"] = float(selected)
        results["top1"] = results[f"member{selected}_top1"]
        results["top5"] = results[f"member{selected}_top5"]
        return results
