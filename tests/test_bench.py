"""ssm.bench, the benchmark package: the derived columns and the formatting on synthetic
rows with known numbers, the JSON report, the argument parser, the GPU path's pieces with
NumPy standing in for CuPy, and short CLI runs (the sweep, --busy, --plot).

No test asserts a timing: the machine is shared and noisy. Runs use a tiny shape and
budget (about a second each).
"""
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import ssm
from conftest import child_process_kwargs, missing
from ssm import bench
from ssm.bench import busy, cli, gpu, peers, report, timing, training, workloads
from ssm.bench.report import derive, format_row, format_tables, summary_lines
from ssm.bench.timing import BUSY_CORES, MAX_REPS, WARMUP, Row

X_BYTES, L_BYTES = 1_000_000, 100_000          # a synthetic problem: 2X = 2 MB, 2X+L = 2.1 MB
TINY = ["--shape", "2", "3", "8", "8", "--threads", "1", "--budget", "0.01", "--min-reps", "1"]


def _row(op, impl, threads, ms, other=None, nbytes=None):
    """A row whose times (ns) are ``ms`` (a list: median, min, max are known)."""
    nbytes = nbytes or (2 * X_BYTES if op in ("copy", "softmax") else X_BYTES if op == "read"
                        else X_BYTES + L_BYTES if op == "loss" else 2 * X_BYTES + L_BYTES)
    return Row(op, impl, threads, nbytes, [int(round(m * 1e6)) for m in ms], other)


def _pick(derived, op, impl, threads):
    (d,) = [d for d in derived if (d["op"], d["impl"], d["threads"]) == (op, impl, threads)]
    return d


@pytest.fixture
def cpu_rows():
    return [
        _row("copy", "copy", 1, [1.0, 1.0, 1.0]),
        _row("copy", "copy", 2, [0.5, 0.5, 0.5]),
        _row("fused", "ssm", 1, [2.0, 1.9, 2.1]),
        _row("fused", "ssm", 2, [1.0, 1.0, 1.0], other=0.5),
        _row("fused", "torch", 1, [4.0, 4.0, 4.0]),
        _row("fused", "torch", 2, [3.0, 1.0, 3.5]),
        _row("fused", "numpy", 1, [8.0, 8.0, 8.0]),
    ]


# ---------------------------------------------------------------- rows and derived columns


def test_row_statistics():
    r = _row("fused", "ssm", 1, [1.0, 2.0, 3.0, 4.0, 10.0])
    assert (r.median_ms, r.min_ms, r.max_ms) == (3.0, 1.0, 10.0)
    assert r.spread == pytest.approx(3.0)
    assert r.quartiles_ms() == pytest.approx((1.5, 7.0))  # statistics.quantiles, exclusive
    one = _row("fused", "ssm", 1, [2.0])
    assert one.quartiles_ms() == (2.0, 2.0) and one.spread == 0.0


def test_derive_floor_speedup_efficiency_and_x_ssm(cpu_rows):
    d = derive(cpu_rows)
    assert [(x["op"], x["impl"], x["threads"]) for x in d] == \
        [(r.op, r.impl, r.threads) for r in cpu_rows]           # one per row, in order
    s1, s2 = _pick(d, "fused", "ssm", 1), _pick(d, "fused", "ssm", 2)
    # the floor: the copy at the same threads scaled to the op's bytes (2X+L over 2X)
    assert s1["floor_ms"] == pytest.approx(1.0 * 2.1 / 2.0)
    assert s2["floor_ms"] == pytest.approx(0.5 * 2.1 / 2.0)
    assert s1["x_floor"] == pytest.approx(2.0 / 1.05)
    assert s2["x_floor"] == pytest.approx(1.0 / 0.525)
    assert s1["gbps"] == pytest.approx(2.1e6 / 2.0 / 1e6)      # bytes / ms / 1e6 = GB/s
    # speedup and efficiency against the same implementation's lowest thread count
    assert (s1["speedup"], s1["efficiency"]) == (1.0, 1.0)
    assert s2["speedup"] == pytest.approx(2.0) and s2["efficiency"] == pytest.approx(1.0)
    t2 = _pick(d, "fused", "torch", 2)
    assert t2["speedup"] == pytest.approx(4 / 3) and t2["efficiency"] == pytest.approx(2 / 3)
    # x ssm: a peer's median over ssm's at the same thread count; none for ssm itself
    assert _pick(d, "fused", "torch", 1)["vs_ssm"] == pytest.approx(2.0)
    assert t2["vs_ssm"] == pytest.approx(3.0)
    assert _pick(d, "fused", "numpy", 1)["vs_ssm"] == pytest.approx(4.0)
    assert s1["vs_ssm"] is None and s2["vs_ssm"] is None
    c2 = _pick(d, "copy", "copy", 2)
    assert c2["x_floor"] == pytest.approx(1.0) and c2["speedup"] == pytest.approx(2.0)
    # what the JSON keeps of each row
    assert s1["reps"] == 3 and s1["times_ms"] == pytest.approx([2.0, 1.9, 2.1])
    assert s1["bytes"] == 2 * X_BYTES + L_BYTES and len(s1["iqr_ms"]) == 2


