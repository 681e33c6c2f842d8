"""From measured rows to the report: the derived columns, the printed tables and
footer, and the JSON document. Pure functions of rows and numbers (no timing here)."""
from __future__ import annotations

import datetime as _dt
import json

from .machine import machine_info, versions
from .peers import GRAD_RTOL
from .timing import BUSY_CORES, MAX_REPS, MIN_LOAD_WINDOW_S, WARMUP
from .workloads import (COPY_OP, FLOORS, IGNORE_FRACTION, IMPLS, OPS, READ_ONLY_OPS, READ_OP,
                        SEED)

WIDE_SPREAD = 0.5                # (max - min) / median above this flags a row
NOISY_ROWS = 0.25                # warn when more than this fraction of rows is flagged ~


def floor_rows(rows):
    """Per thread count, the row whose bytes-per-second is the floor of a pass that writes:
    the streaming copy (non-temporal stores, the kernels' store path) where it was timed,
    else the plain copy (np.copyto; on the GPU the device-to-device copy)."""
    floors = {}
    for r in rows:
        if r.op == COPY_OP and (r.impl == "stream" or r.threads not in floors):
            floors[r.threads] = r
    return floors


def derive(rows):
    """Per row: GB/s, floor (and which), x floor, speedup and efficiency (vs its own lowest
    thread count) and the peer's time over ssm's at the same thread count. A pass that
    writes nothing of X's size (READ_ONLY_OPS: the read itself, the loss alone) has the
    read floor at its thread count (a copy floor where no read was timed: the GPU)."""
    copies = floor_rows(rows)
    reads = {r.threads: r for r in rows if r.op == READ_OP}
    base = {}
    for r in rows:
        key = (r.op, r.impl)
        if key not in base or (r.threads or 0) < (base[key].threads or 0):
            base[key] = r
    ssm_at = {(r.op, r.threads): r for r in rows if r.impl == "ssm"}
    out = []
    for r in rows:
        d = {"op": r.op, "impl": r.impl, "threads": r.threads, "bytes": r.nbytes,
             "reps": len(r.times_ns), "median_ms": r.median_ms, "min_ms": r.min_ms,
             "max_ms": r.max_ms, "iqr_ms": list(r.quartiles_ms()),
             "gbps": r.nbytes / r.median_ms / 1e6, "other_cores": r.other_cores,
             "spread": r.spread, "times_ms": [t / 1e6 for t in r.times_ns]}
        cp = (reads.get(r.threads) or copies.get(r.threads) if r.op in READ_ONLY_OPS
              else copies.get(r.threads))
        d["floor"] = cp.impl if cp else None
        d["floor_ms"] = cp.median_ms * r.nbytes / cp.nbytes if cp else None
        d["x_floor"] = r.median_ms / d["floor_ms"] if cp else None
        b = base[(r.op, r.impl)]
        d["speedup"] = b.median_ms / r.median_ms
        d["efficiency"] = (d["speedup"] * (b.threads / r.threads)
                           if r.threads and b.threads else None)
        s = ssm_at.get((r.op, r.threads))
        d["vs_ssm"] = r.median_ms / s.median_ms if s and r.impl != "ssm" else None
        d["flags"] = flags_of(r)
        out.append(d)
    return out


def flags_of(r):
    f = ""
    if r.other_cores is not None and r.other_cores > BUSY_CORES:
        f += "!"
    if r.spread > WIDE_SPREAD:
        f += "~"
    return f


def _fmt(v, spec, width):
    return f"{'-':>{width}}" if v is None else f"{v:{width}{spec}}"


