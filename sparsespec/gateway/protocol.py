"""The OpenAI wire format: request bodies -> checked generation parameters, results -> responses.

Pure functions (no HTTP, no gRPC), so every rule is in one place: which fields are accepted,
their ranges, how a verifier's stop reason reads as an OpenAI `finish_reason`, what the
per-request speculation metrics are called. A refused field raises `HTTPError(400)` whose
`param` and message name it (`temperature: must be in [0, 2], got -1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc

from sparsespec.chat import chat_prompt_ids
from sparsespec.client import Request
from sparsespec.errors import InvalidArgument
from sparsespec.tokens import encode_prompt
from sparsespec.spec.adaptive import MAX_K

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable_error"}

DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions; chat: the room left
MAX_STOP = 16
INT64 = (-(1 << 63), (1 << 63) - 1)

# Fields we accept only at their "off" value (anything else is refused, never silently ignored).
UNSUPPORTED = {
    "echo": (False,), "suffix": (None, ""), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "function_call": (None, "none"), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


class HTTPError(Exception):
    """An error the client gets as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, problem: str) -> HTTPError:
    return HTTPError(400, f"{param}: {problem}", param, "invalid_value")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


@dataclass
class ModelLimits:
    """What the verifiers serve (GetModelInfo): requests are checked against it here."""
    vocab_size: int
    max_context: int


@dataclass
class GenParams:
    """One checked request: the SDK's Request the gateway sends the verifier, and how it answers."""
    request: Request                    # prompt: token ids
    prompt_field: str                   # "prompt" or "messages": where prompt errors point
    stream: bool = False
    include_usage: bool = False


@dataclass
class Defaults:
    k: int = 0
    adaptive: bool = False


# --- field checks ---------------------------------------------------------------------------

def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"must be a number, got {_shown(v)}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
    return float(v)


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(name, f"must be an integer, got {_shown(v)}")
    if lo is not None and v < lo:
        raise bad(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}, got {v}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {_shown(v)}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is None or model == "":
        raise bad("model", "is required")
    if not isinstance(model, str):
        raise bad("model", f"must be a string, got {_shown(model)}")
    if model != served:
        raise HTTPError(404, f"model: the model {_shown(model)} does not exist; this server serves "
                             f"{served!r}", "model", "model_not_found")


def _common(body: dict, prompt_ids: list[int], prompt_field: str, limits: ModelLimits | None,
            defaults: Defaults, default_max_tokens: int | None, max_tokens_names=("max_tokens",)) -> GenParams:
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad(name, "is not supported by this server")
    n = _int(body, "n", 1)
    if n != 1:
        raise bad("n", f"only n = 1 is supported, got {n}")
    max_tokens, mt_name = None, max_tokens_names[0]
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens, mt_name = _int(body, name, None, lo=1), name
            break
    if limits is not None:
        room = limits.max_context - len(prompt_ids)
        if room <= 0:
            raise bad(prompt_field, f"{len(prompt_ids)} tokens leave no room in the context limit of "
                                    f"{limits.max_context} tokens")
        if max_tokens is not None and max_tokens > room:
            raise bad(mt_name, f"{max_tokens} tokens do not fit: the prompt has {len(prompt_ids)} of the "
                               f"model's {limits.max_context}-token context, {room} are left")
        if max_tokens is None:
            max_tokens = min(default_max_tokens or room, room)
    elif max_tokens is None:
        max_tokens = default_max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", "must be an object")
        if not stream:
            raise bad("stream_options", "is only allowed with stream: true")
        include_usage = _bool(options, "include_usage", False)
    request = Request(
        prompt_ids, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, lo=0),
        seed=_int(body, "seed", None, lo=INT64[0], hi=INT64[1]),
        stop=_stop(body),
        k=_int(body, "k", defaults.k, lo=1, hi=MAX_K),
        adaptive=_bool(body, "adaptive", defaults.adaptive))
    return GenParams(request, prompt_field, stream=stream, include_usage=include_usage)


def _token_ids(v, limits: ModelLimits | None) -> list[int] | None:
    if not isinstance(v, list) or not v or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return None
    top = limits.vocab_size if limits else None
    for t in v:
        if t < 0 or (top is not None and t >= top):
            raise bad("prompt", f"token id {t} is outside the vocabulary [0, {top})")
    return list(v)


