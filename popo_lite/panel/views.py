"""What the panel shows, built from run directories: functions returning HTML or plot data.

No Gradio here, so each view can be checked without a browser. Every text that comes from a run
(prompts, completions, answers, logs) is HTML-escaped: model output is untrusted markup.
"""

from __future__ import annotations

import dataclasses
import math
from html import escape
from pathlib import Path

import pandas as pd

from popo_lite.config import Config, ConfigError, parse_yaml_text
from popo_lite.panel import jobs
from popo_lite.training.runs import RunsError, group_rollouts, read_jsonl, run_path
from popo_lite.training.summary import render_summary, run_summary

# The Launch form: the main knobs; the YAML editor holds everything else.
FORM = tuple(
    "model qlora algo steps prompts_per_step rollouts_per_prompt max_new_tokens learning_rate temperature "
    "alpha beta_entropy tau".split()
)
MODELS = ("embedded", "Qwen/Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-7B")
# (title, {metric: series label}); POPO and GRPO log different loss terms, both are listed.
PLOTS = (
    ("reward", {"reward_mean": "reward"}),
    ("positive rate", {"positive_rate": "positive rate"}),
    ("loss", {"loss": "loss"}),
    ("loss terms", {"nll": "nll", "sim": "sim", "entropy": "entropy", "pg": "pg", "kl": "kl vs base"}),
    ("cosine policy vs EMA", {"cosine_policy_ema": "cosine"}),
    ("KL", {"kl_policy_ema": "KL(policy || EMA)", "kl": "KL(policy || base)"}),
    ("completion length (tokens)", {"completion_length": "length"}),
    ("tokens / s", {"generation_tokens_per_s": "generation", "train_tokens_per_s": "train"}),
    ("peak memory (GiB)", {"peak_memory_gib_gpu": "GPU", "peak_memory_gib_rss": "RSS"}),
    ("eval pass@1 (eval_every)", {"eval_*": "eval"}),  # one series per benchmark: eval_<name>
)
# Below this many steps between the first and the last plotted one, steps are drawn as categories: a
# numeric axis over a short range gets fractional ticks (1, 1.5, 2, ...), and Gradio's LinePlot has no
# way to ask for integer ones. From it on, a numeric axis up to ~880 px wide ticks integers (Vega asks
# for width/40 ticks and rounds their spacing to 1, 2 or 5 times a power of ten).
CATEGORY_STEPS = 16
CSS = """
.rollout { border: 1px solid #ccc; border-radius: 6px; padding: 6px 10px; margin: 4px 0; }
.rollout.positive { border: 2px solid #1a7f37; background: #e9f7ee; }
.rollout pre { white-space: pre-wrap; margin: 4px 0; font-size: 13px; }
.badge { font-weight: bold; padding: 1px 6px; border-radius: 4px; }
.positive .badge { background: #1a7f37; color: white; }
.negative .badge { background: #ddd; color: #333; }
.group { margin-bottom: 18px; }
.group-head { font-weight: bold; }
.zero { color: #b35900; }
.bar { background: #eee; border-radius: 4px; height: 14px; margin: 4px 0 10px; }
.fill { background: #2f6fdf; height: 14px; border-radius: 4px; }
.token { border-radius: 2px; }
.run-summary { white-space: pre-wrap; font-size: 13px; margin: 4px 0 10px; }
.not-recorded { color: #666; font-size: 13px; }
"""


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def render_progress(root: Path, names: list[str]) -> str:
    """One block per run: step counter, state, ETA and a bar; the log tail when it failed or is starting."""
    blocks = []
    for name in names:
        try:
            state = jobs.progress(root, name)
        except RunsError as error:
            blocks.append(f"<p>{escape(str(error))}</p>")
            continue
        share = 100.0 * state.step / state.total if state.total else 0.0
        eta = f" · ETA {_duration(state.eta_seconds)}" if state.eta_seconds is not None else ""
        block = (
            f'<div class="run-progress" data-run="{escape(name)}" data-step="{state.step}" '
            f'data-state="{state.state}"><b>{escape(name)}</b> · '
            f'<span class="step-counter">step {state.step} / {state.total}</span> · {state.state}{eta}'
            f" · last update {_duration(state.seconds_since_update)} ago"
            f'<div class="bar"><div class="fill" style="width: {share:.1f}%"></div></div>'
        )
        if state.state in ("failed", "starting"):
            block += f"<pre>{escape(jobs.log_tail(root, name, 1500))}</pre>"
        blocks.append(block + "</div>")
    return "".join(blocks) or "<p>Pick one or more runs.</p>"


def render_summaries(root: Path, names: list[str]) -> str:
    """The end-of-run summary (what the CLI prints last) of each run with a step, as escaped text."""
    blocks = []
    for name in names:
        try:
            summary = run_summary(run_path(root, name))
            text = render_summary(summary) if summary else None
        except (RunsError, KeyError, TypeError, ValueError):  # a run folder no trainer wrote
            continue
        if text:
            blocks.append(f'<pre class="run-summary" data-run="{escape(name)}">{escape(text)}</pre>')
    return "".join(blocks)


