"""`sparsespec bench capacity`: aggregate decode throughput, AR against speculation, as the number
of sessions S and the context grow, in one run on the same cores.

Where speculation pays is a capacity question (docs/design.md, "Capacity"): a drafter with a fixed
KV budget drafts S sessions in one forward per position, so its cost stays nearly flat while the
verifier's AR step grows with S x context. Per (context, S) cell this measures:

- **ar**: the verifier alone, batched over the S sessions (the baseline).
- **spec**: the same engine and rows with the drafter in process (batched drafting).
- **adaptive** (with `--adaptive`): spec again, each session with adaptive k (spec/adaptive.py),
  which may switch speculation off where it does not pay: the run that shows it never leaves a
  session much slower than AR.
- **services** (the cells named by `--service-cells`): a real local cluster (redis-server, a
  drafter process, a verifier process, gRPC on 127.0.0.1) driven through the SDK.

Only decode is compared: prefill and time to first token are reported apart. In process every
prompt is prefilled once per context (its row is reused by every cell and mode) and the drafter
starts from the verifier's K/V of the prompt (cast to its dtype) instead of prefilling it again;
through the services each session's first turn (1 token) prefills both services for real (its
time to first token is reported), and its second turn (one token more of the same AR text, then
the decode) runs for all S sessions at once. Every output is checked against AR: in process the
same tokens; through the services, turn 2 must continue with AR's own tokens.

S = 1 cells run three prompts one after another; S > 1 cells run S prompts together. Spread:
min / median / max over the runs (S = 1) or over the sessions' own decode rates (S > 1). The
component times give the cost model per cell: tau / (k c_draft + c_verify), in AR steps.
"""

from __future__ import annotations

import json
import shlex
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsespec.bench.acceptance import OWN_TAIL, adopting
from sparsespec.bench.prompts import kjv_prompts
from sparsespec.bench.report import replace_section
from sparsespec.build import EngineConfig, check_device, load_verifier, make_drafter_model
from sparsespec.data import kjv
from sparsespec.errors import InvalidArgument
from sparsespec.models.quant import check_drafter_weights, drafter_weights
from kvstore.cache.policies import get_policy
from sparsespec.spec.adaptive import AdaptiveConfig
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.feed import Feeder
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DraftCall

BEGIN, END = "<!-- capacity-bench:begin -->", "<!-- capacity-bench:end -->"
HELDOUT_BOOK = "Proverbs"                       # chooses k; never reported
BOOKS = ("Genesis", "Exodus", "Matthew", "Isaiah", "Luke", "Psalms", "Jeremiah", "Job")
GREEDY = SamplingParams()


@dataclass(frozen=True)
class CapacityConfig:
    model: str = "smollm2-135m"
    contexts: tuple[int, ...] = (4096, 8000)
    sessions: tuple[int, ...] = (1, 4, 8)
    max_tokens: int = 48
    k: int | None = None                         # None: chosen on the held-out prompt per context
    k_candidates: tuple[int, ...] = (1, 2, 3, 4)
    policy: str = "fed"                          # the default drafter: the verifier's exact K/V (spec/feed.py)
    budget: int = 256
    drafter: str = "same"                        # same | layers:N (it must share the verifier's K/V)
    drafter_weights: str = "int8"                # the low-memory drafter; "same" shares the verifier's
    service_cells: tuple[tuple[int, int], ...] = ((4, 4096), (8, 8000))   # (sessions, context)
    ttft_contexts: tuple[int, ...] = (4096,)     # time to first token through the services, AR vs spec
    ttft_prompts: int = 3                        # prompts per TTFT cell (fewer for 16K prefills on a CPU)
    adaptive: bool = False                       # also an adaptive-k row per cell
    reps: int = 1                                # interleaved decodes per prompt group and mode, median kept
    threads: int | None = None
    device: str = "cpu"                          # in-process cells only (scripts/gpu_check.sh: cuda)
    dtype: str = "float32"

    def __post_init__(self):
        check_device(self.device)
        if self.device != "cpu" and self.service_cells:
            raise InvalidArgument("service_cells", f"the service cells run on the CPU; with --device {self.device} "
                                                   "pass --service-cells ''")
        if not self.contexts or min(self.contexts) < OWN_TAIL + 2:
            raise InvalidArgument("contexts", f"need contexts of at least {OWN_TAIL + 2} tokens")
        if any(c not in self.contexts for c in self.ttft_contexts) or (self.ttft_contexts and 1 not in self.sessions):
            raise InvalidArgument("ttft_contexts", f"{self.ttft_contexts} must be among --contexts "
                                                   f"{self.contexts}, with 1 in --sessions")
        if isinstance(self.ttft_prompts, bool) or not 1 <= self.ttft_prompts <= self.num_prompts:
            raise InvalidArgument("ttft_prompts", f"must be in [1, {self.num_prompts}], got {self.ttft_prompts!r}")
        if not self.sessions or min(self.sessions) < 1:
            raise InvalidArgument("sessions", f"must be >= 1, got {self.sessions}")
        if isinstance(self.reps, bool) or not isinstance(self.reps, int) or self.reps < 1:
            raise InvalidArgument("reps", f"must be an integer >= 1, got {self.reps!r}")
        if self.max_tokens < 4:
            raise InvalidArgument("max_tokens", f"must be >= 4, got {self.max_tokens}")
        if self.drafter != "same" and not self.drafter.startswith("layers:"):
            raise InvalidArgument("drafter", "the capacity bench starts the drafter from the verifier's K/V: "
                                             f"same or layers:N, got {self.drafter!r}")
        check_drafter_weights(self.drafter_weights)
        for s, c in self.service_cells:
            if s not in self.sessions or c not in self.contexts:
                raise InvalidArgument("service_cells", f"{s}x{c} is not a cell of --sessions x --contexts")
        if self.device != "cpu" and self.ttft_contexts:
            raise InvalidArgument("ttft_contexts", f"the services run on the CPU; with --device {self.device} "
                                                   "pass --ttft-contexts ''")

    @property
    def num_prompts(self) -> int:
        """Reporting prompts per context: S of them for the largest S, 3 for the S = 1 runs."""
        return max(3, *self.sessions)