def test_derive_flags(cpu_rows):
    d = derive(cpu_rows)
    assert _pick(d, "fused", "ssm", 2)["flags"] == "!"          # other 0.5 > BUSY_CORES
    assert _pick(d, "fused", "torch", 2)["flags"] == "~"        # (3.5 - 1) / 3 > WIDE_SPREAD
    assert _pick(d, "fused", "ssm", 1)["flags"] == ""           # spread 0.1, load unknown
    both = derive([_row("fused", "ssm", 1, [1.0, 0.1, 2.0], other=BUSY_CORES * 2)])
    assert both[0]["flags"] == "!~"
    at_limit = derive([_row("fused", "ssm", 1, [1.0], other=BUSY_CORES)])
    assert at_limit[0]["flags"] == ""


def test_derive_without_copy_rows_and_on_the_gpu():
    (d,) = derive([_row("fused", "ssm", 4, [2.0])])
    assert d["floor_ms"] is None and d["x_floor"] is None and d["speedup"] == 1.0
    gpu_rows = derive([_row("copy", "copy", None, [0.1]), _row("fused", "ssm", None, [0.2]),
                       _row("fused", "torch", None, [0.5])])
    s, t = _pick(gpu_rows, "fused", "ssm", None), _pick(gpu_rows, "fused", "torch", None)
    assert s["efficiency"] is None and s["speedup"] == 1.0      # no thread counts
    assert s["x_floor"] == pytest.approx(0.2 / (0.1 * 2.1 / 2.0))
    assert t["vs_ssm"] == pytest.approx(2.5)


def test_derive_floor_is_the_streaming_copy_where_timed(cpu_rows):
    rows = cpu_rows + [_row("copy", "stream", 2, [0.4]), _row("read", "read", 2, [0.15])]
    d = derive(rows)
    s1, s2 = _pick(d, "fused", "ssm", 1), _pick(d, "fused", "ssm", 2)
    assert s1["floor"] == "copy" and s1["floor_ms"] == pytest.approx(1.0 * 2.1 / 2.0)
    assert s2["floor"] == "stream" and s2["floor_ms"] == pytest.approx(0.4 * 2.1 / 2.0)
    assert s2["x_floor"] == pytest.approx(1.0 / 0.42)
    assert _pick(d, "copy", "copy", 2)["x_floor"] == pytest.approx(0.5 / 0.4)  # copyto vs stream
    r = _pick(d, "read", "read", 2)
    assert r["floor"] == "read" and r["x_floor"] == pytest.approx(1.0)
    # the loss alone writes nothing of X's size: its floor is the read floor, scaled to X + L
    (loss,) = derive(rows + [_row("loss", "ssm", 2, [0.2])])[-1:]
    assert loss["floor"] == "read" and loss["floor_ms"] == pytest.approx(0.15 * 1.1)
    assert loss["x_floor"] == pytest.approx(0.2 / (0.15 * 1.1))
    (cols,) = [line for line in _summary(d) if line.startswith("Columns:")]
    assert cols.startswith("Columns: floor = the streaming copy, else the copy at the same")
    (cols,) = [line for line in _summary(derive(cpu_rows)) if line.startswith("Columns:")]
    assert cols.startswith("Columns: floor = the copy at the same threads")


