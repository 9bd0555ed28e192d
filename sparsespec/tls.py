"""TLS for the gRPC hops: client -> verifier (the public API), gateway -> verifier, and verifier
-> drafter, where the drafter may also require a client certificate (mTLS); and HTTPS on the
gateway (the same --tls-cert/--tls-key/--tls-client-ca as the verifier's public API, as an
ssl.SSLContext for aiohttp).

Certificates are PEM files named by flags; each is read and checked when the config is built,
so a missing or unreadable file is one line naming its flag, before any model loads.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

from sparsespec.errors import InvalidArgument


def read_pem(path: str, flag: str) -> bytes:
    """A PEM file's bytes; InvalidArgument(flag) when it cannot be read or holds no PEM block."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(flag, f"cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(flag, f"{path} is not a PEM file (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key; with client_ca, clients must present a certificate
    signed by it (mTLS)."""
    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """How a client checks a server (ca: the roots; None = the system's) and, for mTLS, the
    certificate it presents. server_name: the name the server's certificate must carry when it
    differs from the address dialled (pods reached by IP with a certificate for a Service name)."""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("tls", "a client certificate needs its key and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def server_tls(cert: str | None, key: str | None, client_ca: str | None = None,
               prefix: str = "tls") -> ServerTLS | None:
    """--{prefix}-cert/--{prefix}-key (both or neither), --{prefix}-client-ca: None = plaintext."""
    if not cert and not key:
        if client_ca:
            raise InvalidArgument(f"{prefix}-client-ca", f"needs --{prefix}-cert and --{prefix}-key")
        return None
    if not cert or not key:
        missing = f"{prefix}-cert" if not cert else f"{prefix}-key"
        raise InvalidArgument(missing, f"is required with --{prefix}-{'key' if not cert else 'cert'}")
    return ServerTLS(read_pem(cert, f"{prefix}-cert"), read_pem(key, f"{prefix}-key"),
                     read_pem(client_ca, f"{prefix}-client-ca") if client_ca else None)


def server_ssl_context(cert: str | None, key: str | None, client_ca: str | None = None,
                       prefix: str = "tls") -> ssl.SSLContext | None:
    """The same flags as server_tls, as an ssl.SSLContext for an HTTPS server (the gateway): the
    files read and checked now, including that the key is the certificate's. None = plain HTTP."""
    tls = server_tls(cert, key, client_ca, prefix)         # both or neither, readable, PEM
    if tls is None:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in tls.cert:
        raise InvalidArgument(f"{prefix}-cert", f"{cert} holds no certificate (no -----BEGIN CERTIFICATE----- line)")
    if b"PRIVATE KEY-----" not in tls.key:
        raise InvalidArgument(f"{prefix}-key", f"{key} holds no private key (no -----BEGIN ... PRIVATE KEY----- line)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_password():              # never OpenSSL's prompt on the terminal of a service
        raise InvalidArgument(f"{prefix}-key", f"{key} is encrypted; give the key without a passphrase")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise InvalidArgument(f"{prefix}-key", f"{key} is not the key of --{prefix}-cert {cert}") from None
        raise InvalidArgument(f"{prefix}-cert", f"{cert} and --{prefix}-key {key} cannot be loaded as a "
                                                f"certificate and its key ({e.reason or e})") from None
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=tls.client_ca.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise InvalidArgument(f"{prefix}-client-ca", f"{client_ca} holds no usable certificate ({e.reason or e})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(ca: str | None, cert: str | None = None, key: str | None = None,
               server_name: str | None = None, prefix: str = "tls") -> ClientTLS | None:
    """--{prefix}-ca (the roots that sign the server), optional --{prefix}-cert/--{prefix}-key (a
    client certificate) and --{prefix}-server-name; None = plaintext."""
    if not ca:
        for flag, value in (("cert", cert), ("key", key), ("server-name", server_name)):
            if value:
                raise InvalidArgument(f"{prefix}-{flag}", f"needs --{prefix}-ca (TLS to the server)")
        return None
    if bool(cert) != bool(key):
        missing = f"{prefix}-cert" if not cert else f"{prefix}-key"
        raise InvalidArgument(missing, f"is required with --{prefix}-{'key' if not cert else 'cert'}")
    return ClientTLS(read_pem(ca, f"{prefix}-ca"), read_pem(cert, f"{prefix}-cert") if cert else None,
                     read_pem(key, f"{prefix}-key") if key else None, server_name or None)


def channel(address: str, tls: ClientTLS | None, options: list, aio: bool = False):
    """A (grpc.aio when aio) channel to `address`: secure with `tls`, plaintext without."""
    mod = grpc.aio if aio else grpc
    if tls is None:
        return mod.insecure_channel(address, options=options)
    return mod.secure_channel(address, tls.credentials(), options=list(options) + tls.options())


def health_only_server(health_servicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """A plaintext gRPC server with grpc.health.v1 alone (the service's own HealthServicer), for
    probes that cannot speak TLS (Kubernetes' gRPC probes): it tells only SERVING or not."""
    from concurrent import futures

    from grpc_health.v1 import health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise InvalidArgument("health-port", f"cannot listen on {host}:{port}: {e}") from None
    if bound == 0:
        raise InvalidArgument("health-port", f"cannot listen on {host}:{port}")
    return server, bound