def prompts_for(tokenizer, context: int, n: int) -> list[list[int]]:
    """n reporting prompts of `context` tokens, each from its own stretch of the KJV."""
    return kjv_prompts(tokenizer, context, n, BOOKS)


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Bench:
    def __init__(self, cfg: CapacityConfig):
        self.cfg = cfg
        self.max_context = max(cfg.contexts) + cfg.max_tokens + 8
        engine_cfg = EngineConfig(model=cfg.model, drafter=cfg.drafter, policy=cfg.policy, budget=cfg.budget,
                                  max_context=self.max_context, max_batch=cfg.num_prompts + 1,
                                  device=cfg.device, dtype=cfg.dtype)
        self.sparse = engine_cfg.sparse_config()
        self.verifier, self.tokenizer = load_verifier(engine_cfg)
        self.drafter_model = drafter_weights(make_drafter_model(self.verifier, cfg.drafter, engine_cfg),
                                             cfg.drafter_weights)
        # Rows 0.. hold the reporting prompts, row num_prompts the held-out one.
        self.engine = SpecEngine(self.verifier, None, self.tokenizer, self.max_context, cfg.num_prompts + 1,
                                 summary=None)
        self.records: list[dict] = []
        self.prompts: dict[int, list[list[int]]] = {}          # context -> reporting prompts
        self.k_of: dict[tuple[int, int], int] = {}              # (context, S) -> k used
        self.ar_tokens: dict[tuple[int, int], list[int]] = {}   # (context, prompt) -> AR output
        self._prefixes: dict[int, tuple] = {}                   # row -> its prompt's prefix K/V (_prefix)

    # --- in process ------------------------------------------------------------------------

    @property
    def fed(self) -> bool:
        return get_policy(self.sparse.policy).fed

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> list[float]:
        """Prefill each row once (the cells reuse it); seconds per prompt. A fed drafter's
        selection scores with the prefill's queries, so they are recorded."""
        out = []
        for row, ids in zip(rows, prompts):
            self.engine.verifier.record(row, self.fed)
            t0 = time.perf_counter()
            self.engine.verifier.prefill(row, ids[:-1])
            out.append(time.perf_counter() - t0)
            if not self.fed:
                self._prefixes[row] = self._prefix(row, len(ids) - OWN_TAIL)
        return out

    def _prefix(self, row: int, n: int):
        """The verifier's K/V of the row's first n tokens, taken right after its prefill: views of
        a global layer (positions below n are never rewritten), a copy of what a local layer's ring
        holds (later decodes overwrite it)."""
        verifier, layers = self.engine.verifier, len(self.drafter_model.layers)
        kv = [verifier.kv(row, i, n) for i in range(layers)]            # [Hkv, n - start, D] each
        return [k for k, _, _ in kv], [x for _, x, _ in kv], n

    def _adopt(self, row: int, n: int):
        """Start a drafter session from the verifier's K/V of the row's first n tokens."""
        prefix = self._prefixes[row]
        assert prefix[2] == n, (prefix[2], n)
        return adopting(prefix)

    def decode(self, rows: list[int], prompts: list[list[int]], mode: str, k: int, max_tokens: int) -> dict:
        """Decode the prompts in their (prefilled) rows together; the rows keep their prompts.
        mode: ar | spec | adaptive (spec with adaptive k, starting at k)."""
        e = self.engine
        host = None
        adaptive = AdaptiveConfig(enabled=mode == "adaptive", k_max=max(2 * k, 8))
        mode = "spec" if mode == "adaptive" else mode
        if mode == "spec":
            host = DrafterHost(self.drafter_model, DrafterHostConfig(self.sparse, self.max_context))
            e.drafter = LocalDrafterClient(host)
        runs = []
        for row, ids in zip(rows, prompts):
            if host is not None and not self.fed:   # a fed drafter is fed by the engine instead
                host.start_session = self._adopt(row, len(ids) - OWN_TAIL)
            runs.append(e.start(GenerationRequest(ids, max_tokens, k=max(k, 1), adaptive=adaptive, mode=mode), row,
                                session=f"row{row}", cached=len(ids) - 1))
        t0 = time.perf_counter()
        while any(not r.done for r in runs):
            e.step([r for r in runs if not r.done])
        wall = time.perf_counter() - t0
        for r in runs:
            e.release(r)
        results = [e.finish(r) for r in runs]
        e.drafter = None
        m = [r.metrics for r in results]
        busiest = max(m, key=lambda x: x.verifier_forwards)
        forwards = busiest.verifier_forwards
        return {"tokens": [r.token_ids for r in results], "wall_s": wall,
                "decode_tok_s": sum(len(r.token_ids) for r in results) / wall,
                "session_tok_s": [x.tokens_per_s for x in m],
                "tau": statistics.median(x.tau for x in m), "alpha": statistics.median(x.alpha for x in m),
                "k": statistics.median(x.k for x in m) if mode == "spec" else 0,
                "ar_steps": sum(x.ar_steps for x in m),
                "verify_s_per_forward": busiest.verify_s / forwards,
                "draft_s_per_round": busiest.draft_s / busiest.rounds if busiest.rounds else 0.0,
                "drafter_device_bytes": max(x.drafter_kv_device_bytes for x in m),
                "drafter_failures": sum(x.drafter_failures for x in m),
                "feed_refreshes": sum(x.feed_refreshes for x in m), "feed_s": sum(x.feed_s for x in m)}

    def decode_cell(self, groups: list[list[int]], prompts: list[list[int]], modes: tuple[str, ...],
                    k: int) -> tuple[dict[str, list[dict]], bool]:
        """Each group decoded in every mode, `reps` times interleaved (ar, spec, ... again): this
        VM's speed drifts by +-15% between runs, which interleaving spreads over the modes alike.
        Per mode, one run per group: its median by decode rate. Also: every run's output is AR's."""
        cell: dict[str, list[dict]] = {m: [] for m in modes}
        equal = True
        for g in groups:
            runs = {m: [] for m in modes}
            for _ in range(self.cfg.reps):
                for mode in modes:
                    runs[mode].append(self.decode(g, [prompts[i] for i in g], mode, k, self.cfg.max_tokens))
            ar_tokens = runs["ar"][0]["tokens"]
            equal &= all(o["tokens"] == ar_tokens for m in modes for o in runs[m])
            for mode in modes:
                ranked = sorted(runs[mode], key=lambda o: o["decode_tok_s"])
                chosen = ranked[(len(ranked) - 1) // 2]
                chosen["reps_tok_s"] = [o["decode_tok_s"] for o in runs[mode]]   # in run order: an adaptive
                cell[mode].append(chosen)                                          # cell's first run learns
        return cell, equal

    def heldout_tau(self, row: int, ids: list[int], log) -> dict[int, float]:
        """tau of each candidate k on the held-out prompt (S = 1): the acceptance half of choosing k."""
        taus = {}
        for k in self.cfg.k_candidates:
            taus[k] = self.decode([row], [ids], "spec", k, self.cfg.max_tokens)["tau"]
            log(f"  held-out {HELDOUT_BOOK}: k={k} tau {taus[k]:.2f}")
        return taus

    @torch.inference_mode()
    def step_costs(self, rows: list[int], heldout_row: int, heldout: list[int], reps: int = 5) -> dict:
        """The cost half, timing only (no output is read): an AR step and a (k+1)-token verify over
        these S rows, and one batched draft position over S drafter sessions. In AR steps; each the
        fastest of `reps` (other work on the machine only ever adds time)."""
        v, med = self.engine.verifier, min
        lengths = [v.length(r) for r in rows]

        def verify(width: int) -> float:
            times = []
            for _ in range(reps + 1):                              # the first is a warm-up
                t0 = time.perf_counter()
                v.verify(rows, [[1] * width for _ in rows])
                times.append(time.perf_counter() - t0)
                for r, n in zip(rows, lengths):
                    v.commit(r, n)
            return med(times[1:])

        ar = verify(1)
        v.commit(heldout_row, len(heldout) - 1)                 # the held-out decodes left their outputs there
        host = DrafterHost(self.drafter_model, DrafterHostConfig(self.sparse, self.max_context),
                           **({} if self.fed else {"start_session": self._adopt(heldout_row, len(heldout) - OWN_TAIL)}))
        feeders = [Feeder(host.open(f"cost{i}", heldout, GREEDY).feed) for i in range(len(rows))] if self.fed else []
        k = max(self.cfg.k_candidates)
        times = []
        for _ in range(reps + 1):                              # the first (a fed drafter's selection) is a warm-up
            feeds = [f.next(v, heldout_row, k) for f in feeders] or [None] * len(rows)
            t0 = time.perf_counter()
            replies = host.draft_many([DraftCall(f"cost{i}", len(heldout), [], k, GREEDY, feed=feeds[i])
                                       for i in range(len(rows))])
            times.append(time.perf_counter() - t0)
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if failed is not None:
                raise RuntimeError(f"timing the drafter: {failed}")
            for f, data in zip(feeders, feeds):
                f.delivered(data)
        return {"ar_s": ar, "c_draft": med(times[1:]) / k / ar,
                "c_verify": {kk: verify(kk + 1) / ar for kk in self.cfg.k_candidates}}

    def choose_k(self, taus: dict[int, float], costs: dict) -> tuple[int, dict[int, float]]:
        """The k with the best modelled speedup tau / (k c_draft + c_verify) for this cell."""
        model = {k: taus[k] / (k * costs["c_draft"] + costs["c_verify"][k]) for k in taus}
        return max(model, key=model.get), model

    def run_context(self, context: int, log) -> list[dict]:
        cfg = self.cfg
        prompts = prompts_for(self.tokenizer, context, cfg.num_prompts)
        heldout = kjv.prompt_of_tokens(self.tokenizer, context, book=HELDOUT_BOOK)
        log(f"context {context}: prefilling {len(prompts)} prompts (+1 held out)")
        prefill_s = self.prefill(list(range(len(prompts))), prompts)
        self.prompts[context] = prompts
        taus = None
        if cfg.k is None:
            self.prefill([cfg.num_prompts], [heldout])
            taus = self.heldout_tau(cfg.num_prompts, heldout, log)
        records = []
        for s in cfg.sessions:
            groups = [[i] for i in range(3)] if s == 1 else [list(range(s))]
            costs = self.step_costs(list(range(s)), cfg.num_prompts, heldout) if taus else None
            k, modelled = self.choose_k(taus, costs) if taus else (cfg.k, {})
            if taus:
                log(f"  S={s}: c_draft {costs['c_draft']:.2f}, c_verify "
                    + ", ".join(f"k={kk} {c:.2f}" for kk, c in costs["c_verify"].items())
                    + f" -> k={k} (modelled " + ", ".join(f"{kk}: {m:.2f}x" for kk, m in modelled.items()) + ")")
            self.k_of[(context, s)] = k
            modes = ("ar", "spec") + (("adaptive",) if cfg.adaptive else ())
            cell, equal = self.decode_cell(groups, prompts, modes, k)
            for g, out in zip(groups, cell["ar"]):
                for i, toks in zip(g, out["tokens"]):
                    self.ar_tokens[(context, i)] = toks
            ar_step = statistics.median(o["verify_s_per_forward"] for o in cell["ar"])
            rates_of = {m: [o["decode_tok_s"] for o in cell[m]] if s == 1 else cell[m][0]["session_tok_s"]
                        for m in modes}                                # per prompt (S = 1) or per session
            for mode in modes:
                outs, rates = cell[mode], rates_of[mode]
                rec = {"mode": mode, "sessions": s, "context": context,
                       "k": k if mode == "spec" else statistics.median(o["k"] for o in outs) if mode == "adaptive" else 0,
                       "k_modelled_speedup": modelled if mode == "spec" else {},
                       "decode_tok_s": statistics.median(o["decode_tok_s"] for o in outs),
                       "spread_tok_s": _spread(rates), "runs": len(outs),
                       "reps_tok_s": [o["reps_tok_s"] for o in outs],   # per group, every rep in order
                       "tau": statistics.median(o["tau"] for o in outs),
                       "alpha": statistics.median(o["alpha"] for o in outs),
                       "outputs_equal_ar": equal,
                       "prefill_s": _spread([prefill_s[i] for g in groups for i in g]),
                       "ar_step_ms": 1e3 * ar_step,
                       "drafter_device_bytes": max(o["drafter_device_bytes"] for o in outs),
                       "drafter_failures": sum(o["drafter_failures"] for o in outs),
                       "ar_steps": sum(o["ar_steps"] for o in outs)}
                if mode == "spec":
                    verify = statistics.median(o["verify_s_per_forward"] for o in outs)
                    draft = statistics.median(o["draft_s_per_round"] for o in outs)
                    rec.update(verify_ms=1e3 * verify, draft_round_ms=1e3 * draft,
                               c_verify=verify / ar_step, c_draft=draft / k / ar_step,
                               predicted_speedup=rec["tau"] / (draft / ar_step + verify / ar_step))
                records.append(rec)
            ar, sp = records[-len(modes)], records[-len(modes) + 1]
            for rec in records[-len(modes) + 1:]:
                rec["speedup"] = rec["decode_tok_s"] / ar["decode_tok_s"]
                # the session (prompt, or row of the batch) that gained least against its own AR run
                rec["worst_session_vs_ar"] = min(x / y for x, y in zip(rates_of[rec["mode"]], rates_of["ar"]))
            log(f"  S={s}: AR {ar['decode_tok_s']:.2f} tok/s, spec {sp['decode_tok_s']:.2f} tok/s "
                f"({sp['speedup']:.2f}x; model {sp['predicted_speedup']:.2f}x) tau {sp['tau']:.2f} k={k} "
                f"c_draft {sp['c_draft']:.2f} c_verify {sp['c_verify']:.2f} equal={equal}")
            if cfg.adaptive:
                ad = records[-1]
                log(f"  S={s}: adaptive {ad['decode_tok_s']:.2f} tok/s ({ad['speedup']:.2f}x; worst session "
                    f"{ad['worst_session_vs_ar']:.2f}x its AR), median k {ad['k']}, {ad['ar_steps']} plain steps; "
                    f"every run in order (the first in a regime learns it): "
                    + " | ".join(" ".join(f"{x:.2f}" for x in g) for g in ad["reps_tok_s"]))
        return records

    # --- through the services ----------------------------------------------------------------

    def run_services(self, log) -> list[dict]:
        cfg = self.cfg
        if not cfg.service_cells:
            return []
        from sparsespec.cluster import ClusterConfig, LocalCluster

        records = []
        for s, context in cfg.service_cells:
            k = self.k_of[(context, s)]
            ccfg = ClusterConfig(model=cfg.model, drafter=cfg.drafter, policy=cfg.policy, budget=str(cfg.budget),
                                 max_context=self.max_context, max_batch=max(8, s), k=k,
                                 drafter_weights=cfg.drafter_weights)
            prompts = self.prompts[context][:s]
            ar = [self.ar_tokens[(context, i)] for i in range(s)]
            log(f"services S={s} context {context}: starting a cluster")
            with LocalCluster(ccfg) as cluster:
                first, second, wall = concurrent_turns(cluster.address, prompts, ar, k, cfg.max_tokens)
            equal = all(f[0].token_ids == a[:1] and r.token_ids == a[2:] for f, r, a in zip(first, second, ar))
            generated = sum(len(r.token_ids) for r in second)
            in_process_ar = next(r for r in self.records if r["mode"] == "ar" and r["sessions"] == s
                                 and r["context"] == context)
            rec = {"mode": "services", "sessions": s, "context": context, "k": k,
                   "decode_tok_s": generated / wall, "wall_s": wall,
                   "spread_tok_s": _spread([r.metrics["tokens_per_s"] for r in second]),
                   "tau": statistics.median(r.metrics["tau"] for r in second),
                   "alpha": statistics.median(r.metrics["alpha"] for r in second),
                   "ttft_s": _spread([f[1] for f in first]), "outputs_equal_ar": equal,
                   "drafter_device_bytes": max(r.metrics["drafter_kv_device_bytes"] for r in second),
                   "drafter_failures": sum(r.metrics["drafter_failures"] for r in second),
                   "rpc_p50_ms": statistics.median(r.metrics["draft_overhead_p50_ms"] for r in second)}
            rec["speedup"] = rec["decode_tok_s"] / in_process_ar["decode_tok_s"]
            records.append(rec)
            log(f"  services S={s} context {context}: {rec['decode_tok_s']:.2f} tok/s ({rec['speedup']:.2f}x AR), "
                f"tau {rec['tau']:.2f}, TTFT median {rec['ttft_s']['median']:.1f} s, equal={equal}")
        return records

    def run_ttft(self, log) -> list[dict]:
        """Time to first token through the services, one session at a time on an idle cluster:
        the first streamed chunk of AR, of speculation with this bench's drafter, and (when that
        drafter is fed) of one that keeps its own KV (chunk_topk: it prefills the prompt itself
        once the verifier has). Fresh sessions, ttft_prompts prompts, every output checked against AR."""
        if not self.cfg.ttft_contexts:   # nothing to time: need no gRPC (a GPU image may carry another grpcio)
            return []
        from sparsespec.client import SparseSpecClient
        from sparsespec.cluster import ClusterConfig, LocalCluster

        cfg = self.cfg
        policies = [cfg.policy] + (["chunk_topk"] if self.fed else [])
        records = []
        for context in cfg.ttft_contexts:
            prompts = self.prompts[context][:cfg.ttft_prompts]
            ar_out = [self.ar_tokens[(context, i)][:8] for i in range(len(prompts))]
            times: dict[str, list[float]] = {}
            equal = True
            for policy in policies:
                ccfg = ClusterConfig(model=cfg.model, drafter=cfg.drafter, policy=policy, budget=str(cfg.budget),
                                     max_context=self.max_context, max_batch=2, k=self.k_of[(context, 1)],
                                     drafter_weights=cfg.drafter_weights)
                log(f"TTFT context {context}: a cluster with policy {policy}")
                with LocalCluster(ccfg) as cluster, SparseSpecClient(cluster.address) as c:
                    c.generate(prompts[0][:64], max_tokens=4)                     # warm-up
                    for mode in (["ar"] if policy == cfg.policy else []) + ["spec"]:
                        label = "ar" if mode == "ar" else f"spec-{policy}"
                        for i, ids in enumerate(prompts):
                            t0, first, got = time.perf_counter(), None, []
                            for chunk in c.stream(ids, max_tokens=8, mode=mode, k=self.k_of[(context, 1)]):
                                first = first or time.perf_counter() - t0
                                got += chunk.token_ids
                            times.setdefault(label, []).append(first)
                            equal &= got == ar_out[i]
            ar = statistics.median(times["ar"])
            for label, ts in times.items():
                rec = {"mode": f"ttft-{label}", "sessions": 1, "context": context, "ttft_s": _spread(ts),
                       "prompts": len(ts), "ttft_vs_ar": statistics.median(ts) / ar, "outputs_equal_ar": equal}
                records.append(rec)
                log(f"  TTFT {label}: median {rec['ttft_s']['median']:.2f} s ({rec['ttft_vs_ar']:.2f}x AR)")
        return records

    def run(self, log=print) -> list[dict]:
        self.records = []
        for context in self.cfg.contexts:
            self.records += self.run_context(context, log)
        self.records += self.run_services(log)
        self.ttft = self.run_ttft(log)
        return self.records


def concurrent_turns(address: str, prompts: list[list[int]], ar: list[list[int]], k: int, max_tokens: int,
                     mode: str = "spec") -> tuple[list, list, float]:
    """S sessions through the SDK at once, decode timed apart from prefill: each session's first
    turn is its prompt and one token (its prefill: (reply, seconds)); once all have one, each
    sends its AR second token as a second turn of max_tokens - 2 more, and the wall time of that
    is the decode. Returns (first turns, second turns, decode wall seconds)."""
    from sparsespec.client import SparseSpecClient

    s = len(prompts)
    with SparseSpecClient(address) as c:                   # warm-up
        c.generate(prompts[0][:64], max_tokens=4, mode=mode, k=k)
    first: list = [None] * s
    second: list = [None] * s
    errors: list = []
    barrier = threading.Barrier(s + 1)

    def one(i):
        try:
            with SparseSpecClient(address) as c:
                t0 = time.perf_counter()
                first[i] = (c.generate(prompts[i], max_tokens=1, mode=mode, k=k), time.perf_counter() - t0)
                barrier.wait()
                second[i] = c.generate([ar[i][1]], session_id=first[i][0].session_id,
                                       max_tokens=max_tokens - 2, mode=mode, k=k)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(s)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return first, second, wall


def _ints(field: str, text: str, sep: str = ",") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(sep))
    except ValueError:
        raise InvalidArgument(field, f"expected integers separated by {sep!r}, got {text!r}") from None


