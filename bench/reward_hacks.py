"""How many bundled problems pay for echoing the question, and how many golds still verify.

    python bench/reward_hacks.py                              # every bundled set, the package's reward
    python bench/reward_hacks.py --rewards /tmp/rewards.py    # another rewards.py (e.g. before a change)
    python bench/reward_hacks.py --datasets math500 arithmetic --show 5 --jobs 2

For the first --probe_limit problems (default 300; all of the smaller sets) of each bundled dataset
(popo_lite.data.problems.BUNDLED), every math expression of the question (`$...$`, `$$...$$`, `\\(...\\)`,
`\\[...\\]`) is boxed and scored against the gold with `rewards.score`, the training reward. A problem is
"exposed" when any of them scores 1: a policy could earn the reward by copying part of its prompt. The
arithmetic task ("What is a + b?") writes no `$`, so its operand expression is tried as written and with
LaTeX spacing and sizing commands around the operator (`a\\quad+b`, `a\\qquad+b`, `a\\,+\\,b`,
`\\left(a+b\\right)`, ...).

Columns: "exposed" calls `score(completion, gold)`, as the trainer does; "w/ question" calls
`score(completion, gold, question=problem)` (n/a for a rewards.py without that argument). "golds = 1"
counts the problems, all of each set, whose own gold, boxed, scores 1 (it should be all), "golds w/ q"
with the question passed. The table goes to stdout and bench/results/reward_hacks.md; --json (default
bench/results/reward_hacks.json) writes the counts and the exposed and failing items.

Three probes of the reward's newest rules, with the question passed, on the same problems ("probed"):
- "misread": the gold is one math-verify reads as a number its text does not state (`\\frac{1}{3} E_{1}+
  \\frac{2}{3} E_{2}` as 2/3; popo_lite.data.golds), and boxing that number scores 1. Over every problem.
- "hedged": one of eight hedges of the gold with a wrong answer scores 1 (`\\boxed{g \\text{ (or w)}}`,
  `\\boxed{w} or even \\boxed{g}`, `\\boxed{w \\boxed{g}}`, `\\boxed{g} \\framebox{w}`, `\\boxed{w}` then 30
  times `\\boxed{g}`, ...).
- "rewritten echo": a question expression rewritten without changing its value (`\\frac{3}{20}` as `3/20`,
  `{3 \\over 20}`, `\\frac{03}{20}`; `\\sqrt{242}` as `\\sqrt[2]{242}`, `\\sqrt{0242}`; `1.45` as `1.450`,
  `01.45`) scores 1 while the expression as written does not.
`--root OTHER` tests another checkout's package (with this checkout's popo_lite/data/golds.py copied into
it for the misread probe): the before column.
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
if "--root" in sys.argv:  # another checkout's package (for a before column); results still go to ROOT
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--root") + 1]).resolve()))
sys.path.insert(1, str(ROOT))

from popo_lite.data.problems import BUNDLED, load_problems  # noqa: E402

_MATH_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_ARITHMETIC_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
_SPACINGS = ["\\quad", "\\qquad", "\\,", "\\;", "\\:", "\\!", "~", "\\ ", " "]

_rewards = None  # the rewards module under test, loaded once per process
RESULTS = ROOT / "bench" / "results"


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


_FRACTION_RE = re.compile(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_SQRT_RE = re.compile(r"\\sqrt\{(\d+)\}")
_DECIMAL_RE = re.compile(r"(?<![\d.])(\d+\.\d+)(?![\d.])")
_INTEGER_RE = re.compile(r"(?<![\d.\\a-zA-Z^_])(\d+)(?![\d.])")  # not `x^5`: TeX reads `x^05` as x^0 5


def rewrites(expression: str) -> list[str]:
    """The expression rewritten without changing its value, one rule at a time (every occurrence)."""
    rules = [
        (_FRACTION_RE, r"\1/\2"),
        (_FRACTION_RE, r"\1 / \2"),
        (_FRACTION_RE, r"\\frac{0\1}{\2}"),
        (_FRACTION_RE, r"{\1 \\over \2}"),
        (_SQRT_RE, r"\\sqrt[2]{\1}"),
        (_SQRT_RE, r"\\sqrt{0\1}"),
        (_DECIMAL_RE, r"\g<1>0"),
        (_DECIMAL_RE, r"0\1"),
        (_INTEGER_RE, r"0\1"),
    ]
    found = [pattern.sub(replacement, expression) for pattern, replacement in rules]
    return list(dict.fromkeys(text for text in found if text != expression))


def _wrong(gold: str) -> str:
    """A wrong answer to hedge with: the gold plus one when it is an integer, else 0 (or 1 for a 0 gold)."""
    text = gold.strip()
    if re.fullmatch(r"-?\d+", text):
        return str(int(text) + 1)
    return "1" if text == "0" else "0"


HEDGE_NAMES = (
    "text (or w)",
    "hbox or",
    "bar",
    "or even",
    "nested",
    "list then nested",
    "framebox",
    "30 after",
)


def hedges(gold: str) -> list[str]:
    """Completions that offer the gold and a wrong answer together."""
    g, w = gold, _wrong(gold)
    return [
        f"\\boxed{{{g} \\text{{ (or {w})}}}}",
        f"\\boxed{{{g} \\hbox{{ or }} {w}}}",
        f"\\boxed{{{g} | {w}}}",
        f"\\boxed{{{w}}} or even \\boxed{{{g}}}",
        f"\\boxed{{{w} \\boxed{{{g}}}}}",
        f"\\boxed{{{w}, \\boxed{{{g}}}}}",
        f"\\boxed{{{g}}} \\framebox{{{w}}}",
        f"\\boxed{{{w}}}" + f" \\boxed{{{g}}}" * 30,
    ]


def misread_number(gold: str) -> str | None:
    """The number math-verify reads the boxed gold as, when the gold's text states no number; else None."""
    from math_verify import parse

    from popo_lite.data.golds import states_a_number  # the check itself, as of this script's checkout

    if states_a_number(gold):
        return None
    parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=5)
    return str(parsed[0]) if parsed and getattr(parsed[0], "is_Number", False) else None


