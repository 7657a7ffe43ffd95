"""K/V codes on the wire: int8 and grouped low-bit quantisation, the C kernel against its torch reference bit for bit,
and the finite check of received payloads."""

import pytest
import torch

from kernels import native, quant, quant_native


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,scale_shape", [(-1, (37, 3, 1)), (0, (1, 3, 64))])
def test_int8_quantisation_error_is_within_half_a_step_of_each_scale(dtype, dim, scale_shape):
    x = (torch.randn(37, 3, 64) * torch.logspace(-3, 2, 37)[:, None, None] * torch.logspace(-1, 1, 64)).to(dtype)
    x[5] = 0  # an all-zero token stays zero
    q, scale = quant_native.quantize_int8(x, dim)
    assert q.dtype == torch.int8 and scale.shape == scale_shape
    back = quant.dequantize_int8(q, scale, torch.float32)
    assert torch.all((back - x.float()).abs() <= scale * (0.5 + 1e-5))  # half a step, up to float rounding
    assert torch.all(back[5] == 0) and q.abs().amax() == 127
    assert quant.dequantize_int8(q, scale, dtype).dtype == dtype


def _outlier_kv(tokens: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, 3, channels) with magnitudes spread over decades across tokens and channels, like real keys."""
    generator = torch.Generator().manual_seed(tokens * channels)
    x = torch.randn(tokens, 3, channels, generator=generator)
    return (x * torch.logspace(-2, 2, tokens)[:, None, None] * torch.logspace(-1, 1, channels) + 3.0).to(dtype)


CODECS = pytest.mark.parametrize("codec", [quant, quant_native], ids=["reference", "native"])


@CODECS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim,group,channels,scale_shape", [
    (0, 32, 64, (3, 3, 64)),  # keys: groups of tokens per channel, the last one partial (70 = 32 + 32 + 6)
    (-1, 32, 64, (70, 3, 2)),  # values: groups of channels per token
    (-1, 4, 6, (70, 3, 2)),  # channels that fill neither whole groups nor whole bytes
])
def test_grouped_codes_are_within_half_a_stored_step_of_every_value(codec, dtype, bits, dim, group, channels,
                                                                   scale_shape):
    x = _outlier_kv(70, channels, dtype)
    x[40] = 0.5  # a constant token: exact for values (a zero-width group), and no harm to keys
    codes, scale, low = codec.quantize_groups(x, bits, dim, group)
    assert codes.dtype == torch.uint8 and codes.shape == (70, 3, -(-channels * bits // 8))
    assert scale.shape == low.shape == scale_shape and scale.dtype == low.dtype == torch.float16
    back = codec.dequantize_groups(codes, scale, low, bits, dim, group, channels, torch.float32)
    step = scale.float().repeat_interleave(group, dim).narrow(dim, 0, x.shape[dim])
    assert torch.all((back - x.float()).abs() <= step * (0.5 + 1e-3))  # half a step, up to float rounding
    if dim == -1:
        assert torch.all(back[40] == 0.5)
    back = codec.dequantize_groups(codes, scale, low, bits, dim, group, channels, dtype)
    assert int(codes.max()) < 256 and back.dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(codec.quantize_groups(x, bits, dim, group), (codes, scale, low)))


@CODECS
@pytest.mark.parametrize("bits", [2, 4])
def test_codes_use_every_level_and_pack_low_bits_first(codec, bits):
    levels = 1 << bits
    x = torch.arange(levels, dtype=torch.float32).repeat(2).view(1, 1, 2 * levels)  # one token, one group of all
    codes, scale, low = codec.quantize_groups(x, bits, -1, 2 * levels)
    assert float(low) == 0 and float(scale) == 1
    expected = [sum(c << (bits * i) for i, c in enumerate(chunk))
                for chunk in torch.arange(levels).repeat(2).view(-1, 8 // bits).tolist()]
    assert codes.flatten().tolist() == expected


@CODECS
def test_values_beyond_float16_are_clamped_not_turned_into_infinities(codec):
    x = torch.tensor([[[-1e6, 0.0, 1e6, 1.0]]])
    codes, scale, low = codec.quantize_groups(x, 4, -1, 4)
    back = codec.dequantize_groups(codes, scale, low, 4, -1, 4, 4, torch.float32)
    assert torch.isfinite(back).all() and back[0, 0, 0] <= -65000 and back[0, 0, 2] >= 65000


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits as integers (float equality would call -0 and 0 equal)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(t.dtype,
                                                                                                          t.dtype))


def _edge_kv(tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(tokens, 2, 64): outliers over decades, float16's subnormals and its limits, signed zeros, constant runs."""
    generator = torch.Generator().manual_seed(seed)
    x = _outlier_kv(tokens, 64, torch.float32)[:, :2] * torch.logspace(-9, 5, 15)[seed % 15]
    specials = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 3e-5, 6.1e-5, 65504.0, 65519.0, 65520.0, -7e4, 1e9, 1e-40])
    picks = torch.randint(0, x.numel(), (x.numel() // 8,), generator=generator)
    x.view(-1)[picks] = specials[torch.randint(0, len(specials), picks.shape, generator=generator)]
    x[tokens // 2] = 2.5  # a constant token (values) and constant columns over it (keys)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,dim,group", [(4, 0, 64), (2, 0, 32), (4, 0, 7), (4, -1, 64), (2, -1, 32), (2, -1, 5)])
@pytest.mark.parametrize("tokens", [1, 50, 64, 65, 203])
@pytest.mark.parametrize("channels", [64, 62], ids=["whole bytes", "a part-filled byte a row"])
def test_the_native_codec_equals_the_reference_bit_for_bit(dtype, bits, dim, group, tokens, channels):
    assert quant_native.available()  # a C compiler is part of the set-up; without one the reference serves
    for seed in range(3):
        x = _edge_kv(tokens, dtype, seed + tokens)[..., :channels].contiguous()
        ours, theirs = quant_native.quantize_groups(x, bits, dim, group), quant.quantize_groups(x, bits, dim, group)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ours, theirs))  # signed zeros included
        for out in (torch.float32, torch.bfloat16, torch.float16):
            back = quant_native.dequantize_groups(*ours, bits, dim, group, channels, out)
            assert back.dtype == out
            assert torch.equal(_bits(back), _bits(quant.dequantize_groups(*theirs, bits, dim, group, channels, out)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, -1], ids=["keys", "values"])
@pytest.mark.parametrize("tokens", [1, 50, 203])
@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), float("-inf")])
def test_the_native_int8_codec_equals_the_reference_bit_for_bit(dtype, dim, tokens, special):
    """Outliers, subnormals, signed zeros and a slice too small for its scale (max / 127 underflows to 0) alike; a
    NaN or an infinity gives its slice a scale whose decode is not finite, so a receiver refuses it."""
    for seed in range(3):
        x = _edge_kv(tokens, dtype, seed + tokens)
        x[0, 0, :5] = torch.tensor([1e-44, -1e-45, 0.0, -0.0, 1e-44]).to(dtype)  # keys' column, values' row: tiny
        if dim == -1:
            x[0, 0, 5:] = 0
        if special is not None:
            x[tokens // 3, 1, 7] = special
        ours, theirs = quant_native.quantize_int8(x, dim), quant.quantize_int8(x, dim)
        assert torch.equal(ours[0], theirs[0])
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0, equal_nan=True)
        for out in (torch.float32, torch.bfloat16, torch.float16):
            back, reference = _int8_decoded(quant_native, ours, dim, out), _int8_decoded(quant, theirs, dim, out)
            assert back.dtype == out
            torch.testing.assert_close(back, reference, rtol=0, atol=0, equal_nan=True)
            finite = torch.isfinite(reference)
            assert torch.equal(_bits(back)[finite], _bits(reference)[finite])  # signed zeros included
            assert quant_native.all_finite(back) == bool(torch.isfinite(reference).all())
            if not torch.isfinite(x).all():  # the edge values' float16 overflows too
                assert not quant_native.all_finite(back)


