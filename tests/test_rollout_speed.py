"""bench/rollout_speed.py at its tiniest: every cache timed on the same prompts, the table written."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "rollout_speed.py"


@pytest.mark.slow  # times every cache, 2 rounds each: about 10 s on 2 CPU cores
def test_rollout_speed_times_each_cache_and_writes_the_table(tiny_config, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rollout_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # nothing runs at import
    config_path = tmp_path / "tiny.yaml"
    tiny_config(prompts_per_step=2, rollouts_per_prompt=3, max_new_tokens=4).save(config_path)
    options = ["--caches", "dynamic", "paged", "--rounds", "2", "--warmup", "0", "--out", str(tmp_path)]
    results = bench.main(["--config", str(config_path), *options])

    assert [row["cache"] for row in results["rows"]] == ["dynamic", "paged"]
    for row in results["rows"]:
        assert len(row["tokens_per_s_each"]) == 2 and all(s > 0 for s in row["tokens_per_s_each"])
        assert 1 <= row["mean_length"] <= 4 and math.isfinite(row["over_dynamic"])
    assert results["rows"][0]["over_dynamic"] == 1.0
    assert results["sizes"].startswith("2 prompts x 3 rollouts, up to 4 new tokens")
    saved = json.loads((tmp_path / "rollout_speed-cpu.json").read_text())
    assert saved["rows"] == results["rows"]
    assert (
        "| paged |" in (tmp_path / "rollout_speed-cpu.md").read_text()
        and "| paged |" in capsys.readouterr().out
    )
