"""The learning-rate sweep, confirmation and ablations of bench/study.py, without training:
the selection rule, the paired-difference interval, the validation/reported split, the tau rule, and
resumability (a cell already in the JSON is skipped), on hand-computed values and fake cells.
"""

from __future__ import annotations

import json
import math

import pytest
from test_study import load_study, tiny_options

load_study()  # puts the repository root on sys.path

from bench.study_arms import (  # noqa: E402
    Study,
    ema_moved,
    half_life_tau,
    pair_key,
    split_heldout,
)
from bench.study_selection import choose_rate, chosen_rates, paired_difference, t_975  # noqa: E402
from bench.study_tables import confirm_markdown, sweep_markdown, write_tables  # noqa: E402
from popo_lite.config import Config  # noqa: E402
from popo_lite.evaluation.benchmarks import load_benchmarks  # noqa: E402


def cell(arm, rate, seed, greedy, **extra):
    return {"arm": arm, "learning_rate": rate, "seed": seed, "greedy": {"pass@1": greedy}, **extra}


def test_the_rule_picks_the_highest_mean_and_breaks_ties_toward_the_smaller_rate():
    assert choose_rate({1e-4: 0.30, 2e-4: 0.45, 4e-4: 0.40}) == 2e-4
    assert choose_rate({1e-4: 0.45, 2e-4: 0.45, 4e-4: 0.40}) == 1e-4  # a tie: the smaller rate
    assert choose_rate({1e-4: 0.50, 2e-4: None}) is None  # an incomplete method is not chosen
    cells = [
        cell("popo", 1e-4, 0, 0.25),
        cell("popo", 1e-4, 1, 0.75),  # mean 0.50
        cell("popo", 2e-4, 0, 0.50),
        cell("popo", 2e-4, 1, 0.50),  # mean 0.50: ties 1e-4 -> 1e-4
        cell("grpo", 1e-4, 0, 0.10),
        cell("grpo", 1e-4, 1, 0.20),  # mean 0.15
        cell("grpo", 2e-4, 0, 0.30),
        cell("grpo", 2e-4, 1, 0.10),  # mean 0.20 -> 2e-4
        cell("psr", 1e-4, 0, 0.90),  # seed 1 missing at 1e-4: psr is not chosen
        cell("psr", 2e-4, 0, 0.10),
        cell("psr", 2e-4, 1, 0.10),
    ]
    chosen = chosen_rates(cells, ["grpo", "popo", "psr"], [1e-4, 2e-4], [0, 1])
    assert chosen == {"grpo": 2e-4, "popo": 1e-4, "psr": None}


def test_the_paired_difference_interval_is_the_t_interval_over_seeds():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.303, half-width 4.303 * 0.1 / sqrt(3)
    popo, grpo = {0: 0.5, 1: 0.6, 2: 0.7, 7: 0.9}, {0: 0.4, 1: 0.4, 2: 0.4}
    found = paired_difference(popo, grpo)
    assert found["n"] == 3 and found["seeds"] == [0, 1, 2]  # seed 7 has no partner
    assert found["mean"] == pytest.approx(0.2)
    assert found["high"] - found["mean"] == pytest.approx(0.248434, abs=1e-6)
    assert found["low"] == pytest.approx(0.2 - 0.248434, abs=1e-6)
    assert t_975(4) == 2.776 and t_975(22) == 2.086  # between tabled rows: the smaller df (wider)
    assert paired_difference({0: 0.5}, {0: 0.4}) is None


def test_the_validation_and_reported_halves_are_disjoint_and_keep_both_orders_of_a_sum_together():
    problems = load_benchmarks(["two_digit_sums"])["two_digit_sums"]
    validation, reported = split_heldout(problems)
    assert (len(problems), len(validation), len(reported)) == (200, 99, 101)
    assert len(reported) >= 96
    assert {p.id for p in validation}.isdisjoint({p.id for p in reported})
    assert {p.id for p in validation} | {p.id for p in reported} == {p.id for p in problems}
    assert {pair_key(p) for p in validation}.isdisjoint({pair_key(p) for p in reported})  # a+b, b+a
    assert split_heldout(problems) == (validation, reported)  # deterministic
    assert reported == [p for p in problems if p in reported]  # in the held-out split's own order


