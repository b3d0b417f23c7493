"""algos/rewards.py on real references (every GSM8K test answer, the MATH-500 answers and solutions,
shipped in tests/assets/) and hand-written edge cases: equal and unequal pairs, malformed LaTeX that
must never raise, hostile inputs that must finish."""

import functools
import json
import math
import re

import pytest
import torch

from algos import rewards
from algos.rewards import (
    RewardFunctionError,
    boxed_answer,
    boxed_math,
    format_reward,
    gsm8k,
    gsm8k_gold,
    last_number,
    math_answers_equal,
    score_completions,
)
from tests.conftest import shared


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- real references ----------------------------------------------------------------------------


def test_every_gsm8k_reference_matches_itself():
    refs = [r["answer"] for r in _jsonl(shared("gsm8k/test_answers.jsonl"))]
    assert len(refs) == 1319
    golds = [gsm8k_gold(r) for r in refs]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", g) for g in golds), [g for g in golds if not re.fullmatch(r"-?\d+", g)]
    boxed = [f"Let me think step by step. The answer is \\boxed{{{g}}}." for g in golds]
    assert gsm8k(None, boxed, refs) == [1.0] * len(refs)
    assert boxed_math(None, boxed, golds) == [1.0] * len(refs)
    # The reference solution itself, read as a completion: its last number is the one after ####.
    assert gsm8k(None, refs, refs) == [1.0] * len(refs)
    # And a wrong number is wrong, boxed or not.
    wrong = [f"The answer is {int(float(g)) + 1}." for g in golds]
    assert gsm8k(None, wrong, refs) == [-1.0] * len(refs)


def _rerender(answer: str) -> str:
    """How a model might write the same MATH answer: \\dfrac, \\left( \\right), ^{\\circ}, spaces after
    commas, a/b for plain fractions, thousands separators, trailing .0, x = before a number,
    shorthand \\sqrt2, \\text{} dropped around words."""
    s = answer
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        return f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if re.fullmatch(r"\d{4,}", s):
        return f"{int(s):,}"
    if re.fullmatch(r"-?\d+", s):
        return f"x = {s}.0"
    m = re.fullmatch(r"\\text\{([A-Za-z ]+)\}", s)
    if m:
        return m.group(1).capitalize()
    s = s.replace("\\frac", "\\dfrac")
    s = s.replace("^\\circ", "^{\\circ}")
    s = re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", s)
    if "\\left" not in s:
        s = s.replace("(", "\\left( ").replace(")", " \\right)")
    s = re.sub(r",\s*", ", ", s)
    return s


def test_math500_answers_match_their_renderings():
    rows = _jsonl(shared("math500/answers.jsonl"))
    assert len(rows) == 500
    # Every reference matches itself in its own format: a completion ending in its box.
    completions = [f"So the final answer is $\\boxed{{{r['answer']}}}$." for r in rows]
    scores = boxed_math(None, completions, [r["answer"] for r in rows])
    assert scores == [1.0] * 500, [r["answer"] for r, s in zip(rows, scores) if s != 1.0]

    # The box of the worked solution (nested braces, \left...\right, text) vs the answer field.
    misses = [(boxed_answer(r["solution"]), r["answer"]) for r in rows
              if not math_answers_equal(boxed_answer(r["solution"]), r["answer"])]
    print(f"solution box vs answer: {500 - len(misses)}/500 match; misses: {misses}")
    assert len(misses) <= 25

    # A different rendering of each answer.
    changed = [(r["answer"], _rerender(r["answer"])) for r in rows if _rerender(r["answer"]) != r["answer"]]
    misses = [(a, b) for a, b in changed if not math_answers_equal(b, a)]
    print(f"re-rendered: {len(changed)} of 500 answers changed, {len(changed) - len(misses)} match; misses: {misses}")
    assert len(changed) > 300
    assert len(misses) <= 0.05 * 500

    # Neighbouring answers that differ as strings are (nearly always) different answers.
    pairs = [(a["answer"], b["answer"]) for a, b in zip(rows, rows[1:]) if a["answer"] != b["answer"]]
    false_matches = [(a, b) for a, b in pairs if math_answers_equal(a, b)]
    print(f"{len(false_matches)} of {len(pairs)} different neighbouring answers compare equal: {false_matches}")
    assert len(false_matches) <= 2


