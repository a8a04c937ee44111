"""Nothing outside a run folder is ever read, written or deleted, and --resume never silently starts over.

Each case plants files or links in a copy of a real 2-step run (`planted`) next to a decoy tree outside
the runs folder, then drives the command line (in process: `popo_lite.train.main`, the evaluator's
`main`) or the panel over HTTP. Every test hashes the decoy tree before and after: nothing outside
changes, and no decoy text is ever shown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import kill_panel_jobs, panel_process

from popo_lite import evaluate as evaluator
from popo_lite import train as cli
from popo_lite.config import Config, ConfigError
from popo_lite.panel import jobs
from popo_lite.panel.paths import BrowserAccess
from popo_lite.training import job_slot
from popo_lite.training.run_paths import RunsError, open_file, write_text
from popo_lite.training.trainer import train

DECOY = "DECOY-9f3a"  # in every file outside: a response holding it showed a file from outside


def _digest(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, links not followed: its bytes' hash, its link target or 'folder'."""
    found = {}
    for top, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(top) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "folder"
    return found


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, digit_problems, tmp_path_factory) -> Path:
    """A finished 2-step POPO run on the tiny model, checkpointed at both steps."""
    root = tmp_path_factory.mktemp("base") / "runs"
    config = Config(
        model=str(tiny_model_dir),
        dataset=str(digit_problems),
        problem_field="q",
        answer_field="gold",
        prompt_template="plain",
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=2,
        steps=2,
        save_every=1,
        micro_batch_size=4,
        predictor_dim=16,
        lora_rank=4,
        lora_alpha=8,
        kl_every=0,
        eval_every=0,
        device="cpu",
        output_dir=str(root),
        run_name="r",
    )
    list(train(config))
    return root / "r"


@dataclass
class Planted:
    root: Path  # the runs folder
    run: Path  # runs/r, a copy of base_run
    outside: Path  # the decoy tree

    def link(self, name: str, target: str | Path) -> Path:
        """Replace `run/name` (a file or a folder) by a symlink to `target`."""
        path = self.run / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        path.symlink_to(target)
        return path

    def copy(self, name: str) -> Path:
        """Another run of the runs folder, a copy of the base run."""
        shutil.copytree(self.run, self.root / name, symlinks=True)
        return self.root / name


@pytest.fixture
def planted(base_run, tmp_path) -> Planted:
    """runs/r, a copy of a real run, and outside/, a decoy tree every case may point links at."""
    outside = tmp_path / "outside"
    (outside / "folder" / f"{DECOY}-evaluation").mkdir(parents=True)
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "note": DECOY}))
    (outside / "secret.jsonl").write_text(json.dumps({"step": 1, "reward_mean": DECOY}) + "\n")
    (outside / "secret.log").write_text(f"{DECOY} log\n")
    (outside / "secret.yaml").write_text(f"# {DECOY}\nmodel: {outside / 'model'}\nsteps: 2\ndevice: cpu\n")
    (outside / "results.md").write_text(f"# {DECOY} results\n")
    (outside / "pwn.json").write_text(json.dumps({"pid": 1, "note": DECOY}))
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(base_run, root / "r", symlinks=True)
    return Planted(root, root / "r", outside)


def _resume(planted: Planted, capsys, *options: str) -> tuple[int, str]:
    """`python -m popo_lite.train --output_dir RUNS --run_name r --resume OPTIONS`, in process."""
    code = cli.main(["--output_dir", str(planted.root), "--run_name", "r", "--resume", *options])
    return code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- links out of the run: refused before anything is written -------------------------------------------

LINKS = {  # the planted name: what it points at, outside
    "metrics.jsonl": "secret.jsonl",
    "rollouts.jsonl": "secret.jsonl",
    "config.yaml": "secret.yaml",
    "train.log": "secret.log",
    ".writer.lock": "pwn.json",
    "checkpoints": "folder",
    "eval": "folder",
    "evaluations": "folder",
}