def render_not_recorded(titles: list[str]) -> str:
    """The line that names the plots left out because no step of the watched runs recorded them."""
    if not titles:
        return ""
    return f'<p class="not-recorded">Not recorded in this run: {escape(", ".join(titles))}.</p>'


def plot_frame(root: Path, names: list[str], series: dict[str, str]) -> pd.DataFrame:
    """Long format (step, value, series) for a LinePlot; a run's name alone when it has one series.

    A key ending in '*' takes every metric with that prefix, labelled by the rest of its name. Only
    what a step recorded becomes a row: a metric a step left out (train throughput on a step with no
    update) has no row there, never a zero or the previous value.
    """
    rows = []
    for name in names:
        for record in read_jsonl(run_path(root, name) / "metrics.jsonl"):
            for key, value in record.items():
                label = series.get(key)
                if label is None:
                    prefix = next(
                        (k[:-1] for k in series if k.endswith("*") and key.startswith(k[:-1])), None
                    )
                    label = key[len(prefix) :] if prefix is not None else None
                if label is None or not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                single = len(series) == 1 and not next(iter(series)).endswith("*")
                line = name if single else f"{name} · {label}"
                rows.append({"step": int(record["step"]), "value": float(value), "series": line})
    # Explicit dtypes: a first, empty frame of objects would make the plot's axes categorical for good.
    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64"})


def integer_steps(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str] | None]:
    """The frame as plotted, and the order of its steps when they are categories (else None).

    Over fewer than CATEGORY_STEPS steps the step column becomes text ("1", "2", ...) in step order, so
    the axis labels each step once and nothing between; over more, the numeric axis ticks integers.
    """
    steps = sorted(set(frame["step"]))
    if steps and steps[-1] - steps[0] >= CATEGORY_STEPS:
        return frame, None
    return frame.astype({"step": "str"}), [str(step) for step in steps]


def _tokens_html(record: dict) -> str:
    """Completion tokens coloured by their log-probability (red: unlikely, green: likely)."""
    tokens, logprobs = record.get("tokens"), record.get("token_logprobs")
    if not tokens or not logprobs or len(tokens) != len(logprobs):
        return ""
    spans = []
    for token, logprob in zip(tokens, logprobs, strict=True):
        probability = math.exp(min(0.0, float(logprob)))
        spans.append(
            f'<span class="token" title="log p = {float(logprob):.3f}" '
            f'style="background: hsl({120 * probability:.0f}, 70%, 80%)">{escape(str(token))}</span>'
        )
    return "<pre>" + "".join(spans) + "</pre>"


def render_rollouts(records: list[dict], view: str, group: str, colour: bool, config: dict) -> str:
    """Each group: prompt and gold, then all its completions, positives first and marked."""
    weight_name = "advantage" if config.get("algo") == "grpo" else "POPO weight"
    groups = group_rollouts(records, view, float(config.get("reward_threshold", 0.0)))
    if group not in ("all", None, ""):
        groups = [g for g in groups if str(g.group) == str(group)]
    if not groups:
        return "<p>Nothing to show for this step and filter.</p>"
    parts = []
    if colour and not any("token_logprobs" in r for g in groups for r in g.rollouts):
        parts.append("<p><i>This run's rollouts.jsonl has no per-token log-probs to colour by.</i></p>")
    for g in groups:
        zero = '<span class="zero">no positive: POPO learns nothing from this group</span>'
        parts.append(
            f'<div class="group" data-group="{g.group}"><div class="group-head">step {g.step} · '
            f"group {g.group} · problem {escape(g.problem_id)} · {g.positives} positive "
            f"{zero if g.positives == 0 else ''}</div>"
            f"<pre>{escape(g.prompt)}</pre><div>gold answer: <code>{escape(g.gold)}</code></div>"
        )
        for record in g.rollouts:
            kind, badge = ("positive", "✓ positive") if record["positive"] else ("negative", "✗")
            text = _tokens_html(record) if colour else ""
            text = text or f"<pre>{escape(str(record.get('completion')))}</pre>"
            extracted = record.get("extracted")
            parts.append(
                f'<div class="rollout {kind}"><span class="badge">{badge}</span> '
                f"reward {float(record.get('reward') or 0):.2f} · {weight_name} "
                f"{float(record.get('weight') or 0):.3f} · extracted "
                f"<code>{escape('(no answer)' if extracted is None else str(extracted))}</code> vs gold "
                f"<code>{escape(str(record.get('gold')))}</code>{text}</div>"
            )
        parts.append("</div>")
    return "".join(parts)


def form_values(text: str) -> dict:
    """The form's fields as the YAML text sets them (Config defaults for the rest); {} if it won't parse."""
    try:
        loaded = parse_yaml_text(text or "", "the config")
    except ConfigError:
        return {}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    return {name: loaded.get(name, defaults[name]) for name in FORM}
