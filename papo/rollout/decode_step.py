"""The decoder of a Qwen2-VL / Qwen2.5-VL language model against a preallocated KV cache: whole prompts
(``prefill_layer``) and one new token per row (``DecodeStep``).

Both are written against the model's own weights (norms, projections, MLP, LM head); the prefill takes
transformers' own 3-D rope tables, and in decoding, with text-only inputs, Qwen's 3-D rope is 1-D rope at
``last prompt position + 1 + t``. A decode step reads and writes only the fixed-address tensors of
``DecodeBuffers``, so ``papo.rollout`` can capture it as a CUDA graph.

A graph-captured step is bound by its kernels, not by launches, so the step does less work rather than fewer
launches (measurements: docs/rollout.md):
* q, k and v come from one GEMM over stacked weights (``StackedWeights``), and so do the MLP's gate and up
  projections when the engine owns its weights: those are views into the stacks. Reading the live training
  weights, q/k/v are copied in once per rollout and gate and up stay two GEMMs;
* grouped-query attention runs without expanding the cache: the query heads that share a KV head are read
  together. On CUDA, ``papo.rollout.decode_attention`` (Triton) splits the keys across the GPU, skips finished
  rows and reads each row's length on the device, so one captured step serves a whole rollout; elsewhere, one
  masked SDPA call over the cache slots filled so far;
* compiled, the parts around attention are one graph of fused kernels per batch size, reused by every layer,
  so compiling takes seconds (compiling the whole step with dynamic shapes measured slower than eager).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from papo.models.logprobs import suppress_mask
from papo.rollout.decode_attention import available as kernel_available
from papo.rollout.decode_attention import decode_attention, split_count
from papo.rollout.keyed_noise import exponential_noise
from papo.rollout.nucleus import in_nucleus, top_p_cutoff
from papo.rollout.sampling import SamplingParams


@dataclass
class DecodeBuffers:
    """Everything a captured decode step reads or writes: fixed addresses, sized for the largest bucket."""

    keys: list[Tensor]  # per layer (B, kv_heads, L, head_dim)
    values: list[Tensor]
    start: Tensor  # (B,) int32: a row's first cache slot (its prompt's left padding ends there); it attends to
    # slots [start, prompt_len + step], its prompt without padding and its tokens so far
    tokens: Tensor  # (B,) the token fed to this step
    positions: Tensor  # (B,) its rope position
    step: Tensor  # (1,) long: decode step s feeds output column s, writes cache slot prompt_len + s, samples column s + 1
    prompt_len: Tensor  # (1,) long: cache slots [0, prompt_len) hold the (left-padded) prompts
    limits: Tensor  # (B,) tokens each row may generate
    done: Tensor  # (B,) bool
    rows: Tensor  # (B,) which output row each cache row writes to
    out: Tensor  # (N, T) sampled tokens per output row
    out_logp: Tensor  # (N, T) their log-probs under the sampling temperature (no top-k/top-p truncation)
    noise_keys: Tensor  # (N,) int64: each output row's sampling-noise key (papo.rollout.keyed_noise)

    def state(self) -> tuple[Tensor, ...]:
        """What one step changes besides the KV slot it writes (a replay rewrites that slot identically)."""
        return (self.step, self.tokens, self.positions, self.done, self.out, self.out_logp)


class StackedWeights(NamedTuple):
    """A decoder layer's projections that read the same input, stacked so each pair or triple is one GEMM."""

    qkv: Tensor  # (q + 2 kv, H): q_proj, k_proj, v_proj
    qkv_bias: Tensor | None
    gate_up: Tensor | None  # (2 I, H): gate_proj, up_proj; None: two GEMMs over the layer's own (live) weights


class LayerWeights(NamedTuple):
    """A decoder layer's weights as the step reads them."""

    input_norm: Tensor
    stacked: StackedWeights
    o: Tensor
    o_bias: Tensor | None
    post_norm: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor


_STACKS = (("qkv", "self_attn", ("q_proj", "k_proj", "v_proj")), ("gate_up", "mlp", ("gate_proj", "up_proj")))


