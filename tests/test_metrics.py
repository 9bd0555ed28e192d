"""Prometheus /metrics (issue 15, item 3) on every service of a real `sparsespec up`, parsed with
prometheus_client's own text parser: after a generation the speculation counters rose by exactly
what the response's metrics say (SDK and HTTP), the histograms and gauges moved, and the Grafana
dashboard in deploy/ parses and names only metrics the services export.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from up_process import running_up
from sparsespec.client import SparseSpecClient
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import find_redis_server

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")

PROMPT = "In the beginning God created the heaven and the earth. "
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "sparsespec.json"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    model = save_random_model(tmp_path_factory.mktemp("metrics") / "model",
                              tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=2), seed=7)
    with running_up("--model", model, "--policy", "streaming", "--budget", 32, "-k", 4,
                    "--redis-persistence", "none") as up:
        seen = {}
        for line in up.lines:
            words = line.split()
            if words and words[0] == "metrics":
                seen[words[1].rstrip("0123456789")] = words[2]
        assert {"drafter", "verifier"} <= set(seen), "\n".join(up.lines)
        seen["verifier_address"], seen["ready_address"] = up.word("verifier"), up.word("ready")
        seen["gateway_address"] = up.word("gateway")
        seen["gateway"] = seen["gateway_address"] + "/metrics"
        seen["model"] = str(model)
        yield seen


def scrape(url: str) -> dict:
    """{(sample name, labels): value} of one /metrics page, through prometheus_client's parser."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


S = "sparsespec:"


def test_counters_rise_by_what_the_responses_say(up):
    before = scrape(up["verifier"])
    with SparseSpecClient(up["ready_address"]) as c:
        done = c.generate(PROMPT, max_tokens=24)
    after = scrape(up["verifier"])
    m = done.metrics
    assert m["drafted"] > 0
    assert delta(before, after, S + "spec_decode_num_drafts_total") == m["rounds"]
    assert delta(before, after, S + "spec_decode_num_draft_tokens_total") == m["drafted"]
    assert delta(before, after, S + "spec_decode_num_accepted_tokens_total") == m["accepted"]
    per_pos = [delta(before, after, S + "spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(len(m["per_position_acceptance"]))]
    drafted_pos = [delta(before, after, S + "spec_decode_num_draft_tokens_per_pos_total", position=str(i))
                   for i in range(len(m["per_position_acceptance"]))]
    assert sum(per_pos) == m["accepted"] and sum(drafted_pos) == m["drafted"]
    assert [round(a / d, 4) for a, d in zip(per_pos, drafted_pos)] == m["per_position_acceptance"]
    assert delta(before, after, S + "generation_tokens_total") == 24
    assert delta(before, after, S + "time_to_first_token_seconds_count") == 1
    assert delta(before, after, S + "inter_token_latency_seconds_count") == 23
    assert delta(before, after, S + "spec_decode_mean_acceptance_length_count") == 1
    assert delta(before, after, S + "spec_decode_mean_acceptance_length_sum") == pytest.approx(m["tau"], abs=1e-3)
    assert delta(before, after, S + "round_seconds_count") >= m["rounds"] + m["ar_steps"] - 1   # one may be the prefill's
    assert delta(before, after, S + "draft_rpc_seconds_count") >= m["rounds"]
    assert delta(before, after, S + "request_success_total", finished_reason="max_tokens") == 1
    assert after[(S + "num_requests_running", ())] == 0 and after[(S + "verifier_kv_bytes", ())] > 0   # parked

    names = {name for name, _ in after}
    for family in ("summaries_sent_total", "summary_bytes_total", "feeds_sent_total", "feed_bytes_total",
                   "drafter_failures_total", "drafter_rebinds_total", "session_resumes_total",
                   "num_requests_waiting"):      # the rest of #15's list: exported (0 here: no failure, no feed)
        assert S + family in names, family
    assert delta(before, after, S + "drafter_failures_total") == m["drafter_failures"] == 0
    assert delta(before, after, S + "num_plain_steps_total") == m["ar_steps"]
    assert delta(before, after, S + "adaptive_seeded_total") == m["adaptive_seeded"] == 0   # not adaptive

    drafter = scrape(up["drafter"])
    assert drafter[(S + "drafter_sessions", ())] >= 1 and drafter[(S + "drafter_kv_device_bytes", ())] > 0
    assert drafter[(S + "drafter_kv_host_bytes", ())] > 0

    # the same through the HTTP gateway, whose response carries the turn's metrics as vLLM names them
    before, gw_before = scrape(up["verifier"]), scrape(up["gateway"])
    oai = openai.OpenAI(base_url=up["gateway_address"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = oai.completions.create(model=up["model"], prompt=PROMPT, max_tokens=16, temperature=0)
    after, gw_after = scrape(up["verifier"]), scrape(up["gateway"])
    spec = r.model_extra["spec_decode"]
    assert delta(before, after, S + "spec_decode_num_drafts_total") == spec["num_drafts"]
    assert delta(before, after, S + "spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert delta(before, after, S + "spec_decode_num_accepted_tokens_total") == spec["num_accepted_tokens"]
    assert delta(gw_before, gw_after, S + "http_requests_total", route="/v1/completions", status="200") == 1
    assert delta(gw_before, gw_after, S + "http_time_to_first_token_seconds_count") == 1


def test_grafana_dashboard_parses_and_names_exported_metrics(up):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert {p["title"].split(":")[0] for p in dash["panels"]} >= {"tau", "alpha per draft position",
                                                                   "throughput", "time to first token"}
    used = set(re.findall(r"sparsespec:[a-zA-Z0-9_:]+", " ".join(exprs)))
    exported = set()
    for role in ("verifier", "drafter", "gateway"):
        exported |= {name for name, _ in scrape(up[role])}
    missing = used - exported
    assert not missing, f"the dashboard names metrics no service exports: {sorted(missing)}"
    assert len(used) >= 15
