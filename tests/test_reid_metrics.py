"""Person re-identification metrics: hand-worked cases of the Market-1501 protocol, a brute-force
per-query reference on random features, the ensemble's features, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_graft import reid_metrics
from hf_graft.metrics.reid import ensemble_features


def _t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def _ids(values):
    return torch.tensor(values, dtype=torch.int64)


# ----------------------------------------------------------------------------- hand-worked cases
def test_same_camera_exclusion_distractor_and_several_relevant_items():
    # one query (identity 1, camera 1) at 0; gallery on a line, squared distances 0, 1, 4, 9, 16, 100:
    #   g0 identity 1, camera 1: the same person under the same camera -> left out
    #   g1 identity 0 (distractor), camera 2 -> non-match, rank 1
    #   g2 identity 1, camera 2 -> relevant, rank 2
    #   g3 identity 5, camera 1 -> non-match, rank 3
    #   g4 identity 1, camera 3 -> relevant, rank 4
    #   g5 identity 1, camera 1 -> left out
    # AP = (1/2 + 2/4) / 2 = 0.5; the first relevant item is at rank 2
    result = reid_metrics(_t([[0.0]]), _t([[0.0], [1.0], [2.0], [3.0], [4.0], [10.0]]),
                          _ids([1]), _ids([1, 0, 1, 5, 1, 1]), _ids([1]), _ids([1, 2, 2, 1, 3, 1]), ranks=(1, 2, 5))
    assert result == {"mAP": 50.0, "rank1": 0.0, "rank2": 100.0, "rank5": 100.0,
                      "valid_queries": 1, "skipped_queries": 0}


def test_left_out_items_do_not_count_in_the_ranks():
    # without the exclusion g1 (same identity and camera, nearest) would be rank 1 and g2 rank 2;
    # with it, g2 (relevant) is rank 1 and g3 (relevant) rank 3 behind g0: AP = (1/1 + 2/3) / 2 = 5/6
    result = reid_metrics(_t([[0.0]]), _t([[2.0], [0.5], [1.0], [3.0]]),
                          _ids([4]), _ids([9, 4, 4, 4]), _ids([2]), _ids([1, 2, 1, 3]))
    assert result["mAP"] == pytest.approx(100 * 5 / 6, abs=1e-12)
    assert (result["rank1"], result["rank5"], result["rank10"]) == (100.0, 100.0, 100.0)


def test_a_query_without_a_match_under_another_camera_is_skipped_and_counted():
    # query 0 (identity 3, camera 1): relevant g1 at rank 2 behind g0 -> AP 1/2, not a rank-1 hit
    # query 1 (identity 8, camera 2): its only gallery image (g2) is under camera 2 -> skipped
    # query 2 (identity 6, camera 1): g0 is relevant at rank 1 -> AP 1
    # over the 2 valid queries: mAP = (0.5 + 1) / 2 = 75, rank-1 = 1/2
    result = reid_metrics(_t([[0.0], [5.0], [1.0]]), _t([[1.0], [2.0], [5.0]]),
                          _ids([3, 8, 6]), _ids([6, 3, 8]), _ids([1, 2, 1]), _ids([2, 3, 2]))
    assert result == {"mAP": 75.0, "rank1": 50.0, "rank5": 100.0, "rank10": 100.0,
                      "valid_queries": 2, "skipped_queries": 1}


def test_ties_in_distance_are_ordered_by_gallery_index():
    # the query at 0; a non-match and a relevant item both at squared distance 1 (at -1 and at +1)
    features, query = _t([[-1.0], [1.0], [5.0]]), _t([[0.0]])
    # the non-match has the lower index: the relevant item is rank 2 -> AP 1/2, no rank-1 hit
    first = reid_metrics(query, features, _ids([2]), _ids([7, 2, 7]), _ids([1]), _ids([2, 2, 2]))
    assert (first["mAP"], first["rank1"], first["rank5"]) == (50.0, 0.0, 100.0)
    # the relevant item has the lower index: rank 1 -> AP 1
    second = reid_metrics(query, features, _ids([2]), _ids([2, 7, 7]), _ids([1]), _ids([2, 2, 2]))
    assert (second["mAP"], second["rank1"]) == (100.0, 100.0)
    # two relevant items tied with a non-match between them in index order (g0 relevant, g1 non-match,
    # g2 relevant, all at distance 1): ranks 1 and 3 -> AP (1 + 2/3) / 2
    tied = reid_metrics(query, _t([[1.0], [-1.0], [1.0]]), _ids([2]), _ids([2, 7, 2]), _ids([1]), _ids([2, 2, 3]))
    assert tied["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-12)


def test_cosine_distance_hand_worked():
    # query along x; gallery at angles 0 deg (non-match), 60 deg (relevant, twice the length: scale does not
    # matter), 90 deg (non-match), 180 deg (relevant): cosine ranks 1, 2, 3, 4 -> AP = (1/2 + 2/4) / 2 = 0.5
    gallery = _t([[2.0, 0.0], [1.0, 3.0 ** 0.5], [0.0, 1.0], [-1.0, 0.0]])
    result = reid_metrics(_t([[1.0, 0.0]]), gallery, _ids([1]), _ids([2, 1, 2, 1]), _ids([0]), _ids([1, 1, 1, 1]),
                          distance="cosine", ranks=(1, 2))
    assert (result["mAP"], result["rank1"], result["rank2"]) == (50.0, 0.0, 100.0)
    # euclidean on the same points ranks by |q - g|^2 = 1, 3, 2, 4: g0, g2, g1, g3
    # -> the relevant items at ranks 3 and 4: AP = (1/3 + 2/4) / 2
    result = reid_metrics(_t([[1.0, 0.0]]), gallery, _ids([1]), _ids([2, 1, 2, 1]), _ids([0]), _ids([1, 1, 1, 1]))
    assert result["mAP"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2, abs=1e-12)


# ----------------------------------------------------------------------------- against a brute-force reference
def brute_force(qf, gf, q_ids, g_ids, q_cams, g_cams, distance, ranks=(1, 5, 10)):
    """The protocol query by query in NumPy float64: distances, stable sort, same identity and camera
    left out, CMC at the ranks, AP = mean precision at the relevant items."""
    qf, gf = np.asarray(qf, np.float64), np.asarray(gf, np.float64)
    if distance == "euclidean":
        rows = (((gf - q) ** 2).sum(1) for q in qf)
    else:
        unit = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        rows = (1 - unit @ (q / np.linalg.norm(q)) for q in qf)
    return ranked_by(rows, q_ids, g_ids, q_cams, g_cams, ranks)


def ranked_by(distance_rows, q_ids, g_ids, q_cams, g_cams, ranks=(1, 5, 10)):
    q_ids, g_ids, q_cams, g_cams = map(np.asarray, (q_ids, g_ids, q_cams, g_cams))
    aps, first = [], []
    for i, d in enumerate(distance_rows):
        order = np.argsort(d, kind="stable")
        kept = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        match = (g_ids[order] == q_ids[i])[kept]
        if not match.any():
            continue
        positions = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
        first.append(positions[0])
    first = np.array(first)
    result = {"mAP": 100 * float(np.mean(aps))}
    result.update({f"rank{k}": 100 * float(np.mean(first <= k)) for k in ranks})
    result.update(valid_queries=len(aps), skipped_queries=len(q_ids) - len(aps))
    return result


def _random_set(seed, num_query=300, num_gallery=500, dim=16, identities=40, cameras=3, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # few distinct values: many exact ties in distance
        qf = torch.randint(-1, 2, (num_query, dim), generator=g).float()
        gf = torch.randint(-1, 2, (num_gallery, dim), generator=g).float()
    else:
        qf = torch.randn(num_query, dim, generator=g, dtype=torch.float64)
        gf = torch.randn(num_gallery, dim, generator=g, dtype=torch.float64)
    # a few query identities (the top 5) have no gallery image at all: those queries are skipped
    ids = (torch.randint(0, identities + 5, (num_query,), generator=g),
           torch.randint(0, identities, (num_gallery,), generator=g))
    cams = (torch.randint(0, cameras, (num_query,), generator=g), torch.randint(0, cameras, (num_gallery,), generator=g))
    return qf, gf, ids[0], ids[1], cams[0], cams[1]


def _assert_close(result, expected):
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_equals_the_brute_force_reference_on_random_features(distance):
    qf, gf, q_ids, g_ids, q_cams, g_cams = _random_set(0)
    expected = brute_force(qf, gf, q_ids, g_ids, q_cams, g_cams, distance)
    assert expected["valid_queries"] > 200 and expected["skipped_queries"] > 10  # both kinds of query occur
    _assert_close(reid_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams, distance=distance), expected)


def test_many_ties_equal_the_brute_force_reference():
    # 3-d features in {-1, 0, 1}: squared distances 0..12, so nearly every item is tied with others
    qf, gf, q_ids, g_ids, q_cams, g_cams = _random_set(1, dim=3, integer=True)
    expected = brute_force(qf, gf, q_ids, g_ids, q_cams, g_cams, "euclidean", ranks=(1, 3, 20))
    _assert_close(reid_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams, ranks=(1, 3, 20)), expected)


@pytest.mark.parametrize("block_size", [1, 7, 64, 10_000])
def test_the_block_size_does_not_change_the_result(block_size):
    qf, gf, q_ids, g_ids, q_cams, g_cams = _random_set(2, num_query=120, num_gallery=200, dim=8, identities=15)
    reference = reid_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams)
    blocked = reid_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams, block_size=block_size)
    assert blocked == pytest.approx(reference, abs=1e-12)


def test_float32_features_equal_the_reference_and_inputs_may_be_numpy():
    qf, gf, q_ids, g_ids, q_cams, g_cams = _random_set(3)
    expected = brute_force(qf, gf, q_ids, g_ids, q_cams, g_cams, "cosine")
    result = reid_metrics(qf.float().numpy(), gf.float().numpy(), q_ids.numpy(), g_ids.tolist(), q_cams.numpy(),
                          g_cams.numpy(), distance="cosine")
    _assert_close(result, expected)


# ----------------------------------------------------------------------------- the ensemble's features
def test_ensemble_features_rank_by_the_mean_cosine_similarity_of_the_members():
    qf1, gf1, q_ids, g_ids, q_cams, g_cams = _random_set(4, dim=12)
    g = torch.Generator().manual_seed(5)
    qf2, gf2 = torch.randn(300, 7, generator=g, dtype=torch.float64) * 50, torch.randn(500, 7, generator=g, dtype=torch.float64) * 50
    query, gallery = ensemble_features([qf1, qf2]), ensemble_features([gf1, gf2])
    assert query.shape == (300, 19) and torch.allclose(query.norm(dim=1), torch.full((300,), 2.0 ** 0.5, dtype=torch.float64))

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    mean_cosine = (unit(qf1) @ unit(gf1).T + unit(qf2) @ unit(gf2).T) / 2
    # |a - b|^2 = 2K - 2 sum_k cos_k for K = 2 concatenated unit vectors
    squared = torch.cdist(query, gallery) ** 2
    assert torch.allclose(squared, 4 - 4 * mean_cosine, atol=1e-10)
    # ranking the gallery by the mean cosine similarity, query by query
    expected = ranked_by((1 - mean_cosine).numpy(), q_ids, g_ids, q_cams, g_cams)
    for distance in ("euclidean", "cosine"):
        _assert_close(reid_metrics(query, gallery, q_ids, g_ids, q_cams, g_cams, distance=distance), expected)


def test_ensemble_features_errors():
    with pytest.raises(ValueError, match=r"^member_features: empty"):
        ensemble_features([])
    with pytest.raises(ValueError, match=r"^member_features\[1\]: 3 images, member 0 has 4$"):
        ensemble_features([torch.ones(4, 2), torch.ones(3, 2)])
    with pytest.raises(ValueError, match=r"^member_features\[0\]: expected a 2-D"):
        ensemble_features([torch.ones(4)])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    (dict(query_ids=_ids([1, 2])), r"^query_ids: 2 values for 3 rows of query_features$"),
    (dict(gallery_cameras=_ids([1])), r"^gallery_cameras: 1 values for 4 rows of gallery_features$"),
    (dict(gallery_features=torch.ones(4, 3)), r"^gallery_features: dimension 3 differs from query_features' 2$"),
    (dict(distance="manhattan"), r"^distance: 'manhattan' is not one of \('euclidean', 'cosine'\)$"),
    (dict(query_features=torch.ones(0, 2)), r"^query_features: empty \(no images\)$"),
    (dict(gallery_features=torch.ones(4)), r"^gallery_features: expected a 2-D \[images, dim\] tensor, got shape \(4,\)$"),
    (dict(query_ids=torch.tensor([1.0, 2.0, 3.0])), r"^query_ids: expected integer values, got torch.float32$"),
    (dict(query_features=torch.tensor([[0.0, float("nan")], [1, 1], [2, 2]])), r"^query_features: holds NaN"),
    (dict(ranks=(1, 0)), r"^ranks: expected positive integers"),
    (dict(block_size=0), r"^block_size: expected a positive integer or None"),
])
def test_bad_input_is_one_line_naming_the_argument(change, message):
    arguments = dict(query_features=torch.zeros(3, 2), gallery_features=torch.ones(4, 2), query_ids=_ids([1, 2, 3]),
                     gallery_ids=_ids([1, 2, 3, 4]), query_cameras=_ids([1, 1, 1]), gallery_cameras=_ids([2, 2, 2, 2]))
    arguments.update(change)
    with pytest.raises(ValueError, match=message) as error:
        reid_metrics(**arguments)
    assert "\n" not in str(error.value)


def test_every_query_skipped_is_an_error():
    with pytest.raises(ValueError, match=r"^query_ids: none of the 2 queries has a gallery image of its identity"):
        reid_metrics(torch.zeros(2, 2), torch.ones(3, 2), _ids([1, 2]), _ids([1, 2, 3]), _ids([1, 1]), _ids([1, 1, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    qf, gf, q_ids, g_ids, q_cams, g_cams = _random_set(6, num_query=400, num_gallery=900, dim=32)
    for distance in ("euclidean", "cosine"):
        cpu = reid_metrics(qf, gf, q_ids, g_ids, q_cams, g_cams, distance=distance)
        cuda = reid_metrics(qf.cuda(), gf.cuda(), q_ids, g_ids, q_cams, g_cams, distance=distance, block_size=50)
        _assert_close(cuda, cpu)
