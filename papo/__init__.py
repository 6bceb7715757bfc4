"""papo: Perception-Aware Policy Optimization (PAPO) for vision-language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # papo.train(...) without importing torch and transformers at ``import papo``
    if name == "train":
        from papo.api import train

        return train
    raise AttributeError(f"module 'papo' has no attribute {name!r}")
