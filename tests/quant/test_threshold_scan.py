"""quant.base.threshold_scan and take: the one-pass-per-bound scan both PA and ABC run on."""

from __future__ import annotations

import pytest
import torch

from binarize_cli.quant import base
from binarize_cli.quant.base import take, threshold_scan

# more than one CPU chunk, and a last chunk that is not full
SIZES = [1, 1000, 2 * base._SCAN_CHUNK + 17]


def reference(x: torch.Tensor, bounds: torch.Tensor, stats: list[int]):
    flat = x.reshape(-1).double()
    index = torch.bucketize(x.reshape(-1), bounds.to(x.dtype), right=True)
    cuts = bounds[stats].to(x.dtype)
    piece = torch.bucketize(x.reshape(-1), cuts, right=True)
    counts = torch.bincount(piece, minlength=len(stats) + 1).double()
    sums = torch.zeros(len(stats) + 1, dtype=torch.float64).index_add_(0, piece, flat)
    return index, counts, sums


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("functional", [False, True])
def test_scan_matches_bucketize_and_per_piece_sums(monkeypatch, n, dtype, functional):
    if functional:  # the export / torch.compile path
        monkeypatch.setattr(base, "exporting", lambda: True)
    torch.manual_seed(n)
    x = torch.randn(n, dtype=dtype)
    x[: min(n, 3)] = torch.tensor([0.5, -0.25, 1.0], dtype=dtype)[: min(n, 3)]  # on bounds
    bounds = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0, 1.5])
    stats = [0, 2, 3, 5]
    scan = threshold_scan(x, bounds, stats=stats)
    index, counts, sums = reference(x, bounds, stats)
    assert torch.equal(scan.index.long(), index)
    assert torch.equal(scan.int_index().long(), index)
    assert torch.equal(scan.counts, counts)
    scale = float(x.abs().sum()) * torch.finfo(dtype).eps  # both sides sum in another order
    assert torch.allclose(scan.sums, sums, rtol=0, atol=64 * scale + 1e-12)


def test_scan_of_other_values_nan_and_half_precision():
    x = torch.tensor([float("nan"), -2.0, 0.0, 3.0])
    values = torch.tensor([10.0, 20.0, 30.0, 40.0])
    scan = threshold_scan(x, torch.tensor([-1.0, 1.0]), stats=(0, 1), values=values)
    assert scan.index.tolist() == [0.0, 0.0, 1.0, 2.0]  # NaN counts no bound
    assert scan.counts.tolist() == [2.0, 1.0, 1.0]
    assert scan.sums.tolist() == [30.0, 30.0, 40.0]
    # a half input is compared in its own precision: 1.0001 rounds to 1.0 in float16
    h = torch.tensor([1.0, 0.999], dtype=torch.float16)
    assert threshold_scan(h, torch.tensor([1.0001])).index.tolist() == [1.0, 0.0]
    assert threshold_scan(x, torch.tensor([])).index.tolist() == [0.0] * 4


def test_take_results_survive_the_reused_buffers():
    table = torch.tensor([1.0, 2.0, 3.0])
    first = take(table, torch.tensor([0, 2], dtype=torch.uint8), torch.tensor([1.0, 10.0]))
    second = take(table, torch.tensor([1, 1], dtype=torch.uint8), torch.tensor([5.0, 5.0]))
    plain = take(table, torch.tensor([2, 0, 1], dtype=torch.int32))
    assert first.tolist() == [1.0, 30.0] and second.tolist() == [10.0, 10.0]
    assert plain.tolist() == [3.0, 1.0, 2.0]
    scan_a = threshold_scan(torch.tensor([0.0, 2.0]), torch.tensor([1.0])).int_index().clone()
    assert scan_a.tolist() == [0, 1]