def test_floor_kernels():
    from ssm import _cpu
    rng = np.random.default_rng(5)
    for n in (0, 1, 63, 64, 1000, (1 << 20) + 77, 3 << 20):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n + 1, np.uint8)[1:]               # an unaligned destination
        _cpu.floor_stream(dst, src, 2)
        np.testing.assert_array_equal(dst, src)
        words = n // 64 * 64  # whole lines as 64-bit words, per 1 MiB chunk; the rest by byte
        want = int(np.frombuffer(src[:words].tobytes(), np.uint64).sum(dtype=np.uint64)) \
            + int(src[words:].sum())
        assert _cpu.floor_read(src, 2) == want % 2**64
    with pytest.raises(ValueError, match="dst: expected a writeable array of src's size"):
        _cpu.floor_stream(np.zeros(3, np.uint8), np.zeros(4, np.uint8), 1)
    with pytest.raises(TypeError, match="src: expected a C-contiguous NumPy array"):
        _cpu.floor_read(np.zeros((4, 4))[:, 1], 1)


# ---------------------------------------------------------------- formatting


def test_ms_and_mb_formats():
    assert [report._ms(v) for v in (None, 123.4, 12.34, 1.234, 0.01234)] == \
        ["-", "123", "12.3", "1.23", "0.0123"]
    assert report._mb(44_040_192) == "44.0 MB" and report._mb(4096) == "4.1 kB"


def test_format_row_known_numbers():
    d = {"impl": "torch", "threads": 2, "median_ms": 3.0, "min_ms": 1.0, "max_ms": 3.5,
         "gbps": 0.7, "floor_ms": 0.525, "x_floor": 3.0 / 0.525, "speedup": 4 / 3,
         "efficiency": 2 / 3, "vs_ssm": 3.0, "other_cores": 0.04, "flags": "~"}
    assert format_row(d) == ("torch      2       3.00         1.00-3.50    0.7    0.525     5.7 "
                             "   1.33   67%    3.0  0.04 ~")
    # the columns line up with the header's
    assert len(format_row(d)) == len(report.HEADER) + 2


def test_format_row_gpu_and_missing_values():
    d = {"impl": "ssm", "threads": None, "median_ms": 0.2, "min_ms": 0.19, "max_ms": 0.25,
         "gbps": 10.5, "floor_ms": None, "x_floor": None, "speedup": 1.0, "efficiency": None,
         "vs_ssm": None, "other_cores": None, "flags": ""}
    line = format_row(d)
    assert line == ("ssm      gpu        0.2         0.19-0.25   10.5        -       - "
                    "   1.00     -      -     -")
    assert line == line.rstrip()                                  # no trailing blanks


def test_format_tables_titles_models_and_order(cpu_rows):
    pb = types.SimpleNamespace(x_bytes=X_BYTES, label_bytes=L_BYTES)
    rows = list(reversed(cpu_rows))                                # the order must not matter
    lines = format_tables(derive(rows), pb)
    assert lines[:3] == ["", "copy floors into a preallocated buffer (copy: np.copyto; stream: "
                             "non-temporal stores): 2X = 2.0 MB", report.HEADER]
    fused = lines.index("fused loss+grad (X, y -> loss, dX): 2X+L = 2.1 MB")
    body = [line.split()[:2] for line in lines[fused + 2:]]
    assert body == [["ssm", "1"], ["ssm", "2"], ["torch", "1"], ["torch", "2"], ["numpy", "1"]]
    assert not any(line.startswith("softmax") for line in lines)  # ops without rows: no table
    cuda = format_tables(derive([_row("copy", "copy", None, [0.1])]), pb, "cuda")
    assert cuda[1].startswith("copy floor (device-to-device copy into")
    assert cuda[3].split()[:2] == ["copy", "gpu"]


def _summary(derived, checks=(), notes=(), loads=None):
    return summary_lines(derived, list(checks), list(notes), loads or {})


