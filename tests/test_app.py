"""The web panel end to end, in a real headless Chromium (Debian's chromium driven by Playwright).

`python app.py` runs as a subprocess on a free port with a temporary runs folder; the browser launches a
3-step POPO run of the tiny test model, watches its step counter and plots, finds a positive completion
in the rollout inspector and evaluates the final checkpoint. A screenshot of each view is saved in
test-artifacts/ (git-ignored). The callbacks' path checks are also driven directly, with names no
dropdown would offer, as a crafted request could send them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import panel_process

pytestmark = pytest.mark.slow  # a browser and the panel as a subprocess

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("POPO_CHROMIUM", "/usr/bin/chromium"))
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
RUN = "ui-popo"
# max_new_tokens 1: a one-digit answer, right about 1 time in 13 for the random tiny model; with 96
# rollouts over 3 steps (seed 2: positives at every step) the run has positives to find.
TINY_CONFIG = """\
model: {model}
dataset: {dataset}
problem_field: q
answer_field: gold
prompt_template: plain
device: cpu
algo: popo
prompts_per_step: 4
rollouts_per_prompt: 8
max_new_tokens: 1
temperature: 1.0
steps: 2  # the test sets 3 in the form: the form overrides the YAML
learning_rate: 1.0e-2
micro_batch_size: 32
predictor_dim: 16
kl_every: 1
lora_rank: 4
lora_alpha: 8
seed: 2
"""


@dataclass
class Panel:
    url: str
    port: int
    runs: Path
    configs: Path
    log: Path


def _write_cli_run(runs: Path) -> None:
    """A GRPO run as the CLI leaves it (no panel files), its last metrics line still being written."""
    run_dir = runs / "cli-grpo"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("algo: grpo\nsteps: 4\ndevice: cpu\n")
    records = [
        {"step": s, "algo": "grpo", "reward_mean": 0.05 * s, "positive_rate": 0.05 * s, "loss": 0.1 / s,
         "pg": 0.1 / s, "kl": 0.001 * s, "completion_length": 1.0, "generation_tokens_per_s": 100.0,
         "train_tokens_per_s": 900.0, "peak_memory_gib_rss": 0.4, "seconds_step": 2.0}
        for s in (1, 2, 3)
    ]  # fmt: skip
    text = "".join(json.dumps(record) + "\n" for record in records)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 4, "rew')


def _browser_tools():
    """Playwright's sync API, or a skip (a failure on CI, where .ci/run installs both)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package"
    if missing is None and not CHROMIUM.exists():
        missing = f"chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {missing}")
        pytest.skip(f"browser tests need {missing}")
    return sync_playwright


@pytest.fixture(scope="module")
def panel(tiny_model_dir, digit_problems, tmp_path_factory):
    base = tmp_path_factory.mktemp("panel")
    runs, configs, log = base / "runs", base / "configs", base / "app.log"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(TINY_CONFIG.format(model=tiny_model_dir, dataset=digit_problems))
    (configs / "default.yaml").write_text((ROOT / "configs" / "default.yaml").read_text())  # opened first
    _write_cli_run(runs)
    options = (
        "--configs-dir",
        str(configs),
        "--allow-path",  # the tiny model and its data live in pytest's temp folders, outside the runs folder
        str(tiny_model_dir),
        "--allow-path",
        str(digit_problems.parent),
    )
    with panel_process(runs, log, *options) as (url, port):
        yield Panel(url, port, runs, configs, log)


@pytest.fixture(scope="module")
def page(panel):
    sync_playwright = _browser_tools()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        view = browser.new_page(viewport={"width": 1400, "height": 1000})
        view.set_default_timeout(30_000)
        view.goto(panel.url)
        yield view
        browser.close()


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp{,6} (hex, little-endian IPv4)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