def test_tau_puts_the_ema_half_life_at_half_the_run_and_the_ema_counts_as_moved():
    assert half_life_tau(24) ** 12 == pytest.approx(0.5) and half_life_tau(32) == pytest.approx(0.5**0.0625)
    assert ema_moved(half_life_tau(32), 32)  # the start weighs 0.25
    assert not ema_moved(0.995, 8)  # the committed 8-step study: the start still weighs 0.96
    assert not ema_moved(0.0, 32) and not ema_moved(1.0, 32)


def test_sweep_configs_set_the_rate_and_popos_tau_but_not_psrs(tiny_model_dir, digit_problems, tmp_path):
    study = load_study()
    options = tiny_options(tiny_model_dir, digit_problems, tmp_path)
    built: Study = study.build_study(study.parser().parse_args([*options, "--mode", "sweep"]))
    assert built.part == "validation" and built.samples == 0 and built.steps == 2  # --steps 2 wins
    popo, psr, grpo = (built.config(arm, 1, 4e-4) for arm in ("popo", "psr", "grpo"))
    assert popo.tau == pytest.approx(0.5 ** (2 / 2)) and psr.tau == 0.0
    assert popo.learning_rate == psr.learning_rate == grpo.learning_rate == 4e-4
    assert popo.run_name == "popo-lr4e-4-seed1"
    assert built.signature("popo", 4e-4) != built.signature("popo", 2e-4)
    confirm = study.build_study(study.parser().parse_args([*options, "--mode", "confirm"]))
    name = str(digit_problems)
    heldout = load_benchmarks([name], problem_field="q", answer_field="gold")[name]
    _, reported = split_heldout(heldout)
    assert [p.id for p in confirm.heldout] == [p.id for p in reported[:8]]  # --heldout 8 of reported
    assert confirm.samples == 64 and confirm.ks[-1] == 64


def _fake(built: Study, arm: str, rate, seed, greedy: float) -> dict:
    config = built.config(arm, seed or 0, rate).to_dict()
    found = {
        "arm": arm,
        "seed": seed,
        "about": arm,
        "signature": built.signature(arm, rate),
        "config": config,
        "greedy": {"pass@1": greedy, "problems": len(built.heldout)},
        "wall_seconds": 60.0,
    }
    return found if rate is None else {**found, "learning_rate": rate}


def test_a_cell_in_the_json_is_skipped_and_only_missing_cells_run(
    tiny_model_dir, digit_problems, tmp_path, monkeypatch, capsys
):
    study = load_study()
    options = [
        *tiny_options(tiny_model_dir, digit_problems, tmp_path),
        "--mode",
        "sweep",
        "--seeds",
        "0",
        "1",
    ]
    options += ["--arms", "popo", "--rates", "1e-4", "2e-4"]
    built = study.build_study(study.parser().parse_args(options))
    runs = [_fake(built, "base", None, None, 0.25)]
    runs += [_fake(built, "popo", 1e-4, 0, 0.5), _fake(built, "popo", 1e-4, 1, 0.25)]
    runs += [_fake(built, "popo", 2e-4, 0, 0.5)]  # popo 2e-4 seed 1 is missing
    (tmp_path / "study.json").write_text(json.dumps({"mode": "sweep", "runs": runs}))
    ran = []

    def fake_train(study_, arm, seed, base, rate):
        ran.append((arm, rate, seed))
        return _fake(built, arm, rate, seed, 0.5)

    monkeypatch.setattr(study, "train_arm", fake_train)
    assert study.main(options) == 0
    assert "study (sweep): 1 cells to do, 4 already in" in capsys.readouterr().out
    assert ran == [("popo", 2e-4, 1)]
    stored = json.loads((tmp_path / "study.json").read_text())["runs"]
    assert len(stored) == 5  # the finished cell is in the JSON
    assert study.main(options) == 0 and ran == [("popo", 2e-4, 1)]  # nothing left to run
    # the rule: means 0.375 (1e-4) and 0.5 (2e-4) -> 2e-4; rendered from the JSON
    text = (tmp_path / "study.md").read_text()
    assert "| popo | 37.5 (50.0 / 25.0) | *50.0 (50.0 / 50.0) |" in text
    assert "highest mean" in text.split("## The selection rule")[1]


