"""FEARec's per-layer frequency bands (spec fearec.md §3.2) and delay count k (§3.3)."""

from __future__ import annotations

import pytest

from fearec_dist.models.fea_attention import layer_band, topk_count

# spec §3.2's worked table: (L, n, g) -> [left, right) per layer
BAND_TABLE = [
    (50, 2, 0.6, [(10, 26), (0, 16)]),
    (50, 2, 1.0, [(0, 26), (0, 26)]),
    (50, 2, 0.8, [(5, 26), (0, 21)]),
    (50, 2, 0.5, [(13, 26), (0, 13)]),
    (50, 3, 0.6, [(10, 26), (5, 21), (0, 16)]),
    (50, 3, 0.3, [(17, 26), (8, 17), (0, 8)]),
    (50, 4, 0.6, [(10, 26), (7, 23), (4, 20), (1, 17)]),
    (50, 4, 0.25, [(19, 26), (13, 19), (6, 13), (0, 6)]),
    (200, 2, 0.6, [(40, 101), (0, 61)]),
]


@pytest.mark.parametrize(("L", "n", "g", "bands"), BAND_TABLE)
def test_band_table(L: int, n: int, g: float, bands: list[tuple[int, int]]) -> None:
    got = [layer_band(L, n, g, layer) for layer in range(n)]
    assert [(b.start, b.stop) for b in got] == bands


def test_one_layer_takes_every_bin() -> None:
    # §10.4: the reference divides by n - 1 = 0; slide = 0 here, and w = 1/n = 1 gives [0, F)
    assert layer_band(50, 1, 1.0, 0) == range(0, 26)
    assert layer_band(50, 1, 0.6, 0) == range(0, 26)


def test_odd_length_bins() -> None:
    # L = 49: F = 25; g = 0.6 -> slide = floor(25 * 0.4) = 10
    assert [layer_band(49, 2, 0.6, i) for i in range(2)] == [range(10, 25), range(0, 15)]


@pytest.mark.parametrize(
    ("factor", "L", "k"),
    [(1, 50, 3), (3, 50, 11), (5, 50, 19), (10, 50, 39), (1, 2, 0), (5, 10, 11)],
)
def test_k_table(factor: float, L: int, k: int) -> None:
    assert topk_count(factor, L) == k
