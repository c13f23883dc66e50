"""Run by torchrun (2 CPU/gloo processes): graft FSDP2-sharded members and compare with the same
graft of whole (unsharded) copies. Writes one JSON line per rank to argv[1]."""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

import hf_graft  # noqa: F401
import timm
from hf_graft.graft.filters import filter_report
from hf_graft.graft.grafting import graft_members


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    members = []
    for k in range(3):
        torch.manual_seed(100 + k)  # same members on both ranks
        members.append(timm.create_model("cifar_resnet20", num_classes=10).eval())
    with torch.no_grad():  # a non-trivial BN state and a spread of layer entropies
        for k, m in enumerate(members):
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1 * (k + 1))
    whole = [copy.deepcopy(m) for m in members]
    for m in members:
        for stage in (m.layer1, m.layer2, m.layer3):  # per-stage FSDP units, then the root
            fully_shard(stage, mesh=mesh)
        fully_shard(m, mesh=mesh)
    sharded_kinds = sorted({type(p).__name__ for p in members[0].parameters()})
    local_numel = sum(p.to_local().numel() for p in members[0].parameters())
    full_numel = sum(p.numel() for p in whole[0].parameters())

    ref = graft_members(whole, criterion="entropy", bins=10)
    got = graft_members(members, criterion="entropy", bins=10)
    max_diff = 0.0
    for m_sharded, m_whole in zip(members, whole):
        for (name, t), (_, w) in zip(m_sharded.state_dict().items(), m_whole.state_dict().items()):
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            max_diff = max(max_diff, float((full.double() - w.double()).abs().max()) if full.numel() else 0.0)
    alpha_diff = max(
        abs(a - b) for r1, r2 in zip(ref.members, got.members) for a, b in zip(r1.alpha_values, r2.alpha_values)
    )
    info_diff = max(
        abs(r1.information[n] - r2.information[n]) for r1, r2 in zip(ref.members, got.members) for n in r1.information
    )
    # filter statistics of a sharded member gather one layer at a time and equal the whole model's
    ratio_sharded = filter_report(members[1], thresholds=[0.1]).summary()
    ratio_whole = filter_report(whole[1], thresholds=[0.1]).summary()
    with open(out_path, "a") as f:
        f.write(json.dumps({
            "rank": rank, "world": world, "kinds": sharded_kinds, "local_numel": local_numel, "full_numel": full_numel,
            "max_weight_diff": max_diff, "alpha_diff": alpha_diff, "info_diff": info_diff,
            "alphas": [r.alpha_values for r in got.members],
            "filters_sharded": ratio_sharded, "filters_whole": ratio_whole,
        }) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
