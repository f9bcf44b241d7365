"""Quantisation and bit packing."""
import pytest
import torch

from twa_ray.core.quant import BITS, dequantize, pack_bits, packed_bytes, quantize, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 7, 8, 9, 63, 130])
def test_pack_unpack_round_trip_and_exact_size(bits, m):
    gen = torch.Generator().manual_seed(bits * 1000 + m)
    codes = torch.randint(0, 1 << bits, (3, m), generator=gen).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, (m * bits + 7) // 8) == (3, packed_bytes(m, bits))
    assert torch.equal(unpack_bits(packed, bits, m), codes)


def test_packing_layout_is_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [[1 | (2 << 2) | (3 << 4)]]
    assert pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1]], dtype=torch.uint8), 1).tolist() == [[0b10001101, 1]]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dequantised_within_half_step(bits):
    u = torch.randn(4, 257, generator=torch.Generator().manual_seed(bits))
    codes, scale, offset = quantize(u, bits)
    assert int(codes.max()) <= (1 << bits) - 1
    err = (dequantize(codes, scale, offset) - u).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)
    # the extremes are exact
    assert torch.allclose(dequantize(codes, scale, offset).amin(1), u.amin(1))
    assert torch.allclose(dequantize(codes, scale, offset).amax(1), u.amax(1), atol=1e-6)


def test_constant_and_zero_rows_are_exact_and_finite():
    u = torch.stack([torch.zeros(10), torch.full((10,), 0.25)])
    for bits in (1, 2, 4, 8):
        codes, scale, offset = quantize(u, bits)
        deq = dequantize(codes, scale, offset)
        assert torch.isfinite(deq).all()
        assert torch.equal(deq, u)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_rows_of_no_entries_quantise_and_pack(bits):
    """The block of a zero-size parameter: no amin/amax to take, nothing to pack."""
    codes, scale, offset = quantize(torch.zeros(3, 0), bits)
    assert codes.shape == (3, 0) and codes.dtype == torch.uint8
    assert torch.equal(scale, torch.zeros(3)) and torch.equal(offset, torch.zeros(3))
    assert pack_bits(codes, bits).shape == (3, 0) and packed_bytes(0, bits) == 0
    assert dequantize(codes, scale, offset).shape == (3, 0)


def test_bad_bits_named():
    with pytest.raises(ValueError, match="bits=3"):
        quantize(torch.zeros(1, 4), 3)
    assert 32 in BITS