def capacity_config(args) -> CapacityConfig:
    """The CapacityConfig of `sparsespec bench capacity` flags (also `bench linear`'s cells)."""
    cells = CapacityConfig.service_cells
    if args.service_cells is not None:
        cells = tuple(_ints("service_cells", c, "x") for c in args.service_cells.split(",") if c)
        if any(len(c) != 2 for c in cells):
            raise InvalidArgument("service_cells", f"expected SxCONTEXT cells, e.g. 4x4096, got {args.service_cells!r}")
    budget = CapacityConfig.budget if args.budget is None else _ints("budget", args.budget)[0]
    return CapacityConfig(model=args.model,
                          contexts=_ints("contexts", args.contexts) if args.contexts else CapacityConfig.contexts,
                          sessions=_ints("sessions", args.sessions) if args.sessions else CapacityConfig.sessions,
                          max_tokens=args.max_tokens, k=args.k, policy=args.policy or CapacityConfig.policy,
                          budget=budget, drafter=args.drafter or CapacityConfig.drafter,
                          drafter_weights=args.drafter_weights or CapacityConfig.drafter_weights,
                          service_cells=cells, threads=args.threads,
                          ttft_contexts=(CapacityConfig.ttft_contexts if args.ttft_contexts is None
                                         else _ints("ttft_contexts", args.ttft_contexts) if args.ttft_contexts else ()),
                          adaptive=bool(getattr(args, "adaptive", False)),
                          reps=CapacityConfig.reps if getattr(args, "reps", None) is None else args.reps,
                          ttft_prompts=(CapacityConfig.ttft_prompts if getattr(args, "ttft_prompts", None) is None
                                        else args.ttft_prompts),
                          device=getattr(args, "device", None) or "cpu", dtype=getattr(args, "dtype", None) or "float32")


