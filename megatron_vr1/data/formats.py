"""Vision-R1's data formats, read with Hugging Face ``datasets`` from local files.

* cold-start SFT: ShareGPT JSON as released (``messages`` with role/content, or ``conversations``
  with from/value; ``<image>`` placeholders; ``images``: paths relative to an image root);
* RL: Geometry3K-style records (``problem``, ``images``, ``answer``), JSON / JSONL / parquet;
* evaluation: MathVista / MathVerse / MM-Math-style records (``question``, ``image``, ``answer``,
  ``choices``, ``answer_type``).

The datasets are map-style over their Arrow rows (records stay on disk, memory-mapped; images
are decoded one sample at a time, in DataLoader workers under :mod:`.loader`). A bad record
raises an error that names it, or, with ``skip_bad_samples``, becomes a :class:`Skipped` entry
that readers count in a :class:`SkipReport` — never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from PIL import Image

from ..models.qwen2_5_vl import Qwen25VLArgs
from .images import ImageConfig, ImageError, check_image, image_grid, image_size, load_image, process_images
from .template import DEFAULT_SYSTEM_PROMPT, IMAGE_PLACEHOLDER, Sample, SampleError, build_sample, tokenize_chat

_DEFAULT = object()  # "use the dataset kind's default system prompt"
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that cannot be used, named by file and index."""


@dataclass(frozen=True)
class Skipped:
    """A record left out under ``skip_bad_samples``: what ``dataset[i]`` returns instead of a sample."""

    record: str  # file and index (and id) of the record
    reason: str  # error type and the start of its message


@dataclass
class SkipReport:
    """Records skipped under ``skip_bad_samples``, by reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, skipped: Skipped) -> None:
        record, reason = skipped.record, skipped.reason
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(record)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.total:
            return "no records skipped"
        lines = [f"{self.total} record(s) skipped:"]
        lines += [f"  {n} x {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.most_common()]
        return "\n".join(lines)


def _json_rows(path: str, fmt: str, mtime_ns: int, size: int) -> Iterator[dict]:
    """Rows ``{record, error, where}``: a record as (ASCII-escaped) JSON text, or why it is not one.

    Errors become rows rather than exceptions so that the Arrow cache, keyed on the file's
    path, size and mtime, replays them faithfully; the reader decides to raise or to count.
    """
    p = Path(path)
    if fmt == "json":
        try:
            records = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RecordError(f"{p}: not a JSON array of records ({type(e).__name__}: {e})") from e
        if not isinstance(records, list):
            raise RecordError(f"{p}: expected a JSON array of records, got {type(records).__name__}")
        for number, record in enumerate(records):
            ok = isinstance(record, dict)
            yield {"record": json.dumps(record) if ok else None, "error": None if ok else "not a JSON object",
                   "where": f"{p.name}[{number}]"}
        return
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{p.name}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                yield {"record": json.dumps(record), "error": None, "where": where}
            except (UnicodeDecodeError, ValueError) as e:
                yield {"record": None, "error": f"{type(e).__name__}: {e}", "where": where}


def read_records(path: str | Path):
    """Records of a .json / .jsonl / .parquet file as a ``datasets.Dataset`` (Arrow, on disk).

    JSON and JSONL are read one record at a time into one JSON-text column, so records of any
    shape stay intact, a JSONL line that is not UTF-8 or not JSON is named, and odd text inside
    a record is reported against that record rather than failing the whole file.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if suffix not in (".json", ".jsonl"):
        raise RecordError(f"{path}: unknown data format {suffix!r} (use .json, .jsonl or .parquet)")
    stat = path.stat()
    features = datasets.Features({k: datasets.Value("string") for k in ("record", "error", "where")})
    try:
        return datasets.Dataset.from_generator(
            _json_rows, features=features,
            gen_kwargs={"path": str(path.resolve()), "fmt": suffix[1:], "mtime_ns": stat.st_mtime_ns,
                        "size": stat.st_size})
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, RecordError):
            raise e.__cause__ from None
        raise


def _record(row: dict) -> dict:
    if set(row) == {"record", "error", "where"}:
        if row["error"] is not None:
            raise RecordError(row["error"])
        return json.loads(row["record"])
    return row


def _is_image_source(x: Any) -> bool:
    return isinstance(x, (str, bytes, Image.Image)) or (isinstance(x, dict) and ("bytes" in x or "path" in x))


