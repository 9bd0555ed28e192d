"""KV summaries through the real services: verifier -> Draft.summary -> a verifier_guided drafter
process, the summary kept in Redis with the session, and the output still equal to AR."""

from __future__ import annotations

import pytest

from kvstore.coord.sessions import SessionStore
from kvstore.cache.summary import Summary
from sparsespec.client import SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster
from test_services import PROMPT, model_dir, reference  # noqa: F401 - shared fixtures


@pytest.fixture(scope="module")
def guided_cluster(model_dir, redis_srv):  # noqa: F811
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(model_dir), policy="verifier_guided", budget="16", k=4),
                      redis_url=redis_srv.url) as c:
        yield c


@pytest.mark.parametrize("k", [1, 4])
def test_guided_drafter_through_services_equals_ar_and_summary_is_stored(guided_cluster, reference, k):  # noqa: F811
    prompt = PROMPT * 6                                        # longer than the budget many times over
    with SparseSpecClient([guided_cluster.address]) as client:
        done = client.generate(prompt, max_tokens=40, k=k)
    reference.check(reference.encode(prompt), done.token_ids, f"guided k={k}", max_tokens=40)
    m = done.metrics
    assert m["rounds"] > 0 and m["drafter_failures"] == 0
    assert m["summaries_sent"] >= 1 and 0 < m["summary_bytes"] < 1000
    stored = SessionStore(guided_cluster.redis_url).get_summary(done.session_id)
    summary = Summary.decode(stored)            # the latest one, for a replacement drafter
    assert any(summary.chunks) and summary.length >= len(reference.encode(prompt)) - 1
    assert len(summary.chunks) == summary.groups * summary.heads and summary.heads > 1   # per (group, KV head)


@pytest.mark.parametrize("flags,message", [
    (["--summary-layers", "a,b"], "error: summary.layers: expected comma-separated integers"),
    (["--summary-every", "0"], "error: summary.every_rounds: must be an integer >= 1"),
    (["--summary-alpha", "1.5"], "error: summary.alpha_threshold: must be in [0, 1]"),
    (["--summary-layers", "99"], "error: summary.layers: layer 99 does not exist"),
    (["--summary-layers", "1", "--summary-groups", "2"], "error: summary.groups: 2 groups of 1 scored layers"),
])
def test_bad_summary_flags_stop_the_verifier_with_one_line(model_dir, redis_srv, flags, message):  # noqa: F811
    import os
    import subprocess
    import sys
    redis_srv.start()
    proc = subprocess.run([sys.executable, "-m", "verifier_service", "--model", str(model_dir), "--redis",
                           redis_srv.url, *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
