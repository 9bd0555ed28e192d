"""`sparsespec bench acceptance`: how well each policy keeps the drafter in step with the verifier
as the context grows, on real long text and on retrieval prompts.

For every (context, source, prompt) the verifier prefills once (recording its importance and its
last queries, as a serving verifier does) and decodes the AR reference. Every configuration
(drafter x policy x budget x temperature) then runs the real round loop (SpecEngine, real
verifier forwards, real drafter through LocalDrafterClient / DrafterHost) from that shared state:

- the verifier row is reused (`start(cached=...)`); its importance tracker and its query
  recorder's ring are reset to what the prefill left, so no configuration sees another's rounds;
- a drafter that keeps its own KV adopts the exact prefix K/V (SparseKVCache.adopt_prefix, from
  the verifier's own cache when the drafter shares its layers) and computes the last 64 prompt
  tokens itself, which leaves it in the state a fresh prefill would;
- a **fed** drafter (policy "fed": `same`, `layers:N`) does what it does in serving: it opens
  without computing anything and the engine's Feeder feeds it from the verifier's cache (the
  first round a selection chosen with the prefill's queries, then the committed K/V each round,
  re-selections when due). So its tau is the one users get, and it costs no drafter prefill.

Which policies run for which drafter: "fed" only for a drafter the verifier can feed (its K/V are
the verifier's); "verifier_guided" (KV summaries, for drafters that cannot be fed) only for the
others, unless "fed" is not asked for. Greedy outputs are checked token-for-token against AR,
and every speculative configuration must have drafted (a fed one: been fed, with no host tier);
exit code 1 otherwise. k is chosen per drafter on held-out documents (never the reported ones)
unless given. Drafters are named `same`, `layers:N`, `DIR` or `LABEL=DIR`; outputs use the label
(a directory's last component by default), never the path.
Writes <out>/bench/acceptance.json, <out>/acceptance.md, the plots under <out>/img/, and the
generated table in <out>/summaries.md between its `acceptance-table` markers, if it has them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvstore.cache.feed import FeedWant
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.summary import SummaryConfig
from sparsespec.bench.prompts import SOURCES, documents, make_prompt
from sparsespec.bench.report import first_divergence
from sparsespec.build import EngineConfig, load_verifier, make_drafter_model
from sparsespec.errors import InvalidArgument
from sparsespec.spec.adaptive import MAX_K
from sparsespec.spec.drafter import Drafter
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.feed import feedable
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams

POLICIES = ("streaming", "chunk_topk", "snapkv", "fed", "verifier_guided", "full")
FED, GUIDED = "fed", "verifier_guided"
OWN_TAIL = 64          # prompt tokens the drafter computes itself after adopting the prefix
PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class StudyConfig:
    model: str = "smollm2-135m"
    contexts: tuple[int, ...] = (2048, 4096, 8000)
    budgets: tuple[int, ...] = (64, 256, 1024)
    policies: tuple[str, ...] = POLICIES
    drafters: tuple[str, ...] = ("same",)   # same | layers:N | DIR | LABEL=DIR
    sources: tuple[str, ...] = SOURCES
    prompts: int = 2                    # reported prompts per (context, source): 6 per cell over 3 sources
    heldout: int = 1                    # held-out prompts per source for choosing k
    max_tokens: int = 32
    temperatures: tuple[float, ...] = (0.0,)
    k: int | None = None                # None: choose per drafter on the held-out prompts
    k_candidates: tuple[int, ...] = (2, 4, 8)
    seed: int = 0
    threads: int = 1
    out: str = "docs"

    def __post_init__(self):
        if not self.contexts or min(self.contexts) <= OWN_TAIL + 1:
            raise InvalidArgument("contexts", f"need contexts > {OWN_TAIL + 1} tokens, got {self.contexts}")
        if not self.budgets or min(self.budgets) < 16:
            raise InvalidArgument("budgets", f"need budgets >= 16, got {self.budgets}")
        for p in self.policies:
            SparseConfig(policy=p, budget=256)   # raises InvalidArgument("policy", ...)
        labels = [drafter_label(d) for d in self.drafters]
        if not labels or len(set(labels)) != len(labels):
            raise InvalidArgument("drafters", f"need distinct drafter names, got {labels}")
        for s in self.sources:
            documents(s)
        docs = min(len(documents(s)) for s in self.sources)
        if self.prompts < 1 or self.heldout < 0 or self.prompts + self.heldout > docs:
            raise InvalidArgument("prompts", f"prompts ({self.prompts}) + heldout ({self.heldout}) must be "
                                             f"in [1, {docs}] (documents per source)")
        if self.k is not None and not 1 <= self.k <= MAX_K:
            raise InvalidArgument("k", f"must be in [1, {MAX_K}], got {self.k}")
        if self.k is None and (self.heldout < 1 or not self.k_candidates):
            raise InvalidArgument("k", "without -k the study needs held-out prompts and k candidates")
        if self.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise InvalidArgument("temperatures", f"must be >= 0, got {self.temperatures}")


@dataclass
class PromptState:
    """One prompt's shared state: the verifier row after its prefill and the AR reference."""
    ids: list[int]
    info: dict
    ar_tokens: list[int]
    ar_tokens_per_s: float
    scores: torch.Tensor          # the importance tracker's row after the prefill
    forwards: torch.Tensor
    queries: list | None          # the query recorder's ring of the row after the prefill
    prepare_s: float = 0.0        # prefill + AR reference + drafter prefixes
    prefixes: dict = field(default_factory=dict)   # drafter label -> (keys, values) of the prefix


