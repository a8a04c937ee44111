"""The web panel (Gradio Blocks): launch runs, watch them live, inspect rollouts, evaluate checkpoints.

A thin shell over run directories (runs.py), detached jobs (jobs.py) and views (views.py). Nothing here
imports torch or math-verify: the UI process stays light, and math-verify's signal-based timeouts never
run on a UI worker thread. Every name or path typed or picked in the browser is checked by runs.py
against the runs root, whichever callback receives it: a crafted request can send what no dropdown
offers. Every config the panel starts, resumes, plans or evaluates is held to paths.py's rule (bundled
names, Hub ids, paths inside the runs, configs and --allow-path folders) by jobs.py.
"""

from __future__ import annotations

import math
import time
from functools import partial
from html import escape
from pathlib import Path

import gradio as gr
import pandas as pd

from popo_lite.panel import jobs
from popo_lite.panel.paths import BrowserAccess
from popo_lite.panel.views import (
    CSS,
    FORM,
    MODELS,
    PLOTS,
    form_values,
    integer_steps,
    plot_frame,
    render_not_recorded,
    render_progress,
    render_rollouts,
    render_summaries,
)
from popo_lite.training.job_slot import active_jobs
from popo_lite.training.runs import (
    FILTERS,
    RunsError,
    check_name,
    group_rollouts,
    list_checkpoints,
    list_runs,
    read_config,
    read_jsonl,
    read_rollouts,
    resolve_inside,
    rollout_steps,
    run_path,
)

__all__ = ["CSS", "build_panel"]

DEFAULT_RECIPE = "default.yaml"  # the embedded CPU run: what any machine runs; GPU recipes one click away


# --- callbacks (root and configs folder bound with functools.partial) -------------------------------


def load_config_file(configs: Path, name: str | None) -> tuple:
    """The chosen file of `configs/` into the editor and the form."""
    if not name:
        return gr.skip(), *[gr.skip()] * len(FORM), gr.skip()
    try:
        text = resolve_inside(configs, check_name(name, "config file")).read_text()
    except (RunsError, OSError) as error:
        raise gr.Error(str(error)) from None
    return text, *sync_form(text)


def load_upload(path: str | None) -> tuple:
    """An uploaded YAML into the editor and the form (Gradio keeps the upload in its own temp folder)."""
    if not path:
        return gr.skip(), *[gr.skip()] * len(FORM), gr.skip()
    text = Path(path).read_text(errors="replace")[:100_000]  # a config, not a data file
    return text, *sync_form(text)


def sync_form(text: str) -> tuple:
    """The form follows the YAML; the state remembers what it was filled with, to spot user edits."""
    values = form_values(text)
    if not values:
        return *[gr.skip()] * len(FORM), gr.skip()
    model = gr.update(value=values["model"], choices=sorted({*MODELS, str(values["model"])}))
    return model, *[values[name] for name in FORM[1:]], values


def _form_overrides(filled: dict, form: tuple) -> dict:
    """The form fields the user changed since the YAML filled them."""
    return {
        key: value
        for key, value in zip(FORM, form, strict=True)
        if value is not None and value != "" and value != (filled or {}).get(key)
    }


def plan_memory(
    root: Path, text: str, filled: dict, gpu_gib: float, *form, access: BrowserAccess | None = None
) -> str:
    """The predicted peak GPU memory of the config as it would start (python -m popo_lite.plan)."""
    try:
        gib = float(24 if gpu_gib is None else gpu_gib)
    except (TypeError, ValueError):
        gib = math.nan
    if not 0 < gib <= 100_000:  # NaN too: the field is a number box, but any value reaches here
        return f"GPU memory must be a number of GiB between 0 and 100,000, got {str(gpu_gib)[:40]!r}"
    plan = jobs.plan_memory(text, _form_overrides(filled, form), gib, root=root, access=access)
    return f"```\n{plan}\n```"


