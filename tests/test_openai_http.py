"""The OpenAI-compatible HTTP gateway (issue 15), through the real `openai` client, against a real
`sparsespec up` (redis-server, drafter, verifier and gateway processes): completions and chat,
streamed and not, equal to the SDK and to AR decoding; stop strings, max_tokens, usage;
OpenAI-shaped errors; 429 from a full verifier, a dropped stream freeing its row, /health
following Redis and a killed verifier. One SmolLM2 case for its real chat template.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from equality import assert_greedy_equal
from kvstore.coord.sessions import SessionStore
from sparsespec.chat import chat_prompt_ids
from sparsespec.cli import main as cli_main
from up_process import running_up
from sparsespec.client import AsyncSparseSpecClient, SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster, spawn_service
from sparsespec.gateway import GatewayConfig, GatewayThread
from sparsespec.models import load_model, load_tokenizer
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import find_redis_server
from sparsespec.spec.loop import GenerationRequest, SpecEngine

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")

CONTEXT = 2048
PROMPT = "In the beginning God created the heaven and the earth. "
# A ChatML-like template for the character tokenizer of the tiny model (it has none of its own).
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who made the light?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=CONTEXT, eos_token_ids=(), num_layers=2)
    out = save_random_model(tmp_path_factory.mktemp("http") / "model", cfg, seed=11)   # chat ends at EOS
    tok = load_tokenizer(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def ar(model_dir, tokenizer):
    """AR decoding in this process: the truth (stops at EOS, as the verifier does)."""
    model = load_model(model_dir).eval()
    engine = SpecEngine(model, None, eos_ids=[tokenizer.eos_token_id])

    def check(prompt_ids, tokens, label=""):
        expected = engine.generate(GenerationRequest(prompt_ids, len(tokens), mode="ar")).token_ids
        assert_greedy_equal(model, prompt_ids, expected, tokens, label)
    return check


@dataclass
class Up:
    model: str
    redis_url: str
    drafter: str
    address: str        # the verifier's gRPC address
    url: str            # the gateway's http://HOST:PORT


@pytest.fixture(scope="module")
def cluster(model_dir):
    """A real `sparsespec up`; its lines name every child, the gateway's URL beside the verifier."""
    with running_up("--model", model_dir, "--policy", "streaming", "--budget", 32, "-k", 4, "--max-batch", 2,
                    "--redis-persistence", "none") as up:
        gateway = up.word("gateway")
        assert gateway.startswith("http://127.0.0.1:"), "\n".join(up.lines)
        assert up.word("ready") == up.word("verifier")
        yield Up(str(model_dir), up.word("redis"), up.word("drafter"), up.word("verifier"), gateway)


