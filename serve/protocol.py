"""The OpenAI wire format: request validation, response and stream-chunk bodies, errors.

Kept apart from the FastAPI app so the rules a request must meet (and the
exact JSON a client gets back) can be read in one place.  Validation is done
by hand rather than with pydantic models so every rejection carries OpenAI's
error shape, names the offending ``param`` and says what would be accepted.
Unknown fields are ignored, as OpenAI's clients send new fields over time.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tritium.serve.grammar import StructuredOutput
from tritium.serve.sampling import INT64_MAX, SEED_MAX, SEED_MIN

# OpenAI error types by HTTP status (what the official clients map to exception classes).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ServeError(Exception):
    """An error answered with OpenAI's error body; ``kind`` labels it in the errors metric."""

    def __init__(self, status: int, message: str, *, kind: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code or kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"), self.param,
                          self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(400, message, kind="invalid_request", param=param, code=code)


@dataclass
class ParsedRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool  # chat/completions (messages) or completions (prompt)
    model: str | None  # requested model id (None = the served one)
    prompts: list[str | list[int]]  # completions: text or token-id prompts (one choice set each)
    messages: list[dict[str, str]] | None  # chat: messages with plain-text content
    max_tokens: int | None  # None = fill to the cap / context
    n: int  # choices per prompt
    stream: bool  # answer as Server-Sent Events
    include_usage: bool  # stream_options.include_usage: a final chunk with usage and no choices
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams keyword arguments
    use_retrieval: bool = True  # extension: "retrieval": false skips --docs for this request
    logprobs: bool = False  # return the chosen tokens' log-probabilities
    structured: StructuredOutput | None = None  # response_format / guided_regex / guided_choice
    structured_param: str | None = None  # the request field it came from (named by a 400)


MAX_JSON_DEPTH = 32  # OpenAI's bodies nest 4 deep (messages[i].content[j].text); 32 leaves room


def parse_json(raw: bytes) -> Any:
    """Parse a request body: invalid JSON, nesting deeper than ``MAX_JSON_DEPTH`` and text that is not
    valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON allows) are 400s naming the
    place, so nothing malformed reaches the tokenizer or the engine."""
    try:
        body = json.loads(raw)
    except RecursionError:  # CPython's parser recurses per level: a deep enough body overflows it
        raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json") \
            from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and a number of over 4300 digits
        raise bad_request(f"invalid JSON in request body: {exc}", code="invalid_json") from None
    check_json_value(body)
    return body


def check_json_value(value: Any) -> None:
    """Depth limit and valid-Unicode check over a parsed body, iteratively (no recursion to overflow)."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep (at {path})",
                              path.split("[")[0].split(".")[0] or None, code="invalid_json")
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, f"{path}.{key!a}" if path else repr(key))
                stack.append((child, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{path or 'request body'} holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x} "
                          f"at character {exc.start}); text must be valid Unicode", path or None,
                          code="invalid_text") from None


def parse_request(body: Any, *, chat: bool, max_n: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model", "invalid_type")

    messages = None
    prompts: list[str | list[int]] = []
    if chat:
        messages = _parse_messages(body.get("messages"))
    else:
        prompts = _parse_prompt(body.get("prompt"))
        if body.get("echo"):
            raise bad_request("'echo' is not supported by this server", "echo", "unsupported_parameter")
        best_of = body.get("best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise bad_request("'best_of' is not supported (set it equal to n or leave it out)", "best_of",
                              "unsupported_parameter")
    for unsupported in ("tools", "functions", "logit_bias", "suffix"):
        if body.get(unsupported):
            raise bad_request(f"'{unsupported}' is not supported by this server", unsupported,
                              "unsupported_parameter")
    structured, structured_param = parse_structured(body)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise bad_request(f"'{param}' must be an integer, got {max_tokens!r}", param, "invalid_type")
        if max_tokens < 1:
            raise bad_request(f"'{param}' must be at least 1, got {max_tokens}", param)

    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= max_n:
        raise bad_request(f"'n' must be an integer from 1 to {max_n}, got {n!r}", "n")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")

    sampling: dict[str, Any] = {}
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise bad_request(f"'{name}' must be a number, got {value!r}", name, "invalid_type")
        sampling[name] = float(value)
    if "temperature" in sampling and not 0 <= sampling["temperature"] <= 2:
        raise bad_request(f"'temperature' must be in [0, 2], got {sampling['temperature']}", "temperature")
    for name in ("presence_penalty", "frequency_penalty"):
        if name in sampling and not -2 <= sampling[name] <= 2:
            raise bad_request(f"'{name}' must be in [-2, 2], got {sampling[name]}", name)
    if "top_p" in sampling and not 0 < sampling["top_p"] <= 1:
        raise bad_request(f"'top_p' must be in (0, 1], got {sampling['top_p']}", "top_p")
    if "min_p" in sampling and not 0 <= sampling["min_p"] <= 1:
        raise bad_request(f"'min_p' must be in [0, 1], got {sampling['min_p']}", "min_p")
    if "repetition_penalty" in sampling and not sampling["repetition_penalty"] > 0:
        raise bad_request(f"'repetition_penalty' must be > 0, got {sampling['repetition_penalty']}",
                          "repetition_penalty")
    for name, low, high in (("top_k", -1, INT64_MAX), ("seed", SEED_MIN, SEED_MAX)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise bad_request(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
        if not low <= value <= high:
            raise bad_request(f"'{name}' must be an integer from {low} to {high}, got {value}", name)
        sampling[name] = value
    stop = body.get("stop")
    if stop is not None:
        stop_list = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop_list, list) or not all(isinstance(s, str) and s for s in stop_list) \
                or len(stop_list) > 16:
            raise bad_request("'stop' must be a non-empty string or a list of up to 16 non-empty strings", "stop")
        sampling["stop"] = tuple(stop_list)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(i) and 0 <= i <= INT64_MAX for i in stop_ids):
            raise bad_request("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        sampling["stop_token_ids"] = tuple(stop_ids)
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise bad_request("'ignore_eos' must be a boolean", "ignore_eos", "invalid_type")
        sampling["ignore_eos"] = ignore_eos

    logprobs_value = body.get("logprobs")
    if chat:
        if logprobs_value is not None and not isinstance(logprobs_value, bool):
            raise bad_request("'logprobs' must be a boolean", "logprobs", "invalid_type")
        if body.get("top_logprobs"):
            raise bad_request("'top_logprobs' is not supported (only the chosen token's log-probability)",
                              "top_logprobs", "unsupported_parameter")
        logprobs = bool(logprobs_value)
    else:
        if logprobs_value is not None and (not _is_int(logprobs_value) or not 0 <= logprobs_value <= 1):
            raise bad_request("'logprobs' must be 0 or 1 here (alternatives are not reported)", "logprobs")
        logprobs = bool(logprobs_value)

    use_retrieval = body.get("retrieval", True)
    if not isinstance(use_retrieval, bool):
        raise bad_request("'retrieval' must be a boolean", "retrieval", "invalid_type")
    return ParsedRequest(chat=chat, model=model, prompts=prompts, messages=messages, max_tokens=max_tokens, n=n,
                         stream=stream, include_usage=include_usage, sampling=sampling,
                         use_retrieval=use_retrieval, logprobs=logprobs, structured=structured,
                         structured_param=structured_param)


_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name


def parse_structured(body: dict[str, Any]) -> tuple[StructuredOutput | None, str | None]:
    """The request's structured-output constraint and the field it came from.

    OpenAI's ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}``; and vLLM's
    extra fields ``guided_regex`` (a pattern the whole answer matches) and ``guided_choice`` (a list of
    strings; the answer is exactly one of them).  At most one of them per request; anything malformed is
    a 400 naming the field.
    """
    found: list[tuple[StructuredOutput, str]] = []
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise bad_request("'response_format' must be an object such as {'type': 'json_object'}",
                              "response_format", "invalid_type")
        kind = response_format.get("type")
        if kind == "json_object":
            found.append((StructuredOutput.json_object(), "response_format"))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object with 'name' "
                                  "and 'schema'", "response_format")
            name = spec.get("name")
            if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
                raise bad_request("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', got "
                                  f"{name!r}", "response_format")
            if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
                raise bad_request("response_format.json_schema.strict must be a boolean", "response_format",
                                  "invalid_type")
            try:
                found.append((StructuredOutput.json_schema(spec.get("schema")), "response_format"))
            except ValueError as exc:
                raise bad_request(f"response_format.json_schema.schema: {exc}", "response_format") from None
        elif kind != "text":
            raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format")
    for name, build in (("guided_regex", StructuredOutput.regex), ("guided_choice", StructuredOutput.choice)):
        value = body.get(name)
        if value is None:
            continue
        try:
            found.append((build(value), name))
        except ValueError as exc:
            raise bad_request(f"'{name}': {exc}", name) from None
    if len(found) > 1:
        raise bad_request(f"at most one structured-output constraint per request, got {[n for _, n in found]}",
                          found[1][1])
    return found[0] if found else (None, None)


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role must be a non-empty string", f"{where}.role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content: only text parts are supported", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        parsed.append({"role": role, "content": content})
    return parsed


def _parse_prompt(prompt: Any) -> list[str | list[int]]:
    message = "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) and t >= 0 for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad_request(message, "prompt")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sampling_error_param(exc: ValueError) -> str | None:
    """The parameter a ``SamplingParams`` validation error names (``SamplingParams.top_p must ...``)."""
    match = re.search(r"SamplingParams\.(\w+)", str(exc))
    return match.group(1) if match else None


# ---------------------------------------------------------------------- response bodies
def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens`` (prompt tokens served from the prefix cache) goes in
    ``prompt_tokens_details`` as OpenAI reports it."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]] | None, before: bytes = b"") -> dict[str, Any] | None:
    """The legacy completions logprobs object; ``before`` is the UTF-8 of the choice's earlier tokens.

    ``text_offset`` is a character offset into the text, counted from the tokens' own bytes (a token
    that ends inside a multi-byte character starts where that character starts)."""
    if entries is None:
        return None
    offsets, seen = [], bytearray(before)
    for e in entries:
        offsets.append(len(bytes(seen).decode("utf-8", errors="ignore")))
        seen += bytes(e["bytes"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{} for _ in entries], "text_offset": offsets}


def full_response(req: ParsedRequest, rid: str, model: str, choices: list[dict[str, Any]],
                  usage_: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed body; each choice dict has index, text, finish_reason, logprobs (entries or None)."""
    out_choices = []
    for c in choices:
        if req.chat:
            out_choices.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                                "logprobs": chat_logprobs(c["logprobs"]), "finish_reason": c["finish_reason"]})
        else:
            out_choices.append({"index": c["index"], "text": c["text"],
                                "logprobs": completion_logprobs(c["logprobs"]), "finish_reason": c["finish_reason"]})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": out_choices, "usage": usage_,
            "system_fingerprint": None, **extra}


