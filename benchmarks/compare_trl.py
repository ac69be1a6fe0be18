"""rlcore against TRL: the same model, data, hyperparameters and budget, side by side, in one run.

Three measurements, each framework in its own subprocess (so that peak memory is the process's own):

1. **Seconds per training step** (one optimizer step; for GRPO, sampling included) of SFT, DPO and GRPO:
   the wall time between the ends of consecutive steps (rlcore: the recipe hands the step's metrics to its
   ``Tracker``; TRL: the ``on_step_end`` callback; CUDA synchronised), median over ``--timing_steps``
   steps after ``--timing_warmup`` steps. Runs alternate rlcore, TRL, TRL, rlcore, ... (``--rounds``), so a
   change of machine load hits both. For GRPO the table also shows the mean reward of the timed steps: the
   two are comparable when their policies succeed about as often (rlcore skips the backward pass of groups
   whose rewards are all equal, which carry no gradient when beta is 0).
2. **Peak memory** of the timing runs: the subprocess's peak resident set size (``ru_maxrss``: interpreter,
   libraries, models, data, training), or ``torch.cuda.max_memory_allocated`` on CUDA.
3. **Toy test accuracy after the same wall-clock budget**: SFT for 180 s from the untrained model, GRPO
   for 300 s from one shared SFT checkpoint (times ``--budget_scale``); the final model of each framework
   is saved, reloaded and scored by the same function, ``rlcore.evaluation.greedy_metric`` with ``rlcore.toy.exact_match`` (greedy, the 500
   held-out problems). rlcore stops with ``--max_seconds``, TRL with a callback on the same clock.
   ``--seeds 0,1,2`` repeats each comparison per seed (the training seed of both frameworks: data order,
   and sampling in GRPO; the starting weights are the same) and adds a mean row: on the toy task one SFT
   run's accuracy varies by tens of points from seed to seed, so a single seed compares luck.

Both frameworks get the same settings: the defaults of the rlcore recipes' config dataclasses (read at run
time, listed under "settings" in results.json): learning rate and schedule, warmup, AdamW betas, weight
decay, gradient clipping, batch size, steps, sequence and completion lengths, beta, loss type. rlcore gets
them as command-line flags of ``recipes/{sft,dpo,grpo}.py``, TRL as ``SFTConfig`` / ``DPOConfig`` /
``GRPOConfig`` (TRL 1.x API, the model object and tokenizer passed in, ``report_to="none"``, no vLLM).
TRL's defaults that rlcore does not share are switched off: activation (gradient) checkpointing, and bf16
on CPU (float32 for both; bf16 autocast for both on CUDA). rlcore's recipes compute subnormal floats as zero
on CPU (``--flush_denormal``, their default: x86 is slow on them); TRL runs as installed, or with the same
setting under ``--trl_flush_denormal``. DPO trains on the dataset's pairs in both
(``--no-rejected_from_policy``) against a frozen copy of the starting model. Its step time is measured
twice (``--dpo_reference``), the same way in both frameworks: reference log-probs recomputed in every step
("ref live", TRL's default), and computed once before training ("ref precomputed": rlcore
``--precompute_ref``, TRL ``precompute_ref_log_probs=True``; that pass is left out of the step times). GRPO (recipe defaults): 64 completions per step, 8 per prompt, at
most 8 new tokens, beta 0 (no reference model), loss "dapo", rewards from ``rlcore.toy.accuracy_reward``.

Models (``--models``): ``tiny`` (the embedded 1M-parameter Llama), ``20m`` (19M parameters, the same
architecture and tokenizer), ``qwen0.5b`` (Qwen2.5-0.5B's shape with random weights, for a GPU). DPO and
GRPO start from an SFT checkpoint of each model (``recipes/sft.py --max_steps N``, N = ``--start_sft_steps``,
built once, untimed), as in practice; ``--start_sft_steps 0`` starts them from the raw model. The GRPO
accuracy comparison on the tiny model starts both frameworks from the checkpoint ``python recipes/grpo.py``
itself starts from (``rlcore.toy.warm_start``: an SFT run stopped mid-schedule, ~40-50% accuracy), and
the table shows its accuracy.

GPU path (``--device cuda``): bf16 autocast, rlcore's defaults (``torch.compile`` on CUDA; the first
steps compile and are left out by ``--timing_warmup``), and GRPO with 16 prompts x 8 completions x 256 new
tokens per step (micro-batches of 32 completions). From the raw model every completion runs to the full 256
tokens in both frameworks.

Run from the repository root, with the bench extra installed (``pip install -e ".[bench]"``):

    python benchmarks/compare_trl.py --quick --models tiny --threads 1         # smoke run, ~5 min
    python benchmarks/compare_trl.py                                          # full CPU run, ~40 min on 2 idle cores
    python benchmarks/compare_trl.py --models tiny --parts none --accuracy sft --seeds 0,1,2,3,4 --threads 1
    python benchmarks/compare_trl.py --device cuda --models qwen0.5b --accuracy none --start_sft_steps 0 --timing_warmup 5

On a machine busy with other work, ``--threads 1``: torch's OpenMP threads spin while they wait for a core,
and with more threads than free cores a step can take 100 times longer. The load average is printed. Where
other jobs share the cores, wall-clock steps vary twofold with their load; ``--clock process`` times each
step by the worker process's CPU time instead (with ``--threads 1``, the work of the step itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # rlcore from this checkout, installed or not

from rlcore.config import parse_config  # noqa: E402

FRAMEWORKS = ("rlcore", "trl")
PARTS = ("sft", "dpo", "grpo")
GOALS = {"sft": 0.8, "dpo": 0.6, "grpo": 0.33}  # target rlcore / TRL seconds per step
ACCURACY_BUDGETS = {"sft": 180.0, "grpo": 300.0}  # seconds of training before the accuracy is measured

MODEL_SHAPES = {  # overrides of rlcore.toy.tiny_config
    "tiny": {},
    "20m": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    ),
    "qwen0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151_936,
        max_position_embeddings=1024,
    ),
}

# The settings given to both frameworks: the defaults of the rlcore recipes' config dataclasses, read at run time.
RECIPE_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}
SHARED_SETTINGS = (
    "dataset",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "weight_decay",
    "max_grad_norm",
    "batch_size",
    "grad_accum_steps",
    "max_steps",
    "logging_steps",
    "seed",
)
PART_SETTINGS = {
    "sft": ("max_length",),
    "dpo": ("max_length", "beta", "loss_type"),
    "grpo": ("num_generations", "max_new_tokens", "beta", "temperature", "loss_type", "scale_rewards"),
}
DPO_REFERENCES = {"live": {}, "precomputed": {"precompute_ref": True}}  # --dpo_reference -> DPO settings of both
CUDA_OVERRIDES = {"grpo": dict(batch_size=32, grad_accum_steps=4, max_new_tokens=256)}  # 16 prompts x 8 x 256


@dataclass
class CompareConfig:
    """rlcore against TRL: seconds per step, peak memory, accuracy at equal wall time."""

    models: str = "tiny,20m"  # comma-separated: tiny, 20m, qwen0.5b
    parts: str = "sft,dpo,grpo"  # trainers whose step time and memory are measured ("none" to skip)
    dpo_reference: str = "live,precomputed"  # DPO timing rows: reference log-probs per step ("live") or once up front
    accuracy: str = "sft,grpo"  # equal-budget accuracy comparisons to run ("none" to skip)
    accuracy_models: str = "tiny"  # models of the accuracy comparisons
    budget_scale: float = 1.0  # multiplies the accuracy budgets (SFT 180 s, GRPO 300 s)
    seeds: str = "0"  # comma-separated seeds of the accuracy runs: one run of each framework per seed
    timing_warmup: int = 3  # optimizer steps left out of the timing
    timing_steps: int = 20  # optimizer steps timed per run
    rounds: int = 2  # timing runs per framework, alternating (rlcore, TRL, TRL, rlcore, ...)
    start_sft_steps: int = 300  # SFT steps of the checkpoint DPO and GRPO start from (0 = the raw model)
    grpo_accuracy_start: str = (
        "recipe"  # GRPO accuracy run of tiny: "recipe" (recipes/grpo.py's own SFT warm start) or "shared"
    )
    quick: bool = False  # smoke run: 1 warm-up + 3 timed steps, 1 round, budgets x0.05, a 20-step SFT start for all
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int | None = None  # torch threads per subprocess (None = torch's default: every core)
    trl_flush_denormal: bool = False  # TRL too computes subnormal floats as 0 on CPU, as rlcore's recipes do
    clock: str = "wall"  # step time: "wall" (perf_counter) or "process" (the worker's CPU time; CPU only)
    rlcore_flags: str = ""  # more flags for every rlcore run, e.g. "--compile true" (TRL runs as compared)
    output_dir: str = "outputs/compare_trl"  # models, runs, logs and results.json

    def __post_init__(self) -> None:
        for name, valid in (
            ("models", MODEL_SHAPES),
            ("parts", PARTS),
            ("dpo_reference", DPO_REFERENCES),
            ("accuracy", ACCURACY_BUDGETS),
            ("accuracy_models", MODEL_SHAPES),
        ):
            unknown = set(_names(getattr(self, name))) - set(valid)
            if unknown:
                raise ValueError(
                    f"--{name}: unknown {sorted(unknown)}; expected a comma-separated subset of {list(valid)}"
                )
        if self.grpo_accuracy_start not in ("recipe", "shared"):
            raise ValueError(f"--grpo_accuracy_start must be recipe or shared, got {self.grpo_accuracy_start!r}")
        if self.clock not in ("wall", "process") or (self.clock == "process" and self.device == "cuda"):
            raise ValueError(f"--clock must be wall or process (process only on CPU), got {self.clock!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        try:
            self.seed_list = [int(seed) for seed in _names(self.seeds)]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from None
        if not self.seed_list:
            raise ValueError("--seeds needs at least one seed")
        if self.timing_steps < 1 or self.timing_warmup < 0 or self.rounds < 1 or self.budget_scale <= 0:
            raise ValueError("--timing_steps and --rounds must be >= 1, --timing_warmup >= 0, --budget_scale > 0")
        if self.quick:
            self.timing_warmup, self.timing_steps, self.rounds = 1, 3, 1
            self.budget_scale, self.start_sft_steps = 0.05, min(self.start_sft_steps, 20)
            self.grpo_accuracy_start = "shared"


def _names(text: str) -> list[str]:
    return [] if text == "none" else [name.strip() for name in text.split(",") if name.strip()]


def hyperparameters(part: str, device: str) -> dict:
    """The recipe's default settings that both frameworks are given (with the GPU path's overrides)."""
    defaults = dataclasses.asdict(parse_config(getattr(import_recipe(part), RECIPE_CONFIGS[part]), []))
    settings = {name: defaults[name] for name in SHARED_SETTINGS + PART_SETTINGS[part]}
    if not settings["dataset"].startswith("toy:"):
        raise ValueError(
            f"recipes/{part}.py's default dataset is {settings['dataset']!r}; this benchmark needs a toy dataset"
        )
    settings["dataset"] = settings["dataset"].removeprefix("toy:")
    return {**settings, **(CUDA_OVERRIDES.get(part, {}) if device == "cuda" else {})}


def import_recipe(part: str):
    """The module recipes/<part>.py (recipes are scripts, not a package)."""
    module_name = f"rlcore_recipe_{part}"
    if module_name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(module_name, REPO / "recipes" / f"{part}.py")
        recipe = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = recipe  # dataclasses look their module up while the class is built
        module_spec.loader.exec_module(recipe)
    return sys.modules[module_name]


# ----------------------------------------------------------------------------------------------------------
# the parent: models, subprocesses, tables


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(CompareConfig, argv)
    output_dir = Path(config.output_dir).resolve()
    load_before = os.getloadavg()
    results = {"config": dataclasses.asdict(config), "settings": {}, "timing": [], "accuracy": []}
    timed = [(model, part) for model in _names(config.models) for part in _names(config.parts)]
    scored = [(model, stage) for model in _names(config.accuracy_models) for stage in _names(config.accuracy)]
    for part in dict.fromkeys(part for _, part in timed + scored):
        check_rlcore_flags(part, config.rlcore_flags)
    start_dirs = {}  # model -> {"raw": its directory, "sft": the SFT checkpoint DPO and GRPO start from}
    for model in dict.fromkeys(model for model, _ in timed + scored):
        model_dir = build_model(model, output_dir / "models")
        needs_sft = any(name == model and part != "sft" for name, part in timed + scored)
        start_dirs[model] = {
            "raw": model_dir,
            "sft": sft_start(model, model_dir, config, output_dir) if needs_sft else None,
        }

    settings = results["settings"]
    for part in dict.fromkeys(part for _, part in timed + scored):
        settings[part] = hyperparameters(part, config.device)
    for model, part in timed:
        start = start_dirs[model]["raw" if part == "sft" else "sft"]
        for variant, extra in timing_variants(part, config):
            results["timing"].append(
                time_part(model, part, variant, start, {**settings[part], **extra}, config, output_dir)
            )
    for model, stage in scored:
        start = start_dirs[model]["raw" if stage == "sft" else "sft"]
        if stage == "grpo" and model == "tiny" and config.grpo_accuracy_start == "recipe":
            start = recipe_warm_start(config)
        for seed in config.seed_list:
            settings_of_seed = {**settings[stage], "seed": seed}
            results["accuracy"].append(compare_accuracy(model, stage, start, settings_of_seed, config, output_dir))

    results["load_average"] = {"start": load_before, "end": os.getloadavg()}
    print_tables(results, config)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {output_dir / 'results.json'}")
    return results


def check_rlcore_flags(part: str, flags: str) -> None:
    """Parse ``--rlcore_flags`` as recipes/<part>.py would, before anything runs (a bad one: one line)."""
    said = io.StringIO()  # argparse's own line, without its program name, goes into ours
    try:
        with contextlib.redirect_stderr(said):
            parse_config(getattr(import_recipe(part), RECIPE_CONFIGS[part]), flags.split())
    except (ValueError, SystemExit) as error:
        reason = str(error) if isinstance(error, ValueError) else said.getvalue().strip().split(": error: ", 1)[-1]
        reason = reason.replace("(--help lists the valid flags)", f"(python recipes/{part}.py --help lists them)")
        raise ValueError(f"--rlcore_flags for recipes/{part}.py: {reason}") from None


def build_model(name: str, directory: Path) -> str:
    """The tiny model's cached directory, or a larger model of the same architecture saved once."""
    from rlcore.toy import tiny_model, tiny_model_dir, tiny_tokenizer

    if name == "tiny":
        return tiny_model_dir()
    path = directory / name
    if not (path / "config.json").exists():
        tiny_model(**MODEL_SHAPES[name]).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def sft_start(model: str, model_dir: str, config: CompareConfig, output_dir: Path) -> str:
    """The shared starting checkpoint of DPO and GRPO: ``recipes/sft.py --max_steps N`` (built once)."""
    if config.start_sft_steps == 0:
        return model_dir
    path = output_dir / "models" / f"{model}-sft{config.start_sft_steps}"
    if not (path / "config.json").exists():
        print(f"[{model}] SFT start checkpoint: {config.start_sft_steps} steps of recipes/sft.py", flush=True)
        argv = rlcore_flags("sft", hyperparameters("sft", config.device), model_dir, str(path), config.device)
        argv += ["--max_steps", str(config.start_sft_steps), "--eval_split", "none"]
        run_logged(
            [sys.executable, str(REPO / "recipes" / "sft.py"), *argv], output_dir / "logs" / f"{path.name}.log", config
        )
    return str(path)


