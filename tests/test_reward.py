"""The hard formatting result reward: format, correctness in many notations, pathological input."""

import time

import pytest

from megatron_vr1.rl.reward import RewardPool, extract_answer, hard_format_result_reward


def fmt(answer: str, think: str = "I work it out.") -> str:
    return f"<think> {think} </think><answer> Final Answer: {answer} </answer>"


RIGHT = [  # (answer as written, gold)
    ("5", "5"), ("5.0", "5"), ("10.00", "10"), ("-70", "-70"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"),
    ("1/2", "0.5"), ("$\\frac{3}{4}$", "0.75"), ("\\dfrac{1}{3}", "1/3"), ("x = 2", "2"), ("x=2", "2"),
    ("30^\\circ", "30"), ("30°", "30"), ("12 cm", "12"), ("\\boxed{7}", "7"), ("\\sqrt{2}", "\\sqrt{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2 + 1", "1 + x^2"), ("\\frac{\\pi}{2}", "\\pi/2"), ("(2, 3)", "(2,3)"),
    ("3.14", "3.14"), ("B", "B"), ("(B)", "B"), ("B.", "B"), ("(B) 15", "B"), ("B) 15", "B"), ("Option C", "C"),
    ("b", "B"), ("A", "(A)"), ("2^{10}", "1024"), ("\\frac{6}{8}", "\\frac{3}{4}"), ("1\\frac{1}{2}", "1.5"),
]
WRONG = [
    ("6", "5"), ("C", "B"), ("(A)", "B"), ("0.51", "0.5"), ("x = 3", "2"), ("three", "3"), ("-5", "5"),
    ("\\frac{1}{3}", "0.5"), ("B", "5"), ("Option D", "A"), ("5 or 6", "5x"), ("", "5"), ("   ", "5"),
]
BAD_FORMAT = [
    "<answer> 5 </answer>",  # no think
    "<think> 5 </think>",  # no answer
    "Sure! <think> a </think><answer> 5 </answer>",  # text before
    "<think> a </think><answer> 5 </answer> Hope that helps.",  # text after </answer>
    "<think> a </think><answer> 5 </answer><answer> 5 </answer>",  # two answers
    "<think> a </think><think> b </think><answer> 5 </answer>",  # two thinks
    "<think><think> a </think></think><answer> 5 </answer>",  # nested
    "<think> a <answer> 5 </answer></think>",  # answer inside think
    "<answer> 5 </answer><think> a </think>",  # wrong order
    "<think> a <answer> 5 </answer>",  # unclosed think
    "<think> a </think><answer> 5",  # unclosed answer
    "<think> a </think> so <answer> 5 </answer>",  # text between
    "<Think> a </Think><answer> 5 </answer>",  # tags are case-sensitive
    "<think> a </think><answer> 5 </answer><|im_end|>",  # a special token is text after </answer>
    "", "   \n ", "5",
    "<think>" * 1000 + "</think><answer> 5 </answer>",
]
WHITESPACE_OK = [
    "\n<think>\nstep one\nstep two\n</think>\n\n<answer>\nFinal Answer: 5\n</answer>\n",
    "  <think>a</think><answer>5</answer>  ",
    "<think></think><answer> FINAL ANSWER: 5 </answer>",
    "<think> a </think>\t<answer>final answer 5</answer>",
]
PATHOLOGICAL = [  # must score 0 quickly, whatever they are
    fmt("9^{9^{9^{9}}}"), fmt("10**10**10"), fmt("2^{2^{2^{2^{2^{2}}}}}"), fmt("99999^{99999999}"),
    fmt("(" * 5000 + "1" + ")" * 5000), fmt("\\frac{" * 300 + "1" + "}{2}" * 300), fmt("7" * 1_000_000),
    fmt("x" * 100_000), "y" * 2_000_000, fmt("\\sqrt{" * 2000 + "2" + "}" * 2000),
    fmt("123456789!"), fmt("10^{100000000}"), fmt("\\binom{10^9}{5*10^8}"),  # sympy computes these in C
    fmt("__import__('os').system('touch {marker}')"), fmt("exec('import os; os.remove(\"{marker}\")')"),
]

CASES = [(fmt(a), g, 1.0) for a, g in RIGHT] + [(fmt(a), g, 0.0) for a, g in WRONG] + \
    [(r, "5", 0.0) for r in BAD_FORMAT] + [(r, "5", 1.0) for r in WHITESPACE_OK] + \
    [(r, "5", 0.0) for r in PATHOLOGICAL]
LIMIT = 1.5  # seconds per response, the pool's 1 s timeout plus its kill margin and bookkeeping


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout=1.0) as p:
        yield p


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("response, gold, expected", CASES,
                         ids=[f"{i}:{c[0][:40]!r}" for i, c in enumerate(CASES)])
def test_reward_case(pool, tmp_path, response, gold, expected):
    marker = tmp_path / "evaluated"
    marker.write_text("untouched")
    response = response.replace("{marker}", str(marker))
    start = time.monotonic()
    info = pool.score([response], [gold])[0]
    assert time.monotonic() - start < LIMIT
    assert info.reward == expected, info
    assert marker.read_text() == "untouched"  # model text is never run


def test_two_hundred_at_once_with_nothing_hung(pool):
    responses = [c[0].replace("{marker}", "/nonexistent") for c in CASES]
    golds = [c[1] for c in CASES]
    many_r = (responses * 4)[:200]
    many_g = (golds * 4)[:200]
    start = time.monotonic()
    infos = pool.score(many_r, many_g)
    elapsed = time.monotonic() - start
    assert [i.reward for i in infos] == [c[2] for c in (CASES * 4)[:200]]
    # two workers; only the few answers that need the hard kill cost a full timeout each
    assert elapsed < 30, elapsed
    assert all(p.is_alive() for p, _ in pool._workers)
    assert pool.timeouts > 0  # some answers needed the hard kill, and the pool carried on


def test_the_module_function_and_the_accuracy_apart_from_format(pool):
    assert hard_format_result_reward(fmt("\\frac{1}{2}"), "0.5") == 1.0
    assert hard_format_result_reward("The answer is <answer> 0.5 </answer>", "0.5") == 0.0
    info = pool.score(["The answer is <answer> Final Answer: 0.5 </answer>"], ["1/2"])[0]
    assert (info.reward, info.format_ok, info.correct) == (0.0, False, True)  # right, but not well-formed
    assert extract_answer("so \\boxed{\\frac{1}{2}} it is") == "\\frac{1}{2}"
    assert extract_answer("<answer> Final Answer: 3 </answer> then <answer>4</answer>") == "4"
    assert extract_answer("no answer here") is None
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        pool.score(["a", "b"], ["1"])
