"""The gateway's HTTP server (aiohttp): OpenAI routes in front of the verifiers' gRPC API.

Every request becomes one new session on a verifier, through the SDK (AsyncSparseSpecClient: it
fails over between verifiers and resumes a broken stream exactly once). The gateway holds no
session state: it tokenizes (prompt, chat template), checks fields, streams text, and maps the
verifier's statuses to HTTP. A client that goes away cancels its handler (aiohttp
handler_cancellation), which closes the SDK stream, which cancels the gRPC call: the verifier
cancels the turn and frees its row at the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from sparsespec import telemetry
from sparsespec.auth import HEADER, ApiKeys, bearer, load_api_keys
from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.gateway import protocol as P
from sparsespec.gateway.verifiers import VerifierPool
from sparsespec.redis_server import REDIS_URL_ENV, redact
from sparsespec.spec.adaptive import MAX_K
from sparsespec.tls import ClientTLS, client_tls, server_ssl_context

log = logging.getLogger("sparsespec.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    model: str                              # tokenizer source; the served id unless served_model_name
    verifiers: tuple[str, ...] = ()         # fixed verifier addresses, or:
    redis_url: str | None = None            # the Redis worker registry
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    default_k: int = 0                      # 0: each verifier's own default
    adaptive: bool = False
    reconnect_timeout_s: float = 10.0       # the SDK's failover window before a 503
    max_body_bytes: int = 4 << 20           # larger bodies: 413
    api_keys: ApiKeys | None = None         # checked here (401) and passed on to the verifier; None: passed on only
    verifier_tls: ClientTLS | None = None   # TLS to the verifiers; None: plaintext
    tls: ssl.SSLContext | None = None       # serve HTTPS with it (tls.server_ssl_context); None: plain HTTP

    def __post_init__(self):
        if not self.model:
            raise InvalidArgument("model", "is required (the served model: its tokenizer and id)")
        if bool(self.verifiers) == bool(self.redis_url):
            raise InvalidArgument("verifier", "give --verifier ADDR (repeatable) or --redis URL, one of them")
        for address in self.verifiers:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit():
                raise InvalidArgument("verifier", f"must be HOST:PORT, got {address!r:.80}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgument("redis", f"must be a redis://HOST:PORT/DB URL, got {redact(self.redis_url)!r:.80}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument("port", f"must be in [0, 65535], got {self.port}")
        if not 0 <= self.default_k <= MAX_K:
            raise InvalidArgument("k", f"must be in [0, {MAX_K}] (0: the verifier's default), got {self.default_k}")
        if not self.reconnect_timeout_s > 0:
            raise InvalidArgument("reconnect-timeout-s", f"must be > 0, got {self.reconnect_timeout_s}")
        if self.max_body_bytes < 1024:
            raise InvalidArgument("max-body-bytes", f"must be >= 1024, got {self.max_body_bytes}")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model


def _json(obj, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(obj, status=status, headers=headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Gateway:
    def __init__(self, cfg: GatewayConfig, tokenizer=None):
        from sparsespec.chat import load_chat_tokenizer
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_chat_tokenizer(cfg.model)
        self.pool = VerifierPool(cfg.verifiers, cfg.redis_url, cfg.model, cfg.reconnect_timeout_s,
                                 tls=cfg.verifier_tls)
        self.defaults = P.Defaults(k=cfg.default_k, adaptive=cfg.adaptive)
        self.created = int(time.time())
        self.limits: P.ModelLimits | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)     # like /health, without a key (scrapers)
        return app

    async def start(self) -> str:
        """Listen; returns the URL (`http://HOST:PORT`, `https://` with cfg.tls)."""
        await self.pool.start()
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                    shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, ssl_context=self.cfg.tls)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise SparseSpecError(f"port: cannot listen on {self.cfg.host}:{self.cfg.port}: {e.strerror}") from None
        host, port = self.runner.addresses[0][:2]
        self.url = f"{'https' if self.cfg.tls is not None else 'http'}://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.pool.close()

    # --- errors ------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error leaves as OpenAI's JSON; nothing a request does reaches the client as a
        traceback or stops the server. Each answer is counted by route and status (/metrics)."""
        resp = await self._answer(request, handler)
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        telemetry.HTTP_REQUESTS.labels(route, str(resp.status)).inc()
        return resp

    async def _answer(self, request: web.Request, handler):
        try:
            return await handler(request)
        except P.HTTPError as e:
            return _json(e.body(), e.status, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        except web.HTTPException as e:
            if e.status == 404:
                err = P.HTTPError(404, f"no route {request.method} {request.path}", None, "not_found")
            elif e.status == 405:
                err = P.HTTPError(405, f"method {request.method} is not allowed on {request.path}", None,
                                  "method_not_allowed")
            elif e.status == 413:
                err = P.HTTPError(413, f"the request body is larger than {self.cfg.max_body_bytes} bytes",
                                  None, "body_too_large")
            elif e.status < 400:
                raise
            else:
                err = P.HTTPError(e.status, e.reason or "error", None, None)
            return _json(err.body(), err.status)
        except (asyncio.CancelledError, ConnectionError):
            raise                                   # the client went away
        except Exception as e:  # noqa: BLE001
            log.exception("internal error on %s %s", request.method, request.path)
            err = P.HTTPError(500, f"internal error: {type(e).__name__}", None, "internal_error")
            return _json(err.body(), 500)

    def _api_key(self, request: web.Request) -> str | None:
        """The caller's key (`Authorization: Bearer KEY`); 401 when this gateway has keys and it
        is not one. It goes on to the verifier, which binds the session to it."""
        key = bearer(request.headers.get(HEADER))
        if self.cfg.api_keys is not None and self.cfg.api_keys.check(key) is None:
            problem = "missing (send 'Authorization: Bearer KEY')" if key is None else "not valid"
            raise P.HTTPError(401, f"api key: {problem}", None, "invalid_api_key")
        return key

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()          # over client_max_size: HTTPRequestEntityTooLarge (413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise P.HTTPError(400, f"the request body is not valid JSON: {str(e)[:120]}", None,
                              "invalid_json") from None
        if not isinstance(body, dict):
            raise P.HTTPError(400, "the request body must be a JSON object", None, "invalid_json")
        P.check_model(body, self.cfg.model_id)
        return body

    async def _limits(self, api_key: str | None) -> P.ModelLimits | None:
        """The served model's vocabulary and context limit, asked of a verifier once."""
        if self.limits is None:
            client = self.pool.client(api_key)
            if client is None:
                return None
            try:
                info = await asyncio.wait_for(client.model_info(), 3.0)
                self.limits = P.ModelLimits(int(info.get("vocab_size", 0)) or 1 << 31,
                                            int(info.get("max_context", 0)) or 1 << 31)
            except Exception as e:  # noqa: BLE001 - no answer: the verifier checks the request itself
                log.info("model info unavailable: %s", e)
        return self.limits

    # --- routes ------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        await self._limits(self._api_key(request))
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        key = self._api_key(request)
        name = request.match_info["model"]
        if name != self.cfg.model_id:
            raise P.HTTPError(404, f"model: the model {name!r:.60} does not exist", "model", "model_not_found")
        await self._limits(key)
        return _json(self._model_card())

    def _model_card(self) -> dict:
        card = {"id": self.cfg.model_id, "object": "model", "created": self.created, "owned_by": "sparsespec"}
        if self.limits is not None:
            card["max_model_len"] = self.limits.max_context
        return card

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=telemetry.exposition(), content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        ok, report = await self.pool.health()
        return _json(report, 200 if ok else 503)

    async def completions(self, request: web.Request):
        key = self._api_key(request)
        body = await self._body(request)
        params = P.parse_completion(body, self.tokenizer, await self._limits(key), self.defaults)
        return await self._generate(request, params, key, chat=False)

    async def chat_completions(self, request: web.Request):
        key = self._api_key(request)
        body = await self._body(request)
        params = P.parse_chat(body, self.tokenizer, await self._limits(key), self.defaults)
        return await self._generate(request, params, key, chat=True)

    # --- generation --------------------------------------------------------------------------

    async def _generate(self, request: web.Request, params: P.GenParams, api_key: str | None, chat: bool):
        from sparsespec.client import GenerationError

        client = self.pool.client(api_key)
        if client is None:
            raise P.HTTPError(503, "no verifier is available" + (f" (none of model {self.cfg.model!r} is registered)"
                                                                 if self.cfg.redis_url else ""), None, "unavailable")
        session = uuid.uuid4().hex
        rid = ("chatcmpl-" if chat else "cmpl-") + session      # the id names the verifier session
        stream = client.stream(params.request, session_id=session)
        t0 = time.monotonic()
        async with contextlib.aclosing(stream):
            try:
                first = await anext(stream)     # refusals (400/429/503) arrive before any byte is sent
                telemetry.HTTP_TTFT.observe(time.monotonic() - t0)
            except GenerationError as e:
                raise P.from_verifier(e.code, e.message, params.prompt_field) from None
            if params.stream:
                return await self._stream(request, stream, first, params, rid, chat)
            text = P.TextStream(self.tokenizer, params.request.stop)
            chunk, pieces, n = first, [], 0
            while True:
                pieces.append(text.push(chunk.token_ids))
                n += len(chunk.token_ids)
                if chunk.finished:
                    break
                try:
                    chunk = await anext(stream)
                except GenerationError as e:
                    raise P.from_verifier(e.code, e.message, params.prompt_field) from None
            pieces.append(text.finish(chunk.stop_reason))
        finish = P.finish_reason(chunk.stop_reason)
        model = self.cfg.model_id
        out = (P.chat_body if chat else P.completion_body)(rid, int(time.time()), model, "".join(pieces), finish)
        out["usage"] = P.usage(len(params.request.prompt), n)
        out["spec_decode"] = P.spec_decode(chunk.metrics, params)
        return _json(out)

    async def _stream(self, request, stream, first, params: P.GenParams, rid: str, chat: bool):
        """Server-sent events: one `data: {chunk}` per committed piece of text, the finish
        chunk (with spec_decode), the usage chunk if asked for, then `data: [DONE]`."""
        from sparsespec.client import GenerationError

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        created, model = int(time.time()), self.cfg.model_id
        text = P.TextStream(self.tokenizer, params.request.stop)

        def piece(delta: str | None, finish: str | None = None) -> dict:
            if chat:
                return P.chat_chunk(rid, created, model, {} if delta is None else {"content": delta}, finish)
            return P.completion_body(rid, created, model, delta, finish)

        if chat:
            await resp.write(_sse(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None)))
        chunk, n = first, 0
        try:
            while True:
                n += len(chunk.token_ids)
                delta = text.push(chunk.token_ids)
                if chunk.finished:
                    delta += text.finish(chunk.stop_reason)
                    if delta:
                        await resp.write(_sse(piece(delta)))
                    final = piece(None, P.finish_reason(chunk.stop_reason))
                    final["spec_decode"] = P.spec_decode(chunk.metrics, params)
                    await resp.write(_sse(final))
                    if params.include_usage:
                        tail = piece(None)
                        tail["choices"] = []
                        tail["usage"] = P.usage(len(params.request.prompt), n)
                        await resp.write(_sse(tail))
                    break
                if delta:
                    await resp.write(_sse(piece(delta)))
                chunk = await anext(stream)
        except GenerationError as e:        # after the headers: an error event, then the end
            await resp.write(_sse(P.from_verifier(e.code, e.message, params.prompt_field).body()))
        except (asyncio.CancelledError, ConnectionError):
            raise                           # the client went away: the SDK stream closes, the turn is cancelled
        except Exception as e:  # noqa: BLE001 - the headers are out: the error goes as an event
            log.exception("internal error while streaming %s", rid)
            await resp.write(_sse(P.HTTPError(500, f"internal error: {type(e).__name__}", None,
                                              "internal_error").body()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class GatewayThread:
    """A gateway on an event loop of its own thread (for embedding and tests)."""

    def __init__(self, cfg: GatewayConfig, tokenizer=None):
        self.gateway = Gateway(cfg, tokenizer)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> GatewayThread:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        self.loop.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsespec.gateway",
                                description="OpenAI-compatible HTTP gateway in front of sparsespec verifiers")
    p.add_argument("--model", required=True, help="the served model (directory, .gguf or known name): "
                                                  "its tokenizer and chat template, and its id")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--verifier", action="append", default=[], help="HOST:PORT of a verifier (repeatable)")
    p.add_argument("--redis", default=None,
                   help=f"redis://[:PASSWORD@]HOST:PORT/DB: verifiers from the worker registry (default "
                        f"${REDIS_URL_ENV} when no --verifier is given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    p.add_argument("-k", type=int, default=0, help="default draft length (0: the verifier's default)")
    p.add_argument("--adaptive", action="store_true", help="adaptive k by default")
    p.add_argument("--reconnect-timeout-s", type=float, default=GatewayConfig.reconnect_timeout_s,
                   help="how long a request fails over between verifiers before a 503")
    p.add_argument("--max-body-bytes", type=int, default=GatewayConfig.max_body_bytes)
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="API keys, one per line (default $SPARSESPEC_API_KEYS): others get 401; a request's "
                        "key goes on to the verifier either way")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve HTTPS (as the verifier's "
                                                     "--tls-cert serves its gRPC API over TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (not encrypted)")
    p.add_argument("--tls-client-ca", default=None, help="also require client certificates signed by this CA")
    p.add_argument("--verifier-tls-ca", default=None, help="TLS to the verifiers, verified with this CA (PEM)")
    p.add_argument("--verifier-tls-server-name", default=None,
                   help="the name the verifiers' certificate carries, when it is not the address dialled")
    return p


async def _serve(gateway: Gateway) -> None:
    url = await gateway.start()
    print(f"listening {url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await gateway.stop()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SPARSESPEC_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        redis_url = args.redis or (None if args.verifier else os.environ.get(REDIS_URL_ENV) or None)
        cfg = GatewayConfig(model=args.model, verifiers=tuple(args.verifier), redis_url=redis_url,
                            served_model_name=args.served_model_name, host=args.host, port=args.port,
                            default_k=args.k, adaptive=args.adaptive,
                            reconnect_timeout_s=args.reconnect_timeout_s, max_body_bytes=args.max_body_bytes,
                            api_keys=load_api_keys(args.api_keys),
                            verifier_tls=client_tls(args.verifier_tls_ca, server_name=args.verifier_tls_server_name,
                                                    prefix="verifier-tls"),
                            tls=server_ssl_context(args.tls_cert, args.tls_key, args.tls_client_ca))
        asyncio.run(_serve(Gateway(cfg)))
    except SparseSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("stopped", flush=True)
    return 0
