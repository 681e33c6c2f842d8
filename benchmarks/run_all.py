"""Run ``ssm.bench`` on the standard workloads and keep the results.

    python benchmarks/run_all.py [--workloads voc,ade,cityscapes] [--out DIR] [-- BENCH OPTIONS]

For each workload it writes ``<workload>.txt`` (the printed tables),
``<workload>.json`` (every figure, the machine and the library versions) and
``<workload>.png`` (thread scaling, ssm vs peers) into
``benchmarks/results/<date>-<machine>/``, plus ``summary.md``, a one-screen digest of
the fused loss+grad rows. The workload table (ssm/bench/workloads.py) and the method
(the docstring of ssm/bench/__init__.py) live in ssm.bench; options after ``--`` are
passed on to it (e.g. ``-- --budget 1.5 --threads 1,2``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import pathlib
import sys

from ssm import bench

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class _Tee(io.TextIOBase):
    """Write to several text streams at once."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def _inside(folder):
    """Run in ``folder`` so that the saved command lines name files, not this machine's paths."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_workload(name, out_dir, extra):
    """One ``ssm.bench`` run, its tables echoed and saved; returns the JSON report."""
    argv = ["--workload", name, "--json", f"{name}.json", "--plot", f"{name}.png", *extra]
    with _inside(out_dir), open(f"{name}.txt", "w") as txt, \
            contextlib.redirect_stdout(_Tee(sys.stdout, txt)):
        print(f"$ ssm-bench {' '.join(argv)}")
        bench.main(argv)
    return json.loads((out_dir / f"{name}.json").read_text())


def _pick(rows, op, impl, threads):
    for r in rows:
        if r["op"] == op and r["impl"] == impl and r["threads"] == threads:
            return r
    return None


def summary(reports):
    """Markdown digest: the fused op per workload and thread count, ssm vs floor and peers."""
    first = reports[0][1]
    m, v = first["machine"], first["versions"]
    lines = [f"# ssm.bench results, {first['date'][:10]}", "",
             f"Machine: {m['cpu']}, {m['cores']} usable cores, "
             f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB; Python {v['python']}, "
             f"numpy {v['numpy']}, torch {v.get('torch', '-')}, "
             f"scikit-learn {v.get('sklearn', '-')}, ssm {v.get('ssm', '-')}.", "",
             "Fused loss+grad (X, y -> loss, dX), median ms (x floor = / streaming copy "
             "(non-temporal stores) of the same bytes at the same threads; x ssm = peer / ssm "
             "at the same threads; numpy runs 1 thread).", "",
             "| workload | threads | ssm | x floor | torch fwd+bwd | x ssm | numpy | x ssm "
             "| sklearn | x ssm | flagged rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rep in reports:
        rows = rep["rows"]
        flagged = sum(1 for r in rows if r["flags"])
        for k in rep["method"]["threads"]:
            s = _pick(rows, "fused", "ssm", k)
            if s is None:
                continue
            cells = [f"{s['median_ms']:.3g}", f"{s['x_floor']:.1f}"]
            for impl in ("torch", "numpy", "sklearn"):
                r = _pick(rows, "fused", impl, k)
                cells += ([f"{r['median_ms']:.3g}", f"{r['vs_ssm']:.1f}"] if r else ["-", "-"])
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {flagged}/{len(rows)} |")
    lines += ["", "Full tables: `<workload>.txt`; every figure: `<workload>.json`; "
              "plots: `<workload>.png`. Method: benchmarks/README.md."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(bench.WORKLOADS),
                   help="comma-separated subset of " + ",".join(bench.WORKLOADS))
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="output folder (default benchmarks/results/<date>-<machine>)")
    args = p.parse_args(own)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in bench.WORKLOADS]
    if bad:
        p.error(f"--workloads: unknown {', '.join(bad)}; expected {','.join(bench.WORKLOADS)}")
    out = args.out or RESULTS / f"{dt.date.today().isoformat()}-{bench.machine_slug()}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports = [(name, run_workload(name, out, extra)) for name in names]
    (out / "summary.md").write_text(summary(reports))
    print(f"Results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
