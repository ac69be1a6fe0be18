"""Real data and the ecosystem: a reward model with its own tokenizer, reward functions called as TRL calls
them, dataset configurations, column mapping, formatting functions, truncation, unknown-token warnings,
epochs and warmup ratios, LoRA ``all-linear`` on GPT-2 and OPT, and the experiment trackers.

Every model, tokenizer and dataset is written to a temporary directory by the test itself.
"""

import importlib.util
import json
import math
import sqlite3
import struct
import sys

import datasets
import numpy as np
import pytest
import torch
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from rlcore import lora, optim, tracking
from rlcore.config import TrainConfig
from rlcore.data import PROMPT_FORMATS, load_checked_rows, load_eval_rows, load_rows, tokenize_prompts, tokenize_sft
from rlcore.models import load_tokenizer, sequence_scores
from rlcore.rewards import RewardModelScorer, RewardScorer, TrainerState
from rlcore.toy import CHARACTERS, tiny_model, tiny_model_dir

# ---------------------------------------------------------------- a reward model with its own tokenizer

# Another vocabulary than the tiny policy's: other special tokens (ids 0..3), a BOS, the characters in reverse
# order (ids 4..99), and another chat template: "[role]content</s>" per message, "[assistant]" to generate.
RM_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
RM_CHARACTERS = tuple(reversed(CHARACTERS))
RM_TEMPLATE = (
    "{%- for message in messages %}{{ '[' + message['role'] + ']' + message['content'] + '</s>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '[assistant]' }}{%- endif %}"
)


def rm_ids(text: str) -> list[int]:
    """Hand tokenisation under the reward model's tokenizer: one id per character, 4 + its reversed index."""
    return [len(RM_SPECIALS) + RM_CHARACTERS.index(char) for char in text]


BOS, EOS = 1, 2  # <s>, </s> of the reward model's tokenizer


def reward_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(RM_SPECIALS + RM_CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in RM_SPECIALS])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=RM_TEMPLATE,
    )


@pytest.fixture(scope="module")
def own_tokenizer_reward_model(tmp_path_factory) -> str:
    """A small Llama sequence classifier over the reward tokenizer, with a random score head, saved with it."""
    directory = tmp_path_factory.mktemp("reward-model-own-tokenizer")
    tokenizer = reward_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def direct_scores(scorer: RewardModelScorer, rows: list[list[int]]) -> torch.Tensor:
    """Each row scored alone, unpadded: the reference the re-tokenising path must reproduce."""
    return torch.stack(
        [
            sequence_scores(scorer.model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
            for row in rows
        ]
    ).detach()


def test_a_reward_model_with_its_own_tokenizer_scores_the_text(own_tokenizer_reward_model):
    policy_tokenizer = load_tokenizer("tiny")
    scorer = RewardModelScorer(own_tokenizer_reward_model, policy_tokenizer, batch_size=2)
    assert not scorer.same_vocabulary
    prompts, completions = ["1+1=", "12+3=", "7+7="], ["2", "15", "1"]
    stop = policy_tokenizer.eos_token_id
    # row 0 and 1 stopped (policy EOS), row 2 was cut at max_new_tokens (no stop token): no reward-model EOS
    completion_ids = [policy_tokenizer(c)["input_ids"] + [stop] for c in completions[:2]] + [[5 + 17]]
    # by hand: <s> + prompt + completion (+ </s> when the policy stopped), in the reward model's own ids
    expected_ids = [
        [BOS] + rm_ids("1+1=2") + [EOS],
        [BOS] + rm_ids("12+3=15") + [EOS],
        [BOS] + rm_ids("7+7=1"),
    ]
    assert scorer.text_ids(prompts, completions, [True, True, False]) == expected_ids
    rewards, per_source = RewardScorer([], scorer)(prompts, completions, completion_ids, {})  # no token tensors needed
    torch.testing.assert_close(rewards, direct_scores(scorer, expected_ids), atol=1e-5, rtol=1e-5)
    assert per_source.shape == (3, 1)


def test_rows_longer_than_the_reward_model_are_scored_on_their_ends(own_tokenizer_reward_model):
    # the fixture's reward model has 128 positions: a 200-token row keeps its last 128 tokens (the completion
    # the score is read from), in both the re-tokenising path and the token-tensor path, with a warning
    scorer = RewardModelScorer(own_tokenizer_reward_model, load_tokenizer("tiny"))
    prompts, completions = ["1+" * 99 + "1=", "2+2="], ["100", "4"]
    with pytest.warns(UserWarning, match=r"1 of 2 rows are longer than its max_position_embeddings=128"):
        rewards, _ = RewardScorer([], scorer)(prompts, completions, [[5], [5]], {})
    long_row, short_row = scorer.text_ids(prompts, completions, [False, False])
    assert len(long_row) > 128
    torch.testing.assert_close(rewards, direct_scores(scorer, [long_row[-128:], short_row]), atol=1e-5, rtol=1e-5)
    # token tensors: left-padded prompt, right-padded completion, as a rollout holds them
    ids = torch.tensor(
        [[0] * 5 + long_row[:-3] + long_row[-3:], [0] * (len(long_row) - len(short_row) + 5) + short_row]
    )
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[5], [len(long_row) - len(short_row) + 5]])).long()
    with pytest.warns(UserWarning, match="1 of 2 rows"):
        torch.testing.assert_close(scorer(ids, mask), rewards, atol=1e-5, rtol=1e-5)


