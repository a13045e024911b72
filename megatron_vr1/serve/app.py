"""The OpenAI chat-completions API over a rollout engine, on FastAPI.

``POST /v1/chat/completions`` takes messages whose content is text or a list of ``text`` and
``image_url`` parts (images as ``data:`` URIs: nothing is fetched), and ``temperature``,
``top_p``, ``max_tokens`` (or ``max_completion_tokens``), ``n``, ``seed`` and ``stop``.
``GET /v1/models`` lists the one model. Requests are generated one batch at a time: those that
arrive while the engine is busy wait in a queue and go together when their settings match.
"""

# no `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time

import asyncio
import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from ..data import ImageConfig
from ..data.images import load_image, process_images
from ..data.template import IMAGE_PLACEHOLDER, SampleError, build_sample
from ..rl.rollout import SamplingParams


class RequestError(ValueError):
    """A request the server cannot serve: HTTP 400 with this message."""


def decode_data_uri(url: str) -> bytes:
    if not url.startswith("data:"):
        raise RequestError(f"image_url must be a data: URI (the server fetches nothing), got {url[:40]!r}")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError("image data URI must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image data URI is not valid base64: {e}") from e


def chat_messages(messages: Any) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> the template's messages (with ``<image>`` where each image was) and the
    images' bytes, in order."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must have role system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts")
        text = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(decode_data_uri(str(url)))
                text.append(IMAGE_PLACEHOLDER)
            else:
                raise RequestError(f"messages[{i}].content[{j}]: unknown part type {kind!r} (text or image_url)")
        out.append({"role": m["role"], "content": "".join(text)})
    return out, images


@dataclass
class Job:
    sample: Any
    params: SamplingParams
    future: asyncio.Future


class Server:
    def __init__(self, engine, args, image_cfg: ImageConfig, model_name: str, *, max_prompt_tokens: int = 16384,
                 default_max_tokens: int = 1024) -> None:
        self.engine, self.args, self.image_cfg = engine, args, image_cfg
        self.model_name, self.max_prompt_tokens, self.default_max_tokens = model_name, max_prompt_tokens, default_max_tokens
        self.queue: Optional[asyncio.Queue] = None

    def prompt(self, body: dict):
        messages, images = chat_messages(body.get("messages"))
        try:
            decoded = [load_image(b) for b in images]
            pixel_values, grid = process_images(decoded, self.image_cfg)
            sample = build_sample(self.engine.tokenizer, self.args, messages, pixel_values, grid,
                                  image_cfg=self.image_cfg, system_prompt=None, add_generation_prompt=True)
        except (SampleError, ValueError) as e:
            raise RequestError(str(e)) from e
        if len(sample) > self.max_prompt_tokens:
            raise RequestError(f"prompt of {len(sample)} tokens exceeds the server's {self.max_prompt_tokens}")
        return sample

    def sampling(self, body: dict) -> SamplingParams:
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            params = SamplingParams(n=int(body.get("n") or 1),
                                    max_new_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens")
                                                       or self.default_max_tokens),
                                    temperature=float(body.get("temperature", 1.0)),
                                    top_p=float(body.get("top_p", 1.0)),
                                    seed=int(body["seed"]) if body.get("seed") is not None else
                                    uuid.uuid4().int % 2**31, stop=stop)
        except (TypeError, ValueError) as e:
            raise RequestError(f"bad sampling setting: {e}") from e
        if params.n < 1 or params.max_new_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1:
            raise RequestError("n and max_tokens must be >= 1, temperature >= 0, 0 < top_p <= 1")
        return params

    async def complete(self, body: dict) -> dict:
        if body.get("model") not in (None, self.model_name):
            raise LookupError(f"model {body.get('model')!r} is not served here; this server has {self.model_name!r}")
        if body.get("stream"):
            raise RequestError("stream=true is not supported")
        sample, params = self.prompt(body), self.sampling(body)
        job = Job(sample, params, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        completions = await job.future
        prompt_tokens = len(sample)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": i, "finish_reason": c.finish_reason,
                             "message": {"role": "assistant", "content": c.text}} for i, c in enumerate(completions)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(c.token_ids) for c in completions),
                          "total_tokens": prompt_tokens + sum(len(c.token_ids) for c in completions)}}

    async def worker(self) -> None:
        """Take what is queued, generate the jobs with equal settings together, answer them."""
        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            groups: dict[SamplingParams, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.params, []).append(job)
            for params, group in groups.items():
                try:
                    out = await asyncio.to_thread(self.engine.generate, [j.sample for j in group], params)
                except Exception as e:  # a failed batch fails its requests, not the server
                    for j in group:
                        j.future.set_exception(e)
                    continue
                for j, completions in zip(group, out):
                    j.future.set_result(completions)


def create_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        server.queue = asyncio.Queue()
        task = asyncio.create_task(server.worker())
        yield
        task.cancel()

    app = FastAPI(title="megatron-vr1", lifespan=lifespan)

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "megatron-vr1"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object", "invalid_request_error")
        try:
            return await server.complete(body)
        except RequestError as e:
            return error(400, str(e), "invalid_request_error")
        except LookupError as e:
            return error(404, str(e), "not_found_error")

    return app