def recipe_warm_start(config: CompareConfig) -> str:
    """The SFT checkpoint that ``python recipes/grpo.py`` starts from on the tiny model (built once, cached)."""
    from rlcore.config import ONLINE_WARM_START_FLAGS
    from rlcore.toy import warm_start

    steps = parse_config(import_recipe("grpo").GRPOConfig, []).warm_start_steps
    return warm_start("tiny", steps, 0, REPO / "recipes" / "sft.py", ONLINE_WARM_START_FLAGS)


def timing_variants(part: str, config: CompareConfig) -> list[tuple[str, dict]]:
    """(label, settings given to both frameworks on top of the recipe's) of each timing row of ``part``."""
    if part != "dpo":
        return [("", {})]
    return [(f"ref {name}", DPO_REFERENCES[name]) for name in _names(config.dpo_reference)]


def time_part(
    model: str, part: str, variant: str, model_dir: str, settings: dict, config: CompareConfig, output_dir: Path
) -> dict:
    """Seconds per step (median of the pooled timed steps) and peak memory of each framework."""
    step_seconds, peak_mib, rewards = ({name: [] for name in FRAMEWORKS} for _ in range(3))
    for round_index in range(config.rounds):
        for framework in FRAMEWORKS if round_index % 2 == 0 else FRAMEWORKS[::-1]:
            print(f"[{model}] {part}: {framework} timing run {round_index + 1}/{config.rounds}", flush=True)
            spec = dict(
                framework=framework,
                part=part,
                model_dir=model_dir,
                device=config.device,
                threads=config.threads,
                flush_denormal=framework == "rlcore" or config.trl_flush_denormal,
                clock=config.clock,
                hyper=settings,
                steps=config.timing_warmup + config.timing_steps + 1,
                budget_seconds=None,
                extra_flags=config.rlcore_flags.split() if framework == "rlcore" else [],
            )
            run_name = "-".join(filter(None, [model, part, variant.replace(" ", "_"), framework, f"time{round_index}"]))
            result = run_worker(spec, output_dir / "runs" / run_name, config)
            step_seconds[framework] += result["step_seconds"][config.timing_warmup :]
            peak_mib[framework].append(result["peak_mib"])
            if result["mean_reward"] is not None:
                rewards[framework].append(result["mean_reward"])
    row = {"model": model, "part": part, "variant": variant, "load_1min": os.getloadavg()[0]}
    for framework in FRAMEWORKS:
        row[f"{framework}_step_s"] = statistics.median(step_seconds[framework])
        row[f"{framework}_peak_mib"] = max(peak_mib[framework])
        row[f"{framework}_reward"] = statistics.fmean(rewards[framework]) if rewards[framework] else None
    row["ratio"] = row["rlcore_step_s"] / row["trl_step_s"]
    return row


