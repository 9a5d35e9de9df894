"""verifier.py: extraction and equivalence tables, nasty inputs, and property tests."""

import importlib.util
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import cli
from harness.errors import UsageError
from verifier import answer_format, extract_answer, make_reward_fn, normalize, reward, to_number, verify

# (completion, expected extracted answer, expected method)
EXTRACTION = [
    (r"so \boxed{42}", "42", "boxed"),
    (r"first \boxed{1} then \boxed{2}", "2", "boxed"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", "boxed"),
    (r"\boxed {7}", "7", "boxed"),
    (r"\fbox{9}", "9", "boxed"),
    (r"\boxed{a{b{c}}d}", "a{b{c}}d", "boxed"),
    (r"\boxed{3} and an unclosed \boxed{4", "3", "boxed"),
    (r"\boxed{1} then #### 5", "1", "boxed"),
    (r"\boxed{{5}}", "5", "boxed"),
    (r"\boxed{ {{-2/3}} }", "-2/3", "boxed"),
    (r"\boxed{{1}{2}}", "{1}{2}", "boxed"),
    (r"\boxed{{}}", "", "boxed"),
    ("blah\n#### 72", "72", "####"),
    ("#### 1,234\nextra line", "1,234", "####"),
    ("Thus the answer is 18.", "18", "answer is"),
    ("The answer is: $5, since", "5", "answer is"),
    ("So the final answer is -3/4 cups", "-3/4", "answer is"),
    (r"The answer is \frac{1}{2}. Done", r"\frac{1}{2}", "answer is"),
    ("I think 3 plus 4 makes 7.", "7", "last number"),
    ("it costs 1,250 dollars.", "1,250", "last number"),
    ("temperature is \u22125 now", "-5", "last number"),
    ("pi is about 3.14.", "3.14", "last number"),
    ("no digits here", None, "none"),
    ("", None, "none"),
    (r"\boxed{", None, "none"),
]


@pytest.mark.parametrize("completion, expected, method", EXTRACTION)
def test_extraction(completion, expected, method):
    assert extract_answer(completion) == (expected, method)


def test_last_number_fallback_can_be_off():
    assert extract_answer("makes 7", last_number_fallback=False) == (None, "none")
    assert verify("makes 7", "7", last_number_fallback=False).reward == 0.0


# (completion, gold, reward)
EQUIVALENCE = [
    (r"\boxed{42}", "42", 1.0),
    (r"\boxed{42}", "43", 0.0),
    (r"\boxed{1,234}", "1234", 1.0),
    (r"\boxed{1234}", "1,234", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{$18.00}", "18", 1.0),
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (r"\boxed{\tfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{.5}", "0.5", 1.0),
    (r"\boxed{1/3}", "0.3333", 0.0),
    (r"\boxed{1/3}", "0.333333333", 1.0),
    (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    (r"\boxed{\frac{-3}{4}}", "-0.75", 1.0),
    ("\\boxed{\u22127}", "-7", 1.0),
    (r"\boxed{+7}", "7", 1.0),
    (r"\boxed{7.}", "7", 1.0),
    (r"\boxed{7.0}", "7", 1.0),
    (r"\boxed{72 dollars}", "72", 1.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{\text{5 apples}}", "5", 1.0),
    (r"\boxed{ 12 }", "12", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{0}", "0", 1.0),
    (r"\boxed{0.0000001}", "0", 0.0),
    (r"\boxed{1000001}", "1000000", 1.0),  # within the 1e-6 relative tolerance
    (r"\boxed{1000002}", "1000000", 0.0),
    (r"\boxed{x^2+1}", "x^2 + 1", 1.0),
    (r"\boxed{\text{Tuesday}}", "tuesday", 1.0),
    (r"\boxed{B}", "C", 0.0),
    (r"\boxed{\left(1,2\right)}", "(1,2)", 1.0),
    (r"\boxed{}", "0", 0.0),
    (r"\boxed{1/0}", "1/0", 1.0),  # not a number: compared as text
    ("The answer is 18.", "18", 1.0),
    ("The answer is 18 because", "18", 1.0),
    ("I get 17 so the answer is 18.", "17", 0.0),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72", 1.0),
    ("she made 10 dollars", "10", 1.0),
    ("she made 10 dollars", "12", 0.0),
    ("nothing to see", "3", 0.0),
    # gold answers in GSM8K's own format
    (r"\boxed{72}", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 1.0),
    (r"\boxed{10}", "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", 1.0),
    (r"\boxed{5}", "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n#### 5", 1.0),
    (r"\boxed{42}", "Joy can read 8 pages in 20 minutes...\n#### 48", 0.0),
    (r"\boxed{1,800}", "...\n#### 1800", 1.0),
    (r"\boxed{18}", "#### 18", 1.0),
]


@pytest.mark.parametrize("completion, gold, expected", EQUIVALENCE)
def test_equivalence(completion, gold, expected):
    assert reward(completion, gold) == expected


def test_verdict_says_why():
    v = verify(r"work... \boxed{41}", "#### 42")
    assert (v.reward, v.extracted, v.method) == (0.0, "41", "boxed")
    assert "41" in v.reason and "42" in v.reason
    assert verify("nothing", "1").reason == "no final answer found"


def test_normalize_and_to_number():
    assert normalize(r"\$1,234.50") == "1234.50"
    assert to_number("1234.50") == to_number("2469/2")
    assert to_number("(1)/(2)") == to_number("0.5")
    assert to_number("abc") is None
    assert to_number("1" * 500) is None  # too long: compared as a string


def test_reward_fn_backends():
    rule = make_reward_fn("rule")
    assert rule(r"\boxed{3}", "3") == 1.0
    with pytest.raises(ValueError, match="rule"):
        make_reward_fn("sympy")


def test_math_verify_without_its_package_is_one_line_before_any_model_work(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a)
    )
    with pytest.raises(UsageError, match="pip install math-verify"):
        cli.parse(cli.given_flags(["--verifier", "math-verify"]))


NASTY = [
    "{" * 1_000_000,
    "}" * 1_000_000,
    "\\boxed{" * 150_000,
    "\\boxed{" + "{" * 100_000 + "}" * 100_000,
    "{" * 100_000 + "}" * 100_000,
    "9" * 1_000_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "1 " * 500_000,
    "-" * 1_000_000,
    "#" * 1_000_000,
    "answer is " * 100_000,
    "\\frac{" * 100_000,
    "\x00" * 100_000 + "\\boxed{1}",
    "\ud800\udfff \\boxed{\ud800}",
    "1." * 500_000,
    "1," * 500_000,
    " " * 1_000_000 + "\\boxed",
    "\\boxed " + " " * 1_000_000 + "{1}",
]


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_nasty_inputs_are_fast_and_never_raise(text):
    t0 = time.perf_counter()
    v = verify(text, "1")
    verify("\\boxed{1}", text)  # nasty gold, too
    elapsed = time.perf_counter() - t0
    assert v.reward in (0.0, 1.0)
    assert elapsed < 0.1  # two calls; the bench asserts 50 ms per call on its own


def test_huge_equal_digit_strings_compare_as_text():
    big = "9" * 100_000
    v = verify(f"\\boxed{{{big}}}", big)  # the box is longer than MAX_BOX: not read
    assert (v.method, v.reward) == ("last number", 1.0)  # 10^5 digits, compared as text
    assert reward(big, big) == 1.0
    assert reward(big + "8", big) == 0.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=2000), st.text(max_size=200), st.sampled_from([None, "boxed", "####", "answer is"]))
def test_any_text_never_raises(completion, gold, prefer):
    v = verify(completion, gold, prefer=prefer)
    assert v.reward in (0.0, 1.0)


def test_the_format_asked_for_is_read_first_and_the_rest_keep_their_order():
    both = "#### 3\nso \\boxed{4}, and the answer is 5."
    assert [extract_answer(both, prefer=p) for p in (None, "boxed", "####", "answer is")] == [
        ("4", "boxed"),
        ("4", "boxed"),
        ("3", "####"),
        ("5", "answer is"),
    ]
    assert extract_answer("#### 3 then \\boxed{4}", prefer="answer is") == ("4", "boxed")  # the rest in order
    assert extract_answer("no stated answer, 7 apples", prefer="answer is") == ("7", "last number")
    assert [
        answer_format(t) for t in ("Put it in \\boxed{}.", "End with: The answer is <n>.", "#### n", "Hi.")
    ] == [
        "boxed",
        "answer is",
        "####",
        None,
    ]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integers_round_trip_in_every_format(n):
    gold = f"#### {n}"
    assert reward(f"\\boxed{{{n}}}", gold) == 1.0
    assert reward(f"\\boxed{{{n:,}}}", gold) == 1.0
    assert reward(f"The answer is {n}.", gold) == 1.0
    assert reward(f"\\boxed{{{n + 1}}}", gold) == (1.0 if abs(n) >= 10**6 else 0.0)  # 1e-6 relative tolerance


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 999), st.integers(1, 999))
def test_fractions_equal_their_decimals(a, b):
    assert reward(f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"{a}/{b}") == 1.0
    assert reward(f"\\boxed{{{a / b:.12f}}}", f"{a}/{b}") == 1.0