def _mb(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ms(v):
    """Milliseconds with about three significant digits."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 \
        else f"{v:.3g}"


HEADER = (f"{'impl':<8} {'thr':>3} {'median ms':>10} {'min-max ms':>17} {'GB/s':>6} "
          f"{'floor ms':>8} {'x floor':>7} {'speedup':>7} {'eff':>5} {'x ssm':>6} "
          f"{'other':>5}")


def format_row(d):
    thr = "gpu" if d["threads"] is None else str(d["threads"])
    eff = "-" if d["efficiency"] is None else f"{100 * d['efficiency']:.0f}%"
    rng = f"{_ms(d['min_ms'])}-{_ms(d['max_ms'])}"
    return (f"{d['impl']:<8} {thr:>3} {_ms(d['median_ms']):>10} {rng:>17} {d['gbps']:6.1f} "
            f"{_ms(d['floor_ms']):>8} {_fmt(d['x_floor'], '.1f', 7)} "
            f"{d['speedup']:7.2f} {eff:>5} {_fmt(d['vs_ssm'], '.1f', 6)} "
            f"{_fmt(d['other_cores'], '.2f', 5)} {d['flags']}").rstrip()


def format_tables(derived, pb, device="cpu"):
    lines = []
    X, L = pb.x_bytes, pb.label_bytes
    copies = ("copy floor (device-to-device copy into a preallocated buffer)" if device == "cuda"
              else "copy floors into a preallocated buffer (copy: np.copyto; stream: "
                   "non-temporal stores)")
    titled = {COPY_OP: (copies, FLOORS[COPY_OP], 0),
              READ_OP: ("read floor (every byte of X read once)", FLOORS[READ_OP], 0)}
    titled.update(OPS)
    for op, (title, kx, kl) in titled.items():
        ds = [d for d in derived if d["op"] == op]
        if not ds:
            continue
        model = f"{kx}X" + (f"+{kl if kl > 1 else ''}L" if kl else "")
        lines += ["", f"{title}: {model} = {_mb(kx * X + kl * L)}", HEADER]
        order = {name: n for n, name in enumerate(("stream", "copy", "read") + IMPLS)}
        ds.sort(key=lambda d: (order.get(d["impl"], 99), d["threads"] or 0))
        lines += [format_row(d) for d in ds]
    return lines


def describe_problem(pb, args):
    label = f"{pb.name} " if pb.name else ""
    cold = pb.n_sets * pb.x_bytes >= pb.rotate_bytes
    cache = "" if cold else " (small: data stays in cache)"
    return (f"ssm.bench: {label}{'x'.join(map(str, pb.shape))} {pb.dtype} logits, "
            f"{pb.label_dtype} labels ({IGNORE_FRACTION:.0%} = {pb.ignore_index}), "
            f"X = {_mb(pb.x_bytes)}, L = {_mb(pb.label_bytes)}; {pb.n_sets} rotating sets"
            f"{cache}; budget {args.budget:g} s/row, >= {args.min_reps} reps, median")


def summary_lines(derived, checks, notes, loads):
    lines = [""]
    busy = [d for d in derived if "!" in d["flags"]]
    wide = [d for d in derived if "~" in d["flags"]]
    before, during = loads.get("before"), loads.get("during")
    if before is not None and during is not None:
        lines.append(f"Foreign load: {before:.2f} cores before the run, {during:.2f} during it "
                     f"(rows shorter than {MIN_LOAD_WINDOW_S} s show none of their own).")
    counts = (f"{len(busy)} of {len(derived)} rows ran while other processes used more than "
              f"{BUSY_CORES} cores (!), {len(wide)} had a min-max range wider than "
              f"{WIDE_SPREAD:.0%} of the median (~)")
    if busy or len(wide) > NOISY_ROWS * len(derived) or (during or 0) > BUSY_CORES:
        lines.append(f"WARNING: the machine was noisy: {counts}. Compare ratios within this "
                     "run (x floor, x ssm), not absolute times across runs.")
    elif wide:
        lines.append(f"Mostly quiet: {counts}; medians are robust to those outliers.")
    for c in checks:
        if not c["ok"]:
            lines.append(f"WARNING: {c['impl']} disagrees with ssm: loss {c['loss']:.8g} vs "
                         f"{c['ssm_loss']:.8g} (rel {c['loss_rel_err']:.1e}), gradient "
                         f"max err {_fmt(c['grad_err_rel_max'], '.1e', 0)} of max|dX|.")
    if checks and all(c["ok"] for c in checks):
        worst = max(c["loss_rel_err"] for c in checks)
        lines.append(f"Checked once: every loss agrees with ssm's (worst rel {worst:.1e}) and "
                     f"every gradient to {GRAD_RTOL:g} of max|dX|.")
    lines += notes
    floors = {d["floor"] for d in derived if d["op"] not in READ_ONLY_OPS} - {None}
    which = ("the streaming copy (non-temporal stores)" if floors == {"stream"}
             else "the copy" if floors == {"copy"} else "the streaming copy, else the copy")
    if any(d["op"] in READ_ONLY_OPS and d["op"] != READ_OP for d in derived):
        which += " (the read for the loss alone, which writes nothing of X's size)"
    lines.append(f"Columns: floor = {which} at the same threads scaled to the op's bytes; "
                 "x floor = median / floor; speedup and eff vs the same impl's lowest thread "
                 "count; x ssm = time / ssm's time at the same threads; other = foreign "
                 "load in cores.")
    return lines


def now_iso():
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def build_report(args, argv, pb, derived, checks, notes, loads, wall):
    return {
        "tool": "ssm.bench", "date": now_iso(),
        "argv": argv, "device": args.device,
        "workload": {"name": pb.name, "shape": list(pb.shape), "dtype": str(pb.dtype),
                     "labels": str(pb.label_dtype), "ignore_index": pb.ignore_index,
                     "ignore_fraction": IGNORE_FRACTION, "n_sets": pb.n_sets,
                     "x_bytes": pb.x_bytes, "label_bytes": pb.label_bytes,
                     "op_bytes": {op: pb.op_bytes(op)
                                  for op in (COPY_OP, READ_OP) + tuple(OPS)}},
        "method": {"budget_s": args.budget, "max_wait_s": args.max_wait,
                   "min_reps": args.min_reps, "max_reps": MAX_REPS,
                   "warmup": max(WARMUP, pb.n_sets), "threads": args.threads,
                   "busy_cores": BUSY_CORES, "wide_spread": WIDE_SPREAD, "seed": SEED},
        "machine": machine_info(), "versions": versions(),
        "foreign_load_cores": loads, "rows": derived, "checks": checks,
        "notes": notes, "wall_s": wall,
    }


def build_busy_report(argv, rows, wall):
    return {"tool": "ssm.bench --busy", "date": now_iso(), "argv": argv, "rows": rows,
            "machine": machine_info(), "versions": versions(), "wall_s": wall}


def write_json(path, report):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