def compare_accuracy(
    model: str, stage: str, model_dir: str, settings: dict, config: CompareConfig, output_dir: Path
) -> dict:
    """Toy test accuracy of each framework after the same training wall time from the same model."""
    budget, seed = ACCURACY_BUDGETS[stage] * config.budget_scale, settings["seed"]
    row = {"model": model, "stage": stage, "budget_s": budget, "seed": seed}
    order = FRAMEWORKS if config.seed_list.index(seed) % 2 == 0 else FRAMEWORKS[::-1]  # alternate who runs first
    for framework in order:
        print(f"[{model}] {stage}, seed {seed}: {framework} for {budget:.0f} s of training", flush=True)
        spec = dict(
            framework=framework,
            part=stage,
            model_dir=model_dir,
            device=config.device,
            threads=config.threads,
            flush_denormal=framework == "rlcore" or config.trl_flush_denormal,
            hyper=settings,
            steps=None,
            budget_seconds=budget,
            extra_flags=config.rlcore_flags.split() if framework == "rlcore" else [],
        )
        result = run_worker(spec, output_dir / "runs" / f"{model}-{stage}-{framework}-seed{seed}-budget", config)
        row[f"{framework}_steps"], row[f"{framework}_accuracy"] = result["steps"], result["accuracy"]
    row["start"] = "untrained" if stage == "sft" else Path(model_dir).name
    row["start_accuracy"] = None if stage == "sft" else toy_test_accuracy(model_dir, config.device)
    return row


