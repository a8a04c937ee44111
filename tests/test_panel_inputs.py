"""The panel's last bad inputs: each raised a raw error or re-read a file on every tick."""

from __future__ import annotations

import time

from popo_lite.panel import jobs, ui
from popo_lite.training import runs


def test_plan_memory_with_a_nan_or_junk_card_size_says_so(tmp_path):
    for card in (float("nan"), -3, "abc", float("inf")):
        message = ui.plan_memory(tmp_path, "", {}, card)
        assert message.startswith("GPU memory must be a number of GiB"), message


def test_watch_on_a_run_whose_steps_is_not_a_number_shows_progress(tmp_path):
    run = tmp_path / "odd"
    run.mkdir()
    (run / "config.yaml").write_text("steps: abc\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    state = jobs.progress(tmp_path, "odd")
    assert (state.step, state.total) == (1, 0)


def test_an_endless_line_in_metrics_is_passed_over_once_not_on_every_tick(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "MAX_LINE_BYTES", 1_000_000)
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n' + b"x" * 3_000_000)
    assert runs.read_jsonl(path) == [{"step": 1}]
    assert runs._indexed(path).offset == path.stat().st_size  # nothing left to re-read next tick
    with path.open("ab") as handle:
        handle.write(b'\n{"step": 2}\n')
    start = time.monotonic()
    assert runs.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert time.monotonic() - start < 1.0
