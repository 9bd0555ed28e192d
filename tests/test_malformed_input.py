"""Malformed and oversized requests to both services, as raw bytes over real gRPC (issue #11.7).

Each must be INVALID_ARGUMENT naming the field, never INTERNAL (the SDK retries INTERNAL), with
a bounded message (no 100 KB session_id echoed back), and the process must keep serving.
"""

from __future__ import annotations

import grpc
import pytest

from sparsespec.cluster import ClusterConfig, LocalCluster
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.rpc.sparsespec.v1 import common_pb2, drafter_pb2
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb

PROMPT = [5, 17, 33, 60, 71, 90, 101, 3]
HUGE = "s" * 100_000
NAN, INF = float("nan"), float("inf")
MAX_DETAILS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_srv):
    model = save_random_model(tmp_path_factory.mktemp("malformed") / "model",
                              tiny_config(num_layers=2, eos_token_ids=()), seed=3)
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(model), budget="16", k=2), redis_url=redis_srv.url) as c:
        yield c


@pytest.fixture(scope="module")
def call(cluster):
    """(service, method, request bytes) -> (status code, details), against the cluster's processes."""
    addresses = {"Generation": cluster.address, "Drafter": cluster.drafters[0].address}
    opts = [("grpc.max_send_message_length", 16 << 20)]
    channels = {name: grpc.insecure_channel(a, options=opts) for name, a in addresses.items()}

    def send(service: str, method: str, data: bytes):
        path = f"/sparsespec.v1.{service}/{method}"
        try:
            if method == "Generate":
                for _ in channels[service].unary_stream(path, request_serializer=None,
                                                        response_deserializer=None)(data, timeout=60):
                    pass
            elif method == "DraftBatch":          # a client stream: one message here
                channels[service].stream_unary(path, request_serializer=None,
                                               response_deserializer=None)(iter([data]), timeout=60)
            else:
                channels[service].unary_unary(path, request_serializer=None,
                                              response_deserializer=None)(data, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    yield send
    for ch in channels.values():
        ch.close()


def bad_utf8(msg, placeholder: str) -> bytes:
    """msg serialized, with the placeholder's bytes replaced by as many bytes that are not UTF-8."""
    data, mark = msg.SerializeToString(), placeholder.encode()
    assert data.count(mark) == 1
    return data.replace(mark, b"\xff" * len(mark))


def generate(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"token_ids": pb.TokenIds(ids=PROMPT), "max_tokens": 4, **fields})


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


def open_session(**fields) -> drafter_pb2.OpenSessionRequest:
    return drafter_pb2.OpenSessionRequest(**{"session_id": "sess-ok", "tokens": PROMPT, **fields})


def draft(**fields) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(**{"session_id": "sess-ok", "append": PROMPT, "k": 2, **fields})


NOT_PROTOBUF = b"\xff\xff\xff\xff not protobuf"

