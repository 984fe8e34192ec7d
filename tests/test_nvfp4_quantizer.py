"""Golden tests for the NVFP4 quantizer and the random Hadamard transform.

The fast quantizer (`nvfp4.quantize`) is checked bit for bit against the scalar reference
(`nvfp4_reference.quantize_reference`, numpy float32 scalars, its own E4M3/E2M1 rounding) and against hand-computed
values at the format's edge cases.
"""

import math

import numpy as np
import pytest
import torch

from megatron_ext.precision import nvfp4
from megatron_ext.precision.hadamard import apply_rht, random_signs, rht_matrix, sylvester_hadamard
from megatron_ext.precision.nvfp4_reference import E4M3_POSITIVE, dequantize_reference, quantize_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# With a tensor amax of 2688 the global encode scale is exactly 1, and a tile whose max is 6 gets block scale 1, so
# inside that tile v == x: the test controls exactly what the E2M1 rounding sees.
UNIT_AMAX = 2688.0


def _unit_tensor(rows: int = 1) -> torch.Tensor:
    """[rows, 32]: tile 0 free for the test (put 6 in it for scale 1), tile 1 holds the tensor amax 2688."""
    x = torch.zeros(rows, 32)
    x[:, 16] = UNIT_AMAX
    return x


def _assert_matches_reference(x: torch.Tensor, tile, rounding="rne", seed=0):
    gen = torch.Generator().manual_seed(seed) if rounding == "stochastic" else None
    q = nvfp4.quantize(x, tile, rounding, gen)
    uniforms = None
    if rounding == "stochastic":
        uniforms = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).numpy()
    codes, scale_bytes, amax = quantize_reference(x.numpy(), tile, uniforms)
    np.testing.assert_array_equal(q.element_codes().numpy(), codes)
    np.testing.assert_array_equal(q.scales.view(torch.uint8).numpy(), scale_bytes)
    assert q.amax.dtype == torch.float32 and q.amax.item() == float(amax)
    deq = dequantize_reference(codes, scale_bytes, amax, tile)
    np.testing.assert_array_equal(q.dequantize().numpy().view(np.uint32), deq.view(np.uint32))
    return q


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
def test_bit_identical_to_scalar_reference_on_random_tensors(tile, rounding):
    torch.manual_seed(1)
    for scale in (1.0, 3e-3, 7e4, 1e-35):
        x = torch.randn(32, 48) * scale
        x[3, :16] = 0.0  # a zero block
        x[5, 7] = -0.0
        x[:, 40] *= 50.0  # outlier column: small blocks get subnormal / zero scales
        _assert_matches_reference(x, tile, rounding, seed=int(scale * 1e3) % 1000)


def test_heavy_tailed_and_bf16_inputs_match_reference():
    torch.manual_seed(2)
    x = (torch.randn(16, 64) ** 3 * torch.exp(torch.randn(16, 64) * 3)).to(torch.bfloat16)
    q = _assert_matches_reference(x.float(), (1, 16))
    q_bf16 = nvfp4.quantize(x)
    assert torch.equal(q_bf16.codes, q.codes)
    assert torch.equal(q_bf16.scales.view(torch.uint8), q.scales.view(torch.uint8))


def test_ties_at_every_e2m1_midpoint_go_to_the_even_code():
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0, 2, 2, 4, 4, 6, 6]  # codes of 0, 1, 1, 2, 2, 4, 4: the even neighbour
    x = _unit_tensor()
    x[0, 0] = 6.0
    x[0, 1:8] = torch.tensor(mids)
    x[0, 8:15] = -torch.tensor(mids)
    q = nvfp4.quantize(x)
    assert q.scales[0, 0].float().item() == 1.0
    codes = q.element_codes()[0]
    assert codes[0].item() == 7
    assert codes[1:8].tolist() == want
    assert codes[8:15].tolist() == [c | 8 for c in want]
    _assert_matches_reference(x, (1, 16))
    # one float either side of each midpoint rounds to the nearer neighbour
    for m, lo_code in zip(mids, [0, 1, 2, 3, 4, 5, 6]):
        t = torch.tensor(m)
        below, above = torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(10.0))
        x[0, 1], x[0, 2] = below, above
        c = nvfp4.quantize(x).element_codes()[0]
        assert (c[1].item(), c[2].item()) == (lo_code, lo_code + 1), m


