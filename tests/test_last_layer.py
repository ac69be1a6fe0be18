"""The last decoder layer at the scored positions only (rlcore.last_layer) against the full forward.

``models.body_hidden_states(..., positions=P)`` runs the last layer at P alone where
``models.scored_layer_unsupported`` allows; the reference is the same call with that check forced off (the
whole ``[B, L, H]`` forward, then the rows of P). Values and every parameter's gradient are compared in
float64 to 1e-10 (with eager attention the layer calls transformers' own eager function, softmax in float32),
for Llama (tied head) and Qwen2 (q/k/v biases) models, right- and left-padded rows, rows without a mask,
packed rows with a block mask, positions in any order, rows without a scored position, and LoRA layers.
"""

import pytest
import torch
from helpers import VOCAB, small_qwen2_config
from transformers import Qwen2ForCausalLM

from rlcore import last_layer, lora, models, packing, toy

TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}


def _model(kind: str, implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = toy.tiny_model() if kind == "llama" else Qwen2ForCausalLM(small_qwen2_config())
    model.set_attn_implementation(implementation)
    return model.double().train()


def _inputs(layout: str) -> dict[str, torch.Tensor | None]:
    """A [5, 9] batch: rows padded on the right or the left (lengths 9, 6, 9, 4, 7), no mask, or the same rows
    packed into rows with a block mask (rlcore.packing)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (5, 9), generator=generator)
    lengths = torch.tensor([9, 6, 9, 4, 7])
    columns = torch.arange(9)
    mask = (columns < lengths[:, None]).long() if layout != "left" else (columns >= 9 - lengths[:, None]).long()
    if layout == "none":
        return {"input_ids": input_ids, "attention_mask": None, "position_ids": None}
    if layout == "packed":
        return {"packed": packing.pack_batch(input_ids, mask, mask * (columns > 0), padding_free=True, row_length=18)}
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": models.position_ids_from_mask(mask)}


def _scored_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[N, 2] real positions in a shuffled order, none of row 2 (a row without a scored position)."""
    real = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
    real[2] = False
    positions = real.nonzero()
    keep = torch.randperm(len(positions), generator=torch.Generator().manual_seed(3))[: len(positions) * 2 // 3]
    return positions[keep]


def _hidden_and_grads(model, inputs, positions, monkeypatch, scored: bool):
    with monkeypatch.context() as patch:
        if not scored:
            patch.setattr(models, "scored_layer_unsupported", lambda model: "the reference")
        model.zero_grad()
        hidden = models.body_hidden_states(model, **inputs, positions=positions)  # [N, H]
    weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)
    (hidden * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return hidden.detach(), grads


@pytest.mark.parametrize(
    "kind,implementation,layout",
    [
        ("llama", "sdpa", "right"),
        ("llama", "sdpa", "left"),
        ("llama", "sdpa", "none"),
        ("llama", "sdpa", "packed"),
        ("llama", "eager", "right"),
        ("llama", "eager", "packed"),
        ("qwen2", "sdpa", "left"),
        ("qwen2", "eager", "packed"),
        ("lora", "sdpa", "right"),
    ],
)
def test_scored_last_layer_equals_the_full_forward(kind, implementation, layout, monkeypatch):
    if kind == "lora":
        model = lora.prepare_model(_model("llama", implementation), 4, 8, 0.0, "all-linear", False).double()
        for name, parameter in model.named_parameters():  # B starts at zero: move it so the adapters count
            if "lora" in name:
                parameter.data.normal_(0, 0.1)
    else:
        model = _model(kind, implementation)
    inputs = _inputs(layout)
    if "packed" in inputs:
        packed = inputs["packed"]
        inputs, positions = models.packed_inputs(model, packed), packed.positions
        assert packed.input_ids.shape[0] < 5  # rows were merged
    else:
        positions = _scored_positions(inputs["input_ids"], inputs["attention_mask"])
    assert models.scored_layer_unsupported(model) is None
    hidden, grads = _hidden_and_grads(model, inputs, positions, monkeypatch, scored=True)
    expected, expected_grads = _hidden_and_grads(model, inputs, positions, monkeypatch, scored=False)
    assert hidden.shape == (len(positions), model.config.hidden_size)
    torch.testing.assert_close(hidden, expected, **TOLERANCE)
    trained = [
        p for name, p in model.named_parameters() if p.requires_grad and "lm_head" not in name
    ]  # untied head: unused
    assert len(grads) == len(expected_grads) == len(trained)
    for grad, other in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, other, **TOLERANCE)


def test_query_slots_by_hand():
    """Positions (3, 5), (1, 2), (3, 7), (3, 6), (1, 4): rows 1 and 3 hold them, row 3 the most (3 slots).
    Row 1's slots read columns 2, 4 and (unused) its first, 2; row 3's 5, 7, 6. In the given order the
    positions sit at slots 1*3+0, 0*3+0, 1*3+1, 1*3+2, 0*3+1."""
    present, slot_columns, slot_of = last_layer.query_slots(
        torch.tensor([3, 1, 3, 3, 1]), torch.tensor([5, 2, 7, 6, 4])
    )
    assert present.tolist() == [1, 3]
    assert slot_columns.tolist() == [[2, 4, 2], [5, 7, 6]]
    assert slot_of.tolist() == [3, 0, 4, 5, 1]


def test_unsupported_models_take_the_full_forward(monkeypatch):
    """Where the last layer cannot run at the scored positions alone, the full forward gives the same states."""
    inputs = _inputs("right")
    positions = _scored_positions(inputs["input_ids"], inputs["attention_mask"])
    expected, _ = _hidden_and_grads(_model("llama", "sdpa"), inputs, positions, monkeypatch, scored=False)

    checkpointed = models.enable_gradient_checkpointing(_model("llama", "sdpa"))
    hooked = _model("llama", "sdpa")
    hooked.model.layers[-1].register_forward_hook(lambda module, args, output: None)
    cases = {
        "checkpoints its activations": checkpointed,
        "has forward hooks": hooked,
        "is compiled": torch.compile(_model("llama", "sdpa")),
    }
    for reason, model in cases.items():
        assert reason in models.scored_layer_unsupported(model)
        if reason != "is compiled":  # compiling is not needed to show the fall-back
            hidden, _ = _hidden_and_grads(model, inputs, positions, monkeypatch, scored=True)
            torch.testing.assert_close(hidden, expected, **TOLERANCE)
    flash = _model("llama", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    assert "takes no dense mask" in models.scored_layer_unsupported(flash)
    assert "is not one of" in models.scored_layer_unsupported(models.ValueModel(_model("llama", "sdpa"), 128))
