"""What a reward model with its own tokenizer costs: scoring the policy's ids vs re-tokenising the text.

Why: ``rlcore.rewards.RewardModelScorer`` scores the policy's token ids directly when the vocabularies match
(the fast path), and otherwise decodes nothing new but renders and tokenises prompt + completion with the
reward model's tokenizer (TRL's ``reward_processing_class``). Both paths run the same reward model here
(the tiny one; a second tokenizer with one extra token is "another vocabulary" while tokenising identically),
so the difference is the text work alone: tokenising, and for conversational prompts rendering the chat
template. Rows alternate fast / text, repeated, and the medians are compared within one run.

    python benchmarks/reward_tokenizer.py           # 256 completions of the toy prompts, 5 rounds (~1 minute)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from rlcore.data import collate_right, load_rows
from rlcore.models import load_reward_model, load_tokenizer
from rlcore.rewards import RewardModelScorer
from rlcore.run import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_reward_model("tiny")
    directory = tempfile.mkdtemp(prefix="rlcore-rm-")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    other = load_tokenizer("tiny")
    other.add_tokens(["<|tool|>"])  # another vocabulary, the same tokenisation of the toy text
    fast, text = RewardModelScorer(directory, tokenizer), RewardModelScorer(directory, other)
    assert fast.same_vocabulary and not text.same_vocabulary
    for kind in ("prompt_only", "conversational_prompt_only"):
        rows = load_rows(f"toy:{kind}", "train", args.rows)
        prompts = list(rows["prompt"])
        answers = [str(answer) for answer in rows["answer"]]
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": a}] for a in answers] if conversational else answers
        ids = text.text_ids(prompts, completions, [True] * len(prompts))  # the same ids under both tokenizers
        batch = collate_right(ids, None, tokenizer.pad_token_id)
        stop = [[tokenizer.eos_token_id]] * len(prompts)
        seconds = {"policy ids": [], "re-tokenised text": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            fast(batch["input_ids"], batch["attention_mask"])
            seconds["policy ids"].append(time.perf_counter() - start)
            start = time.perf_counter()
            text.score_text(prompts, completions, stop)
            seconds["re-tokenised text"].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        ratio = medians["re-tokenised text"] / medians["policy ids"]
        summary = ", ".join(f"{name} {1000 * value:.0f} ms" for name, value in medians.items())
        print(f"{kind}, {args.rows} completions: {summary} (text / ids = {ratio:.2f})")


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
