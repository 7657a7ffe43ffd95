"""GPU readiness (issue 20): FedAttn's torch math and the reference oracle on an accelerator, against the CPU.

    python scripts/gpu_check.py                  # on cuda (refuses without one); a few minutes
    python scripts/gpu_check.py --device cpu --quick   # the same checks on the CPU, small (what CI runs)

Needs only torch, transformers and this repository (no vLLM, no model weights: the tiny models are
built in memory), so it runs where vLLM cannot be installed. Each check prints its numbers:
  kernels  the sync-layer math at real-model shapes (Qwen2.5-0.5B: 14 heads / 2 KV heads / D 64,
           Qwen2.5-7B: 28 / 4 / 128) in bf16 on the device against fp32 on the CPU: split-and-merge
           prefill attention, the batched decode, a sparse-local mask; time per call;
  codecs   every K/V wire encoding: the device's codes equal the CPU's byte for byte (a party on a GPU
           and one on a CPU must agree on the wire), and they decode alike;
  oracle   both tiny models (fp32), sessions covering placements, sparse sharing, sparse local
           computation, the generator interval and the public prefix: first-token logits and greedy
           tokens on the device against the CPU.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from fedattn_vllm.config import FedAttnConfig, KVWire  # noqa: E402
from fedattn_vllm.kv_wire import decode_checked, encode_kv  # noqa: E402
from kernels import decode_attention, merge_attention, partial_attention  # noqa: E402

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128)}  # heads, KV heads, head dim
BF16 = dict(rtol=3e-2, atol=3e-2)  # bf16 on the device against fp32 on the CPU
SESSIONS = [  # (segment lengths, public prefix length, config)
    ([9, 14, 5], 0, FedAttnConfig(sync_interval=1)),
    ([20, 3, 11], 4, FedAttnConfig(sync_interval=2, generator_sync_interval=1)),
    ([12, 12], 0, FedAttnConfig(placement="explicit", sync_layers=(0, 3))),
    ([30, 7, 8], 0, FedAttnConfig(sync_interval=2, kv_share_ratio=0.5, kv_selection="key_norm")),
    ([25, 6], 3, FedAttnConfig(sync_interval=3, local_keep_ratio=0.5)),
    ([16, 10, 4], 0, FedAttnConfig(sync_interval=4, publisher=0, publisher_sync_interval=2, generators=(0, 2))),
]


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failures.append(name)


def _timed(device: torch.device, call, repeats: int) -> tuple[object, float]:
    """The call's result and its median time in ms."""
    result, times = None, []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return result, sorted(times)[len(times) // 2]


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return torch.allclose(a, b, **BF16), float((a - b).abs().max())


def check_kernels(device: torch.device, report: Report, quick: bool) -> None:
    print("kernels (bf16 on the device vs fp32 on the CPU):")
    t_q, t_own, t_far, decoders, t_dec = (16, 16, 48, 4, 64) if quick else (512, 512, 1536, 32, 4096)
    for model, (heads, kv_heads, dim) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        scale = dim**-0.5

        def rand(*shape):
            return torch.randn(*shape, generator=gen)

        q, own_k, own_v = rand(t_q, heads, dim), rand(t_own, kv_heads, dim), rand(t_own, kv_heads, dim)
        far_k, far_v = rand(t_far, kv_heads, dim), rand(t_far, kv_heads, dim)
        mask = torch.rand(t_q, t_own, generator=gen) < 0.5
        mask |= torch.eye(t_q, dtype=torch.bool)  # each query sees itself (t_q == t_own: no prefix here)

        def prefill(tensors, mask):
            q, own_k, own_v, far_k, far_v = tensors
            out_own, lse_own = partial_attention(q, own_k, own_v, scale, causal=True, mask=mask)
            out_far, lse_far = partial_attention(q, far_k, far_v, scale)
            return merge_attention(out_far, lse_far, out_own, lse_own)[0]

        cpu = [q, own_k, own_v, far_k, far_v]
        on_device = [t.to(device, torch.bfloat16) for t in cpu]
        expected = prefill(cpu, mask)
        got, ms = _timed(device, lambda: prefill(on_device, mask.to(device)), 1 if quick else 5)
        ok, diff = _close(got, expected)
        report.check(f"{model} prefill {t_q}x({t_own}+{t_far})", ok, f"max |diff| {diff:.2e}, {ms:.2f} ms")

        lengths = [max(1, t_dec * (b + 1) // decoders) for b in range(decoders)]
        dq = rand(decoders, heads, dim)
        keys = [rand(t, kv_heads, dim) for t in lengths]
        values = [rand(t, kv_heads, dim) for t in lengths]
        expected = decode_attention(dq, keys, values, scale)
        moved = (dq.to(device, torch.bfloat16), [k.to(device, torch.bfloat16) for k in keys],
                 [v.to(device, torch.bfloat16) for v in values])
        got, ms = _timed(device, lambda: decode_attention(*moved, scale), 1 if quick else 5)
        ok, diff = _close(got, expected)
        report.check(f"{model} decode {decoders} tokens over <= {t_dec} keys", ok, f"max |diff| {diff:.2e}, {ms:.2f} ms")


def check_codecs(device: torch.device, report: Report, quick: bool) -> None:
    print("codecs (the device's payload against the CPU's):")
    tokens = 40 if quick else 400
    gen = torch.Generator().manual_seed(1)
    kv = tuple((torch.randn(tokens, 2, 64, generator=gen) * 3).to(torch.bfloat16) for _ in range(2))
    for wire in KVWire:
        on_cpu = encode_kv(kv, wire)
        on_device = encode_kv(tuple(t.to(device) for t in kv), wire)
        same = all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_device))
        decoded = [decode_checked([p], wire, torch.bfloat16, [tuple(kv[0].shape)])[0]
                   for p in (on_cpu, tuple(t.to(device) for t in on_cpu))]
        alike = all(torch.equal(a, b.cpu()) for a, b in zip(*decoded))
        report.check(f"{wire.value}", same and alike, f"codes identical {same}, decoded identical {alike}")


def _tiny_model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from fedattn_vllm.models.tiny import SEED, SHAPE, VOCAB_SIZE

    config_cls = {"tiny-qwen2": Qwen2Config, "tiny-llama": LlamaConfig}[name]
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config_cls(vocab_size=VOCAB_SIZE, **SHAPE), dtype=torch.float32).eval()