def run_worker(spec: dict, run_dir: Path, config: CompareConfig, timeout: float | None = None) -> dict:
    """Run one measured training in a fresh python process; return what it wrote to result.json.
    ``timeout``: seconds, after which the worker is killed (``subprocess.TimeoutExpired``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    (run_dir / "spec.json").write_text(json.dumps({**spec, "output_dir": str(run_dir / "model")}, indent=2))
    run_logged([sys.executable, __file__, "--worker", str(run_dir)], run_dir / "worker.log", config, timeout)
    return json.loads((run_dir / "result.json").read_text())


def run_logged(command: list[str], log_path: Path, config: CompareConfig, timeout: float | None = None) -> None:
    """Run ``command`` with its output in ``log_path``; on failure, show the log's tail and stop."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if config.threads is not None:
        env["OMP_NUM_THREADS"] = str(config.threads)
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
    if finished.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {finished.returncode}); end of {log_path}:\n{tail}")


def print_tables(results: dict, config: CompareConfig) -> None:
    import torch
    import transformers
    import trl

    threads = config.threads or torch.get_num_threads()
    load = results["load_average"]
    print(
        f"\nrlcore vs TRL {trl.__version__} | torch {torch.__version__}, transformers {transformers.__version__} | "
        f"device {config.device}, {os.cpu_count()} CPUs, {threads} torch threads per run\n"
        f"load average (1, 5, 15 min): {_numbers(load['start'])} at start, {_numbers(load['end'])} at end"
    )
    if results["timing"]:
        memory = "CUDA MiB" if config.device == "cuda" else "RSS MiB"
        print(
            f"\n{config.clock} seconds per training step: median of {config.timing_steps * config.rounds} steps ({config.rounds} "
            f"run(s) each, interleaved, {config.timing_warmup} warm-up steps left out per run); peak memory\n"
        )
        print(
            f"{'model':<9} {'part':<20} {'rlcore s':>9} {'TRL s':>9} {'rlcore/TRL':>10} {'goal':>10}  "
            f"{'rlcore ' + memory:>15} {'TRL ' + memory:>12} {'reward rlcore/TRL':>18} {'load':>5}"
        )
        for row in results["timing"]:
            goal = GOALS[row["part"]]
            verdict = f"<={goal} " + ("ok" if row["ratio"] <= goal else "MISS")
            reward = "/".join(
                "-" if row[f"{name}_reward"] is None else f"{row[f'{name}_reward']:.2f}" for name in FRAMEWORKS
            )
            part = f"{row['part']} {row.get('variant', '')}".strip()
            print(
                f"{row['model']:<9} {part:<20} {row['rlcore_step_s']:>9.4f} {row['trl_step_s']:>9.4f} "
                f"{row['ratio']:>10.2f} {verdict:>10}  {row['rlcore_peak_mib']:>15.0f} {row['trl_peak_mib']:>12.0f} "
                f"{reward:>18} {row['load_1min']:>5.1f}"
            )
    if results["accuracy"]:
        print("\ntoy test accuracy (greedy, held-out problems) after the same training time from the same start\n")
        print(
            f"{'model':<9} {'stage':<5} {'seed':>5} {'budget s':>8} {'start acc':>9} {'rlcore steps':>12} {'rlcore acc':>10} "
            f"{'TRL steps':>10} {'TRL acc':>8}  start"
        )
        for row in results["accuracy"] + accuracy_means(results["accuracy"]):
            start_accuracy = "-" if row["start_accuracy"] is None else f"{row['start_accuracy']:.3f}"
            print(
                f"{row['model']:<9} {row['stage']:<5} {row['seed']:>5} {row['budget_s']:>8.0f} {start_accuracy:>9} "
                f"{row['rlcore_steps']:>12.0f} {row['rlcore_accuracy']:>10.3f} {row['trl_steps']:>10.0f} "
                f"{row['trl_accuracy']:>8.3f}  {row['start']}"
            )
    print()


