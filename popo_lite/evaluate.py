"""`python -m popo_lite.evaluate`: score a base model, a trained adapter or a run on the math benchmarks.

A thin shell over `benchmarks.iter_evaluate` (the protocol and its departures from the reference are
described there), plus loading a model with a trained adapter on the base it was trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from popo_lite.config import EMBEDDED_MODEL, Config, ConfigError, load_config
from popo_lite.data.problems import EVAL_BENCHMARKS, SYNTHETIC, TEMPLATES
from popo_lite.engine.model import ModelError, load_base, resolve_device
from popo_lite.evaluation.benchmarks import (  # noqa: F401 - the public evaluation API is importable from here too
    DEFAULT_KS,
    REFERENCE,
    EvalSettings,
    EvaluationError,
    evaluate_model,
    evaluate_problems,
    iter_evaluate,
    load_benchmarks,
)
from popo_lite.evaluation.passk import markdown_table
from popo_lite.training.run_paths import (
    RunsError,
    check_checkpoint_files,
    file_path,
    folder_path,
    open_file,
    write_text,
)

# ---- loading the model ------------------------------------------------------------------------------


def check_adapter(adapter: str | Path) -> Path:
    """The adapter folder, or an EvaluationError naming the path (a checkpoint folder gets a hint)."""
    path = Path(adapter).expanduser()
    if (path / "adapter_config.json").is_file():
        return path
    if not path.exists():
        raise EvaluationError(f"adapter not found: {path}")
    if not path.is_dir():
        raise EvaluationError(f"adapter: {path} is a file; give the PEFT adapter folder that holds it")
    inside = sorted(p.name for p in path.iterdir() if (p / "adapter_config.json").is_file())
    if inside:
        raise EvaluationError(
            f"adapter: {path} is a checkpoint holding the adapters {', '.join(inside)}; pass one of them, "
            f"e.g. {path / inside[0]}"
        )
    raise EvaluationError(f"adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")


def run_config_of(adapter: Path) -> Config | None:
    """The training config of the run an adapter came from (run/checkpoints/step-N/policy), if any.

    The run is the one the path names (a link to an adapter is followed to its run): a checkpoint
    that leads out of its run, holds a link, or a config.yaml that is a link is an EvaluationError
    (planted links once made the evaluator read another run's config and model)."""
    path = Path(adapter).absolute()
    if path.parent.parent.name != "checkpoints":
        path = path.resolve()
        if path.parent.parent.name != "checkpoints":
            return None
    run_dir, step, name = path.parents[2], path.parent.name, path.name
    try:
        folder_path(run_dir, "checkpoints", step, name)  # every folder on the way inside the run
        check_checkpoint_files(run_dir, step)
        config = file_path(run_dir, "config.yaml")
    except RunsError as error:
        raise EvaluationError(f"adapter {adapter}: {error}") from None
    return load_config(config) if config is not None else None


def load_model(config: Config, adapter: str | Path | None = None):
    """(model, tokenizer, device): the base as `model.load_policy` loads it, plus a trained adapter.

    Same source resolution (Hub id, folder, GGUF, embedded) and the same NF4 settings as training, so
    an adapter is evaluated on the base it was trained on; but no fresh LoRA and no gradient
    checkpointing, because nothing here is trained.
    """
    from peft import PeftModel  # imported here: peft is slow to import

    adapter_path = check_adapter(adapter) if adapter is not None else None  # before the slow load
    model, tokenizer, device = load_base(config)
    if adapter_path is not None:
        try:
            model = PeftModel.from_pretrained(model, str(adapter_path))
        except (RuntimeError, ValueError, KeyError) as error:  # shape mismatch: trained on another base
            raise EvaluationError(
                f"adapter {adapter_path} does not fit model {config.model!r}: {error}"
            ) from None
    model.eval()
    return model, tokenizer, device


def run_check_settings(args: argparse.Namespace, run_config: Config | None) -> str | None:
    """An adapter from a run is evaluated as the run's own held-out check generated, unless options say
    otherwise: its problem limit, completion cap, batch size and prompt cap (evaluate_during_training).
    `--baseline` then gives the run's "before" number, not a second base number. Returns the line that
    says so."""
    if run_config is None or args.preset is not None:
        return None
    run = {
        "limit": run_config.eval_limit,  # None: all, as the run (unless the CPU budget below caps it)
        "max_new_tokens": run_config.eval_max_new_tokens or run_config.max_new_tokens,
        "batch_size": run_config.generation_batch_size or run_config.rollouts_per_step,
        "max_prompt_tokens": run_config.max_prompt_tokens,
    }
    taken = {k: v for k, v in run.items() if getattr(args, k) is None and v is not None}
    for name, value in taken.items():
        setattr(args, name, value)
    if not taken:
        return None
    shown = ", ".join(f"{name} {value}" for name, value in taken.items())
    return f"as the run's held-out check: {shown} (its before -> after numbers compare with these)"


CPU_BUDGET = {"limit": 20, "max_new_tokens": 256}  # without a GPU, unless --limit / --max_new_tokens say


def cpu_budget(args: argparse.Namespace, names: list[str], device: str) -> str | None:
    """Without a GPU, cap the problems per benchmark (not the small synthetic held-out splits) and the
    completion length, unless given; return the line that says so (None on a GPU or when all were given).
    The full protocol (every problem, 1024 or 4096 tokens) takes hours per benchmark on a CPU."""
    if resolve_device(device).type != "cpu" or args.preset is not None:
        return None
    capped = []
    if args.limit is None and any(name not in SYNTHETIC for name in names):
        args.limit = CPU_BUDGET["limit"]
        capped.append(f"the first {args.limit} problems of each benchmark (synthetic sums: all)")
    if args.max_new_tokens is None:
        args.max_new_tokens = CPU_BUDGET["max_new_tokens"]
        capped.append(f"completions of up to {args.max_new_tokens} tokens")
    if not capped:
        return None
    return "no GPU: a CPU-sized budget, " + " and ".join(capped) + " (--limit / --max_new_tokens change it)"


# ---- command line -----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m popo_lite.evaluate",
        description="Evaluate a base model, or a base plus a trained LoRA adapter, on math benchmarks: "
        "greedy pass@1 by default; avg@n and unbiased pass@k with --temperature > 0 and --n > 1. "
        "Writes results.json, results.md and records.jsonl into --output.",
    )
    add = parser.add_argument
    add(
        "--model",
        help="Hub id, local folder, .gguf file or 'embedded' (default: the model of the run "
        "that --adapter comes from, else 'embedded').",
    )
    add("--adapter", help="PEFT adapter folder, e.g. runs/NAME/checkpoints/step-000006/policy (or /ema).")
    add(
        "--baseline",
        action="store_true",
        help="With --adapter: also evaluate the base without it, on the same problems, side by side.",
    )
    add(
        "--qlora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Load the base in 4-bit NF4, as training with --qlora did (default: as the adapter's run).",
    )
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="Base dtype (default auto).")
    add("--device", help="auto (default), cpu, cuda or cuda:N.")
    add(
        "--benchmarks",
        default=",".join(EVAL_BENCHMARKS),
        help="Comma list of benchmark names or files (default: %(default)s).",
    )
    add("--problem_field", help="Question field of a benchmark file (default: problem/question/prompt).")
    add(
        "--answer_field",
        help="Gold-answer field of a benchmark file (default: answer/final_answer/solution).",
    )
    add("--limit", type=int, help="Evaluate only the first N problems of each benchmark.")
    add(
        "--preset",
        choices=("reference",),
        help="reference = the POPO protocol's sampling: n 16, temperature 0.7, top_p 0.95, 4096 new "
        "tokens, qwen_math prompt; options given explicitly override it.",
    )
    add("--n", type=int, help="Samples per problem (default 1; needs --temperature > 0 when above 1).")
    add("--temperature", type=float, help="0 = greedy (default); > 0 samples.")
    add("--top_p", type=float, help="Nucleus threshold when sampling (default 1.0).")
    add("--max_new_tokens", type=int, help="Longest completion in tokens (default 1024).")
    add(
        "--prompt_template",
        choices=("auto", *TEMPLATES),
        help="auto (default) = the adapter's training template when its run is known, else 'chat' for the "
        "embedded instruct model (the prompt it and the default training run know) and 'qwen_math' (the "
        "reference prompt) for any other model.",
    )
    add("--batch_size", type=int, help="Completions generated at once (default 64).")
    add("--max_prompt_tokens", type=int, help="Prompts longer than this are cut (default 4096).")
    add("--k", type=_int_list, help="pass@k values, comma list (default: powers of 2 up to --n).")
    add("--output", help="Output folder (default: runs/eval-<timestamp>); must be new or empty.")
    add("--seed", type=int, help="Sampling seed, reset for every benchmark (default 0).")
    add("--trust_remote_code", action="store_true", help="Allow custom model code from the Hub.")
    return parser