def test_panel_binds_to_localhost_only(panel):
    import app

    assert app.build_parser().parse_args([]).host == "127.0.0.1"
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert _listening_addresses(panel.port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or ::


def test_launch_opens_on_the_default_recipe_the_embedded_cpu_run(page, panel):
    from playwright.sync_api import expect

    expect(page.locator("#config-choice input")).to_have_value("default.yaml")  # not the first by name
    expect(page.locator("#config-editor")).to_contain_text("model: embedded")


def _pick_recipe(page, name: str) -> None:
    page.locator("#config-choice input").click()
    page.get_by_role("option", name=name).click()


def test_launch_starts_a_run_and_refuses_a_second_or_escaping_one(page, panel):
    from playwright.sync_api import expect

    _pick_recipe(page, "tiny.yaml")
    expect(page.locator("#config-editor")).to_contain_text("predictor_dim: 16")
    expect(page.locator("#config-editor")).to_contain_text("prompts_per_step")
    page.locator("#plan-button").click()  # the memory plan of the config as it would start
    expect(page.locator("#plan-message")).to_contain_text("memory plan:", timeout=120_000)
    expect(page.locator("#plan-message")).to_contain_text("fits a 24 GiB card")
    page.get_by_label("steps", exact=True).fill("3")
    page.locator("#run-name textarea").fill(RUN)
    page.locator("#start-button").click()
    expect(page.locator("#launch-message")).to_contain_text(f"Started run {RUN}")
    page.locator("#run-name textarea").fill("../escape")
    page.locator("#start-button").click()
    expect(page.locator("#launch-message")).to_contain_text("is not allowed")
    page.locator("#run-name textarea").fill("ui-second")
    page.locator("#start-button").click()
    expect(page.locator("#launch-message")).to_contain_text(f"busy: training of run '{RUN}'")
    expect(page.locator("#active-jobs")).to_contain_text(RUN)
    page.screenshot(path=ARTIFACTS / "panel-launch.png", full_page=True)
    assert not (panel.runs / "ui-second").exists() and not (panel.runs.parent / "escape").exists()
    assert "steps: 3" in (panel.runs / RUN / "config.yaml").read_text()
    assert (panel.runs / RUN / "train.log").is_file()


def test_watch_shows_the_step_counter_and_plots_update_live(page, panel):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Watch").click()
    progress = page.locator(f"#progress .run-progress[data-run='{RUN}']")
    # Any step: the tiny model's steps take about a second, so the 2 s refresh may skip one.
    expect(progress).to_have_attribute("data-step", re.compile("[123]"), timeout=150_000)
    expect(progress.locator(".step-counter")).to_have_text(re.compile(r"step [123] / 3"))
    expect(progress).to_have_attribute("data-step", "3", timeout=120_000)
    line = page.locator("#plot-reward_mean path[aria-roledescription='line mark']").first
    expect(line).to_have_attribute("d", _path_with_points(3), timeout=20_000)  # all three steps drawn
    x_axis = page.locator("#plot-reward_mean g[aria-roledescription='axis'][aria-label^='X-axis']")
    expect(x_axis).to_have_attribute("aria-label", re.compile(r"discrete scale with 3 values: 1, 2, 3$"))
    ticks = x_axis.locator(".role-axis-label text").evaluate_all("texts => texts.map(t => t.textContent)")
    assert ticks == ["1", "2", "3"]  # one label per step, none between
    summary = page.locator(f"#run-summary .run-summary[data-run='{RUN}']")  # the CLI's end-of-run summary
    expect(summary).to_contain_text("popo: 3 steps")
    expect(summary).to_contain_text("train reward:")
    expect(summary).to_contain_text(f"run directory: {panel.runs / RUN}")
    expect(summary).to_contain_text("before ->")  # the default eval_every: held-out before and after
    expect(page.locator("#plot-cosine_policy_ema")).to_be_visible()
    page.locator("#watch-runs input").click()
    page.get_by_role("option", name="cli-grpo").click()  # a CLI run, overlaid
    page.keyboard.press("Escape")
    expect(page.locator("#plot-reward_mean path[aria-roledescription='line mark']")).to_have_count(2)
    expect(page.locator("#progress .run-progress[data-run='cli-grpo']")).to_have_attribute("data-step", "3")
    expect(page.locator("#run-summary .run-summary[data-run='cli-grpo']")).to_contain_text("grpo: 3 steps")
    page.wait_for_timeout(1000)
    page.screenshot(path=ARTIFACTS / "panel-watch.png", full_page=True)
    page.locator("#watch-runs .token", has_text=RUN).locator(".token-remove").click()  # the GRPO run alone
    expect(page.locator("#run-summary .run-summary")).to_have_count(1)
    for plot in ("cosine_policy_ema", "eval_"):  # POPO-only, and no eval_every: hidden, not empty axes
        expect(page.locator(f"#plot-{plot}")).to_be_hidden()
    expect(page.locator("#run-summary .not-recorded")).to_contain_text("cosine policy vs EMA, eval pass@1")
    expect(page.locator("#plot-kl_policy_ema")).to_be_visible()  # its KL vs base
    page.screenshot(path=ARTIFACTS / "panel-watch-grpo.png", full_page=True)


def _path_with_points(count: int) -> re.Pattern:
    """An SVG path `d` of a line through at least `count` points (M x,y then L x,y ...)."""
    return re.compile(r"^M[^L]+" + r"(L[^L]+)" * (count - 1))


def test_rollout_inspector_finds_positive_completions_first(page, panel):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Rollouts").click()
    expect(page.locator("#rollout-run input")).to_have_value(RUN)
    expect(page.locator("#rollout-step input")).to_have_value("3")
    expect(page.locator("#rollout-view .group")).to_have_count(4)  # B = 4 prompts
    expect(page.locator("#rollout-view .group").first.locator(".rollout")).to_have_count(8)  # all G
    expect(page.locator("#rollout-view .rollout.positive").first).to_contain_text("✓ positive")
    kinds = page.locator("#rollout-view .group").evaluate_all(
        "groups => groups.map(g => [...g.querySelectorAll('.rollout')].map(r => r.classList[1]).join(' '))"
    )
    for order in kinds:  # positives first in every group
        assert "negative positive" not in order, order
    page.screenshot(path=ARTIFACTS / "panel-rollouts.png", full_page=True)
    page.get_by_label("only positives").check()
    positive = page.locator("#rollout-view .rollout.positive").first
    expect(page.locator("#rollout-view .rollout.negative")).to_have_count(0)
    extracted, gold = positive.locator("code").all_inner_texts()[:2]
    assert extracted == gold  # a positive's extracted answer is the gold answer
    page.get_by_label("only zero-positive groups").check()
    expect(page.locator("#rollout-view .rollout.positive")).to_have_count(0)


def test_evaluate_runs_on_a_checkpoint_or_says_it_is_missing(page, panel):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Evaluate").click()
    expect(page.locator("#evaluation-checkpoint input")).to_have_value("step-000003")
    page.get_by_label("Benchmarks (comma-separated)").fill("gsm8k_test")
    page.get_by_label("Problems per benchmark").fill("2")
    page.get_by_label("Max new tokens").fill("2")
    page.get_by_role("button", name="Evaluate").click()
    results = page.locator("#evaluation-results")
    expect(results).to_contain_text("Evaluation done", timeout=150_000)
    expect(results.locator("table")).to_contain_text("gsm8k_test")
    page.screenshot(path=ARTIFACTS / "panel-evaluate.png", full_page=True)


def test_callbacks_refuse_names_and_paths_outside_the_runs_folder(panel):
    """What a crafted request could send, bypassing the dropdowns: nothing is read or written outside."""
    from popo_lite.panel import ui

    root, configs = panel.runs, panel.configs
    secret = root.parent / "secret.yaml"
    secret.write_text("model: leaked\n")
    for name in ("..", "../secret", "/etc", "a/../../b"):
        assert "not allowed" in ui.show_rollouts(root, name, 1, "all", "all", False)
        assert "not allowed" in ui.start_run(root, "steps: 1\n", {}, name, *[None] * len(ui.FORM))[0]
        assert "not allowed" in ui.stop_job(root, name)
        assert "not allowed" in ui.resume_run(root, name)
        assert "not allowed" in ui.watch_tick(root, [name], None)[0]
    with pytest.raises(Exception, match=r"not allowed|outside"):
        ui.load_config_file(configs, "../secret.yaml")
    assert "Not started" in ui.start_evaluation(root, "cli-grpo", "../../x", "ema", "gsm8k_test", 2, 2)[0]
    assert not any(p.name in ("secret", "b") for p in root.parent.iterdir() if p.is_dir())
