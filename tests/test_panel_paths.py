"""What a config from the browser may name (popo_lite/panel/paths.py), as a function and over HTTP.

The unit tests drive `check_browser_config` and the jobs that apply it; the HTTP tests start `python
app.py` as a subprocess on a free port (as tests/test_app.py does) and call its Start, Plan, Resume and
Evaluate endpoints with gradio_client, as a crafted request would, bypassing every widget: a path outside
the runs folder, a `..` path, a symlink out of the runs folder, an eval_benchmarks entry outside and
trust_remote_code are refused, nothing is started or written, and a file in an --allow-path folder is
accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import kill_panel_jobs, panel_process

from popo_lite.panel import jobs
from popo_lite.panel.paths import BrowserAccess, check_browser_config
from popo_lite.training.runs import RunsError

ROOT = Path(__file__).resolve().parents[1]
MODEL_JSON = {  # enough of a config.json for the memory planner to read a model's shapes
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
}  # fmt: skip


@pytest.fixture
def place(tmp_path, monkeypatch):
    """runs/, configs/, an --allow-path folder and, outside all three, a secret file and a model folder."""
    base = tmp_path
    runs, configs, allowed, outside = (base / n for n in ("runs", "configs", "allowed", "outside"))
    for folder in (runs, configs, allowed / "model", outside / "model"):
        folder.mkdir(parents=True)
    for folder in (allowed, outside):
        (folder / "sums.jsonl").write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n')
        (folder / "model" / "config.json").write_text(json.dumps(MODEL_JSON))
        (folder / "model" / "m.gguf").write_text("not really a gguf")
    (runs / "link.jsonl").symlink_to(outside / "sums.jsonl")
    (allowed / "model" / "link.gguf").symlink_to(outside / "model" / "m.gguf")
    monkeypatch.chdir(base)
    return runs, configs, allowed, outside


def _fill(values: dict, place) -> dict:
    """`{runs}`, `{configs}`, `{allowed}` and `{outside}` in the values replaced by those folders."""
    folders = dict(zip(("runs", "configs", "allowed", "outside"), place, strict=True))

    def fill(value):
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value.format(**folders) if isinstance(value, str) and "{" in value else value

    return {key: fill(value) for key, value in values.items()}


def _check(values, place, **kwargs):
    runs, configs, allowed, _ = place
    check_browser_config(values, runs, configs, [allowed], **kwargs)


@pytest.mark.parametrize(
    "values",
    [
        {"model": "embedded", "dataset": "digit_sums", "eval_benchmarks": ["math500", "gsm8k_test"]},
        {"model": "Qwen/Qwen2.5-Math-1.5B", "dataset": "openai/gsm8k", "eval_benchmarks": ["org/bench"]},
        {"dataset": "{runs}/data.jsonl", "eval_benchmarks": ["{configs}/bench.jsonl"]},
        {"dataset": "{allowed}/sums.jsonl", "model": "{allowed}/model", "gguf_file": "m.gguf"},
        {"dataset": "runs/data.jsonl", "model": "allowed/model/m.gguf"},  # relative to the working dir
        {"output_dir": "{runs}"},
        {"output_dir": "runs"},
        {"trust_remote_code": False, "gguf_file": None, "model": None},
    ],
)
def test_the_rule_accepts_bundled_names_hub_ids_and_paths_inside(place, values):
    _check(_fill(values, place), place)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"dataset": "{outside}/sums.jsonl"}, "dataset"),
        ({"dataset": "/etc/passwd"}, "dataset"),
        ({"dataset": "{runs}/../outside/sums.jsonl"}, "dataset"),  # a `..` out of the runs folder
        ({"dataset": "../../etc/passwd"}, "dataset"),
        ({"dataset": "{runs}/link.jsonl"}, "dataset"),  # a symlink inside that points outside
        ({"dataset": "outside/sums.jsonl"}, "dataset"),  # relative to the working directory
        ({"dataset": "~/sums.jsonl"}, "dataset"),  # HOME is `outside` here
        ({"dataset": "outside"}, "dataset"),  # a Hub-style name that is an existing local folder
        ({"dataset": 7}, "dataset"),
        ({"dataset": "a\0b"}, "dataset"),
        ({"eval_benchmarks": ["math500", "{outside}/sums.jsonl"]}, "eval_benchmarks entry"),
        ({"eval_benchmarks": "{outside}/sums.jsonl"}, "eval_benchmarks entry"),
        ({"model": "{outside}/model"}, "model"),
        ({"model": "{outside}/model/m.gguf"}, "model"),
        ({"model": "{allowed}/model", "gguf_file": "../../outside/model/m.gguf"}, "gguf_file"),
        ({"model": "{allowed}/model", "gguf_file": "/etc/passwd"}, "gguf_file"),
        ({"model": "{allowed}/model", "gguf_file": "link.gguf"}, "gguf_file"),  # a symlink out
        ({"output_dir": "{outside}"}, "output_dir"),
        ({"output_dir": "{runs}/sub"}, "output_dir"),
        ({"trust_remote_code": True}, "trust_remote_code"),
    ],
)
def test_the_rule_refuses_paths_outside_and_remote_code_naming_the_field(place, values, field, monkeypatch):
    monkeypatch.setenv("HOME", str(place[3]))
    with pytest.raises(RunsError, match="not allowed from the browser") as refused:
        _check(_fill(values, place), place)
    assert str(refused.value).startswith(field)


def test_remote_code_is_allowed_only_when_the_panel_allows_it(place):
    _check({"trust_remote_code": True}, place, remote_code=True)
    with pytest.raises(RunsError, match="--allow-remote-code"):
        BrowserAccess().check({"trust_remote_code": True}, place[0])


def test_without_allow_path_only_the_runs_folder_is_readable(place):
    runs, configs, allowed, _ = place
    BrowserAccess().check({"dataset": str(runs / "x.jsonl")}, runs)
    for path in (configs / "x.jsonl", allowed / "sums.jsonl"):
        with pytest.raises(RunsError, match="dataset"):
            BrowserAccess().check({"dataset": str(path)}, runs)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_jobs_refuse_before_anything_is_started_or_written(place, monkeypatch):
    runs, configs, allowed, outside = place
    access = BrowserAccess(configs, (allowed,))
    (runs / "old").mkdir()
    (runs / "old" / "config.yaml").write_text(f"dataset: {outside / 'sums.jsonl'}\ndevice: cpu\n")
    step = runs / "old" / "checkpoints" / "step-000001" / "ema"
    step.mkdir(parents=True)
    (step / "adapter_config.json").write_text("{}")
    (step.parent / "COMPLETE").write_text("")  # a complete checkpoint: the only kind evaluated
    before = _files(runs)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(jobs.subprocess, "Popen", no_process)
    monkeypatch.setattr(jobs.subprocess, "run", no_process)
    with pytest.raises(RunsError, match="dataset"):
        jobs.launch_run(runs, "new", f"dataset: {outside / 'sums.jsonl'}\n", access=access)
    with pytest.raises(RunsError, match="trust_remote_code"):
        jobs.launch_run(runs, "new", "steps: 2\n", {"trust_remote_code": True}, access=access)
    with pytest.raises(RunsError, match="model"):  # a form override is held to the rule too
        jobs.launch_run(runs, "new", "steps: 2\n", {"model": str(outside / "model")}, access=access)
    with pytest.raises(RunsError, match="dataset"):  # a resumed run's own config.yaml too
        jobs.launch_run(runs, "old", resume=True, access=access)
    assert "dataset" in jobs.plan_memory(f"dataset: {outside}/sums.jsonl\n", {}, 24, root=runs, access=access)
    with pytest.raises(RunsError, match="eval_benchmarks entry"):
        jobs.launch_evaluation(runs, "old", "step-000001", "ema", f"gsm8k_test,{outside}/sums.jsonl", 2)
    (runs / "old" / "config.yaml").write_text(f"model: {outside / 'model'}\ndevice: cpu\n")
    with pytest.raises(RunsError, match="model"):  # the evaluator would load the run's model
        jobs.launch_evaluation(runs, "old", "step-000001", "ema", "gsm8k_test", 2, access=access)
    assert _files(runs) == before


# --- over HTTP -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python app.py --allow-path allowed/` on a free port, and a gradio_client Client talking to it."""
    gradio_client = pytest.importorskip("gradio_client")
    base = tmp_path_factory.mktemp("served")
    runs, configs, allowed, outside = (base / n for n in ("runs", "configs", "allowed", "outside"))
    for folder in (runs, configs, allowed / "model", outside / "model"):
        folder.mkdir(parents=True)
    for folder in (allowed, outside):
        (folder / "sums.jsonl").write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n')
        (folder / "model" / "config.json").write_text(json.dumps(MODEL_JSON))
    (runs / "link.jsonl").symlink_to(outside / "sums.jsonl")
    for name, model in (("mine", "embedded"), ("foreign", outside / "model")):  # foreign: a CLI run's
        (runs / name / "checkpoints" / "step-000001" / "ema").mkdir(parents=True)
        (runs / name / "config.yaml").write_text(f"model: {model}\ndevice: cpu\nsteps: 2\n")
        (runs / name / "checkpoints" / "step-000001" / "ema" / "adapter_config.json").write_text("{}")
        (runs / name / "checkpoints" / "step-000001" / "COMPLETE").write_text("")
    options = ("--configs-dir", str(configs), "--allow-path", str(allowed))
    with panel_process(runs, base / "app.log", *options) as (url, _):
        yield gradio_client.Client(url, verbose=False), runs, allowed, outside


