"""The plots (``--plot``): thread scaling and ssm vs peers; default threads vs one thread
for ``--busy``. matplotlib is imported only here, and only when a plot is asked for."""
from __future__ import annotations

import numpy as np

from .workloads import COPY_OP, IMPLS, OPS


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ssm.bench: --plot needs matplotlib (pip install matplotlib)") from None
    return plt


def plot(path, derived, title):
    """Two panels: thread scaling of each ssm op (ideal line), and ssm vs peers at max threads."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    _plot_scaling(ax1, derived)
    _plot_peers(ax2, derived)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_scaling(ax, derived):
    threads = sorted({d["threads"] for d in derived if d["threads"]})
    floor_impl = "stream" if any(d["impl"] == "stream" for d in derived) else "copy"
    for op in (COPY_OP,) + tuple(OPS):
        ds = sorted((d for d in derived
                     if d["op"] == op and d["impl"] in ("ssm", floor_impl)),
                    key=lambda d: d["threads"] or 0)
        if ds and ds[0]["threads"]:
            style = dict(ls="--", color="gray") if op == COPY_OP else dict(marker="o")
            ax.plot([d["threads"] for d in ds], [d["speedup"] for d in ds],
                    label="copy (floor)" if op == COPY_OP else f"ssm {op}", **style)
    if not threads:
        ax.text(0.5, 0.5, "one device: no thread scaling", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ax.plot(threads, [t / threads[0] for t in threads], ":", color="black", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.set_xlabel("threads")
    ax.set_ylabel("speedup (median, vs lowest thread count)")
    ax.set_title("Thread scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_peers(ax, derived):
    from matplotlib import ticker
    ops = [op for op in OPS if any(d["op"] == op for d in derived)]
    top = max((d["threads"] or 0) for d in derived)
    pick = {}
    for d in derived:
        if d["op"] in OPS and (d["threads"] or 0) in (top, 1 if d["impl"] == "numpy" else top):
            pick[(d["op"], d["impl"])] = d
    impls = [i for i in IMPLS if any((op, i) in pick for op in ops)]
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs = [n + (j - (len(impls) - 1) / 2) * width for n, op in enumerate(ops)
              if (op, impl) in pick]
        ys = [pick[(op, impl)]["median_ms"] for op in ops if (op, impl) in pick]
        label = f"{impl} (1 thread)" if impl == "numpy" and top != 1 else impl
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    floors = [(n, pick[(op, "ssm")]["floor_ms"]) for n, op in enumerate(ops)
              if (op, "ssm") in pick and pick[(op, "ssm")]["floor_ms"]]
    for n, f in floors:
        ax.hlines(f, n - 0.45, n + 0.45, colors="black", linestyles="--",
                  label="copy floor (same bytes)" if n == floors[0][0] else None)
    ax.set_xticks(range(len(ops)), ops)
    ax.set_yscale("log")
    lowest = min([f for _, f in floors] + [d["median_ms"] for d in pick.values()], default=1)
    ax.set_ylim(bottom=lowest / 1.6)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("median ms (log scale, lower is better)")
    ax.set_title(f"ssm vs peers at {top} thread{'s' if top != 1 else ''}" if top
                 else "ssm vs peers on the GPU")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_busy(path, rows, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = sorted({"x".join(map(str, r["shape"])) for r in rows},
                    key=lambda s: np.prod([int(v) for v in s.split("x")]))
    width = 0.2
    for k, (phase, stat) in enumerate([("quiet", "median"), ("quiet", "p90"),
                                       ("busy", "median"), ("busy", "p90")]):
        vals = [next(r[f"ratio_{stat}"] for r in rows if r["phase"] == phase
                     and "x".join(map(str, r["shape"])) == lab) for lab in labels]
        ax.bar(np.arange(len(labels)) + (k - 1.5) * width, vals, width,
               label=f"{phase}, {stat}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="r", lw=0.8, ls="--", label="1.5x: the limit")
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("time(default threads) / time(threads=1)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
