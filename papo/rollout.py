"""``papo.rollout``: batched sampling with a static KV cache and CUDA-graph decode steps.

transformers ``generate`` spends a decode step mostly in Python and kernel launches (a growing cache, a new
attention mask, a dozen logits processors): at 128 prompts on an H100 it runs about 3k tokens/s where the
memory-bandwidth bound is over 10x higher. This engine keeps what must be model-generic and replaces the rest:

* prefill runs the Hugging Face model itself (vision encoder, Qwen's 3-D rope, left padding), once per
  distinct prompt: ``n`` samples per prompt share it and copy its KV rows;
* decode runs the language model's own modules (norms, projections, MLP, LM head) in a fixed-shape step
  written here against one preallocated KV cache: with text-only tokens, Qwen's 3-D rope is 1-D rope at
  position ``last prompt position + 1 + t``;
* on CUDA, that step (sampling included: suppressed ids, temperature, top-k, top-p, EOS and per-row
  limits) is captured once per batch-size bucket as a CUDA graph and replayed, one launch per token;
* finished rows are compacted away: when at most half the rows of a bucket are still running they are
  gathered into the front of the cache and the next smaller bucket's graph takes over.

Supported: the Qwen2-VL / Qwen2.5-VL decoder family (``supports``); anything else, and sampling on CPU when
asked for ``engine="hf"``, goes through ``hf_generate``. Tokens and their sampling log-probs come back as
``Completions``, the format the trainer and ``papo eval`` use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from papo.models.generation import Completions, SamplingParams, trim_after_eos
from papo.models.inputs import PromptBatch

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
CHECK_EVERY = 16  # decode steps between host checks for "all done" / compaction (each check is one sync)


def supports(model: Any) -> bool:
    """Can this engine decode ``model``? (else use ``hf_generate``)"""
    cfg = getattr(model, "config", None)
    text = getattr(getattr(model, "model", None), "language_model", None)
    return (getattr(cfg, "model_type", None) in SUPPORTED_MODEL_TYPES and text is not None
            and hasattr(model, "lm_head") and not hasattr(model, "peft_config")
            and getattr(cfg.get_text_config(), "use_sliding_window", False) is False)


def _rms_norm(norm: Any, x: Tensor) -> Tensor:
    """Qwen's RMSNorm (normalise in fp32, cast, scale) in 3 kernels instead of 6: launches bound a decode step."""
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-b, a), dim=-1), sin)


@dataclass
class _Buffers:
    """Everything a captured decode step reads or writes: fixed addresses, sized for the largest bucket."""

    keys: list[Tensor]  # per layer (B, kv_heads, L, head_dim)
    values: list[Tensor]
    valid: Tensor  # (B, L) bool: cache slots a row may attend to (its prompt without padding, its tokens so far)
    tokens: Tensor  # (B,) the token fed to this step
    positions: Tensor  # (B,) its rope position
    step: Tensor  # (1,) long: decode step s feeds output column s, writes cache slot prompt_len + s, samples column s + 1
    limits: Tensor  # (B,) tokens each row may generate
    done: Tensor  # (B,) bool
    rows: Tensor  # (B,) which output row each cache row writes to
    out: Tensor  # (N, T) sampled tokens per output row
    out_logp: Tensor  # (N, T) their log-probs under the sampling temperature (no top-k/top-p truncation)