@pytest.fixture(scope="module")
def oai(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(cluster):
    with SparseSpecClient(cluster.address) as c:
        yield c


def request(url: str, body=None, method: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    """One plain HTTP request (no client library): (status, JSON body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- completions -----------------------------------------------------------------------------

def test_models_and_health(cluster, oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [cluster.model]
    assert models[0].model_extra["max_model_len"] == CONTEXT
    status, body = request(cluster.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["redis"] == "ok"
    assert [v["status"] for v in body["verifiers"]] == ["SERVING"]


def test_completion_equals_sdk_and_ar_streamed_or_not(cluster, oai, sdk, tokenizer, ar, capsys):
    model = cluster.model
    ref = sdk.generate(PROMPT, max_tokens=32)
    assert ref.stop_reason == "max_tokens" and len(ref.token_ids) == 32
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    ar(prompt_ids, ref.token_ids, "sdk")
    capsys.readouterr()                             # `sparsespec generate` (its handler): the same tokens
    assert cli_main(["generate", "--server", cluster.address, "--prompt", PROMPT, "--max-tokens", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ref.token_ids

    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(prompt_ids), 32, len(prompt_ids) + 32)
    spec = r.model_extra["spec_decode"]
    assert spec["num_drafts"] > 0 and 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert spec["acceptance_rate"] == pytest.approx(spec["num_accepted_tokens"] / spec["num_draft_tokens"], abs=1e-3)
    assert spec["mean_acceptance_length"] >= 1 and len(spec["acceptance_rate_per_position"]) == 4

    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == ref.text and finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-2].model_extra["spec_decode"]["num_drafts"] > 0

    # token-id prompts, extra speculation fields (k, adaptive): the same greedy text
    r = oai.completions.create(model=model, prompt=prompt_ids, max_tokens=32, temperature=0,
                               extra_body={"k": 2, "adaptive": True})
    assert r.choices[0].text == ref.text
    assert r.model_extra["spec_decode"]["adaptive"] is True


def test_sse_ends_with_done(cluster):
    host, port = cluster.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": cluster.model, "prompt": PROMPT,
                                                        "max_tokens": 8, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_and_max_tokens(cluster, oai, sdk):
    model = cluster.model
    full = sdk.generate(PROMPT, max_tokens=32).text
    stop = full[12:15]
    expected = full[:full.find(stop)]
    ref = sdk.generate(PROMPT, max_tokens=32, stop=(stop,))
    assert ref.text == expected and ref.stop_reason == "stop"
    for stops in (stop, ["\x7fnever", stop]):
        r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0, stop=stops)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(ref.token_ids) < 32
        chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0,
                                             stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected   # never a piece of the stop
        assert chunks[-1].choices[0].finish_reason == "stop"
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == sdk.generate(PROMPT, max_tokens=5).text


def test_seeded_sampling_is_the_sdks(cluster, oai, sdk):
    model = cluster.model
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    ref = sdk.generate(PROMPT, max_tokens=16, **kw)
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, **kw)
    assert r.choices[0].text == ref.text


def _readme_block(lang: str, needle: str) -> str:
    """The README's first ```lang code block that contains `needle`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for block in re.findall(rf"```{lang}\n(.*?)```", readme, re.S):
        if needle in block:
            return block
    raise AssertionError(f"README.md has no {lang} block with {needle!r}")


def test_readme_openai_and_curl_examples_run_as_written(cluster, sdk, capsys):
    """The README's copy-paste OpenAI client and curl examples, with only PORT and the model
    name (smollm2-135m there, the tiny test model here) filled in."""
    fill = lambda text: text.replace("127.0.0.1:PORT", cluster.url.removeprefix("http://")).replace(  # noqa: E731
        "smollm2-135m", cluster.model)
    code = fill(_readme_block("python", "from openai import OpenAI"))
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "completion_tokens=" in printed and "'num_drafts'" in printed, printed    # usage, spec_decode
    block = fill(_readme_block("bash", "curl ")).splitlines()
    start = next(i for i, line in enumerate(block) if line.startswith("curl "))
    end = next(i for i in range(start, len(block)) if not block[i].rstrip().endswith("\\"))
    out = subprocess.run(["bash", "-c", "\n".join(block[start:end + 1])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    body = json.loads(out.stdout)
    prompt, max_tokens = re.search(r'"prompt": "([^"]+)", "max_tokens": (\d+)', "\n".join(block)).groups()
    ref = sdk.generate(prompt, max_tokens=int(max_tokens))
    assert body["choices"][0]["text"] == ref.text and body["usage"]["completion_tokens"] == len(ref.token_ids)


# --- chat ------------------------------------------------------------------------------------

def test_chat_equals_sdk_chat_and_generate_chat(cluster, oai, sdk, model_dir, tokenizer, ar, capsys):
    model = cluster.model
    prompt_ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert tokenizer.decode(prompt_ids).endswith("<s>assistant\n")
    ref = sdk.chat(MESSAGES, max_tokens=24)        # the tokenizer of the model the verifier serves
    ar(prompt_ids, ref.token_ids, "sdk chat")

    async def async_chat():
        client = AsyncSparseSpecClient(cluster.address)
        try:
            return await client.chat(MESSAGES, max_tokens=24)
        finally:
            await client.close()
    assert asyncio.run(async_chat()).token_ids == ref.token_ids

    r = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.stop_reason == "max_tokens" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(ref.token_ids))
    assert r.model_extra["spec_decode"]["num_draft_tokens"] > 0

    chunks = list(oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    # `sparsespec generate --chat` (its handler, here): through the verifier and in process (AR)
    user = [{"role": "user", "content": "Who made the light?"}]
    reply = oai.chat.completions.create(model=model, messages=user, max_tokens=16, temperature=0)
    common = ["generate", "--chat", "--prompt", "Who made the light?", "--max-tokens", "16", "--json"]
    for extra in (["--server", cluster.address], ["--model", str(model_dir), "--mode", "ar"]):
        capsys.readouterr()
        assert cli_main([*common, *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["text"] == reply.choices[0].message.content, extra
        assert out["token_ids"] == tokenizer.encode(out["text"], add_special_tokens=False), extra


# --- errors ----------------------------------------------------------------------------------

def _bad_cases(model: str):
    c, ch = "/v1/completions", "/v1/chat/completions"
    p = {"model": model, "prompt": PROMPT}
    m = {"model": model, "messages": MESSAGES}
    return [
        (c, {**p, "temperature": -1}, 400, "temperature"),
        (c, {**p, "temperature": "hot"}, 400, "temperature"),
        (c, {**p, "top_p": 0}, 400, "top_p"),
        (c, {**p, "top_p": 1.5}, 400, "top_p"),
        (c, {**p, "n": 2}, 400, "n"),
        (c, {**p, "max_tokens": 0}, 400, "max_tokens"),
        (c, {**p, "max_tokens": CONTEXT}, 400, "max_tokens"),       # beyond the context
        (c, {**p, "prompt": "x" * CONTEXT}, 400, "prompt"),           # the prompt alone fills it
        (c, {**p, "prompt": [[1, 2], [3, 4]]}, 400, "prompt"),
        (c, {**p, "prompt": [5, 999]}, 400, "prompt"),
        (c, {"model": model}, 400, "prompt"),
        (c, {"prompt": PROMPT}, 400, "model"),
        (c, {**p, "stop": 3}, 400, "stop"),
        (c, {**p, "k": 65}, 400, "k"),
        (c, {**p, "adaptive": "yes"}, 400, "adaptive"),
        (c, {**p, "logprobs": 2}, 400, "logprobs"),
        (c, {**p, "seed": 1.5}, 400, "seed"),
        (c, {**p, "model": "gpt-4"}, 404, "model"),
        (ch, {"model": model}, 400, "messages"),
        (ch, {**m, "messages": []}, 400, "messages"),
        (ch, {**m, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        (ch, {**m, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (ch, {**m, "n": 3}, 400, "n"),
        (ch, {**m, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        (ch, {**m, "tools": [{"type": "function"}]}, 400, "tools"),
        (ch, {**m, "model": "nope"}, 404, "model"),
        (c, b"{not json", 400, None),
        (c, b"[1, 2]", 400, None),
        ("/v1/embeddings", p, 404, None),
        (c, None, 405, None),                                         # GET
        (c, b'{"model": "' + b"x" * (5 << 20) + b'"}', 413, None),    # over the body limit
    ]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(cluster, oai):
    model = cluster.model
    for path, body, status, param in _bad_cases(model):
        got, err = request(cluster.url + path, body, method="GET" if body is None else "POST")
        assert got == status, (path, str(body)[:80], got, err)
        e = err["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["param"] == param, (str(body)[:80], e)
        assert "Traceback" not in e["message"] and (param is None or param in e["message"]), e
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=model, prompt=PROMPT, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.code == "model_not_found"
    assert request(cluster.url + "/health")[0] == 200
    assert oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0).usage.completion_tokens == 4


# --- a full verifier, a dropped stream, a dead verifier ------------------------------------------

def test_full_verifier_429_dropped_stream_frees_its_row_and_health_follows_the_data_path(
        cluster, model_dir, tokenizer, redis_srv):
    """A verifier of one row and one queue slot (on the test Redis, using the cluster's drafter)
    behind two gateways in this process: one given its address, one finding it in the registry."""
    redis_srv.start()
    redis_url = redis_srv.url
    v = spawn_service("verifier-http", "verifier_service",
                      ["--model", model_dir, "--redis", redis_url, "--drafter-address", cluster.drafter,
                       "--max-batch", 1, "--max-queue", 1, "--lease-ms", 1500])
    gw = reg = None
    try:
        assert v.wait_listening(120), "\n".join(v.output[-20:])
        gw = GatewayThread(GatewayConfig(model=str(model_dir), verifiers=(v.address,), reconnect_timeout_s=1.0),
                           tokenizer).start()
        reg = GatewayThread(GatewayConfig(model=str(model_dir), redis_url=redis_url, default_k=2, adaptive=True),
                            tokenizer).start()
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model, store = str(model_dir), SessionStore(redis_url)

        long = client.completions.create(model=model, prompt=PROMPT, max_tokens=1900, temperature=0,
                                         stream=True)
        session = next(iter(long)).id.removeprefix("cmpl-")
        assert store.get(session).state == "active"
        with pytest.raises(openai.RateLimitError) as full:          # the verifier's one slot is taken
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert full.value.status_code == 429 and full.value.code == "overloaded"

        long.close()                                                 # the client goes away mid-stream
        wait_for(lambda: store.get(session).state == "aborted", 10, "the dropped turn to be cancelled")
        assert store.get(session).generated_len < 1900
        t0 = time.monotonic()
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and time.monotonic() - t0 < 10
        assert r.model_extra["spec_decode"]["adaptive"] is False        # gw: the verifier's defaults (k 4)
        assert len(r.model_extra["spec_decode"]["acceptance_rate_per_position"]) == 4
        # reg was started with -k 2 --adaptive: its defaults where the request names neither, the
        # request's own fields over them
        via_reg = openai.OpenAI(base_url=reg.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        spec = via_reg.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).model_extra["spec_decode"]
        assert spec["adaptive"] is True and spec["num_drafts"] > 0, spec
        spec = via_reg.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"adaptive": False}).model_extra["spec_decode"]
        assert spec["adaptive"] is False and len(spec["acceptance_rate_per_position"]) == 2, spec

        # /health is the data path: Redis down -> 503 on both gateways (the verifier says NOT_SERVING;
        # the other cannot read the registry), back -> 200; a killed verifier -> 503
        assert request(gw.url + "/health")[0] == 200
        status, body = request(reg.url + "/health")
        assert status == 200 and body["verifiers"] == [{"address": v.address, "status": "SERVING"}], body
        redis_srv.stop()
        wait_for(lambda: request(gw.url + "/health")[0] == 503, 10, "health 503 without Redis")
        status, body = request(reg.url + "/health")
        assert status == 503 and body["redis"].startswith("unreachable"), body
        redis_srv.start()
        wait_for(lambda: request(gw.url + "/health")[0] == 200, 20, "health 200 with Redis back")
        wait_for(lambda: request(reg.url + "/health")[0] == 200, 20, "the verifier registered again")
        v.kill()
        status, body = request(gw.url + "/health")
        assert status == 503 and body["status"] == "unavailable" and "UNREACHABLE" in body["verifiers"][0]["status"]
        with pytest.raises(openai.APIStatusError) as gone:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert gone.value.status_code == 503 and gone.value.type == "service_unavailable_error"
    finally:
        for g in (gw, reg):
            if g is not None:
                g.stop()
        v.kill()


# --- SmolLM2: its real chat template --------------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_chat(smollm2_dir, redis_srv):
    """SmolLM2-Instruct's own chat template, streamed through the gateway: the SDK's reply."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    redis_srv.start()
    redis_url = redis_srv.url.rsplit("/", 1)[0] + "/2"      # a registry of its own: no tiny drafter there
    with LocalCluster(ClusterConfig(model=str(smollm2_dir), drafter="layers:6", policy="chunk_topk", budget="64",
                                    k=4, max_context=512, max_batch=1, http_port=0), redis_url=redis_url) as c:
        client = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        chunks = list(client.chat.completions.create(model=str(smollm2_dir), messages=messages, max_tokens=12,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        with SparseSpecClient(c.address) as sdk:
            ref = sdk.chat(messages, max_tokens=12)
    assert ref.text.strip() and "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
    assert finish == ("length" if ref.stop_reason == "max_tokens" else "stop")
    tok = load_tokenizer(smollm2_dir)
    ids = chat_prompt_ids(tok, messages)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), len(ref.token_ids))
