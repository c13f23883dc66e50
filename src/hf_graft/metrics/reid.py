"""Person re-identification metrics: mAP and CMC under the Market-1501 protocol, in torch.

Every query is ranked against the whole gallery by feature distance. For that query, gallery images
with the query's identity AND the query's camera are left out (the same person seen by the same
camera is not a retrieval); what remains is ranked, and the relevant items are the gallery images of
the query's identity under another camera. Distractors (Market's identity 0) need no special case:
no query carries their identity, so they stay in the gallery as non-matches. Junk images (identity
-1) are expected to be dropped before (the ReID loaders do). A query with no relevant item left is
skipped and counted (`skipped_queries`); the metrics average over the other, valid queries.

* rank-k (CMC): the percentage of valid queries whose first relevant item is among the first k
  ranked gallery images.
* mAP: the mean over valid queries of the average precision, AP = (1/R) sum_{j=1..R} j / r_j, where
  r_1 < ... < r_R are the ranks of the query's R relevant items (precision at each relevant item).

Ties in distance are ordered by gallery index (the order of a stable sort by distance), so a result
never depends on a sort's implementation. Queries are processed in blocks (`block_size`), on the
features' device, each block vectorised over the gallery, and the gallery is never sorted: only each
query's relevant items are, and the other items are counted in between (`_relevant_ranks`); the
result does not depend on the block size. Distances are computed in the features' dtype: in float32,
the rounding of |q|^2 + |g|^2 - 2 q.g can order two nearly equal distances differently from another
formula would, so compare against other implementations with float64 features.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DISTANCES", "REID_METRIC_NAMES", "ReidMetrics", "ensemble_features", "reid_metrics"]

DISTANCES = ("euclidean", "cosine")
REID_METRIC_NAMES = ("mAP", "rank1", "rank5", "rank10")  # what a population's evaluation reports per member
# elements of one block's [queries, gallery] matrices: 4M keeps a block's working set (float32 distances,
# the int64 place of every item, four masks) near 100 MB, e.g. 263 queries at Market's 15,913 gallery images
_BLOCK_ELEMENTS = 1 << 22


def _features(value, name: str) -> torch.Tensor:
    features = torch.as_tensor(value)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [images, dim] tensor, got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: empty (no images)")
    if features.shape[1] == 0:
        raise ValueError(f"{name}: features of dimension 0")
    if features.is_complex() or features.dtype == torch.bool:
        raise ValueError(f"{name}: expected real-valued features, got {features.dtype}")
    if not features.is_floating_point() or features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # integers and half precision are ranked in float32
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name}: holds NaN or infinite values")
    return features


def _labels(value, name: str, length: int, features_name: str, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(value)
    if labels.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.numel() != length:
        raise ValueError(f"{name}: {labels.numel()} values for {length} rows of {features_name}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}: expected integer values, got {labels.dtype}")
    return labels.to(device=device, dtype=torch.int64)


class _Distances:
    """[queries, G] distances of blocks of queries to one gallery, with the gallery's part computed once.

    `euclidean`: the squared Euclidean distance (the same order as the distance itself), |q|^2 + |g|^2 -
    2 q.g clamped at 0. `cosine`: 1 - the cosine similarity of the L2-normalised features (a zero vector
    has similarity 0 to everything).
    """

    def __init__(self, gallery: torch.Tensor, distance: str):
        self.distance = distance
        if distance == "cosine":
            self.gallery_t = F.normalize(gallery, dim=1).T
        else:
            self.gallery_t = gallery.T
            self.gallery_sq = gallery.square().sum(1)

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        if self.distance == "cosine":
            return torch.sub(1.0, F.normalize(query, dim=1) @ self.gallery_t)
        squared = query.square().sum(1, keepdim=True) + self.gallery_sq
        return squared.addmm_(query, self.gallery_t, alpha=-2.0).clamp_(min=0)


def _relevant_ranks(dist: torch.Tensor, relevant: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks of every query's relevant gallery items, without sorting the gallery.

    `dist`: [B, G] distances; `relevant`, `other`: [B, G] masks of the relevant items and of the kept
    non-matches (items in neither are left out). Gallery items are ordered by (distance, index), the
    order of a stable sort by distance. Returns `(rank, count)`: rank[b, j] is the 1-based rank among
    the kept items of query b's (j+1)-th relevant item in that order ([B, R], R the most relevant items
    of any query; entries j >= count[b] are padding), count[b] the number of relevant items.

    Only the R relevant distances per query are sorted: each kept non-match is placed among them by a
    binary search (ties in distance broken by gallery index), and the rank of the j-th relevant item is
    j plus the number of non-matches placed before it.
    """
    rows, cols = relevant.nonzero(as_tuple=True)  # row-major: gallery index ascending within a row
    num_queries, num_gallery = dist.shape
    count = torch.bincount(rows, minlength=num_queries)
    width = int(count.max()) if rows.numel() else 0
    if width == 0:
        return dist.new_zeros((num_queries, 0), dtype=torch.int64), count
    slot = torch.arange(rows.numel(), device=dist.device) - (count.cumsum(0) - count)[rows]
    # the relevant items of each row, by (distance, index): a stable sort of the index-ordered ones;
    # padding sorts last (distance inf, index G)
    relevant_dist = dist.new_full((num_queries, width), float("inf"))
    relevant_dist[rows, slot] = dist[rows, cols]
    relevant_index = torch.full((num_queries, width), num_gallery, dtype=torch.int64, device=dist.device)
    relevant_index[rows, slot] = cols
    relevant_dist, order = torch.sort(relevant_dist, dim=1, stable=True)
    relevant_index = relevant_index.gather(1, order)

    # place every item: the number of relevant items with a smaller distance ...
    place = torch.searchsorted(relevant_dist, dist)
    # ... plus, for a non-match tied in distance with relevant items, those of them with a lower index
    tied = other & (relevant_dist.gather(1, place.clamp(max=width - 1)) == dist)
    if bool(tied.any()):
        t_rows, t_cols = tied.nonzero(as_tuple=True)
        t_place = place[t_rows, t_cols]
        # one increasing int64 key per relevant item: (row, first slot of its distance, gallery index)
        group = torch.searchsorted(relevant_dist, relevant_dist)
        row_base = torch.arange(num_queries, device=dist.device)[:, None] * (width + 1)
        keys = ((row_base + group) * (num_gallery + 1) + relevant_index).reshape(-1)
        probe = ((t_rows * (width + 1) + t_place) * (num_gallery + 1) + t_cols)
        place[t_rows, t_cols] = torch.searchsorted(keys, probe) - t_rows * width

    # non-matches before the j-th relevant item: those placed at slots <= j (slot width + 1 collects the rest)
    place.masked_fill_(~other, width + 1)
    place += torch.arange(num_queries, device=dist.device)[:, None] * (width + 2)  # one run of bins per row
    placed = torch.bincount(place.reshape(-1), minlength=num_queries * (width + 2))
    before = placed.view(num_queries, width + 2)[:, :width].cumsum(1)
    rank = before + torch.arange(1, width + 1, device=dist.device)
    return rank, count