def test_confirm_refuses_without_a_complete_sweep_and_ablations_take_popos_rate(
    tiny_model_dir, digit_problems, tmp_path, capsys
):
    study = load_study()
    sweep = tmp_path / "sweep.json"
    # psr's best rate is 1e-4, grpo's and popo's 2e-4
    score = {"grpo": lambda rate: rate, "popo": lambda rate: 0.1 + rate, "psr": lambda rate: 0.5 - rate}
    cells = [cell(arm, rate, seed, score[arm](rate)) for arm in ("grpo", "popo", "psr")
             for rate in (1e-4, 2e-4) for seed in (0, 1)]  # fmt: skip
    sweep.write_text(json.dumps({"mode": "sweep", "runs": cells[:-1]}))
    options = [*tiny_options(tiny_model_dir, digit_problems, tmp_path), "--sweep_results", str(sweep)]
    assert study.main([*options, "--mode", "confirm"]) == 2
    assert "no chosen rate for psr" in capsys.readouterr().err
    sweep.write_text(json.dumps({"mode": "sweep", "runs": cells}))
    args = study.parser().parse_args([*options, "--mode", "ablations"])
    assert study.cell_rates(args, ["no-ema", "weights-uniform", "all-off", "psr-rate"]) == {
        "no-ema": [2e-4],
        "weights-uniform": [2e-4],
        "all-off": [2e-4],  # PSR's objective at POPO's rate
        "psr-rate": [1e-4],  # POPO's objective at PSR's rate
    }
    args = study.parser().parse_args([*options, "--mode", "confirm"])
    assert study.cell_rates(args, ["grpo", "popo", "psr"]) == {"grpo": [2e-4], "popo": [2e-4], "psr": [1e-4]}


