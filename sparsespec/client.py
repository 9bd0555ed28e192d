"""Client SDK for the Generation API (sync and asyncio).

The stream is exactly-once for the caller: every session gets its id from the client, the client
counts the tokens it has yielded, and when a stream breaks (verifier killed, network cut) it
reconnects, to the same or another verifier, with (session_id, offset) and continues. The
verifier streams from the session's durable log, so nothing is lost or repeated.

    client = SparseSpecClient("127.0.0.1:50051")
    for chunk in client.stream("Once upon a time", max_tokens=64):
        print(chunk.text, end="", flush=True)
    reply = client.chat([{"role": "user", "content": "Hi!"}], max_tokens=64)   # the chat template

    SparseSpecClient("verifier:50051", api_key="...", root_certificates=open("ca.pem", "rb").read())
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc

from sparsespec.auth import metadata
from sparsespec.chat import chat_prompt_ids, load_chat_tokenizer
from sparsespec.rpc.sparsespec.v1 import common_pb2, generation_pb2 as pb
from sparsespec.rpc.sparsespec.v1 import generation_pb2_grpc as pb_grpc
from sparsespec.tls import ClientTLS, channel as tls_channel

# Codes after which the same request may succeed elsewhere or a moment later.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL}


class GenerationError(Exception):
    """The server refused the request (bad input, overload, ...): retrying will not help."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code.name}: {message}")


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    offset: int                     # index of token_ids[0] in this turn's generated tokens
    finished: bool = False
    stop_reason: str = ""
    metrics: dict = field(default_factory=dict)


@dataclass
class Completion:
    session_id: str
    token_ids: list[int]
    text: str
    stop_reason: str
    metrics: dict
    reconnects: int = 0


@dataclass(frozen=True)
class Request:
    prompt: str | list[int]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    k: int = 0                       # 0: the server's default
    mode: str = "spec"
    adaptive: bool = False

    def to_proto(self, session_id: str, turn_id: str, resume: bool = False, offset: int = 0) -> pb.GenerateRequest:
        sampling = common_pb2.SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.seed is not None:
            sampling.seed = self.seed
        msg = pb.GenerateRequest(sampling=sampling, max_tokens=self.max_tokens, stop=list(self.stop),
                                 session_id=session_id, turn_id=turn_id, resume=resume, resume_offset=offset, k=self.k,
                                 mode=self.mode, adaptive=self.adaptive)
        if isinstance(self.prompt, str):
            msg.text = self.prompt
        else:
            msg.token_ids.ids.extend(int(t) for t in self.prompt)
        return msg


def _request(prompt, kwargs: dict) -> Request:
    if isinstance(prompt, Request):
        if kwargs:
            raise TypeError(f"a Request carries its own settings; got {sorted(kwargs)} too")
        return prompt
    return Request(prompt, **kwargs)


def _chunk(msg) -> Chunk:
    return Chunk(list(msg.token_ids), msg.text_delta, msg.offset, msg.finished, msg.stop_reason,
                 json.loads(msg.metrics_json) if msg.metrics_json else {})


def _options(max_message_bytes: int):
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


class _Resumable:
    """The exactly-once bookkeeping shared by the sync and async clients, and how they connect:
    `api_key` goes with every call (`authorization: Bearer KEY`); `root_certificates` (PEM bytes)
    or `tls=True` (the system's roots) make the channels TLS; `tls_server_name` is the name the
    verifiers' certificate carries when it is not the address dialled."""

    def __init__(self, addresses, reconnect_timeout_s: float, api_key: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, tls_server_name: str | None = None):
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("addresses: need at least one verifier address")
        self.reconnect_timeout_s = reconnect_timeout_s
        self._current = 0
        self._metadata = metadata(api_key)
        self._tls = (ClientTLS(root_certificates, server_name=tls_server_name)
                     if tls or root_certificates is not None else None)

    def _next_address(self) -> str:
        self._current = (self._current + 1) % len(self.addresses)
        return self.addresses[self._current]

    def _after_error(self, code, details: str, resume: bool, offset: int,
                     deadline: float | None) -> tuple[bool, float]:
        """A broken stream: raise if retrying cannot help, else return (resume, deadline).

        Every retry is a resume carrying the turn's id: the verifier starts the turn if no
        verifier registered it, re-attaches to it if one did, and refuses it if another turn of
        the session got there first."""
        if code not in RETRYABLE:
            raise GenerationError(code, details)
        resume = True
        deadline = deadline or time.monotonic() + self.reconnect_timeout_s
        if time.monotonic() > deadline:
            raise GenerationError(code, f"{details} (gave up after {self.reconnect_timeout_s}s of reconnecting)")
        return resume, deadline

    @staticmethod
    def _fresh(chunk: Chunk, offset: int) -> Chunk | None:
        """Drop what the caller already has (a resumed stream may restart before `offset`)."""
        skip = offset - chunk.offset
        if skip <= 0:
            return chunk
        if skip >= len(chunk.token_ids) and not chunk.finished:
            return None
        return Chunk(chunk.token_ids[skip:], chunk.text if skip == 0 else "", offset, chunk.finished,
                     chunk.stop_reason, chunk.metrics)