def test_summary_quiet_noisy_and_mostly_quiet():
    quiet = derive([_row("fused", "ssm", 1, [1.0, 1.0, 1.1]) for _ in range(8)])
    lines = _summary(quiet, notes=["a note"])
    assert not any(line.startswith(("WARNING", "Mostly")) for line in lines)
    assert lines[0] == "" and "a note" in lines and lines[-1].startswith("Columns: floor =")
    busy = derive([_row("fused", "ssm", 1, [1.0], other=1.0)] +
                  [_row("fused", "ssm", 1, [1.0]) for _ in range(7)])
    (warn,) = [line for line in _summary(busy) if line.startswith("WARNING")]
    assert warn.startswith("WARNING: the machine was noisy: 1 of 8 rows ran while")
    wide = [_row("fused", "ssm", 1, [1.0, 0.1, 2.0])]
    two_wide = derive(wide * 2 + [_row("fused", "ssm", 1, [1.0])] * 6)     # 2/8 = NOISY_ROWS
    assert any(line.startswith("Mostly quiet: 0 of 8 rows") for line in _summary(two_wide))
    three_wide = derive(wide * 3 + [_row("fused", "ssm", 1, [1.0])] * 5)   # 3/8 > NOISY_ROWS
    assert any(line.startswith("WARNING: the machine was noisy")
               for line in _summary(three_wide))
    loaded = _summary(quiet, loads={"before": 0.0, "during": 1.0})
    assert loaded[1].startswith("Foreign load: 0.00 cores before the run, 1.00 during it")
    assert loaded[2].startswith("WARNING: the machine was noisy")


def test_summary_checks():
    d = derive([_row("fused", "ssm", 1, [1.0])])
    good = {"impl": "numpy", "loss": 1.0, "ssm_loss": 1.0, "loss_rel_err": 2e-8,
            "grad_err_rel_max": 1e-7, "ok": True}
    bad = {"impl": "torch", "loss": 1.5, "ssm_loss": 1.0, "loss_rel_err": 0.5,
           "grad_err_rel_max": None, "ok": False}
    lines = _summary(d, [good])
    assert ("Checked once: every loss agrees with ssm's (worst rel 2.0e-08) and every "
            "gradient to 0.0001 of max|dX|.") in lines
    lines = _summary(d, [good, bad])
    assert ("WARNING: torch disagrees with ssm: loss 1.5 vs 1 (rel 5.0e-01), gradient max "
            "err - of max|dX|.") in lines
    assert not any(line.startswith("Checked once") for line in lines)


# ---------------------------------------------------------------- workloads, peers, timing


def test_problem_bytes_and_sets():
    assert workloads.n_sets_for(1) == workloads.MAX_SETS
    assert workloads.n_sets_for(workloads.ROTATE_BYTES) == 2
    assert workloads.n_sets_for(10 << 20) == 7 and workloads.n_sets_for(10, rotate_bytes=30) == 3
    pb = workloads.make_problem("", (2, 3, 4, 5), "float32", "uint8", ssm)
    assert pb.ignore_index == 255 and pb.y[0].dtype == np.uint8 and pb.n_sets == 8
    assert (pb.x_bytes, pb.label_bytes) == (2 * 3 * 20 * 4, 2 * 20)
    assert pb.op_bytes("copy") == pb.op_bytes("softmax") == 2 * pb.x_bytes
    assert pb.op_bytes("fused") == 2 * pb.x_bytes + pb.label_bytes
    np.testing.assert_allclose(pb.prob[1], ssm.softmax(pb.x[1]))
    assert not pb.out[0].any()
    ignored = np.mean([np.mean(y == 255) for y in pb.y])
    assert 0 < ignored < 4 * workloads.IGNORE_FRACTION


def test_agreement_records():
    dx = np.array([[0.5, -0.5], [0.25, -0.25]])
    found = {"same": (2.0, dx.copy()), "loss off": (2.0 * (1 + 1e-3), None),
             "grad off": (2.0, dx + 1e-3)}
    checks = {c["impl"]: c for c in peers.agreement(2.0, dx, found)}
    assert checks["same"]["ok"] and checks["same"]["grad_err_rel_max"] == 0.0
    assert not checks["loss off"]["ok"] and checks["loss off"]["grad_err_rel_max"] is None
    assert checks["loss off"]["loss_rel_err"] == pytest.approx(1e-3)
    assert not checks["grad off"]["ok"]
    assert checks["grad off"]["grad_err_rel_max"] == pytest.approx(2e-3)   # / max|dX| = 0.5


