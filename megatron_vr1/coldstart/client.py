"""An OpenAI-compatible endpoint for the pipeline: the ``openai`` package's async client with
bounded requests in flight, retries with exponential back-off and full jitter that honour
``Retry-After``, a timeout per request, and token usage counted."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class EndpointSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"   # the variable holding the key (a local server takes any)
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 2048
    timeout: float = 120.0        # seconds per request
    max_retries: int = 5          # after the first try
    backoff: float = 0.5          # seconds; doubles per retry, full jitter
    max_backoff: float = 30.0     # and caps what Retry-After may ask for
    concurrency: int = 16         # requests in flight
    extra_body: dict = field(default_factory=dict)  # passed through (e.g. vLLM's top_k)


class EndpointError(RuntimeError):
    """A request that failed on every try; ``kind`` names how (http_429, http_500, timeout,
    connection, bad_response)."""

    def __init__(self, endpoint: str, kind: str, message: str) -> None:
        super().__init__(f"{endpoint}: {kind}: {message}")
        self.endpoint, self.kind = endpoint, kind


@dataclass
class Reply:
    content: str
    reasoning: Optional[str]  # DeepSeek-R1 style servers put the thinking here (reasoning_content)


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0          # summed over requests

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def image_part(path_or_bytes: Any) -> dict:
    """An ``image_url`` content part holding the image as a data URI."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data, mime = bytes(path_or_bytes), "image/png"
    else:
        data = Path(path_or_bytes).read_bytes()
        mime = mimetypes.guess_type(str(path_or_bytes))[0] or "image/png"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


class Endpoint:
    def __init__(self, name: str, settings: EndpointSettings) -> None:
        from openai import AsyncOpenAI

        self.name, self.settings = name, settings
        self.usage = Usage()
        self._slots = asyncio.Semaphore(max(1, int(settings.concurrency)))
        # retries are ours (to count them and report how a request failed), not the client's
        self.client = AsyncOpenAI(base_url=settings.base_url, api_key=os.environ.get(settings.api_key_env) or "none",
                                  timeout=settings.timeout, max_retries=0)

    async def close(self) -> None:
        await self.client.close()

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.settings.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own back-off
        return random.uniform(0, min(self.settings.max_backoff, self.settings.backoff * 2 ** attempt))

    async def chat(self, messages: list[dict]) -> Reply:
        import openai

        s = self.settings
        last: Optional[EndpointError] = None
        for attempt in range(int(s.max_retries) + 1):
            retry_after = None
            async with self._slots:
                start = time.perf_counter()
                try:
                    reply = await self.client.chat.completions.create(
                        model=s.model, messages=messages, temperature=s.temperature, top_p=s.top_p,
                        max_tokens=s.max_tokens, extra_body=s.extra_body or None)
                    message = reply.choices[0].message
                    content = message.content
                    if content is None:
                        raise ValueError("the reply has no content")
                except openai.APITimeoutError as e:
                    last = EndpointError(self.name, "timeout", str(e))
                except openai.APIStatusError as e:
                    last = EndpointError(self.name, f"http_{e.status_code}", e.message)
                    retry_after = e.response.headers.get("retry-after")
                    if e.status_code < 500 and e.status_code not in (408, 409, 429):
                        self.usage.failures += 1
                        raise last from e  # the request itself is wrong: asking again cannot help
                except openai.APIConnectionError as e:
                    last = EndpointError(self.name, "connection", str(e))
                except (ValueError, TypeError, AttributeError, IndexError, openai.APIResponseValidationError) as e:
                    last = EndpointError(self.name, "bad_response", f"{type(e).__name__}: {e}")
                else:
                    self.usage.requests += 1
                    self.usage.seconds += time.perf_counter() - start
                    if reply.usage is not None:
                        self.usage.prompt_tokens += int(reply.usage.prompt_tokens or 0)
                        self.usage.completion_tokens += int(reply.usage.completion_tokens or 0)
                    extra = message.model_extra or {}
                    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                    return Reply(content, reasoning)
            if attempt < int(s.max_retries):
                self.usage.retries += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
        self.usage.failures += 1
        raise last