def accuracy_means(rows: list[dict]) -> list[dict]:
    """One "mean" row per (model, stage) measured with more than one seed: mean steps and accuracy."""
    means = []
    for model, stage in dict.fromkeys((row["model"], row["stage"]) for row in rows):
        group = [row for row in rows if (row["model"], row["stage"]) == (model, stage)]
        if len(group) > 1:
            mean = {
                f"{framework}_{key}": statistics.fmean(row[f"{framework}_{key}"] for row in group)
                for framework in FRAMEWORKS
                for key in ("steps", "accuracy")
            }
            means.append({**group[0], **mean, "seed": "mean"})
    return means


def _numbers(values) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


# ----------------------------------------------------------------------------------------------------------
# the worker: one training run in its own process


def worker(run_dir: Path) -> None:
    """Train as ``run_dir/spec.json`` says, timing every training step; write ``run_dir/result.json``."""
    import torch

    spec = json.loads((run_dir / "spec.json").read_text())
    torch.set_flush_denormal(spec["flush_denormal"])  # before any threads start; rlcore's recipes set it again
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    clock = time.process_time if spec.get("clock") == "process" else time.perf_counter
    step_ends: list[float] = []

    def mark_step_end() -> None:
        if cuda:
            torch.cuda.synchronize()
        step_ends.append(clock())

    train = train_rlcore if spec["framework"] == "rlcore" else train_trl
    mean_reward = train(spec, mark_step_end)
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    step_seconds = [end - start for start, end in zip(step_ends, step_ends[1:])]
    result = {"steps": len(step_ends), "step_seconds": step_seconds, "peak_mib": peak_mib, "mean_reward": mean_reward}
    if spec["budget_seconds"] is not None:
        result["accuracy"] = toy_test_accuracy(spec["output_dir"], spec["device"])
    (run_dir / "result.json").write_text(json.dumps(result))


