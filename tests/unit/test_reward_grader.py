"""The math grader against a table of (response, ground truth, expected verdict) cases.

Each row is a test. The verdicts are what a careful human grader would say for a strict-box
run (the default); a few rows exercise the non-strict "Answer:" fallback and thinking format.
"""

from __future__ import annotations

import pytest

from megatron_spo.rollout.rewards import RewardConfig, last_boxed, math_reward, normalize_answer

B = "\\boxed"

# (id, response, ground truth, expected score)
CASES = [
    # integers and plain numbers
    ("int", f"So the total is {B}{{42}}.", "42", 1),
    ("int-wrong", f"{B}{{41}}", "42", 0),
    ("negative", f"{B}{{-7}}", "-7", 1),
    ("negative-wrong-sign", f"{B}{{7}}", "-7", 0),
    ("decimal", f"{B}{{3.14}}", "3.14", 1),
    ("decimal-trailing-zero", f"{B}{{2.50}}", "2.5", 1),
    ("leading-dot", f"{B}{{.5}}", "0.5", 1),
    ("trailing-period", f"{B}{{12.}}", "12", 1),
    ("spaces", f"{B}{{ 1 2 }}", "12", 1),
    ("thousands", f"{B}{{1,000,000}}", "1000000", 1),
    ("thousands-gt", f"{B}{{2500}}", "2,500", 1),
    ("dollar-sign", f"{B}{{\\$18.90}}", "18.90", 1),
    ("rounded-not-equal", f"{B}{{3.14}}", "\\pi", 0),
    # fractions
    ("frac", f"{B}{{\\frac{{1}}{{2}}}}", "\\frac{1}{2}", 1),
    ("dfrac", f"{B}{{\\dfrac{{3}}{{4}}}}", "\\frac{3}{4}", 1),
    ("tfrac", f"{B}{{\\tfrac{{3}}{{4}}}}", "\\dfrac{3}{4}", 1),
    ("frac-shorthand", f"{B}{{\\frac12}}", "\\frac{1}{2}", 1),
    ("frac-vs-decimal", f"{B}{{0.5}}", "\\frac{1}{2}", 1),
    ("frac-unreduced", f"{B}{{\\frac{{2}}{{4}}}}", "\\frac{1}{2}", 1),
    ("slash-frac", f"{B}{{3/4}}", "\\frac{3}{4}", 1),
    ("frac-wrong", f"{B}{{\\frac{{1}}{{3}}}}", "\\frac{1}{2}", 0),
    ("negative-frac", f"{B}{{-\\frac{{1}}{{2}}}}", "\\frac{-1}{2}", 1),
    # radicals and symbolic
    ("sqrt", f"{B}{{2\\sqrt{{3}}}}", "2\\sqrt{3}", 1),
    ("sqrt-equivalent", f"{B}{{\\sqrt{{12}}}}", "2\\sqrt{3}", 1),
    ("sqrt-shorthand", f"{B}{{\\sqrt2}}", "\\sqrt{2}", 1),
    ("sqrt-wrong", f"{B}{{\\sqrt{{3}}}}", "\\sqrt{2}", 0),
    ("rationalised", f"{B}{{\\frac{{\\sqrt{{2}}}}{{2}}}}", "\\frac{1}{\\sqrt{2}}", 1),
    ("pi-expr", f"{B}{{\\frac{{\\pi}}{{2}}}}", "\\pi/2", 1),
    ("polynomial-order", f"{B}{{x^2+2x+1}}", "1+2x+x^2", 1),
    ("factored-vs-expanded", f"{B}{{(x+1)^2}}", "x^2+2x+1", 1),
    ("variable-assignment", f"{B}{{x = 5}}", "5", 1),
    ("left-right", f"{B}{{\\left(\\frac{{1}}{{2}}\\right)}}", "\\frac{1}{2}", 1),
    # intervals, sets, tuples, matrices
    ("interval", f"{B}{{(1, 2]}}", "(1,2]", 1),
    ("interval-left-right", f"{B}{{\\left[ 0, \\infty \\right)}}", "[0,\\infty)", 1),
    ("interval-wrong-bracket", f"{B}{{[1,2)}}", "(1,2]", 0),
    ("set-order", f"{B}{{\\{{3, 1, 2\\}}}}", "\\{1,2,3\\}", 1),
    ("set-wrong", f"{B}{{\\{{1, 2\\}}}}", "\\{1,2,3\\}", 0),
    ("tuple", f"{B}{{(3, -4)}}", "(3,-4)", 1),
    ("tuple-order-matters", f"{B}{{(-4, 3)}}", "(3,-4)", 0),
    ("matrix", f"{B}{{\\begin{{pmatrix}} 1 & 2 \\\\ 3 & 4 \\end{{pmatrix}}}}",
     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1),
    ("matrix-wrong", f"{B}{{\\begin{{pmatrix}} 1 & 2 \\\\ 4 & 3 \\end{{pmatrix}}}}",
     "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 0),
    # units, degrees, percentages, scientific notation
    ("units-text", f"{B}{{10\\text{{ cm}}}}", "10", 1),
    ("units-word", f"{B}{{5 \\text{{meters}}}}", "5", 1),
    ("units-squared", f"{B}{{36\\text{{ cm}}^2}}", "36", 1),
    ("degrees-circ", f"{B}{{90^\\circ}}", "90", 1),
    ("degrees-braced", f"{B}{{45^{{\\circ}}}}", "45", 1),
    ("degrees-unicode", f"{B}{{30°}}", "30", 1),
    ("degrees-wrong", f"{B}{{60^\\circ}}", "90", 0),
    ("percent", f"{B}{{25\\%}}", "25", 1),
    ("percent-vs-fraction", f"{B}{{50\\%}}", "0.5", 1),
    ("scientific-times", f"{B}{{1.5 \\times 10^{{3}}}}", "1500", 1),
    ("scientific-e", f"{B}{{2e-3}}", "0.002", 1),
    ("scientific-wrong", f"{B}{{1.5 \\times 10^{{4}}}}", "1500", 0),
    # boxes: several, nested, fbox, spacing forms
    ("multiple-boxes-last-wins", f"First {B}{{3}}, but wait, actually {B}{{4}}.", "4", 1),
    ("multiple-boxes-first-ignored", f"First {B}{{3}}, but wait, actually {B}{{4}}.", "3", 0),
    ("nested-braces", f"{B}{{\\frac{{\\sqrt{{\\frac{{1}}{{4}}}}}}{{2}}}}", "\\frac{1}{4}", 1),
    ("fbox", "The answer: \\fbox{17}", "17", 1),
    ("boxed-space-form", "so $\\boxed 9$ it is", "9", 1),
    ("boxed-brace-after-space", f"{B} {{8}}", "8", 1),
    ("text-answer", f"{B}{{\\text{{yes}}}}", "yes", 1),
    ("text-answer-wrong", f"{B}{{\\text{{no}}}}", "yes", 0),
    ("inside-math-mode", f"Thus $x = {B}{{\\dfrac{{7}}{{3}}}}$.", "\\frac{7}{3}", 1),
    # malformed, unicode, empty and missing
    ("unclosed-box", f"{B}{{\\frac{{1}}{{2}}", "\\frac{1}{2}", 0),
    ("empty-box", f"{B}{{}}", "0", 0),
    ("whitespace-box", f"{B}{{   }}", "0", 0),
    ("missing-box", "The answer is 42.", "42", 0),
    ("empty-response", "", "42", 0),
    ("garbage-latex", f"{B}{{\\frac{{{{}}}}\\sqrt[}}", "1", 0),
    ("unicode-minus", f"{B}{{−3}}", "-3", 1),
    ("unicode-fullwidth-digits", f"{B}{{１２}}", "12", 1),
    ("unicode-pi", f"{B}{{2π}}", "2\\pi", 1),
    ("unicode-sqrt", f"{B}{{√2}}", "\\sqrt{2}", 1),
    ("answer-line-ignored-when-strict", "Answer: 42", "42", 0),
    ("box-outside-tail-ignored", f"{B}{{42}}" + " filler" * 100, "42", 0),
]


@pytest.mark.parametrize("response,ground_truth,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_grader_table(response, ground_truth, expected):
    result = math_reward(response, ground_truth, RewardConfig())
    assert result.score == expected, f"prediction={result.prediction!r} path={result.path}"


def test_table_is_big_enough():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


NON_STRICT = [
    ("answer-line", "Reasoning...\nAnswer: 42", "42", 1),
    ("answer-line-last-wins", "Answer: 41\nhmm, no.\nAnswer: 42.", "42", 1),
    ("answer-line-latex", "Answer: $\\frac{1}{2}$", "0.5", 1),
    ("box-preferred-over-answer-line", f"Answer: 41\n{B}{{42}}", "42", 1),
    ("no-answer-at-all", "I give up", "42", 0),
]


@pytest.mark.parametrize("response,ground_truth,expected", [c[1:] for c in NON_STRICT], ids=[c[0] for c in NON_STRICT])
def test_non_strict_answer_fallback(response, ground_truth, expected):
    result = math_reward(response, ground_truth, RewardConfig(strict_box=False))
    assert result.score == expected, f"prediction={result.prediction!r}"


@pytest.mark.parametrize(
    "response,expected_score,format_ok",
    [
        (f"<think>2+2 is {B}{{5}}? no</think>The sum is {B}{{4}}.", 1, True),
        (f"<think>the answer is {B}{{4}}</think>I am not sure.", 0, True),  # box only in thoughts
        (f"no thinking at all: {B}{{4}}", 0, False),
        (f"<think>a</think><think>b</think>{B}{{4}}", 0, False),
        (f"<think>a</think>{B}{{4}}</think>", 0, False),
    ],
    ids=["one-think", "box-only-in-thoughts", "zero-think", "two-think-blocks", "two-closing-tags"],
)
def test_thinking_format_check(response, expected_score, format_ok):
    result = math_reward(response, "4", RewardConfig(thinking=True))
    assert (result.score, result.format_ok) == (expected_score, format_ok)


def test_last_boxed_returns_nested_content_verbatim():
    assert last_boxed("x \\boxed{a{b{c}}d} y \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert last_boxed("\\boxed{1") is None
    assert last_boxed("\\boxed") is None


def test_normalize_answer_examples():
    assert normalize_answer("\\left( \\dfrac{1}{2}, 3 \\right]") == "(\\frac{1}{2},3]"
    assert normalize_answer("1,234.5") == "1234.5"
    assert normalize_answer("(1,234)") == "(1,234)"  # a tuple is not a thousands-separated number
    assert normalize_answer("90^{\\circ}") == "90"


def test_math_verify_can_be_turned_off():
    config = RewardConfig(math_verify=False)
    assert math_reward(f"{B}{{0.5}}", "\\frac{1}{2}", config).score == 0
    assert math_reward(f"{B}{{\\dfrac{{1}}{{2}}}}", "\\frac{1}{2}", config).score == 1


def test_paths_are_reported():
    config = RewardConfig()
    assert math_reward(f"{B}{{42}}", "42", config).path == "exact"
    assert math_reward(f"{B}{{4.2e1}}", "42", config).path == "numeric"
    assert math_reward(f"{B}{{\\frac{{84}}{{2}}}}", "42", config).path == "math_verify"


def test_answer_format_suffix_is_appended_once():
    from megatron_spo.rollout.rewards import with_answer_format

    config = RewardConfig()
    prompt = with_answer_format("What is 2 + 2?", config)
    assert prompt == "What is 2 + 2?\n\nThe answer format must be: \\boxed{...}"
    assert with_answer_format(prompt, config) == prompt
    assert with_answer_format("Q", RewardConfig(answer_format_suffix="")) == "Q"
