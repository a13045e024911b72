"""Generate answers for a benchmark file with a rollout engine, score them, write the results.

``<out>/samples.jsonl`` gets one line per record and sample (index, sample, id, benchmark,
response, extraction, correct, and the record's category fields), appended a batch at a time and
flushed; a run that starts again keeps every complete line and generates only the records
without one. ``samples=k`` draws k responses per record: accuracy is then their mean over all
records (mean@k), and ``pass_at_k`` the share of records with any right one. Under torchrun
the records left to do are dealt round-robin to the ranks (each holds the whole model and writes
``samples.rank<N>.jsonl``); rank 0 folds those files into ``samples.jsonl`` at the end, and at the
start of a run after one that was killed.
``<out>/summary.json`` and ``summary.md`` hold accuracy overall and by the benchmark's own
categories, with and without retries, beside the published rows where the benchmark matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .. import platform
from ..data import ImageConfig, load_tokenizer
from ..data.formats import EvalDataset, _record
from ..errors import UsageError
from ..files import complete_jsonl, write_whole
from ..models.qwen2_5_vl import Qwen25VLArgs
from .report import summarise, write_summary
from .scoring import benchmark_of, categories_of, extract_answer, is_correct

SAMPLES = "samples.jsonl"
RANK_FILES = "samples.rank*.jsonl"
RUN_FILE = "run.json"  # the settings that made the samples: a rerun into the same out must match them


def load_model_for_eval(checkpoint: str | Path, engine: str, dtype: torch.dtype):
    """``(engine, args, tokenizer_dir)`` for a Hugging Face folder or a Megatron checkpoint
    (its weights reach the engine through the one name mapping either way)."""
    from ..checkpoint import load_model
    from ..checkpoint.convert import HF_ASSETS, single_process
    from ..checkpoint.hf_files import HFCheckpointReader
    from ..checkpoint.megatron_files import METADATA_FILE, read_metadata
    from ..models.qwen2_5_vl.hf_mapping import load_hf_state_dict
    from ..data.tokenizer import check_tokenizer
    from ..rl.rollout import make_engine

    path = Path(checkpoint)
    if (path / METADATA_FILE).is_file():
        meta = read_metadata(path)
        args = Qwen25VLArgs.from_hf_config(meta["hf_config"])
        assets = path / HF_ASSETS
        tokenizer = load_tokenizer(assets)
        check_tokenizer(tokenizer, args, str(assets))
        if engine == "megatron":
            model = _megatron_model(args, _vocab_divisor(meta), dtype)
            load_model(model, path)
            return make_engine(engine, args, tokenizer, policy=model.eval(), dtype=dtype), args, assets
        eng = make_engine(engine, args, tokenizer, dtype=dtype)
        _load_megatron(eng, args, path, meta, single_process)
        return eng, args, assets
    if (path / "config.json").is_file():
        args = Qwen25VLArgs.from_hf_config(json.loads((path / "config.json").read_text()))
        tokenizer = load_tokenizer(path)
        check_tokenizer(tokenizer, args, str(path))
        reader = HFCheckpointReader(path)
        names = [n for n in reader.names() if not (args.tie_word_embeddings and n == "lm_head.weight")]
        if engine == "megatron":
            model = _megatron_model(args, 1, dtype)
            load_hf_state_dict(model, {n: reader.get(n) for n in names}, args, padded_vocab=model.padded_vocab_size,
                               tp_rank=0, tp_size=1, layer_offset=0)
            return make_engine(engine, args, tokenizer, policy=model.eval(), dtype=dtype), args, path
        eng = make_engine(engine, args, tokenizer, dtype=dtype)
        eng.load_weights([(n, reader.get(n))] for n in names)  # one tensor in memory at a time
        return eng, args, path
    raise UsageError(f"checkpoint={checkpoint}: neither a Hugging Face folder (config.json) nor a megatron-vr1 "
                     f"checkpoint ({METADATA_FILE})")


def _vocab_divisor(meta: dict) -> int:
    """Pad the vocabulary as the checkpoint's layout did, so that it loads at TP=1."""
    saved = meta.get("parallel") or {}
    return int(saved.get("make_vocab_size_divisible_by") or 1) * int(saved.get("tensor_parallel") or 1)


def _megatron_model(args, divisible: int, dtype: torch.dtype):
    """The whole model at TP=1 on this rank (under the job's parallel state)."""
    from ..models.qwen2_5_vl import ParallelLayout, build_model

    model = build_model(args, ParallelLayout(make_vocab_size_divisible_by=divisible), backend="local", dtype=dtype)
    return model.cuda() if platform.has_cuda() else model