class RolloutEngine:
    """One engine per model; graphs and the cache are rebuilt when a call needs larger shapes."""

    def __init__(self, model: Any, suppress_ids: list[int], eos_ids: list[int], pad_id: int,
                 use_cuda_graphs: bool | None = None, prefill_batch: int = 64) -> None:
        if not supports(model):
            raise ValueError(f"papo.rollout cannot decode {type(model).__name__}; use hf_generate")
        self.model, self.text = model, model.model.language_model
        self.eos_ids, self.pad_id, self.prefill_batch = list(eos_ids), int(pad_id), prefill_batch
        cfg = model.config.get_text_config()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.vocab = model.lm_head.weight.shape[0]
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.suppress = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        if suppress_ids:
            self.suppress[torch.as_tensor(suppress_ids, device=self.device)] = True
        self.eos = torch.as_tensor(self.eos_ids or [-1], device=self.device)
        rotary = self.text.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        self.graphs_on = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self._buf: _Buffers | None = None
        self._shape: tuple = ()
        self._graphs: dict[int, Any] = {}
        self._prompt_len: int | None = None
        self._graph_key: tuple | None = None
        self.last_timing: dict[str, float] = {}

    def release(self) -> None:
        """Free the KV cache and the captured graphs (training needs the memory between rollouts)."""
        self._buf, self._graphs, self._shape = None, {}, ()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the decode step

    def _decode(self, b: int, params: SamplingParams) -> None:
        """One token for cache rows [0, b): reads and writes only ``self._buf`` (so it can be graph-captured)."""
        buf = self._buf
        h = self.text.embed_tokens(buf.tokens[:b])[:, None]  # (b, 1, H)
        freqs = buf.positions[:b, None].float() * self.inv_freq[None]  # (b, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.rope_scale).to(h.dtype)[:, None, None], (emb.sin() * self.rope_scale).to(h.dtype)[:, None, None]  # (b, 1, 1, hd)
        slot = buf.step + self._prompt_len  # (1,)
        valid = buf.valid[:b].index_fill(1, slot, True)
        bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))[:, None, None]
        for i, layer in enumerate(self.text.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            # queries and keys rotated together: one set of rope kernels per layer
            qk = torch.cat((attn.q_proj(x), attn.k_proj(x)), -1).view(b, self.heads + self.kv_heads, 1, self.head_dim)
            qk = _rope(qk, cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]  # (b, heads, 1, hd), (b, kv_heads, 1, hd)
            v = attn.v_proj(x).view(b, self.kv_heads, 1, self.head_dim)
            keys, values = buf.keys[i][:b], buf.values[i][:b]
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            # grouped-query attention without copying the cache: the query heads sharing a KV head become that
            # head's query positions (one token each), so a masked SDPA kernel runs without expanding K and V
            q = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=attn.scaling)
            h = h + attn.o_proj(o.reshape(b, 1, -1))
            h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        logits = self.model.lm_head(_rms_norm(self.text.norm, h))[:, 0].float()  # (b, V)
        token, logp = self._sample(logits, params)
        done = buf.done[:b]
        token = torch.where(done, torch.full_like(token, self.pad_id), token)
        rows, column = buf.rows[:b], (buf.step + 1).expand(b)  # column 0 came from the prefill
        buf.out.index_put_((rows, column), token)
        buf.out_logp.index_put_((rows, column), logp)
        buf.valid[:b].index_fill_(1, slot, True)
        finished = torch.isin(token, self.eos) | (buf.step + 2 >= buf.limits[:b])  # step s wrote token s + 2
        buf.done[:b] = done | finished
        buf.tokens[:b] = token
        buf.positions[:b] += 1

    def _sample(self, logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
        """(b, V) fp32 logits -> sampled token and its log-prob at the sampling temperature (as scoring sees it)."""
        logits = logits.masked_fill(self.suppress, float("-inf"))
        if params.greedy:
            token = logits.argmax(-1)
            return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
        scaled = logits / params.temperature
        logp_all = torch.log_softmax(scaled, -1)
        kept = scaled
        if params.top_k:
            kth = torch.topk(kept, min(params.top_k, self.vocab), dim=-1).values[:, -1:]
            kept = kept.masked_fill(kept < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(kept, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_logits.softmax(-1)) > params.top_p  # keep the smallest prefix reaching top_p
            kept = kept.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        probs = kept.softmax(-1)
        # exponential race (= sampling from probs) with no host sync, so it can live inside a CUDA graph
        token = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
        return token, logp_all.gather(-1, token[:, None])[:, 0]

    # ------------------------------------------------------------------ setup

    def _buckets(self, rows: int) -> list[int]:
        sizes, b = [], 1
        while b < rows:
            sizes.append(b)
            b *= 2
        return sizes + [rows]

    def _allocate(self, rows: int, cache_len: int, new_tokens: int) -> None:
        shape = (rows, cache_len, new_tokens)
        if self._buf is not None and all(a >= b for a, b in zip(self._shape, shape)):
            return
        self._buf, self._graphs = None, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        kv = (rows, self.kv_heads, cache_len, self.head_dim)
        n_layers = len(self.text.layers)
        dev = self.device
        self._buf = _Buffers(
            keys=[torch.zeros(kv, dtype=self.dtype, device=dev) for _ in range(n_layers)],
            values=[torch.zeros(kv, dtype=self.dtype, device=dev) for _ in range(n_layers)],
            valid=torch.zeros(rows, cache_len, dtype=torch.bool, device=dev),
            tokens=torch.zeros(rows, dtype=torch.long, device=dev), positions=torch.zeros(rows, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev), limits=torch.zeros(rows, dtype=torch.long, device=dev),
            done=torch.zeros(rows, dtype=torch.bool, device=dev), rows=torch.zeros(rows, dtype=torch.long, device=dev),
            out=torch.zeros(rows, new_tokens, dtype=torch.long, device=dev),
            out_logp=torch.zeros(rows, new_tokens, dtype=torch.float32, device=dev),
        )
        self._shape = shape

    @torch.no_grad()
    def _prefill(self, batch: PromptBatch, n: int) -> Tensor:
        """Run the prompts through the HF model; copy their KV into cache rows (each prompt n times).
        Returns the (P*n, V) fp32 logits of the last prompt token."""
        from transformers import DynamicCache

        buf, inputs = self._buf, batch.to(self.device).inputs
        P, out = batch.prompt_len, []
        base = self.model.model
        for start in range(0, batch.size, self.prefill_batch):
            part = _slice_rows(inputs, start, min(start + self.prefill_batch, batch.size))
            cache = DynamicCache(config=self.model.config)
            base.rope_deltas = None
            mask = part["attention_mask"]
            text_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # generate's positions for image-free prompts
            extra = {} if "image_grid_thw" in part else {"position_ids": text_positions[None].expand(3, -1, -1)}
            res = self.model(**part, **extra, past_key_values=cache, use_cache=True, logits_to_keep=1)
            m = part["input_ids"].shape[0]
            rows = torch.arange(start * n, (start + m) * n, device=self.device)
            for i, layer in enumerate(cache.layers):
                buf.keys[i][rows, :, :P] = layer.keys.repeat_interleave(n, 0)
                buf.values[i][rows, :, :P] = layer.values.repeat_interleave(n, 0)
            # the first generated token's rope position: Qwen's rope delta says how far image tokens shifted it
            deltas = base.rope_deltas[:, 0] if base.rope_deltas is not None else torch.zeros_like(mask[:, 0])
            buf.positions[rows] = (mask.sum(-1) + deltas).long().repeat_interleave(n, 0)
            buf.valid[rows, :P] = part["attention_mask"].bool().repeat_interleave(n, 0)
            out.append(res.logits[:, -1].float().repeat_interleave(n, 0))
        base.rope_deltas = None  # a later training forward recomputes positions from its own inputs
        return torch.cat(out)

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, batch: PromptBatch, params: SamplingParams, n: int = 1, max_new_tokens: Tensor | None = None) -> tuple[Completions, Tensor]:
        """``n`` completions per prompt (prompt-major order) and their (N, R) sampling log-probs.
        ``max_new_tokens``: optional per-output-row limits (N,), each at most ``params.max_new_tokens``."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(batch, params, n, max_new_tokens)
        finally:
            self.model.train(was_training)

    def _generate(self, batch: PromptBatch, params: SamplingParams, n: int, limits: Tensor | None) -> tuple[Completions, Tensor]:
        N, T, P = batch.size * n, params.max_new_tokens, batch.prompt_len
        self._allocate(N, -(-(P + T) // 16) * 16, T)  # masked SDPA kernels want the key length aligned
        buf = self._buf
        if P != self._prompt_len or self._graph_key != (params.greedy, params.temperature, params.top_p, params.top_k):
            self._graphs = {}  # captured graphs bake in the prompt length and the sampling settings
        self._prompt_len, self._graph_key = P, (params.greedy, params.temperature, params.top_p, params.top_k)
        buf.valid.zero_()
        buf.done.zero_()
        buf.out.fill_(self.pad_id)
        buf.out_logp.zero_()
        buf.step.zero_()
        t0 = time.perf_counter()
        logits = self._prefill(batch, n)
        t1 = time.perf_counter()
        lim = torch.full((N,), T, dtype=torch.long) if limits is None else limits.clamp(max=T).long()
        buf.limits[:N] = lim.to(self.device)
        buf.rows[:N] = torch.arange(N, device=self.device)
        # the first token comes from the prefill's logits; the decode steps produce the rest
        token, logp = self._sample(logits, params)
        buf.out[:N, 0], buf.out_logp[:N, 0] = token, logp
        buf.tokens[:N] = token
        buf.done[:N] = torch.isin(token, self.eos) | (buf.limits[:N] <= 1)
        active, steps = N, 1
        while steps < T:
            if steps % CHECK_EVERY == 1 or CHECK_EVERY == 1:
                running = int((~buf.done[:active]).sum())
                if running == 0:
                    break
                bucket = min(b for b in self._buckets(N) if b >= running)
                if bucket <= active // 2:
                    self._compact(active, bucket)
                    active = bucket
            buf.step.fill_(steps - 1)
            self._run(active, params)
            steps += 1
        completions = trim_after_eos(buf.out[:N, :steps].cpu(), self.eos_ids, self.pad_id)  # .cpu() waits for the GPU
        self.last_timing = {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": steps - 1}
        within = torch.arange(steps)[None] < lim[:, None]  # per-row limits end rows without an EOS
        completions.finished &= (completions.mask.bool() & within).sum(-1) == completions.lengths
        completions.mask &= within.long()
        completions.ids.masked_fill_(~completions.mask.bool(), self.pad_id)
        width = max(1, int(completions.lengths.max()))  # steps run past the last EOS until the next check
        logps = buf.out_logp[:N, :width].cpu() * completions.mask[:, :width]
        return Completions(completions.ids[:, :width], completions.mask[:, :width], completions.finished), logps

    def _run(self, b: int, params: SamplingParams) -> None:
        if not self.graphs_on:
            self._decode(b, params)
            return
        graph = self._graphs.get(b)
        if graph is None:
            graph = self._capture(b, params)
        graph.replay()

    def _capture(self, b: int, params: SamplingParams) -> Any:
        buf = self._buf
        # the cache slot this step writes gets the same keys/values again on replay: only these need restoring
        state = (buf.step, buf.tokens, buf.positions, buf.done, buf.valid, buf.out, buf.out_logp)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                self._decode(b, params)
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode(b, params)
        for t, s in zip(state, saved):  # capturing ran the step once: undo it
            t.copy_(s)
        self._graphs[b] = graph
        return graph

    def _compact(self, active: int, bucket: int) -> None:
        """Move the running rows of [0, active) to the front; rows past ``bucket`` are all finished."""
        buf = self._buf
        order = torch.argsort(buf.done[:active].to(torch.int8), stable=True)[:bucket]  # running rows first
        for t in (buf.valid, buf.tokens, buf.positions, buf.limits, buf.done, buf.rows, *buf.keys, *buf.values):
            t[:bucket] = t[:active][order]


def _slice_rows(inputs: dict[str, Tensor], start: int, end: int) -> dict[str, Tensor]:
    """Rows [start, end) of a processor batch, with the image tensors of exactly those rows' images."""
    out = {k: v[start:end] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        patches = grid.prod(-1)  # pixel_values rows per image
        counts = _images_per_row(inputs, len(grid))
        first, last = int(counts[:start].sum()), int(counts[:end].sum())
        out["image_grid_thw"] = grid[first:last]
        out["pixel_values"] = inputs["pixel_values"][int(patches[:first].sum()):int(patches[:last].sum())]
    return out


def _images_per_row(inputs: dict[str, Tensor], n_images: int) -> Tensor:
    tt = inputs.get("mm_token_type_ids")
    if tt is None:
        raise ValueError("papo.rollout needs mm_token_type_ids from the processor to split images by row")
    starts = (tt == 1) & torch.nn.functional.pad(tt[:, :-1] != 1, (1, 0), value=True)  # first token of each image run
    counts = starts.sum(-1)
    if int(counts.sum()) != n_images:
        raise ValueError(f"{int(counts.sum())} image token runs but {n_images} image grids")
    return counts
