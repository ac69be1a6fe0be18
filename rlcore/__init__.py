"""rlcore: post-training for language models as pure functions on tensors.

The math API is re-exported flat from here; engines (toy, models, data, rollout, lora, checkpoint, ...)
live in their own submodules: ``from rlcore.rollout import generate``.
"""

__version__ = "0.1.0"