def test_check_agreement_cpu_peers_agree():
    pb = workloads.make_problem("", (2, 5, 3, 4), "float64", "int64", ssm)
    loss_cls = pytest.importorskip("sklearn._loss.loss").HalfMultinomialLoss
    checks = peers.check_agreement(ssm, pb, None, peers.SklearnFused(loss_cls, pb))
    assert [c["impl"] for c in checks] == ["ssm forward", "ssm loss alone", "numpy", "sklearn"]
    assert all(c["ok"] for c in checks), checks


def test_numpy_peer_matches_ssm():
    pb = workloads.make_problem("", (2, 4, 3, 3), "float64", "int32", ssm)
    calls = peers.numpy_calls(pb)
    loss = calls["fused"](0)
    ref_loss, ref_dx = ssm.spatial_softmax_with_loss_and_grad(pb.x[0], pb.y[0])
    assert loss == pytest.approx(float(ref_loss), rel=1e-12)
    np.testing.assert_allclose(pb.out[0], ref_dx, atol=1e-15)
    calls["softmax"](1)
    np.testing.assert_allclose(pb.out[1], pb.prob[1], rtol=1e-12)


def test_time_cpu_counts_calls():
    seen = []
    times, _ = timing.time_cpu(seen.append, 3, 0.0, 4)         # no budget: min_reps only
    assert len(times) == 4 and all(isinstance(t, int) and t >= 0 for t in times)
    warm = [i % 3 for i in range(max(WARMUP, 3))]              # at least once per set
    assert seen == warm + [0, 1, 2, 0]                         # then the sets rotate
    times, _ = timing.time_cpu(lambda i: None, 1, 60.0, 1)     # budget left: stops at MAX_REPS
    assert len(times) == MAX_REPS


class _FakeEvent:
    def record(self):
        self.t = 0.25 if hasattr(self, "t") else 0.0

    def synchronize(self):
        pass


def _fake_cupy(l2=1 << 20):
    device = types.SimpleNamespace(attributes={"L2CacheSize": l2}, id=0)
    cuda = types.SimpleNamespace(Device=lambda: device, Event=_FakeEvent,
                                 get_elapsed_time=lambda a, b: 1.5)
    return types.SimpleNamespace(cuda=cuda, asarray=np.asarray, empty_like=np.empty_like,
                                 copyto=np.copyto)


def test_gpu_pieces_with_numpy_standing_in_for_cupy():
    for name in ("cuda_modules", "make_gpu_problem", "plan_gpu", "event_timers", "run_gpu"):
        assert callable(getattr(gpu, name)), name
    args = cli.parse_args(["--shape", "2", "3", "8", "8", "--budget", "0", "--min-reps", "2",
                           "--quiet"])
    fake = _fake_cupy(l2=1000)                                 # 2 * L2 < 2 sets of 1.5 kB
    pb = gpu.make_gpu_problem(fake, ssm, "", (2, 3, 8, 8), args)
    cpu_pb = workloads.make_problem("", (2, 3, 8, 8), "float32", "int64", ssm)
    assert pb.rotate_bytes == 2000 and pb.n_sets == 2 < cpu_pb.n_sets
    for name in ("x", "y", "prob"):                           # the same data on both devices
        for a, b in zip(getattr(pb, name), getattr(cpu_pb, name)):
            np.testing.assert_array_equal(a, b)
    for validate in (True, False):
        plan = gpu.plan_gpu(fake, ssm, None, pb, args.ops, validate)
        assert [(op, impl, k) for op, impl, k, _ in plan] == \
            [("copy", "copy", None)] + [(op, "ssm", None) for op in workloads.OPS]
        rows = timing.run_plan(plan, pb, args, gpu.event_timers(fake, None))
        assert all(r.times_ns == [1_500_000, 1_500_000] and r.other_cores is None
                   for r in rows)
    pb.out[0][...] = -7.0
    for _, impl, _, make in plan[1:]:  # ssm's calls allocate their outputs, as torch's do
        make()(0)
    assert (pb.out[0] == -7.0).all()
    ssm_calls = peers.ssm_calls(ssm, pb, None)  # the CPU's write into the sets' buffers
    ssm_calls["softmax"](0)
    np.testing.assert_array_equal(pb.out[0], ssm.softmax(pb.x[0]))
    checks = peers.check_agreement(ssm, pb, None, None, device="cuda")
    assert [c["impl"] for c in checks] == ["ssm forward", "ssm loss alone"]
    assert all(c["ok"] for c in checks)


