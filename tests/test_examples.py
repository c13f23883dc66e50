"""examples/finetune_pretrained.py runs as written: offline, on the built-in digits, with a tiny randomly
initialised timm model in place of the pretrained one; the push goes to a recorder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_pretrained.py"
TINY = ["--dataset_name", "builtin:digits", "--student_model", "test_resnet", "--student_pretrained", "false",
        "--input_size", "32", "--num_train_epochs", "1", "--max_train_samples", "48", "--max_eval_samples", "24",
        "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--use_cpu", "true",
        "--report_to", "none"]
STUDENT_FILES = ["README.md", "config.json", "model.safetensors"]


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_pretrained", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_trains_and_exports_the_student(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run([sys.executable, str(EXAMPLE), *TINY, "--output_dir", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "all_results.json").read_text())
    assert results["selected_member"] in (0, 1) and Path(results["student_dir"]) == out / "student"
    assert results["eval_top1"] == results[f"eval_member{results['selected_member']}_top1"]
    student = out / "student"
    assert sorted(p.name for p in student.iterdir()) == STUDENT_FILES
    config = json.loads((student / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    model = timm.create_model(f"local-dir:{student}", pretrained=True).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert "eval_top1" in done.stdout + done.stderr  # the final metrics are printed


def test_finetune_example_pushes_the_student_when_a_repo_is_named(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    import hf_graft.run.preflight

    uploads = []
    monkeypatch.setattr(hf_graft.run.preflight, "_offline", lambda: False)  # the Hub itself is the recorder below
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    monkeypatch.chdir(tmp_path)
    example = _load_example()
    data_args, config = example.parse_arguments([*TINY, "--hub_model_id", "your-name/tiny-grafted"])
    assert config.push_to_hub and config.hub_model_id == "your-name/tiny-grafted"
    assert config.student_pretrained is False and data_args.dataset_name == "builtin:digits"
    assert config.output_dir.endswith("out/finetune_pretrained")  # the example's own default

    assert example.main([*TINY, "--hub_model_id", "your-name/tiny-grafted"]) == 0
    student = tmp_path / "out" / "finetune_pretrained" / "student"
    assert [u["repo_id"] for u in uploads] == ["your-name/tiny-grafted"]
    assert Path(uploads[0]["folder_path"]).resolve() == student.resolve()
    assert "hf-hub:your-name/tiny-grafted" in (student / "README.md").read_text()  # the card names the repo
