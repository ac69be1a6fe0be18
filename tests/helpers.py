"""Small models and prompts shared by the sampling tests (tests/test_rollout.py, tests/test_decode.py)."""

import torch
from transformers import Qwen2Config

VOCAB = 101
PAD = 0


def small_qwen2_config(**overrides) -> Qwen2Config:
    """A 2-layer Qwen2 with grouped-query attention (4 heads, 2 key/value heads) over VOCAB tokens."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return Qwen2Config(**{**settings, **overrides})


def ragged_prompts(batch: int = 5, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths 1..length (row 0 has length 1, the last row the full length)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    lengths = torch.linspace(1, length, batch).round().long()
    mask = (torch.arange(length) >= length - lengths[:, None]).long()  # [B, P]
    return ids.masked_fill(mask == 0, PAD), mask