def _image_list(record: dict) -> list:
    """The record's images: paths, or images embedded as ``datasets`` stores them in parquet
    (``{"bytes", "path"}`` dicts or decoded PIL images). MathVista's parquet has both a relative
    ``image`` path it does not ship and the embedded ``decoded_image``: the embedded one wins."""
    images = record.get("decoded_image")
    if images is None:
        images = record.get("images", record.get("image", record.get("file_name")))  # MM-Math: file_name
    if images is None:
        return []
    if _is_image_source(images):
        return [images]
    if not isinstance(images, list) or not all(_is_image_source(i) for i in images):
        raise RecordError(f"'images' must be an image (a path, bytes, or an embedded image) or a list of them, "
                          f"got {type(images).__name__}")
    return images


def format_choices(question: str, choices: Optional[list]) -> str:
    """The question with its options listed under it, one shared layout for SFT, RL and eval."""
    if not choices:
        return question
    return question + "\nChoices:\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def sft_messages(record: dict) -> tuple[list[dict], list[str]]:
    """ShareGPT record -> (messages with role/content, image paths)."""
    turns = record.get("messages", record.get("conversations"))
    if not turns:
        raise SampleError("empty conversation")
    if not isinstance(turns, list):
        raise SampleError(f"'messages' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError(f"turn {i} must be an object with role and content, got {type(turn).__name__}")
        role = _ROLE_ALIASES.get(turn.get("role", turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise SampleError(f"turn {i}: unknown role {turn.get('role', turn.get('from'))!r}")
        messages.append({"role": role, "content": content})
    return messages, _image_list(record)


# fields the datasets consume; everything else a record carries travels on in Prompt.extra
_RL_FIELDS = {"problem", "question", "prompt", "answer", "solution", "images", "image", "id"}
_EVAL_FIELDS = {"question", "query", "problem", "answer", "images", "image", "decoded_image", "file_name", "id",
                "pid", "sample_index", "choices"}
# eval.prompt=auto: the benchmark's own prompt field where its records carry one (MathVista's
# query holds its hint and choices; MathVerse's query_cot asks for reasoning first), else the question
PROMPT_FIELDS = {"mathvista": "query", "mathverse": "query_cot"}
QUESTION_FIELDS = ("question", "problem")  # prompts that take our choices layout (format_choices)


def _extra(record: dict, consumed: set) -> dict:
    return {k: v for k, v in record.items() if k not in consumed and not isinstance(v, (bytes, Image.Image))}


def rl_problem(record: dict) -> tuple[str, list, str]:
    """Geometry3K-style record -> (problem text with <image> placeholders, image paths, answer)."""
    problem = record.get("problem", record.get("question", record.get("prompt")))
    answer = record.get("answer", record.get("solution"))
    if not isinstance(problem, str) or not problem.strip():
        raise SampleError("record has no problem text")
    if answer is None or str(answer).strip() == "":
        raise SampleError("record has no answer")
    images = _image_list(record)
    if images and IMAGE_PLACEHOLDER not in problem:
        problem = IMAGE_PLACEHOLDER * len(images) + problem
    return problem, images, str(answer)


def prompt_field(record: dict, prompt: str = "auto") -> str:
    """The field whose text a record is asked with: ``prompt`` itself, or for ``auto`` the
    benchmark's own prompt (:data:`PROMPT_FIELDS`) when the record has it, else its question."""
    if prompt != "auto":
        return prompt
    if "problem_version" in record:
        bench = "mathverse"
    elif record.get("question_type") in ("multi_choice", "free_form"):
        bench = "mathvista"
    else:
        bench = ""
    field = PROMPT_FIELDS.get(bench)
    if field and isinstance(record.get(field), str) and record[field].strip():
        return field
    return next((f for f in ("question", "query", "problem") if f in record), "question")


def eval_record(record: dict, prompt: str = "auto") -> dict:
    """MathVista / MathVerse / MM-Math-style record -> normalised fields; ``question`` is the text
    of the record's :func:`prompt_field`, and ``prompt_field`` says which."""
    field = prompt_field(record, prompt)
    question = record.get(field)
    if not isinstance(question, str) or not question.strip():
        raise SampleError(f"record has no {field!r} text to ask (eval prompt={prompt})")
    answer = record.get("answer")
    if answer is None and isinstance(record.get("solution"), str):  # MM-Math as released: the solution's box
        from ..rl.reward import extract_answer

        answer = extract_answer(record["solution"])
    if answer is None:
        raise SampleError("record has no answer (nor a solution with a \\boxed{} one)")
    choices = record.get("choices")
    if choices is not None and not isinstance(choices, list):
        raise SampleError(f"'choices' must be a list, got {type(choices).__name__}")
    # MathVista has both: question_type says multiple choice or free form, answer_type the
    # answer's kind (text, integer, float, list)
    question_type = record.get("question_type", "multi_choice" if choices else "free_form")
    rid = next((record[k] for k in ("id", "pid", "sample_index", "file_name") if record.get(k) is not None), "")
    return {**_extra(record, _EVAL_FIELDS | {field}), "id": str(rid), "question": question, "prompt_field": field,
            "images": _image_list(record), "answer": str(answer), "choices": choices, "question_type": question_type,
            "answer_type": record.get("answer_type")}


class _RecordSource(torch.utils.data.Dataset):
    """Records of one file turned into samples, by index (map-style); per-record failures become
    named errors or, with ``skip_bad_samples``, :class:`Skipped` entries. ``image_root`` defaults
    to the data file's folder."""

    default_max_tokens = 16384
    default_system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT

    def __init__(self, path: str | Path, tokenizer, args: Qwen25VLArgs, *, image_root: str | Path | None = None,
                 max_tokens: Optional[int] = None, image_cfg: ImageConfig = ImageConfig(),
                 system_prompt: Optional[str] = _DEFAULT, skip_bad_samples: bool = False) -> None:
        self.path = Path(path)
        self.tokenizer, self.args, self.image_cfg = tokenizer, args, image_cfg
        self.max_tokens = max_tokens or self.default_max_tokens
        self.system_prompt = self.default_system_prompt if system_prompt is _DEFAULT else system_prompt
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.skip_bad_samples = skip_bad_samples
        self.report = SkipReport()
        self.records = read_records(self.path)

    def build(self, record: dict):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        """The sample of record ``index``, or a :class:`Skipped` entry for a bad record under
        ``skip_bad_samples`` (else the record's error, naming it)."""
        return self._guarded(index, self.build)

    def _guarded(self, index: int, fn):
        if not 0 <= index < len(self.records):
            raise IndexError(f"{self.path.name}: record {index} out of range (0..{len(self.records) - 1})")
        row = self.records[int(index)]
        name = row.get("where") or f"{self.path.name}[{index}]"
        try:
            record = _record(row)
            if "id" in record:
                name += f" (id {record['id']})"
            return fn(record)
        except (SampleError, ImageError, RecordError) as e:
            if not self.skip_bad_samples:
                raise type(e)(f"{name}: {e}") from e
            return Skipped(name, type(e).__name__ + ": " + str(e).split(":")[0][:80])

    def length(self, index: int):
        """Tokens of record ``index``'s sample, as ``self[index]`` would have them, from its text and
        its images' headers (no pixels decoded): what balancing micro-batches needs. A bad record
        is a :class:`Skipped` entry or its error, as with ``self[index]``."""
        return self._guarded(index, self.measure)

    def measure(self, record: dict) -> int:
        raise NotImplementedError

    def image_sources(self, record: dict) -> list:
        raise NotImplementedError

    def check(self, index: int) -> Optional[str]:
        """What is wrong with record ``index`` (its fields, its chat template, its length, its images'
        headers and file structure; no pixels decoded), named, or None: the pre-flight's question."""
        try:
            self._guarded_strict(index, lambda r: (self.measure(r), [check_image(s, self.image_root)
                                                                      for s in self.image_sources(r)]))
        except (SampleError, ImageError, RecordError) as e:
            return str(e)
        return None

    def _guarded_strict(self, index: int, fn):
        skip, self.skip_bad_samples = self.skip_bad_samples, False
        try:
            return self._guarded(index, fn)
        finally:
            self.skip_bad_samples = skip

    def __iter__(self) -> Iterator:
        """Every sample in file order; ``report`` counts this pass's skips (a bad record once per pass)."""
        self.report = SkipReport()
        for index in range(len(self)):
            item = self[index]
            if isinstance(item, Skipped):
                self.report.add(item)
            else:
                yield item

    def _images(self, paths: list[str]):
        return [load_image(p, self.image_root) for p in paths]

    def _grids(self, paths: list[str]) -> list[tuple[int, int, int]]:
        return [image_grid(*image_size(p, self.image_root), self.image_cfg) for p in paths]


class SFTDataset(_RecordSource):
    """Cold-start SFT samples (ids, loss mask, position ids, images), one record at a time."""

    def build(self, record: dict) -> Sample:
        messages, paths = sft_messages(record)
        pixel_values, grid = process_images(self._images(paths), self.image_cfg)
        sample = build_sample(self.tokenizer, self.args, messages, pixel_values, grid, image_cfg=self.image_cfg,
                              system_prompt=self.system_prompt)
        return self._checked(sample, len(sample), sample.loss_mask)

    def image_sources(self, record: dict) -> list:
        return sft_messages(record)[1]

    def measure(self, record: dict) -> int:
        messages, paths = sft_messages(record)
        ids, mask = tokenize_chat(self.tokenizer, messages, self._grids(paths), image_cfg=self.image_cfg,
                                  system_prompt=self.system_prompt)
        return self._checked(len(ids), len(ids), mask)

    def _checked(self, result, length: int, loss_mask: torch.Tensor):
        if length > self.max_tokens:
            raise SampleError(f"sample of {length} tokens exceeds max_tokens={self.max_tokens}")
        if not loss_mask.any():
            raise SampleError("conversation has no assistant reply to train on")
        return result


@dataclass
class Prompt:
    """An RL / evaluation prompt, ready for the rollout engine and the reward."""

    id: str
    sample: Sample  # prompt tokens (ending with the assistant header), images, position ids
    answer: str
    extra: dict = field(default_factory=dict)
    image_sources: list = field(default_factory=list)  # the record's images (paths or bytes), for engines that
    # process images themselves


class RLDataset(_RecordSource):
    """RL prompts (no system prompt, as Vision-R1 trains) with their ground-truth answers;
    ``max_tokens`` bounds the prompt."""

    default_max_tokens = 4096
    default_system_prompt = None

    def build(self, record: dict) -> Prompt:
        problem, paths, answer = rl_problem(record)
        # the problem text is used as written (RL sets usually list their options in it)
        return self._prompt(str(record.get("id", "")), problem, paths, answer, _extra(record, _RL_FIELDS))

    def image_sources(self, record: dict) -> list:
        return rl_problem(record)[1]

    def measure(self, record: dict) -> int:
        problem, paths, _ = rl_problem(record)
        ids, _ = tokenize_chat(self.tokenizer, [{"role": "user", "content": problem}], self._grids(paths),
                               image_cfg=self.image_cfg, system_prompt=self.system_prompt, add_generation_prompt=True)
        if len(ids) > self.max_tokens:
            raise SampleError(f"prompt of {len(ids)} tokens exceeds max_tokens={self.max_tokens}")
        return len(ids)

    def _prompt(self, rid: str, text: str, paths: list[str], answer: str, extra: dict) -> Prompt:
        pixel_values, grid = process_images(self._images(paths), self.image_cfg)
        sample = build_sample(self.tokenizer, self.args, [{"role": "user", "content": text}], pixel_values, grid,
                              image_cfg=self.image_cfg, system_prompt=self.system_prompt, add_generation_prompt=True)
        if len(sample) > self.max_tokens:
            raise SampleError(f"prompt of {len(sample)} tokens exceeds max_tokens={self.max_tokens}")
        return Prompt(rid, sample, answer, extra, list(paths))


class EvalDataset(RLDataset):
    """Benchmark prompts (``prompt``: the field asked, see :func:`prompt_field`); a question's
    multiple-choice options are listed under it (a benchmark's own prompt lists them already)."""

    def __init__(self, *args, prompt: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt = prompt

    def image_sources(self, record: dict) -> list:
        return eval_record(record, self.prompt)["images"]

    def measure(self, record: dict) -> int:
        return len(self.build(record).sample)

    def build(self, record: dict) -> Prompt:
        fields = eval_record(record, self.prompt)
        text = format_choices(fields["question"], fields["choices"]) if fields["prompt_field"] in QUESTION_FIELDS \
            else fields["question"]
        if fields["images"] and IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER * len(fields["images"]) + text
        extra = {k: v for k, v in fields.items() if k not in ("id", "question", "images", "answer", "prompt_field")}
        return self._prompt(fields["id"], text, fields["images"], fields["answer"], extra)