def drafter_label(spec: str) -> str:
    """What outputs call a drafter: `same`, `layers:N`, LABEL of LABEL=DIR, else DIR's last part."""
    if "=" in spec:
        return spec.split("=", 1)[0]
    return Path(spec).name if ("/" in spec or os.sep in spec) else spec


def drafter_spec(spec: str) -> str:
    return spec.split("=", 1)[1] if "=" in spec else spec


def adopting(prefix):
    """A DrafterHost start strategy: sessions start from a known exact prefix (see module doc):
    (keys, values, length) as Drafter.start_from takes them."""
    keys, values, length = prefix
    return lambda drafter, tokens: drafter.start_from(keys, values, tokens, length)


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        max_context = max(cfg.contexts) + cfg.max_tokens + 8
        self.engine_cfg = EngineConfig(model=cfg.model, max_context=max_context, max_batch=1)
        self.verifier, self.tokenizer = load_verifier(self.engine_cfg)
        if max_context > self.verifier.max_context:
            raise InvalidArgument("contexts", f"{max(cfg.contexts)} + {cfg.max_tokens} tokens exceed the "
                                              f"model's context of {self.verifier.max_context}")
        self.engine = SpecEngine(self.verifier, None, self.tokenizer, max_context, 1, summary=SummaryConfig())
        self.tracker = self.engine.verifier.tracker
        self.recorder = self.engine.verifier.recorder
        self.max_context = max_context
        self.labels = [drafter_label(d) for d in cfg.drafters]
        self.drafter_models = {drafter_label(d): make_drafter_model(self.verifier, drafter_spec(d), self.engine_cfg)
                               for d in cfg.drafters}
        self.feedable = {name: self._feedable(model) for name, model in self.drafter_models.items()}

    def _feedable(self, model) -> bool:
        """Whether the verifier can feed this drafter (the engine's own test, sparsespec/spec/feed.py)."""
        c = model.cfg
        want = FeedWant(model.kv_source, c.num_layers, c.num_kv_heads, c.head_dim, 64, 4, 16, 8, 81)
        return feedable(want, self.verifier) is None

    def policies_for(self, drafter: str) -> list[str]:
        """The asked-for policies that apply to this drafter (see the module doc)."""
        fed = self.feedable[drafter]
        return [p for p in self.cfg.policies
                if (p != FED or fed) and (p != GUIDED or not (fed and FED in self.cfg.policies))]

    # --- per prompt -----------------------------------------------------------------------

    def prepare(self, source: str, context: int, doc: str, heldout: bool = False) -> PromptState:
        t0 = time.perf_counter()
        ids, info = make_prompt(source, self.tokenizer, context, doc, self.cfg.seed)
        v = self.engine.verifier
        v.track(0, True)
        v.record(0, True)    # a fed drafter's first selection scores with the prefill's last queries
        v.prefill(0, ids[:-1], PREFILL_CHUNK)
        queries = None if self.recorder is None else [q.clone() for q in self.recorder._rings[0]]
        state = PromptState(ids, info, [], 0.0, self.tracker.scores[0].clone(), self.tracker.forwards[0].clone(),
                            queries)
        n = len(ids) - OWN_TAIL
        for name, model in self.drafter_models.items():   # before any decode: a local layer's ring moves on
            if heldout or any(p != FED for p in self.policies_for(name)):   # a fed drafter needs none
                state.prefixes[name] = self._prefix(model, ids[:n])
        ar = self._run(state, GenerationRequest(ids, self.cfg.max_tokens, mode="ar"))
        state.ar_tokens, state.ar_tokens_per_s = ar["token_ids"], ar["tokens_per_s"]
        state.prepare_s = time.perf_counter() - t0
        return state

    def _prefix(self, model, tokens: list[int]):
        """(keys, values, n): per layer the K/V of `tokens` under the drafter model, [Hkv, n, D] (a
        local layer: [Hkv, m, D] of its last m, what a ring holds): slices of the verifier's row
        when the drafter's layers are the verifier's own (a copy of a local layer's ring: taken
        before the row decodes), else one prefill of its own."""
        v, n = self.verifier, len(tokens)
        if all(a is b for a, b in zip(model.layers, v.layers)):
            kv = [self.engine.verifier.kv(0, i, n) for i in range(len(model.layers))]   # a local layer: its ring
            return [k for k, _, _ in kv], [x for _, x, _ in kv], n
        cache = FullKVCache.for_model(model, n)
        with torch.inference_mode():
            for i in range(0, n, PREFILL_CHUNK):
                model(torch.tensor([tokens[i:i + PREFILL_CHUNK]], device=model.device), cache, last_only=True)
        kv = [cache.read(0, i, cache.held_from(0, i), n) for i in range(len(model.layers))]
        return [k for k, _ in kv], [x for _, x in kv], n

    def run_config(self, state: PromptState, drafter: str, policy: str, budget: int | None, k: int,
                   temperature: float) -> dict:
        t0 = time.perf_counter()
        sparse = SparseConfig(policy=policy, budget=budget)
        # A fed drafter starts as in serving (Drafter.start: nothing computed, the feeds bring the K/V).
        start = Drafter.start if policy == FED else adopting(state.prefixes[drafter])
        host = DrafterHost(self.drafter_models[drafter], DrafterHostConfig(sparse, self.max_context),
                           start_session=start)
        self.engine.drafter = LocalDrafterClient(host)
        sampling = SamplingParams(temperature=temperature, seed=self.cfg.seed)
        tracker_s = self.tracker.seconds
        run = self._run(state, GenerationRequest(state.ids, self.cfg.max_tokens, sampling, k=k))
        run["tracker_s"] = self.tracker.seconds - tracker_s
        model = self.drafter_models[drafter]
        run["drafter_full_kv_bytes"] = model.cfg.kv_bytes(len(state.ids), model.dtype.itemsize)
        if temperature == 0:
            run["first_divergence"] = first_divergence(run["token_ids"], state.ar_tokens)
            run["equal_to_ar"] = run["first_divergence"] is None
        run["problem"] = _problem(run, policy)
        run["wall_s"] = round(time.perf_counter() - t0, 3)
        return run

    def _run(self, state: PromptState, req: GenerationRequest) -> dict:
        """One generation from the shared row: the prompt's KV is reused, the tracker restored."""
        e = self.engine
        self.tracker.scores[0] = state.scores
        self.tracker.forwards[0] = state.forwards
        if state.queries is not None:   # a fed run's rounds overwrite ring slots: back to the prefill's
            for ring, saved in zip(self.recorder._rings[0], state.queries):
                ring.copy_(saved)
        run = e.start(req, 0, cached=len(state.ids) - 1)
        try:
            while not run.done:
                e.step([run])
        finally:
            e.release(run)
        result = e.finish(run)
        return {"token_ids": result.token_ids, **result.metrics.to_dict()}

    # --- the study --------------------------------------------------------------------------

    def choose_k(self, log) -> dict[str, int]:
        """Per drafter, the k with the best median tokens/s on held-out documents (chunk_topk,
        B = 256, greedy, the shortest context): never on a reported prompt."""
        cfg = self.cfg
        if cfg.k is not None:
            return {d: cfg.k for d in self.labels}
        context = min(cfg.contexts)
        speeds: dict[tuple[str, int], list[float]] = defaultdict(list)
        for source in cfg.sources:
            for doc in documents(source)[:cfg.heldout]:
                state = self.prepare(source, context, doc, heldout=True)
                for d in self.labels:
                    for k in cfg.k_candidates:
                        run = self.run_config(state, d, "chunk_topk", 256, k, 0.0)
                        speeds[(d, k)].append(run["tokens_per_s"])
                        log(f"[held-out {source}/{doc} {context}] {d} k={k}: {run['tokens_per_s']:.2f} tok/s "
                            f"tau {run['tau']:.2f}")
        return {d: max(cfg.k_candidates, key=lambda k: statistics.median(speeds[(d, k)]))
                for d in self.labels}

    def run(self, log=print) -> dict:
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        for d in self.labels:
            skipped = [p for p in cfg.policies if p not in self.policies_for(d)]
            log(f"drafter {d}: policies {','.join(self.policies_for(d))}"
                + (f" (not {','.join(skipped)}: {'fed' if self.feedable[d] else 'it cannot be fed'})" if skipped else ""))
        t_k = time.perf_counter()
        chosen_k = self.choose_k(log)
        heldout_s = time.perf_counter() - t_k
        log(f"k per drafter (held-out): {chosen_k}")
        runs, prompts = [], []
        for context in cfg.contexts:
            for source in cfg.sources:
                for i, doc in enumerate(documents(source)[cfg.heldout:cfg.heldout + cfg.prompts]):
                    t_p = time.perf_counter()
                    state = self.prepare(source, context, doc)
                    for temperature in cfg.temperatures:
                        for d in self.labels:
                            for policy in self.policies_for(d):
                                for budget in ([None] if policy == "full" else cfg.budgets):
                                    run = self.run_config(state, d, policy, budget, chosen_k[d], temperature)
                                    run.update(context=context, source=source, document=doc, prompt=i,
                                               drafter=d, policy=policy, budget=budget,
                                               temperature=temperature, prompt_info=state.info,
                                               ar_tokens_per_s=state.ar_tokens_per_s)
                                    runs.append(run)
                                    log(_progress(run))
                    prompts.append({"context": context, "source": source, "document": doc,
                                    "prepare_s": round(state.prepare_s, 2),
                                    "wall_s": round(time.perf_counter() - t_p, 2)})
        return {"config": asdict(cfg), "k": chosen_k, "runs": runs, "prompts": prompts,
                "environment": _environment(cfg), "heldout_s": round(heldout_s, 1),
                "wall_s": round(time.perf_counter() - t0, 1)}