def _int8_decoded(codec, codes: tuple[torch.Tensor, torch.Tensor], dim: int, dtype: torch.dtype) -> torch.Tensor:
    """`codes` of keys (dim 0) or values decoded by `codec`'s decoder of a layer's int8 payloads."""
    q, scale = codes
    other = quant.quantize_int8(torch.zeros(q.shape), -1 - dim)  # the payload's other half, zeros
    k, v, _ = codec.dequantize_int8_kv([(q, other[0], scale, other[1]) if dim == 0 else (other[0], q, other[1], scale)],
                                       [tuple(q.shape)], dtype)
    return k if dim == 0 else v


@CODECS
def test_int8_codes_round_half_to_even(codec):
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5]).view(1, 1, 8)  # a scale of exactly 1
    q, scale = codec.quantize_int8(x, -1)
    assert float(scale) == 1.0 and q.flatten().tolist() == [127, 0, 2, 2, 0, -2, 126, -126]


@CODECS
@pytest.mark.parametrize("bad", ["codes not int8", "scales not float32", "value scales a channel", "too few tensors",
                                 "strided codes", "a misaligned scale"])
def test_the_int8_decoder_checks_its_tensors_before_it_reads(codec, bad):
    x = torch.randn(5, 2, 8)
    (k, k_scale), (v, v_scale) = quant.quantize_int8(x, 0), quant.quantize_int8(x, -1)
    payload = {"codes not int8": (k.to(torch.int16), v, k_scale, v_scale),
               "scales not float32": (k, v, k_scale.double(), v_scale),
               "value scales a channel": (k, v, k_scale, k_scale), "too few tensors": (k, v, k_scale),
               "strided codes": (k.transpose(0, 1).contiguous().transpose(0, 1), v, k_scale, v_scale),
               "a misaligned scale": (k, v, torch.frombuffer(bytearray(4 * 16 + 1), dtype=torch.float32, offset=1,
                                                             count=16).view(1, 2, 8), v_scale)}[bad]
    with pytest.raises(ValueError, match="an int8 payload"):
        codec.dequantize_int8_kv([payload], [(5, 2, 8)], torch.float32)