def test_the_confirmation_table_states_paired_differences_with_their_interval():
    def run(arm, seed, greedy, pass64, rate=2e-4):
        return {
            **cell(arm, rate, seed, greedy, about=arm),
            "passk": {"pass@1": greedy, "pass@16": pass64, "pass@64": pass64},
            "config": Config(tau=0.0, steps=32).to_dict(),
        }

    results = {
        "mode": "confirm",
        "runs": [
            {"arm": "base", "seed": None, "greedy": {"pass@1": 0.1},
             "passk": {"pass@1": 0.1, "pass@16": 0.3, "pass@64": 0.5}},
            *(run("popo", s, g, 0.8) for s, g in enumerate((0.5, 0.6, 0.7))),
            *(run("grpo", s, 0.4, 0.8, rate=1e-4) for s in range(3)),
            *(run("psr", s, 0.5, 0.8) for s in range(3)),
            run("no-ema", 0, 0.3, 0.8),
            run("no-ema", 1, 0.3, 0.8),
            *(run("all-off", s, 0.45, 0.8, rate=4e-4) for s in range(2)),  # PSR's objective, POPO's rate
            *(run("psr-rate", s, 0.55 - 0.1 * s, 0.8) for s in range(2)),  # POPO's objective, PSR's rate
        ],
    }  # fmt: skip
    text = confirm_markdown(results)
    assert "| grpo | 1e-4 | 3 | 40.0 ± 0.0 |" in text
    assert "| popo | +50.0 |" in text.split("## Against the base")[1]  # 0.6 - 0.1
    # popo - grpo greedy: differences 0.1, 0.2, 0.3 -> +20.0 [-4.8, +44.8]; pass@64 equal: 0 width
    assert "| popo - grpo | 3 | +20.0 [-4.8, +44.8] | +20.0 [-4.8, +44.8] | +0.0 [+0.0, +0.0] |" in text
    assert "| psr - grpo | 3 | +10.0 [+10.0, +10.0] |" in text  # 0.5 - 0.4 in every seed
    # no-ema - popo over seeds 0, 1: -0.2, -0.3 -> mean -25.0, half 12.706 * 0.0707 / 1.414 = 63.5
    assert "| no-ema (no-ema) | 2 | 30.0 ± 0.0 |" in text
    assert "| no-ema - popo | 2 | -25.0 [-88.5, +38.5] | -25.0 [-88.5, +38.5] |" in text
    # psr - popo, every term off, over 3 seeds: 0, -0.1, -0.2 -> -10.0, half 4.303 * 0.1 / 1.732 = 24.8
    assert "| psr - popo | 3 | -10.0 [-34.8, +14.8] |" in text
    # all-off - popo, seeds 0, 1: -0.05, -0.15 -> -10.0 [-73.5, +53.5]; psr - all-off: the rate, +0.05 twice
    assert "| all-off - popo | 2 | -10.0 [-73.5, +53.5] |" in text
    assert "| psr - all-off | 2 | +5.0 [+5.0, +5.0] |" in text
    assert text.index("| psr - popo |") < text.index("| psr - all-off |")
    # psr-rate - popo, seeds 0, 1: 0.55 - 0.5, 0.45 - 0.6 -> +0.05, -0.15: -5.0 [-132.1, +122.1]
    assert "| psr-rate - popo | 2 | -5.0 [-132.1, +122.1] |" in text
    # psr - psr-rate, seeds 0, 1: 0.5 - 0.55, 0.5 - 0.45 -> -0.05, +0.05: +0.0 [-63.5, +63.5]
    assert "| psr - psr-rate | 2 | +0.0 [-63.5, +63.5] |" in text
    assert "except psr-rate, which changes the rate" in text
    assert "## The EMA adapter" not in text  # no arm's EMA moved (tau 0)


def test_the_tables_name_every_machine_the_cells_ran_on():
    config = Config(tau=0.0, steps=32).to_dict()
    base = {
        "arm": "base",
        "seed": None,
        "config": config,
        "signature": {"heldout_part": "reported"},
        "greedy": {"pass@1": 0.1, "problems": 101},
        "passk": {"pass@1": 0.1},
        "device": "CPU (A)",
    }
    runs = [
        {
            **cell("popo", 2e-4, s, 0.5, about="popo"),
            "passk": {"pass@1": 0.5},
            "config": config,
            "device": device,
        }
        for s, device in enumerate(("CPU (A)", "CPU (B)", "CPU (B)", "CPU (C)"))
    ]
    text = confirm_markdown({"mode": "confirm", "runs": [base, *runs]})
    assert "devices CPU (A) (2 cells); CPU (B) (2 cells); CPU (C) (1 cell)." in text  # the base is a cell too
    one = confirm_markdown({"mode": "confirm", "runs": [base, runs[0]]})
    assert "device CPU (A)." in one and "cells)" not in one


def test_the_sweep_table_renders_before_any_cell_with_the_rule():
    text = sweep_markdown({"mode": "sweep", "runs": []})
    assert "Ties (equal means) go to the smaller rate" in text
    assert "| grpo | MISSING | MISSING | MISSING | MISSING | MISSING | not yet |" in text
    assert "0 of 30 cells measured." in text
    assert math.isclose(0.5 ** (2 / 24), half_life_tau(24))


