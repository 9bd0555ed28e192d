from sparsespec.rpc.sparsespec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "sampling", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    epoch: int
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("device_bytes", "host_bytes", "prefill_s", "summary_slots", "summary_sink", "summary_window", "feed")
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_SINK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    device_bytes: int
    host_bytes: int
    prefill_s: float
    summary_slots: int
    summary_sink: int
    summary_window: int
    feed: FeedSpec
    def __init__(self, device_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., prefill_s: _Optional[float] = ..., summary_slots: _Optional[int] = ..., summary_sink: _Optional[int] = ..., summary_window: _Optional[int] = ..., feed: _Optional[_Union[FeedSpec, _Mapping]] = ...) -> None: ...

class SparseQ(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("session_id", "base_len", "append", "k", "sampling", "epoch", "summary", "feed_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    FEED_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    base_len: int
    append: _containers.RepeatedScalarFieldContainer[int]
    k: int
    sampling: _common_pb2.SamplingParams
    epoch: int
    summary: bytes
    feed_size: int
    def __init__(self, session_id: _Optional[str] = ..., base_len: _Optional[int] = ..., append: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., epoch: _Optional[int] = ..., summary: _Optional[bytes] = ..., feed_size: _Optional[int] = ...) -> None: ...

class DraftReply(_message.Message):
    __slots__ = ("tokens", "q", "draft_s", "device_bytes", "host_bytes", "summary_slots", "summary_sink", "summary_window", "feed")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    DRAFT_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_SINK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseQ]
    draft_s: float
    device_bytes: int
    host_bytes: int
    summary_slots: int
    summary_sink: int
    summary_window: int
    feed: FeedSpec
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseQ, _Mapping]]] = ..., draft_s: _Optional[float] = ..., device_bytes: _Optional[int] = ..., host_bytes: _Optional[int] = ..., summary_slots: _Optional[int] = ..., summary_sink: _Optional[int] = ..., summary_window: _Optional[int] = ..., feed: _Optional[_Union[FeedSpec, _Mapping]] = ...) -> None: ...

class FeedSpec(_message.Message):
    __slots__ = ("kv_source", "layers", "kv_heads", "head_dim", "budget", "sink", "window", "chunk", "tail_cap")
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TAIL_CAP_FIELD_NUMBER: _ClassVar[int]
    kv_source: str
    layers: int
    kv_heads: int
    head_dim: int
    budget: int
    sink: int
    window: int
    chunk: int
    tail_cap: int
    def __init__(self, kv_source: _Optional[str] = ..., layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., budget: _Optional[int] = ..., sink: _Optional[int] = ..., window: _Optional[int] = ..., chunk: _Optional[int] = ..., tail_cap: _Optional[int] = ...) -> None: ...

class FeedChunk(_message.Message):
    __slots__ = ("draft", "data")
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    draft: int
    data: bytes
    def __init__(self, draft: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DraftBatchRequest(_message.Message):
    __slots__ = ("drafts", "feed")
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    drafts: _containers.RepeatedCompositeFieldContainer[DraftRequest]
    feed: _containers.RepeatedCompositeFieldContainer[FeedChunk]
    def __init__(self, drafts: _Optional[_Iterable[_Union[DraftRequest, _Mapping]]] = ..., feed: _Optional[_Iterable[_Union[FeedChunk, _Mapping]]] = ...) -> None: ...

class DraftOutcome(_message.Message):
    __slots__ = ("reply", "code", "error")
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reply: DraftReply
    code: int
    error: str
    def __init__(self, reply: _Optional[_Union[DraftReply, _Mapping]] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class DraftBatchReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[DraftOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[DraftOutcome, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