CASES = {
    # verifier
    "gen-not-protobuf": ("Generation", "Generate", NOT_PROTOBUF, "request"),
    "gen-text": ("Generation", "Generate", bad_utf8(generate(text="TEXTPLACEHOLDER"), "TEXTPLACEHOLDER"), "text"),
    "gen-session": ("Generation", "Generate", bad_utf8(generate(session_id="SESSPLACE"), "SESSPLACE"),
                    "session_id"),
    "gen-stop": ("Generation", "Generate", bad_utf8(generate(stop=["ok", "STOPPLACE"]), "STOPPLACE"), "stop[1]"),
    "gen-mode": ("Generation", "Generate", bad_utf8(generate(mode="MODEPLACE"), "MODEPLACE"), "mode"),
    "gen-temp-nan": ("Generation", "Generate", generate(sampling=sampling(temperature=NAN)).SerializeToString(),
                     "sampling.temperature"),
    "gen-temp-inf": ("Generation", "Generate", generate(sampling=sampling(temperature=INF)).SerializeToString(),
                     "sampling.temperature"),
    "gen-top-p-nan": ("Generation", "Generate",
                      generate(sampling=sampling(temperature=0.7, top_p=NAN)).SerializeToString(), "sampling.top_p"),
    "gen-top-p-inf": ("Generation", "Generate",
                      generate(sampling=sampling(temperature=0.7, top_p=INF)).SerializeToString(), "sampling.top_p"),
    "gen-huge-session": ("Generation", "Generate", generate(session_id=HUGE).SerializeToString(), "session_id"),
    "gen-huge-mode": ("Generation", "Generate", generate(mode=HUGE).SerializeToString(), "mode"),
    "abort-session": ("Generation", "Abort", bad_utf8(pb.AbortRequest(session_id="SESSPLACE"), "SESSPLACE"),
                      "session_id"),
    "info-not-protobuf": ("Generation", "GetModelInfo", NOT_PROTOBUF, "request"),
    # drafter
    "open-not-protobuf": ("Drafter", "OpenSession", NOT_PROTOBUF, "request"),
    "open-session": ("Drafter", "OpenSession", bad_utf8(open_session(session_id="SESSPLACE"), "SESSPLACE"),
                     "session_id"),
    "open-temp-nan": ("Drafter", "OpenSession", open_session(sampling=sampling(temperature=NAN)).SerializeToString(),
                      "sampling.temperature"),
    "open-temp-inf": ("Drafter", "OpenSession", open_session(sampling=sampling(temperature=INF)).SerializeToString(),
                      "sampling.temperature"),
    "open-top-p-inf": ("Drafter", "OpenSession",
                       open_session(sampling=sampling(temperature=0.7, top_p=INF)).SerializeToString(),
                       "sampling.top_p"),
    "open-huge-session": ("Drafter", "OpenSession", open_session(session_id=HUGE).SerializeToString(), "session_id"),
    "draft-not-protobuf": ("Drafter", "Draft", NOT_PROTOBUF, "request"),
    "draft-session": ("Drafter", "Draft", bad_utf8(draft(session_id="SESSPLACE"), "SESSPLACE"), "session_id"),
    "draft-temp-nan": ("Drafter", "Draft", draft(sampling=sampling(temperature=NAN)).SerializeToString(),
                       "sampling.temperature"),
    "draft-top-p-nan": ("Drafter", "Draft", draft(sampling=sampling(temperature=0.7, top_p=NAN)).SerializeToString(),
                        "sampling.top_p"),
    "batch-not-protobuf": ("Drafter", "DraftBatch", NOT_PROTOBUF, "request"),
    "batch-session": ("Drafter", "DraftBatch", bad_utf8(drafter_pb2.DraftBatchRequest(drafts=[draft(session_id="SESSPLACE")]),
                                                        "SESSPLACE"), "drafts[0].session_id"),
    "batch-feed-orphan": ("Drafter", "DraftBatch",
                          drafter_pb2.DraftBatchRequest(feed=[drafter_pb2.FeedChunk(draft=0, data=b"x")]).SerializeToString(),
                          "feed.draft"),
    "batch-feed-oversize": ("Drafter", "DraftBatch",
                            drafter_pb2.DraftBatchRequest(drafts=[draft(feed_size=1)],
                                                          feed=[drafter_pb2.FeedChunk(draft=0, data=b"xy")]).SerializeToString(),
                            "feed.data"),
    "close-session": ("Drafter", "CloseSession",
                      bad_utf8(drafter_pb2.CloseSessionRequest(session_id="SESSPLACE"), "SESSPLACE"), "session_id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_is_invalid_argument(call, case):
    service, method, data, field = CASES[case]
    code, details = call(service, method, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
    assert details.startswith(f"{field}: "), details[:200]
    assert len(details) < MAX_DETAILS, len(details)


def test_services_keep_serving(call, cluster):
    """After all of the above, the same processes still generate and draft."""
    from sparsespec.client import SparseSpecClient
    with SparseSpecClient(cluster.address, reconnect_timeout_s=10) as client:
        done = client.generate(PROMPT, max_tokens=6)
    assert len(done.token_ids) == 6
    assert done.metrics["rounds"] > 0 and done.metrics["feeds_sent"] > 0   # the (fed) drafter still drafts
    assert call("Drafter", "OpenSession", open_session(session_id="after").SerializeToString())[0] == grpc.StatusCode.OK
    # A fed drafter (the default) drafts only with the verifier's K/V: a bare Draft is refused, clearly.
    code, details = call("Drafter", "Draft", draft(session_id="after", base_len=len(PROMPT), append=[])
                         .SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("feed: "), details
    assert all(p.alive() for p in cluster.verifiers + cluster.drafters)
