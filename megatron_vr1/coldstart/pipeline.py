"""The modality-bridging pipeline over a record file, crash-safe and resumable.

Every finished record (kept or dropped, with the reason) is one line of ``<out>/records.jsonl``,
written, flushed and fsynced as it finishes; a run that starts again repairs a torn last line and
skips the ids that have a line, so no record is done or written twice. At the end (and on SIGINT)
``<out>/sft.json`` (the kept samples, in input order, ShareGPT as ``SFTDataset`` reads it) and
``<out>/report.json`` (``input``, ``kept``, ``dropped`` by reason, ``pending``, usage per endpoint)
are written whole, each replacing the last.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from ..data.formats import RecordError, _record, read_records, rl_problem
from ..data.images import resolve_image
from ..data.template import IMAGE_PLACEHOLDER, SampleError
from ..errors import UsageError
from ..files import complete_jsonl, write_whole
from .client import Endpoint, EndpointError, image_part
from .filters import FilterSettings, check_thinking, parse_reply

JOURNAL, SFT, REPORT = "records.jsonl", "sft.json", "report.json"


@dataclass
class Item:
    index: int
    id: str
    question: str        # with the <image> placeholders, as the SFT sample asks it
    answer: str
    images: list         # absolute paths, or bytes of embedded images
    bad: Optional[str] = None  # why the record cannot be used


def load_items(path: str, image_root: Optional[str]) -> list[Item]:
    root = Path(image_root) if image_root else Path(path).resolve().parent
    items, seen = [], {}
    for index, row in enumerate(read_records(path)):
        rid = str(index)
        try:
            record = _record(row)
            rid = str(record.get("id", index))
            question, images, answer = rl_problem(record)
            resolved = []
            for image in images:  # the data layer's resolution: embedded bytes, or a file under root
                if isinstance(image, Image.Image):  # decoded by datasets (parquet): sent as PNG
                    encoded = io.BytesIO()
                    image.save(encoded, format="PNG")
                    resolved.append(encoded.getvalue())
                    continue
                _, opener = resolve_image(image, root)
                resolved.append(opener.getvalue() if isinstance(opener, io.BytesIO) else opener.resolve())
            item = Item(index, rid, question, answer, resolved)
        except (RecordError, SampleError, ValueError) as e:
            item = Item(index, rid, "", "", [], bad=f"{type(e).__name__}: {e}")
        if item.id in seen:
            raise UsageError(f"{path}: records {seen[item.id]} and {index} share the id {item.id!r}: ids must be unique")
        seen[item.id] = index
        items.append(item)
    return items


def read_journal(path: Path) -> dict[str, dict]:
    """Finished records by id; a torn last line (a kill mid-write) is cut off."""
    return {row["id"]: row for row in complete_jsonl(path)}


class Pipeline:
    def __init__(self, cfg, mllm: Endpoint, reasoner: Endpoint) -> None:
        from ..rl.reward import RewardPool

        self.cfg, self.mllm, self.reasoner = cfg, mllm, reasoner
        self.prompts = cfg.prompts
        self.filters = FilterSettings(**{k: (list(map(list, v)) if k == "description_rewrites" else v)
                                         for k, v in cfg.filters.items()})
        self.out = Path(cfg.out)
        # judges the reasoner's answer alone (its reply has no Final Answer: to require)
        self.verifier = RewardPool(workers=1, timeout=float(cfg.verify_timeout), require_final_answer=False)

    def _images(self, item: Item) -> list[dict]:
        return [image_part(i) for i in item.images]

    def _text(self, item: Item) -> str:
        return item.question.replace(IMAGE_PLACEHOLDER, "").strip()

    async def process(self, item: Item) -> dict:
        """One record through the four steps and the filters: its journal line."""
        if item.bad:
            return {"status": "dropped", "reason": "bad_record", "detail": item.bad}
        p, question = self.prompts, self._text(item)
        try:
            cot = await self.mllm.chat([{"role": "user", "content": self._images(item) + [
                {"type": "text", "text": p.pseudo_cot.format(question=question, answer=item.answer)}]}])
            description = await self.mllm.chat([{"role": "user", "content": self._images(item) + [
                {"type": "text", "text": p.description.format(question=question, pseudo_cot=cot.content.strip())}]}])
            reply = await self.reasoner.chat([{"role": "user", "content": p.reasoner.format(
                question=question, description=description.content.strip())}])
        except EndpointError as e:
            return {"status": "dropped", "reason": f"error:{e.endpoint}:{e.kind}", "detail": str(e)[:300]}
        parsed = parse_reply(reply.content, reply.reasoning)
        if parsed.reason:
            return {"status": "dropped", "reason": parsed.reason}
        info = (await asyncio.to_thread(self.verifier.score, [f"<think>x</think><answer>{parsed.answer}</answer>"],
                                        [item.answer]))[0]
        if not info.correct:
            return {"status": "dropped", "reason": "wrong_answer", "detail": f"{parsed.answer!r} vs {item.answer!r}"}
        reason, think = check_thinking(parsed.think, self.filters)
        if reason:
            return {"status": "dropped", "reason": reason}
        return {"status": "kept", "reason": None, "sample": self.sample(item, think, parsed.answer)}

    def sample(self, item: Item, think: str, answer: str) -> dict:
        images = []
        for k, image in enumerate(item.images):
            if isinstance(image, bytes):  # an embedded image: written beside the output
                path = self.out / "images" / f"{item.index:07d}_{k}.png"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(image)
                image = path
            images.append(os.path.relpath(image, self.out))
        question = item.question if IMAGE_PLACEHOLDER in item.question or not images else \
            IMAGE_PLACEHOLDER * len(images) + item.question
        return {"id": item.id, "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"<think>\n{think}\n</think><answer> Final Answer: {answer} </answer>"}],
            "images": images}

    def finish(self, items: list[Item], done: dict[str, dict], started: float) -> dict:
        kept = [done[i.id]["sample"] for i in items if i.id in done and done[i.id]["status"] == "kept"]
        dropped: dict[str, int] = {}
        for i in items:
            row = done.get(i.id)
            if row is not None and row["status"] == "dropped":
                dropped[row["reason"]] = dropped.get(row["reason"], 0) + 1
        report = {"input": len(items), "kept": len(kept), "dropped": dict(sorted(dropped.items())),
                  "pending": sum(i.id not in done for i in items),
                  "usage": {"mllm": self.mllm.usage.as_dict(), "reasoner": self.reasoner.usage.as_dict()},
                  "seconds_this_run": round(time.perf_counter() - started, 2)}
        write_whole(self.out / SFT, json.dumps(kept, indent=1, ensure_ascii=False))
        write_whole(self.out / REPORT, json.dumps(report, indent=1))
        return report

    async def run(self, items: list[Item], progress: bool) -> dict:
        from tqdm import tqdm

        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        journal_path = self.out / JOURNAL
        done = read_journal(journal_path)
        if self.cfg.retry_failed:  # endpoint failures get another go: their lines are taken out
            failed = {k for k, v in done.items() if str(v.get("reason", "")).startswith("error:")}
            if failed:
                done = {k: v for k, v in done.items() if k not in failed}
                write_whole(journal_path, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in done.values()))
        todo = [i for i in items if i.id not in done]
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="coldstart", unit="record",
                   disable=not progress)
        counts = {"kept": sum(v["status"] == "kept" for v in done.values())}
        counts["dropped"] = len(done) - counts["kept"]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        limit = asyncio.Semaphore(max(1, int(self.cfg.max_records_in_flight)))
        journal = open(journal_path, "a")

        async def one(item: Item) -> None:
            async with limit:
                if stop.is_set():
                    return
                row = {"id": item.id, "index": item.index, **(await self.process(item))}
            # one event loop thread writes: each line whole, on disk before it counts as done
            journal.write(json.dumps(row, ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            done[item.id] = row
            counts[row["status"]] += 1
            tokens = self.mllm.usage.completion_tokens + self.reasoner.usage.completion_tokens
            bar.set_postfix(kept=counts["kept"], dropped=counts["dropped"],
                            tok_s=f"{tokens / max(1e-9, time.perf_counter() - started):.0f}", refresh=False)
            bar.update(1)

        tasks = [asyncio.create_task(one(i)) for i in todo]
        waiter = asyncio.create_task(stop.wait())
        try:
            pending = set(tasks)
            while pending and not stop.is_set():
                _, pending = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(waiter)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            waiter.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            bar.close()
            journal.close()
            self.verifier.close()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        report = self.finish(items, done, started)
        report["stopped"] = stop.is_set()
        return report
