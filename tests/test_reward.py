"""The hard formatting result reward: format, correctness in many notations, what cannot be gamed
(anagrams, hedges, near misses), pathological input, and a pool that is warm before its first
deadline."""

import os
import random
import signal
import threading
import subprocess
import sys
import time

import pytest

from megatron_vr1.rl.reward import (RewardPool, _cpu_seconds, answer_of, extract_answer, hard_format_result_reward,
                                    is_equivalent, score)


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
    "  <think>a</think><answer>Final Answer:5</answer>  ",
    "<think></think><answer> Final Answer:  5 </answer>",
    "<think> a </think>\t<answer>Final Answer: 5</answer>",
]
# without "Final Answer:" as Vision-R1 spells it: well-formed only with require_final_answer=false
LOOSE_FINAL = [
    "  <think>a</think><answer>5</answer>  ",
    "<think></think><answer> FINAL ANSWER: 5 </answer>",
    "<think> a </think>\t<answer>final answer 5</answer>",
    "<think> a </think><answer> Final answer 5 </answer>",
]
# what a policy finds when the reward pays for it: each must earn nothing
GAMED = [
    ("erd", "red"), ("der", "red"), ("eulb", "blue"), ("nerge", "green"), ("on", "no"), ("sey", "yes"),
    ("elprup", "purple"), ("ergna", "range"), ("tca", "cat"), ("god", "dog"),  # anagrams of word answers
    ("5 or 6", "5"), ("5, 6", "5"), ("5; 6", "5"), ("5 and 6", "5"), ("either 5 or 6", "5"), ("\\pm 4", "4"),
    ("x = \\pm 2", "2"), ("\\{4, -4\\}", "4"), ("4, -4", "4"), ("\\boxed{5} \\boxed{6}", "5"),
    ("5 \\text{ or } 6", "5"), ("5 \\lor 6", "5"), ("5\\\\6", "5"), ("A or B", "A"), ("A, B", "A"),
    ("A/B", "A"), ("(A) or (C)", "A"), ("A and D", "A"), ("red or blue", "red"), ("red, blue", "red"),  # hedges
    ("6 = 5", "5"), ("2x = 10", "5"), ("x > 5", "5"), ("x \\geq 5", "5"),  # relations that are not the value
    ("5.1", "5"), ("4.99", "5"), ("50", "5"), ("-5", "5"), ("\\frac{1}{3}", "0.33"), ("0.249", "\\frac{1}{4}"),
    ("12 apples", "12"), ("12 red", "12 erd"), ("3", "three"), ("three", "3"), ("blue light", "light blue"),
]
# word answers compare as words, up to case, surrounding whitespace, a full stop and \text{}
WORDS_RIGHT = [
    ("red", "red"), ("Red", "red"), (" RED ", "red"), ("red.", "red"), ("\\text{red}", "red"),
    ("\\text{Red}.", "red"), ("$\\text{red}$", "red"), ("Light Blue", "light blue"), ("yes", "Yes"),
    ("infinity", "\\infty"),
]
# mathematical equivalence still counts
MATH_RIGHT = [
    ("a+b", "b+a"), ("0.25", "\\frac{1}{4}"), ("6.0", "6"), ("x = 2", "2"), ("x_1 = 2", "2"), ("AB = 5", "5"),
    ("1,000", "1000"), ("5 or 6", "5 or 6"), ("3, 2", "2, 3"), ("\\{2, 1\\}", "\\{1, 2\\}"), ("\\pm 2", "\\pm 2"),
    ("12 \\text{ cm}", "12"), ("3\\pi", "3 \\pi"), ("(B) 15", "B"), ("B. The answer is B", "B"),
]
PATHOLOGICAL = [  # must score 0 quickly, whatever they are
    fmt("9^{9^{9^{9}}}"), fmt("10**10**10"), fmt("2^{2^{2^{2^{2^{2}}}}}"), fmt("99999^{99999999}"),
    fmt("(" * 5000 + "1" + ")" * 5000), fmt("\\frac{" * 300 + "1" + "}{2}" * 300), fmt("7" * 1_000_000),
    fmt("x" * 100_000), "y" * 2_000_000, fmt("\\sqrt{" * 2000 + "2" + "}" * 2000),
    fmt("123456789!"), fmt("10^{100000000}"), fmt("\\binom{10^9}{5*10^8}"),  # sympy computes these in C
    fmt("__import__('os').system('touch {marker}')"), fmt("exec('import os; os.remove(\"{marker}\")')"),
]

