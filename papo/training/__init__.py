"""Training: the RL step (``Trainer``), the loop around it (``loop.run_train``), checkpoints, the hacking
monitor, reports, fault injection, optimizers, RNG state, the distributed context, and ``papo sft``."""
