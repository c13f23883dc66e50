"""Two-process (CPU, gloo, DDP) GraftingTrainer runs, a distributed resume, and FSDP2 grafting.

`torchrun --standalone --nproc_per_node 2 tests/_dist_worker.py OUT` trains a K = 2 population of
cifar_resnet20 (16 px, 64 digits, 8 per process and step, 3 epochs: grafts at global steps 4 and 8),
then resumes a second run from the first one's mid-epoch checkpoint-6. Each rank writes what it
saw and a sha256 digest of every member's parameters and buffers before and after each graft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_dist_worker.py")


def _cpu_only(env: dict) -> dict:
    """CPU/gloo processes see no GPU: on a machine with one, torchrun would otherwise give rank r
    GPU r (which need not exist) for its collectives."""
    return dict(env, CUDA_VISIBLE_DEVICES="")


def _launch(out: Path, cuda: bool = False) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               GRAFT_TEST_CUDA="1" if cuda else "0")
    if not cuda:
        env = _cpu_only(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=WORKER.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, _launch(out)


def test_two_processes_really_ran(ranks):
    _, (r0, r1) = ranks
    assert (r0["rank"], r1["rank"]) == (0, 1)
    for r in (r0, r1):
        assert r["world_size"] == 2 and r["dist_world_size"] == 2
        assert r["backend"] == "gloo" and r["distributed_type"].endswith("MULTI_CPU")


def test_every_graft_happened_and_members_are_identical_across_ranks(ranks):
    _, (r0, r1) = ranks
    for run in ("full", "resumed"):
        a, b = r0[run], r1[run]
        assert a["grafts_done"] == b["grafts_done"] == 2
        assert a["global_step"] == b["global_step"] == 12  # 64 images / (2 x 8) = 4 steps an epoch
    assert r0["full"]["initial_digests"] == r1["full"]["initial_digests"]
    assert [(g["graft"], g["global_step"]) for g in r0["full"]["graft_digests"]] == [(0, 4), (1, 8)]
    assert [(g["graft"], g["global_step"]) for g in r0["resumed"]["graft_digests"]] == [(1, 8)]
    for run in ("full", "resumed"):
        for g0, g1 in zip(r0[run]["graft_digests"], r1[run]["graft_digests"], strict=True):
            assert g0["digests"] == g1["digests"], f"{run}: members differ across ranks after graft {g0['graft']}"
            assert g0["before"] != g0["digests"]  # the graft really changed every member...
            assert all(x != y for x, y in zip(g0["before"], g0["digests"]))
        assert r0[run]["final_digests"] == r1[run]["final_digests"]
    # ...and the two members stay distinct
    assert len(set(r0["full"]["final_digests"])) == 2


def test_data_is_sharded_across_ranks(ranks):
    _, (r0, r1) = ranks
    n = r0["num_train"]
    seen0, seen1 = r0["full"]["seen"], r1["full"]["seen"]
    assert sorted(seen0) == sorted(seen1) == ["0", "1", "2"]
    for epoch in ("0", "1", "2"):
        a, b = seen0[epoch], seen1[epoch]
        assert len(a) == len(b) == n // 2
        assert not set(a) & set(b)  # each rank reads its own half of the epoch...
        assert sorted(a + b) == list(range(n))  # ...and together they read every example once
    assert seen0["0"] != seen0["1"]  # a new order every epoch


def test_resume_mid_epoch_with_two_processes_is_exact(ranks):
    out, (r0, r1) = ranks
    for r in (r0, r1):
        # the resumed run reads exactly the rest of epoch 1 that the first run read after step 6
        assert sorted(r["resumed"]["seen"]) == ["1", "2"]
        assert r["resumed"]["seen"]["1"] == r["full"]["seen"]["1"][len(r["full"]["seen"]["1"]) // 2:]
        assert r["resumed"]["seen"]["2"] == r["full"]["seen"]["2"]
        assert r["resumed"]["final_digests"] == r["full"]["final_digests"]
    # every checkpoint holds both ranks' RNG states and was published atomically
    checkpoint = out / "run" / "checkpoint-6"
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json",
            "graft_population.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not [p for p in (out / "run").iterdir() if p.name.startswith("tmp-")]


def test_ranks_report_the_same_end_of_run(ranks):
    out, (r0, r1) = ranks
    m0, m1 = r0["eval_metrics"], r1["eval_metrics"]
    for key in ("eval_member0_top1", "eval_member1_top1", "eval_ensemble_top1", "eval_loss", "selected_member"):
        assert m0[key] == m1[key]
    # process 0 wrote the selected member once; the other process waited for it
    assert r0["student_dir"] == r1["student_dir"] == str(out / "run" / "student")
    assert sorted(p.name for p in (out / "run" / "student").iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (DDP over NCCL, one GPU per process)")
def test_two_gpus_nccl_members_identical_after_every_graft(tmp_path):
    r0, r1 = _launch(tmp_path, cuda=True)
    assert r0["backend"] == r1["backend"] == "nccl" and r0["distributed_type"].endswith("MULTI_GPU")
    for run in ("full", "resumed"):
        assert r0[run]["grafts_done"] == r1[run]["grafts_done"] == 2
        for g0, g1 in zip(r0[run]["graft_digests"], r1[run]["graft_digests"], strict=True):
            assert g0["digests"] == g1["digests"]
        assert r0[run]["final_digests"] == r1[run]["final_digests"]
    for epoch in ("0", "1", "2"):
        assert not set(r0["full"]["seen"][epoch]) & set(r1["full"]["seen"][epoch])


def test_fsdp2_sharded_graft_equals_the_whole_graft(tmp_path):
    """FSDP2 (`fully_shard`, CPU/gloo, 2 processes): members are grafted shard by
    shard with information from all-reduced histograms; the result equals grafting whole copies."""
    out = tmp_path / "fsdp.jsonl"
    env = _cpu_only(dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER.with_name("_fsdp_worker.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=WORKER.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world"] == 2 for r in rows)
    for r in rows:
        assert r["kinds"] == ["DTensor"]  # the parameters really were sharded...
        assert r["local_numel"] < r["full_numel"]  # ...and each process held only part of them
        assert r["max_weight_diff"] == 0.0 and r["alpha_diff"] == 0.0 and r["info_diff"] == 0.0
        assert r["filters_sharded"] == r["filters_whole"]
    assert rows[0]["alphas"] == rows[1]["alphas"]
    assert len({round(a, 4) for a in rows[0]["alphas"][0]}) > 3  # the alphas are not all alike