def _problem(run: dict, policy: str) -> str | None:
    """Why a run does not measure what its configuration names (None: it does). A speculative run
    that never drafted (its drafter refused, or could not be fed) would pass the equality check
    trivially; a fed one must have been fed and hold no host tier."""
    if run["drafted"] == 0 or run["drafter_failures"]:
        return f"drafted {run['drafted']} tokens, {run['drafter_failures']} drafter failures"
    if policy == FED and (run["feeds_sent"] < 1 or run["drafter_kv_host_bytes"] != 0):
        return f"fed drafter: {run['feeds_sent']} feeds, {run['drafter_kv_host_bytes']} host bytes"
    return None


def _progress(run: dict) -> str:
    budget = "full" if run["budget"] is None else run["budget"]
    same = {True: "equal", False: f"DIFFERS at {run.get('first_divergence')}", None: "sampled"}[run.get("equal_to_ar")]
    problem = f"  PROBLEM: {run['problem']}" if run.get("problem") else ""
    return (f"[{run['context']:>5} {run['source']:<9} #{run['prompt']} T={run['temperature']}] "
            f"{run['drafter']:<9} {run['policy']:<15} {budget!s:>5}  tau {run['tau']:.2f} "
            f"alpha {run['alpha']:.2f} k {run['k']:.1f}  {same}  {run['wall_s']:.1f} s{problem}")


