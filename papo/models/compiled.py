"""Compiled calls of transformer blocks, taken only inside a ``routed`` region.

Each block gets ``torch.compile(block._call_impl, dynamic=True)``: Inductor fuses the element-wise work between
the block's matrix multiplies and attention (norms, rope, activations, residual adds, casts), and dynamic shapes
serve every token count with one compilation. Routing, rather than ``Module.compile``, keeps every other caller
eager: the rollout engine compiles the vision tower only for its prefill, and the policy compiles its decoder
layers and vision blocks only for scoring and update passes (``model.compile_layers``), never for
transformers ``generate``.

Attention that reads sequence lengths as Python ints is a graph break (``torch.compiler.disable`` in
``papo.models.attention``), and the lengths reach it in a frozen ``PackedSegments``, which Dynamo passes through
without guarding on its lists: new packings, and passes with a new number of sequences, do not recompile (a
tuple of lists did, once per new count: tests/test_compiled.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# compiled versions dynamo keeps per function before running it uncompiled; every block's call is
# nn.Module._call_impl, so train and eval modes, grad and no-grad, vision blocks and decoder layers share it
CACHE_ENTRIES = 64


BACKEND = "inductor"  # tests swap in "aot_eager": the same tracing and autograd, without code generation


def use_compiled_layers(setting: bool | str, device: str | torch.device, lora_rank: int) -> bool:
    """``model.compile_layers``: true, false, or "auto": a CUDA run training every weight, the case measured, in
    one process or sharded (on the CPU, compilation would outlast short runs; LoRA under compilation is
    untimed)."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cuda" and lora_rank == 0


def compiled_function(fn: Any) -> Any:
    return torch.compile(fn, dynamic=True, backend=BACKEND)


def compiled_calls(blocks: Iterable[torch.nn.Module]) -> dict[torch.nn.Module, Any]:
    return {blk: compiled_function(blk._call_impl) for blk in blocks}


def compile_settings() -> Any:
    """Room for every block's entries; and a forward that fails to compile runs eagerly instead of ending the
    run (compiled passes are a speed option, on by default). Dynamo then skips that code for the rest of the
    process: every block of the class runs eagerly, with dynamo's warning. A failure compiling a backward is
    not caught (Inductor compiles it at the first backward pass)."""
    return torch._dynamo.config.patch(cache_size_limit=CACHE_ENTRIES, suppress_errors=True)


@contextmanager
def routed(compiled: dict[torch.nn.Module, Any]) -> Iterator[None]:
    """Route the blocks' calls through their compiled versions for the duration."""
    if not compiled:
        yield
        return
    before = {blk: blk._compiled_call_impl for blk in compiled}
    for blk, fn in compiled.items():
        blk._compiled_call_impl = fn
    try:
        with compile_settings():
            yield
    finally:
        for blk, fn in before.items():
            blk._compiled_call_impl = fn
