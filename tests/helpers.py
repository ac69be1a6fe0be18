"""What several test files share: small models and prompts for the sampling tests, a per-module cache for the
tiny model, and loading a recipe or a benchmark as a module."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import Qwen2Config

REPO = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory):
    """Point the default cache (what "tiny" resolves to) at a temporary directory for the importing module."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("rlcore-cache")
        patch.setenv("RLCORE_CACHE", str(cache))
        yield cache


def load_script(path: Path, name: str) -> ModuleType:
    """A script (a recipe, a benchmark) as the module ``name``: its ``main(argv)`` runs in-process."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str) -> ModuleType:
    """recipes/<name>.py as a module."""
    return load_script(REPO / "recipes" / f"{name}.py", f"recipe_{name}")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module."""
    return load_script(REPO / "benchmarks" / f"{name}.py", name)


def lora_reward_model_dir(directory: Path, base: str = "tiny", seed: int = 0) -> Path:
    """A LoRA reward model on ``base`` laid out as ``recipes/reward_model.py --lora_r 4`` writes it: the merged
    sequence classifier in ``directory``, the adapter and its score head in ``directory/adapter``; random
    adapters and head, so that the scores depend on them."""
    from rlcore import checkpoint, lora, models

    model, tokenizer = models.load_reward_model(base)
    lora.prepare_model(model, lora_r=4, lora_targets="q_proj,v_proj,up_proj")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [*lora.lora_parameters(model)[1::2], model.score.weight]:
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    checkpoint.save_final_model(model, tokenizer, directory)
    return directory