def test_the_native_codec_carries_a_nan_to_a_payload_that_fails_the_finite_check():
    x = torch.randn(70, 2, 64)
    x[3, 1, 5] = float("nan")
    for dim, group in ((0, 64), (-1, 32)):
        back = quant_native.dequantize_groups(*quant_native.quantize_groups(x, 4, dim, group), 4, dim, group, 64,
                                              torch.bfloat16)
        assert not quant_native.all_finite(back) and not torch.isfinite(back[3, 1, 5])


@pytest.mark.parametrize("bad, field", [
    (lambda c, s, m: (c[:, :, :-1], s, m), "codes"),  # a byte short per row
    (lambda c, s, m: (c.to(torch.int16), s, m), "codes"),
    (lambda c, s, m: (c, s[:-1], m), "scale"),  # a group's statistics missing
    (lambda c, s, m: (c, s.float(), m), "scale"),
    (lambda c, s, m: (c, s, m.view(-1)), "minimum"),
])
def test_the_native_decoder_checks_every_shape_before_it_reads(bad, field):
    codes, scale, low = quant_native.quantize_groups(torch.randn(70, 2, 64), 4, 0, 64)
    with pytest.raises(ValueError, match=field):
        quant_native.dequantize_groups(*bad(codes, scale, low), 4, 0, 64, 64, torch.float32)


PAIRS = pytest.mark.parametrize("key_bits,key_group,value_bits,value_group", [  # k4v2, int2, int4, odd groups
    (4, 64, 2, 32), (2, 32, 2, 32), (4, 64, 4, 64), (4, 7, 4, 5)])