class ChunkWriter:
    """Builds the ``data: {...}`` lines of one streamed response."""

    def __init__(self, req: ParsedRequest, rid: str, model: str):
        self.req = req
        self.rid = rid
        self.model = model
        self.created = int(time.time())
        self.token_bytes: dict[int, bytes] = {}  # per choice: UTF-8 of the tokens streamed so far

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = {"id": self.rid, "object": "chat.completion.chunk" if self.req.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if self.req.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def role(self, index: int, **extra: Any) -> dict[str, Any] | None:
        """Chat streams open each choice with the assistant role (OpenAI does the same)."""
        if not self.req.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], **extra)

    def delta(self, index: int, text: str, logprobs: list[dict[str, Any]] | None = None,
              finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        if self.req.chat:
            choice = {"index": index, "delta": {"content": text} if text else {},
                      "logprobs": chat_logprobs(logprobs), "finish_reason": finish_reason}
        else:
            before = self.token_bytes.get(index, b"")
            self.token_bytes[index] = before + b"".join(bytes(e["bytes"]) for e in logprobs or [])
            choice = {"index": index, "text": text, "logprobs": completion_logprobs(logprobs, before),
                      "finish_reason": finish_reason}
        return self._chunk([choice], **extra)

    def usage_chunk(self, usage_: dict[str, Any], **extra: Any) -> dict[str, Any]:
        chunk = self._chunk([], **extra)
        chunk["usage"] = usage_
        return chunk


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