def test_a_reward_model_with_its_own_tokenizer_renders_its_own_chat_template(own_tokenizer_reward_model):
    policy_tokenizer = load_tokenizer("tiny")
    scorer = RewardModelScorer(own_tokenizer_reward_model, policy_tokenizer)
    prompts = [
        [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}],
        [{"role": "user", "content": "3+4="}],
    ]
    completions = [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "7"}]]
    # by hand: "[system]add</s>[user]1+1=</s>[assistant]2</s>", the template's ids, no BOS (the template has none)
    expected_ids = [
        rm_ids("[system]add") + [EOS] + rm_ids("[user]1+1=") + [EOS] + rm_ids("[assistant]2") + [EOS],
        rm_ids("[user]3+4=") + [EOS] + rm_ids("[assistant]7") + [EOS],
    ]
    assert scorer.text_ids(prompts, completions, [True, True]) == expected_ids
    rewards, _ = RewardScorer([], scorer)(prompts, completions, [[1], [1]], {})
    torch.testing.assert_close(rewards, direct_scores(scorer, expected_ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- reward functions as TRL calls them


def reward_len(prompts, completions):
    """The seed-style two-argument signature, returning numpy scalars."""
    return [np.float32(-len(completion)) for completion in completions]


def step_and_answer(completions, trainer_state, answer):
    return [trainer_state.global_step + trainer_state.epoch + int(a) for a in answer]


def fails_on_a_letter(prompts, completions, **kwargs):
    return [float(int(completion)) for completion in completions]  # ValueError on a non-number


def test_reward_functions_get_only_the_arguments_they_name_and_may_return_numpy():
    scorer = RewardScorer([("reward_len", reward_len), ("step_and_answer", step_and_answer)])
    rewards, per_source = scorer(
        ["1+1=", "2+2="],
        ["2", "41"],
        [[5], [6, 7]],
        {"answer": ["2", "4"], "source": ["a", "b"]},
        state=TrainerState(7, 0.5),
    )
    # reward_len: -1, -2; step_and_answer: 7 + 0.5 + answer = 9.5, 11.5
    assert per_source.tolist() == [[-1.0, 9.5], [-2.0, 11.5]] and rewards.tolist() == [8.5, 9.5]


def test_a_failing_reward_function_is_named_with_its_step_and_first_row():
    scorer = RewardScorer([("fails_on_a_letter", fails_on_a_letter)])
    with pytest.raises(
        ValueError,
        match=r"reward function 'fails_on_a_letter' raised at step 3, first on row 2 \(prompt '3\+3='\): ValueError",
    ):
        scorer(["1+1=", "2+2=", "3+3="], ["2", "4", "six"], [[5], [5], [5]], {}, state=TrainerState(3, 0.0))


# ---------------------------------------------------------------- data options


@pytest.fixture()
def hub_like_dataset(tmp_path):
    """A dataset directory laid out as on the hub: two named configurations declared in README.md."""
    for config, rows in {
        "standard": [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+5=", "answer": "7"}],
        "conversational": [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}],
    }.items():
        (tmp_path / config).mkdir()
        for split in ("train", "test"):
            (tmp_path / config / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(
            f"- config_name: {config}\n  data_files:\n"
            f"  - split: train\n    path: {config}/train.jsonl\n  - split: test\n    path: {config}/test.jsonl\n"
            for config in ("standard", "conversational")
        )
        + "---\n"
    )
    return str(tmp_path)


def test_dataset_config_picks_a_configuration(hub_like_dataset):
    assert load_rows(hub_like_dataset, "train", config_name="standard")["prompt"] == ["1+1=", "2+5="]
    held_out = load_eval_rows(hub_like_dataset, None, "test", None, PROMPT_FORMATS, config_name="conversational")
    assert held_out["prompt"] == [[{"role": "user", "content": "1+1="}]]
    with pytest.raises(ValueError, match="--dataset_config 'nope'.*Available"):
        load_rows(hub_like_dataset, "train", config_name="nope")
    with pytest.raises(ValueError, match="has no configurations"):
        load_rows("toy:prompt_only", "train", config_name="standard")


def test_columns_map_a_question_chosen_rejected_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    # without a mapping the question is silently not a prompt (implicit-prompt preferences); with it, it is
    assert "prompt" not in load_rows(str(path)).column_names
    rows = load_checked_rows(str(path), "train", None, ("preference",), columns="question=prompt")
    assert rows[0] == {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    with pytest.raises(ValueError, match=r"--columns: no column \['query'\]"):
        load_rows(str(path), columns="query=prompt")
    with pytest.raises(ValueError, match="already exist"):
        load_rows(str(path), columns="question=chosen")
    with pytest.raises(ValueError, match="expected OLD=NEW pairs"):
        load_rows(str(path), columns="question")


def test_formatting_function_from_a_file_makes_text_or_columns(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("1+1=", "2"), ("2+2=", "4")]))
    functions = tmp_path / "formats.py"
    functions.write_text(
        "def as_text(row):\n    return row['q'] + row['a']\n\n"
        "def as_pair(row):\n    return {'prompt': row['q'], 'completion': row['a']}\n\n"
        "def broken(row):\n    return row['missing']\n"
    )
    text = load_rows(str(path), formatting_func=f"{functions}:as_text")
    assert text.column_names == ["text"] and text["text"] == ["1+1=2", "2+2=4"]
    pairs = load_checked_rows(str(path), "train", None, ("prompt_completion",), formatting_func=f"{functions}:as_pair")
    assert pairs[1] == {"q": "2+2=", "a": "4", "prompt": "2+2=", "completion": "4"}
    with pytest.raises(ValueError, match="formatting function 'broken' failed on row 0: KeyError"):
        load_rows(str(path), formatting_func=f"{functions}:broken")
    assert load_rows(str(path), formatting_func="json:dumps")["text"][0] == '{"q": "1+1=", "a": "2"}'  # pkg.mod:fn


def test_unknown_tokens_are_named_at_load(recwarn):
    tokenizer = load_tokenizer("tiny")  # ASCII only: anything else is <|unk|>
    rows = datasets.Dataset.from_list(
        [{"prompt": "1+1= 😀", "completion": "二"}, {"prompt": "3+4=", "completion": "7"}]
    )
    with pytest.warns(
        UserWarning, match=r"tokenize_sft: 2 of 14 tokens \(14\.3%\) are the unknown token '<\|unk\|>'.*'二😀'"
    ):
        tokenize_sft(rows, tokenizer)
    with pytest.warns(UserWarning, match="tokenize_prompts: 1 of 10 tokens"):
        tokenize_prompts(rows, tokenizer)
    recwarn.clear()
    tokenize_sft(datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}]), tokenizer)
    assert not [w for w in recwarn if "unknown token" in str(w.message)]