def _takes_question() -> bool:
    return "question" in inspect.signature(_rewards.score).parameters


def _check(item: tuple[str, str, str]) -> dict:
    """For one problem: whether its gold scores 1, and the expressions that score 1, without and (where
    the reward takes it) with the question."""
    problem_id, problem, gold, probe = item
    modes = {"": {}, "q": {"question": problem}} if _takes_question() else {"": {}}
    result: dict = {"id": problem_id}
    number = misread_number(gold)
    paid = number and _rewards.score(f"\\boxed{{{number}}}", gold, **modes.get("q", {}))[0] == 1.0
    result["misread"] = number if paid else None
    for mode, extra in modes.items():
        result["gold" + mode] = _rewards.score(f"\\boxed{{{gold}}}", gold, **extra)[0] == 1.0
        result["exposed" + mode] = [
            expression
            for expression in (question_expressions(problem) if probe else [])
            if _rewards.score(f"\\boxed{{{expression}}}", gold, **extra)[0] == 1.0
        ]
    if probe:
        extra = modes.get("q", {})
        exposed = result["exposedq" if "q" in modes else "exposed"]
        paid = [_rewards.score(text, gold, **extra)[0] == 1.0 for text in hedges(gold)]
        result["hedged"] = [name for name, ok in zip(HEDGE_NAMES, paid, strict=True) if ok]
        result["rewritten"] = [
            rewrite
            for expression in question_expressions(problem)
            if expression not in exposed
            for rewrite in rewrites(expression)
            if _rewards.score(f"\\boxed{{{rewrite}}}", gold, **extra)[0] == 1.0
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
    parser.add_argument("--probe_limit", type=int, default=300, help="problems per set for the probes")
    parser.add_argument("--root", help="checkout whose popo_lite package to test (default: this one)")
    parser.add_argument("--json", type=Path, default=RESULTS / "reward_hacks.json", help="counts and items")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "reward_hacks.md", help="the table")
    args = parser.parse_args()

    report: dict = {"rewards": args.rewards or "popo_lite.core.rewards", "datasets": {}}
    context = multiprocessing.get_context("fork")
    with context.Pool(args.jobs, initializer=_init, initargs=(args.rewards,)) as pool:
        for name in args.datasets:
            start = time.monotonic()
            problems = load_problems(name)[: args.limit]
            items = [(p.id, p.problem, p.answer, i < args.probe_limit) for i, p in enumerate(problems)]
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
            probed = [r for r in results if "hedged" in r]
            entry["probed"] = len(probed)
            entry["misread_paying"] = [
                {"id": r["id"], "gold": golds[r["id"]], "pays": r["misread"]} for r in results if r["misread"]
            ]
            hedged = [r for r in probed if r["hedged"]]
            entry["hedged"] = len(hedged)
            entry["hedged_by_kind"] = {kind: sum(kind in r["hedged"] for r in hedged) for kind in HEDGE_NAMES}
            entry["hedged_items"] = [  # the first 20: before the hedge rule every problem was one
                {"id": r["id"], "gold": golds[r["id"]], "hedges": r["hedged"]} for r in hedged[:20]
            ]
            entry["rewritten"] = [
                {"id": r["id"], "gold": golds[r["id"]], "rewrites": r["rewritten"]}
                for r in probed
                if r["rewritten"]
            ]
            report["datasets"][name] = entry
            print(f"{name}: done in {time.monotonic() - start:.0f} s", file=sys.stderr)

    table = render(report)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False))


def render(report: dict) -> str:
    """The counts as a Markdown table, one row per dataset."""
    columns = (
        "dataset".ljust(16),
        "problems",
        "exposed",
        "exposed %",
        "w/ question",
        "golds = 1",
        "golds w/ q",
        "misread pays",
        "probed",
        "hedged",
        "rewritten echo",
    )
    lines = [f"reward: {report['rewards']}", "", "| " + " | ".join(columns) + " |"]
    lines.append(
        "|"
        + "|".join("-" * (len(c) + 1) + ":" if i else "-" * (len(c) + 2) for i, c in enumerate(columns))
        + "|"
    )
    for name, entry in report["datasets"].items():
        count = entry["problems"]
        share = f"{100 * entry['exposed'] / entry['probed']:.1f}%" if entry["probed"] else "-"
        cells = [name, count, entry["exposed"], share, entry.get("exposedq", "n/a"), entry["golds_scoring_1"]]
        cells += [entry.get("golds_scoring_1q", "n/a"), len(entry["misread_paying"]), entry["probed"]]
        cells += [entry["hedged"], len(entry["rewritten"])]
        lines.append(
            "| "
            + " | ".join(
                str(cell).rjust(len(c)) if i else str(cell).ljust(len(c))
                for i, (cell, c) in enumerate(zip(cells, columns, strict=True))
            )
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
