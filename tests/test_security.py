"""API keys, TLS and the bundled Redis' password (issue 15, items 4 and 5), against one real
`sparsespec up --api-keys FILE --tls-cert ... --mtls` (redis-server, drafter, verifier and gateway
processes; certificates made here): a session of key A is not there for key B over gRPC (resume,
read, extend, abort: NOT_FOUND, worded as for an unknown id) and the refusal writes nothing; the
HTTP gateway answers 401 in OpenAI's shape; a client without the CA cannot talk to the verifier,
a verifier client without a certificate cannot talk to the drafter; the gateway serves HTTPS
(the real `openai` client succeeds with the CA, fails without it, plain http fails); Redis
refuses clients without the password, which no process list or log line shows. Bad flags: one
line, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import openai
import pytest
import redis

from certs import Certs, make_certs
from up_process import running_up
from sparsespec.client import GenerationError, SparseSpecClient
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import find_redis_server
from sparsespec.rpc.drafter_client import GrpcDrafterClient
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DrafterUnavailable
from sparsespec.tls import ClientTLS

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")

PROMPT = "In the beginning God created the heaven and the earth. "
KEY_A = "key-a-0123456789abcdef0123456789"
KEY_B = "key-b-fedcba9876543210fedcba9876"


@dataclass
class Up:
    model: str
    proc: subprocess.Popen
    lines: list[str]
    redis_url: str          # with the password (read from the file `up` names)
    public_redis_url: str
    password: str
    password_file: str
    drafter: str
    verifier: str
    gateway: str
    certs: Certs

    def client(self, api_key=KEY_A, ca=True, **kw) -> SparseSpecClient:
        roots = self.certs.ca.read_bytes() if ca is True else ca
        return SparseSpecClient(self.verifier, api_key=api_key, root_certificates=roots, **kw)

    def https(self) -> ssl.SSLContext:
        """What a client of the gateway verifies it with: the test CA."""
        return ssl.create_default_context(cafile=str(self.certs.ca))

    def openai(self, api_key=KEY_A, verify=True, base_url=None) -> openai.OpenAI:
        """The real OpenAI client at the gateway; verify=True: with the CA, else httpx's `verify`
        (an ssl.SSLContext, or None: the client's own default, the system roots)."""
        extra = {} if verify is None else {"http_client": openai.DefaultHttpxClient(
            verify=self.https() if verify is True else verify)}
        return openai.OpenAI(base_url=(base_url or self.gateway) + "/v1", api_key=api_key, max_retries=0,
                             timeout=60, **extra)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    model = save_random_model(tmp / "model", tiny_config(max_position_embeddings=1024, eos_token_ids=(),
                                                          num_layers=2), seed=3)
    certs = make_certs(tmp / "certs")
    keys = tmp / "keys"
    keys.write_text(f"# two clients\n{KEY_A}\n\n{KEY_B}\n")
    with running_up("--model", model, "--policy", "streaming", "--budget", 32, "-k", 4, "--max-batch", 2,
                    "--redis-persistence", "none", "--api-keys", keys, "--tls-cert", certs.cert,
                    "--tls-key", certs.key, "--tls-ca", certs.ca, "--mtls", unset=("SPARSESPEC_API_KEYS",)) as up:
        redis_words = up.first["redis"]
        public, secret_file = redis_words[0], redis_words[4] if len(redis_words) > 4 else ""
        password = open(secret_file).read().strip() if secret_file else ""
        yield Up(str(model), up.proc, up.lines, public.replace("redis://", f"redis://:{password}@", 1), public,
                 password, secret_file, up.word("drafter"), up.word("verifier"), up.word("gateway"), certs)


def snapshot(url: str) -> dict:
    """Every key and value in Redis but the worker registry (heartbeats change it)."""
    r = redis.Redis.from_url(url)
    out = {}
    for k in sorted(r.scan_iter()):
        if b":session:" in k:
            out[k] = r.dump(k)
    r.close()
    return out


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except GenerationError as e:
        return e.code, e.message
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


# --- API keys over gRPC -------------------------------------------------------------------------

def test_grpc_needs_a_key_and_a_session_belongs_to_its_key(up):
    for key in (None, "not-a-key-of-ours-0123456789"):
        with up.client(api_key=key, reconnect_timeout_s=1) as c:
            assert code_of(lambda: c.generate(PROMPT, max_tokens=4))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(c.model_info)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: c.abort("any"))[0] == grpc.StatusCode.UNAUTHENTICATED

    with up.client(KEY_A) as a, up.client(KEY_B) as b:
        done = a.generate(PROMPT, max_tokens=8)
        assert len(done.token_ids) == 8 and done.metrics["drafted"] > 0   # the mTLS hop drafts
        s = done.session_id
        store = redis.Redis.from_url(up.redis_url)
        meta = store.hgetall(f"sparsespec:session:{{{s}}}:meta")
        assert meta[b"key"] == hashlib.sha256(KEY_A.encode()).hexdigest().encode()   # the hash, never the key
        assert not any(KEY_A.encode() in (store.dump(k) or b"") for k in store.scan_iter())

        before = snapshot(up.redis_url)
        def refusals(client, session, extend=True):
            """Resume (read the log), extend (a new turn), abort: each one's (code, message)."""
            def resume():
                st = client._stub(up.verifier)
                return list(st.Generate(pb.GenerateRequest(session_id=session, resume=True, resume_offset=0,
                                                           max_tokens=4), metadata=client._metadata))
            calls = [resume] + ([lambda: client.generate(" And", session_id=session, max_tokens=4)] if extend else [])
            return [code_of(c) for c in calls + [lambda: client.abort(session)]]

        theirs = refusals(b, s)
        assert [c for c, _ in theirs] == [grpc.StatusCode.NOT_FOUND] * 3, theirs
        # worded as for an id nobody has (resume and abort; a new turn of an unknown id creates it)
        unknown = "f" * len(s)
        resume_unknown, abort_unknown = refusals(b, unknown, extend=False)
        words = [m.replace(s, "ID") for _, m in theirs]
        assert words == [m.replace(unknown, "ID") for _, m in (resume_unknown, resume_unknown, abort_unknown)]
        assert snapshot(up.redis_url) == before                    # refused: nothing written

        # the owner goes on; while its turn runs, B still finds nothing (not "busy")
        running = a.stream(" And God said", session_id=s, max_tokens=400)
        next(running)
        theirs = refusals(b, s)
        assert [c for c, _ in theirs] == [grpc.StatusCode.NOT_FOUND] * 3, theirs
        assert a.abort(s) is True
        running.close()
        deadline = time.monotonic() + 10
        while store.hget(f"sparsespec:session:{{{s}}}:meta", "state") == b"active":    # ends at the next round
            assert time.monotonic() < deadline, "the aborted turn did not end"
            time.sleep(0.05)
        assert a.generate(" Let there be light", session_id=s, max_tokens=4).session_id == s
        store.close()