def start_run(
    root: Path, text: str, filled: dict, name: str, *form, access: BrowserAccess | None = None
) -> tuple:
    """Start a run from the editor's YAML, overridden by the form fields the user changed."""
    overrides = _form_overrides(filled, form)
    algo = overrides.get("algo") or (filled or {}).get("algo") or "popo"
    name = (name or "").strip() or f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        pid = jobs.launch_run(root, name, text, overrides, access=access)
    except RunsError as error:
        return f"**Not started.** {escape(str(error))}", gr.skip(), *[gr.skip()] * 3
    runs = list_runs(root)
    message = f"Started run **{escape(name)}** (pid {pid}). Follow it in the Watch tab."
    return (
        message,
        name,
        gr.update(choices=runs, value=[name]),
        gr.update(choices=runs, value=name),
        gr.update(choices=runs, value=name),
    )


def resume_run(root: Path, name: str, access: BrowserAccess | None = None) -> str:
    """Continue the named run from its last checkpoint, with its own config.yaml."""
    try:
        pid = jobs.launch_run(root, (name or "").strip(), resume=True, access=access)
    except RunsError as error:
        return f"**Not resumed.** {escape(str(error))}"
    return f"Resumed run **{escape(name.strip())}** (pid {pid})."


def stop_job(root: Path, name: str) -> str:
    """Stop the job of the run named in the box, or the only active job when the box is empty."""
    active = active_jobs(root)
    name = (name or "").strip() or (active[0]["run"] if len(active) == 1 else "")
    if not name:
        return "No run named, and not exactly one active job: name the run to stop."
    try:
        return escape(jobs.stop_run(root, name))
    except RunsError as error:
        return escape(str(error))


def jobs_line(root: Path) -> str:
    active = active_jobs(root)
    if not active:
        return "No job running from this panel."
    return " · ".join(
        f"{j['slot']}: {j.get('kind')} of **{escape(str(j.get('run')))}** (pid {j.get('pid')})"
        for j in active
    )


def refresh_runs(root: Path, known: list[str]) -> tuple:
    """New run folders (from the panel or the CLI) into the three run pickers; nothing when none."""
    runs = list_runs(root)
    if runs == known:
        return gr.skip(), gr.skip(), gr.skip(), known
    return gr.update(choices=runs), gr.update(choices=runs), gr.update(choices=runs), runs


def newest_runs(root: Path) -> tuple:
    """On page load: every picker offers today's runs, set to the active run (else the newest one)."""
    runs = list_runs(root)
    active = [job["run"] for job in active_jobs(root) if job.get("run") in runs]
    first = (active or runs or [None])[0]
    pick = [first] if first else []
    return (gr.update(choices=runs, value=pick), gr.update(choices=runs, value=first),
            gr.update(choices=runs, value=first), runs)  # fmt: skip


def watch_tick(root: Path, names: list[str] | None, seen: tuple | None) -> tuple:
    """Progress every tick; plots only when a watched run logged a new step, and once more after that.

    Why once more: the browser shows a LinePlot's data one update late (measured with Gradio 6.31: the
    chart showed steps 1-2 while step 3 had been sent), so each new state is sent on two ticks. The
    summary (checked every tick: a checkpoint lands after its step's metrics) is sent when it changed;
    a plot no step recorded is hidden and named under the summary.
    """
    names = [name for name in (names or []) if name]
    try:
        signature = tuple((name, len(read_jsonl(run_path(root, name) / "metrics.jsonl"))) for name in names)
    except RunsError as error:
        return f"<p>{escape(str(error))}</p>", gr.skip(), *[gr.skip()] * len(PLOTS), seen, jobs_line(root)
    last, sent, note, shown = seen if seen else (None, 0, "", None)
    sent = sent + 1 if signature == last else 1
    if sent > 2:
        plots = [gr.skip()] * len(PLOTS)
    else:
        frames = [plot_frame(root, names, series) for _, series in PLOTS]
        plots = [_plot_update(frame) for frame in frames]
        empty = [title for (title, _), frame in zip(PLOTS, frames, strict=True) if frame.empty]
        note = render_not_recorded(empty) if len(empty) < len(PLOTS) else ""  # no step yet: nothing
    summary = render_summaries(root, names) + note
    state = (signature, min(sent, 3), note, summary)
    return (
        render_progress(root, names),
        gr.skip() if summary == shown else summary,
        *plots,
        state,
        jobs_line(root),
    )