def test_cuda_modules_without_cupy_says_what_to_do():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    with pytest.raises(SystemExit, match=r"--device cuda needs CuPy and a CUDA device.*"
                                         r"--device cpu"):
        gpu.cuda_modules()


# ---------------------------------------------------------------- the argument parser


@pytest.mark.parametrize("argv, message", [
    (["--shape", "5"], r"--shape: expected N C \[spatial...\] with every extent >= 1"),
    (["--shape", "2", "0", "3"], r"--shape: expected N C"),
    (["--shape", "2", "3", "--workload", "voc"], r"give --workload or --shape, not both"),
    (["--threads", "0,1"], r"--threads: .*thread counts must be >= 1"),
    (["--threads", "a,b"], r"--threads: .*is not a list like 1,2,4"),
    (["--threads", ","], r"--threads: .*thread counts must be >= 1"),
    (["--ops", "fused,nope"], r"--ops: .*expected a subset of softmax,forward,backward,fused"),
    (["--ops", ""], r"--ops: .*expected a subset of"),
    (["--budget", "-1"], r"--budget and --max-wait must be >= 0 and --min-reps >= 1"),
    (["--min-reps", "0"], r"--min-reps >= 1"),
    (["--device", "tpu"], r"--device: invalid choice"),
    (["--busy", "--training-step"], r"give one of --busy, --training-step, not several"),
    (["--busy", "--dask"], r"give one of --busy, --dask, not several"),
    (["--threads", "1000"], r"--threads: threads: 1000 threads is more than ssm's maximum"),
    (["--positions", "--shape", "2", "3"], r"--positions --shape: expected N C H \[W ...\]"),
    (["--json", "/nonexistent/x.json"], r"--json: /nonexistent is not a folder"),
    (["--plot", "scaling.txt"], r"--plot: 'scaling.txt'; expected a .png, .pdf or .svg"),
    (["--dask", "--dask-scale", "0"], r"--dask-scale: 0; expected an integer >= 1"),
    (["--dask", "--dask-chunk", "-2"], r"--dask-chunk: -2; expected an integer >= 1"),
    (["--dask-chunk", "2"], r"--dask-chunk applies to --dask only"),
    (["--no-jax"], r"--no-jax applies to --training-step only"),
    (["--busy", "--threads", "2"], r"--threads does not apply to --busy"),
    (["--device", "cudasim", "--workload", "ade", "--json", "x.json"],
     r"--device cudasim prints .* it does not take --workload, --json"),
])
def test_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ssm-bench")
    assert any(re.search(message, line) for line in err.splitlines()), err


def test_parser_values():
    args = cli.parse_args(["--threads", "4,1,2,2", "--ops", "fused, softmax"])
    assert args.threads == [1, 2, 4] and args.ops == ("softmax", "fused")
    args = cli.parse_args([])
    assert args.threads == bench.machine.default_threads() and args.ops == tuple(workloads.OPS)
    assert cli.workload_of(args) == workloads.WORKLOADS[workloads.DEFAULT_WORKLOAD]
    assert cli.workload_of(cli.parse_args(["--shape", "1", "2"])) == ("", (1, 2))
    assert cli.workload_of(cli.parse_args(["--workload", "ade"]))[1] == (4, 150, 128, 128)


