"""population_accuracy: top-1/top-5 of every member of a population, of its ensemble and of the selected member.

An `evaluate` metric (load it with `evaluate.load(<this folder>)`; hf_graft ships it and
`hf_graft.metrics.load_population_accuracy()` finds it) around `hf_graft.metrics.accuracy.population_accuracy`. The evaluate loader scans the imports of this
file, one module per line, to check that they are installed.
"""

import datasets
import evaluate
import numpy
import torch
import timm.utils  # noqa: F401  (a requirement: evaluate checks that every import is installed)
import hf_graft.metrics.accuracy

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
        return hf_graft.metrics.accuracy.population_accuracy(logits, labels, select_student=select_student)