def test_small_negative_values_get_negative_zero_code_but_minus_zero_gets_code_0():
    x = _unit_tensor()
    x[0, 0] = 6.0
    x[0, 1], x[0, 2], x[0, 3] = -0.0, -0.1, -0.25
    codes = nvfp4.quantize(x).element_codes()[0]
    assert codes[1:4].tolist() == [0, 8, 8]  # TE: [-0.25, 0) -> code 8 (-0.0); -0.0 itself -> code 0
    assert nvfp4.quantize(x).dequantize()[0, 1:4].abs().max().item() == 0.0


def test_packing_order_low_nibble_is_the_even_element():
    x = _unit_tensor()
    x[0, 0], x[0, 1] = 6.0, -0.5  # codes 7 and 9
    x[0, 2], x[0, 3] = 0.0, 3.0  # codes 0 and 5
    q = nvfp4.quantize(x)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (1, 16)
    assert q.codes[0, 0].item() == 0x97
    assert q.codes[0, 1].item() == 0x50


def test_subnormal_e4m3_scales_are_kept_not_clamped():
    # scale = bmax / 6 with g_enc = 1: bmax = 6 * k * 2^-9 gives the subnormal E4M3 scale with mantissa k
    x = _unit_tensor(rows=7)
    for k in range(1, 8):
        x[k - 1, 0] = 6.0 * k * 2.0 ** -9
        x[k - 1, 1] = 3.0 * k * 2.0 ** -9  # half the block max -> grid value 3
    q = nvfp4.quantize(x)
    assert q.scales[:, 0].view(torch.uint8).tolist() == list(range(1, 8))
    assert q.scales[:, 0].float().tolist() == [k * 2.0 ** -9 for k in range(1, 8)]
    assert q.element_codes()[:, 0].tolist() == [7] * 7
    assert q.element_codes()[:, 1].tolist() == [5] * 7
    torch.testing.assert_close(q.dequantize()[:, :2], x[:, :2], rtol=0, atol=0)
    _assert_matches_reference(x, (1, 16))


def test_scale_underflow_to_zero_saturates_codes_and_dequantizes_to_zero():
    x = _unit_tensor()
    x[0, 0], x[0, 1], x[0, 2] = 1e-4, -3e-5, 0.0  # bmax/6 far below the smallest E4M3 subnormal 2^-9
    q = nvfp4.quantize(x)
    assert q.scales[0, 0].float().item() == 0.0
    assert q.element_codes()[0, :3].tolist() == [7, 15, 0]
    assert q.dequantize()[0, :16].abs().max().item() == 0.0
    _assert_matches_reference(x, (1, 16))


def test_all_zero_tensor_and_zero_blocks():
    for tile in ((1, 16), (16, 16)):
        q = nvfp4.quantize(torch.zeros(32, 32), tile)
        assert q.amax.item() == 0.0
        assert int(q.codes.max()) == 0 and int(q.scales.view(torch.uint8).max()) == 0  # +0.0 scales
        assert torch.equal(q.dequantize(), torch.zeros(32, 32))
        q = nvfp4.quantize(-torch.zeros(16, 32), tile)
        assert int(q.codes.max()) == 0 and int(q.scales.view(torch.uint8).max()) == 0
    x = torch.randn(16, 32)
    x[:, :16] = 0.0
    q = nvfp4.quantize(x)
    assert int(q.codes[:, :8].max()) == 0 and q.scales[:, 0].float().abs().max().item() == 0.0