def run_capacity(args) -> int:
    cfg = capacity_config(args)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    bench = Bench(cfg)
    records = bench.run()
    command = " ".join(["sparsespec bench capacity", f"--model {cfg.model}", f"--contexts {','.join(map(str, cfg.contexts))}",
                        f"--sessions {','.join(map(str, cfg.sessions))}", f"--max-tokens {cfg.max_tokens}",
                        f"--policy {cfg.policy} --budget {cfg.budget}", f"--drafter-weights {cfg.drafter_weights}",
                        f"--service-cells {shlex.quote(','.join(f'{s}x{c}' for s, c in cfg.service_cells))}",
                        f"--ttft-contexts {shlex.quote(','.join(map(str, cfg.ttft_contexts)))}"]
                       + ([f"--ttft-prompts {cfg.ttft_prompts}"] if cfg.ttft_prompts != CapacityConfig.ttft_prompts else [])
                       + ([f"--device {cfg.device}"] if cfg.device != "cpu" else [])
                       + ([f"-k {cfg.k}"] if cfg.k else [])
                       + (["--adaptive"] if cfg.adaptive else [])
                       + ([f"--reps {cfg.reps}"] if cfg.reps != CapacityConfig.reps else [])
                       + ([f"--out {args.out}"] if args.out != "docs" else []))
    doc = {"command": command, "config": {**cfg.__dict__}, "threads": torch.get_num_threads(), "records": records,
           "ttft": bench.ttft}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "capacity.json").write_text(json.dumps(doc, indent=1) + "\n")
    _write_markdown(out, records, command, bench.ttft)
    _plot(out, records, Path(cfg.model).name)
    bad = [r for r in records + bench.ttft if not r["outputs_equal_ar"]]
    if bad:
        print(f"error: {len(bad)} cells with outputs that differ from AR")
        return 1
    return 0