def _empty_stack(layer: Any, gate_up: bool) -> StackedWeights:
    def empty(parent: Any, names: tuple[str, ...], part: str) -> Tensor | None:
        tensors = [getattr(getattr(parent, n), part) for n in names]
        if tensors[0] is None:
            return None
        return torch.empty(sum(t.shape[0] for t in tensors), *tensors[0].shape[1:], dtype=tensors[0].dtype,
                           device=tensors[0].device)

    attn, mlp = layer.self_attn, layer.mlp
    return StackedWeights(empty(attn, _STACKS[0][2], "weight"), empty(attn, _STACKS[0][2], "bias"),
                          empty(mlp, _STACKS[1][2], "weight") if gate_up else None)


@torch.no_grad()
def _copy_into(stacked: StackedWeights, layer: Any) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], out=stacked.qkv)
    if stacked.qkv_bias is not None:
        torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], out=stacked.qkv_bias)
    if stacked.gate_up is not None:
        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], out=stacked.gate_up)


@torch.no_grad()
def stack_projections(model: Any) -> list[StackedWeights]:
    """Rewire a model the engine owns so that each layer's q/k/v and gate/up parameters are views into one
    stacked tensor each: loading weights into the parameters fills the stacks, and no second copy exists."""
    out = []
    for layer in model.model.language_model.layers:
        stacked = _empty_stack(layer, gate_up=True)
        _copy_into(stacked, layer)
        for field, parent_name, names in _STACKS:
            parent = getattr(layer, parent_name)
            for part, whole in (("weight", getattr(stacked, field)), ("bias", getattr(stacked, field + "_bias", None))):
                if whole is None:
                    continue
                offset = 0
                for name in names:
                    module = getattr(parent, name)
                    rows = getattr(module, part).shape[0]
                    setattr(module, part, torch.nn.Parameter(whole[offset:offset + rows], requires_grad=False))
                    offset += rows
        out.append(stacked)
    return out


