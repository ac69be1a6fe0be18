"""Every recipe's held-out evaluation on every row format it accepts, on real-looking (non-numeric) text.

The data is written by the tests into tmp_path (jsonl files, parquet files and a ``save_to_disk``
directory with train/test splits); every run is the untrained tiny model for one optimizer step, so what is
checked is that evaluation runs and reports the right metrics on each format, not that anything is learnt:

==================  ==============================================================  ===================================
recipe              formats                                                         eval keys
==================  ==============================================================  ===================================
sft                 language_modeling, prompt_completion (plain and chat)           eval/loss, eval/token_accuracy
dpo, reward_model   preference, preference_implicit (plain and chat)                eval/accuracy, eval/margin, eval/loss
orpo                preference, preference_implicit (plain and chat)                eval/accuracy, eval/margin, eval/nll
kto                 unpaired_preference (plain and chat)                            eval/accuracy, eval/margin, eval/loss,
                                                                                    eval/kl
grpo, ppo,          every format with a prompt column: prompt_only,                 eval/reward, eval/reward/<function>
online_dpo          prompt_completion, preference, unpaired_preference (both)
==================  ==============================================================  ===================================

Also: where held-out rows come from (a single file has none unless --eval_dataset is given), a metric
file (--eval_metric), the final model saved before the final evaluation, and bad input reported in one
line before any training or warm start.
"""

import contextlib
import io
import json
import math
import time
from pathlib import Path

import datasets
import pytest
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--max_steps",
    "1",
    "--num_train_rows",
    "16",
    "--num_eval_rows",
    "8",
    "--batch_size",
    "4",
    "--eval_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--max_seconds",
    "none",
]
ONLINE = ("grpo", "ppo", "online_dpo")
ONLINE_FLAGS = {"grpo": ["--num_generations", "2"], "ppo": ["--num_ppo_epochs", "1"], "online_dpo": []}
EVAL_KEYS = {
    "sft": {"eval/loss", "eval/token_accuracy"},
    "dpo": {"eval/accuracy", "eval/margin", "eval/loss"},
    "reward_model": {"eval/accuracy", "eval/margin", "eval/loss"},
    **{name: {"eval/reward", "eval/reward/length_reward"} for name in ONLINE},
    "orpo": {"eval/accuracy", "eval/margin", "eval/nll"},
    "kto": {"eval/accuracy", "eval/margin", "eval/loss", "eval/kl"},
}
REWARDS_FILE = """
def length_reward(prompts, completions, **kwargs):
    return [len(c if isinstance(c, str) else c[-1]["content"]) / 10 for c in completions]
"""


# ---------------------------------------------------------------- the data: real-looking text, never an integer answer

PROMPTS = (
    "Name a colour:",
    "Describe the sky in a few words:",
    "What is on the kitchen table?",
    "Suggest a name for a small boat:",
    "Which fruit is sour?",
    "Say something about rain:",
)
COLOURS = ("blue", "green", "amber", "violet", "teal", "ochre", "crimson", "silver")


def _texts(index: int) -> tuple[str, str, str]:
    """(prompt, a good completion, a worse one) of row ``index``: text with numbers inside, never only a number."""
    prompt = f"{PROMPTS[index % len(PROMPTS)]} (case {index})"
    chosen = f"about {1325 + 37 * index} {COLOURS[index % len(COLOURS)]} things"
    rejected = f"no idea, sorry; maybe {COLOURS[(index + 3) % len(COLOURS)]}?"
    return prompt, chosen, rejected


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def make_row(kind: str, conversational: bool, index: int) -> dict:
    """One row of ``kind`` (rlcore.data's format table), plain text or message lists."""
    prompt, chosen, rejected = _texts(index)
    if conversational:
        system = [{"role": "system", "content": "You answer briefly."}] if index % 2 else []
        user, good, bad = system + _user(prompt), _assistant(chosen), _assistant(rejected)
    else:
        user, good, bad = prompt, " " + chosen, " " + rejected
    if kind == "language_modeling":
        return {"messages": user + good} if conversational else {"text": prompt + good}
    if kind == "prompt_only":
        return {"prompt": user, "topic": COLOURS[index % len(COLOURS)]}  # an extra column reaches the rewards
    if kind == "prompt_completion":
        return {"prompt": user, "completion": good}
    if kind == "preference":
        return {"prompt": user, "chosen": good, "rejected": bad}
    if kind == "preference_implicit":  # the prompt is the common prefix
        return (
            {"chosen": user + good, "rejected": user + bad}
            if conversational
            else {"chosen": prompt + good, "rejected": prompt + bad}
        )
    if kind == "unpaired_preference":
        return {"prompt": user, "completion": good if index % 2 == 0 else bad, "label": index % 2 == 0}
    raise ValueError(kind)