CASES = [(fmt(a), g, 1.0) for a, g in RIGHT + WORDS_RIGHT + MATH_RIGHT] + \
    [(fmt(a), g, 0.0) for a, g in WRONG + GAMED] + [(r, "5", 0.0) for r in BAD_FORMAT + LOOSE_FINAL] + \
    [(r, "5", 1.0) for r in WHITESPACE_OK] + [(r, "5", 0.0) for r in PATHOLOGICAL]
# the pool's deadline is 1 CPU second per response (plus a 0.2 s kill margin); in wall seconds a
# response is bounded by its backstop, 4 s here, however busy the machine is
WALL_LIMIT = 4.0
LIMIT = WALL_LIMIT + 0.5  # wall seconds per response: the backstop plus killing and replacing a worker


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout=1.0, wall_limit=WALL_LIMIT) as p:
        yield p


def test_there_are_enough_cases():
    assert len(CASES) >= 60
    assert len(GAMED) >= 40


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
    assert hard_format_result_reward(fmt("erd"), "red") == 0.0
    assert hard_format_result_reward("The answer is <answer> 0.5 </answer>", "0.5") == 0.0
    info = pool.score(["The answer is <answer> Final Answer: 0.5 </answer>"], ["1/2"])[0]
    assert (info.reward, info.format_ok, info.correct) == (0.0, False, True)  # right, but not well-formed
    assert extract_answer("so \\boxed{\\frac{1}{2}} it is") == "\\frac{1}{2}"
    assert extract_answer("<answer> Final Answer: 3 </answer> then <answer>4</answer>") == "4"
    assert extract_answer("no answer here") is None
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        pool.score(["a", "b"], ["1"])


def test_without_final_answer_required_the_loose_spellings_are_well_formed():
    with RewardPool(workers=1, timeout=1.0, require_final_answer=False) as loose:
        infos = loose.score(LOOSE_FINAL + WHITESPACE_OK + BAD_FORMAT[:3], ["5"] * (len(LOOSE_FINAL) + len(WHITESPACE_OK) + 3))
    assert [i.reward for i in infos] == [1.0] * (len(LOOSE_FINAL) + len(WHITESPACE_OK)) + [0.0] * 3


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))


def test_no_two_different_words_earn_the_reward():
    """A property over random pairs of different words (a third of them anagrams of each other,
    in varied case and with the wrappers the comparison ignores): none is equivalent, and through
    the reward none is paid."""
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 600:
        gold = _word(rng)
        if len(pairs) % 3 == 0:
            letters = list(gold)
            rng.shuffle(letters)
            said = "".join(letters)
        else:
            said = _word(rng)
        if said == gold:
            continue
        said = rng.choice([said, said.upper(), said.capitalize(), f"\\text{{{said}}}", f"{said}.", f" {said} "])
        pairs.append((said, gold))
    assert not [p for p in pairs if is_equivalent(*p)]
    assert all(score(fmt(s), g).reward == 0.0 for s, g in pairs[:150])
    assert all(score(fmt(g.upper()), g).reward == 1.0 for _, g in pairs[:50])  # the same word always is


def test_what_the_reward_calls_well_formed_the_evaluation_reads_alike():
    """Random responses built from the format's pieces (tags, whitespace, "Final Answer:" in its
    spellings, stray text): wherever the reward calls a response well-formed, the evaluation
    (megatron_vr1.eval) extracts the very answer the reward judged, and agrees on correctness."""
    from megatron_vr1.eval import extract_answer as eval_extract, is_correct

    rng = random.Random(1)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "Final Answer:", "final answer",
              "FINAL ANSWER:", "Final Answer: ", "5", "red", "I think", "<answer>", "\\boxed{5}", "x = 5"]
    skeleton = ["<think>", " a ", "</think>", "<answer>", "Final Answer:", " 5 ", "</answer>"]
    seen = 0
    for _ in range(3000):
        parts = list(skeleton)
        for _ in range(rng.randint(0, 3)):  # mutate: insert, drop or replace pieces
            k = rng.randrange(len(parts) + 1)
            op = rng.random()
            if op < 0.4:
                parts.insert(k, rng.choice(pieces))
            elif op < 0.7 and k < len(parts):
                parts.pop(k)
            elif k < len(parts):
                parts[k] = rng.choice(pieces)
        response = "".join(parts)
        for gold in ("5", "red"):
            for strict in (True, False):
                answer = answer_of(response, strict)
                info = score(response, gold, strict)
                assert info.format_ok == (answer is not None)
                if answer is None:
                    continue
                seen += 1
                assert eval_extract(response) == answer, response
                assert is_correct(eval_extract(response), {"answer": gold}) == info.correct, response
    assert seen > 1000