def _environment(cfg: StudyConfig) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": cfg.threads,
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": "cpu", "dtype": "float32"}


def run_acceptance(args) -> int:
    """CLI entry: run the study, write JSON + markdown + plots, fail on any greedy difference."""
    from sparsespec.bench import acceptance_report

    def ints(text):
        return tuple(int(x) for x in str(text).split(","))

    cfg = StudyConfig(model=args.model, contexts=ints(args.contexts), budgets=ints(args.budgets),
                      policies=tuple(args.policies.split(",")), drafters=tuple(args.drafters.split(",")),
                      sources=tuple(args.sources.split(",")), prompts=args.prompts, heldout=args.heldout,
                      max_tokens=args.max_tokens, temperatures=tuple(float(t) for t in args.temperatures.split(",")),
                      k=args.k, threads=args.threads, out=args.out)
    result = Study(cfg).run()
    result["command"] = acceptance_report.command(args)
    acceptance_report.write(Path(cfg.out), result, append=args.append)
    errors = failures(result["runs"])
    for line in errors:
        print(f"error: {line}")
    return 1 if errors else 0


def failures(runs: list[dict]) -> list[str]:
    """What makes the study fail (exit 1): a greedy output that differs from AR, or a run that
    did not run as configured (see _problem). Empty: it passed."""
    out = []
    bad = [r for r in runs if r.get("equal_to_ar") is False]
    if bad:
        out.append(f"{len(bad)} greedy runs differ from AR (first: {_progress(bad[0])})")
    broken = [r for r in runs if r.get("problem")]
    if broken:
        out.append(f"{len(broken)} runs did not run as configured (first: {_progress(broken[0])})")
    return out