def make_rows(kind: str, conversational: bool, start: int, count: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([make_row(kind, conversational, index) for index in range(start, start + count)])


def write_rows(path: Path, rows: datasets.Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        rows.to_parquet(str(path))
    elif path.suffix == ".csv":
        rows.to_csv(str(path), index=False)
    else:
        rows.to_json(str(path), lines=True)
    return path


def write_dataset(directory: Path, kind: str, conversational: bool, storage: str = "jsonl") -> list[str]:
    """Write 16 training rows and 8 held-out rows of ``kind``; return the ``--dataset`` (+ ``--eval_dataset``) flags.

    storage: "jsonl", "parquet" or "csv" (a training file and a held-out file); "disk" (one ``save_to_disk``
    directory with train and test splits) or "files" (a directory holding train.jsonl and test.jsonl): their
    test split is evaluated on.
    """
    directory.mkdir(parents=True, exist_ok=True)
    train, heldout = make_rows(kind, conversational, 0, 16), make_rows(kind, conversational, 100, 8)
    if storage == "disk":
        datasets.DatasetDict({"train": train, "test": heldout}).save_to_disk(str(directory / "saved"))
        return ["--dataset", str(directory / "saved")]
    if storage == "files":
        write_rows(directory / "files" / "train.jsonl", train)
        write_rows(directory / "files" / "test.jsonl", heldout)
        return ["--dataset", str(directory / "files")]
    return [
        "--dataset",
        str(write_rows(directory / f"train.{storage}", train)),
        "--eval_dataset",
        str(write_rows(directory / f"heldout.{storage}", heldout)),
    ]


def recipe_flags(recipe: str, tmp_path: Path) -> list[str]:
    """The tiny budget of ``recipe``, its output directory and (online recipes) the length reward."""
    flags = ["--output_dir", str(tmp_path / "out"), *TINY_RUN]
    if recipe != "sft":
        flags += ["--warm_start_steps", "0"]
    if recipe in ONLINE:
        (tmp_path / "rewards.py").write_text(REWARDS_FILE)
        flags += [
            "--reward_funcs",
            f"{tmp_path / 'rewards.py'}:length_reward",
            "--max_new_tokens",
            "4",
            *ONLINE_FLAGS[recipe],
        ]
    return flags


def read_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def eval_records(output_dir: Path) -> list[dict]:
    return [record for record in read_records(output_dir) if any(key.startswith("eval/") for key in record)]


# ---------------------------------------------------------------- the matrix

PLAIN_AND_CHAT = (False, True)
CASES = (
    [("sft", kind, chat) for kind in ("language_modeling", "prompt_completion") for chat in PLAIN_AND_CHAT]
    + [
        (recipe, kind, chat)
        for recipe in ("dpo", "reward_model", "orpo")
        for kind in ("preference", "preference_implicit")
        for chat in PLAIN_AND_CHAT
    ]
    + [("kto", "unpaired_preference", chat) for chat in PLAIN_AND_CHAT]
    + [
        (recipe, kind, chat)
        for recipe in ONLINE
        for kind in ("prompt_only", "prompt_completion", "preference", "unpaired_preference")
        for chat in PLAIN_AND_CHAT
    ]
)
# The online recipes take the four prompt formats alike (rlcore.data.PROMPT_FORMATS, through rlcore.task): by
# default every format runs plain and chat with some online recipe, every online recipe at least once; the
# rest of the cross product is marked slow.
FAST_ONLINE = {
    ("grpo", "prompt_only", False),
    ("ppo", "prompt_only", True),
    ("online_dpo", "prompt_completion", False),
    ("grpo", "prompt_completion", True),
    ("grpo", "preference", False),
    ("online_dpo", "preference", True),
    ("online_dpo", "unpaired_preference", False),
    ("grpo", "unpaired_preference", True),
}
# a few cases read other storage than jsonl: parquet files, or a save_to_disk directory with a test split
STORAGE = {
    ("sft", "prompt_completion", False): "parquet",
    ("sft", "language_modeling", True): "disk",
    ("sft", "language_modeling", False): "csv",
    ("reward_model", "preference", False): "files",
    ("dpo", "preference", False): "disk",
    ("dpo", "preference_implicit", True): "parquet",
    ("reward_model", "preference", True): "disk",
    ("reward_model", "preference_implicit", False): "parquet",
    ("grpo", "prompt_only", False): "disk",
    ("ppo", "prompt_only", True): "parquet",
    ("online_dpo", "preference", True): "disk",
}


# ORPO reads pairs as DPO does: two of its four cases run by default
SLOW_ORPO = {("orpo", "preference", True), ("orpo", "preference_implicit", False)}


def _case(recipe: str, kind: str, chat: bool):
    slow = (recipe in ONLINE and (recipe, kind, chat) not in FAST_ONLINE) or (recipe, kind, chat) in SLOW_ORPO
    return pytest.param(
        recipe,
        kind,
        chat,
        marks=[pytest.mark.slow] if slow else [],
        id=f"{recipe}-{kind}-{'chat' if chat else 'plain'}-{STORAGE.get((recipe, kind, chat), 'jsonl')}",
    )


@pytest.mark.parametrize("recipe, kind, conversational", [_case(*case) for case in CASES])
def test_recipe_evaluates_format(tmp_path, recipe, kind, conversational):
    storage = STORAGE.get((recipe, kind, conversational), "jsonl")
    data_flags = write_dataset(tmp_path / "data", kind, conversational, storage)
    results = load_recipe(recipe).main([*recipe_flags(recipe, tmp_path), *data_flags])

    output_dir = tmp_path / "out"
    expected = EVAL_KEYS[recipe]  # exactly these: no generation metric off the toy task ("auto" means none)
    assert set(results) == expected, results
    evaluations = eval_records(output_dir)
    assert [record["step"] for record in evaluations] == [0, 1]
    for record in evaluations:
        assert set(record) == {"step", *expected}, record
        assert all(math.isfinite(record[key]) for key in expected), record
    assert {key: evaluations[-1][key] for key in expected} == results
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["first_eval"] == {key: evaluations[0][key] for key in expected}
    assert summary["last_eval"] == results
    assert (output_dir / "config.json").exists() and (output_dir / "model.safetensors").exists()
    loader = AutoModelForSequenceClassification if recipe == "reward_model" else AutoModelForCausalLM
    loader.from_pretrained(output_dir)
    if recipe in ("dpo", "reward_model", "orpo", "kto"):
        assert 0 <= results["eval/accuracy"] <= 1
    if recipe in ONLINE:  # every completion has a length: the per-function mean is the overall reward (weight 1)
        assert (
            results["eval/reward"] == pytest.approx(results["eval/reward/length_reward"])
            and results["eval/reward"] >= 0
        )


# ---------------------------------------------------------------- where the held-out rows come from


def _sft_heldout_metrics(rows: datasets.Dataset) -> dict[str, float]:
    """Held-out loss and token accuracy of the untrained tiny model on ``rows``, computed here."""
    from rlcore.data import tokenize_sft
    from rlcore.evaluation import sft_metrics
    from rlcore.models import load_policy

    model, tokenizer = load_policy("tiny")
    metrics = sft_metrics(model, tokenize_sft(rows, tokenizer, 256), tokenizer.pad_token_id, batch_size=4)
    return {f"eval/{key}": value for key, value in metrics.items()}


def _train_only(tmp_path: Path, layout: str) -> Path:
    """16 prompt_completion rows in ``layout``, with nothing held out."""
    rows = make_rows("prompt_completion", False, 0, 16)
    if layout == "disk":  # a DatasetDict saved with only a train split
        datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if layout == "files":  # a directory with one data file: its rows are the train split
        return write_rows(tmp_path / "files" / "data.jsonl", rows).parent
    return write_rows(tmp_path / f"train.{layout}", rows)


@pytest.mark.parametrize("layout", ["jsonl", "parquet", "csv", "disk", "files"])
def test_single_file_without_eval_dataset_evaluates_nothing_and_says_so(tmp_path, capsys, layout):
    train = _train_only(tmp_path, layout)
    results = load_recipe("sft").main(["--dataset", str(train), *recipe_flags("sft", tmp_path)])
    assert "no evaluation" in capsys.readouterr().out
    assert results == {} and eval_records(tmp_path / "out") == []  # never the training rows in disguise
    assert [record["step"] for record in read_records(tmp_path / "out")] == [1]
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("storage", ["jsonl", "disk"])
def test_evaluation_is_on_the_held_out_rows(tmp_path, capsys, storage):
    """The step-0 evaluation of the untrained model equals the metrics of the held-out rows (an --eval_dataset
    file, or the test split of a saved dataset), not those of the training rows."""
    data_flags = write_dataset(tmp_path / "data", "prompt_completion", False, storage)
    load_recipe("sft").main([*data_flags, *recipe_flags("sft", tmp_path)])
    assert "no evaluation" not in capsys.readouterr().out
    first = eval_records(tmp_path / "out")[0]
    heldout, train = (
        _sft_heldout_metrics(make_rows("prompt_completion", False, 100, 8)),
        _sft_heldout_metrics(make_rows("prompt_completion", False, 0, 8)),
    )
    assert first["step"] == 0
    for key, value in heldout.items():
        assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert first["eval/loss"] != pytest.approx(train["eval/loss"], rel=1e-4)


def test_saved_single_dataset_is_not_evaluated_on_its_training_rows(tmp_path, capsys):
    make_rows("prompt_completion", False, 0, 16).save_to_disk(str(tmp_path / "saved"))  # a Dataset, not a DatasetDict
    results = load_recipe("sft").main(["--dataset", str(tmp_path / "saved"), *recipe_flags("sft", tmp_path)])
    assert "no evaluation" in capsys.readouterr().out
    assert results == {} and eval_records(tmp_path / "out") == []


@pytest.mark.parametrize("source", ["toy:prompt_completion", "disk"])
def test_sliced_eval_split_of_a_split_source(tmp_path, source):
    from rlcore.data import load_eval_rows

    if source == "disk":
        source = write_dataset(tmp_path, "prompt_completion", False, "disk")[1]
    rows = load_eval_rows(source, None, "test[:4]", None, ("prompt_completion",))
    assert rows is not None and len(rows) == 4


# ---------------------------------------------------------------- a metric file, and the final model saved before the final evaluation

METRIC_FILE = '''
def word_overlap(prompts, completions, completion_ids, completion, **columns):
    """The fraction of the reference completion's words that the greedy completion contains (None: no words)."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(completion)
    scores = []
    for generated, reference in zip(completions, completion):
        words = reference.split()
        scores.append(sum(word in generated for word in words) / len(words) if words else None)
    return scores
'''

FAILING_METRIC_FILE = """
from pathlib import Path

COUNTER = Path(__file__).with_name("calls.txt")


def second_call_fails(prompts, completions, completion_ids, **columns):
    calls = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
    COUNTER.write_text(str(calls))
    if calls >= 2:
        raise RuntimeError("metric failure on call %d" % calls)
    return [0.5] * len(completions)
"""


def test_eval_metric_file_is_reported_by_sft(tmp_path):
    (tmp_path / "metric.py").write_text(METRIC_FILE)
    data_flags = write_dataset(tmp_path / "data", "prompt_completion", False)
    results = load_recipe("sft").main(
        [
            *data_flags,
            *recipe_flags("sft", tmp_path),
            "--eval_metric",
            f"{tmp_path / 'metric.py'}:word_overlap",
            "--max_new_tokens",
            "6",
        ]
    )
    assert set(results) == {"eval/loss", "eval/token_accuracy", "eval/word_overlap"}
    assert 0 <= results["eval/word_overlap"] <= 1
    assert [record["step"] for record in eval_records(tmp_path / "out") if "eval/word_overlap" in record] == [0, 1]


WORDS_METRIC_FILE = """
def completion_words(prompts, completions, completion_ids, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(text.split())) for text in texts]
"""


@pytest.mark.parametrize(
    "recipe, kind, conversational, reported",
    [
        ("sft", "prompt_completion", True, True),
        ("dpo", "preference", False, True),
        ("grpo", "prompt_only", True, True),
        ("sft", "language_modeling", False, False),  # no prompt to generate from: skipped, and the run says so
        ("dpo", "preference_implicit", True, False),
    ],
)
def test_eval_metric_file_in_every_recipe_that_generates(tmp_path, capsys, recipe, kind, conversational, reported):
    (tmp_path / "metric.py").write_text(WORDS_METRIC_FILE)
    data_flags = write_dataset(tmp_path / "data", kind, conversational)
    results = load_recipe(recipe).main(
        [
            *data_flags,
            *recipe_flags(recipe, tmp_path),
            "--eval_metric",
            f"{tmp_path / 'metric.py'}:completion_words",
            "--max_new_tokens",
            "4",
        ]
    )
    if reported:
        assert set(results) == EVAL_KEYS[recipe] | {"eval/completion_words"}
        assert 0 <= results["eval/completion_words"] <= 4
        assert [r["step"] for r in eval_records(tmp_path / "out") if "eval/completion_words" in r] == [0, 1]
    else:
        assert set(results) == EVAL_KEYS[recipe]
        assert "--eval_metric completion_words: the evaluation rows have no 'prompt' column" in capsys.readouterr().out


def test_final_model_is_saved_before_the_final_evaluation(tmp_path, capsys):
    (tmp_path / "metric.py").write_text(FAILING_METRIC_FILE)
    data_flags = write_dataset(tmp_path / "data", "prompt_completion", False)
    with pytest.raises(RuntimeError, match="metric failure on call 2"):
        load_recipe("sft").main(
            [
                *data_flags,
                *recipe_flags("sft", tmp_path),
                "--eval_metric",
                f"{tmp_path / 'metric.py'}:second_call_fails",
            ]
        )
    output_dir = tmp_path / "out"
    assert (tmp_path / "calls.txt").read_text() == "2"  # step 0 evaluated, the final evaluation failed
    assert (output_dir / "config.json").exists() and (output_dir / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(output_dir)
    assert "final evaluation failed" in capsys.readouterr().err
    assert json.loads((output_dir / "summary.json").read_text())["steps"] == 1


# ---------------------------------------------------------------- bad input: one line, before any training or warm start

RECIPES = ("sft", "dpo", "reward_model", "kto", "orpo", *ONLINE)
FORMAT_OF = {
    "sft": "prompt_completion",
    "dpo": "preference",
    "reward_model": "preference",
    "kto": "unpaired_preference",
    "orpo": "preference",
    **{name: "prompt_only" for name in ONLINE},
}


@pytest.fixture(autouse=True)
def _no_warm_start(monkeypatch):
    """Make the toy's SFT warm start fail loudly in every test here: a bad input must be reported before it,
    and the other runs here start from the untrained model (--warm_start_steps 0)."""

    def fail(model, steps, *args, **kwargs):
        if model == "tiny" and steps > 0:
            raise AssertionError("the warm start ran")
        return model

    from rlcore import toy

    monkeypatch.setattr(toy, "warm_start", fail)


def _bad_input_flags(recipe: str, tmp_path: Path) -> list[str]:
    """The recipe's tiny budget, with its default warm start left on (it must not be reached)."""
    flags = recipe_flags(recipe, tmp_path)
    index = flags.index("--warm_start_steps") if "--warm_start_steps" in flags else None
    return flags if index is None else flags[:index] + flags[index + 2 :]


@pytest.mark.parametrize("recipe", RECIPES)
def test_missing_dataset_file_is_named(tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_recipe(recipe).main(["--dataset", "missing.jsonl", *_bad_input_flags(recipe, tmp_path)])
    assert "missing.jsonl" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_missing_eval_dataset_file_is_named(tmp_path, recipe):
    train = write_rows(tmp_path / "train.jsonl", make_rows(FORMAT_OF[recipe], False, 0, 16))
    missing = tmp_path / "heldout.jsonl"
    with pytest.raises(FileNotFoundError, match="heldout.jsonl"):
        load_recipe(recipe).main(
            ["--dataset", str(train), "--eval_dataset", str(missing), *_bad_input_flags(recipe, tmp_path)]
        )


@pytest.mark.parametrize("recipe", RECIPES)
def test_wrong_columns_name_the_flag(tmp_path, recipe):
    wrong = write_rows(
        tmp_path / "wrong.jsonl",
        datasets.Dataset.from_list(
            [{"question": _texts(index)[0], "response": _texts(index)[1]} for index in range(4)]
        ),
    )
    with pytest.raises(ValueError) as error:
        load_recipe(recipe).main(["--dataset", str(wrong), *_bad_input_flags(recipe, tmp_path)])
    message = str(error.value)
    assert "--dataset" in message and str(wrong) in message and "missing columns" in message and "\n" not in message
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("recipe", ["sft", "dpo", "grpo"])
def test_wrong_format_for_the_recipe_names_the_flag(tmp_path, recipe):
    """A well-formed dataset of a format the recipe does not take (SFT given pairs, DPO and GRPO given text)."""
    kind = "preference" if recipe == "sft" else "language_modeling"
    rows = write_rows(tmp_path / "rows.jsonl", make_rows(kind, False, 0, 4))
    with pytest.raises(ValueError, match=f"--dataset .*got a {kind} dataset"):
        load_recipe(recipe).main(["--dataset", str(rows), *_bad_input_flags(recipe, tmp_path)])


@pytest.mark.parametrize("recipe", ["sft", "reward_model"])
def test_wrong_eval_dataset_columns_name_the_flag(tmp_path, recipe):
    train = write_rows(tmp_path / "train.jsonl", make_rows(FORMAT_OF[recipe], False, 0, 16))
    heldout = write_rows(tmp_path / "heldout.jsonl", datasets.Dataset.from_list([{"question": "Name a colour:"}] * 4))
    with pytest.raises(ValueError, match="--eval_dataset"):
        load_recipe(recipe).main(
            ["--dataset", str(train), "--eval_dataset", str(heldout), *_bad_input_flags(recipe, tmp_path)]
        )


@pytest.mark.parametrize("recipe", ONLINE)
def test_builtin_reward_without_its_column_fails_before_the_warm_start(tmp_path, recipe):
    """``--reward_funcs accuracy`` needs an ``answer`` column: reported at once, not after a 1500-step warm start."""
    train = write_rows(tmp_path / "train.jsonl", make_rows("prompt_only", False, 0, 16))
    stdout = io.StringIO()
    started = time.perf_counter()
    with pytest.raises(ValueError) as error, contextlib.redirect_stdout(stdout):
        load_recipe(recipe).main(
            [
                "--model",
                "tiny",
                "--dataset",
                str(train),
                "--output_dir",
                str(tmp_path / "out"),
                "--warm_start_steps",
                "1500",
                "--reward_funcs",
                "accuracy",
                *TINY_RUN,
                *ONLINE_FLAGS[recipe],
            ]
        )
    assert time.perf_counter() - started < 60
    message = str(error.value)
    assert "'accuracy'" in message and "'answer'" in message and "\n" not in message
    assert "warm start:" not in stdout.getvalue()
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
