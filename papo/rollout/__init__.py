"""Rollouts: sampling completions from a policy, and grading them.

``Sampler`` picks the engine (papo's compiled, CUDA-graph ``RolloutEngine`` or transformers ``generate``);
``generate_and_score`` samples k responses per sample and grades them (training's held-out checks and
``papo eval`` share it)."""

from papo.rollout.engine import RolloutEngine, supports
from papo.rollout.graded import SampleResult, Summary, generate_and_score, summarize, summarize_scores, summary_table
from papo.rollout.hf import hf_generate
from papo.rollout.sampler import ENGINES, Sampler
from papo.rollout.sampling import Completions, SamplingParams

__all__ = ["ENGINES", "Completions", "RolloutEngine", "SampleResult", "Sampler", "SamplingParams", "Summary",
           "generate_and_score", "hf_generate", "summarize", "summarize_scores",
           "summary_table", "supports"]