def test_default_threads_powers_of_two_and_the_cores(monkeypatch):
    for cores, expected in ((1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])):
        monkeypatch.setattr(bench.machine, "usable_cores", lambda c=cores: c)
        assert bench.machine.default_threads() == expected


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CLI run: its printed lines and its JSON report."""
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = TINY + ["--no-torch", "--quiet", "--json", str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(argv) == 0
    return out.getvalue().splitlines(), json.loads(path.read_text()), argv


def test_cli_run_prints_the_tables(tiny_run):
    lines, _, _ = tiny_run
    assert lines[0].startswith("ssm.bench: 2x3x8x8 float32 logits, int64 labels (5% = -1)")
    assert "(small: data stays in cache)" in lines[0]
    for title in ("copy floors into", "read floor", "softmax (X -> P)", "loss forward",
                  "loss backward", "fused loss+grad", "loss alone (X, y -> loss): 1X+L"):
        assert any(line.startswith(title) for line in lines), title
    assert lines.count(report.HEADER) == 7
    assert any(line.startswith("Checked once: every loss agrees") for line in lines)
    assert lines[-1].startswith("Wall time ")


def test_cli_json_report(tiny_run):
    _, rep, argv = tiny_run
    assert set(rep) == {"tool", "date", "argv", "device", "workload", "method", "machine",
                        "versions", "foreign_load_cores", "rows", "checks", "notes", "wall_s"}
    assert rep["tool"] == "ssm.bench" and rep["argv"] == argv and rep["device"] == "cpu"
    w = rep["workload"]
    assert w["shape"] == [2, 3, 8, 8] and w["dtype"] == "float32" and w["labels"] == "int64"
    assert w["op_bytes"]["fused"] == 2 * w["x_bytes"] + w["label_bytes"]
    assert set(w["op_bytes"]) == {"copy", "read", "softmax", "forward", "backward", "fused",
                                  "loss"}
    assert w["op_bytes"]["loss"] == w["x_bytes"] + w["label_bytes"]
    m = rep["method"]
    assert (m["budget_s"], m["min_reps"], m["threads"], m["max_reps"]) == (0.01, 1, [1], MAX_REPS)
    assert set(rep["foreign_load_cores"]) == {"before", "during"}
    impls = {(r["op"], r["impl"]) for r in rep["rows"]}
    assert {("copy", "copy"), ("copy", "stream"), ("read", "read"), ("fused", "ssm"),
            ("softmax", "numpy")} <= impls
    assert all(r["threads"] == 1 and r["reps"] >= 1 for r in rep["rows"])
    assert set(rep["rows"][0]) == {
        "op", "impl", "threads", "bytes", "reps", "median_ms", "min_ms", "max_ms", "iqr_ms",
        "gbps", "other_cores", "spread", "times_ms", "floor", "floor_ms", "x_floor", "speedup",
        "efficiency", "vs_ssm", "flags"}
    assert rep["checks"] and all(c["ok"] for c in rep["checks"])
    assert {"cpu", "cores", "memory_bytes"} <= set(rep["machine"])
    assert {"python", "numpy", "ssm"} <= set(rep["versions"])


def test_run_all_summary_of_a_report(tiny_run):
    # benchmarks/run_all.py's digest, on the tiny run's report (source tree only)
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run_all.py")
    if not os.path.exists(path):
        missing("source-tree", "needs the source tree's benchmarks/run_all.py")
    spec = importlib.util.spec_from_file_location("run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    text = run_all.summary([("tiny", tiny_run[1])])
    (line,) = [x for x in text.splitlines() if x.startswith("| tiny | 1 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 11 and cells[4:6] == ["-", "-"]      # no torch in this run
    assert cells[-1].endswith(f"/{len(tiny_run[1]['rows'])}")  # flagged rows / all rows


def test_python_m_ssm_bench(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ssm.bench", "--help"], capture_output=True,
                       text=True, **child_process_kwargs(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ssm-bench") and "--busy" in r.stdout


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tiny.png"
    assert bench.main(TINY + ["--ops", "fused", "--no-torch", "--no-sklearn", "--quiet",
                              "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_mode(tmp_path, monkeypatch, capsys):
    # spawns one spinning process per core for the busy phase: the smallest run there is
    monkeypatch.setattr(busy, "MIN_CALLS", 2)
    path, png = tmp_path / "busy.json", tmp_path / "busy.png"
    argv = ["--busy", "--shape", "1", "3", "4", "4", "--budget", "0.01", "--quiet",
            "--json", str(path)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png)]
    else:
        png = None
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Busy machine: fused loss+grad")
    assert [line.split()[:2] for line in lines[2:4]] == [["1x3x4x4", "quiet"], ["1x3x4x4", "busy"]]
    assert lines[4].startswith("Worst median ratio default/T1:")
    rep = json.loads(path.read_text())
    assert rep["tool"] == "ssm.bench --busy" and rep["argv"] == argv
    assert [r["phase"] for r in rep["rows"]] == ["quiet", "busy"]
    assert set(rep["rows"][0]) == {"phase", "shape", "calls", "t1_median_s", "t1_p90_s",
                                   "default_median_s", "default_p90_s", "ratio_median",
                                   "ratio_p90"}
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_step_lines_from_synthetic_rows():
    rows = [{"case": c, "threads": t, "rounds": 7, "median_s": m, "min_s": m, "max_s": m}
            for t in (1, 2)
            for c, m in ((training.RAW_CASE, 0.005), ("ssm.torch eager", 0.010),
                         ("F.cross_entropy eager", 0.080), ("F.cross_entropy compiled", 0.030),
                         ("ssm.jax jit(value_and_grad)", 0.020),
                         ("jax.nn jit(value_and_grad)", 0.050))]
    rows[1]["minor_faults"] = 535
    lines = training.format_lines(rows, (8, 21, 256, 256))
    assert lines[0].startswith("Training step: loss + gradient") and "8x21x256x256" in lines[0]
    assert lines[1].split()[-1] == "faults"
    assert lines[2].split()[-5:] == ["1", "5.00", "5.00-5.00", "7", "-"]
    assert lines[3].split()[-5:] == ["1", "10.00", "10.00-10.00", "7", "535"]
    (one,) = [line for line in lines if line.startswith("1 thread(s): ")]
    assert one == ("1 thread(s): ssm.torch vs F.cross_entropy eager: 8.00x; ssm.torch vs "
                   "F.cross_entropy compiled: 3.00x; ssm.jax vs jax.nn, both "
                   "jit(value_and_grad): 2.50x; ssm.torch's cost over the NumPy call: 2.00x")
    only_raw = training.format_lines(rows[:1], (1, 3, 4), use_torch=False, use_jax=False)
    assert only_raw[-2:] == [
        "PyTorch is not installed: no PyTorch rows (pip install 'ssm[torch]').",
        "JAX is not installed: no JAX rows (pip install 'ssm[jax]')."]


def test_training_step_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "MIN_ROUNDS", 2)
    threads_before = ssm.get_num_threads()
    path = tmp_path / "training.json"
    argv = ["--training-step", "--shape", "2", "3", "4", "4", "--threads", "1", "--budget", "0",
            "--no-compile", "--quiet", "--json", str(path)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Training step: loss + gradient") and "2x3x4x4" in lines[0]
    rep = json.loads(path.read_text())
    assert rep["tool"] == "ssm.bench --training-step" and rep["argv"] == argv
    cases = [r["case"] for r in rep["rows"]]
    assert cases[0] == training.RAW_CASE and all(r["rounds"] >= 2 for r in rep["rows"])
    assert all(type(r["minor_faults"]) is int and r["minor_faults"] >= 0 for r in rep["rows"])
    if importlib.util.find_spec("torch") is not None:
        assert {"ssm.torch eager", "F.cross_entropy eager"} <= set(cases)
        assert "ssm.torch compiled" not in cases
    assert ssm.get_num_threads() == threads_before  # restored


def test_dask_mode(monkeypatch, capsys):
    """--dask on a tiny batch: every path's row, and the chunks' logits and labels made
    by one task each (a cluster keeps them on one worker)."""
    from conftest import require_module
    require_module("dask", "distributed")
    from ssm.bench import dask_bench
    x, y = dask_bench._inputs((4, 3, 8, 8), np.float32, k=2)
    deps = x.__dask_graph__().dependencies
    assert x.numblocks == (2, 1, 1, 1) and y.numblocks == (2, 1, 1)
    assert deps[x.name] == deps[y.name] and len(deps[x.name]) == 1  # one maker layer
    xs, ys = x.compute(scheduler="sync"), y.compute(scheduler="sync")
    assert xs.shape == (4, 3, 8, 8) and ys.shape == (4, 8, 8) and ys.max() < 3
    assert [c[1:] for c in dask_bench._clusters(2)] == [(2, 1), (1, 2)]
    monkeypatch.setattr(dask_bench, "REPS", 1)
    # one cluster of one process: each cluster's start costs seconds
    monkeypatch.setattr(dask_bench, "_clusters", lambda t: [("dask, LocalCluster tiny", 1, t)])
    argv = ["--dask", "--shape", "2", "3", "8", "8", "--dask-scale", "2", "--dask-chunk", "2",
            "--threads", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "4x3x8x8 float32" in out and "(2 chunks)" in out
    for path in ("copy (memory floor)", "ssm, one call", "dask, threaded scheduler",
                 "dask, LocalCluster tiny"):
        assert re.search(re.escape(path) + r"\s+\d+\.\d", out), path