def parse_completion(body: dict, tokenizer, limits: ModelLimits | None, defaults: Defaults) -> GenParams:
    """/v1/completions: `prompt` is a string or token ids (or a list holding exactly one of them)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "is empty")
        ids = encode_prompt(tokenizer, prompt)   # each request is a new session: its BOS, where needed
        if not ids:
            raise bad("prompt", "has no tokens")
    else:
        ids = _token_ids(prompt, limits)
        if ids is None:
            raise bad("prompt", "must be a string or a list of token ids (one prompt per request)")
    return _common(body, ids, "prompt", limits, defaults, DEFAULT_COMPLETION_MAX_TOKENS)


def parse_chat(body: dict, tokenizer, limits: ModelLimits | None, defaults: Defaults) -> GenParams:
    """/v1/chat/completions: `messages` through the chat template (sparsespec/chat.py)."""
    if body.get("messages") is None:
        raise bad("messages", "is required")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad("response_format", "only {'type': 'text'} is supported")
    try:
        ids = chat_prompt_ids(tokenizer, body["messages"])
    except InvalidArgument as e:
        raise bad(e.field, str(e).split(": ", 1)[-1]) from None
    return _common(body, ids, "messages", limits, defaults, None, ("max_completion_tokens", "max_tokens"))


# --- answers ----------------------------------------------------------------------------------

def finish_reason(stop_reason: str) -> str:
    """The verifier's stop reason as OpenAI's: EOS or a stop string -> stop, a token limit -> length."""
    return "length" if stop_reason in ("max_tokens", "context_limit") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def spec_decode(metrics: dict, params: GenParams) -> dict:
    """Per-request speculation metrics, named as vLLM's spec-decode metrics: drafts (speculative
    rounds), draft tokens, accepted tokens, their ratio and the mean acceptance length (tokens
    committed per verifier forward, tau), plus the draft length and whether it adapted."""
    m = metrics or {}
    return {
        "num_drafts": m.get("rounds", 0), "num_draft_tokens": m.get("drafted", 0),
        "num_accepted_tokens": m.get("accepted", 0), "acceptance_rate": m.get("alpha", 0.0),
        "mean_acceptance_length": m.get("tau", 0.0),
        "acceptance_rate_per_position": m.get("per_position_acceptance", []),
        "mean_draft_length": m.get("k", 0.0), "adaptive": params.request.adaptive,
        "ar_steps": m.get("ar_steps", 0), "drafter_failures": m.get("drafter_failures", 0),
    }


def completion_body(rid: str, created: int, model: str, text: str | None, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def chat_body(rid: str, created: int, model: str, text: str, finish: str) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


# --- verifier errors --------------------------------------------------------------------------

_PARAMS = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
           "sampling.seed": "seed", "max_tokens": "max_tokens", "k": "k", "stop": "stop",
           "adaptive": "adaptive"}


def from_verifier(code: grpc.StatusCode, message: str, prompt_field: str) -> HTTPError:
    """A verifier's refusal (after the SDK's retries) as the HTTP error a client can act on."""
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        name = message.split(":", 1)[0].strip()
        param = _PARAMS.get(name, prompt_field if name in ("prompt", "text", "token_ids") else None)
        return HTTPError(400, message, param, "invalid_value")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return HTTPError(401, f"the verifier refused the API key ({message})", None, "invalid_api_key")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return HTTPError(429, f"the verifiers are at capacity, retry later ({message})", None, "overloaded")
    if code == grpc.StatusCode.NOT_FOUND:
        return HTTPError(404, message, None, "not_found")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION):
        return HTTPError(503, f"no verifier could serve the request: {message}", None, "unavailable")
    return HTTPError(500, f"the verifier failed: {message}", None, "internal_error")


# --- streamed text -----------------------------------------------------------------------------

@dataclass
class TextStream:
    """Tokens in, text out, as a client may see it: decoded from all tokens so far (so a
    character split across tokens comes whole), holding back a trailing partial character and
    any tail that may be the start of a stop string, and cut where a stop string begins."""
    tokenizer: object
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0                                   # characters handed out

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self._text()
        safe = len(text.rstrip("\ufffd"))
        cut = self._cut(text)
        if cut is not None:
            safe = min(safe, cut)
        else:
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        safe = min(safe, len(text) - n)
                        break
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent:safe], safe
        return out

    def finish(self, stop_reason: str) -> str:
        """The rest of the text once the turn ended (cut at the stop string when it stopped there)."""
        text = self._text()
        cut = self._cut(text) if stop_reason == "stop" else None
        if cut is not None:
            text = text[:cut]
        out, self.sent = text[self.sent:], max(self.sent, len(text))
        return out
