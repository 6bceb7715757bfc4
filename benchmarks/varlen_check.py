"""Packed text attention on CUDA against one SDPA call per sequence, forward and backward, under bf16 autocast
(a few seconds; run before longer benchmarks so a kernel problem stops them early).

    python benchmarks/varlen_check.py
"""

import torch
import torch.nn.functional as F

from papo.models.attention import packed_text_attention, varlen_attn


def main() -> None:
    torch.manual_seed(0)
    lengths = [300, 17, 1024, 2048]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 16, sum(lengths), 128, device="cuda", requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lengths), 128, device="cuda", requires_grad=True) for _ in range(2))
    module = torch.nn.Module().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed, _ = packed_text_attention(module, q, k, v, None, scaling=128**-0.5, packed_seq_lens=(cu, lengths))
    grads = torch.autograd.grad(packed.float().square().sum(), (q, k, v))
    outs, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True))
        start += n
    ref = torch.cat(outs, dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    print("varlen kernel:", varlen_attn is not None, "output dtype:", packed.dtype)
    print("max |packed - fp32 reference|:", float((packed.detach().float() - ref.detach()).abs().max()))
    for name, g, r in zip("qkv", grads, ref_grads):
        print(f"grad {name}: finite {bool(g.isfinite().all())}, max rel err {float((g - r).abs().max() / r.abs().max()):.4f}")


if __name__ == "__main__":
    main()