def test_a_fresh_pool_on_a_loaded_cpu_scores_every_right_answer_in_its_first_call():
    """Four busy processes on this machine's cores, then a fresh four-worker pool: its very first
    call pays every right answer (a cold start's imports never count against a deadline)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        time.sleep(1.0)
        right = [(fmt(a), g) for a, g in (RIGHT + MATH_RIGHT + WORDS_RIGHT)[:16]]
        with RewardPool(workers=4, timeout=1.0) as fresh:
            infos = fresh.score([r for r, _ in right], [g for _, g in right])
            assert [i.reward for i in infos] == [1.0] * 16, infos
            assert fresh.timeouts == 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_the_deadline_counts_the_workers_cpu_time_not_the_wall_clock():
    """A worker that gets no CPU for twice the deadline (stopped, as on a node busy with other
    work) still pays its right answer: the limit is CPU seconds. A stall past the wall-clock
    backstop frees the worker, scores 0, and the pool carries on."""
    right, gold = fmt("5"), "5"
    with RewardPool(workers=1, timeout=0.5, grace=0.1, wall_limit=4.0) as one:
        pid = one._workers[0][0].pid
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(1.5, os.kill, (pid, signal.SIGCONT))
        resume.start()
        start = time.monotonic()
        infos = one.score([right], [gold])
        elapsed = time.monotonic() - start
        resume.join()
        assert elapsed >= 1.4, elapsed  # it waited for the stopped worker, past the 0.6 s in wall time
        assert [i.reward for i in infos] == [1.0] and one.timeouts == 0
        assert one._workers[0][0].pid == pid

        os.kill(pid, signal.SIGSTOP)  # now it never comes back: the backstop frees the pool
        start = time.monotonic()
        infos = one.score([right], [gold])
        elapsed = time.monotonic() - start
        assert 4.0 <= elapsed < 8.0, elapsed
        assert infos[0].reward == 0.0 and infos[0].timed_out and one.timeouts == 1
        assert one._workers[0][0].pid != pid
        assert [i.reward for i in one.score([right], [gold])] == [1.0]  # the replacement scores


def test_a_pathological_answer_costs_at_most_the_deadline_in_cpu_seconds():
    """Measured in the worker's CPU seconds (so on any load): each pathological answer, cut by
    the worker's own alarm or by a kill, costs no more than the deadline plus the kill margin
    and the pool's polling."""
    with RewardPool(workers=1, timeout=0.5, grace=0.1, wall_limit=10.0) as one:
        for response in PATHOLOGICAL:
            pid = one._workers[0][0].pid
            before, reaped = _cpu_seconds(pid), os.times()
            info = one.score([response.replace("{marker}", "/nonexistent")], ["5"])[0]
            if one._workers[0][0].pid == pid:  # still alive: its own CPU clock
                used = _cpu_seconds(pid) - before
            else:  # killed and reaped: its whole life's CPU time moved to our children's
                after = os.times()
                used = after.children_user + after.children_system - reaped.children_user - reaped.children_system
                used -= before
            assert info.reward == 0.0
            assert used < 0.5 + 0.1 + 0.2, (response[:60], used)


def test_a_wall_limit_below_the_deadline_is_refused():
    with pytest.raises(ValueError, match="wall_limit 0.5 is below timeout \\+ grace"):
        RewardPool(workers=1, timeout=1.0, wall_limit=0.5)


def test_a_step_with_many_timeouts_warns():
    from megatron_vr1.rl.reward import RewardInfo, RewardSettings, timeout_warning

    settings = RewardSettings(timeout=1.0, warn_timeout_share=0.1)
    ok, late = RewardInfo(1.0, True, True), RewardInfo(0.0, True, False, timed_out=True)
    assert timeout_warning(3, [ok] * 9 + [late], settings) is None  # 10%: at the share, no warning
    line = timeout_warning(3, [ok] * 8 + [late] * 2, settings)
    assert line == ("grpo: warning: step 3: 2 of 10 responses ran out of the 1 s scoring time and were paid 0; "
                    "raise rl.reward.timeout or rl.reward.workers")
    assert timeout_warning(1, [], settings) is None
