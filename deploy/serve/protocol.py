"""The OpenAI wire format, without a server: request checking, the chat prompt, response shapes.

``parse_request(kind, body)`` turns a decoded JSON body of ``POST /v1/completions``
(``kind="completion"``) or ``POST /v1/chat/completions`` (``kind="chat"``) into an
``OpenAIRequest``, or raises ``ApiError`` (status, message, type, param, code) whose ``body()``
is OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}``.

Accepted parameters: ``model``; ``prompt`` (text or token ids; one prompt per request) or
``messages``; ``max_tokens`` (chat: also ``max_completion_tokens``); ``temperature`` in [0, 2]
(default 1, 0 = greedy); ``top_p`` in (0, 1]; ``top_k`` (ours: >= 0, 0 = off; -1 is read as
off too); ``seed``; ``stop`` (a string or up to 4); ``n`` (1 only); ``stream``;
``stream_options.include_usage``; ``user`` (ignored); ``ignore_eos`` (ours). OpenAI parameters
this server does not implement are accepted only at their neutral value (``logprobs`` null,
``echo`` false, penalties 0, ...); anything else, and any unknown key, is a 400 naming it.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from actors.coordinator import GenerationParams

KINDS = ("completion", "chat")
MAX_STOP = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
ROLES = ("system", "developer", "user", "assistant", "tool")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
INT64 = (-(2**63), 2**63 - 1)

# what a model without a chat template of its own is prompted with (see deploy/serve/app.py)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['name'] if message.get('name') else message['role'] | capitalize }}:\n"
    "{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)

COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
          "user", "ignore_eos")
ONLY = {"completion": ("prompt",), "chat": ("messages", "max_completion_tokens")}
# implemented only at their neutral value: key -> values that mean "off"
NEUTRAL = {
    "common": {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0)},
    "completion": {"echo": (False,), "best_of": (1,), "suffix": ("",)},
    "chat": {"top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
             "response_format": ({"type": "text"},)},
}


class ApiError(Exception):
    """An error the client gets as OpenAI's envelope, with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class OpenAIRequest:
    """One checked request. ``prompt`` is text or token ids (completions); ``messages`` are
    ``{"role", "content"[, "name"]}`` with text content (chat)."""

    kind: str
    model: str
    prompt: str | list[int] | None = None
    messages: tuple[dict, ...] | None = None
    max_tokens: int | None = None  # None: the kind's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False

    def params(self, max_new_tokens: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=float(self.temperature), top_p=float(self.top_p),
                                top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos, stop=self.stop)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


# -- checking a request ------------------------------------------------------------------------