def _load_megatron(eng, args, path: Path, meta: dict, single_process) -> None:
    from contextlib import nullcontext

    from ..checkpoint import iter_hf_weights, load_model

    # under torchrun the job's parallel state (TP=1, every rank a data-parallel replica) loads it
    with nullcontext() if torch.distributed.is_initialized() else single_process():
        model = _megatron_model(args, _vocab_divisor(meta), torch.float32)
        load_model(model, path)
        eng.load_weights(iter_hf_weights(model))
        del model


def image_config_of(assets: Path) -> ImageConfig:
    saved = {}
    if (assets / "preprocessor_config.json").is_file():
        saved = json.loads((assets / "preprocessor_config.json").read_text())
    defaults = ImageConfig()
    return ImageConfig(min_pixels=int(saved.get("min_pixels") or defaults.min_pixels),
                       max_pixels=int(saved.get("max_pixels") or defaults.max_pixels))


def check_same_run(out_dir: Path, settings: dict) -> None:
    """Refuse an ``out`` folder that holds an evaluation made with other settings: its samples
    would be counted, and summarised, as this run's."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        if done_lines(out_dir / SAMPLES):
            raise UsageError(f"out={out_dir} holds samples but no {RUN_FILE} saying what made them: use another out")
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        raise UsageError(f"out={out_dir} holds an evaluation made with other settings ({', '.join(changed)} differ): "
                         f"use another out, or delete that folder to start again")


def fold_rank_files(out_dir: Path) -> dict[tuple[int, int], dict]:
    """Move the complete lines of ``samples.rank<N>.jsonl`` files into ``samples.jsonl`` (a sample
    done twice is kept once), delete those files; the samples done, by (record index, sample)."""
    samples = out_dir / SAMPLES
    done = done_lines(samples)
    parts = sorted(out_dir.glob(RANK_FILES))
    if parts:
        new = []
        for part in parts:
            for index, row in done_lines(part).items():
                if index not in done:
                    done[index] = row
                    new.append(json.dumps(row) + "\n")
        with open(samples, "a") as sink:
            sink.write("".join(new))
            sink.flush()
            os.fsync(sink.fileno())
        for part in parts:
            part.unlink()
    return done


def done_lines(path: Path) -> dict[tuple[int, int], dict]:
    """Complete lines of an earlier run, by (record index, sample); a torn last line is cut off."""
    return {(int(row["index"]), int(row.get("sample", 0))): row for row in complete_jsonl(path)}


def evaluate(*, checkpoint: str, data: str, out: str, engine: str = "hf", image_root: Optional[str] = None,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 16000, retries: int = 0,
             batch_size: int = 8, limit: Optional[int] = None, seed: int = 0, max_prompt_tokens: int = 16384,
             samples: int = 1, prompt: str = "auto",
             benchmark: Optional[str] = None, progress: Optional[bool] = None,
             llm_extractor: Optional[dict] = None) -> dict:
    """Evaluate ``checkpoint`` on the benchmark records in ``data``; returns the summary.
    ``llm_extractor`` (:class:`.llm_extract.ExtractorSettings` fields) adds the optional extraction
    by a language model at an OpenAI-compatible endpoint."""
    from tqdm import tqdm

    from ..rl.rollout import SamplingParams
    from .llm_extract import LLMExtractor, settings_from

    if int(samples) < 1:
        raise UsageError(f"samples must be >= 1 (responses per record), got {samples}")
    samples = int(samples)
    extraction = settings_from(llm_extractor)
    extractor = LLMExtractor(extraction) if extraction.enabled else None

    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 or engine == "megatron":  # data parallel: each rank generates for its share
        started = not torch.distributed.is_initialized()  # the megatron engine needs the parallel state
        platform.init_distributed(1, 1, seed=int(seed))
    rank = torch.distributed.get_rank() if world > 1 else 0
    from ..training.checkpoint import resolve_checkpoint

    checkpoint = str(resolve_checkpoint(checkpoint, "checkpoint", hf_ok=True,
                                        say=print if rank == 0 else (lambda *_: None)))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "data": str(Path(data).resolve()), "engine": engine,
                "image_root": image_root, "benchmark": benchmark, "temperature": float(temperature),
                "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "max_prompt_tokens": int(max_prompt_tokens),
                "retries": int(retries), "seed": int(seed), "samples": samples, "prompt": prompt,
                "llm_extractor": [extraction.base_url, extraction.model, extraction.mode] if extraction.enabled else None}
    check_same_run(out_dir, settings)  # every rank: each refuses alike
    _barrier(world)
    if rank == 0:
        write_whole(out_dir / RUN_FILE, json.dumps(settings, indent=1))
        fold_rank_files(out_dir)  # what the ranks of a killed run had written
    _barrier(world)
    dtype = torch.bfloat16 if platform.has_cuda() else torch.float32
    eng, args, assets = load_model_for_eval(checkpoint, engine, dtype)
    dataset = EvalDataset(data, eng.tokenizer, args, image_root=image_root, max_tokens=max_prompt_tokens, prompt=prompt,
                          image_cfg=image_config_of(assets))
    total = len(dataset) if limit is None else min(int(limit), len(dataset))
    samples_path = out_dir / SAMPLES
    done = done_lines(samples_path)  # clean by now: rank 0 repaired it before the barrier
    todo = [i for i in range(total) if any((i, k) not in done for k in range(samples))]
    if not todo and rank == 0:
        print(f"eval: all {total} records already scored in {samples_path}", flush=True)
    bar = tqdm(total=total, initial=total - len(todo), desc="eval", unit="record",
               disable=rank != 0 or not (progress if progress is not None else os.isatty(2)))
    todo = todo[rank::world]
    sink_path = samples_path if world == 1 else out_dir / RANK_FILES.replace("*", str(rank))
    with open(sink_path, "a") as sink:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [dataset[i] for i in chunk]
            records = [_record(dataset.records[i]) for i in chunk]
            if benchmark:
                records = [dict(r, benchmark=benchmark) for r in records]
            params = SamplingParams(n=samples, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                    top_p=float(top_p), seed=int(seed) + chunk[0])
            # one entry per (record, sample), record-major
            slots = [(k, j) for k in range(len(chunk)) for j in range(samples)]
            records = [records[k] for k, _ in slots]
            responses = [c.text for group in eng.generate([p.sample for p in prompts], params) for c in group]
            first = list(responses)
            attempts = [1] * len(slots)
            for attempt in range(1, int(retries) + 1):  # a response without </answer> is asked again
                again = [k for k, r in enumerate(responses) if "</answer>" not in r]
                if not again:
                    break
                retry = SamplingParams(**{**params.__dict__, "n": 1, "seed": params.seed + 7919 * attempt})
                for k, c in zip(again, eng.generate([prompts[slots[k][0]].sample for k in again], retry)):
                    responses[k], attempts[k] = c[0].text, attempts[k] + 1
            extractions, sources = extract_all(responses, records, extractor)
            first_extractions = list(extractions)
            changed = [k for k in range(len(slots)) if first[k] != responses[k]]  # retried
            for k, e in zip(changed, extract_all([first[k] for k in changed], [records[k] for k in changed],
                                                 extractor)[0]):
                first_extractions[k] = e
            lines = []
            for n, (k, j) in enumerate(slots):
                i, record = chunk[k], records[n]
                if (i, j) in done:  # a record cut short by a torn line: only its missing samples
                    continue
                lines.append(json.dumps({
                    "index": i, "sample": j, "id": prompts[k].id, "benchmark": benchmark_of(record),
                    "answer": prompts[k].answer, "response": responses[n], "extraction": extractions[n],
                    "extraction_source": sources[n], "correct": is_correct(extractions[n], record),
                    "attempts": attempts[n], "correct_first_attempt": is_correct(first_extractions[n], record),
                    **categories_of(record)}) + "\n")
            sink.write("".join(lines))  # one write per batch: a kill leaves at most a torn last line
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(chunk) * world)
    bar.close()
    _barrier(world)
    summary = None
    if rank == 0:
        rows = sorted(fold_rank_files(out_dir).values(), key=lambda r: (r["index"], r.get("sample", 0)))
        summary = summarise(rows, settings={"checkpoint": str(checkpoint), "data": str(data), "engine": engine,
                                            "temperature": temperature, "top_p": top_p,
                                            "max_new_tokens": max_new_tokens, "retries": retries, "seed": seed,
                                            "samples": samples, "prompt": prompt,
                                            "world_size": world,
                                            "llm_extractor": ({"base_url": extraction.base_url, "model": extraction.model,
                                                               "mode": extraction.mode} if extractor else None)})
        write_summary(summary, out_dir)
    if world > 1:
        summary = _broadcast(summary)
    if started:
        platform.shutdown_distributed()
    return summary


def extract_all(responses: list[str], records: list[dict], extractor=None) -> tuple[list, list[str]]:
    """Extracted answers and where each came from (``rule``, ``llm`` or ``none``): the rules of
    :func:`extract_answer`, then the language model where it is on and wanted."""
    from .llm_extract import question_of

    found = [extract_answer(r) for r in responses]
    sources = ["rule" if e is not None else "none" for e in found]
    if extractor is not None:
        ask = [k for k, e in enumerate(found) if extractor.wanted(e)]
        for k, e in zip(ask, extractor.extract([(question_of(records[k]), responses[k]) for k in ask])):
            found[k], sources[k] = e, "llm" if e is not None else "none"
    return found, sources


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