def check_oracle(device: torch.device, report: Report, quick: bool) -> None:
    from fedattn_vllm.oracle import FedAttnOracle

    print("oracle (tiny models, fp32, the device against the CPU):")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    gen = torch.Generator().manual_seed(2)
    for name in ("tiny-qwen2", "tiny-llama"):
        model = _tiny_model(name)
        cpu_oracle, device_oracle = FedAttnOracle(model), FedAttnOracle(_tiny_model(name).to(device))
        for lengths, prefix_len, config in SESSIONS[:2] if quick else SESSIONS:
            segments = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
            prefix = torch.randint(3, 500, (prefix_len,), generator=gen).tolist()
            run = dict(max_new_tokens=8, ignore_eos=True, public_prefix=prefix)
            expected = cpu_oracle.generate(segments, config, **run)
            got = device_oracle.generate(segments, config, **run)
            diff = max(float((got.first_logits[g].cpu() - expected.first_logits[g]).abs().max())
                       for g in expected.first_logits)
            agree = sum(a == b for g in expected.tokens for a, b in zip(expected.tokens[g], got.tokens[g]))
            total = sum(len(t) for t in expected.tokens.values())
            report.check(f"{name} lengths={lengths} prefix={prefix_len} H={config.sync_interval}",
                         diff < 1e-3, f"first-token logits max |diff| {diff:.1e}, tokens {agree}/{total} equal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes and two sessions per model")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (--device cpu runs the same checks on the CPU)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    report = Report()
    check_kernels(device, report, args.quick)
    check_codecs(device, report, args.quick)
    check_oracle(device, report, args.quick)
    print(f"{'all checks passed' if not report.failures else f'{len(report.failures)} failed: ' + ', '.join(report.failures)}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
