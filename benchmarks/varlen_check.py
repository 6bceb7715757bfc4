"""Packed text attention on CUDA against one SDPA call per sequence, forward and backward, under bf16 autocast
(a few seconds; run before longer benchmarks so a kernel problem stops them early: it exits 1 on a difference
beyond bf16 rounding). Two layouts: sequences each attending to itself, and a shared prompt that two responses
attend to (key segments longer than their queries, aligned at their ends: papo.models.packing's shared prompts).

    python benchmarks/varlen_check.py
"""

import torch
import torch.nn.functional as F

from papo.models.attention import PackedSegments, packed_text_attention, varlen_aligns_causal_to_the_end, varlen_attn

OUTPUT_TOLERANCE, GRAD_TOLERANCE = 2e-2, 2e-2  # bf16 against fp32: about 1e-2 when the masks agree


def check(name: str, segments: PackedSegments, total: int) -> bool:
    q = torch.randn(1, 16, total, 128, device="cuda", requires_grad=True)
    k, v = (torch.randn(1, 2, total, 128, device="cuda", requires_grad=True) for _ in range(2))
    module = torch.nn.Module().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed, _ = packed_text_attention(module, q, k, v, None, scaling=128**-0.5, packed_seq_lens=segments)
    grads = torch.autograd.grad(packed.float().square().sum(), (q, k, v))
    shared = segments.key_index is not None
    kk, vv = (k[:, :, segments.key_index], v[:, :, segments.key_index]) if shared else (k, v)
    q_lengths, k_lengths = segments.q_lengths, segments.k_lengths
    outs, q_at, k_at = [], 0, 0
    for n, m in zip(q_lengths, k_lengths):  # fp32 reference, the mask written out
        mask = torch.ones(n, m, dtype=torch.bool, device="cuda").tril(m - n)
        outs.append(F.scaled_dot_product_attention(q[:, :, q_at : q_at + n], kk[:, :, k_at : k_at + m],
                                                   vv[:, :, k_at : k_at + m], attn_mask=mask, enable_gqa=True))
        q_at, k_at = q_at + n, k_at + m
    ref = torch.cat(outs, dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    error = float((packed.detach().float() - ref.detach()).abs().max())
    print(f"{name}: varlen kernel {varlen_attn is not None}, output dtype {packed.dtype}, "
          f"max |packed - fp32 reference| {error:.4f}")
    ok = error < OUTPUT_TOLERANCE
    for label, g, r in zip("qkv", grads, ref_grads):
        relative = float((g - r).abs().max() / r.abs().max())
        print(f"  grad {label}: finite {bool(g.isfinite().all())}, max rel err {relative:.4f}")
        ok = ok and bool(g.isfinite().all()) and relative < GRAD_TOLERANCE
    return ok


def main() -> None:
    torch.manual_seed(0)
    aligned = varlen_aligns_causal_to_the_end(torch.device("cuda"))
    print("varlen_attn aligns causal masks at the end (shared prompts use it):", aligned)
    lengths = [300, 17, 1024, 2048]
    ok = check("sequences", PackedSegments.sequences(lengths, "cuda"), sum(lengths))
    # a 300-token prompt, then responses of 17 and 1,024 tokens that each attend to it and to themselves
    prompt, responses = 300, [17, 1024]
    key_index = torch.cat([torch.arange(prompt), torch.arange(prompt), torch.arange(prompt, prompt + 17),
                           torch.arange(prompt), torch.arange(prompt + 17, prompt + 17 + 1024)]).cuda()
    shared = PackedSegments.build([prompt, *responses], [prompt, *(prompt + n for n in responses)], key_index)
    ok = check("shared prompt", shared, prompt + sum(responses)) and ok
    if not ok:
        raise SystemExit("packed attention differs from the reference beyond bf16 rounding")


if __name__ == "__main__":
    main()