# --- API keys over HTTP -------------------------------------------------------------------------

def test_http_answers_401_in_openai_shape_and_passes_the_key_on(up):
    for key in ("", "wrong-key-0123456789abcdef"):
        oai = up.openai(api_key=key or "x")
        if not key:
            oai = oai.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            oai.completions.create(model=up.model, prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert set(e.value.body) == {"message", "type", "param", "code"}
        with pytest.raises(openai.AuthenticationError):
            oai.models.list()
    req = urllib.request.Request(up.gateway + "/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:                 # refused before the body is read
        urllib.request.urlopen(req, timeout=30, context=up.https())
    assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(up.gateway + "/health", timeout=30, context=up.https()) as r:   # probes need no key
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"

    oai = up.openai(api_key=KEY_B)
    r = oai.completions.create(model=up.model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.usage.completion_tokens == 6
    session = r.id.removeprefix("cmpl-")
    meta = redis.Redis.from_url(up.redis_url).hgetall(f"sparsespec:session:{{{session}}}:meta")
    assert meta[b"key"] == hashlib.sha256(KEY_B.encode()).hexdigest().encode()   # bound to the caller's key
    with up.client(KEY_A) as a:
        assert code_of(lambda: a.generate(" And", session_id=session, max_tokens=4))[0] == grpc.StatusCode.NOT_FOUND
    with up.client(KEY_B) as b:
        assert len(b.generate(" And", session_id=session, max_tokens=4).token_ids) == 4


# --- TLS ------------------------------------------------------------------------------------------

def test_tls_needs_the_ca_and_the_drafter_needs_a_client_certificate(up):
    plain = SparseSpecClient(up.verifier, api_key=KEY_A, reconnect_timeout_s=1)
    assert code_of(lambda: plain.generate(PROMPT, max_tokens=2))[0] == grpc.StatusCode.UNAVAILABLE
    plain.close()
    with up.client(ca=up.certs.other_ca.read_bytes(), reconnect_timeout_s=1) as wrong:
        assert code_of(lambda: wrong.generate(PROMPT, max_tokens=2))[0] == grpc.StatusCode.UNAVAILABLE
    with up.client() as right:
        assert len(right.generate(PROMPT, max_tokens=2).token_ids) == 2

    ca, cert, key = (p.read_bytes() for p in (up.certs.ca, up.certs.cert, up.certs.key))
    for tls in (None, ClientTLS(ca)):             # plaintext, and TLS without a client certificate
        d = GrpcDrafterClient(up.drafter, timeout_s=2, tls=tls)
        with pytest.raises(DrafterUnavailable):
            d.open("mtls-probe", [1, 2, 3], SamplingParams())
        d.shutdown()
    with GrpcDrafterClient(up.drafter, timeout_s=5, tls=ClientTLS(ca, cert, key)) as d:
        d.open("mtls-probe", [1, 2, 3], SamplingParams())
        d.close("mtls-probe")


def _causes(e: BaseException) -> str:
    """The exception and everything it was raised from, as text (httpx wraps the ssl error)."""
    out = []
    while e is not None:
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " <- ".join(out)


def test_gateway_serves_https_that_needs_the_ca(up):
    """`up --tls-cert` serves the gateway over HTTPS with the services' certificate: the real
    openai client given the CA gets the gRPC path's greedy text; without the CA (the system
    roots) or with another CA it fails on the certificate; plain http to the port fails."""
    assert up.gateway.startswith("https://127.0.0.1:"), up.lines
    with up.client(KEY_A) as sdk:
        ref = sdk.generate(PROMPT, max_tokens=12)
    oai = up.openai(KEY_A)
    r = oai.completions.create(model=up.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == 12
    chunks = list(oai.completions.create(model=up.model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text

    other = ssl.create_default_context(cafile=str(up.certs.other_ca))
    for verify in (None, other):
        with pytest.raises(openai.APIConnectionError) as e:
            up.openai(KEY_A, verify=verify).completions.create(model=up.model, prompt=PROMPT, max_tokens=2)
        assert "CERTIFICATE_VERIFY_FAILED" in _causes(e.value), _causes(e.value)
    plain = up.openai(KEY_A, verify=None, base_url=up.gateway.replace("https://", "http://", 1))
    with pytest.raises(openai.APIConnectionError):
        plain.completions.create(model=up.model, prompt=PROMPT, max_tokens=2)
    assert oai.models.list().data[0].id == up.model                  # and it still serves


def test_gateway_https_client_certificates(tmp_path):
    """--tls-client-ca on the gateway, as on the verifier: a client without a certificate signed
    by it cannot even ask /health. In process, with no verifier behind it (/health: 503)."""
    from sparsespec.gateway import GatewayConfig, GatewayThread
    from sparsespec.tls import server_ssl_context

    certs = make_certs(tmp_path / "certs")
    cfg = GatewayConfig(model="m", verifiers=("127.0.0.1:1",),
                        tls=server_ssl_context(str(certs.cert), str(certs.key), str(certs.ca)))
    with GatewayThread(cfg, tokenizer=object()) as gw:
        assert gw.url.startswith("https://127.0.0.1:")
        mine = ssl.create_default_context(cafile=str(certs.ca))
        mine.load_cert_chain(str(certs.cert), str(certs.key))
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(gw.url + "/health", timeout=30, context=mine)
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "unavailable"
        # TLS 1.3: the server refuses the missing certificate after the handshake, so the client
        # sees an alert (ssl.SSLError) or the connection closed (RemoteDisconnected), never a reply
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)) as e:
            urllib.request.urlopen(gw.url + "/health", timeout=30, context=ssl.create_default_context(cafile=str(certs.ca)))
        assert not isinstance(e.value, urllib.error.HTTPError), e.value
        if isinstance(e.value, urllib.error.URLError):
            assert isinstance(e.value.reason, (ssl.SSLError, ConnectionError)), e.value


# --- the bundled Redis' password ------------------------------------------------------------------

def _cmdlines(root_pid: int) -> list[str]:
    """The command lines of `root_pid` and its descendants (what `ps` shows any local user)."""
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode())
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def test_redis_wants_the_password_which_no_command_line_or_log_shows(up):
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(up.public_redis_url).set("sparsespec:session:{x}:meta", "forged")
    assert redis.Redis.from_url(up.redis_url).ping()
    assert os.stat(up.password_file).st_mode & 0o077 == 0
    lines = _cmdlines(up.proc.pid)
    assert any("redis-server" in line for line in lines) and any("verifier_service" in line for line in lines)
    assert not any(up.password in line for line in lines), lines
    assert not any(up.password in line for line in up.lines)


# --- bad flags: one line naming the flag, nothing started -----------------------------------------

def test_bad_key_and_certificate_files_are_one_line_naming_the_flag(tmp_path, capsys):
    from drafter_service.server import main as drafter_main
    from sparsespec.cli import main as cli_main
    from sparsespec.gateway.server import main as gateway_main
    from verifier_service.server import main as verifier_main

    short = tmp_path / "short"
    short.write_text(f"{KEY_A}\nshort\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    missing = str(tmp_path / "missing.pem")
    certs, others = make_certs(tmp_path / "certs"), make_certs(tmp_path / "others")
    cert, key, ca, other_key = (str(p) for p in (certs.cert, certs.key, certs.ca, others.key))
    base = {"verifier": ["--model", str(tmp_path / "m"), "--redis", "redis://127.0.0.1:1/0"],
            "gateway": ["--model", str(tmp_path / "m"), "--redis", "redis://127.0.0.1:1/0"],
            "drafter": ["--model", str(tmp_path / "m")],
            "up": ["up", "--model", str(tmp_path / "m")]}
    mains = {"verifier": verifier_main, "gateway": gateway_main, "drafter": drafter_main, "up": cli_main}
    cases = [
        ("verifier", ["--api-keys", missing], "api-keys: cannot read"),
        ("verifier", ["--api-keys", str(short)], f"api-keys: {short} line 2: a key must be at least 16"),
        ("verifier", ["--api-keys", str(binary)], "api-keys: "),
        ("verifier", ["--api-keys", str(empty)], "api-keys: "),
        ("verifier", ["--tls-cert", missing, "--tls-key", missing], "tls-cert: cannot read"),
        ("verifier", ["--tls-cert", str(not_pem), "--tls-key", missing], "tls-cert: "),
        ("verifier", ["--tls-key", missing], "tls-cert: is required"),
        ("verifier", ["--drafter-tls-ca", missing], "drafter-tls-ca: cannot read"),
        ("verifier", ["--drafter-tls-cert", missing], "drafter-tls-cert: needs --drafter-tls-ca"),
        ("gateway", ["--api-keys", str(short)], "api-keys: "),
        ("gateway", ["--verifier-tls-ca", missing], "verifier-tls-ca: cannot read"),
        ("gateway", ["--tls-cert", missing, "--tls-key", key], "tls-cert: cannot read"),
        ("gateway", ["--tls-cert", cert], "tls-key: is required with --tls-cert"),
        ("gateway", ["--tls-key", key], "tls-cert: is required with --tls-key"),
        ("gateway", ["--tls-cert", cert, "--tls-key", ca], f"tls-key: {ca} holds no private key"),
        ("gateway", ["--tls-cert", key, "--tls-key", key], f"tls-cert: {key} holds no certificate"),
        ("gateway", ["--tls-cert", cert, "--tls-key", other_key], f"tls-key: {other_key} is not the key of"),
        ("gateway", ["--tls-client-ca", ca], "tls-client-ca: needs --tls-cert and --tls-key"),
        ("drafter", ["--tls-cert", missing, "--tls-key", missing], "tls-cert: cannot read"),
        ("drafter", ["--tls-client-ca", missing], "tls-client-ca: needs --tls-cert"),
        ("up", ["--api-keys", missing], "api-keys: cannot read"),
        ("up", ["--tls-cert", missing, "--tls-key", missing, "--tls-ca", missing], "tls-cert: cannot read"),
        ("up", ["--mtls"], "mtls: "),
        ("up", ["--tls-cert", cert, "--tls-key", other_key, "--tls-ca", ca], "tls-key: "),   # before Redis starts
    ]
    for role, flags, expected in cases:
        capsys.readouterr()
        assert mains[role](base[role] + flags) == 2, (role, flags)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {expected}"), (role, flags, err)
        assert "Traceback" not in err and KEY_A not in err