def test_2d_tiles_share_one_scale_per_16x16_tile():
    torch.manual_seed(3)
    x = torch.randn(32, 48)
    x[17, 20] = 9.0  # dominates tile (1, 1) only
    q = _assert_matches_reference(x, (16, 16))
    assert q.scales.shape == (2, 3)
    bmax = x.abs().reshape(2, 16, 3, 16).amax(dim=(1, 3))
    g_enc = torch.tensor(2688.0) / x.abs().max()
    want = torch.clamp(bmax * (g_enc * torch.tensor(1 / 6)), -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.scales.view(torch.uint8), want.view(torch.uint8))
    assert q.scales[1, 1].float().item() == 448.0  # the tile holding the tensor amax gets the max scale
    # the same data with 1x16 tiles has 32x more scales
    assert nvfp4.quantize(x, (1, 16)).scales.shape == (32, 3)


def test_dequantize_is_close_to_input_and_honours_dtype():
    torch.manual_seed(4)
    x = torch.randn(64, 64)
    q = nvfp4.quantize(x)
    err = (q.dequantize() - x).norm() / x.norm()
    assert err < 0.12  # E2M1 with per-16 E4M3 scales on Gaussian data: ~0.08-0.1 relative RMS error
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    # grid value x block scale is exact in bf16 (that is what lets CPU/H100 run the GEMM in bf16)
    unscaled = q.dequantize_unscaled(torch.float32)
    assert torch.equal(unscaled.to(torch.bfloat16).float(), unscaled)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_input_raise_a_clear_error(bad):
    x = torch.randn(16, 16)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4.quantize(x)


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match="multiple"):
        nvfp4.quantize(torch.randn(4, 20))
    with pytest.raises(ValueError, match="multiple"):
        nvfp4.quantize(torch.randn(8, 32), tile=(16, 16))
    with pytest.raises(ValueError, match="rounding"):
        nvfp4.quantize(torch.randn(16, 16), rounding="nearest")
    with pytest.raises(ValueError, match="2-D"):
        nvfp4.quantize(torch.randn(2, 16, 16))


def test_stochastic_rounding_is_unbiased():
    # values strictly between grid points (in the unit setup v == x); 8192 independent draws per value
    vals = torch.tensor([0.1, 0.3, 0.6, 1.1, 1.3, 1.9, 2.2, 2.7, 3.3, 3.9, 4.5, 5.5, -0.7, -1.6, -2.9, -4.8])
    n = 8192
    x = torch.zeros(n, 32)
    x[:, :16] = vals
    x[:, 16] = UNIT_AMAX
    x[:, 17] = 6.0
    gen = torch.Generator().manual_seed(1234)
    q = nvfp4.quantize(x, rounding="stochastic", generator=gen)
    deq = q.dequantize()[:, :16]
    # x[:, :16] max is 5.5, not 6: scale = 5.5/6 -> E4M3; compare to what the grid actually sees
    s = q.scales[0, 0].float()
    mean = deq.mean(dim=0)
    # per-value std of one draw: (hi - lo) * sqrt(p (1 - p)) <= (hi - lo) / 2 (in units of s); 5 sigma bound
    bound = 5 * 2.0 * float(s) / 2 / math.sqrt(n)
    assert (mean - vals).abs().max().item() < bound
    # every draw lands on one of the two neighbours, and RNE on the same data is biased beyond that bound
    rne = nvfp4.quantize(x).dequantize()[0, :16]
    assert (rne - vals).abs().max().item() > 4 * bound
    # same seed, same draws
    again = nvfp4.quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(1234))
    assert torch.equal(again.codes, q.codes)


def test_rht_matrix_is_orthogonal_and_seeded():
    h = sylvester_hadamard(16)
    assert torch.equal(h @ h.t(), 16 * torch.eye(16))
    for signs in (None, random_signs(7)):
        t = rht_matrix(signs)
        assert torch.equal(t @ t.t(), torch.eye(16))  # entries +-1/4: exact in float32
    assert torch.equal(random_signs(7), random_signs(7))
    assert not torch.equal(random_signs(7), random_signs(8))
    assert set(random_signs(7).tolist()) <= {-1.0, 1.0}