def _plot_update(frame: pd.DataFrame) -> dict:
    if frame.empty:  # a metric no step recorded (no eval_every, KL vs EMA of a GRPO run): no empty axes
        return gr.update(visible=False)
    frame, order = integer_steps(frame)
    # Gradio 6's LinePlot builds its chart (colour domain included) once, then only swaps the data:
    # a series absent at the first draw is never drawn. A new `colors_in_legend` makes it rebuild.
    return gr.update(value=frame, visible=True, sort=order, colors_in_legend=sorted(set(frame["series"])))


def rollout_run_changed(
    root: Path, name: str | None, view: str, colour: bool, current: int | None = None
) -> tuple:
    """The run's logged steps (keeping the chosen one while it exists, else the latest) and their view."""
    steps = rollout_steps(run_path(root, name)) if name else []
    chosen = current if current in steps else (steps[-1] if steps else None)
    return gr.update(choices=steps, value=chosen), *rollout_step_changed(root, name, chosen, view, colour)


def rollout_step_changed(root: Path, name: str | None, step: int | None, view: str, colour: bool) -> tuple:
    if not name or step is None:
        return gr.update(choices=[("all prompts", "all")], value="all"), "<p>Pick a run and a step.</p>"
    records = read_rollouts(run_path(root, name), int(step))
    groups = group_rollouts(records)
    choices = [("all prompts", "all")] + [
        (f"group {g.group} · {g.positives}/{len(g.rollouts)} positive · {g.prompt[-60:]}", str(g.group))
        for g in groups
    ]
    return gr.update(choices=choices, value="all"), show_rollouts(root, name, step, "all", view, colour)


def show_rollouts(root: Path, name: str | None, step: int | None, group: str, view: str, colour: bool) -> str:
    if not name or step is None:
        return "<p>Pick a run and a step.</p>"
    try:
        run_dir = run_path(root, name)
        return render_rollouts(read_rollouts(run_dir, int(step)), view, group, colour, read_config(run_dir))
    except RunsError as error:
        return f"<p>{escape(str(error))}</p>"


def evaluation_run_changed(root: Path, name: str | None) -> tuple:
    run_dir = run_path(root, name) if name else None
    checkpoints = list_checkpoints(run_dir) if run_dir else []
    done = jobs.list_evaluations(run_dir) if run_dir else []
    return (
        gr.update(choices=checkpoints, value=checkpoints[0] if checkpoints else None),
        gr.update(choices=done, value=done[0] if done else None),
    )


def start_evaluation(
    root: Path,
    name: str,
    checkpoint: str,
    adapter: str,
    benchmarks: str,
    limit,
    tokens,
    access: BrowserAccess | None = None,
) -> tuple:
    try:
        folder = jobs.launch_evaluation(
            root,
            name or "",
            checkpoint or "",
            adapter,
            benchmarks,
            int(limit or 0),
            int(tokens or 0) or None,
            access=access,
        )
    except (RunsError, ValueError) as error:
        return f"**Not started.** {escape(str(error))}", gr.skip()
    done = jobs.list_evaluations(run_path(root, name))
    message = f"Evaluating `{folder}`: the table appears below when it is done."
    return message, gr.update(choices=done, value=folder)


def show_evaluation(root: Path, name: str | None, folder: str | None, shown: str | None) -> tuple:
    """The evaluation's results.md (partial while it runs, with the log); redrawn only when it changed."""
    if not name or not folder:
        return gr.skip(), shown
    try:
        state, text = jobs.evaluation_result(root, name, folder)
    except RunsError as error:
        state, text = "error", escape(str(error))
    text = f"**Evaluation {state}.**\n\n{text}"
    return (gr.skip(), shown) if text == shown else (text, text)


# --- layout ------------------------------------------------------------------------------------------