# ---- boxed_answer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} and then \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("The answer is $\\boxed 5$.", "5"),
    ("The answer is \\boxed 5", "5"),
    ("\\boxed {3}", "3"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
    ("\\boxed{1", None),
    ("\\boxed{1} but \\boxed{2", None),
    ("no answer here", None),
    ("\\boxedfoo{3}", None),
    ("\\boxed", None),
    ("", None),
    (None, None),
])
def test_boxed_answer(text, want):
    assert boxed_answer(text) == want


def test_last_number():
    assert last_number("10-3=7 apples, so 7.") == "7"
    assert last_number("She owes -5 dollars") == "-5"
    assert last_number("a total of $1,234.50 in all") == "1,234.50"
    assert last_number("x-3") == "3"
    assert last_number("none") is None


# ---- math_answers_equal: hand-written pairs ------------------------------------------------------

EQUAL = [
    ("1,000", "1000"), ("1000.0", "1000"), ("-3", "-3.0"), (".5", "0.5"), ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "3/4"), ("\\tfrac{3}{4}", "\\frac34"), ("\\frac12", "\\frac{1}{2}"), ("\\frac 59", "5/9"),
    ("\\frac9{19}", "\\frac{9}{19}"), ("\\sqrt3", "\\sqrt{3}"), ("11\\sqrt2", "11 \\sqrt{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("5.4 \\text{ cents}", "5.4"),
    ("15\\mbox{ cm}^2", "15"), ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"), ("30^\\circ", "30"),
    ("30^{\\circ}", "30^\\circ"), ("50\\%", "50"), ("\\$18.90", "18.9"), ("\\$32,\\!348", "32348"),
    ("x = 5", "5"), ("y=2x+3", "y = 2x + 3"), ("10,\\!080", "10080"), ("1\\,000", "1000"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("\\text{(B)}", "B"), ("(b)", "\\text{(B)}"),
    ("\\text{Evelyn}", "evelyn"), ("\\{1,2\\}", "\\{2,1\\}"), ("-2,1", "1, -2"), ("(1,2]", "\\left(1,2\\right]"),
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{18}{5} \\end{pmatrix}"),
    ("137 \\frac{1}{2}", "\\frac{275}{2}"), ("1\\frac{4}{5}", "1.8"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("(x+1)^2", "x^2+2x+1"), ("\\sin^2 x + \\cos^2 x", "1"), ("2^{10}", "1024"), ("18 dollars", "18"),
    ("sqrt(2)/2", "\\frac{\\sqrt2}{2}"), ("3*pi", "3 \\pi"), ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)"),
    ("7i - 2", "-2 + 7i"), ("\\boxed{5}", "5"), ("x \\in [-2,7]", "[-2, 7]"), ("4210_{5}", "4210_5"),
    ("2^{100}", "1267650600228229401496703205376"), ("\\frac{20000}{\\pi}", "20000/\\pi"), ("p - q", "-q+p"),
    ("(a+5)(b+2)", "ab+2a+5b+10"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"), ("6 - 5i", "6-5i"),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"), ("\\sqrt[3]{8}", "2"), ("\\pi", "\\pi"), ("East", "\\text{east}"),
]

UNEQUAL = [
    ("1/3", "0.333"), ("2", "3"), ("(1,2)", "[1,2]"), ("(1,2)", "(2,1)"), ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("x^12", "x^{12}"), ("\\sqrt{2}", "1.414"), ("\\pi", "3.14"), ("1,2,3", "1,2"), ("5 + x", "5"),
    ("50\\%", "0.5"), ("\\text{east}", "west"), ("", "0"), ("x", "y"), ("2k", "2n"), ("-5", "5"),
    ("\\{1,2\\}", "\\{1,2,3\\}"), ("5 cm", "6"), ("204_5", "204"), ("3R^2", "3r^2"), ("(3,4]", "(3,4)"),
    ("\\infty", "-\\infty"), ("x^2", "x^3"), ("\\sin x", "\\cos x"), ("10^{-20}", "2\\cdot 10^{-20}"),
    ("1\\pm\\sqrt{19}", "1+\\sqrt{19}"), ("A", "B"),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_equal_pairs(pred, gold):
    assert math_answers_equal(pred, gold)
    assert math_answers_equal(gold, pred)


@pytest.mark.parametrize("pred,gold", UNEQUAL)
def test_unequal_pairs(pred, gold):
    assert not math_answers_equal(pred, gold)
    assert not math_answers_equal(gold, pred)


def test_large_integers_compare_exactly_with_sympy_and_approximately_without(monkeypatch):
    pytest.importorskip("sympy")
    big = "1267650600228229401496703205376"  # 2^100
    assert not math_answers_equal("2^{100}+1", big)
    monkeypatch.setattr(rewards, "_sympy", None)
    assert math_answers_equal("2^{100}", big)
    assert math_answers_equal("2^{100}+1", big)  # floats: a relative difference of 1e-30 is below 1e-9
    # Without sympy, identities still hold through random points.
    assert math_answers_equal("\\sin^2 x + \\cos^2 x", "1")
    assert math_answers_equal("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}")
    assert not math_answers_equal("x^{100}", "x^{100}+1")


MALFORMED = ["\\frac{1}{", "{{{", "\\sqrt[", "\\left(", "1/0", "0^{-1}", "\\frac{1}{0}", "((((", "\\begin{pmatrix}",
             "^^^", "\\", "", "   ", "$$", "\\text{", "x==y", "\\boxed", "}{", "\\frac", "\\sqrt", "2^", "_", "\\infty-\\infty",
             "1e400", "\\sqrt[0]{2}", "((1,2),", "\\cup", "= 5", ",,,", "\\left[\\right)", "\\begin{pmatrix} 1 & \\end{pmatrix}"]
HOSTILE = ["9^{9^{9^{9}}}", "(x+y+z+w)^{1000}", "(x+y+z+w)^{20}(a+b+c+d)^{20}", "\\frac{" * 200, "{" * 10000,
           "1" * 100000, "1" * 9999, "2^{2^{2^{2^{2}}}}", "(10^{999})^{999}", "\\sin(10^{100})", "x" * 199,
           "\\sqrt{" * 100 + "2" + "}" * 100, "(" * 150 + "1" + ")" * 150, "\\boxed{" * 5000, "10^{10^{10}}",
           "e^{e^{e^{e^{10}}}}", "((1+\\sqrt{2})^{1000})^{1000}", "a," * 3000, "(" + "1," * 3000 + ")", "\\left(" * 1000,
           "x=" * 1000, "\\frac" * 2000 + "12", ",".join(str(i) for i in range(400))]


@pytest.mark.parametrize("text", MALFORMED + HOSTILE)
def test_malformed_and_hostile_inputs_never_raise(text):
    for other in ["1", "x", text + "+1", text]:
        assert math_answers_equal(text, other) in (True, False)
        assert math_answers_equal(other, text) in (True, False)
    assert not math_answers_equal(text, "12345")
    assert math_answers_equal(None, "1") is False and math_answers_equal(5, "5") is False


# ---- reward functions ----------------------------------------------------------------------------


def test_boxed_math_reward():
    completions = ["... so \\boxed{\\frac12}", "no box, 0.5", "\\boxed{0.6}", "\\boxed{0.5} \\boxed{1"]
    assert boxed_math(None, completions, ["\\frac{1}{2}"] * 4) == [1.0, -1.0, -1.0, -1.0]
    chat = [[{"role": "assistant", "content": "It is \\boxed{3}."}],
            [{"role": "assistant", "content": [{"type": "text", "text": "It is \\boxed{4}."}]}]]
    assert boxed_math(["q", "q"], chat, ["3", "3"], level=[1, 2]) == [1.0, -1.0]


def test_gsm8k_reward():
    ref = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,234"
    completions = ["First 5, then \\boxed{1234}. Check: 9", "So she pays $1,234.", "1234.0 in all",
                   "1233", "no numbers", "\\boxed{1,234}", "The total is 1,234 dollars"]
    assert gsm8k(None, completions, [ref] * 7) == [1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0]
    assert gsm8k(None, ["-5 degrees"], ["#### -5"]) == [1.0]
    assert gsm8k(None, ["7"], ["7"]) == [1.0]  # a bare number as the reference


def test_format_reward():
    ok = ["<think>a</think><answer>b</answer>", "\n<think>\nreason\n</think>\n<answer>\n42\n</answer>\n"]
    bad = ["<think>a</think>", "<answer>b</answer><think>a</think>", "<think>a</think><answer>b</answer> extra",
           "preamble <think>a</think><answer>b</answer>", "<think>a</think><think>c</think><answer>b</answer>",
           "<think>a<answer>b</answer>", ""]
    assert format_reward(None, ok + bad) == [1.0] * len(ok) + [0.0] * len(bad)
    assert format_reward(None, ["<reasoning>x</reasoning> <solution>y</solution>"], think_tag="reasoning",
                         answer_tag="solution") == [1.0]


# ---- score_completions ---------------------------------------------------------------------------


def _length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_score_completions_weights_names_and_fields():
    prompts = ["p0", "p0", "p1", "p1"]
    completions = ["\\boxed{2}", "\\boxed{3}", "<think>x</think><answer>5</answer>", "\\boxed{5}"]
    rows = [{"answer": "2", "level": 1}, {"answer": "2", "level": 1}, {"answer": "5", "level": 3},
            {"answer": "5", "level": 3}]
    seen = {}

    def spy(prompts, completions, answer, level, **kwargs):
        seen.update(answer=answer, level=level, prompts=prompts)
        return [0.0] * len(completions)

    funcs = [boxed_math, format_reward, functools.partial(_length), spy]
    total, per = score_completions(funcs, [1.0, 0.5, 0.1, 2.0], prompts, completions, rows)
    assert list(per) == ["boxed_math", "format_reward", "_length", "spy"]
    assert per["boxed_math"].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert per["format_reward"].tolist() == [0.0, 0.0, 1.0, 0.0]
    want = [1.0 * b + 0.5 * f + 0.1 * len(c) for b, f, c in zip([1, -1, -1, 1], [0, 0, 1, 0], completions)]
    torch.testing.assert_close(total, torch.tensor(want))
    assert seen == {"answer": ["2", "2", "5", "5"], "level": [1, 1, 3, 3], "prompts": prompts}
    total, _ = score_completions([boxed_math], None, prompts, completions, rows)
    assert total.tolist() == [1.0, -1.0, -1.0, 1.0]


def test_a_raising_reward_names_the_function_and_sample():
    def picky(prompts, completions, **kwargs):
        return [1.0 / (len(c) - 3) for c in completions]  # 'abc' divides by zero

    with pytest.raises(RewardFunctionError, match=r"picky raised on sample 2") as info:
        score_completions([_length, picky], None, ["p"] * 3, ["a", "ab", "abc"], [{}] * 3)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "1"])
def test_a_non_finite_reward_is_an_error(bad):
    def broken(prompts, completions, **kwargs):
        return [0.0, bad, 1.0]

    with pytest.raises(RewardFunctionError, match=r"broken returned .* for sample 1"):
        score_completions([broken], None, ["p"] * 3, ["a", "b", "c"], [{}] * 3)


def test_wrong_reward_count_and_mismatched_inputs_are_errors():
    with pytest.raises(RewardFunctionError, match="short returned 2 rewards for 3"):
        def short(prompts, completions, **kwargs):
            return [0.0, 0.0]
        score_completions([short], None, ["p"] * 3, ["a", "b", "c"], [{}] * 3)
    with pytest.raises(ValueError, match="weights"):
        score_completions([_length], [1.0, 2.0], ["p"], ["a"], [{}])
    with pytest.raises(ValueError, match="same count"):
        score_completions([_length], None, ["p"], ["a", "b"], [{}, {}])