def toy_test_accuracy(model_dir: str, device: str) -> float:
    """The one scoring function for both frameworks: greedy exact match on the toy test split."""
    from rlcore.data import tokenize_prompts
    from rlcore.evaluation import greedy_metric
    from rlcore.models import load_policy
    from rlcore.toy import exact_match, toy_dataset

    model, tokenizer = load_policy(model_dir, device=device)
    prompts = tokenize_prompts(toy_dataset("prompt_only", "test"), tokenizer)
    return greedy_metric(model, tokenizer, prompts, exact_match, batch_size=64, max_new_tokens=8)


def rlcore_flags(part: str, hyper: dict, model_dir: str, output_dir: str, device: str) -> list[str]:
    """The command line of ``recipes/<part>.py`` for these hyperparameters (evaluation off)."""
    flags = dict(
        model=model_dir,
        output_dir=output_dir,
        device=device,
        bf16=device == "cuda",
        dataset=f"toy:{hyper['dataset']}",
        eval_split="none",
        eval_steps=0,
        max_seconds="none",
    )
    flags.update((key, value) for key, value in hyper.items() if key != "dataset")
    if part in ("dpo", "grpo"):
        flags["warm_start_steps"] = 0  # the model given is the start
    if part == "dpo":
        flags["rejected_from_policy"] = False  # the dataset's pairs, as TRL trains on
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def in_process_spec(part: str, model: str, steps: int, output_dir: str) -> dict:
    """A :func:`train_rlcore` spec for a CPU run of recipes/<part>.py in this process, with this benchmark's
    settings: ``model`` is "tiny" (built here) or a model directory (DPO and GRPO: an SFT checkpoint)."""
    return dict(
        part=part,
        model_dir=build_model("tiny", None) if model == "tiny" else model,
        device="cpu",
        hyper=hyperparameters(part, "cpu"),
        steps=steps,
        budget_seconds=None,
        output_dir=output_dir,
    )