def parse_request(kind: str, body) -> OpenAIRequest:
    """Check a decoded JSON body; raises ``ApiError`` (400) naming the first bad parameter."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {_json_type(body)}")
    _check_keys(kind, body)
    model = body.get("model")
    if model is None:
        raise invalid("model", "you must provide a model parameter")
    if not isinstance(model, str) or not model:
        raise invalid("model", f"model must be a non-empty string, got {_show(model)}")
    _check_n(body)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    include_usage = _stream_options(options)
    fields = dict(
        kind=kind, model=model, stream=stream, include_usage=include_usage,
        max_tokens=_max_tokens(kind, body),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, "[0, 2]"),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, "(0, 1]", open_low=True),
        top_k=_top_k(body), seed=_seed(body), stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos", False),
    )
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise invalid("user", f"user must be a string, got {_show(body['user'])}")
    if kind == "completion":
        return OpenAIRequest(prompt=_prompt(body), **fields)
    return OpenAIRequest(messages=_messages(body), **fields)


def _check_keys(kind: str, body: dict) -> None:
    known = set(COMMON) | set(ONLY[kind])
    neutral = NEUTRAL["common"] | NEUTRAL[kind]
    for key, value in body.items():
        if key in known:
            continue
        if key in neutral:
            if value is None or any(_same(value, v) for v in neutral[key]):
                continue
            allowed = " or ".join(repr(v) for v in neutral[key])
            raise invalid(key, f"{key} is not supported by this server (only null or {allowed}), got {_show(value)}",
                          "unsupported_parameter")
        raise invalid(key, f"unrecognized request argument supplied: {key}", "unrecognized_argument")


def _same(value, neutral) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def _check_n(body: dict) -> None:
    n = body.get("n")
    if n is None or (n == 1 and type(n) is int):
        return
    raise invalid("n", f"n must be 1 (this server returns one choice per request), got {_show(n)}")


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(key, f"{key} must be true or false, got {_show(value)}")
    return value


def _stream_options(options) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", f"stream_options must be an object, got {_show(options)}")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise invalid("stream_options", f"unrecognized stream_options: {', '.join(unknown)} (allowed: include_usage)")
    value = options.get("include_usage", False)
    if value is not None and not isinstance(value, bool):
        raise invalid("stream_options", f"stream_options.include_usage must be true or false, got {_show(value)}")
    return bool(value)


def _int(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, f"{key} must be an integer, got {_show(value)}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise invalid(key, f"{key} must be an integer {bound}, got {value}")
    return value


def _max_tokens(kind: str, body: dict) -> int | None:
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise invalid("max_tokens", "give max_completion_tokens or max_tokens, not both")
        return _int(body, "max_completion_tokens", 1)
    return _int(body, "max_tokens", 1)


def _number(body: dict, key: str, default: float, low: float, high: float, shown: str, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(key, f"{key} must be a number in {shown}, got {_show(value)}")
    if value > high or value < low or (open_low and value == low):
        raise invalid(key, f"{key} must be a number in {shown}, got {value}")
    return float(value)


def _top_k(body: dict) -> int:
    value = _int(body, "top_k", -1)
    return 0 if value in (None, -1) else value


def _seed(body: dict) -> int | None:
    return _int(body, "seed", *INT64)


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"stop must be a string or a list of strings, got {_show(value)}")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"stop takes at most {MAX_STOP} sequences, got {len(stops)}")
    if not all(stops):
        raise invalid("stop", "stop sequences must be non-empty strings")
    return tuple(stops)


def _prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("prompt", "you must provide a prompt parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt", f"this server takes one prompt per request, got a list of {len(prompt)}; "
                                "send them as separate requests")
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "prompt must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and not prompt:
        raise invalid("prompt", "prompt must not be empty")
    raise invalid("prompt", f"prompt must be a string or a list of token ids (integers), got {_show(prompt)}")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "you must provide a messages parameter")
    if not isinstance(messages, list):
        raise invalid("messages", f"messages must be a list of messages, got {_show(messages)}")
    if not messages:
        raise invalid("messages", "messages must not be empty")
    return tuple(_message(m, i) for i, m in enumerate(messages))


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where} must be an object with role and content, got {_show(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
    unknown = sorted(set(message) - {"role", "content", "name", "tool_call_id"})
    if unknown:
        raise invalid(where, f"{where} has unsupported fields: {', '.join(unknown)}")
    out = {"role": role, "content": _content(message.get("content"), where)}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str) or not NAME.match(name):
            raise invalid(f"{where}.name", f"{where}.name must be 1-64 letters, digits, '_' or '-', got {_show(name)}")
        out["name"] = name
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{where}.content", f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} "
                                                  f"(this model reads text only), got {_show(part)}")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where}.content", f"{where}.content must be a string or a list of text parts, got {_show(content)}")


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the prompt --------------------------------------------------------------------------------


def chat_prompt(tokenizer, messages) -> str:
    """The text a chat is continued from: the tokenizer's own chat template, or
    ``DEFAULT_CHAT_TEMPLATE`` when it has none."""
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def check_prompt_ids(ids: list[int], param: str, vocab_size: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid(param, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def max_new_tokens(request: OpenAIRequest, prompt_len: int, max_model_len: int) -> int:
    """The request's ``max_tokens`` (or its kind's default), checked against the context length."""
    room = max_model_len - prompt_len
    wanted = request.max_tokens
    if wanted is None:
        wanted = COMPLETION_DEFAULT_MAX_TOKENS if request.kind == "completion" else room
    if room < 1 or wanted > room:
        raise invalid(request.prompt_param,
                      f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} "
                      f"tokens and {wanted} more were requested ({prompt_len + wanted} in all). Shorten the prompt "
                      "or lower max_tokens", "context_length_exceeded")
    return wanted


# -- responses ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def specmoe_figures(metrics: dict | None) -> dict:
    """The ``specmoe`` field of a finished response: the coordinator's per-request figures."""
    m = metrics or {}
    rounds = m.get("rounds", 0)
    return {
        "rounds": rounds,
        "drafted": m.get("drafted", 0),
        "accepted": m.get("accepted", 0),
        "accepted_per_round": m.get("accepted", 0) / rounds if rounds else 0.0,
        "acceptance_rate": m.get("acceptance_rate", 0.0),
        "tokens_per_round": m.get("tokens_per_round", 0.0),
        "readmitted": m.get("readmitted", 0),
        "time_to_first_token_s": m.get("time_to_first_token_s"),
        "time_per_output_token_s": m.get("time_per_output_token_s"),
        "total_s": m.get("total_s"),
    }


@dataclass
class Response:
    """What one request's responses share: id, creation time, served model name, kind."""

    id: str
    model: str
    kind: str
    created: int = 0

    def __post_init__(self):
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, metrics: dict | None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            head = self._head("text_completion")
        return head | {"choices": [choice], "usage": usage(prompt_tokens, completion_tokens),
                       "specmoe": specmoe_figures(metrics)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False, **extra) -> dict:
        """One streamed chunk; ``first`` (chat) carries the assistant role."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._head("chat.completion.chunk") | {"choices": [choice]} | extra
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._head("text_completion") | {"choices": [choice]} | extra

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}
