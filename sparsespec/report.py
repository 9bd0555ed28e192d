"""Human-readable metrics tables (terminal and markdown share one layout)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def metrics_table(rows) -> str:
    """rows: [(label, RequestMetrics or its to_dict())] -> aligned text table."""
    head = ["run", "tok/s", "tau", "alpha", "k", "rounds", "prefill s", "drafter KV (device)", "verifier KV"]
    lines = [head]
    for label, m in rows:
        d = m if isinstance(m, dict) else m.to_dict()
        lines.append([label, f"{d['tokens_per_s']:.2f}", f"{d['tau']:.2f}", f"{d['alpha']:.3f}",
                      f"{d['k']:.1f}", str(d["rounds"]), f"{d['prefill_s']:.2f}",
                      human_bytes(d["drafter_kv_device_bytes"]), human_bytes(d["verifier_kv_bytes"])])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)
