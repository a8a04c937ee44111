"""Run directories and panel jobs (runs.py, jobs.py): safe paths, tolerant logs, the one-job lock.

Jobs here are stand-in processes (`python -c "sleep" popo_lite.train`): the lock and the stop logic
recognise a job by its module name on the command line, and no model is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popo_lite.panel import jobs
from popo_lite.training import job_slot
from popo_lite.training.runs import (
    RunsError,
    check_name,
    group_rollouts,
    list_runs,
    read_jsonl,
    read_rollouts,
    resolve_inside,
    rollout_steps,
    run_path,
)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", "popo_lite.train"]


def _make_run(root: Path, name: str, steps: int = 3, device: str = "cpu") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"algo: popo\nsteps: {steps}\ndevice: {device}\n")
    return run_dir


def _wait_dead(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not job_slot.alive(pid, "popo_lite."):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sleeper_job(tmp_path):
    """A fake training job of run 'busy' holding the cpu slot, killed afterwards whatever happened."""
    root = tmp_path / "runs"
    run_dir = _make_run(root, "busy")
    job = {"run": "busy", "kind": "training", "module": "popo_lite.train", "log": jobs.LOG_NAME}
    pid = jobs._spawn(root, "cpu", job, SLEEPER, run_dir)
    yield root, pid
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_dead(pid)


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/etc", ".hidden", "", "a\\b", "x" * 101, "a..b"])
def test_bad_run_names_are_refused(name, tmp_path):
    with pytest.raises(RunsError):
        run_path(tmp_path, name)


def test_paths_outside_the_runs_root_are_refused_even_through_symlinks(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for parts in (("link",), ("..", "outside"), ("/etc",), ("ok", "..", "..", "outside")):
        with pytest.raises(RunsError, match="outside the runs folder"):
            resolve_inside(root, *parts)
    assert resolve_inside(root, "ok", "checkpoints") == (root / "ok" / "checkpoints").resolve()
    assert check_name("popo-2026.01_a") == "popo-2026.01_a"


def test_list_runs_keeps_run_folders_only_newest_first(tmp_path):
    root = tmp_path / "runs"
    old, new = _make_run(root, "old"), _make_run(root, "new")
    os.utime(old / "config.yaml", (1, 1))
    (root / "not-a-run").mkdir()
    (root / ".active-cpu.json").write_text("{}")
    escape = _make_run(tmp_path, "elsewhere")
    (root / "sneaky").symlink_to(escape)
    assert list_runs(root) == [new.name, old.name]
    assert list_runs(tmp_path / "missing") == []


def test_jsonl_reader_waits_for_a_half_written_last_line_and_follows_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1]
    with open(path, "a") as handle:
        handle.write('ss": 2.0}\nnot json\n{"step": 3, "loss": 3.0}\n')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    path.write_text('{"step": 1, "loss": 9.0}\n')  # a resumed run truncates its logs
    assert read_jsonl(path) == [{"step": 1, "loss": 9.0}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_rollouts_are_read_by_step_and_grouped_positives_first(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"step": s, "group": g, "problem_id": f"p{g}", "prompt": "q", "completion": f"c{i}",
         "reward": float(g == 0 and i == 2), "weight": 1.0 if (g == 0 and i == 2) else 0.0, "gold": "4"}
        for s in (1, 2) for g in (0, 1) for i in range(3)
    ]  # fmt: skip
    (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert rollout_steps(run_dir) == [1, 2]
    records = read_rollouts(run_dir, 2)
    assert len(records) == 6 and {r["step"] for r in records} == {2}
    groups = group_rollouts(records)
    assert [g.positives for g in groups] == [1, 0]
    assert groups[0].rollouts[0]["completion"] == "c2" and groups[0].rollouts[0]["positive"]
    only = group_rollouts(read_rollouts(run_dir, 2), "only positives")
    assert [(g.group, len(g.rollouts)) for g in only] == [(0, 1)]
    assert [g.group for g in group_rollouts(read_rollouts(run_dir, 2), "only zero-positive groups")] == [1]
    with pytest.raises(RunsError):
        group_rollouts(records, "everything")


def test_second_job_on_a_busy_slot_is_refused_and_writes_nothing(sleeper_job):
    root, pid = sleeper_job
    assert jobs.active_job(root, "cpu")["pid"] == pid
    with pytest.raises(RunsError, match=r"busy.*'busy'"):
        jobs.launch_run(root, "second", "device: cpu\nsteps: 2\n")
    assert not (root / "second").exists()
    assert jobs.progress(root, "busy").state == "starting"


def test_job_runs_in_its_own_session_and_survives_its_launcher(tmp_path):
    """The UI's process group (a Ctrl-C, a killed panel) is not the job's: the job lives on."""
    root = tmp_path / "runs"
    _make_run(root, "detached")
    log = root / "detached" / "x.log"
    launcher = (
        "from pathlib import Path; from popo_lite.panel import jobs; "
        "job = {'run': 'detached', 'kind': 'training', 'module': 'popo_lite.train', 'log': 'x.log'}; "
        f"print(jobs._spawn(Path({str(root)!r}), 'cpu', job, {SLEEPER!r}, Path({str(log.parent)!r})))"
    )
    env = {**os.environ, "PYTHONPATH": str(jobs.PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", launcher], capture_output=True, text=True, env=env, timeout=60
    )
    pid = int(done.stdout.strip())
    try:
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert jobs.active_job(root, "cpu")["pid"] == pid  # the launcher is gone; the lock still holds
    finally:
        os.killpg(pid, signal.SIGKILL)
    assert _wait_dead(pid)
    assert jobs.active_job(root, "cpu") is None  # a dead holder's lock is stale and cleared
    assert not (root / ".active-cpu.json").exists()


def test_stop_ends_the_job_frees_the_slot_and_marks_the_run_stopped(sleeper_job):
    root, pid = sleeper_job
    assert "stopped training" in jobs.stop_run(root, "busy")
    assert _wait_dead(pid) and job_slot.active_jobs(root) == []
    assert jobs.progress(root, "busy").state == "stopped"
    assert "no active job" in jobs.stop_run(root, "busy")


def test_launch_rejects_bad_config_naming_the_key_and_creates_no_run(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(RunsError, match="lerning_rate"):
        jobs.launch_run(root, "bad", "lerning_rate: 0.1\n")
    with pytest.raises(RunsError, match="YAML"):
        jobs.launch_run(root, "bad", "steps: [1\n")
    with pytest.raises(RunsError, match="not allowed"):
        jobs.launch_run(root, "../bad", "steps: 1\n")
    with pytest.raises(RunsError, match="no run 'gone' to resume"):
        jobs.launch_run(root, "gone", resume=True)
    assert list(root.iterdir()) == []


def test_progress_reports_steps_eta_and_finish(tmp_path):
    root = tmp_path / "runs"
    run_dir = _make_run(root, "r", steps=4)
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "seconds_step": 2.0}\n{"step": 2, "seconds_step": 4.0}\n'
    )
    state = jobs.progress(root, "r")
    assert (state.step, state.total, state.state, state.eta_seconds) == (2, 4, "incomplete", None)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3}\n{"step": 4}\n')
    assert jobs.progress(root, "r").state == "finished"


def test_evaluation_refuses_paths_and_names_outside_the_run(tmp_path):
    root = tmp_path / "runs"
    run_dir = _make_run(root, "r")
    (run_dir / "checkpoints" / "step-000001" / "ema").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000001" / "ema" / "adapter_config.json").write_text("{}")
    for checkpoint, adapter, benchmarks in [
        ("../../..", "ema", "gsm8k_test"),
        ("step-000001", "../ema", "gsm8k_test"),
        ("step-000001", "ema", "/etc/passwd"),
        ("step-000002", "ema", "gsm8k_test"),
    ]:
        with pytest.raises(RunsError):
            jobs.launch_evaluation(root, "r", checkpoint, adapter, benchmarks, 2)
    with pytest.raises(RunsError):
        jobs.evaluation_result(root, "r", "../../r")
    assert job_slot.active_jobs(root) == []


def test_rollout_view_escapes_model_output_and_colours_tokens_when_logged(tmp_path):
    from popo_lite.panel.views import render_rollouts

    records = [
        {"step": 1, "group": 0, "prompt": "<b>q</b>", "completion": "<script>alert(1)</script>",
         "reward": 0.0, "weight": 0.0, "extracted": "<i>", "gold": "4"},
        {"step": 1, "group": 0, "prompt": "<b>q</b>", "completion": "4", "reward": 1.0, "weight": 1.0,
         "extracted": "4", "gold": "4", "tokens": ["<4>"], "token_logprobs": [-0.1]},
    ]  # fmt: skip
    html = render_rollouts(records, "all", "all", colour=True, config={"algo": "popo"})
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>q" not in html
    assert html.index("rollout positive") < html.index("rollout negative")
    assert 'title="log p = -0.100"' in html and "&lt;4&gt;</span>" in html
    plain = render_rollouts(records[:1], "all", "all", colour=True, config={"algo": "grpo"})
    assert "no per-token log-probs" in plain and "advantage" in plain


def test_evaluation_state_comes_from_its_table_and_log(tmp_path):
    root = tmp_path / "runs"
    folder = _make_run(root, "r") / "evaluations"
    (folder / "ok").mkdir(parents=True)
    (folder / "ok" / "results.md").write_text("| benchmark | pass@1 |\n")
    (folder / "ok.log").write_text("results in ok (3 s)\n")
    assert jobs.evaluation_result(root, "r", "ok") == ("done", "| benchmark | pass@1 |\n")
    (folder / "bad.log").write_text("error: no benchmark named 'nope'\n")
    state, text = jobs.evaluation_result(root, "r", "bad")
    assert state == "failed" and "no benchmark named" in text
    assert jobs.list_evaluations(root / "r") == ["ok", "bad"]


def test_plot_frames_overlay_runs_and_pick_up_every_eval_benchmark(tmp_path):
    from popo_lite.panel.views import PLOTS, plot_frame

    root = tmp_path / "runs"
    for name in ("a", "b"):
        records = [{"step": 1, "reward_mean": 0.5, "eval_gsm8k_test": 0.1, "eval_math500": 0.2, "loss": None}]
        (_make_run(root, name) / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    plots = dict(PLOTS)
    reward = plot_frame(root, ["a", "b"], plots["reward"])
    assert sorted(reward["series"]) == ["a", "b"] and str(reward["value"].dtype) == "float64"
    evals = plot_frame(root, ["a"], plots["eval pass@1 (eval_every)"])
    assert sorted(evals["series"]) == ["a · gsm8k_test", "a · math500"]
    assert plot_frame(root, ["a"], plots["loss"]).empty


def test_plot_frames_leave_out_what_a_step_did_not_record_and_label_steps_as_integers(tmp_path):
    from popo_lite.panel.views import CATEGORY_STEPS, PLOTS, integer_steps, plot_frame

    root = tmp_path / "runs"
    records = [{"step": s, "generation_tokens_per_s": 100.0 + s} for s in (1, 2, 3)]
    records[0]["train_tokens_per_s"] = records[2]["train_tokens_per_s"] = 900.0  # step 2: no update
    (_make_run(root, "a") / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    frame = plot_frame(root, ["a"], dict(PLOTS)["tokens / s"])
    train = frame[frame["series"] == "a · train"]
    assert list(train["step"]) == [1, 3] and list(train["value"]) == [900.0, 900.0]  # no zero, no fill
    assert list(frame[frame["series"] == "a · generation"]["step"]) == [1, 2, 3]
    assert plot_frame(root, ["a"], dict(PLOTS)["eval pass@1 (eval_every)"]).empty
    shown, order = integer_steps(frame)  # a short run: one category per step, in step order
    assert order == ["1", "2", "3"] and set(shown["step"]) == {"1", "2", "3"}
    wide = frame.assign(step=[1, 2, 1 + CATEGORY_STEPS, 1, 1])  # a long run: integers on a numeric axis
    shown, order = integer_steps(wide)
    assert order is None and str(shown["step"].dtype) == "int64"
    assert integer_steps(wide.assign(step=[1, 2, CATEGORY_STEPS, 1, 1]))[1] == ["1", "2", str(CATEGORY_STEPS)]


def test_watch_summary_is_the_cli_summary_escaped_and_empty_before_the_first_step(tmp_path):
    from popo_lite.panel.views import render_not_recorded, render_summaries
    from popo_lite.training.summary import render_summary, run_summary

    root = tmp_path / "<b>runs"  # the summary names the run directory: a path is text, not markup
    _make_run(root, "empty")
    run_dir = _make_run(root, "r")
    records = [{"step": s, "algo": "popo", "reward_mean": 0.25 * s, "positive_rate": 0.5} for s in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert render_summaries(root, ["empty"]) == ""
    html = render_summaries(root, ["empty", "r"])
    assert "<b>runs" not in html and "&lt;b&gt;runs/r" in html
    assert "train reward: 0.250 at step 1 -&gt; 0.500 at step 2" in html
    assert html.count('class="run-summary"') == 1 and len(render_summary(run_summary(run_dir))) > 0
    assert "Not recorded in this run: KL, eval." in render_not_recorded(["KL", "eval"])
    assert render_not_recorded([]) == ""
