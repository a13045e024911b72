"""Answer extraction and scoring in the three benchmarks' styles (hand-written responses)."""

import json

import pytest

from megatron_vr1.eval import benchmark_of, extract_answer, is_correct

# ---- extraction: (response, expected extraction)
EXTRACTION = [
    ("<think> 3+4 </think><answer> Final Answer: 7 </answer>", "7"),
    ("<think>x</think> <answer>Final Answer:(B)</answer>", "(B)"),
    ("<think>x</think><answer> final answer: \\frac{1}{2} </answer>", "\\frac{1}{2}"),
    ("<answer> 12.5 </answer>", "12.5"),
    ("<think>a</think><answer> 1 </answer> then <answer> 2 </answer>", "2"),
    ("The area is \\boxed{24}.", "24"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("nested \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
    ("<think> no answer at all", None),
    ("just text, 42", None),
    ("", None),
    ("<answer> Final Answer: 5 ", None),  # never closed: no answer tag, no box
    ("unclosed \\boxed{5", None),
    ("<think>t</think><answer>\n  Final Answer:  30^\\circ \n</answer>", "30^\\circ"),
    ("<think>t</think><answer>Final Answer: C) 45</answer>", "C) 45"),
    ("<think>t</think><answer>Final Answer：8</answer>", "8"),  # full-width colon
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def mathvista_mc(answer, choices, pid="1"):
    return {"pid": pid, "question_type": "multi_choice", "answer_type": "text", "choices": choices,
            "precision": None, "answer": answer, "metadata": {"task": "geometry problem solving",
                                                                "skills": ["geometry reasoning"]}}


def mathvista_free(answer, answer_type, precision=None):
    return {"pid": "2", "question_type": "free_form", "answer_type": answer_type, "choices": None,
            "precision": precision, "answer": answer, "metadata": {"task": "math word problem", "skills": []}}


ANGLES = ["30°", "45°", "60°", "90°"]
MATHVISTA = [
    # multiple choice: letter, "(C) text", text, near text, lower-case letter (official: by edit distance)
    ("C", mathvista_mc("60°", ANGLES), True),
    ("(C)", mathvista_mc("60°", ANGLES), True),
    ("(C) 60°", mathvista_mc("60°", ANGLES), True),
    ("(c) 60°", mathvista_mc("60°", ANGLES), True),
    ("60°", mathvista_mc("60°", ANGLES), True),
    ("60", mathvista_mc("60°", ANGLES), True),
    ("B", mathvista_mc("60°", ANGLES), False),
    ("(A) 30°", mathvista_mc("60°", ANGLES), False),
    ("45°", mathvista_mc("60°", ANGLES), False),
    ("E", mathvista_mc("60°", ANGLES), False),
    ("Yes", mathvista_mc("Yes", ["Yes", "No"]), True),
    ("no", mathvista_mc("Yes", ["Yes", "No"]), False),
    ("A", mathvista_mc("Yes", ["Yes", "No"]), True),
    ("the larger one", mathvista_mc("larger", ["larger", "smaller"]), True),
    # integers written as floats, with units or words around them
    ("5", mathvista_free("5", "integer"), True),
    ("5.0", mathvista_free("5", "integer"), True),
    ("5.00", mathvista_free("5", "integer"), True),
    ("5.9", mathvista_free("5", "integer"), True),  # official: int(float(x)) truncates
    ("6", mathvista_free("5", "integer"), False),
    ("-3.0", mathvista_free("-3", "integer"), True),
    ("5 cm", mathvista_free("5", "integer"), False),  # official: not a number, no credit
    ("five", mathvista_free("5", "integer"), False),
    ("1e3", mathvista_free("1000", "integer"), True),
    # floats at several precisions
    ("1.45", mathvista_free("1.45", "float", 2), True),
    ("1.449", mathvista_free("1.45", "float", 2), True),
    ("1.4", mathvista_free("1.45", "float", 2), False),
    ("1.2", mathvista_free("1.2", "float", 1), True),
    ("1.24", mathvista_free("1.2", "float", 1), True),
    ("1.26", mathvista_free("1.2", "float", 1), False),
    ("0.333", mathvista_free("0.33", "float", 2), True),
    ("3.14159", mathvista_free("3.142", "float", 3), True),
    ("3.1", mathvista_free("3.142", "float", 3), False),
    ("\\frac{1}{3}", mathvista_free("0.33", "float", 2), False),  # official: float() fails
    # text and list answers: string equality
    ("[1, 2, 3]", mathvista_free("[1, 2, 3]", "list"), True),
    ("[1,2,3]", mathvista_free("[1, 2, 3]", "list"), False),
    ("Paris", mathvista_free("Paris", "text"), True),
]


@pytest.mark.parametrize("prediction,record,expected", MATHVISTA)
def test_mathvista_official_rules(prediction, record, expected):
    assert benchmark_of(record) == "mathvista"
    assert is_correct(prediction, record) is expected


def mathverse(answer, question_type, question="", version="Vision Only"):
    return {"sample_index": "1", "problem_index": "1", "problem_version": version, "question": question,
            "answer": answer, "question_type": question_type,
            "metadata": {"subject": "plane geometry", "subfield": "angle"}}


CHOICES_Q = "As shown in the figure, find the angle ABC.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°"
MATHVERSE = [
    ("B", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("(B)", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("b", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("B: 45°", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("(B) 45°", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("B. 45", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("45°", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("45^\\circ", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("C", mathverse("B", "multi-choice", CHOICES_Q), False),
    ("(C) 60°", mathverse("B", "multi-choice", CHOICES_Q), False),
    ("60°", mathverse("B", "multi-choice", CHOICES_Q), False),
    ("Option B", mathverse("B", "multi-choice", CHOICES_Q), True),
    ("B", mathverse("(B)", "multi-choice", CHOICES_Q), True),
    ("", mathverse("B", "multi-choice", CHOICES_Q), False),
    ("12", mathverse("12", "free-form"), True),
    ("12.0", mathverse("12", "free-form"), True),
    ("x = 12", mathverse("12", "free-form"), True),
    ("\\frac{3}{4}", mathverse("0.75", "free-form"), True),
    ("3/4", mathverse("\\frac{3}{4}", "free-form"), True),
    ("2\\sqrt{3}", mathverse("\\sqrt{12}", "free-form"), True),
    ("13", mathverse("12", "free-form"), False),
    ("120^\\circ", mathverse("120", "free-form"), True),
    ("\\frac{\\pi}{3}", mathverse("\\frac{\\pi}{3}", "free-form"), True),
    ("\\frac{\\pi}{4}", mathverse("\\frac{\\pi}{3}", "free-form"), False),
]


@pytest.mark.parametrize("prediction,record,expected", MATHVERSE)
def test_mathverse(prediction, record, expected):
    assert benchmark_of(record) == "mathverse"
    assert is_correct(prediction, record) is expected


def mm_math(answer):
    return {"question": "...", "answer": answer, "difficulty": "middle", "year": 2021}


MM_MATH = [
    ("6", mm_math("6"), True),
    ("6.0", mm_math("6"), True),
    ("\\frac{12}{2}", mm_math("6"), True),
    ("7", mm_math("6"), False),
    ("\\dfrac{1}{2}", mm_math("\\frac{1}{2}"), True),
    ("0.5", mm_math("\\frac{1}{2}"), True),
    ("2^{3}", mm_math("8"), True),
    ("3\\sqrt{2}", mm_math("\\sqrt{18}"), True),
    ("\\sqrt{17}", mm_math("\\sqrt{18}"), False),
    ("x=4", mm_math("4"), True),
    ("y = -2", mm_math("-2"), True),
    ("2", mm_math("-2"), False),
    ("36^{\\circ}", mm_math("36°"), True),
    ("9^{9^{9^{9}}}", mm_math("9"), False),
    ("1" * 5000, mm_math("1"), False),
]


@pytest.mark.parametrize("prediction,record,expected", MM_MATH)
def test_mm_math(prediction, record, expected):
    assert benchmark_of(record) == "mm-math"
    assert is_correct(prediction, record) is expected


@pytest.mark.parametrize("record", [mathvista_mc("60°", ANGLES), mathverse("B", "multi-choice", CHOICES_Q),
                                    mm_math("6")])
@pytest.mark.parametrize("prediction", [None, "", "   "])
def test_missing_answers_are_wrong(prediction, record):
    assert is_correct(prediction, record) is False


def test_responses_end_to_end():
    """Whole responses, extraction then scoring, as the runner does it."""
    cases = [
        ("<think> angle sum </think><answer> Final Answer: (C) 60° </answer>", mathvista_mc("60°", ANGLES), True),
        ("<think> so </think><answer> Final Answer: 5.0 </answer>", mathvista_free("5", "integer"), True),
        ("<think> so </think>", mathvista_free("5", "integer"), False),
        ("The answer is \\boxed{B}", mathverse("B", "multi-choice", CHOICES_Q), True),
        ("<think>t</think><answer>Final Answer: \\frac{1}{2}</answer>", mm_math("0.5"), True),
        ("<think>t</think><answer></answer>", mm_math("0.5"), False),
    ]
    for response, record, expected in cases:
        assert is_correct(extract_answer(response), record) is expected, response


def test_benchmark_names():
    assert benchmark_of({"benchmark": "MathVista", "answer": "1"}) == "mathvista"
    assert benchmark_of({"benchmark": "MM_Math", "answer": "1"}) == "mm-math"
    assert benchmark_of({"benchmark": "math-verse", "answer": "1"}) == "mathverse"


# ---- the runner: a toy model's checkpoints on the demo generator's eval records

@pytest.fixture(scope="module")
def toy_checkpoints(tmp_path_factory, toy_tokenizer_dir):
    """A random toy model as a Megatron checkpoint (with its tokenizer in hf_assets), the HF
    folder exported from it, and eval records (demo generator, MathVista-shaped)."""
    import shutil

    from megatron_vr1.checkpoint import hf_to_mcore, mcore_to_hf
    from megatron_vr1.config import load_model_conf
    from megatron_vr1.data.demo import generate
    from omegaconf import OmegaConf
    from tiny import hf_model

    root = tmp_path_factory.mktemp("eval")
    hf_config = OmegaConf.to_container(load_model_conf("toy").hf_config, resolve=True)
    hf_model(hf_config, seed=3).save_pretrained(root / "hf_init")
    for f in toy_tokenizer_dir.iterdir():
        shutil.copy(f, root / "hf_init" / f.name)
    hf_to_mcore(root / "hf_init", root / "mcore", dtype="fp32")
    mcore_to_hf(root / "mcore", root / "hf_export")
    generate(root / "data", n_sft=0, n_rl=0, n_eval=12, seed=0)
    return root


def _eval(out, checkpoint, data, **kw):
    from megatron_vr1.eval.runner import evaluate

    options = dict(temperature=0.0, max_new_tokens=12, batch_size=4, progress=False)
    return evaluate(checkpoint=str(checkpoint), data=str(data), out=str(out), **{**options, **kw})


def _rows(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_hf_export_evaluates_as_the_megatron_checkpoint(toy_checkpoints, tmp_path):
    root = toy_checkpoints
    _eval(tmp_path / "mcore", root / "mcore", root / "data" / "eval.jsonl")
    _eval(tmp_path / "hf", root / "hf_export", root / "data" / "eval.jsonl")
    a, b = _rows(tmp_path / "mcore"), _rows(tmp_path / "hf")
    assert len(a) == 12 and [r["index"] for r in a] == list(range(12))
    strip = lambda rows: [(r["index"], r["response"], r["extraction"], r["correct"]) for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert any(r["response"] for r in a)  # something was generated
    summary = (tmp_path / "hf" / "summary.md").read_text()
    assert "mathvista" in summary and "Vision-R1-7B" in summary and str(root / "hf_export") in summary


def test_megatron_engine_evaluates_as_the_hf_engine(toy_checkpoints, tmp_path):
    """engine=megatron (megatron-core's generation loop), from the Megatron checkpoint and from
    the HF folder: the hf engine's greedy responses and scores, record for record."""
    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    _eval(tmp_path / "hf", root / "mcore", data)
    want = [(r["index"], r["response"], r["correct"]) for r in _rows(tmp_path / "hf")]
    for name, checkpoint in (("mcore", root / "mcore"), ("export", root / "hf_export")):
        summary = _eval(tmp_path / name, checkpoint, data, engine="megatron")
        assert [(r["index"], r["response"], r["correct"]) for r in _rows(tmp_path / name)] == want, name
        assert summary["settings"]["engine"] == "megatron"
    assert sum(len(r[1]) for r in want) > 50


def test_several_samples_per_record(toy_checkpoints, tmp_path):
    """samples=k: k responses per record (one line each), accuracy their mean over every sample,
    pass@k the share of records with a right one; the same seed gives the same samples; greedy
    samples are all one response; samples < 1 is refused."""
    from megatron_vr1.errors import UsageError

    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    summary = _eval(tmp_path / "s", root / "mcore", data, temperature=1.0, samples=3, limit=4, seed=5)
    rows = _rows(tmp_path / "s")
    assert [(r["index"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in range(3)]
    assert len({r["response"] for r in rows}) > 4  # sampled: the samples of a record differ
    entry = summary["benchmarks"]["mathvista"]
    assert (entry["records"], entry["overall"]["n"]) == (4, 12)
    assert entry["overall"]["accuracy"] == pytest.approx(100 * sum(r["correct_first_attempt"] for r in rows) / 12)
    right = {r["index"] for r in rows if r["correct_first_attempt"]}
    assert entry["pass_at_k"] == pytest.approx(100 * len(right) / 4)
    _eval(tmp_path / "again", root / "mcore", data, temperature=1.0, samples=3, limit=4, seed=5)
    assert [r["response"] for r in _rows(tmp_path / "again")] == [r["response"] for r in rows]
    _eval(tmp_path / "g", root / "mcore", data, samples=2, limit=2)
    greedy = _rows(tmp_path / "g")
    assert greedy[0]["response"] == greedy[1]["response"] and greedy[2]["response"] == greedy[3]["response"]
    with pytest.raises(UsageError, match="samples must be >= 1"):
        _eval(tmp_path / "none", root / "mcore", data, samples=0)


def test_an_out_folder_of_another_evaluation_is_refused(toy_checkpoints, tmp_path):
    """Rerunning into an out folder resumes only the evaluation that made it: another checkpoint
    or other sampling settings are refused before anything is generated, and a run directory as
    checkpoint= takes its newest complete checkpoint."""
    import shutil

    from megatron_vr1.errors import UsageError

    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    out = tmp_path / "out"
    _eval(out, root / "mcore", data, limit=2)
    before = (out / "samples.jsonl").read_text()
    _eval(out, root / "mcore", data, limit=2)  # the same evaluation: resumes, nothing to do
    for other, differ in (({"temperature": 0.5}, "temperature"), ({"checkpoint": root / "hf_export"}, "checkpoint"),
                          ({"samples": 2}, "samples")):
        kw = {"checkpoint": root / "mcore", **other}
        with pytest.raises(UsageError, match=rf"holds an evaluation made with other settings \({differ} differ\)"):
            _eval(out, kw.pop("checkpoint"), data, limit=2, **kw)
    assert (out / "samples.jsonl").read_text() == before
    run_dir = tmp_path / "run"
    shutil.copytree(root / "mcore", run_dir / "iter_0000007")
    (run_dir / "iter_0000009").mkdir()  # not complete: no metadata
    summary = _eval(tmp_path / "from_run", run_dir, data, limit=2)
    assert summary["settings"]["checkpoint"] == str(run_dir / "iter_0000007")


def _published_parquets(folder):
    """MathVista testmini, MathVerse testmini and MathVerse's text-only split as their published
    parquet files have them: the images embedded (MathVista's ``image`` is a path it does not ship,
    its pixels are ``decoded_image``), the benchmarks' own prompt fields, nothing else on disk."""
    import datasets
    from PIL import Image

    folder.mkdir()
    img = [Image.new("RGB", (84 + 28 * i, 56), (40 * i, 100, 200)) for i in range(3)]
    meta = datasets.Features({"category": datasets.Value("string"), "task": datasets.Value("string"),
                              "skills": datasets.Sequence(datasets.Value("string")),
                              "grade": datasets.Value("string")})
    mathvista = datasets.Features({
        "pid": datasets.Value("string"), "question": datasets.Value("string"), "image": datasets.Value("string"),
        "decoded_image": datasets.Image(), "choices": datasets.Sequence(datasets.Value("string")),
        "unit": datasets.Value("string"), "precision": datasets.Value("float64"), "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"), "answer_type": datasets.Value("string"), "metadata": meta,
        "query": datasets.Value("string")})
    m = {"category": "math-targeted-vqa", "task": "geometry problem solving", "skills": ["algebraic reasoning"],
         "grade": "high school"}
    datasets.Dataset.from_dict({
        "pid": ["1", "2", "3"], "question": ["Which is longer?", "How many bars?", "What is x?"],
        "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"], "decoded_image": img,
        "choices": [["AB", "CD"], None, None], "unit": [None, None, "cm"], "precision": [None, None, 1.0],
        "answer": ["CD", "3", "2.5"], "question_type": ["multi_choice", "free_form", "free_form"],
        "answer_type": ["text", "integer", "float"], "metadata": [m, m, m],
        "query": ["Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at "
                  "the end.\nQuestion: Which is longer?\nChoices:\n(A) AB\n(B) CD",
                  "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., "
                  "1, 2, 3, at the end.\nQuestion: How many bars?",
                  "Hint: Please answer the question requiring a floating-point number with one decimal place and "
                  "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is x?"]},
        features=mathvista).to_parquet(folder / "mathvista_testmini.parquet")
    mv_meta = datasets.Features({"split": datasets.Value("string"), "source": datasets.Value("string"),
                                 "subject": datasets.Value("string"), "subfield": datasets.Value("string")})
    mv = {"sample_index": datasets.Value("string"), "problem_index": datasets.Value("string"),
          "problem_version": datasets.Value("string"), "question": datasets.Value("string"),
          "answer": datasets.Value("string"), "question_type": datasets.Value("string"), "metadata": mv_meta,
          "query_wo": datasets.Value("string"), "query_cot": datasets.Value("string")}
    mm = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    rows = {"sample_index": ["1", "2"], "problem_index": ["1", "1"], "problem_version": ["Text Dominant",
                                                                                          "Vision Only"],
            "question": ["In the figure, find angle A.\nChoices:\nA:30°\nB:45°", ""], "answer": ["B", "B"],
            "question_type": ["multi-choice", "multi-choice"], "metadata": [mm, mm],
            "query_wo": ["Please directly answer the question and provide the correct option letter.\nQuestion: "
                         "find angle A", "Please directly answer the question and provide the correct option letter."],
            "query_cot": ["Please first conduct reasoning, and then answer the question and provide the correct "
                          "option letter.\nQuestion: find angle A\nChoices:\nA:30°\nB:45°",
                          "Please first conduct reasoning, and then answer the question and provide the correct "
                          "option letter."]}
    datasets.Dataset.from_dict({**rows, "image": img[:2]}, features=datasets.Features({**mv, "image": datasets.Image()})
                               ).to_parquet(folder / "mathverse_testmini.parquet")
    text_only = {k: v[:1] for k, v in rows.items()}
    text_only["problem_version"] = ["Text Only"]
    datasets.Dataset.from_dict(text_only, features=datasets.Features(mv)).to_parquet(
        folder / "mathverse_testmini_text_only.parquet")
    return folder


def test_published_benchmark_files_evaluate_as_released(toy_checkpoints, tmp_path):
    """Each published parquet alone in a folder (and MM-Math's JSONL beside its image folder):
    every record is generated and scored, ids are the benchmarks' own (pid, sample_index,
    file_name), and the prompt is the benchmark's own (prompt=auto)."""
    from PIL import Image

    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.data.formats import EvalDataset
    from megatron_vr1.models.qwen2_5_vl import Qwen25VLArgs

    folder = _published_parquets(tmp_path / "bench")
    expect = {"mathvista_testmini": ("mathvista", ["1", "2", "3"], "Hint: Please answer the question requiring"),
              "mathverse_testmini": ("mathverse", ["1", "2"], "Please first conduct reasoning"),
              "mathverse_testmini_text_only": ("mathverse", ["1"], "Please first conduct reasoning")}
    # MM-Math as released: JSONL, its images in a folder by file_name, the answer in the solution's box
    (folder / "images").mkdir()
    Image.new("RGB", (84, 84), (90, 90, 90)).save(folder / "images" / "q1.png")
    (folder / "mm_math.jsonl").write_text(json.dumps({
        "question": "In the figure, AB = 3 and BC = 4. Find AC.", "file_name": "q1.png",
        "solution": "By Pythagoras, AC = \\sqrt{9 + 16}, so the answer is \\boxed{5}.", "year": "2021",
        "difficult": "0.6", "knowledge": "Pythagorean theorem"}) + "\n")
    summary = _eval(tmp_path / "mm_math", toy_checkpoints / "mcore", folder / "mm_math.jsonl", max_new_tokens=6,
                    image_root=str(folder / "images"))
    (row,) = _rows(tmp_path / "mm_math")
    assert (row["id"], row["answer"], row["benchmark"], row["difficult"], row["knowledge"]) == (
        "q1.png", "5", "mm-math", "0.6", "Pythagorean theorem")
    assert set(summary["benchmarks"]["mm-math"]["categories"]) == {"difficult", "year", "knowledge"}
    for name, (bench, ids, hint) in expect.items():
        summary = _eval(tmp_path / name, toy_checkpoints / "mcore", folder / f"{name}.parquet", max_new_tokens=6)
        rows = _rows(tmp_path / name)
        assert [r["id"] for r in rows] == ids and all(r["benchmark"] == bench for r in rows), name
        assert summary["benchmarks"][bench]["records"] == len(ids)
        assert summary["settings"]["prompt"] == "auto"
    tok = load_tokenizer(toy_checkpoints / "mcore" / "hf_assets")
    args = Qwen25VLArgs.from_hf_config(json.loads((toy_checkpoints / "hf_export" / "config.json").read_text()))
    mathvista = list(EvalDataset(folder / "mathvista_testmini.parquet", tok, args))
    text = tok.decode(mathvista[0].sample.input_ids)
    assert "Hint: Please answer the question and provide the correct option letter" in text and "(B) CD" in text
    assert "Choices:\nA. AB" not in text  # the benchmark's prompt lists the choices already
    assert int(mathvista[0].sample.image_grid_thw.prod()) == (56 // 14) * (84 // 14)  # the embedded pixels
    plain = list(EvalDataset(folder / "mathvista_testmini.parquet", tok, args, prompt="question"))
    assert "Which is longer?\nChoices:\nA. AB\nB. CD" in tok.decode(plain[0].sample.input_ids)
    verse = list(EvalDataset(folder / "mathverse_testmini.parquet", tok, args, prompt="query_wo"))
    assert "Please directly answer" in tok.decode(verse[1].sample.input_ids)


def test_the_export_serves_the_prompts_the_model_was_rolled_out_and_evaluated_with(toy_checkpoints, tmp_path):
    """The exported folder's chat template gives, token for token, the prompt an evaluation (and
    an RL rollout) of the same record builds: no default system turn. Its generation_config.json
    samples as conf/eval.yaml evaluates."""
    from omegaconf import OmegaConf
    from PIL import Image
    from transformers import AutoTokenizer

    from megatron_vr1.config import CONF_DIR
    from megatron_vr1.data import load_tokenizer
    from megatron_vr1.data.formats import EvalDataset
    from megatron_vr1.models.qwen2_5_vl import Qwen25VLArgs

    export = toy_checkpoints / "hf_export"
    Image.new("RGB", (112, 84), (200, 30, 30)).save(tmp_path / "shape.png")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "r", "question": "What colour is the shape?",
                                                  "image": "shape.png", "answer": "red"}) + "\n")
    args = Qwen25VLArgs.from_hf_config(json.loads((export / "config.json").read_text()))
    (prompt,) = list(EvalDataset(tmp_path / "r.jsonl", load_tokenizer(export), args))
    ours = prompt.sample.input_ids.tolist()
    ours = [t for k, t in enumerate(ours) if not (t == args.image_token_id and ours[k - 1] == t)]  # one pad per image
    tok = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
    assert "You are a helpful assistant" not in text
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    gen = json.loads((export / "generation_config.json").read_text())
    published = OmegaConf.load(CONF_DIR / "eval.yaml")
    assert (gen["temperature"], gen["top_p"], gen["max_new_tokens"]) == (published.temperature, published.top_p,
                                                                          published.max_new_tokens)
    assert gen["do_sample"] and gen["top_k"] == 0 and gen["eos_token_id"]


def test_killed_evaluation_resumes_without_repeats_or_losses(toy_checkpoints, tmp_path):
    """SIGKILL once the first batch is on disk (and a torn line after it), then the same command
    again: every record once, and the same results as an uninterrupted run (greedy)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_vr1.eval", f"checkpoint={root / 'mcore'}", f"data={data}", f"out={out}",
           "temperature=0", "max_new_tokens=12", "batch_size=2", "progress=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = out / "samples.jsonl"
        if path.exists() and path.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = (out / "samples.jsonl").read_text().count("\n")
    assert 2 <= kept < 12, f"the kill came too late to test a resume ({kept} lines written)"
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"index": 99, "resp')  # a line torn by the kill
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
    rows = _rows(out)
    assert sorted(r["index"] for r in rows) == list(range(12))
    _eval(tmp_path / "whole", root / "mcore", data, batch_size=2)
    whole = {r["index"]: r for r in _rows(tmp_path / "whole")}
    for r in rows:
        assert (r["response"], r["correct"]) == (whole[r["index"]]["response"], whole[r["index"]]["correct"])


def test_a_folder_that_is_no_checkpoint_is_one_clear_error(tmp_path, toy_checkpoints):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "megatron_vr1.eval", f"checkpoint={tmp_path / 'empty'}",
                           f"data={toy_checkpoints / 'data' / 'eval.jsonl'}", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "neither a Hugging Face folder" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_splits_the_records_and_folds_in_a_killed_runs_rank_files(toy_checkpoints, tmp_path):
    """Two processes under torchrun give the single process's greedy results, each record once;
    the rank file a killed two-rank run left (complete lines and a torn one) is kept, not
    generated again, and folded into samples.jsonl."""
    import json
    import os
    import subprocess
    import sys

    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    _eval(tmp_path / "one", root / "mcore", data, batch_size=4)
    one = {r["index"]: r for r in _rows(tmp_path / "one")}
    out = tmp_path / "two"
    out.mkdir()
    left = dict(one[3], response="<answer> left by rank 1 </answer>")
    (out / "samples.rank1.jsonl").write_text(json.dumps(one[1]) + "\n" + json.dumps(left) + "\n" + '{"index": 5, "re')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "megatron_vr1.eval", f"checkpoint={root / 'mcore'}", f"data={data}", f"out={out}",
                           "temperature=0", "max_new_tokens=12", "batch_size=4", "progress=false"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(out)
    assert sorted(r["index"] for r in rows) == list(range(12))
    assert not list(out.glob("samples.rank*"))
    got = {r["index"]: r for r in rows}
    assert got[3]["response"] == left["response"]  # kept from the killed run, not generated again
    for i in set(range(12)) - {3}:
        assert (got[i]["response"], got[i]["correct"]) == (one[i]["response"], one[i]["correct"]), i
    assert proc.stdout.count("eval: mathvista") == 1  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["world_size"] == 2 and summary["benchmarks"]["mathvista"]["overall"]["n"] == 12


# ---- the optional LLM answer-extractor, against a real OpenAI-compatible server on loopback

def _last_response(body: dict) -> str:
    return body["messages"][-1]["content"].rsplit("Response: ", 1)[1].rsplit("\nAnswer:", 1)[0]


def test_llm_extractor_reads_answers_and_retries_through_429_and_500():
    from megatron_vr1.eval.llm_extract import ExtractorSettings, LLMExtractor
    from scripted_server import ScriptedServer

    failed = set()

    def script(body):
        response = _last_response(body)
        for trouble, status in (("flaky", 500), ("busy", 429)):
            if trouble in response and trouble not in failed:
                failed.add(trouble)
                return status, f"{trouble} once", {"Retry-After": "0"}
        replies = {"forty-two": "42", "no idea": "None", "flaky": "Answer: 7", "busy": "B\nbecause"}
        return 200, next(v for k, v in replies.items() if k in response), {}

    with ScriptedServer(script) as server:
        ex = LLMExtractor(ExtractorSettings(base_url=server.url, model="judge", max_retries=2, timeout=10,
                                            concurrency=2))
        got = ex.extract([("What is x?", "It is forty-two."), ("What is y?", "I have no idea"),
                          ("Sum?", "flaky but seven"), ("Pick one\nA. 1\nB. 2", "busy: the second")])
    assert got == ["42", None, "7", "B"]
    assert len(server.requests) == 6  # four questions, one 500 and one 429 asked again
    assert all(r["model"] == "judge" and r["temperature"] == 0.0 for r in server.requests)
    assert any("Question: Pick one\nA. 1\nB. 2\nResponse:" in r["messages"][-1]["content"] for r in server.requests)


def test_llm_extractor_in_an_evaluation(toy_checkpoints, tmp_path):
    """Off by default; in fallback mode only the responses the rules cannot read go to the model,
    and the rows say where each extraction came from. A dead endpoint is one clear error."""
    import json

    from megatron_vr1.errors import UsageError
    from scripted_server import ScriptedServer

    root = toy_checkpoints
    data = root / "data" / "eval.jsonl"
    with ScriptedServer(lambda body: (200, "red", {})) as server:
        _eval(tmp_path / "llm", root / "mcore", data,
              llm_extractor={"base_url": server.url, "model": "judge", "mode": "fallback"})
    rows = _rows(tmp_path / "llm")
    unread = [r for r in rows if r["extraction_source"] == "llm"]
    assert len(server.requests) == len(unread) > 0
    assert all(r["extraction"] == "red" for r in unread)
    assert all(r["extraction_source"] in ("rule", "none") for r in rows if r not in unread)
    summary = json.loads((tmp_path / "llm" / "summary.json").read_text())
    assert summary["benchmarks"]["mathvista"]["extracted_by_llm"] == len(unread)
    assert summary["settings"]["llm_extractor"]["model"] == "judge"

    _eval(tmp_path / "plain", root / "mcore", data)  # off by default
    assert {r["extraction_source"] for r in _rows(tmp_path / "plain")} <= {"rule", "none"}

    with ScriptedServer(lambda body: (500, "down", {})) as server:
        with pytest.raises(UsageError, match="llm_extractor at .* failed after 1 retries"):
            _eval(tmp_path / "dead", root / "mcore", data,
                  llm_extractor={"base_url": server.url, "model": "judge", "max_retries": 1})
    with pytest.raises(UsageError, match=r"unknown option\(s\) \['modle'\]"):
        _eval(tmp_path / "typo", root / "mcore", data, llm_extractor={"modle": "judge"})