@pytest.mark.parametrize("name", LINKS)
def test_cli_resume_refuses_a_run_file_linked_outside_and_changes_nothing(planted, capsys, name):
    planted.link(name, planted.outside / LINKS[name])
    outside, run = _digest(planted.outside), _digest(planted.run)
    code, stderr = _resume(planted, capsys)
    line = _one_error_line(stderr)
    assert code == 2 and name in line and "symbolic link" in line and "nothing was changed" in line
    assert _digest(planted.outside) == outside and _digest(planted.run) == run
    assert DECOY not in stderr


def test_run_file_writes_never_follow_a_link_even_one_that_stays_inside(planted):
    planted.link("metrics.jsonl", planted.run / "rollouts.jsonl")
    planted.link("evaluations", planted.outside / "folder")
    before, outside = _digest(planted.run), _digest(planted.outside)
    for mode in ("a", "w"):
        with pytest.raises(RunsError, match="symbolic link"):
            open_file(planted.run, "metrics.jsonl", mode=mode)
    with pytest.raises(RunsError, match="leaves the run folder"):
        write_text(planted.run, "evaluations", "x", "results.md", text="no")
    with pytest.raises(RunsError, match=r"never '\.\.'"):
        write_text(planted.run, "..", "escaped.txt", text="no")
    assert _digest(planted.run) == before and _digest(planted.outside) == outside


def test_a_fifo_where_a_run_file_belongs_is_refused_without_blocking(planted, capsys):
    (planted.run / "metrics.jsonl").unlink()
    os.mkfifo(planted.run / "metrics.jsonl")
    code, stderr = _resume(planted, capsys)
    assert code == 2 and "metrics.jsonl" in _one_error_line(stderr) and "not a regular file" in stderr


# --- resume is a promise ---------------------------------------------------------------------------------


def _no_markers(planted: Planted) -> None:
    for marker in planted.run.glob("checkpoints/*/COMPLETE"):
        marker.unlink()


def _marker_folders(planted: Planted) -> None:
    for marker in planted.run.glob("checkpoints/*/COMPLETE"):
        marker.unlink()
        marker.mkdir()


NO_CHECKPOINT = {  # how the checkpoints were lost: what the one line says of them
    "every COMPLETE marker lost": (_no_markers, "step-000002: no COMPLETE file"),
    "COMPLETE markers are folders": (_marker_folders, "step-000002: its COMPLETE is a folder"),
    "checkpoints/ deleted": (lambda p: shutil.rmtree(p.run / "checkpoints"), "Found: none"),
}


@pytest.mark.parametrize("case", NO_CHECKPOINT)
def test_cli_resume_without_a_loadable_checkpoint_stops_with_one_line_and_keeps_the_history(
    planted, capsys, case
):
    damage, named = NO_CHECKPOINT[case]
    damage(planted)
    outside, run = _digest(planted.outside), _digest(planted.run)
    code, stderr = _resume(planted, capsys)
    line = _one_error_line(stderr)
    assert code == 2 and named in line and "Nothing was changed" in line and "--restart" in line
    assert _digest(planted.run) == run and _digest(planted.outside) == outside  # history kept


def test_cli_resume_with_checkpoints_as_a_file_is_one_line_not_a_traceback(planted, capsys):
    shutil.rmtree(planted.run / "checkpoints")
    (planted.run / "checkpoints").write_text("not a folder\n")
    run = _digest(planted.run)
    code, stderr = _resume(planted, capsys)
    assert code == 2 and "checkpoints" in _one_error_line(stderr) and "a file, not a folder" in stderr
    assert _digest(planted.run) == run


SHAPES = {  # the changed option: the field the refusal names
    ("--lora_rank", "8"): "lora_rank",
    ("--algo", "grpo"): "algo",
    ("--lora_target_modules", "q_proj"): "lora_target_modules",
    ("--predictor_dim", "64"): "predictor_dim",
}


@pytest.mark.parametrize("option", SHAPES, ids=[field for field in SHAPES.values()])
def test_cli_resume_with_another_shape_names_the_field_and_leaves_config_yaml_untouched(
    planted, capsys, option
):
    config = (planted.run / "config.yaml").read_bytes()
    run = _digest(planted.run)
    code, stderr = _resume(planted, capsys, *option)
    line = _one_error_line(stderr)
    assert code == 2 and SHAPES[option] in line and "config.yaml included" in line
    assert (planted.run / "config.yaml").read_bytes() == config and _digest(planted.run) == run
    assert _resume(planted, capsys)[0] == 0  # a plain --resume still works: nothing to do