def _model_config(args: argparse.Namespace, run_config: Config | None) -> Config:
    """The base-model fields of a Config: explicit options over the adapter's run config over defaults."""
    base = run_config or Config()
    overrides = {
        "model": args.model or base.model,
        "gguf_file": base.gguf_file if args.model is None else None,
        "qlora": base.qlora if args.qlora is None else args.qlora,
        "dtype": args.dtype or base.dtype,
        "device": args.device or "auto",
        "trust_remote_code": args.trust_remote_code or base.trust_remote_code,
    }
    return load_config(None, overrides)


def _settings(args: argparse.Namespace, config: Config, run_config: Config | None) -> EvalSettings:
    values: dict = dict(REFERENCE) if args.preset == "reference" else {}
    for name in ("n", "temperature", "top_p", "max_new_tokens", "batch_size", "max_prompt_tokens", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    template = args.prompt_template or values.get("prompt_template", "auto")
    if template == "auto":
        if run_config is not None:
            template = run_config.prompt_template
        else:
            template = "chat" if config.model == EMBEDDED_MODEL else "qwen_math"
    values["prompt_template"] = template
    n = values.get("n", 1)
    if args.k:
        if too_many := [k for k in args.k if k > n]:
            raise EvaluationError(f"--k {too_many[0]} needs at least {too_many[0]} samples, but --n is {n}")
        values["ks"] = tuple(args.k)
    return EvalSettings(**values)


def _output_folder(output: str | None) -> Path:
    folder = Path(output or f"runs/eval-{datetime.now():%Y%m%d-%H%M%S}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EvaluationError(f"output {folder} already exists and is not empty: choose another --output")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_results(folder: Path, header: dict, results: dict[str, dict], settings: EvalSettings) -> str:
    """results.json and results.md with the benchmarks done so far (rewritten after each one)."""
    write_text(folder, "results.json", text=json.dumps({"settings": header, "benchmarks": results}, indent=2))
    title = f"{header['model']}" + (f" + adapter {header['adapter']}" if header["adapter"] else "")
    knobs = ", ".join(f"{key} {header[key]}" for key in ("n", "temperature", "top_p", "max_new_tokens"))
    table = markdown_table(results)
    text = f"# Evaluation of {title}\n\n{knobs}, prompt {settings.prompt_template}, seed {settings.seed}\n\n"
    write_text(folder, "results.md", text=text + table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise EvaluationError(f"--limit must be >= 1, got {args.limit}")
        adapter = check_adapter(args.adapter) if args.adapter else None
        run_config = run_config_of(adapter) if adapter is not None else None
        config = _model_config(args, run_config)
        matched = run_check_settings(args, run_config)
        if matched:
            print(matched, file=sys.stderr)
        settings = _settings(args, config, run_config)
        names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
        if not names:
            raise EvaluationError("--benchmarks names no benchmark")
        if args.baseline and adapter is None:
            raise EvaluationError("--baseline compares the base with an --adapter: give --adapter")
        budget = cpu_budget(args, names, config.device)
        if budget:
            print(budget, file=sys.stderr)
            settings = _settings(args, config, run_config)
        limits = {name: None if name in SYNTHETIC else args.limit for name in names}
        benchmarks = {}
        for name in names:
            benchmarks |= load_benchmarks(
                [name], limit=limits[name], problem_field=args.problem_field, answer_field=args.answer_field
            )
        folder = _output_folder(args.output)
        started = time.perf_counter()
        model, tokenizer, device = load_model(config, adapter)
        header = {
            "model": config.model,
            "adapter": str(adapter) if adapter else None,
            "qlora": config.qlora,
            "device": str(device),
            "benchmarks": list(benchmarks),
            "limit": args.limit,
            **dataclasses.asdict(settings),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        results: dict[str, dict] = {}
        passes = (
            [("base", model.disable_adapter()), ("adapter", nullcontext())]
            if args.baseline
            else [("", nullcontext())]
        )
        for label, context in passes:
            with context:
                for name, result in iter_evaluate(model, tokenizer, benchmarks, settings, progress=True):
                    shown = f"{name} ({label})" if label else name
                    with open_file(folder, "records.jsonl", mode="a") as handle:
                        for record in result.pop("records"):
                            handle.write(json.dumps({**record, "evaluated": label or "model"}) + "\n")
                    results[shown] = result
                    _write_results(folder, header, results, settings)
        header["seconds"] = time.perf_counter() - started
        table = _write_results(folder, header, results, settings)
    except (EvaluationError, ConfigError, ModelError, RunsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    cut = max(result["cut_rate"] for result in results.values())
    print(f"\ncompletions capped at {settings.max_new_tokens} new tokens ({cut:.0%} at most reached the cap)")
    print(f"results in {folder} ({header['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
