"""Judge-free scoring: extraction tables with real-looking model outputs, tolerances, aggregation, properties."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_mod.eval.scoring import (
    ScoreResult,
    aggregate,
    extract_all_boxed,
    extract_boxed,
    extract_choice,
    extract_number,
    extract_text,
    extract_yesno,
    normalize_text,
    numbers_match,
    parse_number,
    score,
)

OPTS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}

# ------------------------------------------------------------------------------------------- choice

CHOICE_CASES = [
    ("Answer: C", "C"),
    ("(C)", "C"),
    ("C.", "C"),
    ("The answer is C", "C"),
    ("**C**", "C"),
    ("C) blue", "C"),  # the letter wins over the text after it
    ("c", "C"),
    ("a", "A"),
    ("A", "A"),
    ("[C]", "C"),
    ("C: green", "C"),
    ("\\boxed{C}", "C"),
    ("\\boxed{\\text{B}}", "B"),
    ("The final answer is $\\boxed{A}$.", "A"),
    ("blue", "B"),
    ("Blue.", "B"),
    ("A or B", None),
    ("The answer is (A) or (B).", None),
    ("C, D", None),
    ("Both A and C look plausible.", None),
    ("A dog is sitting on the mat.", None),
    ("The answer is a dog.", None),
    ("I am not sure.", None),
    ("", None),
    ("The answer is A. Wait, let me re-check the colour.\nThe answer is B.", "B"),
    (
        "Option A is wrong because the square is not red. Option C is also wrong.\n"
        "Therefore, the correct answer is (B).",
        "B",
    ),
    ("The square in the image is blue.", "B"),
    ("Therefore, D.", "D"),
    ("The correct option is (B) blue", "B"),
    ("E.g., red is a warm color. The answer is yellow.", "D"),
    ("<think>It could be A. Hmm, or maybe C.</think>\nB", "B"),
    ("**Answer:** (d)", "D"),
    (
        "Looking at the image, I see one square. It is colored like the sky on a clear day.\n\nAnswer: B",
        "B",
    ),
    ("I choose C.", "C"),
    ("B\n\nExplanation: the square is blue.", "B"),
    ("The answer is A because the square is red.", "A"),
    ("Answer: E", None),  # not one of the options
    ("Answer：B", "B"),  # full-width colon
    ("答案：C", "C"),
    ("It's option (c).", "C"),
    ("The answer is not A.", None),
    ("The answer is B, not A.", "B"),
    ("A. red", "A"),
    ("The correct answer: B. The other options are wrong.", "B"),
    ("Based on the image, the square is yellow. So the answer is D) yellow.", "D"),
    ("\\boxed{B}\n\nWait, no. The answer is \\boxed{C}.", "C"),
    ("Let's compare A and B. A is red. B is blue.\nIt is hard to tell.", None),
    ("Answer: blue", "B"),
    ("The answer is: the blue one.", "B"),
    ("B because the sky is blue.", "B"),
    ("The colour is red or blue.", None),
    ("The answer is blue, not red.", "B"),
    ("I think it's B", "B"),
]


@pytest.mark.parametrize("output, expected", CHOICE_CASES)
def test_extract_choice(output, expected):
    assert extract_choice(output, OPTS).value == expected


@pytest.mark.parametrize(
    "output, options, expected",
    [
        ("The answer is dark blue", {"A": "blue", "B": "dark blue", "C": "red"}, "B"),  # longest text wins
        ("The answer is (B).", {}, "B"),  # options only in the question text: letters A-E
        ("8/11", {"A": "3/11", "B": "8/11", "C": "6/11", "D": "3/5"}, "B"),
        ("There are 3 circles.", {"A": "2", "B": "3", "C": "4", "D": "5"}, "B"),
        ("I count 3 circles and 5 shapes.", {"A": "2", "B": "3", "C": "4", "D": "5"}, None),
        ("The answer is I", {k: str(i) for i, k in enumerate("ABCDEFGHI")}, "I"),
        ("The answer is I think B", {k: str(i) for i, k in enumerate("ABCDEFGHI")}, "B"),  # pronoun "I"
    ],
)
def test_extract_choice_options(output, options, expected):
    assert extract_choice(output, options).value == expected


def test_choice_methods_are_reported():
    assert extract_choice("\\boxed{C}", OPTS).method == "boxed"
    assert extract_choice("Answer: C", OPTS).method == "answer_marker"
    assert extract_choice("C) blue", OPTS).method == "leading_letter"
    assert extract_choice("blue", OPTS).method == "option_text"
    assert extract_choice("A or B", OPTS).method == "ambiguous"
    assert extract_choice("nothing here", OPTS).method == "none"


def test_long_reasoning_reads_only_the_last_line():
    # 40+ words mentioning A in the middle; no letter on the last line -> nothing extracted
    body = "Consider (A) carefully. " + "The shape has straight edges and equal sides. " * 8
    assert extract_choice(body + "\nIt is hard to say.", OPTS).value is None
    assert extract_choice(body + "\nSo my pick: (C)", OPTS).value == "C"


# ------------------------------------------------------------------------------------------- numbers

NUMBER_CASES = [
    ("1234", "The total is 1,234.", True),
    ("12", "About 12%", True),
    ("0.12", "The rate is 12%.", True),
    ("50%", "0.5", True),
    ("0.5", "50 percent", True),
    ("3.5", "The length is 3.5 cm.", True),
    ("5", "It costs $5.", True),
    ("0.75", "3/4", True),
    ("0.75", "The answer is \\boxed{\\frac{3}{4}}", True),
    ("-2", "The value is -2.", True),
    ("-4.5", "\u22124.5", True),  # unicode minus
    ("1500", "1.5e3", True),
    ("0.001", "1e-3", True),
    ("320000", "3.2 \\times 10^{5}", True),
    ("1000000", "1,000,000", True),
    ("8", "There are 5 apples and 3 pears, so 8 fruits in total.", True),
    ("12", "\\boxed{12}. Note that 15 would be too large.", True),
    ("5", "The answer is 2 + 3 = 5.", True),
    ("10", "\\boxed{x = 10}", True),
    ("3", "Step 1: count = 2. Step 2: add one more.\nFinal Answer: 3", True),
    ("3", "I can see three circles.", True),
    ("1.45", "The total is $1.449", True),  # rounds to the gold's 2 decimals
    ("1.45", "1.46", False),
    ("2", "2.0", True),
    ("7", "There are 17 circles", False),
    ("45", "The angle is 45\u00b0.", True),
    ("2008", "The peak was between 2007-2008", True),
    ("6", "<think>maybe 5</think>6", True),
    ("3", "I cannot tell.", False),
    ("3", "3rd", True),
    ("-3", "x = -3", True),
    ("12", "The answer is 12, since 3 x 4 = 12.", True),
    ("0.5", "\\boxed{\\dfrac{1}{2}}", True),
]


@pytest.mark.parametrize("gold, output, expected", NUMBER_CASES)
def test_number_scoring(gold, output, expected):
    result = score({"answer": gold, "answer_type": "number"}, output)
    assert result.correct is expected, result


def test_number_tolerances():
    sample = {"answer": "100", "answer_type": "number"}
    assert not score(sample, "101").correct
    assert score(sample, "101", rel_tol=0.05).correct
    assert score(sample, "100.4", abs_tol=0.5).correct
    assert not score({"answer": "0.5", "answer_type": "number"}, "0.54", use_gold_precision=False).correct
    assert score({"answer": "0.5", "answer_type": "number"}, "0.54").correct  # 0.54 rounds to 0.5
    # MathVista-style precision in meta overrides the written decimals
    assert score({"answer": "1.5", "answer_type": "number", "meta": {"precision": "2"}}, "1.504").correct
    assert not score({"answer": "1.5", "answer_type": "number", "meta": {"precision": "2"}}, "1.52").correct
    assert not score({"answer": "0.12", "answer_type": "number"}, "12%", allow_percent=False).correct


def test_numbers_match_rules():
    assert numbers_match(1.0, 1.0)
    assert not numbers_match(1.0, 1.001)
    assert numbers_match(1.004, 1.0, decimals=2)
    assert not numbers_match(1.006, 1.0, decimals=2)
    assert numbers_match(0.0, 1e-12)  # absolute tolerance near zero


@pytest.mark.parametrize(
    "text, value",
    [("1,234.5", 1234.5), ("12%", 12.0), ("$5", 5.0), ("3/4", 0.75), ("\\frac{1}{2}", 0.5), ("-2.5e3", -2500.0),
     ("3.5 cm", 3.5), ("10 apples", 10.0), (5, 5.0), ("Windows 10", None), ("Route 66", None), ("3:30", None),
     ("abc", None), ("", None), ("1 and 2", None), (None, None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_extract_number_methods():
    assert extract_number("\\boxed{7}").method == "boxed"
    assert extract_number("Answer: 7").method == "answer_marker"
    assert extract_number("maybe 7").method == "last_number"
    assert extract_number("seven? no, eight").method == "number_word"
    assert extract_number("no idea") == (None, "none")
    assert extract_number("12%").value == "12%"


# ------------------------------------------------------------------------------------------- yes / no

YESNO_CASES = [
    ("yes", "Yes", True),
    ("Yes", "yes.", True),
    ("no", "No, there is no triangle.", True),
    ("no", "There is no triangle in the image.", True),
    ("yes", "Yes and no.", False),
    ("yes", "The answer is yes.", True),
    ("no", "Yes, wait... Actually, the answer is No.", True),
    ("yes", "\\boxed{Yes}", True),
    ("no", "**No**", True),
    ("yes", "I think so.", False),
    ("1", "Yes", True),  # HallusionBench-style 1 / 0 gold
    ("0", "No.", True),
    ("yes", "<think>no no no</think>Yes.", True),
    ("no", "NO.", True),
    ("yes", "There is a triangle in the lower left, so the answer is yes", True),
    ("no", "Yes", False),
]


@pytest.mark.parametrize("gold, output, expected", YESNO_CASES)
def test_yesno_scoring(gold, output, expected):
    assert score({"answer": gold, "answer_type": "yesno"}, output).correct is expected


def test_extract_yesno_ambiguous():
    assert extract_yesno("yes or no, hard to say").value is None
    assert extract_yesno("Yes and no.").method == "ambiguous"


# ------------------------------------------------------------------------------------------- text

TEXT_CASES = [
    ("circle", "Circle", True),
    ("circle", "The answer is a circle.", True),
    ("circle", "It is a circle.", False),  # no substring matching: only the answer span is compared
    ("dark blue", "dark-blue", True),
    ("New York", "new york.", True),
    ("triangle", "\\boxed{\\text{triangle}}", True),
    ("triangle", "Answer: triangle\nExplanation: three sides.", True),
    ("1,000 people", "1000 people", True),
    ("square", "Let me look.\nsquare", True),
    ("square", "circle", False),
    ("the Eiffel Tower", "Eiffel tower", True),
]


@pytest.mark.parametrize("gold, output, expected", TEXT_CASES)
def test_text_scoring(gold, output, expected):
    assert score({"answer": gold, "answer_type": "text"}, output).correct is expected


def test_normalize_text():
    assert normalize_text("  The Dark-Blue  CAR! ") == "dark blue car"
    assert normalize_text("1,234 apples") == "1234 apples"
    assert normalize_text(None) == ""


def test_extract_text_prefers_explicit_span():
    assert extract_text("I think.\nFinal answer: red car.") == ("red car", "answer_marker")
    assert extract_text("red car") == ("red car", "whole_response")


# ------------------------------------------------------------------------------------------- boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x \\boxed{a{b{c}}} y", "a{b{c}}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed {42}", "42"),
        ("\\fbox{7}", "7"),
        ("\\boxed{unclosed", None),
        ("no box", None),
        ("\\boxed{\\text{Yes}}", "Yes"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_all_boxed_positions():
    text = "a \\boxed{1} b \\boxed{{2}}"
    assert [c for _, c in extract_all_boxed(text)] == ["1", "{2}"]


# ------------------------------------------------------------------------------------------- score / aggregate


def test_score_choice_with_sample_object():
    from attn_mod.eval.datasets import Sample

    s = Sample(index="1", question="q", answer="B", answer_type="choice", options=OPTS)
    assert score(s, "The answer is (B).") == ScoreResult(True, "B", "answer_marker")
    assert score(s, "A") == ScoreResult(False, "A", "leading_letter")
    assert score(s, "") == ScoreResult(False, None, "empty")


def test_score_errors():
    with pytest.raises(ValueError, match="no gold answer"):
        score({"index": "7", "answer": None, "answer_type": "text"}, "x")
    with pytest.raises(ValueError, match="not a number"):
        score({"answer": "blue", "answer_type": "number"}, "3")
    with pytest.raises(ValueError, match="not yes/no"):
        score({"answer": "maybe", "answer_type": "yesno"}, "yes")
    with pytest.raises(ValueError, match="unknown answer_type"):
        score({"answer": "x", "answer_type": "essay"}, "x")


def test_aggregate():
    records = [
        {"category": "color", "correct": True, "extracted": "A"},
        {"category": "color", "correct": False, "extracted": None},
        {"category": "count", "correct": True, "extracted": "3"},
        {"category": None, "correct": False, "extracted": "x"},
    ]
    out = aggregate(records)
    assert out["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5, "extracted": 3, "extraction_rate": 0.75}
    assert list(out["by_category"]) == ["(none)", "color", "count"]
    assert out["by_category"]["color"]["accuracy"] == 0.5
    assert out["by_category"]["count"]["accuracy"] == 1.0
    assert aggregate([])["overall"] == {"n": 0, "correct": 0, "accuracy": None}
    two = aggregate([{"correct": True, "category": "a", "split": "x"}], by=("category", "split"))
    assert two["by_split"]["x"]["n"] == 1 and "extracted" not in two["overall"]
    with pytest.raises(ValueError, match="boolean 'correct'"):
        aggregate([{"correct": 1}])


# ------------------------------------------------------------------------------------------- properties

_WRAPPERS = ["{x}", "The answer is {x}.", "Answer: {x}", "\\boxed{{{x}}}", "So the final answer is {x}",
             "After counting carefully, I get {x}", "**{x}**"]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10**9, 10**9), wrapper=st.sampled_from(_WRAPPERS), commas=st.booleans())
def test_integer_round_trip(n, wrapper, commas):
    text = f"{n:,}" if commas else str(n)
    ext = extract_number(wrapper.format(x=text))
    assert ext.value is not None and float(ext.value) == n


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-1e6, 1e6, allow_nan=False), decimals=st.integers(0, 4), wrapper=st.sampled_from(_WRAPPERS))
def test_decimal_round_trip_and_self_score(x, decimals, wrapper):
    text = f"{x:.{decimals}f}"
    ext = extract_number(wrapper.format(x=text))
    assert math.isclose(float(ext.value), float(text), rel_tol=1e-12, abs_tol=1e-12)
    assert score({"answer": text, "answer_type": "number"}, wrapper.format(x=text)).correct


@settings(max_examples=200, deadline=None)
@given(
    letter=st.sampled_from("ABCD"),
    wrapper=st.sampled_from(["{l}", "({l})", "{l}.", "The answer is {l}.", "Answer: {l}", "\\boxed{{{l}}}",
                             "**{l}**", "{l}) {t}", "I choose {l}.", "Reasoning...\nTherefore, {l}."]),
)
def test_choice_round_trip(letter, wrapper):
    assert extract_choice(wrapper.format(l=letter, t=OPTS[letter]), OPTS).value == letter


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abc XYZ-.,!'", max_size=30))
def test_normalize_text_idempotent(s):
    assert normalize_text(normalize_text(s)) == normalize_text(s)


@st.composite
def balanced(draw, depth=0):
    parts = draw(st.lists(st.one_of(st.text(alphabet="ab1+ ", max_size=3), st.just("{}")), max_size=4))
    inner = "".join(parts)
    return "{" + inner + "}" if depth == 0 and draw(st.booleans()) else inner


@settings(max_examples=100, deadline=None)
@given(balanced())
def test_boxed_round_trip(content):
    assert [c for _, c in extract_all_boxed(f"so \\boxed{{{content}}} done")] == [content.strip()]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x", "y", None]), st.booleans()), max_size=30))
def test_aggregate_counts_add_up(rows):
    recs = [{"category": c, "correct": ok} for c, ok in rows]
    out = aggregate(recs)
    assert out["overall"]["n"] == len(rows) == sum(g["n"] for g in out["by_category"].values())
    assert out["overall"]["correct"] == sum(ok for _, ok in rows)


# ------------------------------------------------------------------------------------------- extraction gaps

@pytest.mark.parametrize("output, expected", [
    ("yeah", "yes"), ("Yeah, there is a dog on the sofa.", "yes"), ("Yep.", "yes"), ("yup", "yes"),
    ("nope", "no"), ("Nope, nothing like that.", "no"), ("Nah.", "no"),
    ("correct.", "yes"), ("Correct", "yes"), ("Incorrect.", "no"), ("True.", "yes"), ("False", "no"),
    ("Not really.", "no"), ("Not at all, the image shows a cat.", "no"),
    ("I think yeah.", "yes"), ("Hmm, nope.", "no"),
    # ambiguous stays ambiguous; words that are not answers stay unread
    ("No. Yes.", None), ("Yes. No.", None), ("Nope, yes.", None), ("Yeah or no", None),
    ("Correct answer is hard to say.", None), ("I am not really sure.", None),
    ("Yes. No other objects are visible.", "yes"),  # "No other" starts a sentence, it does not answer
    ("The correct answer is no", "no"),
])
def test_extract_yesno_informal(output, expected):
    assert extract_yesno(output).value == expected


@pytest.mark.parametrize("output, expected", [
    ("The answer is 'B'", "B"), ('Answer: "C"', "C"), ("I would say “D”.", "D"), ("'A'", "A"),
    ("(A) is wrong, (B) is right", "B"), ("A is incorrect, B is correct.", "B"),
    ("(C) can be ruled out. (D) fits the image.", "D"), ("A isn't right; it is C.", "C"),
    ("(A) is not the answer.", None), ("(A) is wrong and (B) is also wrong.", None),
    ("B C", None), ("The answer is B C.", None), ("(B) (C)", None),
    ("Option A is wrong because the square is not red. Option C is also wrong.\nTherefore, the correct answer is (B).",
     "B"),
])
def test_extract_choice_quotes_and_negation(output, expected):
    assert extract_choice(output, OPTS).value == expected


SPATIAL = {"A": "left of the car", "B": "right of the car", "C": "on top of the car", "D": "under the car"}


@pytest.mark.parametrize("output, options, expected", [
    ("It is to the left.", SPATIAL, "A"), ("Left.", SPATIAL, "A"), ("On the right-hand side.", SPATIAL, "B"),
    ("The ball sits at the top.", SPATIAL, "C"), ("underneath", SPATIAL, "D"),
    ("Not on the left, on the right.", SPATIAL, "B"),
    ("Both left and right.", SPATIAL, None),  # two relations, no option names both
    ("top left", {"A": "top left", "B": "top right", "C": "bottom left"}, "A"),
    ("In the upper left corner.", {"A": "top left", "B": "top right", "C": "bottom left"}, "A"),
    ("On the left.", {"A": "left of the tree", "B": "on the left side"}, None),  # two options name it: ambiguous
    ("It is to the left.", OPTS, None),  # non-spatial options are never matched spatially
])
def test_extract_choice_spatial_phrase(output, options, expected):
    ext = extract_choice(output, options)
    assert ext.value == expected
    if expected:
        assert ext.method in ("spatial_phrase", "option_text")