@PAIRS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 65])
def test_a_payload_in_one_call_equals_its_keys_and_values_through_the_reference(key_bits, key_group, value_bits,
                                                                                 value_group, dtype, tokens):
    assert quant_native.available()
    k, v = _edge_kv(tokens, dtype, tokens), _edge_kv(tokens, dtype, tokens + 1)
    shape = (tokens, 2, 64)
    layout = quant.payload_layout(tokens, 64, key_bits, key_group, value_bits, value_group)
    payload = quant_native.quantize_kv(k, v, key_bits, key_group, value_bits, value_group)
    assert [(t.dtype, t.shape) for t in payload] == [(torch.float16, (1, 2, layout.statistics)),
                                                     (torch.uint8, (1, 2, layout.codes))]
    expected = (*quant.quantize_groups(k, key_bits, 0, key_group), *quant.quantize_groups(v, value_bits, -1, value_group))
    parts = quant.split_payload(payload, layout)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(parts, expected, strict=True))
    assert sum(t.nbytes for t in payload) == sum(t.nbytes for t in expected)  # nothing but the parts
    for out in (torch.float32, torch.bfloat16, torch.float16):
        back_k, back_v, finite = quant_native.dequantize_kv([payload], [shape], key_bits, key_group, value_bits,
                                                            value_group, out)
        assert torch.equal(_bits(back_k), _bits(quant.dequantize_groups(*expected[:3], key_bits, 0, key_group, 64, out)))
        assert torch.equal(_bits(back_v), _bits(quant.dequantize_groups(*expected[3:], value_bits, -1, value_group, 64,
                                                                        out)))
        assert finite == bool(torch.isfinite(back_k).all() and torch.isfinite(back_v).all())
        with native.reference_only():  # the same calls without the kernel
            assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(
                quant_native.quantize_kv(k, v, key_bits, key_group, value_bits, value_group), payload, strict=True))
            *back, flag = quant_native.dequantize_kv([payload], [shape], key_bits, key_group, value_bits, value_group,
                                                     out)
            assert torch.equal(_bits(back[0]), _bits(back_k)) and torch.equal(_bits(back[1]), _bits(back_v))
            assert flag == finite


def test_a_payload_splits_along_its_heads_like_kv():
    """Head h's bytes are its own payload: what a tensor-parallel rank holding some heads encodes is their slice."""
    k, v = torch.randn(9, 4, 64), torch.randn(9, 4, 64)
    whole = quant_native.quantize_kv(k, v, 4, 64, 2, 32)
    for first in range(0, 4, 2):
        heads = quant_native.quantize_kv(k[:, first:first + 2], v[:, first:first + 2], 4, 64, 2, 32)
        assert all(torch.equal(_bits(a[:, first:first + 2]), _bits(b)) for a, b in zip(whole, heads, strict=True))


def test_a_heads_parts_lie_one_after_another_in_its_rows():
    """Statistics in a float16 row (key scale, key minimum, value scale, value minimum), codes in a byte row (keys,
    values); 3 channels of 2 bits: one byte a token."""
    layout = quant.payload_layout(5, 3, 2, 2, 4, 2)
    assert layout.shapes == ((5, 1), (3, 3), (3, 3), (5, 2), (5, 2), (5, 2))
    assert layout.offsets == (0, 0, 9, 5, 18, 28) and (layout.statistics, layout.codes) == (38, 15)
    k, v = torch.randn(5, 3, 3), torch.randn(5, 3, 3)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(quant_native.quantize_kv(k, v, 2, 2, 4, 2),
                                                               quant.quantize_kv(k, v, 2, 2, 4, 2), strict=True))


@CODECS
@pytest.mark.parametrize("poison", ["key scale", "value minimum", "float16 overflow"])
def test_a_payload_that_decodes_to_a_non_finite_value_is_flagged(codec, poison):
    """A NaN or infinite statistic from another party, or finite ones whose values overflow float16."""
    k, v = torch.randn(70, 2, 64), torch.randn(70, 2, 64)
    payload = quant_native.quantize_kv(k, v, 4, 64, 2, 32)
    _, k_scale, _, _, v_scale, v_low = quant.split_payload(payload, quant.payload_layout(70, 64, 4, 64, 2, 32))
    if poison == "key scale":
        k_scale[0, 1, 7] = float("nan")  # views of the payload's statistics
    elif poison == "value minimum":
        v_low[69, 0, 1] = float("-inf")
    else:
        v_scale[3, 1, 0] = 65504.0  # minimum + 3 * scale beyond float16's largest
    for out, finite in ((torch.float16, False), (torch.bfloat16, poison == "float16 overflow")):
        assert codec.dequantize_kv([payload], [(70, 2, 64)], 4, 64, 2, 32, out)[2] is finite


