"""``papo.rollout``: batched sampling with a static KV cache and CUDA-graph decode steps.

transformers ``generate`` spends a decode step mostly in Python and kernel launches (a growing cache, a new
attention mask, a dozen logits processors), an order of magnitude below the memory-bandwidth bound at
training batch sizes (docs/rollout.md). This engine keeps what must be model-specific small and visible:

* prefill, once per distinct prompt (``n`` samples per prompt share it): the model's own vision tower (its
  blocks compiled) on host-precomputed indices, Qwen's 3-D rope positions from ``papo.models.mrope``, and the
  decoder layers as ``papo.rollout.decode_step.prefill_layer``, which writes keys and values straight into the cache;
* decode: ``papo.rollout.decode_step.DecodeStep``, written against the model's weights; with text-only tokens Qwen's 3-D
  rope is 1-D rope at ``last prompt position + 1 + t``. On CUDA the step (sampling included: suppressed ids,
  temperature, top-k, top-p, EOS and per-row limits) is captured as a CUDA graph per batch-size bucket (and,
  where decode attention falls back to SDPA, per cache span), and replayed, one launch per token;
* finished rows are compacted away: when at most half the rows of a bucket are still running they are
  gathered into the front of the cache and the next smaller bucket's graph takes over.

Supported: the Qwen2-VL / Qwen2.5-VL decoder family (``supports``); anything else, and sampling on CPU when
asked for ``engine="hf"``, goes through ``hf_generate``. Tokens and their sampling log-probs come back as
``Completions``, the format the trainer and ``papo eval`` use. Measured figures: docs/rollout.md.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from papo.models.attention import PACKED_TEXT_ATTENTION, PACKED_VISION_ATTENTION, use_packed_vision_attention
from papo.models.compiled import compiled_calls, routed
from papo.models.image_features import embed_with_images, image_features
from papo.models.inputs import PromptBatch
from papo.models.loading import plain_class
from papo.models.mrope import rope_index
from papo.rollout.decode_step import DecodeBuffers, DecodeStep, stack_projections
from papo.rollout.keyed_noise import random_keys
from papo.rollout.sampling import Completions, SamplingParams, trim_after_eos

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
CHECK_EVERY = 16  # decode steps between host checks for "all done" / compaction (each check is one sync)
SPAN_BLOCK = 64  # SDPA steps attend over the cache slots filled so far, rounded up to this (one graph per span)


def supports(model: Any) -> bool:
    """Can this engine decode ``model``? (else use ``hf_generate``)"""
    cfg = getattr(model, "config", None)
    text = getattr(getattr(model, "model", None), "language_model", None)
    return (getattr(cfg, "model_type", None) in SUPPORTED_MODEL_TYPES and text is not None
            and hasattr(model, "lm_head") and not hasattr(model, "peft_config")
            and getattr(cfg.get_text_config(), "use_sliding_window", False) is False
            and getattr(cfg.get_text_config(), "hidden_act", "silu") == "silu")  # the decode step's MLP


class RolloutEngine:
    """One engine per model; graphs and the cache are rebuilt when a call needs larger shapes.

    ``compile``: torch.compile the vision tower's blocks, the prefill layer and the decode step (None: on CUDA).
    ``prefill_tokens``: prompt tokens per prefill pass, which bounds its activations."""

    def __init__(self, model: Any, suppress_ids: list[int], eos_ids: list[int], pad_id: int,
                 use_cuda_graphs: bool | None = None, prefill_tokens: int = 65536, compile: bool | None = None,
                 dtype: torch.dtype | None = None, own_weights: bool | None = None) -> None:
        """``dtype``: the weights' dtype for sampling (None: the model's). ``own_weights``: keep the engine's own
        weight buffers, refreshed by ``load_weights`` (default: when ``dtype`` differs from the model's, e.g.
        fp32 master weights and bf16 rollouts); otherwise the engine reads the model's parameters directly."""
        if not supports(model):
            raise ValueError(f"papo.rollout cannot decode {type(model).__name__}; use hf_generate")
        dtype = dtype or model.lm_head.weight.dtype
        self.owns_weights = dtype != model.lm_head.weight.dtype if own_weights is None else own_weights
        self._stacked = None
        if self.owns_weights:  # its q/k/v and gate/up parameters become views into stacked GEMM weights
            source, model = model, _empty_copy(model, dtype)
            self._stacked = stack_projections(model)
        self.model, self.base = model, model.model
        self._params = dict(model.named_parameters()) if self.owns_weights else {}
        if self.owns_weights:
            missing = self._params.keys() - self.load_weights(source.named_parameters())
            if missing:
                raise ValueError(f"papo.rollout: no weights for {sorted(missing)[:3]} in the model")
        self.suppress_ids, self.eos_ids = list(suppress_ids), list(eos_ids)
        self.pad_id, self.prefill_tokens = int(pad_id), prefill_tokens
        self.device = model.lm_head.weight.device
        on_cuda = self.device.type == "cuda"
        self.graphs_on = on_cuda if use_cuda_graphs is None else use_cuda_graphs
        self.compile = on_cuda if compile is None else compile
        self.step = DecodeStep(model, suppress_ids, eos_ids, pad_id, compile=self.compile, stacked=self._stacked)
        # fused norms, rope and MLP, and GEMMs padded to aligned shapes (Qwen2.5-VL's 3420-wide vision MLP
        # otherwise runs Ampere kernels)
        self._vision_blocks = compiled_calls(getattr(self.base.visual, "blocks", [])) if self.compile else {}
        self._shape: tuple = ()
        self._graphs: dict[tuple[int, int], Any] = {}  # (rows, cache span) -> captured step
        self._pool: Any = None  # one memory pool for all of them: they never run at once
        self._graph_key: tuple | None = None
        self._captures = [0, 0.0]  # graphs captured during the last generate, and the host seconds they took
        self.last_timing: dict[str, Any] = {}
        self.record_windows = False  # time every CHECK_EVERY-step window with CUDA events (benchmarks/decode_profile.py)

    @property
    def _buf(self) -> DecodeBuffers | None:
        return self.step.buf

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs of the training model into the engine's own weights, in place (captured
        graphs keep their addresses), one tensor at a time: a sharded tensor (DTensor) is gathered whole just for
        its copy. Returns the names loaded; a no-op when the engine reads the training model's parameters."""
        loaded: set[str] = set()
        if not self.owns_weights:
            return loaded
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"papo.rollout: the engine's model has no parameter {name!r}")
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            self._params[name].copy_(tensor)
            loaded.add(name)
        return loaded

    def _fall_back_to_eager(self, err: Exception) -> None:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        warnings.warn(f"papo.rollout: compiling the engine failed ({type(err).__name__}: {first_line}); "
                      "continuing with eager decode steps (rollout.compile=false skips the attempt)", RuntimeWarning, stacklevel=3)
        self.release()
        self.compile, self._vision_blocks = False, {}
        # SDPA too: the failure may be the attention kernel's own compilation
        self.step = DecodeStep(self.model, self.suppress_ids, self.eos_ids, self.pad_id, compile=False, kernel=False,
                               stacked=self._stacked)

    def release(self) -> None:
        """Free the KV cache and the captured graphs (training needs the memory between rollouts)."""
        self.step.release()
        self._graphs, self._pool, self._shape = {}, None, ()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
            self.step.refresh_weights()
            return
        self.release()
        self.step.allocate(rows, cache_len, new_tokens)
        self._shape = shape

    @torch.no_grad()
    def _prefill(self, batch: PromptBatch, n: int) -> Tensor:
        """Run the prompts through the vision tower and the decoder, their keys and values into cache rows (each
        prompt n times). Returns the (B*n, V) fp32 logits of the last prompt token."""
        buf, host = self._buf, batch.inputs
        P, base, out = batch.prompt_len, self.base, []
        positions, deltas = rope_index(self.model, host)  # (3, B, P), (B, 1), on the host
        chunk = max(1, self.prefill_tokens // P)  # prompts per prefill pass: bounds its activations
        for start in range(0, batch.size, chunk):
            part = _slice_rows(host, start, min(start + chunk, batch.size))
            ids, mask = part["input_ids"].to(self.device), part["attention_mask"].to(self.device)
            if "image_grid_thw" in part:
                with routed(self._vision_blocks):
                    features = image_features(base, part["pixel_values"].to(self.device), part["image_grid_thw"])
                embeds = embed_with_images(base, ids, features)
            else:
                embeds = base.get_input_embeddings()(ids)
            m = ids.shape[0]
            rows = torch.arange(start * n, (start + m) * n, device=self.device)
            logits = self.step.prefill(embeds, positions[:, start:start + m].to(self.device), mask, rows, n)
            # the first generated token's rope position: Qwen's rope delta says how far image tokens shifted it
            first = part["attention_mask"].sum(-1) + deltas[start:start + m, 0]
            buf.positions[rows] = first.to(self.device).repeat_interleave(n, 0)
            buf.start[rows] = (P - part["attention_mask"].sum(-1)).int().to(self.device).repeat_interleave(n, 0)
            out.append(logits if n == 1 else logits.repeat_interleave(n, 0))
        return torch.cat(out)

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, batch: PromptBatch, params: SamplingParams, n: int = 1, max_new_tokens: Tensor | None = None,
                 keys: Tensor | None = None) -> tuple[Completions, Tensor]:
        """``n`` completions per prompt (prompt-major order) and their (N, R) sampling log-probs.
        ``max_new_tokens``: optional per-output-row limits (N,), each at most ``params.max_new_tokens``.
        ``keys``: (N,) sampling-noise keys per output row (``papo.rollout.keyed_noise``; default: random)."""
        keys = random_keys(batch.size * n) if keys is None else keys
        _check_left_padded(batch.inputs["attention_mask"])  # a bad batch, not a compiler failure
        was_training = self.model.training
        self.model.eval()
        try:
            try:
                return self._generate(batch, params, n, max_new_tokens, keys)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # a compiler failure must not end a training run: eager gives the same tokens
                if not self.compile:
                    raise
                self._fall_back_to_eager(err)
                return self._generate(batch, params, n, max_new_tokens, keys)
        finally:
            self.model.train(was_training)

    def _generate(self, batch: PromptBatch, params: SamplingParams, n: int, limits: Tensor | None,
                  keys: Tensor) -> tuple[Completions, Tensor]:
        N, T, P = batch.size * n, params.max_new_tokens, batch.prompt_len
        self._allocate(N, -(-(P + T) // 16) * 16, T)  # masked attention kernels want the key length aligned
        buf = self._buf
        if self._graph_key != (params.greedy, params.temperature, params.top_p, params.top_k):
            # captured graphs bake in the sampling settings. Their memory pool goes with them: once its last graph
            # is gone, CUDA's caching allocator refuses to capture into it again (an internal assert), which
            # used to send an evaluation's greedy pass after its sampled one to eager decode steps
            self._graphs, self._pool = {}, None
        self._graph_key = (params.greedy, params.temperature, params.top_p, params.top_k)
        buf.done.zero_()
        buf.out.fill_(self.pad_id)
        buf.out_logp.zero_()
        buf.step.zero_()
        buf.prompt_len.fill_(P)
        t0 = time.perf_counter()
        logits = self._prefill(batch, n)
        t1 = time.perf_counter()
        lim = torch.full((N,), T, dtype=torch.long) if limits is None else limits.clamp(max=T).long()
        buf.limits[:N] = lim.to(self.device)
        buf.rows[:N] = torch.arange(N, device=self.device)
        buf.noise_keys[:N] = keys.to(self.device)
        # the first token comes from the prefill's logits (column 0); the decode steps produce the rest
        token, logp = self.step.sample(logits, params, buf.noise_keys[:N], torch.zeros(N, dtype=torch.long, device=self.device))
        buf.out[:N, 0], buf.out_logp[:N, 0] = token, logp
        buf.tokens[:N] = token
        buf.done[:N] = torch.isin(token, self.step.eos) | (buf.limits[:N] <= 1)
        active, steps, windows = N, 1, []
        self._captures = [0, 0.0]
        while steps < T:
            if steps % CHECK_EVERY == 1 or CHECK_EVERY == 1:
                running = int((~buf.done[:active]).sum())
                if running == 0:
                    break
                bucket = min(b for b in self._buckets(N) if b >= running)
                if bucket <= active // 2:
                    self._compact(active, bucket)
                    active = bucket
                if self.record_windows and self.device.type == "cuda":
                    windows.append((steps, active, torch.cuda.Event(enable_timing=True)))
                    windows[-1][2].record()
            buf.step.fill_(steps - 1)
            cache_len = buf.keys[0].shape[2]  # the kernel reads each row's own length: one graph per bucket
            span = cache_len if self.step.kernel else min(cache_len, -(-(P + steps) // SPAN_BLOCK) * SPAN_BLOCK)
            self._run(active, params, span)
            steps += 1
        completions = trim_after_eos(buf.out[:N, :steps].cpu(), self.eos_ids, self.pad_id)  # .cpu() waits for the GPU
        self.last_timing = {"rows": N, "prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_steps": steps - 1,
                            "captures": self._captures[0], "capture_s": self._captures[1]}
        if windows:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            marks = [*windows, (steps, 0, end)]
            # (first step, steps, active rows, milliseconds): graph captures fall inside the windows they happen in
            self.last_timing["windows"] = [(s, e - s, rows, ev.elapsed_time(nxt))
                                           for (s, rows, ev), (e, _, nxt) in zip(marks, marks[1:]) if e > s]
        within = torch.arange(steps)[None] < lim[:, None]  # per-row limits end rows without an EOS
        completions.finished &= (completions.mask.bool() & within).sum(-1) == completions.lengths
        completions.mask &= within.long()
        completions.ids.masked_fill_(~completions.mask.bool(), self.pad_id)
        width = max(1, int(completions.lengths.max()))  # steps run past the last EOS until the next check
        logps = buf.out_logp[:N, :width].cpu() * completions.mask[:, :width]
        return Completions(completions.ids[:, :width], completions.mask[:, :width], completions.finished), logps

    def _run(self, b: int, params: SamplingParams, span: int) -> None:
        if not self.graphs_on:
            self.step(b, params, span)
            return
        graph = self._graphs.get((b, span))
        if graph is None:
            t = time.perf_counter()
            graph = self._capture(b, params, span)
            self._captures[0] += 1
            self._captures[1] += time.perf_counter() - t
        graph.replay()

    def _capture(self, b: int, params: SamplingParams, span: int) -> Any:
        state = self._buf.state()
        saved = [t.clone() for t in state]
        # the warm-up steps draw sampling noise: put the generator back, so that a run's tokens do not depend on
        # which graphs it happened to capture (a resumed run captures them at other steps than the original)
        rng = torch.cuda.get_rng_state(self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _compile_cache(64):
            for _ in range(2):  # compile, and warm up kernels and the allocator outside the capture
                self.step(b, params, span)
                for t, s in zip(state, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool), _compile_cache(64):
            self.step(b, params, span)
        for t, s in zip(state, saved):  # capturing ran the step once: undo it
            t.copy_(s)
        torch.cuda.set_rng_state(rng, self.device)
        self._graphs[(b, span)] = graph
        return graph

    def _compact(self, active: int, bucket: int) -> None:
        """Move the running rows of [0, active) to the front; rows past ``bucket`` are all finished."""
        buf = self._buf
        order = torch.argsort(buf.done[:active].to(torch.int8), stable=True)[:bucket]  # running rows first
        for t in (buf.start, buf.tokens, buf.positions, buf.limits, buf.done, buf.rows, *buf.keys, *buf.values):
            t[:bucket] = t[:active][order]


def _check_left_padded(mask: Tensor) -> None:
    """Decode steps attend to one run of cache slots per row: each prompt's padding must all be on its left."""
    m = mask.bool()
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError("papo.rollout needs left-padded prompts (a real token is followed by padding in the attention mask)")


def _empty_copy(model: Any, dtype: torch.dtype) -> Any:
    """The same architecture with uninitialised ``dtype`` parameters on the model's device (built on the meta
    device: never a second full-precision model), tied weights tied, and the model's buffers (rope tables)
    copied as they are (FSDP shards parameters, never buffers)."""
    device = model.lm_head.weight.device
    config = copy.deepcopy(model.config)
    packed = getattr(config.vision_config, "_attn_implementation", None) == PACKED_VISION_ATTENTION
    if packed:  # transformers builds only the attention implementations it knows: switch after construction
        config.vision_config._attn_implementation = "sdpa"
    text = getattr(config, "text_config", None)
    if getattr(text, "_attn_implementation", None) == PACKED_TEXT_ATTENTION:  # packed only in training passes
        text._attn_implementation = "sdpa"
    with torch.device("meta"):
        clone = plain_class(model)._from_config(config, dtype=dtype)
    if packed:
        use_packed_vision_attention(clone)
    clone = clone.to_empty(device=device).requires_grad_(False).eval()
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for first, *others in aliases.values():  # tie exactly what the model ties, whatever its config says
        for name in others:
            owner, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(owner), leaf, clone.get_parameter(first))
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        clone.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    return clone


def _compile_cache(entries: int):
    """Room for one compiled decode step per batch-size bucket (and sampling setting): dynamo's default keeps 8
    versions of a function, then runs it uncompiled. Only capture consults it: replays skip dynamo."""
    return torch._dynamo.config.patch(cache_size_limit=entries)


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
