"""API keys for the public APIs (the verifier's gRPC Generation API, the HTTP gateway).

A client sends `authorization: Bearer KEY` (gRPC metadata or the HTTP header, as OpenAI's
clients do). The servers keep only SHA-256 hashes of the keys, and a session is bound to the hash
of the key that created it (kvstore/coord/sessions.py stores it with the session), so a key
never reaches Redis or a log. Keys come from a file (`--api-keys FILE`: one key per line, `#`
comments) or, without the flag, from the environment (SPARSESPEC_API_KEYS: keys separated by
commas or newlines, e.g. a Kubernetes Secret as env). Neither: no authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass

import grpc

from sparsespec.errors import InvalidArgument

ENV_KEYS = "SPARSESPEC_API_KEYS"       # the keys themselves, when no --api-keys FILE is given
ENV_CLIENT_KEY = "SPARSESPEC_API_KEY"  # the key `sparsespec generate` sends, without --api-key
HEADER = "authorization"               # gRPC metadata keys are lower case
MIN_KEY_CHARS = 16                     # a key is a secret, not a name: short ones are refused
_KEY = re.compile(r"[\x21-\x7e]+")     # printable ASCII without spaces (a header value)
PUBLIC_SERVICE = "/sparsespec.v1.Generation/"


def key_hash(key: str) -> str:
    """What is stored and compared: the key's SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(value: str | None) -> str | None:
    """The key in an `authorization` value (`Bearer KEY`); None when absent or another scheme."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class ApiKeys:
    hashes: frozenset[str]
    source: str = ""            # where they came from, for messages (never the keys)

    def __post_init__(self):
        if not self.hashes:
            raise InvalidArgument("api-keys", f"{self.source or 'the key list'} holds no key")

    def check(self, key: str | None) -> str | None:
        """The key's hash if it is one of ours, else None (compared in constant time)."""
        if not key:
            return None
        h = key_hash(key)
        ok = False
        for known in self.hashes:
            ok |= hmac.compare_digest(h, known)
        return h if ok else None


def parse_keys(text: str, source: str, flag: str = "api-keys", env: bool = False) -> ApiKeys:
    """Keys from a file's text (one per line) or the env var's (commas or newlines too)."""
    hashes = set()
    lines = re.split(r"[,\n]", text) if env else text.splitlines()
    for n, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        where = f"{source}" if env else f"{source} line {n}"
        if not _KEY.fullmatch(key):
            raise InvalidArgument(flag, f"{where}: a key must be printable ASCII without spaces")
        if len(key) < MIN_KEY_CHARS:
            raise InvalidArgument(flag, f"{where}: a key must be at least {MIN_KEY_CHARS} characters "
                                        f"(got {len(key)})")
        hashes.add(key_hash(key))
    return ApiKeys(frozenset(hashes), source)


def load_api_keys(path: str | None, flag: str = "api-keys", environ=os.environ) -> ApiKeys | None:
    """`--api-keys FILE`, else $SPARSESPEC_API_KEYS, else None (no authentication)."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InvalidArgument(flag, f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidArgument(flag, f"{path} is not UTF-8 text") from None
        return parse_keys(text, path, flag)
    if environ.get(ENV_KEYS, "").strip():
        return parse_keys(environ[ENV_KEYS], f"${ENV_KEYS}", flag, env=True)
    return None


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata a client sends."""
    return ((HEADER, f"Bearer {api_key}"),) if api_key else ()


def caller_hash(keys: ApiKeys | None, context) -> str:
    """The hash of the key a gRPC call carries ('' with authentication off). Only for calls the
    interceptor let through, so the key is valid."""
    if keys is None:
        return ""
    value = dict(context.invocation_metadata()).get(HEADER)
    return keys.check(bearer(value)) or ""


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses every call of the public Generation API without a valid key (UNAUTHENTICATED),
    before its request is parsed; health checks and other services pass."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(PUBLIC_SERVICE):
            return handler
        value = dict(details.invocation_metadata).get(HEADER)
        if self.keys.check(bearer(value)) is not None:
            return handler
        problem = "api key: missing (send 'authorization: Bearer KEY')" if not value else "api key: not valid"

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                   handler.response_serializer)