FORM_NONE = [None] * 12  # the form fields (model, --qlora, algo, the numbers): None = the YAML's value


def _start(client, text: str, name: str) -> str:
    return client.predict(text, name, *FORM_NONE, api_name="/start")[0]


def _plan(client, text: str) -> str:
    return client.predict(text, 24, *FORM_NONE, api_name="/plan")


def _evaluate(client, run: str, benchmarks: str) -> str:
    return client.predict(run, "step-000001", "ema", benchmarks, 2, 2, api_name="/evaluate")[0]


REFUSED = {  # case: (YAML, the field the refusal names)
    "outside": ("dataset: {outside}/sums.jsonl", "dataset"),
    "dotdot": ("dataset: {runs}/../outside/sums.jsonl", "dataset"),
    "symlink": ("dataset: {runs}/link.jsonl", "dataset"),
    "eval-entry": (
        "eval_benchmarks: [digit_sums, {outside}/sums.jsonl]\neval_every: 1",
        "eval_benchmarks entry",
    ),
    "model": ("model: {outside}/model", "model"),
    "output-dir": ("output_dir: {outside}", "output_dir"),
    "remote-code": ("trust_remote_code: true", "trust_remote_code"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_http_start_and_plan_refuse_paths_outside_and_start_nothing(served, case):
    client, runs, _, outside = served
    yaml_text, field = REFUSED[case]
    text = yaml_text.format(runs=runs, outside=outside) + "\ndevice: cpu\nsteps: 2\n"
    before = _files(runs)
    try:
        started = _start(client, text, f"crafted-{case}")
        planned = _plan(client, text)
    finally:
        after, started_jobs = _files(runs), list(runs.glob(".active-*.json"))
        kill_panel_jobs(runs)
    assert started.startswith(f"**Not started.** {field}") and "not allowed from the browser" in started
    assert planned.startswith(f"```\n{field}") and "not allowed from the browser" in planned
    assert "memory plan" not in planned
    assert after == before and not started_jobs  # no run folder, no lock, no log


@pytest.mark.slow
def test_http_resume_and_evaluate_refuse_a_run_naming_a_model_outside(served):
    client, runs, _, outside = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    # The checkpoint dropdown accepts what this session was offered: pick each run as the page does.
    offer = next(
        k for k, v in endpoints.items() if [r["label"] for r in v["returns"]] == ["Checkpoint", "Evaluation"]
    )
    before = _files(runs)
    try:
        resumed = client.predict("foreign", api_name="/resume")
        client.predict("foreign", api_name=offer)
        evaluated = _evaluate(client, "foreign", "gsm8k_test")
        client.predict("mine", api_name=offer)
        benchmark = _evaluate(client, "mine", f"gsm8k_test,{outside}/sums.jsonl")
    finally:
        after, started_jobs = _files(runs), list(runs.glob(".active-*.json"))
        kill_panel_jobs(runs)
    assert "Not resumed" in resumed and "model " in resumed and "not allowed" in resumed
    assert "Not started" in evaluated and "model " in evaluated and "not allowed" in evaluated
    assert "Not started" in benchmark and "eval_benchmarks entry" in benchmark
    assert after == before and not started_jobs


@pytest.mark.slow
def test_http_accepts_files_inside_an_allow_path_folder(served):
    client, runs, allowed, _ = served
    text = f"model: {allowed}/model\ndataset: {allowed}/sums.jsonl\ndevice: cpu\nsteps: 2\n"
    planned = _plan(client, text)
    assert "memory plan" in planned, planned  # the planner read the model's config.json
    try:
        started = _start(client, text, "allowed-run")
    finally:
        kill_panel_jobs(runs)  # the job was started: that is the point; it need not train
    assert "Started run" in started, started
    assert f"dataset: {allowed}/sums.jsonl" in (runs / "allowed-run" / "config.yaml").read_text()