# ---------------------------------------------------------------- epochs and warmup ratio


def test_num_train_epochs_sets_max_steps_and_warmup_ratio_the_warmup(capsys):
    model = torch.nn.Linear(2, 2)
    # 2.5 epochs of 10 rows at 4 rows per step: ceil(25 / 4) = 7 steps; warmup ceil(0.3 * 7) = 3 steps
    config = TrainConfig(num_train_epochs=2.5, warmup_ratio=0.3, lr_schedule="constant", lr=1.0)
    _, scheduler = optim.from_flags(model, config, num_rows=10, rows_per_step=4)
    assert config.max_steps == 7 and "-> 7 steps" in capsys.readouterr().out
    multipliers = [scheduler.lr_lambdas[0](step) for step in range(4)]
    assert multipliers == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert optim.steps_for_epochs(1, 8, 4) == 2 and optim.steps_for_epochs(0.1, 8, 4) == 1
    for bad, message in [
        (dict(warmup_ratio=1.0), "--warmup_ratio must be in"),
        (dict(num_train_epochs=0), "--num_train_epochs must be > 0"),
        (dict(truncation="left"), "--truncation must be one of"),
        (dict(report_to="mlflow"), "--report_to must be none"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


# ---------------------------------------------------------------- LoRA all-linear beyond Llama/Qwen


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=101,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
    )
    return OPTForCausalLM(config)


@pytest.mark.parametrize(
    "build, layer_names",
    [
        (gpt2, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),  # transformers' Conv1D, W stored [in, out]
        (opt, ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")),
        (lambda: tiny_model(), lora.DEFAULT_TARGETS),
    ],
    ids=["gpt2", "opt", "llama"],
)
def test_all_linear_wraps_every_linear_layer_but_the_head(build, layer_names, tmp_path):
    model = lora.prepare_model(build().eval(), lora_r=4, lora_targets="all-linear")  # eval: no dropout
    wrapped = {name for name, module in model.named_modules() if isinstance(module, lora.LoRALinear)}
    assert len(wrapped) == model.config.num_hidden_layers * len(layer_names) and all(
        name.endswith(layer_names) for name in wrapped
    )
    assert not isinstance(model.get_output_embeddings(), lora.LoRALinear)
    with torch.no_grad():
        for parameter in lora.lora_parameters(model):
            parameter.normal_(std=0.1)  # a non-zero update everywhere
    ids = torch.randint(5, 101, (2, 7))
    adapted = model(input_ids=ids).logits
    # the merged export is the same function: delta = scaling * B @ A laid out as each base weight
    lora.export_merged(model, None, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
    # and PEFT reads the adapter back to the same function (fan_in_fan_out for GPT-2's Conv1D)
    peft = pytest.importorskip("peft")
    lora.save_adapter(model, str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(build().eval(), str(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- trackers


def write_two_logs(tracker: tracking.Tracker) -> None:
    for step in (1, 2):
        tracker.update({"loss": torch.tensor(float(step)), "reward": 0.5 * step})
        tracker.log(step)
    tracker.log_eval(2, {"reward": 0.75})
    tracker.close()


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_two_logs(tracking.Tracker(tmp_path, 2, report_to="tensorboard", run_config={"lr": 1e-3}))
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    read = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("loss", "reward", "eval/reward")}
    assert read == {"loss": [(1, 1.0), (2, 2.0)], "reward": [(1, 0.5), (2, 1.0)], "eval/reward": [(2, 0.75)]}
    assert (tmp_path / "metrics.jsonl").exists()  # beside, not instead of, metrics.jsonl


def wandb_history(path) -> dict[int, dict]:
    """{step: logged values} from an offline run's .wandb file: a LevelDB-style log (a 7-byte W&B header, then
    32 KiB blocks of records with a 7-byte header each: crc32, length, type 1 = full / 2-4 = first-middle-last
    fragment) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    raw, position, fragments, history = path.read_bytes(), 7, [], {}
    while position + 7 <= len(raw):
        left = 32768 - position % 32768
        length, kind = struct.unpack("<HB", raw[position + 4 : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer or zero padding
            position += left
            continue
        fragments.append(raw[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(fragments))
            fragments = []
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_two_logs(tracking.Tracker(tmp_path / "run", 2, report_to=["wandb"], run_config={"lr": 1e-3}))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    assert wandb_history(runs[0]) == {1: {"loss": 1, "reward": 0.5}, 2: {"loss": 2, "reward": 1, "eval/reward": 0.75}}


def test_trackio_local_database_reads_back(tmp_path, monkeypatch):
    if importlib.util.find_spec("trackio") is None or "trackio" in sys.modules:
        pytest.skip("trackio is not installed, or was imported before its directory could be set")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    monkeypatch.setenv("TRACKIO_PROJECT", "rlcore-test")
    write_two_logs(tracking.Tracker(tmp_path / "run", 2, report_to="trackio", run_config={"lr": 1e-3}))
    with sqlite3.connect(tmp_path / "trackio" / "rlcore-test.db") as db:  # trackio keeps each project in SQLite
        rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
    logged = {}
    for run_name, step, metrics in rows:
        assert run_name == "run"
        logged.setdefault(step, {}).update(json.loads(metrics))
    assert logged == {1: {"loss": 1, "reward": 0.5}, 2: {"loss": 2, "reward": 1, "eval/reward": 0.75}}


def test_a_missing_tracker_is_one_line():
    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed")
    with pytest.raises(ValueError, match=r"--report_to trackio: .*pip install 'rlcore\[trackio\]'"):
        tracking.Tracker("unused", 1, report_to="trackio")


# ---------------------------------------------------------------- Online DPO with a reward model of its own tokenizer


@pytest.mark.parametrize(
    "recipe, flags, steps",
    [
        ("online_dpo", ["--batch_size", "4", "--max_steps", "2"], 2),  # the articles' setup: policy, reference, RM
        ("grpo", ["--batch_size", "4", "--num_generations", "2", "--max_steps", "1", "--beta", "0.1"], 1),
        ("ppo", ["--batch_size", "4", "--num_ppo_epochs", "1", "--max_steps", "1"], 1),
    ],
)
def test_online_recipes_with_a_reward_model_with_its_own_tokenizer(
    own_tokenizer_reward_model, tmp_path, recipe, flags, steps
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "answer": str(2 * a)} for a in range(12)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / recipe
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    load_recipe(recipe).main(
        [
            "--model", tiny_model_dir(), "--dataset", str(prompts), "--reward_model", own_tokenizer_reward_model,
            "--reward_funcs", "none", "--max_new_tokens", "4", "--logging_steps", "1", "--output_dir", str(output_dir),
            "--threads", "1", "--eval_split", "none", *flags, *(["--report_to", "tensorboard"] if tensorboard else []),
        ]
    )  # fmt: skip
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["rewards/reward_model/mean"]) and r["rewards/reward_model/std"] > 0 for r in train)
    assert AutoModelForCausalLM.from_pretrained(output_dir) is not None
    if tensorboard:
        assert list((output_dir / "runs").glob("events.out.tfevents.*"))