class SparseSpecClient(_Resumable):
    def __init__(self, addresses: str | list[str], reconnect_timeout_s: float = 60.0,
                 max_message_bytes: int = 16 << 20, api_key: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, tls_server_name: str | None = None):
        super().__init__(addresses, reconnect_timeout_s, api_key, root_certificates, tls, tls_server_name)
        self._options = _options(max_message_bytes)
        self._channels: dict[str, grpc.Channel] = {}
        self.reconnects = 0

    def _stub(self, address: str) -> pb_grpc.GenerationStub:
        if address not in self._channels:
            self._channels[address] = tls_channel(address, self._tls, self._options)
        return pb_grpc.GenerationStub(self._channels[address])

    def stream(self, prompt, session_id: str | None = None, **kwargs) -> Iterator[Chunk]:
        """Yield the continuation as it is committed. A given session_id continues that session
        (multi-turn); none starts a new one (its id is in every Chunk's source, `last_session`).
        `prompt`: text, token ids, or a whole Request (then no other keywords)."""
        req = _request(prompt, kwargs)
        session, turn = session_id or uuid.uuid4().hex, uuid.uuid4().hex
        self.last_session = session
        offset, resume, deadline = 0, False, None
        address = self.addresses[self._current]
        while True:
            call = self._stub(address).Generate(req.to_proto(session, turn, resume, offset), metadata=self._metadata)
            try:
                for msg in call:
                    chunk = self._fresh(_chunk(msg), offset)
                    if chunk is None:
                        continue
                    offset = chunk.offset + len(chunk.token_ids)
                    yield chunk
                    if chunk.finished:
                        return
                raise grpc.RpcError("stream ended without a final message")
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNAVAILABLE
                details = e.details() if hasattr(e, "details") else str(e)
                resume, deadline = self._after_error(code, details, resume, offset, deadline)
                self.reconnects += 1
                time.sleep(0.2)
                address = self._next_address()
            finally:
                call.cancel()   # a caller that stops early (or a broken stream): the verifier frees the row

    def generate(self, prompt, session_id: str | None = None, **kwargs) -> Completion:
        ids, text, last = [], [], None
        before = self.reconnects
        for chunk in self.stream(prompt, session_id, **kwargs):
            ids += chunk.token_ids
            text.append(chunk.text)
            last = chunk
        return Completion(self.last_session, ids, "".join(text), last.stop_reason, last.metrics,
                          self.reconnects - before)

    def chat_stream(self, messages, tokenizer=None, **kwargs) -> Iterator[Chunk]:
        """`stream` of a new session whose prompt is `messages` ([{"role", "content"}, ...])
        through the model's chat template (sparsespec/chat.py: the same tokens the HTTP gateway
        and `generate --chat` send). `tokenizer`: a tokenizer, or a model name or path to load
        it from; default: the model the verifier serves (GetModelInfo), loaded here."""
        yield from self.stream(chat_prompt_ids(self._chat_tokenizer(tokenizer), messages), **kwargs)

    def chat(self, messages, tokenizer=None, **kwargs) -> Completion:
        """`generate` for chat messages: the assistant's reply, in a new session."""
        return self.generate(chat_prompt_ids(self._chat_tokenizer(tokenizer), messages), **kwargs)

    def _chat_tokenizer(self, tokenizer):
        if tokenizer is None or isinstance(tokenizer, str):
            return load_chat_tokenizer(tokenizer or self.model_info()["model"])
        return tokenizer

    def model_info(self) -> dict:
        info = self._stub(self.addresses[self._current]).GetModelInfo(pb.ModelInfoRequest(), metadata=self._metadata)
        return {f.name: v for f, v in info.ListFields()}

    def abort(self, session_id: str) -> bool:
        """Cancel the session's running turn on the current verifier; NOT_FOUND (grpc.RpcError)
        for a session this client's key does not own or Redis does not have."""
        return self._stub(self.addresses[self._current]).Abort(pb.AbortRequest(session_id=session_id),
                                                               metadata=self._metadata).aborted

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncSparseSpecClient(_Resumable):
    """The same client on grpc.aio, for asyncio servers (e.g. an HTTP front end)."""

    def __init__(self, addresses: str | list[str], reconnect_timeout_s: float = 60.0,
                 max_message_bytes: int = 16 << 20, channels: dict | None = None, api_key: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, tls_server_name: str | None = None):
        """`channels`: an address -> grpc.aio.Channel dict shared with other clients (a server
        making one client per request); this client adds to it but does not close it."""
        super().__init__(addresses, reconnect_timeout_s, api_key, root_certificates, tls, tls_server_name)
        self._options = _options(max_message_bytes)
        self._owns_channels = channels is None
        self._channels: dict[str, grpc.aio.Channel] = {} if channels is None else channels

    def _stub(self, address: str) -> pb_grpc.GenerationStub:
        if address not in self._channels:
            self._channels[address] = tls_channel(address, self._tls, self._options, aio=True)
        return pb_grpc.GenerationStub(self._channels[address])

    async def stream(self, prompt, session_id: str | None = None, **kwargs) -> AsyncIterator[Chunk]:
        req = _request(prompt, kwargs)
        session, turn = session_id or uuid.uuid4().hex, uuid.uuid4().hex
        self.last_session = session
        offset, resume, deadline = 0, False, None
        address = self.addresses[self._current]
        while True:
            call = self._stub(address).Generate(req.to_proto(session, turn, resume, offset), metadata=self._metadata)
            try:
                async for msg in call:
                    chunk = self._fresh(_chunk(msg), offset)
                    if chunk is None:
                        continue
                    offset = chunk.offset + len(chunk.token_ids)
                    yield chunk
                    if chunk.finished:
                        return
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "stream ended early")
            except grpc.aio.AioRpcError as e:
                resume, deadline = self._after_error(e.code(), e.details(), resume, offset, deadline)
                await asyncio.sleep(0.2)
                address = self._next_address()
            finally:
                call.cancel()   # the caller stopped early (closed the generator, was cancelled): free the row

    async def generate(self, prompt, session_id: str | None = None, **kwargs) -> Completion:
        ids, text, last = [], [], None
        async for chunk in self.stream(prompt, session_id, **kwargs):
            ids += chunk.token_ids
            text.append(chunk.text)
            last = chunk
        return Completion(self.last_session, ids, "".join(text), last.stop_reason, last.metrics)

    async def chat_stream(self, messages, tokenizer=None, **kwargs) -> AsyncIterator[Chunk]:
        """`stream` of a new session whose prompt is `messages` through the chat template
        (sparsespec/chat.py); `tokenizer` as in SparseSpecClient.chat."""
        ids = chat_prompt_ids(await self._chat_tokenizer(tokenizer), messages)
        async for chunk in self.stream(ids, **kwargs):
            yield chunk

    async def chat(self, messages, tokenizer=None, **kwargs) -> Completion:
        """`generate` for chat messages: the assistant's reply, in a new session."""
        ids = chat_prompt_ids(await self._chat_tokenizer(tokenizer), messages)
        return await self.generate(ids, **kwargs)

    async def _chat_tokenizer(self, tokenizer):
        if tokenizer is None or isinstance(tokenizer, str):
            model = tokenizer or (await self.model_info())["model"]
            return await asyncio.to_thread(load_chat_tokenizer, model)
        return tokenizer

    async def model_info(self) -> dict:
        info = await self._stub(self.addresses[self._current]).GetModelInfo(pb.ModelInfoRequest(),
                                                                             metadata=self._metadata)
        return {f.name: v for f, v in info.ListFields()}

    async def close(self) -> None:
        if self._owns_channels:
            for channel in self._channels.values():
                await channel.close()
            self._channels.clear()
