"""Bundled benchmarks load with their documented counts and normalised gold answers; local files and
prompt templates behave; every error names the problem."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from popo_lite.core.rewards import math_reward
from popo_lite.data.problems import (
    BUNDLED,
    DATA_DIR,
    EVAL_BENCHMARKS,
    SYSTEM_PROMPT,
    Problem,
    arithmetic_rows,
    format_prompt,
    load_problems,
)

# Records per SOURCES.md; math_train and deepscaler_math drop rows whose gold is empty (2 and 4), Minerva
# and OlympiadBench the problems whose gold math-verify misreads (popo_lite/data/golds.py).
COUNTS = {
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "math500": 500,
    "minerva_math": 272 - 2,  # 2 golds math-verify misreads as a number (261, 268): left out
    "olympiadbench": 675 - 1,  # 1 likewise (1965)
    "gsm8k_test": 1319,
    "gsm8k": 7473,
    "math_train": 7500 - 2,
    "deepscaler_math": 7474 - 4,
    "arithmetic": 5000,
    "digit_sums": 5000,
    "two_digit_sums": 5000,
}


def test_bundled_files_match_the_sha256_listed_in_sources_md():
    text = (DATA_DIR / "SOURCES.md").read_text()
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.MULTILINE)
    assert len(listed) == 10
    for digest, relative in listed:
        assert hashlib.sha256((DATA_DIR / relative).read_bytes()).hexdigest() == digest, relative


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_each_bundled_set_loads_with_its_documented_count(name):
    problems = load_problems(name)
    assert len(problems) == COUNTS[name]
    assert all(isinstance(p, Problem) and p.problem and p.answer and p.source == name for p in problems)
    assert len({p.id for p in problems}) == len(problems) or name in (
        "arithmetic",
        "digit_sums",
        "two_digit_sums",
    )


def test_bundled_names_cover_every_eval_benchmark():
    assert set(EVAL_BENCHMARKS) <= set(BUNDLED)
    assert set(BUNDLED) == set(COUNTS)


def test_aime25_answers_are_the_official_keys_as_strings():
    answers = [p.answer for p in load_problems("aime25")]
    assert answers[:3] == ["70", "588", "16"] and answers[15:17] == ["468", "49"]


def test_aime24_zero_padded_answers_are_stripped_and_solution_is_not_in_the_prompt():
    raw = [json.loads(line) for line in (DATA_DIR / "aime24/test.jsonl").open()]
    problems = load_problems("aime24")
    padded = [(row, p) for row, p in zip(raw, problems, strict=True) if row["answer"].startswith("0")]
    assert padded, "AIME 2024 has zero-padded answers such as '025'"
    for row, problem in padded:
        assert problem.answer == row["answer"].lstrip("0")
    assert all(row["solution"][:80] not in p.problem for row, p in zip(raw, problems, strict=True))


def test_amc23_float_answers_become_integer_strings():
    answers = [p.answer for p in load_problems("amc23")]
    assert answers[0] == "27" and "-1" in answers and "3159" in answers
    assert not any(answer.endswith(".0") for answer in answers)


def test_gsm8k_answer_is_the_number_after_the_hashes():
    train, test = load_problems("gsm8k"), load_problems("gsm8k_test")
    assert train[0].answer == "72" and test[0].answer == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in train + test)  # commas stripped too
    assert "####" not in train[0].problem


def test_gsm8k_with_split_test_is_the_test_file():
    assert load_problems("gsm8k", split="test") == load_problems("gsm8k_test")


def test_math_train_takes_the_last_boxed_including_the_braceless_form():
    by_id = {p.id: p for p in load_problems("math_train")}
    braceless = [
        json.loads(line) for line in (DATA_DIR / "math_train/train.jsonl").open() if "\\boxed " in line
    ]
    assert len(braceless) == 3  # two end with `\boxed 2` / `\boxed 9`, one has it before a later \boxed{17}
    assert sorted(by_id[row["unique_id"]].answer for row in braceless) == ["17", "2", "9"]
    assert by_id["train/algebra/0.json"].answer == "0" and by_id["train/algebra/0.json"].level == 5


def test_math_levels_filter_and_level_parsing():
    problems = load_problems("math_train", levels=(3, 4, 5))
    # per-level counts in SOURCES.md, less the 2 rows whose solution boxes nothing (both level 3-5)
    assert len(problems) == 1592 + 1690 + 2304 - 2
    assert {p.level for p in problems} == {3, 4, 5}
    assert {p.level for p in load_problems("math500")} == {1, 2, 3, 4, 5}


def test_minerva_answer_is_the_boxed_content_of_the_solution():
    problems = load_problems("minerva_math")
    assert problems[0].answer == "1.6"
    assert not any("\\boxed" in p.answer for p in problems)


def test_olympiadbench_strips_dollars_and_joins_multiple_answers():
    answers = [p.answer for p in load_problems("olympiadbench")]
    assert "\\frac{1}{2 n+2}" in answers and "2^{1009}" in answers
    assert "69, 84" in answers  # raw ["$69$,$84$"]
    assert not any(answer.startswith("$") or answer.endswith("$") for answer in answers)


@pytest.mark.parametrize("name", ["aime24", "aime25", "amc23", "gsm8k_test", "math500"])
def test_every_gold_verifies_against_itself_boxed(name):
    problems = load_problems(name)
    rewards = math_reward([f"\\boxed{{{p.answer}}}" for p in problems], [p.answer for p in problems])
    assert rewards == [1.0] * len(problems), [
        p.answer for p, r in zip(problems, rewards, strict=True) if not r
    ]


@pytest.mark.parametrize("name", ["olympiadbench", "minerva_math"])
def test_free_form_golds_verify_against_themselves_boxed(name):
    """Measured 675/675 and 272/272 with math-verify 0.9.0; the floor leaves room for version drift."""
    problems = load_problems(name)
    rewards = math_reward([f"\\boxed{{{p.answer}}}" for p in problems], [p.answer for p in problems])
    fraction = sum(rewards) / len(rewards)
    print(f"{name}: {fraction:.4f} of golds verify against themselves")
    assert fraction >= 0.99


def test_arithmetic_is_deterministic_and_test_pairs_are_held_out():
    train, test = load_problems("arithmetic"), load_problems("arithmetic", split="test")
    assert train == load_problems("arithmetic") and arithmetic_rows("test") == arithmetic_rows("test")
    assert len(train) == 5000 and len(test) == 200 and len({p.problem for p in test}) == 200
    assert not {p.problem for p in train} & {p.problem for p in test}
    for problem in train[:50] + test[:50]:
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", problem.problem).groups())
        assert 10 <= a <= 99 and 1 <= b <= 9 and problem.answer == str(a + b)


def test_limit_keeps_the_first_problems():
    assert load_problems("math500", limit=3) == load_problems("math500")[:3]


def test_local_jsonl_with_custom_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "What is 2+2?", "gold": 4, "level": "Level 2"}, {"q": "Half of 1?", "gold": 0.5}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    problems = load_problems(str(path), problem_field="q", answer_field="gold")
    assert [(p.problem, p.answer, p.level) for p in problems] == [
        ("What is 2+2?", "4", 2),
        ("Half of 1?", "0.5", None),
    ]
    assert problems[0].source == str(path)


def test_local_parquet_and_json_with_default_fields(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.table({"question": ["Q1", "Q2"], "solution": ["so $\\boxed{7}$", "#### 1,234"]})
    pq.write_table(table, tmp_path / "mine.parquet")
    assert [p.answer for p in load_problems(str(tmp_path / "mine.parquet"))] == ["7", "1234"]
    (tmp_path / "mine.json").write_text(json.dumps([{"prompt": "P", "final_answer": ["$(1,2)$"]}]))
    assert load_problems(str(tmp_path / "mine.json"))[0].answer == "(1,2)"


def test_hub_ids_go_to_datasets_load_dataset_with_the_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [{"question": "Q", "answer": "so #### 1,234"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("owner/some-math", split="test")
    assert calls == [("owner/some-math", "test")] and problems[0].answer == "1234"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_problems(str(tmp_path / "nope.jsonl"))


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_problems(str(path))


def test_missing_field_error_names_the_field_the_file_and_the_keys(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "Q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="'gold'") as error:
        load_problems(str(path), answer_field="gold")
    assert str(path) in str(error.value) and "['answer', 'question']" in str(error.value)
    path.write_text(json.dumps({"text": "Q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="problem_field"):
        load_problems(str(path))


def test_unknown_name_lists_the_bundled_sets():
    with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k'.*gsm8k_test"):
        load_problems("gsm9k")


def test_levels_on_a_set_without_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="level"):
        load_problems("gsm8k_test", levels=(1,))


def test_rows_without_gold_are_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"problem": "A", "answer": None}) + "\n" + json.dumps({"problem": "B", "answer": "2"})
    )
    assert [p.problem for p in load_problems(str(path))] == ["B"]


# ---- prompt templates ----------------------------------------------------------------------------


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def test_qwen_math_template_is_the_papers_chatml():
    prompt = format_prompt("What is 1+1?", "qwen_math")
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."


def test_plain_template():
    assert format_prompt("Q?", "plain") == "Question: Q?\nPut the final answer in \\boxed{}.\nAnswer:"


def test_chat_template_uses_the_tokenizers_own_template():
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = format_prompt("Q?", "chat", _tokenizer(template))
    assert prompt == "<user>Q? Put the final answer in \\boxed{}.</user><assistant>"


def test_chat_template_without_one_suggests_the_others():
    with pytest.raises(ValueError, match=r"no chat_template.*'plain'.*'qwen_math'"):
        format_prompt("Q?", "chat", _tokenizer(None))
    with pytest.raises(ValueError, match="no tokenizer"):
        format_prompt("Q?", "chat")


def test_unknown_template_names_it_and_lists_choices():
    with pytest.raises(ValueError, match=r"'fancy'.*qwen_math, chat, plain"):
        format_prompt("Q?", "fancy")


def test_bundled_data_ships_inside_the_package():
    assert DATA_DIR == Path(__file__).resolve().parents[1] / "popo_lite" / "data" / "bundled"
    assert (DATA_DIR / "SOURCES.md").is_file()


# ---- golds math-verify misreads: each of these wrong answers scored 1 before ----------------

MISREAD = [
    ("minerva_math", "minerva_math/261", "2"),
    ("minerva_math", "minerva_math/268", "\\frac{2}{3}"),
    ("olympiadbench", "olympiadbench/1965", "0"),
    ("olympiadbench", "olympiadbench/1970", "0"),
    ("math_train", "train/precalculus/1049.json", "-1"),
    ("math_train", "train/precalculus/1308.json", "-1"),
    ("math_train", "train/precalculus/1083.json", "2"),
]


@pytest.mark.parametrize(("name", "problem_id", "wrong"), MISREAD)
def test_no_loaded_gold_pays_the_number_math_verify_misreads_it_as(name, problem_id, wrong):
    by_id = {p.id: p for p in load_problems(name)}
    if problem_id in by_id:  # kept with a rewrite math-verify reads right: the gold itself still pays
        problem = by_id[problem_id]
        assert math_reward([f"\\boxed{{{wrong}}}"], [problem.answer], questions=[problem.problem]) == [0.0]
        assert math_reward([f"\\boxed{{{problem.answer}}}"], [problem.answer]) == [1.0]


def test_misread_golds_are_rewritten_or_left_out_with_a_count(caplog):
    with caplog.at_level("WARNING"):
        by_id = {p.id: p for p in load_problems("minerva_math")}
    assert "minerva_math/261" not in by_id and "minerva_math/268" not in by_id
    assert "minerva_math: 2 problems left out of training and evaluation" in caplog.text
    math_train = {p.id: p.answer for p in load_problems("math_train")}
    assert math_train["train/precalculus/1083.json"] == "2007+\\frac{\\pi}{2}"
    assert math_train["train/precalculus/1049.json"] == "\\begin{pmatrix} 1 & -1 \\\\ 1 & 1 \\end{pmatrix}"
    assert {p.id: p.answer for p in load_problems("olympiadbench")}["olympiadbench/1970"] == (
        "(-\\infty, 0) \\cup\\{1\\}"
    )


def test_a_users_misread_gold_is_left_out_and_the_limit_still_counts_gradable_problems(tmp_path, caplog):
    path = tmp_path / "mine.jsonl"
    rows = [{"problem": "E?", "answer": "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}"}] + [
        {"problem": f"{n}?", "answer": str(n)} for n in range(3)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with caplog.at_level("WARNING"):
        problems = load_problems(str(path), limit=3)
    assert [p.answer for p in problems] == ["0", "1", "2"]
    assert "1 problems left out" in caplog.text and "read as 2/3" in caplog.text


def test_a_gold_that_states_a_number_is_not_checked_as_misread():
    from popo_lite.data.golds import gold_reading, states_a_number

    for gold in (
        "5\\text{ cm}",
        "864 \\mbox{ inches}^2",
        "52_8",
        "3:5",
        "\\frac{270}7\\text{ degrees}",
        "6m",
    ):
        assert states_a_number(gold) and gold_reading(gold) == gold
    assert not states_a_number("2007 + \\frac\\pi 2") and not states_a_number("\\frac13E_1")
