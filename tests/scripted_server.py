"""A real HTTP server on loopback that speaks the OpenAI chat-completions API with scripted
replies: the endpoint the clients under test (the LLM answer-extractor, the cold-start pipeline)
talk to in the tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

# reply(request_body) -> (HTTP status, reply text (or message fields) or error text, extra headers);
# the header X-Raw-Body: 1 sends the text as the whole body instead
Script = Callable[[dict], tuple[int, str, dict]]


def completion(text, model: str = "scripted", prompt_tokens: int = 10, completion_tokens: int = 5) -> str:
    """A chat completion replying ``text`` (or a dict of message fields, e.g. reasoning_content)."""
    message = {"role": "assistant", **(text if isinstance(text, dict) else {"content": text})}
    return json.dumps({"id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}})


class ScriptedServer:
    """``with ScriptedServer(script) as server: client(base_url=server.url)``; ``server.requests``
    holds every request body received, in order."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    outer.requests.append(body)
                status, text, headers = outer.script(body)
                headers = dict(headers)
                if headers.pop("X-Raw-Body", None):  # sent as it is (e.g. malformed JSON)
                    payload = str(text).encode()
                else:
                    payload = (completion(text, body.get("model", "scripted")) if status == 200
                               else json.dumps({"error": {"message": text, "type": "scripted"}})).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