def test_a_step_folder_that_is_a_symlink_loop_is_skipped_named_and_replaced(planted, capsys, caplog):
    shutil.rmtree(planted.run / "checkpoints" / "step-000002")
    (planted.run / "checkpoints" / "step-000002").symlink_to("step-000002")
    with caplog.at_level(logging.WARNING):
        code, stderr = _resume(planted, capsys)
    assert code == 0, stderr
    assert any("step-000002: a symbolic link" in r.getMessage() for r in caplog.records)
    step2 = planted.run / "checkpoints" / "step-000002"
    assert not step2.is_symlink() and (step2 / "COMPLETE").is_file()  # retrained once, not stuck
    steps = [json.loads(line)["step"] for line in (planted.run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_checkpoint_named_beyond_the_runs_steps_never_wins(planted, capsys, caplog):
    checkpoints = planted.run / "checkpoints"
    huge = checkpoints / "step-99999999999999999999"
    shutil.copytree(checkpoints / "step-000002", huge)
    (checkpoints / "step-000002" / "COMPLETE").unlink()
    with caplog.at_level(logging.WARNING):
        code, stderr = _resume(planted, capsys)
    assert code == 0, stderr
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "step-99999999999999999999: step 99999999999999999999 is beyond the run's 2 steps" in messages
    assert "step-000002: no COMPLETE file" in messages
    assert (checkpoints / "step-000002" / "COMPLETE").is_file() and huge.is_dir()  # step 2 retrained


def test_resume_with_fewer_steps_than_logged_changes_nothing(planted, capsys):
    run = _digest(planted.run)
    code, stderr = _resume(planted, capsys, "--steps", "1")
    assert code == 2 and "already logged 2 steps" in _one_error_line(stderr)
    assert _digest(planted.run) == run


def test_restart_starts_over_and_moves_the_old_history_aside(planted, capsys):
    (planted.run / "checkpoints" / "step-000001" / "COMPLETE").unlink()
    (planted.run / "checkpoints" / "step-000002" / "COMPLETE").unlink()
    metrics = (planted.run / "metrics.jsonl").read_bytes()
    code = cli.main(["--output_dir", str(planted.root), "--run_name", "r", "--restart"])
    assert code == 0, capsys.readouterr().err
    (aside,) = planted.run.glob("restarted-*")
    assert (aside / "metrics.jsonl").read_bytes() == metrics  # the old history, kept
    steps = [json.loads(line)["step"] for line in (planted.run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (planted.run / "checkpoints" / "step-000002" / "COMPLETE").is_file()


# --- devices and slots: a closed set ---------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:x/../../../outside/pwn", "cuda:100", "cuda:007", "cuda:-1", "gpu0"])
def test_a_device_outside_the_closed_set_is_refused_at_config_time(device):
    with pytest.raises(ConfigError, match="device"):
        Config(device=device)
    with pytest.raises(RunsError, match="device"):
        job_slot.slot_of(device)


def test_slots_come_from_the_closed_set_only():
    assert [job_slot.slot_of(d) for d in ("cpu", "mps", "cuda", "cuda:0", "cuda:7", "cuda:99")] == [
        "cpu", "cpu", "gpu0", "gpu0", "gpu7", "gpu99",
    ]  # fmt: skip
    with pytest.raises(RunsError):
        job_slot.lock_path(Path("runs"), "gpux/../../outside/pwn")


def test_a_hostile_device_in_a_run_config_never_reaches_a_lock_path(planted, tiny_model_dir, digit_problems):
    config = (planted.run / "config.yaml").read_text()
    (planted.run / "config.yaml").write_text(
        config.replace("device: cpu", "device: cuda:x/../../outside/pwn")
    )
    (planted.root / ".active-gpux").mkdir()
    (planted.root / ".active-gpu0.json").symlink_to(planted.outside / "pwn.json")
    outside = _digest(planted.outside)
    with pytest.raises(RunsError, match="device"):
        jobs.progress(planted.root, "r")
    with pytest.raises(RunsError, match="device"):
        access = BrowserAccess(allowed=(tiny_model_dir, digit_problems.parent))
        jobs.launch_evaluation(planted.root, "r", "step-000002", "ema", "digit_sums", 2, access=access)
    assert job_slot.active_jobs(planted.root) == []  # the planted lock link is no job
    assert job_slot.active_job(planted.root, "gpu0") is None
    assert _digest(planted.outside) == outside and (planted.root / ".active-gpu0.json").is_symlink()


# --- the evaluator ---------------------------------------------------------------------------------------


def test_the_evaluator_refuses_a_run_config_linked_outside(planted, capsys):
    planted.link("config.yaml", planted.outside / "secret.yaml")
    outside = _digest(planted.outside)
    adapter = planted.run / "checkpoints" / "step-000002" / "ema"
    code = evaluator.main(["--adapter", str(adapter), "--output", str(planted.run / "evaluations" / "e")])
    stderr = capsys.readouterr().err
    assert code == 2 and "config.yaml" in _one_error_line(stderr) and "symbolic link" in stderr
    assert not (planted.run / "evaluations").exists() and _digest(planted.outside) == outside


def test_the_evaluator_refuses_checkpoints_linked_into_another_run(planted, capsys):
    other = planted.copy("O")
    (other / "config.yaml").write_text(f"model: {planted.outside / 'model'}\nsteps: 2\n")
    planted.link("checkpoints", "../O/checkpoints")
    adapter = planted.run / "checkpoints" / "step-000002" / "ema"
    code = evaluator.main(["--adapter", str(adapter), "--output", str(planted.root / "e")])
    stderr = capsys.readouterr().err
    assert code == 2 and "leaves the run folder" in _one_error_line(stderr)
    assert not (planted.root / "e").exists()


# --- the panel, over HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(base_run, tiny_model_dir, digit_problems, tmp_path_factory):
    """A panel on a runs folder whose runs hold every planted case, and a gradio_client Client."""
    gradio_client = pytest.importorskip("gradio_client")
    base = tmp_path_factory.mktemp("served-planted")
    planted = Planted(base / "runs", base / "runs" / "r", base / "outside")
    planted.root.mkdir()
    shutil.copytree(base_run, planted.run, symlinks=True)
    (planted.outside / "folder" / f"{DECOY}-evaluation").mkdir(parents=True)
    (planted.outside / "model").mkdir()
    (planted.outside / "model" / "config.json").write_text(json.dumps({"note": DECOY}))
    for name, text in (("secret.jsonl", json.dumps({"step": 1, "reward_mean": DECOY}) + "\n"),
                       ("secret.yaml", f"# {DECOY}\nmodel: {planted.outside / 'model'}\nsteps: 2\n"),
                       ("results.md", f"# {DECOY} results\n"), ("pwn.json", json.dumps({"pid": 1})),
                       ("secret.log", f"{DECOY} log\n")):  # fmt: skip
        (planted.outside / name).write_text(text)
    cases = {
        "metrics-link": lambda run: (
            (run / "metrics.jsonl").unlink()
            or (run / "metrics.jsonl").symlink_to(planted.outside / "secret.jsonl")
        ),
        "log-link": lambda run: (run / "train.log").symlink_to(planted.outside / "secret.log"),
        "config-link": lambda run: (
            (run / "config.yaml").unlink()
            or (run / "config.yaml").symlink_to(planted.outside / "secret.yaml")
        ),
        "no-markers": lambda run: [m.unlink() for m in run.glob("checkpoints/*/COMPLETE")],
        "no-checkpoints": lambda run: shutil.rmtree(run / "checkpoints"),
        "pwn": lambda run: (run / "config.yaml").write_text(
            (run / "config.yaml").read_text().replace("device: cpu", "device: cuda:x/../../../outside/pwn")
        ),
        "eval-shown": lambda run: (
            (run / "evaluations" / "F").mkdir(parents=True)
            or (run / "evaluations" / "F" / "results.md").symlink_to(planted.outside / "results.md")
        ),
        "eval-listed": lambda run: (run / "evaluations").symlink_to(planted.outside / "folder"),
        "O": lambda run: (run / "config.yaml").write_text(f"model: {planted.outside / 'model'}\nsteps: 2\n"),
        "ckpt-link": lambda run: (
            shutil.rmtree(run / "checkpoints") or (run / "checkpoints").symlink_to("../O/checkpoints")
        ),
    }
    for name, plant in cases.items():
        plant(planted.copy(name))
    (planted.root / ".active-gpux").mkdir()
    outside = _digest(planted.outside)
    allowed = ("--allow-path", str(tiny_model_dir), "--allow-path", str(digit_problems.parent))
    with panel_process(planted.root, base / "app.log", *allowed) as (url, _):
        client = gradio_client.Client(url, verbose=False)
        yield client, planted, outside
    assert _digest(planted.outside) == outside


def _endpoint(client, inputs: list[str], returns: list[str] | int) -> str:
    """The first unnamed endpoint taking `inputs` (labels) and returning `returns` (labels or a count)."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name, spec in endpoints.items():
        labels = [r["label"] for r in spec["returns"]]
        shape = len(labels) if isinstance(returns, int) else labels
        if [p["label"] for p in spec["parameters"]] == inputs and shape == returns:
            return name
    raise AssertionError(f"no endpoint {inputs} -> {returns}")


RESUME_REFUSED = {  # run: what the refusal names
    "metrics-link": "metrics.jsonl",
    "log-link": "train.log",
    "config-link": "config.yaml",
    "no-markers": "step-000002: no COMPLETE file",
    "no-checkpoints": "Found: none",
    "pwn": "device",
}


@pytest.mark.slow
@pytest.mark.parametrize("run", RESUME_REFUSED)
def test_http_resume_refuses_planted_runs_and_starts_nothing(served, run):
    client, planted, outside = served
    before = _digest(planted.root)
    try:
        answer = client.predict(run, api_name="/resume")
    finally:
        after, started = _digest(planted.root), list(planted.root.glob(".active-*.json"))
        kill_panel_jobs(planted.root)
    assert answer.startswith("**Not resumed.**") and RESUME_REFUSED[run] in answer, answer
    assert after == before and not started and DECOY not in answer
    assert _digest(planted.outside) == outside


@pytest.mark.slow
def test_http_watch_shows_nothing_from_outside_and_deletes_nothing(served):
    client, planted, outside = served
    watch = _endpoint(client, ["Runs (several overlay)"], 13)
    shown = client.predict(["metrics-link", "log-link", "pwn", "r"], api_name=watch)
    text = json.dumps(shown, default=str)
    assert DECOY not in text and "is not one of" in text  # the hostile device is named, not used
    assert (planted.outside / "pwn.json").is_file() and _digest(planted.outside) == outside


@pytest.mark.slow
def test_http_evaluate_lists_and_shows_nothing_from_outside(served):
    client, planted, outside = served
    offer = _endpoint(client, ["Run"], ["Checkpoint", "Evaluation"])
    show = _endpoint(client, ["Run", "Evaluation"], 1)
    listed = client.predict("eval-listed", api_name=offer)
    assert DECOY not in json.dumps(listed, default=str)
    client.predict("eval-shown", api_name=offer)
    result = client.predict("eval-shown", "F", api_name=show)
    assert DECOY not in json.dumps(result, default=str)
    client.predict("O", api_name=offer)  # step-000002 is offered for O, whose checkpoints ckpt-link uses
    try:
        linked = client.predict("ckpt-link", "step-000002", "ema", "digit_sums", 2, 2, api_name="/evaluate")[
            0
        ]
        hostile = client.predict("pwn", "step-000002", "ema", "digit_sums", 2, 2, api_name="/evaluate")[0]
    finally:
        started = list(planted.root.glob(".active-*.json"))
        kill_panel_jobs(planted.root)
    assert linked.startswith("**Not started.**") and "not a complete checkpoint" in linked, linked
    assert hostile.startswith("**Not started.**") and "device" in hostile, hostile
    assert not started and _digest(planted.outside) == outside


def test_a_fifo_is_never_written_or_waited_on(planted):
    os.mkfifo(planted.run / "rollouts.jsonl.new")
    for mode in ("w", "a", "r"):
        with pytest.raises(RunsError, match="FIFO"):
            open_file(planted.run, "rollouts.jsonl.new", mode=mode)