def reid_metrics(
    query_features,
    gallery_features,
    query_ids,
    gallery_ids,
    query_cameras,
    gallery_cameras,
    distance: str = "euclidean",
    ranks: Sequence[int] = (1, 5, 10),
    block_size: int | None = None,
) -> dict[str, float | int]:
    """mAP and CMC rank-k (percentages) of a query set against a gallery, Market-1501 protocol.

    `*_features`: [Q, D] and [G, D] tensors (ranked in their floating dtype; integer and half precision
    features in float32); `*_ids`, `*_cameras`: [Q] and [G] integer tensors (or anything
    `torch.as_tensor` takes). `distance`: "euclidean" or "cosine". `ranks`: the CMC ranks reported, as
    `rank{k}`. `block_size`: queries ranked at once (default: as many as keep a block's [queries,
    gallery] matrices at about 4M elements).

    Returns `{"mAP", "rank1", "rank5", "rank10"}` as floats in percent, and `valid_queries` /
    `skipped_queries` (ints): the queries averaged over, and those skipped because no gallery image of
    their identity under another camera exists. Bad input raises a one-line ValueError naming the
    argument; so does a query set in which every query is skipped.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance: {distance!r} is not one of {DISTANCES}")
    ranks = tuple(ranks)
    if not ranks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ranks):
        raise ValueError(f"ranks: expected positive integers, got {ranks!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: expected a positive integer or None, got {block_size!r}")
    query = _features(query_features, "query_features")
    gallery = _features(gallery_features, "gallery_features")
    if gallery.shape[1] != query.shape[1]:
        raise ValueError(f"gallery_features: dimension {gallery.shape[1]} differs from query_features' {query.shape[1]}")
    if gallery.device != query.device:
        raise ValueError(f"gallery_features: on {gallery.device}, query_features on {query.device}")
    gallery = gallery.to(torch.promote_types(query.dtype, gallery.dtype))
    query = query.to(gallery.dtype)
    device = query.device
    num_queries, num_gallery = query.shape[0], gallery.shape[0]
    q_ids = _labels(query_ids, "query_ids", num_queries, "query_features", device)
    g_ids = _labels(gallery_ids, "gallery_ids", num_gallery, "gallery_features", device)
    q_cams = _labels(query_cameras, "query_cameras", num_queries, "query_features", device)
    g_cams = _labels(gallery_cameras, "gallery_cameras", num_gallery, "gallery_features", device)
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // num_gallery)

    distances = _Distances(gallery, distance)
    ks = torch.tensor(ranks, device=device)
    hits = torch.zeros(len(ranks), dtype=torch.int64, device=device)  # valid queries with a match within k
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    valid = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, num_queries, block_size):
        stop = min(start + block_size, num_queries)
        dist = distances(query[start:stop])
        if not bool(torch.isfinite(dist).all()):
            raise ValueError(f"query_features: distances to the gallery overflow ({distance}, {dist.dtype}); "
                             "scale the features down")
        same_id = g_ids[None, :] == q_ids[start:stop, None]
        same_cam = g_cams[None, :] == q_cams[start:stop, None]
        # the same person under the same camera is left out; every other image of the person is relevant,
        # and every image of another identity (distractors too) is a kept non-match
        relevant_rank, num_relevant = _relevant_ranks(dist, same_id & ~same_cam, ~same_id)
        del dist, same_id, same_cam
        is_valid = num_relevant > 0
        if relevant_rank.shape[1]:
            hits += ((relevant_rank[:, :1] <= ks) & is_valid[:, None]).sum(0)
            # AP: precision j / r_j at the j-th relevant item, averaged over the query's relevant items
            j = torch.arange(1, relevant_rank.shape[1] + 1, device=device, dtype=torch.float64)
            precision = torch.where(j <= num_relevant[:, None], j / relevant_rank.double(), 0.0)
            ap_sum += (precision.sum(1)[is_valid] / num_relevant[is_valid].double()).sum()
        valid += is_valid.sum()

    num_valid = int(valid)
    if num_valid == 0:
        raise ValueError(f"query_ids: none of the {num_queries} queries has a gallery image of its identity under "
                         "another camera; nothing to rank")
    results: dict[str, float | int] = {"mAP": 100.0 * float(ap_sum) / num_valid}
    for k, count in zip(ranks, hits.tolist()):
        results[f"rank{k}"] = 100.0 * count / num_valid
    results["valid_queries"] = num_valid
    results["skipped_queries"] = num_queries - num_valid
    return results


def ensemble_features(member_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The features of an ensemble: each member's [N, D_k] features L2-normalised, then concatenated.

    For concatenated unit vectors, |a - b|^2 = sum_k |a_k - b_k|^2 = 2K - 2 sum_k cos_k, and their cosine
    similarity is (1/K) sum_k cos_k: with either distance, the ensemble ranks the gallery by the mean of
    the members' cosine similarities, every member weighted alike whatever its feature scale.
    """
    members = list(member_features)
    if not members:
        raise ValueError("member_features: empty (no members)")
    tensors = [torch.as_tensor(f) for f in members]
    for k, features in enumerate(tensors):
        if features.ndim != 2:
            raise ValueError(f"member_features[{k}]: expected a 2-D [images, dim] tensor, got shape "
                             f"{tuple(features.shape)}")
        if features.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"member_features[{k}]: {features.shape[0]} images, member 0 has {tensors[0].shape[0]}")
        if features.device != tensors[0].device:
            raise ValueError(f"member_features[{k}]: on {features.device}, member 0 on {tensors[0].device}")
    dtype = tensors[0].dtype if tensors[0].is_floating_point() else torch.float32
    for features in tensors[1:]:
        if features.is_floating_point():
            dtype = torch.promote_types(dtype, features.dtype)
    return torch.cat([F.normalize(f.to(dtype), dim=1) for f in tensors], dim=1)


