"""LSH grouping, bounded-memory passes, connected components and keep policies (pure functions)."""

import numpy as np
import pytest

from data_pipeline.dedup.lsh import (BYTES_PER_DOC_IN_PASS, band_edges, choose_keepers, cluster_size_histogram, connected_components,
                                     group_edges, passes_for_budget)


def _reference_components(n_nodes: int, edges) -> dict[int, int]:
    parent = list(range(n_nodes))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    touched = {int(x) for e in edges for x in e}
    return {x: min(y for y in touched if find(y) == find(x)) for x in touched}


def test_group_edges_star_from_smallest_index():
    keys = np.array([5, 3, 5, 9, 3, 5], dtype=np.uint64)
    gidx = np.array([10, 11, 12, 13, 14, 15], dtype=np.int64)
    edges = {tuple(e) for e in group_edges(keys, gidx).tolist()}
    assert edges == {(10, 12), (10, 15), (11, 14)}
    assert len(group_edges(np.array([1, 2], np.uint64), np.array([0, 1]))) == 0


def test_band_edges_with_small_budget_equals_one_pass():
    rng = np.random.default_rng(0)
    parts = []
    offset = 0
    for n in (500, 0, 300, 700):
        keys = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
        keys[rng.random(n) < 0.3] = rng.integers(0, 2**64 - 1, 40, dtype=np.uint64)[rng.integers(0, 40)]
        dup = rng.random(n) < 0.2
        keys[dup] = rng.choice(keys, dup.sum()) if n else keys[dup]
        parts.append((keys, offset + np.arange(n, dtype=np.int64)))
        offset += n
    one, p1 = band_edges(lambda: iter(parts), offset, memory_bytes=1 << 30)
    budget = offset * BYTES_PER_DOC_IN_PASS // 8
    many, p8 = band_edges(lambda: iter(parts), offset, memory_bytes=budget, reserved_bytes=0)
    assert p1 == 1 and p8 == 8 == passes_for_budget(offset, budget, reserved_bytes=0)
    assert passes_for_budget(10**6, 32 << 20) == 3 and passes_for_budget(10**6, 8 << 20) == 12
    assert len(one) > 100
    assert sorted(map(tuple, one.tolist())) == sorted(map(tuple, many.tolist()))


def test_connected_components_match_reference_union_find():
    rng = np.random.default_rng(1)
    edges = rng.integers(0, 400, (300, 2))
    edges = np.concatenate([edges, [[1000, 1001], [1001, 1002], [1003, 1002]]])  # a chain
    nodes, root = connected_components(edges)
    ref = _reference_components(1004, edges.tolist())
    assert dict(zip(nodes.tolist(), root.tolist())) == ref
    assert ref[1003] == 1000


def test_keep_policies():
    # clusters {0,1,2} and {3,4}; dates decide, then snapshot, then the id tie-breaker
    root = np.array([0, 0, 0, 3, 3])
    date = np.array([100, 300, 200, 50, 50])
    snap = np.array([0, 1, 1, 0, 1])
    tie = np.array([5, 6, 7, 8, 9], dtype=np.uint64)
    assert choose_keepers(root, date, snap, tie, "newest").tolist() == [1, 1, 1, 4, 4]
    assert choose_keepers(root, date, snap, tie, "oldest").tolist() == [0, 0, 0, 3, 3]
    same = np.zeros(3, np.int64)
    assert choose_keepers(same, same, same, np.array([3, 9, 1], np.uint64), "newest").tolist() == [1, 1, 1]
    assert choose_keepers(same, same, same, np.array([3, 9, 1], np.uint64), "oldest").tolist() == [2, 2, 2]
    with pytest.raises(ValueError):
        choose_keepers(root, date, snap, tie, "random")


def test_cluster_size_histogram():
    assert cluster_size_histogram(np.array([0, 0, 0, 3, 3, 7, 7])) == {2: 2, 3: 1}
    assert cluster_size_histogram(np.zeros(0, np.int64)) == {}


def test_connected_components_streamed_per_band_equals_all_at_once():
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 500, (int(n), 2)) for n in (50, 0, 120, 80)]
    nodes_a, root_a = connected_components(np.concatenate(parts))
    nodes_b, root_b = connected_components(iter(parts), num_nodes=500)
    assert np.array_equal(nodes_a, nodes_b) and np.array_equal(root_a, root_b)
    with pytest.raises(ValueError):
        connected_components(iter(parts))


def test_keepers_prefer_eligible_members():
    root = np.zeros(3, np.int64)
    date = np.array([1, 3, 2])
    zeros = np.zeros(3, np.int64)
    tie = np.arange(3, dtype=np.uint64)
    eligible = np.array([True, False, True])
    assert choose_keepers(root, date, zeros, tie, "newest", eligible).tolist() == [2, 2, 2]
    assert choose_keepers(root, date, zeros, tie, "oldest", ~eligible).tolist() == [1, 1, 1]