def build_panel(
    root: str | Path, configs: str | Path, allowed: tuple = (), allow_remote_code: bool = False
) -> gr.Blocks:
    """The four tabs over the runs folder `root`; `configs` holds the YAML recipes offered at launch.

    A config from the browser may name paths inside `root`, `configs` and the `allowed` folders only, and
    trust_remote_code only with `allow_remote_code` (paths.py).
    """
    root, configs = Path(root).resolve(), Path(configs).resolve()
    access = BrowserAccess(configs, tuple(Path(f).expanduser().resolve() for f in allowed), allow_remote_code)
    root.mkdir(parents=True, exist_ok=True)
    recipes = sorted(p.name for p in configs.glob("*.yaml")) if configs.is_dir() else []
    runs = list_runs(root)
    with gr.Blocks(title="popo_lite") as panel:
        gr.Markdown(f"# popo_lite\nRuns folder: `{escape(str(root))}`")
        known, seen, filled, shown = gr.State(runs), gr.State(None), gr.State({}), gr.State(None)
        with gr.Tabs():
            with gr.Tab("Launch", id="launch"):
                with gr.Row():
                    recipe = gr.Dropdown(
                        recipes,
                        value=DEFAULT_RECIPE if DEFAULT_RECIPE in recipes else (recipes or [None])[0],
                        label="Config from configs/",
                        elem_id="config-choice",
                    )
                    upload = gr.File(label="or upload a YAML config", file_types=[".yaml", ".yml"], height=90)
                editor = gr.Code(
                    language="yaml",
                    lines=12,
                    label="Config (YAML; the fields below override it)",
                    elem_id="config-editor",
                )
                with gr.Row():
                    model = gr.Dropdown(list(MODELS), allow_custom_value=True, label="model", scale=3)
                    qlora = gr.Checkbox(label="--qlora (4-bit base)")
                    algo = gr.Radio(["popo", "grpo"], label="algorithm", value="popo")
                with gr.Row():
                    integers = [gr.Number(label=n, precision=0, minimum=1) for n in FORM[3:7]]
                with gr.Row():
                    floats = [gr.Number(label=n, minimum=0) for n in FORM[7:]]
                with gr.Row():
                    run_name = gr.Textbox(label="run name (empty: algo-time)", elem_id="run-name", scale=3)
                    start = gr.Button("Start", variant="primary", elem_id="start-button")
                    resume = gr.Button("Resume", elem_id="resume-button")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-button")
                launch_message = gr.Markdown(elem_id="launch-message")
                with gr.Row():
                    card = gr.Number(24, label="GPU memory (GiB)", minimum=1, elem_id="card-gib", scale=1)
                    plan = gr.Button("Plan memory", elem_id="plan-button", scale=1)
                    gr.Markdown("Predicted peak of the config above, before anything loads.", scale=3)
                plan_message = gr.Markdown(elem_id="plan-message")
                active = gr.Markdown(jobs_line(root), elem_id="active-jobs")
            with gr.Tab("Watch", id="watch"):
                watched = gr.Dropdown(
                    runs,
                    value=runs[:1],
                    multiselect=True,
                    label="Runs (several overlay)",
                    elem_id="watch-runs",
                )
                progress = gr.HTML(elem_id="progress")
                summary = gr.HTML(elem_id="run-summary")  # the end-of-run summary, as the CLI prints it
                plots = []
                for row in range(0, len(PLOTS), 3):
                    with gr.Row():
                        for title, series in PLOTS[row : row + 3]:
                            plots.append(
                                gr.LinePlot(
                                    x="step",
                                    y="value",
                                    color="series",
                                    title=title,
                                    y_title=" ",  # the title says what it is
                                    height=220,
                                    y_aggregate="mean",  # steps as categories: one value per step anyway
                                    elem_id="plot-" + next(iter(series)).rstrip("*"),
                                )
                            )
            with gr.Tab("Rollouts", id="rollouts") as rollouts_tab:
                with gr.Row():
                    rollout_run = gr.Dropdown(
                        runs, value=runs[0] if runs else None, label="Run", elem_id="rollout-run"
                    )
                    step = gr.Dropdown([], label="Step", elem_id="rollout-step")
                    group = gr.Dropdown([("all prompts", "all")], value="all", label="Prompt", scale=2)
                with gr.Row():
                    view = gr.Radio(list(FILTERS), value="all", label="Show", elem_id="rollout-filter")
                    colour = gr.Checkbox(label="Colour tokens by log-prob")
                    reload = gr.Button("Reload steps")
                inspector = gr.HTML(elem_id="rollout-view")
            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                gr.Markdown(
                    "Runs `python -m popo_lite.evaluate` on a checkpoint's adapter as its own process.",
                    elem_id="evaluate-notice",
                )
                with gr.Row():
                    evaluation_run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run")
                    checkpoint = gr.Dropdown([], label="Checkpoint", elem_id="evaluation-checkpoint")
                    adapter = gr.Radio(["policy", "ema"], value="ema", label="Adapter")
                    benchmarks = gr.Textbox("math500,gsm8k_test", label="Benchmarks (comma-separated)")
                    limit = gr.Number(20, precision=0, minimum=1, label="Problems per benchmark")
                    tokens = gr.Number(1024, precision=0, minimum=1, label="Max new tokens")
                evaluate = gr.Button("Evaluate", variant="primary")
                evaluation_message = gr.Markdown()
                evaluation = gr.Dropdown([], label="Evaluation")
                results = gr.Markdown(elem_id="evaluation-results")

        form = [model, qlora, algo, *integers, *floats]
        pickers = [watched, rollout_run, evaluation_run]
        recipe.change(partial(load_config_file, configs), recipe, [editor, *form, filled])
        panel.load(partial(load_config_file, configs), recipe, [editor, *form, filled])
        upload.upload(load_upload, upload, [editor, *form, filled])
        editor.blur(sync_form, editor, [*form, filled])
        start.click(
            partial(start_run, root, access=access),
            [editor, filled, run_name, *form],
            [launch_message, run_name, *pickers],
            api_name="start",
        )
        plan.click(
            partial(plan_memory, root, access=access),
            [editor, filled, card, *form],
            plan_message,
            api_name="plan",
        )
        resume.click(partial(resume_run, root, access=access), run_name, launch_message, api_name="resume")
        stop.click(partial(stop_job, root), run_name, launch_message)
        panel.load(partial(newest_runs, root), None, [*pickers, known])
        ticker = gr.Timer(2.0)
        ticker.tick(partial(refresh_runs, root), known, [*pickers, known])
        watch_outputs = [progress, summary, *plots, seen, active]
        ticker.tick(partial(watch_tick, root), [watched, seen], watch_outputs)
        redraw = partial(watch_tick, root, seen=None)  # a new selection redraws the plots at once
        watched.change(redraw, watched, watch_outputs)
        browse = partial(rollout_run_changed, root)
        rollout_run.change(browse, [rollout_run, view, colour], [step, group, inspector])  # latest step
        for trigger in (panel.load, reload.click, rollouts_tab.select):
            trigger(browse, [rollout_run, view, colour, step], [step, group, inspector])
        step.change(
            partial(rollout_step_changed, root), [rollout_run, step, view, colour], [group, inspector]
        )
        for control in (group, view, colour):
            control.change(partial(show_rollouts, root), [rollout_run, step, group, view, colour], inspector)
        for trigger in (evaluation_run.change, panel.load, evaluate_tab.select):
            trigger(partial(evaluation_run_changed, root), evaluation_run, [checkpoint, evaluation])
        evaluate.click(
            partial(start_evaluation, root, access=access),
            [evaluation_run, checkpoint, adapter, benchmarks, limit, tokens],
            [evaluation_message, evaluation],
            api_name="evaluate",
        )
        for trigger in (evaluation.change, gr.Timer(3.0).tick):
            trigger(partial(show_evaluation, root), [evaluation_run, evaluation, shown], [results, shown])
    return panel