class ReidMetrics:
    """`compute_metrics` of a re-identification population: mAP and CMC rank-1/5/10 of every member, of the
    ensemble (`ensemble_features`) and of the selected member, from the evaluation's features and labels.

    Call it with features [N, K, D] (every member's, for the query images and the gallery images in one
    set) and labels [N, 3] = (identity, camera, is_query), as `data.reid.ReidEvalDataset` gives them.
    Returns `member{k}_mAP`, `member{k}_rank1`, ... for each member, `ensemble_mAP`, ..., `valid_queries`,
    `skipped_queries`, `selected_member` (a float, as logged) and `mAP`, `rank1`, ... of the selected
    member (`"best"`: the best mAP, ties to the lowest index; or a member index). A member whose features
    are not all finite (diverged) gets NaN numbers and is left out of the ensemble and of `best`.
    `device`: where the gallery is ranked (the training device: a GPU ranks Market-1501 in a fraction of the
    time a CPU takes); the numbers do not depend on it beyond float rounding.
    """

    def __init__(self, select_student: str | int = "best", distance: str = "euclidean",
                 device: torch.device | str | None = None):
        self.select_student = str(select_student)
        self.distance = distance
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __call__(self, features, labels, leave_out=()) -> dict[str, float]:
        from hf_graft.metrics.accuracy import best_member

        features = torch.as_tensor(np.asarray(features)).float().to(self.device)
        labels = torch.as_tensor(np.asarray(labels)).long().to(self.device)
        if features.ndim != 3 or labels.shape != (features.shape[0], 3):
            raise ValueError(f"ReidMetrics: expected [N, K, D] features and [N, 3] labels (identity, camera, "
                             f"is_query), got shapes {tuple(features.shape)} and {tuple(labels.shape)}")
        is_query = labels[:, 2].bool()
        identities, cameras = labels[:, 0], labels[:, 1]
        ids_and_cameras = (identities[is_query], identities[~is_query], cameras[is_query], cameras[~is_query])
        num_members = features.shape[1]
        # a diverged member (`leave_out`, or non-finite features) is out of the ensemble and never the best
        healthy = [k for k in range(num_members) if k not in set(leave_out) and bool(torch.isfinite(features[:, k]).all())]
        results: dict[str, float] = {}
        counts = None
        for k in range(num_members):
            scores = self._rank(features[:, k], is_query, ids_and_cameras) if k in healthy else None
            counts = counts or scores
            for name in REID_METRIC_NAMES:
                results[f"member{k}_{name}"] = scores[name] if scores else math.nan
        ensemble = (self._rank(ensemble_features([features[:, k] for k in healthy]), is_query, ids_and_cameras)
                    if healthy else None)
        for name in REID_METRIC_NAMES:
            results[f"ensemble_{name}"] = ensemble[name] if ensemble else math.nan
        for name in ("valid_queries", "skipped_queries"):
            results[name] = float(counts[name]) if counts else math.nan
        if self.select_student == "best":
            selected = best_member({k: results[f"member{k}_mAP"] for k in healthy})
            selected = 0 if selected is None else selected
        else:
            selected = int(self.select_student)
        if not 0 <= selected < num_members:
            raise ValueError(f"ReidMetrics: select_student={self.select_student!r}, members 0..{num_members - 1}")
        results["selected_member"] = float(selected)
        results.update({name: results[f"member{selected}_{name}"] for name in REID_METRIC_NAMES})
        return results

    def _rank(self, features: torch.Tensor, is_query: torch.Tensor, ids_and_cameras) -> dict[str, float | int]:
        query_ids, gallery_ids, query_cameras, gallery_cameras = ids_and_cameras
        return reid_metrics(features[is_query], features[~is_query], query_ids, gallery_ids, query_cameras,
                            gallery_cameras, distance=self.distance, ranks=(1, 5, 10))