def train_rlcore(spec: dict, mark_step_end) -> float | None:
    """``main(argv)`` of the rlcore recipe, imported from recipes/<part>.py; returns GRPO's mean reward.

    A step ends when the recipe hands its metrics to the tracker (``Tracker.update``, once per step).
    """
    from rlcore.tracking import METRICS_NAME, Tracker, read_metrics

    update = Tracker.update

    def update_and_mark(tracker, stats) -> None:
        update(tracker, stats)
        mark_step_end()

    Tracker.update = update_and_mark
    part, hyper = spec["part"], dict(spec["hyper"])
    if spec["steps"] is not None:
        hyper["max_steps"] = spec["steps"]
    argv = rlcore_flags(part, hyper, spec["model_dir"], spec["output_dir"], spec["device"])
    if spec["budget_seconds"] is not None:
        argv += ["--max_seconds", str(spec["budget_seconds"])]
    import_recipe(part).main(argv + list(spec.get("extra_flags", ())))  # extra_flags: benchmarks' own variants
    rewards = [
        record["reward"] for record in read_metrics(Path(spec["output_dir"]) / METRICS_NAME) if "reward" in record
    ]
    return statistics.fmean(rewards) if rewards else None


def train_trl(spec: dict, mark_step_end) -> float | None:
    """The same training with TRL's trainer for the part; returns GRPO's mean reward.

    A step ends at the ``on_step_end`` callback (once per optimizer step).
    """
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from rlcore.toy import accuracy_reward, toy_dataset

    part, hyper, cuda = spec["part"], spec["hyper"], spec["device"] == "cuda"
    budget = spec["budget_seconds"]

    class StepClock(TrainerCallback):
        """Mark the end of each step; stop once ``budget`` seconds have passed since training began."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            mark_step_end()
            if budget is not None and time.perf_counter() - self.started >= budget:
                control.should_training_stop = True  # rlcore's --max_seconds

    common = dict(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"] or hyper["max_steps"],
        per_device_train_batch_size=hyper["batch_size"],
        gradient_accumulation_steps=hyper["grad_accum_steps"],
        learning_rate=hyper["lr"],
        lr_scheduler_type=hyper["lr_schedule"],
        warmup_steps=hyper["warmup_steps"],
        adam_beta1=hyper["adam_beta1"],
        adam_beta2=hyper["adam_beta2"],
        weight_decay=hyper["weight_decay"],
        max_grad_norm=hyper["max_grad_norm"],
        logging_steps=hyper["logging_steps"],
        seed=hyper["seed"],
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    train_rows = toy_dataset(hyper["dataset"], "train")
    if part == "sft":
        args = trl.SFTConfig(**common, max_length=hyper["max_length"], completion_only_loss=True, packing=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer)
    elif part == "dpo":
        args = trl.DPOConfig(
            **common,
            max_length=hyper["max_length"],
            beta=hyper["beta"],
            loss_type=[hyper["loss_type"]],
            precompute_ref_log_probs=hyper.get("precompute_ref", False),
        )
        reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
        trainer = trl.DPOTrainer(
            model=model, ref_model=reference, args=args, train_dataset=train_rows, processing_class=tokenizer
        )
    else:
        args = trl.GRPOConfig(
            **common,
            num_generations=hyper["num_generations"],
            max_completion_length=hyper["max_new_tokens"],
            beta=hyper["beta"],
            temperature=hyper["temperature"],
            loss_type=hyper["loss_type"],
            scale_rewards=hyper["scale_rewards"],
            num_iterations=1,
            top_k=0,
            top_p=1.0,
        )
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=[accuracy_reward], args=args, train_dataset=train_rows, processing_class=tokenizer
        )
    trainer.add_callback(StepClock())
    trainer.train()
    if budget is not None:
        trainer.save_model(spec["output_dir"])
        tokenizer.save_pretrained(spec["output_dir"])
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return statistics.fmean(rewards) if rewards else None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        from rlcore.run import cli

        cli(main)  # bad flags: one line, not a traceback
