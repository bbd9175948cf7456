"""An OpenAI-compatible HTTP server on the standard library (`python serve.py`).

    POST /v1/chat/completions   messages (string content or text / image_url / video_url parts), max_tokens or
                                max_completion_tokens, temperature, top_p, top_k, seed, stop, n=1, stream
    GET  /v1/models             the one model served;  GET /health: {"status": "ok", batching counters}

Requests and responses follow OpenAI's chat-completions shapes (checked in tests/test_serve.py with the `openai`
client): a `chat.completion` with `usage`, or server-sent `chat.completion.chunk` events ending in
`data: [DONE]`. Every request is checked and turned into prompt ids and pixels in its own HTTP thread; the
model runs in batching.Batcher's one worker thread, which batches whatever is waiting.
Errors are `{"error": {"message", "type", "code", "param"}}`: 400 bad JSON, bad or unsupported part, bad
image, prompt past the context (with the counts); 401 wrong key; 404 unknown path; 413 body or image too
large; 422 a sampling value out of range; 500 a bug (the server keeps going).
Safety: images come inline as base64 `data:` URLs or as paths under `--media-root` (resolved, so `..` and
symlinks cannot leave it); remote URLs are refused, nothing is fetched, nothing from a request is evaluated.
"""

import base64
import binascii
import hmac
import json
import os
import re
import tempfile
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

from .batching import Batcher, Job

CONTEXT = re.compile(r"prompt is (?:at least )?(\d+) tokens long")  # the processor's context refusal


class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "code": code, "param": param}}


def invalid(param, message):
    return APIError(422, message, code="invalid_value", param=param)