@CODECS
@pytest.mark.parametrize("bad", [
    lambda s, c: (s, c[..., :-1]),  # a code byte short a head
    lambda s, c: (s[..., 1:], c),  # a statistic short a head
    lambda s, c: (s[:, :1], c),  # a head's statistics missing
    lambda s, c: (s.view(torch.int16), c),
    lambda s, c: (s, c.view(torch.int8)),
    lambda s, c: (c, s),
    lambda s, c: (s, c.view(2, 1, -1)),
    lambda s, c: (s, torch.cat([c, c], dim=-1)[..., ::2]),  # the right shape, strided
    lambda s, c: (s,),
    lambda s, c: (torch.frombuffer(bytearray(s.nbytes + 1), dtype=torch.float16, offset=1,
                                   count=s.numel()).view(s.shape), c),  # at an odd address
])
def test_a_payload_decoder_checks_its_tensors_before_it_reads(codec, bad):
    payload = quant_native.quantize_kv(torch.randn(70, 2, 64), torch.randn(70, 2, 64), 4, 64, 2, 32)
    with pytest.raises(ValueError, match="a payload must be"):
        codec.dequantize_kv([bad(*payload)], [(70, 2, 64)], 4, 64, 2, 32, torch.float32)


@CODECS
def test_a_layers_payloads_decode_in_one_call_each_as_it_decodes_alone(codec):
    """Sources of different lengths (one with no token) decode one after another into one K and one V, each
    source's tokens bit for bit what it decodes to alone; one source's non-finite value flags the call, one
    source's malformed payload fails it, and shapes of different heads are refused."""
    shapes = [(65, 2, 64), (0, 2, 64), (3, 2, 64), (130, 2, 64)]
    payloads = [quant_native.quantize_kv(torch.randn(shape), torch.randn(shape), 4, 64, 2, 32) for shape in shapes]
    k, v, finite = codec.dequantize_kv(payloads, shapes, 4, 64, 2, 32, torch.bfloat16)
    assert finite and k.shape == v.shape == (198, 2, 64)
    first = 0
    for payload, shape in zip(payloads, shapes, strict=True):
        alone = quant.dequantize_kv([payload], [shape], 4, 64, 2, 32, torch.bfloat16)  # the reference, alone
        rows = slice(first, first + shape[0])
        assert torch.equal(_bits(k[rows]), _bits(alone[0])) and torch.equal(_bits(v[rows]), _bits(alone[1]))
        first += shape[0]
    for source in (0, 2, 3):  # a non-finite value from any one source
        poisoned = list(payloads)
        poisoned[source] = (payloads[source][0].clone(), payloads[source][1])
        poisoned[source][0][0, 1, 0] = float("nan")
        assert codec.dequantize_kv(poisoned, shapes, 4, 64, 2, 32, torch.bfloat16)[2] is False
    with pytest.raises(ValueError, match="a payload must be"):
        codec.dequantize_kv([*payloads[:3], (payloads[3][0], payloads[3][1][..., 1:])], shapes, 4, 64, 2, 32,
                            torch.bfloat16)
    with pytest.raises(ValueError, match="payloads of one"):
        codec.dequantize_kv(payloads[:2], [shapes[0], (0, 1, 64)], 4, 64, 2, 32, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [None, float("inf"), float("-inf"), float("nan")])
def test_the_finite_check_equals_torchs(dtype, special):
    x = torch.randn(33, 2, 64).to(dtype)
    x[0, 0, 0] = torch.finfo(dtype).max  # the largest finite value passes
    if special is not None:
        x[32, 1, 63] = special
    assert quant_native.all_finite(x) == bool(torch.isfinite(x).all()) == (special is None)
    assert quant_native.all_finite(x[:, :, ::2]) == bool(torch.isfinite(x[:, :, ::2]).all())  # strided views


def test_without_a_compiler_the_reference_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native._built.__wrapped__("quant") is None and not list(tmp_path.rglob("*.so"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails: no library, nothing half-written left
    assert native._built.__wrapped__("quant") is None and not list(tmp_path.rglob("*.so*"))
    monkeypatch.delenv("CC")
    assert native._built.__wrapped__("quant") is not None and len(list(tmp_path.rglob("quant-*.so"))) == 1
    with native.reference_only():  # switched off: the reference serves
        assert not quant_native.available() and quant_native.all_finite(torch.ones(3))
    assert quant_native.available()