def _rms_norm(weight: Tensor, eps: float, x: Tensor) -> Tensor:
    """Qwen's RMSNorm (normalise in fp32, cast, scale) with the fused kernel."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-b, a), dim=-1), sin)


def decode_qkv(h: Tensor, w: LayerWeights, keys: Tensor, values: Tensor, cos: Tensor, sin: Tensor, slot: Tensor,
               shape: tuple) -> Tensor:
    """A decoder layer up to attention, for one new token per row: h (b, 1, H) -> queries (b, kv_heads, group, hd);
    writes the token's key and value into cache ``slot`` of keys/values (b, kv_heads, L, hd). cos/sin (b, 1, 1, hd)."""
    heads, kv_heads, head_dim, eps, _ = shape
    b, q_size, kv_size = h.shape[0], heads * head_dim, kv_heads * head_dim
    qkv = F.linear(_rms_norm(w.input_norm, eps, h), w.stacked.qkv, w.stacked.qkv_bias)  # (b, 1, q + 2 kv)
    # queries and keys rotated together: one set of rope kernels per layer
    qk = _rope(qkv[..., : q_size + kv_size].view(b, heads + kv_heads, 1, head_dim), cos, sin)
    keys.index_copy_(2, slot, qk[:, heads:])
    values.index_copy_(2, slot, qkv[..., q_size + kv_size :].view(b, kv_heads, 1, head_dim))
    # grouped-query attention without expanding the cache: the query heads sharing a KV head are its positions
    return qk[:, :heads].reshape(b, kv_heads, heads // kv_heads, head_dim)


def decode_rest(h: Tensor, o: Tensor, w: LayerWeights, eps: float) -> Tensor:
    """The layer after attention: h (b, 1, H), attention output o (b, kv_heads, group, hd) -> (b, 1, H)."""
    h = h + F.linear(o.reshape(h.shape[0], 1, -1), w.o, w.o_bias)
    return h + _mlp(_rms_norm(w.post_norm, eps, h), w)


def _mlp(x: Tensor, w: LayerWeights) -> Tensor:
    if w.stacked.gate_up is None:
        gate, up = F.linear(x, w.gate), F.linear(x, w.up)
    else:
        gate, up = F.linear(x, w.stacked.gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w.down)


def prefill_layer(h: Tensor, w: LayerWeights, cos: Tensor, sin: Tensor, attend: Tensor,
                  shape: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer over whole prompts: h (m, P, H) -> (h, keys, values), keys/values (m, kv_heads, P, hd)
    after rope, for the cache. cos/sin (m, 1, P, hd): Qwen's 3-D rope tables; attend (m, 1, P, P) bool."""
    heads, kv_heads, head_dim, eps, scaling = shape
    (m, P, _), q_size, kv_size = h.shape, heads * head_dim, kv_heads * head_dim
    qkv = F.linear(_rms_norm(w.input_norm, eps, h), w.stacked.qkv, w.stacked.qkv_bias)  # (m, P, q + 2 kv)
    qk = _rope(qkv[..., : q_size + kv_size].view(m, P, heads + kv_heads, head_dim).transpose(1, 2), cos, sin)
    q, k = qk[:, :heads], qk[:, heads:]  # (m, heads, P, hd), (m, kv_heads, P, hd)
    v = qkv[..., q_size + kv_size :].view(m, P, kv_heads, head_dim).transpose(1, 2)
    group = heads // kv_heads
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=attend, scale=scaling)
    h = h + F.linear(o.transpose(1, 2).reshape(m, P, q_size), w.o, w.o_bias)
    return h + _mlp(_rms_norm(w.post_norm, eps, h), w), k, v


def logits_of(h: Tensor, norm: Tensor, eps: float, lm_head: Tensor) -> Tensor:
    """Final norm and LM head: h (b, 1, H) -> (b, V) fp32."""
    return F.linear(_rms_norm(norm, eps, h), lm_head)[:, 0].float()


def decode_head(h: Tensor, norm: Tensor, eps: float, lm_head: Tensor, suppress: Tensor, params: SamplingParams,
                keys: Tensor, column: Tensor) -> tuple[Tensor, Tensor]:
    """Final norm, LM head and sampling: h (b, 1, H) -> token (b,), its log-prob (b,)."""
    return sample(logits_of(h, norm, eps, lm_head), suppress, params, keys, column)


class DecodeStep:
    """``step(b, params, span)``: one token for cache rows [0, b); ``prefill``: whole prompts into the cache.
    ``compile``: torch.compile the decode step's parts around attention and its head once per batch-size bucket
    (static shapes: dynamic ones measured slower than no compilation), and the prefill layer with dynamic shapes.
    ``kernel``: decode attention through ``papo.rollout.decode_attention`` (None: where it can run).
    ``stacked``: the model's projections already stacked (``stack_projections``, on weights the engine owns);
    None: stacked copies of the live weights are made for each rollout (``allocate``)."""

    def __init__(self, model: Any, suppress_ids: list[int], eos_ids: list[int], pad_id: int, compile: bool = False,
                 kernel: bool | None = None, stacked: list[StackedWeights] | None = None) -> None:
        self.model, self.text = model, model.model.language_model
        cfg = model.config.get_text_config()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.vocab = model.lm_head.weight.shape[0]
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.kernel = kernel_available(self.device, self.dtype) if kernel is None else kernel  # Triton or SDPA
        self.pad_id = int(pad_id)
        self.suppress = suppress_mask(suppress_ids, self.vocab, self.device)
        self.eos = torch.as_tensor(list(eos_ids) or [-1], device=self.device)
        rotary = self.text.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        layers = self.text.layers
        self.views = stacked is not None
        self.weights = self._layer_weights(stacked) if stacked is not None else []
        self.shape = (self.heads, self.kv_heads, self.head_dim, float(layers[0].input_layernorm.variance_epsilon),
                      float(layers[0].self_attn.scaling))
        self.final_norm = (self.text.norm.weight, float(self.text.norm.variance_epsilon))
        self.eps, self.scaling = self.shape[3], self.shape[4]
        # the attention between them stays eager: its key length changes as the cache fills, their shapes do not
        self.qkv_fn = torch.compile(decode_qkv, dynamic=False) if compile else decode_qkv
        self.rest_fn = torch.compile(decode_rest, dynamic=False) if compile else decode_rest
        self.head_fn = torch.compile(decode_head, dynamic=False) if compile else decode_head
        self.prefill_fn = torch.compile(prefill_layer, dynamic=True) if compile else prefill_layer  # prompt shapes vary
        self.buf: DecodeBuffers | None = None

    def _layer_weights(self, stacked: list[StackedWeights]) -> list[LayerWeights]:
        return [LayerWeights(l.input_layernorm.weight, st, l.self_attn.o_proj.weight, l.self_attn.o_proj.bias,
                             l.post_attention_layernorm.weight, l.mlp.gate_proj.weight, l.mlp.up_proj.weight,
                             l.mlp.down_proj.weight)
                for l, st in zip(self.text.layers, stacked)]

    def allocate(self, rows: int, cache_len: int, new_tokens: int) -> DecodeBuffers:
        kv = (rows, self.kv_heads, cache_len, self.head_dim)
        dev, layers = self.device, self.text.layers
        self.buf = DecodeBuffers(
            keys=[torch.zeros(kv, dtype=self.dtype, device=dev) for _ in layers],
            values=[torch.zeros(kv, dtype=self.dtype, device=dev) for _ in layers],
            start=torch.zeros(rows, dtype=torch.int32, device=dev),
            tokens=torch.zeros(rows, dtype=torch.long, device=dev), positions=torch.zeros(rows, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev), prompt_len=torch.zeros(1, dtype=torch.long, device=dev),
            limits=torch.zeros(rows, dtype=torch.long, device=dev), done=torch.zeros(rows, dtype=torch.bool, device=dev),
            rows=torch.zeros(rows, dtype=torch.long, device=dev),
            out=torch.zeros(rows, new_tokens, dtype=torch.long, device=dev),
            out_logp=torch.zeros(rows, new_tokens, dtype=torch.float32, device=dev),
            noise_keys=torch.zeros(rows, dtype=torch.long, device=dev),
        )
        if not self.views:  # q/k/v copies of the live weights, for this rollout only (training needs the memory);
            # gate and up stay two GEMMs there: stacking them would copy a third of the model per rollout
            self.weights = self._layer_weights([_empty_stack(layer, gate_up=False) for layer in layers])
        self.refresh_weights()
        return self.buf

    def release(self) -> None:
        self.buf = None
        if not self.views:
            self.weights = []

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Copy the live weights into the stacked copies (training changes them between rollouts); views of the
        engine's own weights are current already."""
        if not self.views:
            for layer, w in zip(self.text.layers, self.weights):
                _copy_into(w.stacked, layer)

    def __call__(self, b: int, params: SamplingParams, span: int) -> None:
        """One token for rows [0, b). ``span``: the SDPA path attends over cache slots [0, span), no more than its
        rows have filled (a captured step per span); the kernel reads each row's own slots and ignores it."""
        buf = self.buf
        h = self.text.embed_tokens(buf.tokens[:b])[:, None]  # (b, 1, H)
        freqs = buf.positions[:b, None].float() * self.inv_freq[None]  # (b, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.rope_scale).to(h.dtype)[:, None, None], (emb.sin() * self.rope_scale).to(h.dtype)[:, None, None]  # (b, 1, 1, hd)
        slot = buf.step + buf.prompt_len  # (1,)
        start, done = buf.start[:b], buf.done[:b]
        if self.kernel:  # a finished row reads nothing; the lengths live on the device, so span is not used
            length = torch.where(done, 0, slot + 1 - start).int()
            splits = split_count(b, self.kv_heads, buf.keys[0].shape[2], self.device)
        else:
            slots = torch.arange(span, device=h.device)
            valid = (slots >= start[:, None]) & (slots <= slot)  # (b, span)
            bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))[:, None, None]
        for i, weights in enumerate(self.weights):
            keys, values = buf.keys[i][:b], buf.values[i][:b]
            q = self.qkv_fn(h, weights, keys, values, cos, sin, slot, self.shape)
            if self.kernel:
                o = decode_attention(q, keys, values, start, length, self.scaling, splits)
            else:
                o = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], attn_mask=bias, scale=self.scaling)
            h = self.rest_fn(h, o, weights, self.eps)
        rows, column = buf.rows[:b], (buf.step + 1).expand(b)  # column 0 came from the prefill
        token, logp = self.head_fn(h, *self.final_norm, self.model.lm_head.weight, self.suppress, params,
                                   buf.noise_keys[rows], column)
        token = torch.where(done, torch.full_like(token, self.pad_id), token)
        buf.out.index_put_((rows, column), token)
        buf.out_logp.index_put_((rows, column), logp)
        finished = torch.isin(token, self.eos) | (buf.step + 2 >= buf.limits[:b])  # step s wrote token s + 2
        buf.done[:b] = done | finished
        buf.tokens[:b] = token
        buf.positions[:b] += 1

    def prefill(self, embeds: Tensor, positions: Tensor, mask: Tensor, rows: Tensor, n: int) -> Tensor:
        """Prompts (m, P, H) with rope positions (3, m, P) and padding mask (m, P): their keys and values into cache
        ``rows`` (each prompt n times, from slot 0); returns the (m, V) fp32 logits of their last token."""
        buf, P = self.buf, embeds.shape[1]
        cos, sin = (t[:, None] for t in self.text.rotary_emb(embeds, positions))  # transformers' 3-D rope tables
        causal = torch.ones(P, P, dtype=torch.bool, device=embeds.device).tril()
        # padding is never attended to; a padding query attends to itself, so its (unused) output stays finite
        attend = (causal & (mask.bool()[:, None, :] | torch.eye(P, dtype=torch.bool, device=embeds.device)))[:, None]
        h = embeds
        for i, weights in enumerate(self.weights):
            h, k, v = self.prefill_fn(h, weights, cos, sin, attend, self.shape)
            buf.keys[i][rows, :, :P] = k if n == 1 else k.repeat_interleave(n, 0)
            buf.values[i][rows, :, :P] = v if n == 1 else v.repeat_interleave(n, 0)
        return logits_of(h[:, -1:], *self.final_norm, self.model.lm_head.weight)

    def sample(self, logits: Tensor, params: SamplingParams, keys: Tensor, column: Tensor) -> tuple[Tensor, Tensor]:
        return sample(logits, self.suppress, params, keys, column)


