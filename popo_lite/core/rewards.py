"""Binary math reward: 1.0 when the model's FINAL answer equals the gold answer, per math-verify.

Why this module is more than `verify(parse(gold), parse(completion))`:

1. Reward hacking (measured, docs/measurements.md section 3.3). math-verify's default extraction scans the
   whole text, so a completion that merely restates the question ("... the equation 17 + 25.") verifies
   against 42, and `\\boxed{17+25}` verifies too. We therefore extract the model's final answer ourselves
   (`extract_final_answer`) and, when the gold is a plain number, reject answers that are unevaluated
   arithmetic of numbers.
2. Extraction decides whether a small model sees any signal at all (same measurement): the last
   `\\boxed{}` (or `\\fbox`, `\\framebox`) that states something, without a trailing period (`42.`), else a
   clearly marked final answer, else the last number.
3. math-verify bounds its time with `signal.alarm`, which raises off the main thread (a web UI worker).
   Off the main thread we verify in a helper process instead, see `math_reward` for the bound.
4. Echoing the question (bench/reward_hacks.py): boxing the question's own `$...$` expression scored 1 on
   4% of MATH problems (`\\boxed{\\dbinom{31}{28}}`, `\\boxed{(-k + 4) + (-2 + 3k)}`), and spacing commands
   hid the operator of `\\boxed{17\\quad+25}` from the plain-number guard.

The rule. An answer is judged up to LaTeX formatting (`canonical`: spacing and sizing commands, `\\left`,
`\\displaystyle`, `\\dfrac`/`\\dbinom`, `{a \\over b}` as `\\frac{a}{b}`, `\\sqrt[2]` as `\\sqrt`, grouping
braces, whitespace do not count) and scores 0, before math-verify is asked, when it
  (a) applies an operation more often than the gold does (`operations`: a function such as sqrt, binom,
      log, sin, floor; a binary + or -; a product, quotient, power, factorial, absolute value; a
      parenthesised sum): an unevaluated form. So `17+25`, `84/2`, `\\frac{84}{2}` and `\\sqrt{1764}` for 42,
      `\\log_264` for 6, `(-k+4)+(-2+3k)` for 2k+2, and the expanded form for a factored gold, all score 0.
      Numbers are not operations: integers, decimals, fractions of integers in lowest terms (`\\frac{1}{2}`
      for 0.5 still scores 1), scientific notation; units, `$`, `%` and degrees are ignored; lists are
      compared element by element (`1+\\sqrt2, 1-\\sqrt2` for `1\\pm\\sqrt2`);
  (b) is an equation whose sides are two different numbers (`43=42`); otherwise, when the gold is no
      relation, the value after the last `=` is the answer (`x = 5`, `17+25=42` state 5 and 42);
  (c) is an inequality for a number gold (`0 < p < 15.` for 15);
  (d) is one of several different final answers. Every box of the completion is read (`\\boxed`,
      `\\fbox`, `\\framebox`, boxes nested in boxes by the text around them), and they must all state one
      answer: `\\boxed{43} or even \\boxed{42}`, `\\boxed{42} \\framebox{43}`, `\\boxed{43 \\boxed{42}}`,
      `\\boxed{41, 43, \\boxed{42}}` and a 43 box before thirty 42 boxes all score 0; boxes repeating one
      answer pay, as written (`\\boxed{x = 42} ... \\boxed{42.0}`, `\\boxed{\\boxed{42}}`) or equal per
      math-verify (`\\boxed{x^2+1} ... \\boxed{1+x^2}`; at most 3 such boxes are asked about). A box empty
      up to formatting (`\\boxed{}`, `\\boxed{\\,}`) states nothing, so `\\boxed{42}\\boxed{\\,}` pays 42.
      One box may not offer alternatives the gold does not write either: `or` (bare, in `\\text{(or 43)}`,
      `\\hbox{ or }`), `\\lor`, `\\vee`, `\\mid`, a lone `|`. Where the line is for a worked
      self-correction: a box is a final answer. Reasoning may state a value, doubt it and fix it in words
      ("so x = 41. Wait, a carry: ... \\boxed{42}" pays); once a wrong value has been boxed, the completion
      has offered two answers, and "\\boxed{41} no wait, \\boxed{42}" scores 0 whatever the words between.
      More than 200 boxes score 0. What it costs: a multi-part answer boxed part by part (`(a) \\boxed{3}
      (b) \\boxed{5}`) scores 0;
  (e) is contradicted by a clearly marked final answer after the last box (`\\boxed{42} Wait... the answer
      is 43.`); numbers are compared by value, other answers as written;
  (f) with `question` passed to `score`: is one of the question's expressions (other than the gold as
      written), or writes one of its function applications that the gold does not (`\\sqrt{242}` for
      "Simplify $\\sqrt{242}$"; `\\frac{3}{20}` for "Express $\\frac{3}{20}$ as a decimal"), which (a) cannot
      tell from an answer. Both sides are compared with their numbers as a reader writes them
      (`answer_forms.same_number_forms`), so the rewrites `3/20`, `3 / 20`, `\\frac{03}{20}`, `{3 \\over 20}`,
      `\\sqrt[2]{242}`, `\\sqrt{0242}`, `1.450` and `01.45` are echoes too.
Golds math-verify misreads (`\\frac13E_1+\\frac23E_2` read as 2/3) are caught when a dataset loads
(popo_lite/data/golds.py): the reward itself trusts the gold it is given.
Numbers a human reads as numbers are rewritten before verification (`plain_text`): e-notation (`4.2e1`),
thin-space thousands (`1\\,234`), fullwidth and other scripts' digits (`４２`, `٤٢`). What the rule costs: an
equivalent answer written with more operations than the gold (`2(k+1)` for 2k+2, `x^2-1` for `(x-1)(x+1)`,
`\\frac{6}{8}` for 3/4) scores 0; a question that asks to simplify, expand or factor wants the gold's form.

Rewards are plain functions over lists of strings returning per-sample scores; no exception escapes.
"""