def _number(body, name, default, lo, hi=None, integer=False, open_lo=False):
    """body[name] checked: a number (an integer if asked) in [lo, hi] ((lo, hi] when open_lo); 422 if not."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise invalid(name, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if not ((lo < v) if open_lo else (lo <= v)) or (hi is not None and not v <= hi):  # NaN fails both
        span = f"in {'(' if open_lo else '['}{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise invalid(name, f"{name} must be {span}, got {v}")
    return v


class App:
    """What the handlers share: the model's processor and batcher, the served name and the limits."""

    def __init__(self, model, proc, name, api_key=None, media_root=None, max_body_mb=64, max_media_mb=20,
                 default_max_tokens=512, max_batch=8):
        self.proc, self.name, self.api_key = proc, name, api_key
        self.media_root = os.path.realpath(media_root) if media_root else None
        self.max_body, self.max_media = int(max_body_mb * 2**20), int(max_media_mb * 2**20)
        self.context, self.default_max_tokens = model.cfg.text.max_position_embeddings, default_max_tokens
        self.batcher = Batcher(model, proc.eos_token_ids, proc.decode, max_batch)
        self.created = int(time.time())

    def job(self, body):
        """A request body (dict) → (Job, stream?, include usage in the stream?); APIError if it is refused."""
        for name in ("tools", "functions"):
            if body.get(name):
                raise APIError(400, f"{name} are not supported", code="unsupported_parameter", param=name)
        if body.get("logprobs"):
            raise APIError(400, "logprobs are not supported", code="unsupported_parameter", param="logprobs")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        which = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({which: max_tokens}, which, None, 1, integer=True)
        # temperature defaults to 0 (greedy, as sample.py), not to OpenAI's 1: answers are reproducible
        sampling = dict(temperature=_number(body, "temperature", 0.0, 0, 2),
                        top_p=_number(body, "top_p", None, 0, 1, open_lo=True),
                        top_k=_number(body, "top_k", None, 1, integer=True),
                        seed=_number(body, "seed", None, -2**63, 2**64 - 1, integer=True))
        if sampling["seed"] is not None:
            sampling["seed"] %= 2**64  # torch's seeds are unsigned 64-bit
        if _number(body, "n", 1, 1, integer=True) != 1:
            raise invalid("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0, -2, 2):
                raise invalid(name, f"{name} is not supported (only 0)")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise invalid("stop", "stop must be a string or a list of at most 4 strings")
        stream, options = body.get("stream") or False, body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise invalid("stream", "stream must be true or false and stream_options an object")
        ids, pixels = self.prompt(body.get("messages"))
        n = len(ids)
        if max_tokens is not None and n + max_tokens > self.context:
            raise context_error(self.context, f"you requested {n + max_tokens} tokens ({n} in the messages, "
                                              f"{max_tokens} in the completion)")
        if n >= self.context:
            raise context_error(self.context, f"your messages resulted in {n} tokens, leaving no room for an answer")
        max_new = max_tokens or min(self.default_max_tokens, self.context - n)
        job = Job(ids, pixels, max_new, stop=stop, **sampling)
        return job, stream, bool(options.get("include_usage"))

    def prompt(self, messages):
        """OpenAI messages → (prompt ids, pixel values or None), media resolved and decoded here."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        chat, images, videos, names = [], [], [], {}
        with tempfile.TemporaryDirectory(prefix="minterleave-serve-") as tmp:
            for i, m in enumerate(messages):
                where = f"messages[{i}]"
                role = m.get("role") if isinstance(m, dict) else None
                role = "system" if role == "developer" else role
                if role not in ("system", "user", "assistant"):
                    raise APIError(400, f"{where}: role must be system, user or assistant, got {json.dumps(role)}",
                                   param=f"{where}.role")
                content = m.get("content")
                if content is None and role == "assistant":
                    content = ""
                if isinstance(content, str):
                    chat.append({"role": role, "content": content})
                    continue
                if not isinstance(content, list):
                    raise APIError(400, f"{where}.content must be a string or a list of parts", param=where)
                parts = []
                for k, part in enumerate(content):
                    at = f"{where}.content[{k}]"
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        parts.append({"type": "text", "text": part["text"]})
                    elif kind in ("image_url", "video_url") and role == "user":
                        ref = part.get(kind)
                        url = ref.get("url") if isinstance(ref, dict) else ref
                        path = self.media(url, kind, tmp, at, len(names))
                        names[path] = at
                        (images if kind == "image_url" else videos).append(path)
                        parts.append({"type": "image" if kind == "image_url" else "video"})
                    else:
                        raise APIError(400, f"{at}: unsupported content part {json.dumps(kind)} (supported: text; "
                                            "image_url and video_url in user messages)", param=at)
                chat.append({"role": role, "content": parts})
            try:
                inputs = self.proc(self.proc.apply_chat_template(chat), images=images or None, videos=videos or None)
            except (OSError, ValueError) as e:
                message = str(e)
                for path, at in names.items():  # name the request's part, not our temporary file
                    message = message.replace(path, at)
                found = CONTEXT.search(message)
                if found:
                    raise context_error(self.context, f"your messages resulted in {found.group(1)} tokens") from None
                raise APIError(400, message, code="invalid_media" if names else None) from None
        return inputs["input_ids"][0].tolist(), inputs.get("pixel_values")

    def media(self, url, kind, tmp, at, k):
        """A data: URL written to a temporary file, or a local path inside --media-root → a file path."""
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{at}: {kind} needs a url", param=at)
        if url.startswith("data:"):
            header, comma, payload = url[5:].partition(",")
            if not comma or not header.endswith(";base64"):
                raise APIError(400, f"{at}: only base64 data URLs are supported (data:<type>;base64,...)", param=at)
            if len(payload) // 4 * 3 > self.max_media:
                raise APIError(413, f"{at}: {kind} is over {self.max_media // 2**20} MB", param=at)
            try:
                raw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, f"{at}: the data URL is not valid base64", param=at) from None
            path = os.path.join(tmp, f"media{k}")
            with open(path, "wb") as f:
                f.write(raw)
            return path
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise APIError(400, f"{at}: {parsed.scheme} URLs are refused: this server never fetches from the network; "
                                "send the file inline as a base64 data URL", param=at)
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"{at}: a file URL names a local absolute path: file:///path", param=at)
        if self.media_root is None:
            raise APIError(400, f"{at}: local paths are refused: the server was started without --media-root", param=at)
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        full = os.path.realpath(os.path.join(self.media_root, path))  # symlinks resolved too
        if ".." in path.replace("\\", "/").split("/") or not full.startswith(self.media_root + os.sep):
            raise APIError(400, f"{at}: {path} is outside --media-root", param=at)
        if not os.path.isfile(full):
            raise APIError(400, f"{at}: no such file under --media-root: {path}", param=at)
        if os.path.getsize(full) > self.max_media:
            raise APIError(413, f"{at}: {kind} is over {self.max_media // 2**20} MB", param=at)
        return full


def context_error(limit, what):
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, {what}.",
                    code="context_length_exceeded", param="messages")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; a stream ends by closing its connection
    server_version = "minterleave"

    def _json(self, status, obj, close=False):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # the body was not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e, close=False):
        self._json(e.status, e.body, close)

    def do_GET(self):
        app = self.server.app
        model = {"id": app.name, "object": "model", "created": app.created, "owned_by": "minterleave"}
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [model]})
        if path == f"/v1/models/{app.name}":
            return self._json(200, model)
        if path == "/health":
            return self._json(200, {"status": "ok", **app.batcher.stats})
        self._error(APIError(404, f"no such endpoint: GET {path}", code="not_found"))

    def do_POST(self):
        app = self.server.app
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            return self._error(APIError(404, f"no such endpoint: POST {self.path}", code="not_found"), close=True)
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if app.api_key is not None and not hmac.compare_digest(given.encode(), app.api_key.encode()):
            return self._error(APIError(401, "invalid API key", code="invalid_api_key"), close=True)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(APIError(411, "a Content-Length header is required"), close=True)
        if int(length) > app.max_body:
            return self._error(APIError(413, f"request body of {int(length)} bytes is over the limit of "
                                             f"{app.max_body // 2**20} MB", code="request_too_large"), close=True)
        try:
            body = json.loads(self.rfile.read(int(length)))
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._error(APIError(400, f"invalid JSON body: {e}", code="invalid_json"))
        try:
            job, stream, usage = app.job(body)
        except APIError as e:
            return self._error(e)
        except Exception as e:  # noqa: BLE001 (a bug: said as a 500, and the server goes on)
            return self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
        app.batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": app.name}
        count = lambda n: {"prompt_tokens": len(job.ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(job.ids) + n}
        if not stream:
            pieces = []
            for event in job.stream():
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    return self._error(APIError(500, f"internal error: {event[1]}", type="server_error"))
            message = {"role": "assistant", "content": "".join(pieces)}
            return self._json(200, {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": event[1]}],
                "usage": count(event[2])})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        chunk = lambda delta, finish=None: {**head, "object": "chat.completion.chunk", "choices": [  # noqa: E731
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            for event in job.stream():
                if event[0] == "text":
                    self._event(chunk({"content": event[1]}))
                elif event[0] == "error":  # headers are sent: the error goes in the stream, as OpenAI's does
                    self._event(APIError(500, f"internal error: {event[1]}", type="server_error").body)
                else:
                    self._event(chunk({}, event[1]))
                    if usage:
                        self._event({**head, "object": "chat.completion.chunk", "choices": [],
                                     "usage": count(event[2])})
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True  # the client went away: its row leaves the batch

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def make_server(app, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer (one thread per connection) serving `app`; call serve_forever()."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app
    return server