def sample(logits: Tensor, suppress: Tensor, params: SamplingParams, keys: Tensor, column: Tensor) -> tuple[Tensor, Tensor]:
    """(b, V) fp32 logits -> sampled token and its log-prob at the sampling temperature (as scoring sees it).
    ``keys`` (b,) and ``column`` (b,) key the sampling noise (``papo.rollout.keyed_noise``)."""
    logits = logits.masked_fill(suppress, float("-inf"))
    if params.greedy:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    token = race_winner(logits, params, keys, column)
    return token, torch.log_softmax(logits / params.temperature, -1).gather(-1, token[:, None])[:, 0]


def race_scores(logits: Tensor, params: SamplingParams, keys: Tensor, column: Tensor) -> Tensor:
    """(b, V) scores whose argmax is a sample of temperature / top-k / top-p sampling: the exponential race
    p_v / E_v over the kept tokens, with E keyed by (key, column, token) and no host sync (it lives inside a
    CUDA graph). Tokens outside the nucleus score 0."""
    probs = _race_probs(logits, params)
    if params.top_p < 1.0:
        probs = probs.masked_fill(probs <= top_p_cutoff(probs, params.top_p)[:, None], 0.0)
    return probs / exponential_noise(keys, column, probs.shape[-1])  # the race needs no normalised probs


def race_winner(logits: Tensor, params: SamplingParams, keys: Tensor, column: Tensor) -> Tensor:
    """``race_scores(...).argmax(-1)``, searching the nucleus of few rows. The race run over every token is
    won inside the nucleus on most rows (it holds top_p of the mass); its winner is then the nucleus' winner,
    the first index of the same maximum. Only the other rows need the cutoff and a second race."""
    probs = _race_probs(logits, params)
    noise = exponential_noise(keys, column, probs.shape[-1])
    token = (probs / noise).argmax(-1)
    if params.top_p < 1.0:
        inside = in_nucleus(probs, token, params.top_p)
        cutoff = top_p_cutoff(probs, params.top_p, ~inside)  # NOT_SEARCHED, dropping nothing, on rows inside
        again = (probs.masked_fill(probs <= cutoff[:, None], 0.0) / noise).argmax(-1)
        token = torch.where(inside, token, again)
    return token


def _race_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities at the sampling temperature after top-k, before top-p."""
    kept = logits / params.temperature
    if params.top_k:
        kth = torch.topk(kept, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        kept = kept.masked_fill(kept < kth, float("-inf"))
    return kept.softmax(-1)
