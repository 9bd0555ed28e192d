"""Register a servicer so that a request that does not parse is INVALID_ARGUMENT, not INTERNAL.

grpc-python answers a request its deserializer rejects with INTERNAL ("Exception deserializing
request"), which the SDK retries forever. Here the handlers take the raw bytes and parse them
themselves: a DecodeError becomes INVALID_ARGUMENT naming the field (`session_id: is not valid
UTF-8`, `request: not a valid GenerateRequest`). Use `add_servicer` in place of the generated
`add_<Service>Servicer_to_server`.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.unknown_fields import UnknownFieldSet

from sparsespec.errors import InvalidArgument
from sparsespec.rpc.sparsespec.v1 import drafter_pb2, generation_pb2  # noqa: F401 - registers the services

LENGTH_DELIMITED = 2   # wire type of strings, bytes, sub-messages and packed repeated fields


def add_servicer(servicer, service_name: str, server: grpc.Server) -> None:
    """Serve every method of the service (e.g. "sparsespec.v1.Generation") from `servicer`."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    handlers = {}
    for method in service.methods:
        if method.client_streaming and method.server_streaming:
            raise NotImplementedError(f"{method.full_name}: bidirectional streaming")
        request_cls = GetMessageClass(method.input_type)
        if method.client_streaming:
            kind, behavior = grpc.stream_unary_rpc_method_handler, _strict_stream(getattr(servicer, method.name), request_cls)
        else:
            kind = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
            behavior = _strict(getattr(servicer, method.name), request_cls)
        handlers[method.name] = kind(behavior, request_deserializer=None,   # raw bytes in
                                     response_serializer=GetMessageClass(method.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):   # as the generated code does (grpc >= 1.63)
        server.add_registered_method_handlers(service.full_name, handlers)


def _strict(behavior, request_cls):
    def handle(data: bytes, context):
        try:
            request = parse(request_cls, data)
        except InvalidArgument as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return behavior(request, context)
    return handle


def _strict_stream(behavior, request_cls):
    """A client stream whose messages are parsed as the handler reads them: one that does not
    parse raises InvalidArgument there, which the handler turns into its status."""
    def handle(datas, context):
        return behavior((parse(request_cls, data) for data in datas), context)
    return handle


def parse(cls, data: bytes):
    """bytes -> a `cls` message; InvalidArgument naming the offending field when they do not parse."""
    try:
        return cls.FromString(data)
    except DecodeError:
        bad = _bad_field(cls.DESCRIPTOR, data) or ("request", f"not a valid {cls.DESCRIPTOR.name}")
        raise InvalidArgument(*bad) from None


def _bad_field(desc: Descriptor, data: bytes, path: str = "") -> tuple[str, str] | None:
    """The first field that makes `data` an invalid `desc` message, as (field path, problem).

    `data` parsed as Empty keeps every field as an unknown field: raw bytes we can check one by
    one against the real descriptor (strings must be UTF-8), recursing into sub-messages."""
    try:
        fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return (path, f"not a valid {desc.name}") if path else None
    seen: dict[int, int] = {}
    for f in fields:
        fd = desc.fields_by_number.get(f.field_number)
        if fd is None or f.wire_type != LENGTH_DELIMITED:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated:
            seen[fd.number] = seen.get(fd.number, -1) + 1
            name += f"[{seen[fd.number]}]"
        if fd.type == FieldDescriptor.TYPE_STRING:
            try:
                f.data.decode("utf-8")
            except UnicodeDecodeError:
                return name, "is not valid UTF-8"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            found = _bad_field(fd.message_type, f.data, name)
            if found:
                return found
    return None