def test_the_tables_link_their_figures_drawn_beside_them(tmp_path):
    """The sweep's rate figure and confirm's paired differences are PNGs next to the Markdown, linked
    from it; an empty sweep draws nothing and links nothing."""
    empty = write_tables(tmp_path / "empty", {"mode": "sweep", "runs": []})
    assert "## Figures" not in empty and not list(tmp_path.glob("empty-*.png"))
    cells = [cell(arm, rate, seed, 0.2 + rate * 1000 + 0.05 * seed) for arm in ("grpo", "popo", "psr")
             for rate in (1e-4, 2e-4) for seed in (0, 1)]  # fmt: skip
    sweep = write_tables(tmp_path / "sweep", {"mode": "sweep", "runs": cells})
    assert "![validation greedy pass@1 against the learning rate](sweep-rates.png)" in sweep
    passk = {"pass@1": 0.5, "pass@64": 0.9}
    runs = [{**c, "passk": passk, "about": c["arm"]} for c in cells if c["learning_rate"] == 2e-4]
    confirm = write_tables(tmp_path / "confirm", {"mode": "confirm", "runs": runs})
    assert "![the paired differences per seed](confirm-differences.png)" in confirm
    assert "![pass@k against k](confirm-passk.png)" in confirm
    assert "confirm-ablations.png" not in confirm  # no ablation measured: no ablation figure
    ablation = [{**r, "arm": "no-ema"} for r in runs if r["arm"] == "popo"]
    confirm = write_tables(tmp_path / "confirm", {"mode": "confirm", "runs": [*runs, *ablation]})
    assert "(confirm-ablations.png)" in confirm
    for name in ("sweep-rates.png", "confirm-differences.png", "confirm-passk.png", "confirm-ablations.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # three tiny cells and two bases on the tiny model: about 1 min on 2 busy cores
def test_sweep_then_confirm_then_ablations_end_to_end_on_the_tiny_model(
    tiny_model_dir, digit_problems, tmp_path
):
    study = load_study()
    common = tiny_options(tiny_model_dir, digit_problems, tmp_path)
    at = common.index("--heldout")
    common = [*common[:at], *common[at + 2 :], "--steps", "1"]  # every problem of each half
    sweep = [*common, "--mode", "sweep", "--results", str(tmp_path / "sweep"), "--rates", "1e-2"]
    assert study.main([*sweep, "--arms", "popo", "--seeds", "0", "1"]) == 0
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert stored["grid"] == {"rates": [1e-2], "seeds": [0, 1]}
    (base,) = [r for r in stored["runs"] if r["arm"] == "base"]
    assert "passk" not in base and base["signature"]["heldout_part"] == "validation"
    popo = [r for r in stored["runs"] if r["arm"] == "popo"]
    assert [(r["learning_rate"], r["seed"]) for r in popo] == [(1e-2, 0), (1e-2, 1)]
    assert all(r["config"]["tau"] == 0.25 and "greedy" in r["ema"] for r in popo)  # 0.5 ** (2 / 1)
    confirm = [
        *common,
        "--results",
        str(tmp_path / "confirm"),
        "--sweep_results",
        str(tmp_path / "sweep.json"),
    ]
    confirm += ["--samples", "4"]
    assert study.main([*confirm, "--mode", "confirm", "--arms", "popo", "--seeds", "0", "1"]) == 0
    assert study.main([*confirm, "--mode", "ablations", "--arms", "popo", "no-ema", "--seeds", "0", "1"]) == 0
    runs = json.loads((tmp_path / "confirm.json").read_text())["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs if r["arm"] != "base") == [
        ("no-ema", 0),
        ("no-ema", 1),
        ("popo", 0),
        ("popo", 1),
    ]  # fmt: skip  (the ablations reused confirm's POPO cells)
    assert all(r["learning_rate"] == 1e-2 and r["passk"]["samples"] == 4 for r in runs if r["arm"] != "base")
    text = (tmp_path / "confirm.md").read_text()
    assert "| popo | 1e-2 | 2 |" in text and "## Ablations at POPO's rate" in text
    from bench.study_tables import main as render

    assert render(["--sweep", str(tmp_path / "sweep"), "--confirm", str(tmp_path / "confirm")]) == 0
    assert (tmp_path / "confirm.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