from __future__ import annotations

import functools
import logging
import re

from popo_lite.core import answer_forms, verification

logger = logging.getLogger(__name__)

# Answers longer than this are not verified (score 0): no real final answer is that long, and sympy's cost
# grows with the input, so this is the first bound on verification time.
MAX_ANSWER_CHARS = 300
_MAX_CANDIDATES = 20  # trailing "answer is" occurrences tried before falling back
_MAX_BOX_SCAN = 1000  # characters scanned for a closing brace: keeps extraction linear on junk

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![a-zA-Z])")
_MAX_BOXES = 200  # more boxes than this offer no one final answer: scored 0 (and extraction stays linear)
_MARKED_RE = re.compile(
    r"(?:(?:final\s+answer|the\s+answer)\s*(?:is\b\s*:?|:)|\banswer\s*:)(?=[ \t*]*([^\n]{0,500}))",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\w)\]}.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w)\]}.])-?\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"(?<![\\a-zA-Z{])[a-zA-Z]{3,}")


def _boxed_span(text: str, start: int, closing: dict[int, int] | None = None) -> tuple[str, int] | None:
    """(content, end) of the \\boxed{...} / \\fbox{...} / \\framebox[..]{...} / brace-less `\\boxed 2` whose
    command ends at `start`; `end` is the index just past it. `closing` (from `_closing_braces`) saves the
    scan for the closing brace."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    while text.endswith("framebox", 0, start) and text.startswith("[", i) and text.find("]", i, i + 40) > 0:
        i = text.find("]", i) + 1  # \framebox[2cm][c]{...}: its width and position
    if i >= len(text):
        return None
    if text[i] != "{":  # MATH has `$\boxed 2$`: the answer is the next token
        token = re.match(r"[^\s${}]+", text[i:])
        return (token.group(0).rstrip(".,;"), i + token.end()) if token else None
    if closing is not None:
        j = closing.get(i)
        return (text[i + 1 : j], j + 1) if j is not None and j - i < _MAX_BOX_SCAN else None
    depth = 0
    for j in range(i, min(len(text), i + _MAX_BOX_SCAN)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
    return None  # unbalanced or absurdly long


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each `{` that closes -> index of its `}`: one pass, so reading every box stays linear."""
    closing, stack = {}, []
    for match in re.finditer(r"[{}]", text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            closing[stack.pop()] = match.start()
    return closing


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the \\boxed{...} / \\fbox{...} / brace-less `\\boxed 2` whose command ends at `start`."""
    span = _boxed_span(text, start)
    return span[0] if span else None


def without_sentence_end(answer: str) -> str:
    """`answer` without a trailing sentence period (`42.` is 42; `1, 2, ...` keeps its dots)."""
    answer = answer.strip()
    return answer[:-1].rstrip() if answer.endswith(".") and not answer.endswith("..") else answer


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every box that states something, in order of their commands (an outer box
    before the boxes nested in it); the content without a trailing period. A box empty up to formatting
    (`\\boxed{}`, `\\boxed{\\,}`) states nothing and is left out. At most _MAX_BOXES + 1 are read."""
    boxes, closing = [], _closing_braces(text) if "\\" in text else {}
    for match in _BOX_RE.finditer(text):
        span = _boxed_span(text, match.end(), closing)
        content = without_sentence_end(span[0]) if span else ""
        if content and answer_forms.canonical(content):
            boxes.append((match.start(), span[1], content))
            if len(boxes) > _MAX_BOXES:
                break
    return boxes


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{} / \\fbox{} / \\framebox{} that states something (balanced braces), or
    None."""
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


def _clean_marked(answer: str) -> str:
    """Trim the text after 'the answer is' down to the answer: a $...$ block, else up to the sentence end."""
    answer = answer.strip().strip("*").strip()
    math_block = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", answer)
    if math_block:
        return next(group for group in math_block.groups() if group is not None).strip()
    answer = re.split(r"\.(?:\s|$)", answer, maxsplit=1)[0]
    word = _WORD_RE.search(answer)  # "42 apples", "5 because ..." -> keep what precedes the prose
    if word:
        answer = answer[: word.start()]
    return answer.strip().lstrip("$").strip(" .,;:*")


def extract_final_answer(completion: str) -> str | None:
    """The model's FINAL answer, or None.

    In order: the content of the last non-empty `\\boxed{}`/`\\fbox{}`; else the last clearly marked answer
    ("final answer is X", "the answer is X", "Answer: X"); else the last number in the text. Taking the
    LAST one is what stops a restated question from counting as the answer.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for match in reversed(list(_MARKED_RE.finditer(completion))[-_MAX_CANDIDATES:]):
        answer = _clean_marked(match.group(1))
        if answer:
            return answer
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


_MATH_BLOCK_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_PLAIN_ARITHMETIC_RE = re.compile(
    r"-?\d+(?:\.\d+)?(?:\s*(?:[-+*/×÷^]|\\times|\\cdot|\\div)\s*-?\d+(?:\.\d+)?)+"
)
_MAX_QUESTION_EXPRESSIONS = 200


@functools.lru_cache(maxsize=1024)
def _question_forms(question: str) -> tuple[frozenset[str], frozenset[str]]:
    """What an echo of the question would write, canonical: its math expressions (each `$...$`,
    `\\(...\\)`, `\\[...\\]`, and arithmetic in its prose such as `17 + 25`), the sides of its equations
    that apply an operation, and the function applications it writes."""
    blocks = _MATH_BLOCK_RE.finditer(question)
    texts = [next(group for group in block.groups() if group is not None) for block in blocks]
    texts += _PLAIN_ARITHMETIC_RE.findall(_MATH_BLOCK_RE.sub(" ", question))
    forms: set[str] = set()
    applications: set[str] = set()
    for text in texts[:_MAX_QUESTION_EXPRESSIONS]:
        if len(text) > 4 * MAX_ANSWER_CHARS:
            continue
        canonical = answer_forms.canonical(without_sentence_end(text))  # as a box is read
        forms.add(_echo_form(canonical))
        forms.update(
            _echo_form(side)
            for side in answer_forms.split_top(canonical, "=")
            if answer_forms.operations(side)
        )
        applications |= _echo_applications(canonical)
    return frozenset(forms), frozenset(applications)


def _echo_form(canonical: str) -> str:
    """What an echo is compared by: the canonical form unwrapped, its numbers as a reader writes them, so
    that `3/20`, `\\frac{03}{20}`, `{3 \\over 20}`, `1.450` and `01.45` are the question's `\\frac{3}{20}` and
    `1.45` (`canonical` already reads `\\sqrt[2]{x}` as `\\sqrt{x}`)."""
    return answer_forms.same_number_forms(answer_forms.unwrapped(canonical))


def _echo_applications(canonical: str) -> set[str]:
    """The function applications of a canonical form, numbers as a reader writes them (`\\sqrt{0242}` is
    `\\sqrt{242}`)."""
    return {answer_forms.same_number_forms(found) for found in answer_forms.applications(canonical)}


def _echoes_question(answer: str, gold: str, question: str) -> bool:
    """True when the (canonical) answer is one of the question's own expressions (other than the gold as
    written), or writes a function application of the question that the gold does not: `\\sqrt{242}` for
    "Simplify $\\sqrt{242}$", `\\frac{3}{20}` for "Express $\\frac{3}{20}$ as a decimal", `1.45` for
    "Express $1.45$ as a fraction", `x=3` for "... has solutions $x=3$" when the gold is 3."""
    forms, applications = _question_forms(question)
    echo = _echo_form(answer)
    if echo in forms and echo != _echo_form(gold):
        return True
    return bool((_echo_applications(answer) & applications) - _echo_applications(gold))


# Ways of writing "this or that" inside one answer: the word `or` (bare, in \text, \hbox, \mbox, ...),
# \lor, \vee, a lone `|` and \mid.
_ALTERNATIVE_RE = re.compile(r"(?<![\\a-zA-Z])or(?![a-zA-Z])|\\(?:lor|vee|mid)(?![a-zA-Z])", re.IGNORECASE)


def _outside_nested_boxes(content: str) -> str:
    """A box's content without the boxes nested in it: `43 ` for `43 \\boxed{42}`, `` for `\\boxed{42}`."""
    if not _BOX_RE.search(content):
        return content
    parts, last = [], 0
    for start, end, _ in _boxes(content):
        if start >= last:  # a box nested in a nested box went with it
            parts.append(content[last:start])
            last = end
    return " ".join([*parts, content[last:]])


_MAX_BOX_VERIFICATIONS = 3  # differently written boxes asked of math-verify; more are a hedge


def _stated(content: str) -> str:
    """What a box states, canonical: `x = 5` states 5 (one variable named), `5x+4=0` itself."""
    return re.sub(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?=.)", "", answer_forms.canonical(content))


def _hedged(boxes: list[tuple[int, int, str]], timeout_s: float) -> bool:
    """True when the boxes do not all state one answer: `\\boxed{43} or \\boxed{42}`, `\\boxed{42}
    \\framebox{43}`, `\\boxed{43 \\boxed{42}}` (the outer box states 43 besides), a first box corrected by a
    later one (`\\boxed{41} no wait, \\boxed{42}`), more than _MAX_BOXES boxes. Boxes that repeat one
    answer pay, as written (`\\boxed{x = 42} ... \\boxed{42.0}`, `\\boxed{\\boxed{42}}`) or written otherwise
    but equal per math-verify (`\\boxed{x^2+1} ... \\boxed{1+x^2}`)."""
    if len(boxes) > _MAX_BOXES:
        return True
    final = boxes[-1][2]
    contents = dict.fromkeys(_outside_nested_boxes(content) for _, _, content in boxes[:-1])
    different = [
        content
        for content in contents
        if answer_forms.canonical(content) and not answer_forms.same_answer(_stated(content), _stated(final))
    ]
    if len(different) > _MAX_BOX_VERIFICATIONS or any(_too_costly(content) for content in different):
        return True
    plain = answer_forms.plain_text
    return not all(verification.verify(plain(final), plain(content), timeout_s) for content in different)


def _offers_alternatives(answer: str, gold: str) -> bool:
    """True when one answer offers alternatives the gold does not: `42 \\text{ (or 43)}`, `42 \\hbox{ or }
    43`, `42 | 43`, `42 \\lor 43`. A `|` pair is an absolute value, not an alternative."""
    if _ALTERNATIVE_RE.search(answer) and not _ALTERNATIVE_RE.search(gold):
        return True
    return answer.count("|") % 2 == 1 and gold.count("|") % 2 == 0


def _contradicted(tail: str, answer: str) -> bool:
    """True when the last clearly marked answer after the last box ("Wait... the answer is 43.") states
    something else than the box (numbers are compared by value, other answers as written)."""
    for match in reversed(list(_MARKED_RE.finditer(tail))[-_MAX_CANDIDATES:]):
        later = _clean_marked(match.group(1))
        if later:
            looks_like_answer = re.search(r"[\d\\]", later) or re.fullmatch(r"\(?[A-E]\)?", later)
            return bool(looks_like_answer) and not answer_forms.same_answer(later, answer)
    return False


def _not_the_answer(
    completion: str, answer: str, gold: str, question: str | None, timeout_s: float = 5.0
) -> bool:
    """True when the extracted answer must score 0 whatever math-verify says (the rule in the module
    docstring): hedged or contradicted boxes, an equation that states another number, an inequality for a
    number, an operation the gold does not apply, or an echo of the question."""
    boxes = _boxes(completion)
    if boxes and boxes[-1][2] == answer:
        if _hedged(boxes, timeout_s) or _contradicted(completion[boxes[-1][1] :], answer):
            return True
    if _offers_alternatives(answer, gold):
        return True
    canonical, gold_canonical = answer_forms.canonical(answer), answer_forms.canonical(gold)
    sides = (
        [canonical]
        if answer_forms.RELATION_RE.search(gold_canonical)
        else answer_forms.split_top(canonical, "=")
    )
    final = answer_forms.value(sides[-1])
    if final is not None and any(answer_forms.value(side) not in (None, final) for side in sides[:-1]):
        return True  # `43 = 42`: which one is the answer?
    if answer_forms.value(gold_canonical) is not None and answer_forms.INEQUALITY_RE.search(canonical):
        return True  # `0 < p < 15` or `y \le 1` for 15 or 1: a range, not the number
    if answer_forms.adds_operations(sides[-1], gold_canonical):
        return True
    if not question:
        return False
    forms = dict.fromkeys((sides[-1], canonical))  # the value, and the whole answer: `x = 3` for "If $x=3$"
    return any(_echoes_question(form, gold_canonical, question) for form in forms)


def _exponent(text: str, start: int) -> str:
    """The exponent written after the `^` that ends at `start`: a balanced {...} group or one token."""
    group = re.match(r"\s*(-?\d+|\\?[a-zA-Z]+|[^{])", text[start:])
    if not text[start:].lstrip().startswith("{"):
        return group.group(1) if group else ""
    return _boxed_content(text, start) or text[start:]  # unbalanced: the rest, to be judged whole


def _too_costly(answer: str) -> bool:
    """True for answers whose verification could run for minutes: towers like `9^{9^{9}}`, giant
    exponents or factorials, high powers of symbolic expressions (`(1+x)^{1000}` took 11 s here)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    text = answer.replace("**", "^")
    for match in re.finditer(r"\^", text):
        exponent = _exponent(text, match.end())
        if "^" in exponent or "!" in exponent:
            return True
        numeric_base = text[: match.start()].rstrip().endswith(tuple("0123456789"))
        if any(int(digits) > (100_000 if numeric_base else 200) for digits in re.findall(r"\d+", exponent)):
            return True
    if any(int(digits) > 100_000 for digits in re.findall(r"(\d+)\s*!", text)):
        return True
    return bool(re.search(r"[)}]\s*!", text) and "^" in text)  # like (10^{9})!


def score(
    completion: str, gold: str, timeout_s: float = 5.0, question: str | None = None
) -> tuple[float, str | None]:
    """(reward, extracted answer) for one completion; the trainer logs both. Never raises.

    With `question` (the problem text), an answer that echoes one of its expressions also scores 0."""
    try:
        gold = without_sentence_end(gold)  # `30^\\circ.`: a sentence's period, as in an answer's box
        answer = extract_final_answer(completion)
        if answer is None or _too_costly(answer):
            return 0.0, answer
        if _not_the_answer(completion, answer, gold, question, timeout_s):
            return 0.0, answer
        gold_text, answer_text = answer_forms.plain_text(gold), answer_forms.plain_text(answer)
        ok = verification.verify(gold_text, answer_text, timeout_s)
        return (1.0 if ok else 0.0), answer
    except ImportError:  # math-verify missing is a broken install, not a wrong answer: say so
        raise
    except Exception:  # a reward must never crash training
        logger.debug("scoring failed", exc_info=True)
        return 0.0, None


def math_reward(
    completions: list[str], golds: list[str], timeout_s: float = 5.0, questions: list[str] | None = None
) -> list[float]:
    """1.0 where math-verify says the completion's final answer equals the gold, else 0.0 (and 0.0 for
    the answers the module docstring's rule excludes; `questions`, one per completion, adds the echo check).

    Time bound per sample: answers over MAX_ANSWER_CHARS characters, power towers, giant exponents and
    giant factorials are scored 0 without verification (everywhere, so the score does not depend on the
    thread). On the main thread math-verify's own `signal.alarm` limits apply: ceil(timeout_s) for each
    of parse(gold), parse(answer) and verify. Off the main thread (where `signal.alarm` raises) the same
    runs in a helper process, whose main thread can use those limits, and the caller kills it after
    3 * ceil(timeout_s) + 1 seconds: a hard bound. Its first use costs the helper's start (1-2 s).
    """
    if len(completions) != len(golds):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(golds)} gold answers")
    if questions is not None and len(questions) != len(golds):
        raise ValueError(f"math_reward got {len(golds)} gold answers but {len(questions)} questions")
    questions = [None] * len(golds) if questions is None else questions
    return [
        score(completion, gold, timeout_s, question)[0]
        for completion, gold, question in zip(completions, golds, questions, strict=True)
    ]