def _write_markdown(out: Path, records: list[dict], command: str, ttft: list[dict] = ()) -> None:
    lines = ["| context | S | mode | k | decode tok/s (aggregate) | spread [min, median, max] | vs AR | tau | alpha "
             "| c_draft / c_verify (AR steps) | model | drafter KV bytes | prefill / TTFT s | = AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        sp, timing = r["spread_tok_s"], r.get("ttft_s") or r["prefill_s"]
        cost = f"{r['c_draft']:.2f} / {r['c_verify']:.2f}" if "c_draft" in r else "-"
        model = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "-"
        lines.append(" | ".join([
            f"| {r['context']}", str(r["sessions"]), r["mode"], (f"{r['k']:.3g}" if r["k"] else "-"), f"{r['decode_tok_s']:.2f}",
            f"[{sp['min']:.2f}, {sp['median']:.2f}, {sp['max']:.2f}]", f"{r.get('speedup', 1.0):.2f}x"
            + (f" (worst session {r['worst_session_vs_ar']:.2f}x)" if "worst_session_vs_ar" in r else ""),
            f"{r['tau']:.2f}", f"{r['alpha']:.2f}", cost, model, str(r["drafter_device_bytes"] or "-"),
            f"{timing['median']:.1f}", ("yes" if r["outputs_equal_ar"] else "**no**") + " |"]))
    section = "\n".join([
        BEGIN, "## Capacity: aggregate decode throughput, AR against speculation", "",
        f"Command: `{command}` (JSON: `bench/capacity.json`, plot: `bench/capacity.png`).", "",
        "AR is the verifier alone, batched over the S sessions; spec is the same engine and rows with "
        "the drafter in process, drafting all S sessions in one forward per position; services is a real "
        "local cluster through the SDK (its prefill is each session's time to first token; in process "
        "the drafter starts from the verifier's K/V, so only the verifier's prefill is listed). Decode "
        "tok/s = tokens generated by all sessions / decode wall time. Spread: over 3 prompts (S = 1) or "
        "over the sessions' own rates (S > 1). c_draft = one draft position's time / an AR step, "
        "c_verify = a (k+1)-token verify / an AR step, both at the same S; model = tau / (k c_draft + "
        "c_verify). worst session: the prompt (S = 1) or batch row (S > 1) that gained least against its "
        "own AR rate. adaptive (with --adaptive): adaptive k from k, speculation off where it does not "
        "pay; its k is the median over sessions of their mean draft length.", "", *lines, *_ttft_lines(ttft), END])
    replace_section(out / "benchmarks.md", BEGIN, END, section)


def _ttft_lines(ttft: list[dict]) -> list[str]:
    """Time to first token through the services, as its own small table."""
    if not ttft:
        return []
    rows = [f"| {r['context']} | {r['mode'][5:]} | {r['ttft_s']['median']:.2f} | [{r['ttft_s']['min']:.2f}, "
            f"{r['ttft_s']['max']:.2f}] | {r['ttft_vs_ar']:.2f}x | {'yes' if r['outputs_equal_ar'] else '**no**'} |"
            for r in ttft]
    n = ttft[0].get("prompts", 3)                               # records before the field ran 3
    return ["", "Time to first token through the services (the first streamed chunk; one session at a time on "
            f"an idle cluster, {n} prompt{'s' * (n != 1)}; spec-fed: the drafter is fed the verifier's K/V and does no prefill; "
            "spec-chunk_topk: it keeps its own KV, so it prefills the prompt itself):", "",
            "| context | run | TTFT s (median) | [min, max] | vs AR | = AR |", "|---|---|---|---|---|---|", *rows]


def _plot(out: Path, records: list[dict], model: str) -> None:
    """Aggregate decode tok/s against S, one panel per context; error bars over the S = 1 prompts."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    contexts = sorted({r["context"] for r in records})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 3.6), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for mode, marker in (("ar", "o"), ("spec", "s"), ("adaptive", "D"), ("services", "^")):
            rs = sorted((r for r in records if r["context"] == context and r["mode"] == mode),
                        key=lambda r: r["sessions"])
            if not rs:
                continue
            y = [r["decode_tok_s"] for r in rs]
            err = [[v - r["spread_tok_s"]["min"] if r["sessions"] == 1 else 0 for v, r in zip(y, rs)],
                   [r["spread_tok_s"]["max"] - v if r["sessions"] == 1 else 0 for v, r in zip(y, rs)]]
            ax.errorbar([r["sessions"] for r in rs], y, yerr=err, marker=marker, capsize=3, label=mode)
        ax.set_title(f"{model}, context {context}")
        ax.set_xlabel("concurrent sessions S")
        ax.set_ylabel("aggregate decode tok/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench" / "capacity.png", dpi=110)
    plt.close(fig)
