"""Loading policies, reward models and value models; sequence scores; stop tokens."""

import os

import pytest
import torch
from helpers import tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModel, GenerationConfig

from rlcore import last_valid_index
from rlcore.models import (
    ValueModel,
    eos_token_ids,
    load_policy,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    sequence_scores,
)
from rlcore.toy import tiny_tokenizer


@pytest.fixture(scope="module")
def reward_model():
    torch.manual_seed(0)
    model, tokenizer = load_reward_model("tiny")
    return model.eval(), tokenizer


def test_resolve_model(tiny_cache, tmp_path, monkeypatch):
    assert resolve_model("tiny") == os.path.join(str(tiny_cache), "tiny-v1")
    monkeypatch.chdir(tmp_path)
    os.mkdir("local-model")
    with pytest.raises(ValueError, match="'local-model' is not a model directory"):  # an empty directory
        resolve_model("local-model")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model("./missing-model")
    (tmp_path / "local-model" / "config.json").write_text("{}")
    assert resolve_model("local-model") == str(tmp_path / "local-model")
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ValueError, match="'tiny', a directory or a hub id"):
        resolve_model("")


def test_load_policy_dtypes_and_pad():
    model, tokenizer = load_policy("tiny")
    assert model.dtype == torch.float32 and model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert type(tokenizer).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert load_policy("tiny", dtype="bfloat16")[0].dtype == torch.bfloat16
    assert load_policy("tiny", dtype=torch.float16)[0].dtype == torch.float16
    assert load_policy("tiny", dtype="auto")[0].dtype == torch.float32  # as saved
    assert load_policy("tiny", attn_implementation="eager")[0].config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="dtype must be None, 'auto'"):
        load_policy("tiny", dtype="float33")


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="has no pad token; using its EOS token"):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id == 1


def test_eos_token_ids():
    tokenizer = tiny_tokenizer()
    assert eos_token_ids(tokenizer) == [1, 3]  # <|endoftext|>, <|im_end|>
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=[3, 7])) == [1, 3, 7]
    assert eos_token_ids(tokenizer, GenerationConfig(eos_token_id=9)) == [1, 3, 9]


def test_last_valid_index_by_hand_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])
    assert last_valid_index(mask).tolist() == [1, 2, 0, 2]


def test_reward_model_scores_last_attended_token(reward_model):
    model, tokenizer = reward_model
    assert model.score.weight.shape == (1, 128) and model.config.pad_token_id == 0
    ids = tokenizer("37+85=122")["input_ids"]
    alone = sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    # The same sequence right- and left-padded, padding filled with the EOS id (as when pad == eos):
    right = torch.tensor([ids + [1, 1]]), torch.tensor([[1] * len(ids) + [0, 0]])
    left = torch.tensor([[1, 1] + ids]), torch.tensor([[0, 0] + [1] * len(ids)])
    with torch.no_grad():
        assert torch.allclose(sequence_scores(model, *right), alone, atol=1e-5)
        position_ids = (left[1].cumsum(1) - 1).clamp(min=0)
        backbone_left = model.model(input_ids=left[0], attention_mask=left[1], position_ids=position_ids)
        assert torch.allclose(model.score(backbone_left.last_hidden_state[:, -1]).squeeze(-1), alone, atol=1e-5)
        # With the true pad id, the model's own pooling agrees with sequence_scores.
        padded = torch.tensor([ids + [0, 0]])
        assert torch.allclose(model(padded, attention_mask=right[1]).logits.squeeze(-1), alone, atol=1e-5)
    assert alone.shape == (1,) and alone.requires_grad


def test_sequence_scores_checks_shapes(reward_model):
    model, _ = reward_model
    with pytest.raises(ValueError, match="must both be"):
        sequence_scores(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_value_model_starts_at_zero_and_round_trips(tmp_path):
    value_model = ValueModel.from_pretrained("tiny")
    ids = torch.tensor([[20, 21, 22, 0], [23, 24, 25, 26]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    values = value_model(ids, mask)
    assert values.shape == (2, 4) and torch.equal(values, torch.zeros(2, 4))  # zero-initialised head
    with torch.no_grad():
        value_model.value_head.weight.normal_()
        value_model.value_head.bias.fill_(0.5)
        values = value_model(ids, mask)
    value_model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "value_head.safetensors")
    reloaded = ValueModel.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask), values)
    assert type(AutoModel.from_pretrained(str(tmp_path))).__name__ == "LlamaModel"  # the backbone alone
