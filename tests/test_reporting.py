"""report_to: step records as TensorBoard scalars (read back from the event file), wandb when installed."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from popo_lite.config import ConfigError, load_config
from popo_lite.training import session
from popo_lite.training.reporting import Reporter, scalars
from popo_lite.training.trainer import train


def test_tensorboard_events_hold_each_numeric_field_of_the_step_record(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = list(train(tiny_config(steps=1, seed=2, report_to=["tensorboard"])))  # step 1 has positives
    folder = records[0]["run_dir"] + "/tensorboard"
    events = EventAccumulator(folder)
    events.Reload()
    reward = events.Scalars("reward_mean")
    assert [(event.step, event.value) for event in reward] == [(1, pytest.approx(records[0]["reward_mean"]))]
    assert set(scalars(records[0])) <= set(events.Tags()["scalars"])
    assert "loss" in events.Tags()["scalars"] and "run_dir" not in events.Tags()["scalars"]


def test_unknown_report_to_value_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"report_to.*'mlflow'"):
        load_config(None, {"report_to": ["tensorboard", "mlflow"]})


def test_wandb_without_the_package_fails_before_the_model_loads(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: not installed

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_policy", no_load)
    config = tiny_config(report_to=["wandb"])
    with pytest.raises(ConfigError, match="pip install wandb"):
        next(train(config))


def test_wandb_gets_the_numeric_fields_at_their_step(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    reporter = Reporter(load_config(None, {"report_to": ["wandb"]}), tmp_path / "run-a")
    reporter.log({"step": 3, "algo": "popo", "reward_mean": 0.5, "loss": 1, "warning": "x"})
    reporter.close()
    assert calls[0][0] == "init" and calls[0][1]["name"] == "run-a"
    assert calls[1:] == [("log", {"reward_mean": 0.5, "loss": 1.0}, 3), ("finish",)]
