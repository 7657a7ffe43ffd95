import pytest
import torch
from transformers import Qwen2Config

from fedattn_vllm.config import FedAttnConfig, KVWire
from fedattn_vllm.kv_wire import encode_kv, payload_bytes
from fedattn_vllm.cost import ModelShape, centralised_prefill_flops, participant_costs

QWEN_05B = Qwen2Config(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936,
)


def test_shape_from_a_hf_config():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.bytes_per_element) == (24, 2, 64, 2)
    assert shape.kv_bytes_per_token_layer == 512


def test_spec_example_three_kib_per_token_at_h4():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)
    plan = FedAttnConfig(sync_interval=4).resolve(24, 2)
    costs = participant_costs(shape, plan, [100, 10])
    assert costs[0].upload_bytes == 100 * 3 * 1024  # 6 sync layers x 512 B per token
    assert costs[1].upload_bytes == 10 * 3 * 1024
    assert costs[0].download_bytes == 0  # participant 1 never waits for anyone
    assert costs[1].download_bytes == 100 * 3 * 1024  # the generator needs everyone else's
    assert costs[0].kv_cache_bytes == 24 * 100 * 512


def test_generators_download_from_every_other_participant():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.float32)  # 1 KiB per token and layer
    plan = FedAttnConfig(sync_interval=12, generators=[0]).resolve(24, 3)  # layers 0 and 12
    costs = participant_costs(shape, plan, [1, 2, 4])
    assert [c.upload_bytes for c in costs] == [2048, 4096, 8192]
    assert [c.download_bytes for c in costs] == [4096 + 8192, 2048, 2048 + 4096]


def test_sparse_sharing_and_publisher_interval_bytes():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)
    plan = FedAttnConfig(sync_interval=4, kv_share_ratio=[0.5, 1.0], publisher_sync_interval=2).resolve(24, 2)
    costs = participant_costs(shape, plan, [10, 10])
    assert costs[0].upload_bytes == 6 * 5 * 512
    assert costs[1].upload_bytes == 12 * 10 * 512


def test_flops_by_hand():
    shape = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1,
                       head_dim=2, bytes_per_element=2)
    # 2*Tq*d^2*(2+2r) + 4*Tq*Tkv*d + 6*Tq*d*dff with d=4, r=0.5, dff=8
    assert shape.layer_flops(3, 5) == 2 * 3 * 16 * 3 + 4 * 3 * 5 * 4 + 6 * 3 * 4 * 8
    plan = FedAttnConfig(sync_interval=2).resolve(2, 2)  # layer 0 syncs, layer 1 is local
    costs = participant_costs(shape, plan, [3, 2])
    assert costs[0].prefill_flops == shape.layer_flops(3, 5) + shape.layer_flops(3, 3)
    assert costs[1].prefill_flops == shape.layer_flops(2, 5) + shape.layer_flops(2, 2)
    assert centralised_prefill_flops(shape, 5) == 2 * shape.layer_flops(5, 5)


def test_sparse_local_computation_shortens_the_own_keys_only():
    shape = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1,
                       head_dim=2, bytes_per_element=2)
    dense = participant_costs(shape, FedAttnConfig(sync_interval=2).resolve(2, 2), [10, 4], prefix_len=3)
    sparse = participant_costs(shape, FedAttnConfig(sync_interval=2, local_keep_ratio=0.3).resolve(2, 2), [10, 4],
                               prefix_len=3)
    # participant 0: 13 queries over the prefix, 3 of its 10 tokens and, at sync layer 0, participant 1's 4
    assert sparse[0].prefill_flops == shape.layer_flops(13, 3 + 3 + 4) + shape.layer_flops(13, 3 + 3)
    assert sparse[1].prefill_flops == shape.layer_flops(7, 3 + 2 + 10) + shape.layer_flops(7, 3 + 2)  # ceil(1.2)
    assert [c.upload_bytes for c in sparse] == [c.upload_bytes for c in dense]  # it shares what it shared


def test_int8_wire_bytes_are_values_plus_float32_key_channel_and_value_token_scales():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.float32)
    plan = FedAttnConfig(sync_interval=4, kv_wire="int8").resolve(24, 2)
    costs = participant_costs(shape, plan, [100, 10])
    layer = 2 * (2 * 100 * 64 + 4 * 64 + 4 * 100)  # 2 KV heads: int8 K and V, a scale per key channel, per value token
    assert costs[0].upload_bytes == 6 * layer and costs[1].download_bytes == 6 * layer
    assert costs[1].kv_cache_bytes == 24 * 10 * 1024 + 6 * 100 * 1024  # foreign K/V held decoded (fp32)


@pytest.mark.parametrize("wire", list(KVWire))
@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 64, 65, 300])
def test_payload_bytes_are_what_the_encoder_produces(wire, tokens):
    kv = (torch.randn(tokens, 2, 64).to(torch.bfloat16), torch.randn(tokens, 2, 64).to(torch.bfloat16))
    assert payload_bytes(wire, tokens, 2, 64, 2) == sum(t.nbytes for t in encode_kv(kv, wire))


def test_low_bit_wire_bytes_are_packed_codes_plus_float16_scales_and_minima_per_group():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)
    # int4: 100 tokens x 2 heads x 64 channels, two codes a byte; keys grouped over 64 tokens, values over 64 channels
    int4 = 2 * (2 * 100 * 32 + 4 * (2 * 64 + 100 * 1))
    # int2: four codes a byte; keys grouped over 32 tokens, values over 32 channels
    int2 = 2 * (2 * 100 * 16 + 4 * (4 * 64 + 100 * 2))
    assert shape.shared_layer_bytes(100, KVWire.INT4) == int4 and shape.shared_layer_bytes(100, KVWire.INT2) == int2
    native = shape.shared_layer_bytes(100, KVWire.NATIVE)
    print(f"\nbf16 / int4 = {native / int4:.2f}, bf16 / int2 = {native / int2:.2f} at 100 tokens")
    assert 3 < native / int4 < 4 < native / int2 < 8


def test_generator_interval_bytes_only_the_generators_read_the_extra_layers():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)  # 512 B per token and layer
    plan = FedAttnConfig(sync_interval=4, generator_sync_interval=1).resolve(24, 3)  # generator: the last
    costs = participant_costs(shape, plan, [10, 20, 5])
    assert [c.upload_bytes for c in costs] == [24 * 10 * 512, 24 * 20 * 512, 6 * 5 * 512]
    assert costs[1].download_bytes == 6 * 10 * 512  # a non-generator reads only at S
    assert costs[2].download_bytes == 24 * 30 * 512
    # every layer of the generator attends over all 35 prompt tokens, as in centralised inference
    assert costs[2].prefill_flops == 24 * shape.layer_flops(5, 35)


def test_a_public_prefix_costs_compute_and_memory_but_no_bytes():
    shape = ModelShape.from_hf_config(QWEN_05B, torch.bfloat16)
    plan = FedAttnConfig(sync_interval=1).resolve(24, 2)
    without, with_prefix = participant_costs(shape, plan, [10, 5]), participant_costs(shape, plan, [10, 5], 7)
    assert [c.upload_bytes for c in with_prefix] == [c.upload_bytes for c in without]
    assert [c.download_bytes for c in with_prefix] == [c.download_bytes for c in without]
    assert with_prefix[1].prefill_flops == 24 * shape.layer_flops(12, 22)
    assert with_prefix[0].kv_cache_bytes == without[0].kv_cache_bytes + 24 * 7 * 512
