"""papo: Perception-Aware Policy Optimization (PAPO) for vision-language models."""

__version__ = "0.1.0"
