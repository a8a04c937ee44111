"""How many bundled problems pay for echoing the question, and how many golds still verify.

    python bench/reward_hacks.py                              # every bundled set, the package's reward
    python bench/reward_hacks.py --rewards /tmp/rewards.py    # another rewards.py (e.g. before a change)
    python bench/reward_hacks.py --datasets math500 arithmetic --show 5 --jobs 2

For each problem of each bundled dataset (popo_lite.data.problems.BUNDLED), every math expression of the
question (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`) is boxed and scored against the gold with
`rewards.score`, the training reward. A problem is "exposed" when any of them scores 1: a policy could
earn the reward by copying part of its prompt. The arithmetic task ("What is a + b?") writes no `$`, so its
operand expression is tried as written and with LaTeX spacing and sizing commands around the operator
(`a\\quad+b`, `a\\qquad+b`, `a\\,+\\,b`, `\\left(a+b\\right)`, ...).

Columns: "exposed" calls `score(completion, gold)`, as the trainer does; "w/ question" calls
`score(completion, gold, question=problem)` (n/a for a rewards.py without that argument). "golds = 1"
counts the problems whose own gold, boxed, scores 1 (it should be all), "golds w/ q" with the question
passed. The table goes to stdout; --json writes the counts and the exposed and failing items.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_lite.data.problems import BUNDLED, load_problems  # noqa: E402

_MATH_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_ARITHMETIC_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
_SPACINGS = ["\\quad", "\\qquad", "\\,", "\\;", "\\:", "\\!", "~", "\\ ", " "]

_rewards = None  # the rewards module under test, loaded once per process


def _load_rewards(path: str | None):
    if path is None:
        from popo_lite.core import rewards

        return rewards
    spec = importlib.util.spec_from_file_location("_rewards_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init(path: str | None) -> None:
    global _rewards
    _rewards = _load_rewards(path)


def question_expressions(problem: str) -> list[str]:
    """The distinct math expressions a policy could copy out of the question, in order."""
    expressions: list[str] = []
    arithmetic = _ARITHMETIC_RE.fullmatch(problem.strip())
    if arithmetic:
        a, b = arithmetic.groups()
        expressions += [f"{a}+{b}", f"{a} + {b}"]
        expressions += [f"{a}{space}+{b}" for space in _SPACINGS]
        expressions += [f"{a}{space}+{space}{b}" for space in _SPACINGS]
        expressions += [f"\\left({a}+{b}\\right)", f"\\displaystyle {a}+{b}", f"{{{a}}}+{{{b}}}"]
    for match in _MATH_RE.finditer(problem):
        text = next(group for group in match.groups() if group is not None).strip()
        if text:
            expressions.append(text)
    return list(dict.fromkeys(expressions))


def _takes_question() -> bool:
    return "question" in inspect.signature(_rewards.score).parameters


def _check(item: tuple[str, str, str]) -> dict:
    """For one problem: whether its gold scores 1, and the expressions that score 1, without and (where
    the reward takes it) with the question."""
    problem_id, problem, gold = item
    modes = {"": {}, "q": {"question": problem}} if _takes_question() else {"": {}}
    result: dict = {"id": problem_id}
    for mode, extra in modes.items():
        result["gold" + mode] = _rewards.score(f"\\boxed{{{gold}}}", gold, **extra)[0] == 1.0
        result["exposed" + mode] = [
            expression
            for expression in question_expressions(problem)
            if _rewards.score(f"\\boxed{{{expression}}}", gold, **extra)[0] == 1.0
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rewards", help="path of a rewards.py to test instead of popo_lite.core.rewards")
    parser.add_argument("--datasets", nargs="*", default=list(BUNDLED), help="bundled names (default: all)")
    parser.add_argument("--limit", type=int, help="first N problems of each dataset")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--show", type=int, default=0, help="print up to N exposed items per dataset")
    parser.add_argument("--json", type=Path, help="write counts and items here")
    args = parser.parse_args()

    report: dict = {"rewards": args.rewards or "popo_lite.core.rewards", "datasets": {}}
    context = multiprocessing.get_context("fork")
    with context.Pool(args.jobs, initializer=_init, initargs=(args.rewards,)) as pool:
        for name in args.datasets:
            start = time.monotonic()
            problems = load_problems(name)[: args.limit]
            items = [(p.id, p.problem, p.answer) for p in problems]
            results = pool.map(_check, items, chunksize=16)
            golds = {p.id: p.answer for p in problems}
            entry = {"problems": len(problems)}
            for mode in ("", "q"):
                if "gold" + mode not in (results[0] if results else {}):
                    continue
                exposed = [(r["id"], r["exposed" + mode]) for r in results if r["exposed" + mode]]
                failures = [r["id"] for r in results if not r["gold" + mode]]
                entry["exposed" + mode] = len(exposed)
                entry["golds_scoring_1" + mode] = len(problems) - len(failures)
                entry["exposed_items" + mode] = [
                    {"id": i, "gold": golds[i], "expressions": f} for i, f in exposed
                ]
                entry["gold_failures" + mode] = [{"id": i, "gold": golds[i]} for i in failures]
                for i, found in exposed[: args.show]:
                    print(f"  exposed{mode} {name} {i}: gold {golds[i]!r} <- {found[:3]!r}", file=sys.stderr)
            report["datasets"][name] = entry
            print(f"{name}: done in {time.monotonic() - start:.0f} s", file=sys.stderr)

    print(f"reward: {report['rewards']}")
    columns = (
        "dataset".ljust(16),
        "problems",
        "exposed",
        "exposed %",
        "w/ question",
        "golds = 1",
        "golds w/ q",
    )
    print("| " + " | ".join(columns) + " |")
    print(
        "|"
        + "|".join("-" * (len(c) + 1) + ":" if i else "-" * (len(c) + 2) for i, c in enumerate(columns))
        + "|"
    )
    for name, entry in report["datasets"].items():
        count = entry["problems"]
        share = f"{100 * entry['exposed'] / count:.1f}%" if count else "-"
        cells = [name, count, entry["exposed"], share, entry.get("exposedq", "n/a"), entry["golds_scoring_1"]]
        cells.append(entry.get("golds_scoring_1q", "n/a"))
        print(
            "| "
            + " | ".join(
                str(cell).rjust(len(c)) if i else str(cell).ljust(len(c))
                for i, (cell, c) in enumerate(zip(cells, columns, strict=True))
            )
            + " |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