def test_rht_leaves_the_gemm_unchanged_and_spreads_outliers():
    torch.manual_seed(5)
    t = rht_matrix(random_signs(11))
    a, b = torch.randn(24, 64, dtype=torch.float64), torch.randn(40, 64, dtype=torch.float64)
    a[3, 5] = 80.0
    ra, rb = apply_rht(a, t.double(), round_to_bf16=False), apply_rht(b, t.double(), round_to_bf16=False)
    torch.testing.assert_close(ra @ rb.t(), a @ b.t(), rtol=1e-12, atol=1e-12)
    assert ra.abs().max() < a.abs().max() / 3  # the outlier is spread over its 16-block
    # the default path rounds the transform output to bf16 (as TE does before taking the amax)
    r16 = apply_rht(a.float(), t)
    assert torch.equal(r16.to(torch.bfloat16).float(), r16)


def test_reference_e4m3_table_agrees_with_torch_cast():
    # the reference's own E4M3 rounding must agree with torch's saturating RNE cast on all ties and in-betweens
    vals = torch.tensor(E4M3_POSITIVE, dtype=torch.float64)
    mids = ((vals[1:] + vals[:-1]) / 2).float()
    probes = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e4)),
                        torch.tensor([448.0, 460.0, 1e6])])
    from megatron_ext.precision.nvfp4_reference import e4m3_round
    ours = [e4m3_round(np.float32(p))[0] for p in probes.tolist()]
    theirs = torch.clamp(probes, max=448).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    assert ours == theirs


def _tie_rich_tensor() -> torch.Tensor:
    """Random blocks plus one unit-scale block holding every E2M1 midpoint, its float neighbours, -0.0 and > 6."""
    torch.manual_seed(3)
    x = torch.randn(48, 32) * torch.exp(torch.randn(48, 1) * 2)
    x[0] = _unit_tensor()[0]
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x[0, :15] = torch.cat([torch.tensor([6.0]), mids, -torch.nextafter(mids, torch.tensor(10.0))])
    x[1, :16] = torch.cat([torch.nextafter(mids, torch.tensor(0.0)), -mids, torch.tensor([-0.0, 7.5])])
    x[1, 16:] = _unit_tensor()[0, 16:]
    return x


@pytest.mark.parametrize("by_comparisons", [False, True])
def test_both_rne_paths_of_quantize_many_match_the_reference(by_comparisons):
    # bucketize (training path: fewest ops) and uint8 comparison passes (standalone CPU path: fastest)
    x = _tie_rich_tensor()
    codes, scale_bytes, _ = quantize_reference(x.numpy(), (1, 16))
    q = nvfp4.quantize_many([x], [1], "rne", want_values=[True], want_codes=[True], values_dtype=torch.float32,
                            rne_by_comparisons=by_comparisons)
    got = nvfp4.NVFP4Tensor(q.codes[0], q.scales[0], q.amax[0], tuple(x.shape), (1, 16))
    np.testing.assert_array_equal(got.element_codes().numpy(), codes)
    np.testing.assert_array_equal(q.scales[0].view(torch.uint8).numpy(), scale_bytes)
    assert torch.equal(q.values[0], got.dequantize_unscaled())


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("rounding", ["rne", "stochastic"])
def test_cpu_row_chunks_give_the_reference_bits(monkeypatch, tile, rounding):
    # chunks of 32 rows over 48: two chunks, the last one short (and a 16x16 tile never split)
    monkeypatch.setattr(nvfp4, "CPU_CHUNK_ELEMENTS", 32 * 32)
    _assert_matches_reference(_tie_rich_tensor(), tile, rounding, seed=4)
