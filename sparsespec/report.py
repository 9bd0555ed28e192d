"""Human-readable metrics tables (terminal and markdown share one layout)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def metrics_table(rows) -> str:
    """rows: [(label, RequestMetrics)] -> aligned text table."""
    head = ["run", "tok/s", "tau", "alpha", "k", "rounds", "prefill s", "drafter KV (device)", "verifier KV"]
    lines = [head]
    for label, m in rows:
        lines.append([label, f"{m.tokens_per_s:.2f}", f"{m.tau:.2f}", f"{m.alpha:.3f}", f"{m.k:.1f}",
                      str(m.rounds), f"{m.prefill_s:.2f}", human_bytes(m.drafter_kv_device_bytes),
                      human_bytes(m.verifier_kv_bytes)])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)
