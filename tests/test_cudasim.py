"""The CUDA simulator itself (ssm.testing.cudasim): what it reports, how it computes.

Negative controls: a small deliberately wrong kernel per check, each of which must be
reported as a SimulatorError naming kernel, block, thread and what happened; the host
synchronisation and initcheck controls use ssm's own functions. Then what the simulator
must model to give a GPU's results: the half conversions (bit for bit against NumPy),
denormals flushed in float kernels (-ftz=true), FMA contraction on and off, streams and
devices. The GPU test cases themselves run on the simulator in tests/test_gpu.py.
"""

import os

import numpy as np
import pytest

import _reference as ref
import ssm
from conftest import (GPU_FLOAT_DTYPES, LAYOUTS, REDUCTIONS, assert_close, make_labels,
                      make_logits, make_soft_targets, make_weights)
from ssm import _gpu
from ssm.testing import cudasim
from ssm.testing.cudasim import SimulatorError, SynchronizationError

pytestmark = pytest.mark.cudasim

BAD_KERNELS = r"""
#include "common.cuh"

/* thread 3 leaves before the barrier the others wait at */
__global__ void barrier_divergent(float* out)
{
    if (threadIdx.x == 3)
        return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

/* two halves of the block wait at two different barriers */
__global__ void barrier_split(float* out)
{
    if (threadIdx.x < 32)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.0f;
}

/* half of each warp calls a full-mask shuffle */
__global__ void shuffle_missing_lanes(float* out)
{
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16)
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

/* the lower half-warp shuffles among itself but reads lanes of the upper half */
__global__ void shuffle_outside_mask(float* out)
{
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16)
        v = __shfl_xor_sync(0x0000ffffu, v, 16);
    out[threadIdx.x] = v;
}

/* correct: every lane, full mask */
__global__ void shuffle_ok(float* out)
{
    out[threadIdx.x] = warp_reduce((float)threadIdx.x, op_sum());
}

/* each thread reads the element its predecessor wrote, with no barrier in between */
__global__ void shared_race(float* out)
{
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[threadIdx.x > 0 ? threadIdx.x - 1 : 0];
}

/* correct: the same with the barrier */
__global__ void shared_ok(float* out)
{
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

/* reads shared memory nobody wrote */
__global__ void shared_uninitialised(float* out)
{
    __shared__ float s[64];
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

/* thread i reads x[i + 1]: the last thread reads one element past the end */
__global__ void read_past_end(const float* x, float* out)
{
    out[threadIdx.x] = x[threadIdx.x + 1];
}

/* thread i writes out[i + 1]: the last thread writes one element past the end */
__global__ void write_past_end(float* out)
{
    out[threadIdx.x + 1] = 1.0f;
}

/* thread i writes out[i - 1]: thread 0 writes before the start */
__global__ void write_before_start(float* out)
{
    out[(long long)threadIdx.x - 1] = 1.0f;
}

/* adds `scratch`, which the caller never wrote (initcheck) */
__global__ void add_scratch(const float* x, const float* scratch, float* out)
{
    out[threadIdx.x] = x[threadIdx.x] + scratch[threadIdx.x];
}

/* a parameter list to check arguments against */
__global__ void params(const double* p, long long n, int k, double d, float* out)
{
    out[threadIdx.x] = (float)(p[0] * n + k + d);
}

/* thread i copies x[i]: a warp reads 128 contiguous bytes, 4 sectors */
__global__ void copy_coalesced(const float* x, float* y)
{
    y[threadIdx.x] = x[threadIdx.x];
}

/* thread i copies x[32 i]: every lane of a warp reads its own sector */
__global__ void copy_strided(const float* x, float* y)
{
    y[threadIdx.x] = x[32 * threadIdx.x];
}

/* the half conversions of common.cuh, element-wise */
__global__ void half_conversions(const unsigned short* h, float* h_to_f, const float* f,
                                 ssm_half* f_to_h, const double* d, ssm_half* d_to_h, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        ssm_half v;
        v.bits = h[i];
        h_to_f[i] = to_acc(v);
        f_to_h[i] = from_acc<ssm_half>(f[i]);
        d_to_h[i] = from_double<ssm_half>(d[i]);
    }
}

/* the bfloat16 conversions of common.cuh, element-wise */
__global__ void bf16_conversions(const unsigned short* h, float* h_to_f, const float* f,
                                 ssm_bf16* f_to_h, const double* d, ssm_bf16* d_to_h, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        ssm_bf16 v;
        v.bits = h[i];
        h_to_f[i] = to_acc(v);
        f_to_h[i] = from_acc<ssm_bf16>(f[i]);
        d_to_h[i] = from_double<ssm_bf16>(d[i]);
    }
}
"""

NAMES = ["barrier_divergent", "barrier_split", "shuffle_missing_lanes", "shuffle_outside_mask",
         "shuffle_ok", "shared_race", "shared_ok", "shared_uninitialised", "read_past_end",
         "write_past_end", "write_before_start", "add_scratch", "params", "copy_coalesced",
         "copy_strided", "half_conversions", "bf16_conversions"]


@pytest.fixture(scope="module")
def module():
    code = BAD_KERNELS.replace('#include "common.cuh"', _common_text(), 1)
    return cudasim.RawModule(code=code, options=_gpu.OPTIONS, name_expressions=NAMES)


def _common_text():
    from importlib import resources

    return resources.files("ssm").joinpath("cuda", "common.cuh").read_text()


def launch(module, name, *args, threads=64, blocks=1):
    module.get_function(name)((blocks,), (threads,), args)


def _where(kernel):
    return rf"^kernel {kernel}, block \(0, 0, 0\), thread \(\d+, 0, 0\): "


# ---- negative controls: each wrong kernel is reported ----------------------------------


def test_barrier_not_reached_by_every_thread(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("barrier_divergent") +
                       r"__syncthreads at line \d+ is not reached by every thread of the block: "
                       r"thread \(3, 0, 0\) has exited"):
        launch(module, "barrier_divergent", out)


def test_threads_at_different_barriers(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("barrier_split") +
                       r"__syncthreads at line \d+ is not reached by every thread.*waits at the "
                       r"__syncthreads of line \d+"):
        launch(module, "barrier_split", out)


def test_shuffle_without_all_lanes(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("shuffle_missing_lanes") +
                       r"__shfl_xor_sync at line \d+ with mask 0xffffffff: lane 16 of the mask "
                       r"has exited"):
        launch(module, "shuffle_missing_lanes", out)


def test_shuffle_reading_a_lane_outside_the_mask(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("shuffle_outside_mask") +
                       r"__shfl_xor_sync .* reads lane 16, which is not in the mask"):
        launch(module, "shuffle_outside_mask", out)


def test_shuffle_correct(module):
    out = cudasim.zeros(64, np.float32)
    launch(module, "shuffle_ok", out)
    np.testing.assert_array_equal(cudasim.asnumpy(out), [sum(range(32))] * 32
                                  + [sum(range(32, 64))] * 32)


def test_shared_memory_race(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("shared_race") +
                       r"shared-memory race on s\[0\]: read after thread 0 wrote it, with no "
                       r"__syncthreads between"):
        launch(module, "shared_race", out)


def test_shared_memory_with_barrier(module):
    out = cudasim.zeros(64, np.float32)
    launch(module, "shared_ok", out)
    np.testing.assert_array_equal(cudasim.asnumpy(out), (np.arange(64) + 1) % 64)


def test_uninitialised_shared_memory(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=_where("shared_uninitialised") +
                       r"read of __shared__ s\[\d+\], which no thread of this block has written"):
        launch(module, "shared_uninitialised", out)


def test_global_read_past_the_end(module):
    x, out = cudasim.zeros(64, np.float32), cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=r"^kernel read_past_end, block \(0, 0, 0\), thread "
                       r"\(63, 0, 0\): invalid global read at address 0x[0-9a-f]+ \(0 bytes past "
                       r"the end of allocation #\d+ \(256 bytes on device 0\)\)"):
        launch(module, "read_past_end", x, out)


def test_global_write_past_the_end(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=r"thread \(63, 0, 0\): invalid global write at address "
                       r"0x[0-9a-f]+ \(0 bytes past the end of allocation"):
        launch(module, "write_past_end", out)


def test_global_write_before_the_start(module):
    out = cudasim.zeros(64, np.float32)
    with pytest.raises(SimulatorError, match=r"^kernel write_before_start: a write before the "
                       r"start of allocation #\d+ \(256 bytes"):
        launch(module, "write_before_start", out)


def _bits_under_two_poisons(fn):
    """The bytes of fn()'s results with fresh device memory poisoned 0xFF, then 0x00."""
    results = []
    for byte in (0xFF, 0x00):
        with cudasim.poison(byte):
            out = fn()
        results.append(b"".join(cudasim.asnumpy(o).tobytes() for o in out))
    return results


def test_uninitialised_global_memory_changes_the_bits(module):
    # initcheck's negative control: the kernel reads `scratch`, which nobody wrote
    x = cudasim.asarray(np.arange(64, dtype=np.float32))

    def run():
        scratch, out = cudasim.empty(64, np.float32), cudasim.zeros(64, np.float32)
        launch(module, "add_scratch", x, scratch, out)
        return [out]

    a, b = _bits_under_two_poisons(run)
    assert a != b


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_FLOAT_DTYPES)
def test_no_uninitialised_reads_in_ssm(rng, dtype, layout):
    # initcheck: every function and option set gives the same bits under both poisons
    shape = (2, 5, 3, 7) if layout == "NCHW" else (2, 3, 7, 5)
    x = make_logits(rng, shape, dtype)
    y = make_labels(rng, (2, 3, 7), 5, np.int32)
    w = make_weights(rng, (2, 3, 7), dtype)
    d = rng.random((2, 3, 7)).astype(dtype)
    soft = ref.softmax(make_logits(rng, shape), layout).astype(dtype)
    dev = cudasim.asarray

    def run():
        out = [ssm.softmax(dev(x), layout=layout), ssm.log_softmax(dev(x), layout=layout),
               ssm.softmax_grad(dev(soft), dev(x), layout=layout)]
        for opts in ({}, {"label_smoothing": 0.1, "class_weights": [1, 2, 3, 4, 5]},
                     {"lens": np.full((5, 5), 0.2)}):
            for reduction in REDUCTIONS:
                kw = dict(opts, reduction=reduction, layout=layout)
                d_loss = dev(d) if reduction == "none" else 0.5
                for target in (dev(y), dev(soft)) if "lens" not in opts else (dev(y),):
                    prob, loss = ssm.spatial_softmax_with_loss(dev(x), target, dev(w), **kw)
                    g = ssm.spatial_softmax_with_loss_grad(prob, target, dev(w), d_loss, **kw)
                    out += [prob, loss, g,
                            *ssm.spatial_softmax_with_loss_and_grad(
                                dev(x), target, dev(w), d_loss, return_prob=True, **kw)]
        return out

    a, b = _bits_under_two_poisons(run)
    assert a == b


def test_argument_count(module):
    with pytest.raises(SimulatorError, match=r"^kernel params: 4 arguments for 5 parameters "
                       r"\(const double\*, long long int, int, double, float\*\)"):
        launch(module, "params", cudasim.zeros(1), np.int64(1), np.int32(2), np.float64(3.0))


@pytest.mark.parametrize("i,bad,match", [
    (1, np.int32(1), r"argument 1 \(parameter long long int, 8 bytes\): got numpy.int32 \(4 bytes, "
                     r"a signed integer\); expected 8 bytes, a signed integer"),
    (1, np.float64(1), r"argument 1 .*: got numpy.float64 \(8 bytes, floating point\); expected "
                       r"8 bytes, a signed integer"),
    (3, np.float32(1), r"argument 3 \(parameter double, 8 bytes\): got numpy.float32 \(4 bytes"),
    (2, 7, r"argument 2 .*: a builtins.int cannot be passed to a kernel"),
    (0, np.zeros(1), r"argument 0 .*: a numpy.ndarray cannot be passed to a kernel"),
    (2, None, r"argument 2 .*: a builtins.NoneType cannot be passed"),
])
def test_argument_size_and_kind(module, i, bad, match):
    args = [cudasim.zeros(1), np.int64(1), np.int32(2), np.float64(3.0),
            cudasim.zeros(64, np.float32)]
    args[i] = bad
    with pytest.raises(SimulatorError, match=r"^kernel params, " + match):
        launch(module, "params", *args)


def test_argument_is_a_device_array_where_a_number_is_expected(module):
    args = [cudasim.zeros(1), cudasim.zeros(1), np.int32(2), np.float64(3.0),
            cudasim.zeros(64, np.float32)]
    with pytest.raises(SimulatorError, match=r"argument 1 \(parameter long long int, 8 bytes\): got "
                       r"a device array; expected a signed integer"):
        launch(module, "params", *args)


def test_argument_on_another_device(module):
    with cudasim.Device(1):
        p = cudasim.zeros(1)
    with pytest.raises(SimulatorError, match=r"argument 0 .*: an array on device 1, launched on "
                       r"device 0"):
        launch(module, "params", p, np.int64(1), np.int32(2), np.float64(3.0),
               cudasim.zeros(64, np.float32))


def test_arguments_correct(module):
    out = cudasim.zeros(64, np.float32)
    launch(module, "params", cudasim.full(1, 0.5), np.int64(4), np.int32(2), np.float64(0.25),
           out)
    assert cudasim.asnumpy(out).tolist() == [4.25] * 64


def test_host_synchronisation_where_none_is_promised(rng):
    # validate=True reads the first bad label's index: a synchronisation, reported here
    x = cudasim.asarray(make_logits(rng, (2, 5, 3, 4), np.float32))
    y = cudasim.asarray(make_labels(rng, (2, 3, 4), 5, np.int32))
    ssm.spatial_softmax_with_loss(x, y, validate=False)  # compile outside the check
    with cudasim.forbid_synchronize():
        _, loss = ssm.spatial_softmax_with_loss(x, y, validate=False)
        with pytest.raises(SynchronizationError, match=r"int\(\)"):
            ssm.spatial_softmax_with_loss(x, y)
        with pytest.raises(SynchronizationError, match=r"float\(\)"):
            float(loss)
    before = cudasim.sync_count()
    assert np.isfinite(float(loss)) and cudasim.sync_count() == before + 1


def _launches_and_syncs(monkeypatch, call):
    """The kernel names of `call`'s launches, with "SYNC" where the host waited."""
    from ssm.testing.cudasim import _device
    real = _device.host_sync
    with cudasim.record_launches() as log:
        def sync(what):
            real(what)
            log.append("SYNC")
        monkeypatch.setattr(_device, "host_sync", sync)
        call()
        monkeypatch.setattr(_device, "host_sync", real)
    return [e if e == "SYNC" else e.name.split("<")[0] for e in log]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("with_out", [False, True])
def test_a_loss_call_launches_then_reads_the_bad_label_index_once(monkeypatch, rng, with_out,
                                                                  layout):
    # validate=True, "mean". The forward and the loss alone into outputs of their own: the
    # label pre-pass rides in the loss pass where a thread owns a pixel (NCHW; NHWC with 5
    # classes has a warp per pixel, and the pre-pass goes first), one final, then the one
    # read of the bad label index. The gradients need the normaliser first: the pre-pass
    # and its final, the pass (and its final), then the read, so the device does not wait
    # for the host in mid-call. With a caller's out= the read comes before the pass, which
    # then never writes into it for a bad label.
    shape = (2, 5, 3, 4) if layout == "NCHW" else (2, 3, 4, 5)
    x = cudasim.asarray(make_logits(rng, shape, np.float32))
    y = cudasim.asarray(make_labels(rng, (2, 3, 4), 5, np.int32))
    out = cudasim.empty(x.shape, np.float32) if with_out else None
    pre = ["sswl_stats", "reduce_stats"]
    riding = ["sswl_fwd", "reduce_loss_stats"] if layout == "NCHW" else \
        pre + ["sswl_fwd", "reduce_partials"]
    calls = {
        "forward": lambda: ssm.spatial_softmax_with_loss(x, y, out=out, layout=layout),
        "fused": lambda: ssm.spatial_softmax_with_loss_and_grad(x, y, out=out, layout=layout),
        "grad": lambda: ssm.spatial_softmax_with_loss_grad(x, y, out=out, layout=layout),
        "loss alone": lambda: ssm.cross_entropy(x, y, layout=layout),
    }
    expected = {
        "forward": riding + ["SYNC"], "loss alone": riding + ["SYNC"],
        "fused": pre + ["sswl_fwd", "reduce_partials", "SYNC"],
        "grad": pre + ["sswl_bwd", "SYNC"],
    }
    if with_out:
        expected.update({"forward": pre + ["SYNC", "sswl_fwd", "reduce_partials"],
                         "fused": pre + ["SYNC", "sswl_fwd", "reduce_partials"],
                         "grad": pre + ["SYNC", "sswl_bwd"]})
    for name, call in calls.items():
        call()  # compile outside the record
        assert _launches_and_syncs(monkeypatch, call) == expected[name], name
    # "sum" without validation: no pre-pass and no read; "sum" with it, into the fused
    # pass's own outputs: the pre-pass rides in the pass where it can
    got = _launches_and_syncs(monkeypatch, lambda: ssm.spatial_softmax_with_loss_and_grad(
        x, y, reduction="sum", validate=False, layout=layout))
    assert got == ["sswl_fwd", "reduce_partials"]
    if not with_out:
        got = _launches_and_syncs(monkeypatch, lambda: ssm.spatial_softmax_with_loss_and_grad(
            x, y, reduction="sum", layout=layout))
        assert got == riding + ["SYNC"]
    # "none": no loss sums, so no loss final (NCHW: the final reduces the bad index only)
    got = _launches_and_syncs(monkeypatch, lambda: ssm.spatial_softmax_with_loss(
        x, y, reduction="none", out=out, layout=layout))
    assert got == (pre + ["SYNC", "sswl_fwd"] if with_out else
                   ["sswl_fwd", "reduce_loss_stats", "SYNC"] if layout == "NCHW" else
                   pre + ["sswl_fwd", "SYNC"])
    # soft targets have no labels to check: never a read, validate=True or not
    t = cudasim.asarray(make_soft_targets(rng, shape, np.float32, layout=layout))
    w = cudasim.asarray(rng.random((2, 3, 4)).astype(np.float32))
    for kw in (dict(), dict(weights=w)):
        got = _launches_and_syncs(monkeypatch, lambda: ssm.spatial_softmax_with_loss_and_grad(
            x, t, out=out, layout=layout, **kw))
        assert "SYNC" not in got and got[-2:] == ["sswl_fwd", "reduce_partials"], kw


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    m = cudasim.RawModule(code="__global__ void k(float* x) {}", name_expressions=["k"])
    with pytest.raises(SimulatorError, match=r"needs a C\+\+17 compiler: none of "
                       r"no-such-c\+\+-compiler was found on PATH"):
        m.get_function("k")((1,), (1,), (cudasim.zeros(1, np.float32),))


def test_unknown_name_expression(module):
    with pytest.raises(SimulatorError, match=r"^name: 'nope' is not one of the module's"):
        module.get_function("nope")


def test_traffic_counts_sectors_per_warp_request(module):
    # the traffic model's controls: coalesced loads use every byte of their sectors,
    # a stride of 32 floats uses 4 bytes of each
    x, y = cudasim.zeros(64 * 32, np.float32), cudasim.zeros(64, np.float32)
    with cudasim.traffic() as log:
        launch(module, "copy_coalesced", x, y)
        launch(module, "copy_strided", x, y)
    coalesced, strided = log
    assert (coalesced.load_requests, coalesced.load_bytes, coalesced.load_sectors) == (2, 256, 8)
    assert (coalesced.store_requests, coalesced.store_sectors) == (2, 8)
    assert coalesced.sector_efficiency == 1.0
    assert (strided.load_requests, strided.load_bytes, strided.load_sectors) == (2, 256, 64)
    assert strided.sector_efficiency == pytest.approx((256 + 256) / (32 * (64 + 8)))


def test_traffic_of_ssm_kernels_is_coalesced(rng):
    # strided channels (NCHW) and rows of 64 classes: at least 90% of every moved sector used
    cases = [((2, 21, 8, 16), "NCHW", (2, 8, 16)), ((256, 64), "NHWC", (256,))]
    for shape, layout, pix in cases:
        x = cudasim.asarray(make_logits(rng, shape, np.float32))
        y = cudasim.asarray(make_labels(rng, pix, shape[1 if layout == "NCHW" else -1]))
        with cudasim.traffic() as log:
            ssm.softmax(x, layout=layout)
            ssm.spatial_softmax_with_loss_and_grad(x, y, layout=layout, validate=False)
        for r in log:
            if r.name.startswith(("softmax", "sswl")):
                assert r.sector_efficiency >= 0.9, (layout, r)


# ---- what the simulator models ---------------------------------------------------------


def test_half_conversions_bit_exact(module, rng):
    n = 1 << 16
    h = np.arange(n, dtype=np.uint16)
    f = np.concatenate([rng.standard_normal(n // 2) * 1e3, rng.standard_normal(n // 2) * 1e-5])
    f = f.astype(np.float32)
    f[:8] = [np.inf, -np.inf, 65504, 65520, 6e-8, 2.9e-8, 3.1e-8, -0.0]  # overflow: inf
    # NaNs, either sign, with payloads: the positive quiet NaN 0x7e00 (cvt: 0x7fff)
    f[8:12] = np.array([0x7fc00000, 0xffc00000, 0x7fd2a000, 0xffe0e000], np.uint32).view(f.dtype)
    d = rng.standard_normal(n) * np.exp(rng.uniform(-20, 12, n))
    d[:4] = [65519.99999, 65520.0, 2.0**-25, 2.0**-25 * (1 + 2.0**-40)]  # double rounding traps
    d[4:7] = np.array([0x7ff8000000000000, 0xfff8000000000000, 0x7ffa5a0000000000],
                      np.uint64).view(d.dtype)
    outs = [cudasim.empty(n, np.float32), cudasim.empty(n, np.float16), cudasim.empty(n, np.float16)]
    launch(module, "half_conversions", cudasim.asarray(h), outs[0], cudasim.asarray(f), outs[1],
           cudasim.asarray(d), outs[2], np.int64(n), threads=256, blocks=64)
    h_to_f, f_to_h, d_to_h = (cudasim.asnumpy(o) for o in outs)
    with np.errstate(over="ignore"):  # 65520 and beyond round to inf, on purpose
        f16, d16 = f.astype(np.float16), d.astype(np.float16)
    finite = ~np.isnan(h.view(np.float16))
    np.testing.assert_array_equal(h_to_f[finite].view(np.uint32),
                                  h.view(np.float16)[finite].astype(np.float32).view(np.uint32))
    assert np.isnan(h_to_f[~finite]).all()
    fin, dfin = ~np.isnan(f), ~np.isnan(d)
    np.testing.assert_array_equal(f_to_h.view(np.uint16)[fin], f16.view(np.uint16)[fin])
    np.testing.assert_array_equal(d_to_h.view(np.uint16)[dfin], d16.view(np.uint16)[dfin])
    assert (f_to_h.view(np.uint16)[~fin] == 0x7e00).all() and (~fin).sum() == 4
    assert (d_to_h.view(np.uint16)[~dfin] == 0x7e00).all() and (~dfin).sum() == 3


def test_bf16_conversions_bit_exact(module, rng):
    # against ml_dtypes: widening exact, narrowing to nearest even (every midpoint between
    # neighbouring bfloat16 values, and the floats either side), NaN to the positive quiet
    # NaN 0x7fc0 (cvt: 0x7fff); doubles rounded once (ml_dtypes rounded them twice,
    # through float, before 0.7)
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    n = 1 << 16
    h = np.arange(n, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        v = h.view(bf16).astype(np.float64)
    v = np.unique(v[np.isfinite(v)])
    mid = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    f = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)),
                        np.nextafter(mid, np.float32(-np.inf))])[:n]
    f[:6] = [np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -0.0]
    f[6] = np.array(0x7fd2a000, np.uint32).view(f.dtype)  # a quiet NaN's payload
    d = rng.standard_normal(n) * np.exp(rng.uniform(-80, 80, n))
    d[:2] = [1 + 2.0**-8 + 2.0**-40, 1 + 2.0**-8]  # float rounds the first onto a midpoint
    d[2:6] = [-(1 + 2.0**-8 + 2.0**-40), 3.3961e38, -3.3963e38, 3.5e38]  # either side of
    # the overflow midpoint (2 - 2**-8) * 2**127 = 3.39617e38, and past float's range;
    # bfloat16 subnormals (below 2**-126, which -ftz=true flushes in float), the half-way
    # tie to 0 at 2**-134 and just above it, zeros, double subnormals, inf, a huge double
    d[6:20] = [1e-39, -1e-39, 2.0**-133, -(2.0**-134), 2.0**-134 * (1 + 2.0**-30),
               1.5 * 2.0**-133, 2.0**-126 * (1 - 2.0**-9), 0.0, -0.0, -5e-324, np.inf, -np.inf,
               1e300, -2.0**-126]
    d[1020:1023] = np.array([0x7ff8000000000000, 0xfff8000000000000, 0x7ffa5a0000000000],
                            np.uint64).view(d.dtype)
    d[20:1020] = rng.uniform(-1, 1, 1000) * 2.0**rng.uniform(-140, -120, 1000)
    outs = [cudasim.empty(n, np.float32), cudasim.empty(n, bf16), cudasim.empty(n, bf16)]
    launch(module, "bf16_conversions", cudasim.asarray(h), outs[0], cudasim.asarray(f), outs[1],
           cudasim.asarray(d), outs[2], np.int64(n), threads=256, blocks=64)
    h_to_f, f_to_h, d_to_h = (cudasim.asnumpy(o) for o in outs)
    np.testing.assert_array_equal(h_to_f.view(np.uint32), h.astype(np.uint32) << 16)
    nan = np.isnan(f)
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(f_to_h.view(np.uint16)[~nan],
                                      f[~nan].astype(bf16).view(np.uint16))
    dfin = ~np.isnan(d)
    np.testing.assert_array_equal(d_to_h.view(np.uint16)[dfin],
                                  ref.bf16_bits_rounded_once(d[dfin]))
    assert d_to_h.view(np.uint16)[0] == 0x3f81 and d_to_h.view(np.uint16)[1] == 0x3f80
    assert (f_to_h.view(np.uint16)[nan] == 0x7fc0).all() and nan.sum() == 3
    assert (d_to_h.view(np.uint16)[1020:1023] == 0x7fc0).all()


def test_float_denormals_flush_to_zero():
    # -ftz=true: exp(-100) = 3.7e-44 is a float32 denormal, flushed in the float kernels;
    # float64 keeps it (and so does the CPU in float32)
    x = np.array([[0.0, -100.0]])
    p32 = cudasim.asnumpy(ssm.softmax(cudasim.asarray(x.astype(np.float32))))
    assert p32[0, 1] == 0.0 and ssm.softmax(x.astype(np.float32))[0, 1] > 0
    p64 = cudasim.asnumpy(ssm.softmax(cudasim.asarray(x)))
    assert p64[0, 1] == pytest.approx(np.exp(-100.0), rel=1e-12)


@pytest.mark.parametrize("mode", ["fast", "off"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_contraction_on_and_off(rng, mode, dtype):
    # nvcc contracts a*b+c to an FMA by default; results must be right either way
    x = make_logits(rng, (2, 21, 5, 7), dtype)
    y = make_labels(rng, (2, 5, 7), 21, np.int64)
    w = make_weights(rng, (2, 5, 7), dtype)
    opts = {"label_smoothing": 0.1, "class_weights": np.linspace(0.5, 2, 21)}
    with cudasim.fp_contract(mode):
        loss, grad, prob = ssm.spatial_softmax_with_loss_and_grad(
            cudasim.asarray(x), cudasim.asarray(y), cudasim.asarray(w), return_prob=True, **opts)
        lp = ssm.log_softmax(cudasim.asarray(x))
    closs, cgrad, cprob = ssm.spatial_softmax_with_loss_and_grad(x, y, w, return_prob=True, **opts)
    assert_close(cudasim.asnumpy(loss), closs, dtype, scale=10, factor=8)
    assert_close(cudasim.asnumpy(grad), cgrad, dtype, scale=np.abs(cgrad).max(), factor=8)
    assert_close(cudasim.asnumpy(prob), cprob, dtype, scale=1e-6, factor=8)
    assert_close(cudasim.asnumpy(lp), ssm.log_softmax(x), dtype, scale=10, factor=8)


def test_launches_on_the_current_stream(rng):
    x = cudasim.asarray(make_logits(rng, (2, 5, 3, 4), np.float32))
    y = cudasim.asarray(make_labels(rng, (2, 3, 4), 5, np.int32))
    stream = cudasim.Stream(non_blocking=True)
    with cudasim.record_launches() as log:
        with stream:
            ssm.spatial_softmax_with_loss_and_grad(x, y, validate=False)
            ssm.softmax(x)
        ssm.log_softmax(x)
    assert len(log) >= 4
    assert all(launch.stream is stream for launch in log[:-1])
    assert log[-1].stream is cudasim.Stream.null and log[-1].name == "softmax_fwd<float>"


def test_simulated_arrays_behave_like_cupy_arrays(rng):
    a = cudasim.asarray(np.arange(12.0).reshape(3, 4))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError, match="cannot be combined with a cudasim.ndarray"):
        a + np.ones(4)
    v = a[:, 1]
    assert not v.flags.c_contiguous and v.data.ptr == a.data.ptr + 8
    v[...] = -1.0
    assert cudasim.asnumpy(a)[:, 1].tolist() == [-1.0] * 3
    assert type(a.sum()) is cudasim.ndarray and float(a.sum()) == 66 - 1 - 5 - 9 - 3
    with pytest.raises(TypeError, match=r"^x: a numpy.ndarray on the host cannot be mixed with "
                       r"out, a ssm.testing.cudasim.ndarray"):
        ssm.softmax(np.ones((2, 3)), out=cudasim.ones((2, 3)))


def test_processes_sharing_the_cache_build_a_library_once(tmp_path, monkeypatch):
    # pytest-xdist workers share one cache: a library that several need at once is compiled
    # by one of them while the others wait for it (a file lock per library; flock treats
    # each open() apart, so threads of one process stand in for the processes here)
    from concurrent.futures import ThreadPoolExecutor

    from ssm.testing.cudasim import _module

    monkeypatch.setenv("SSM_CUDASIM_CACHE", str(tmp_path))
    code = "__global__ void fill(float* out) { out[threadIdx.x] = 1.0f; }"
    compiled = []
    real = _module._compile

    def counted(*args):
        compiled.append(args[-1])
        real(*args)

    monkeypatch.setattr(_module, "_compile", counted)
    with ThreadPoolExecutor(4) as pool:
        libraries = list(pool.map(lambda _: _module.build(code, ["fill"]), range(4)))
    assert len(compiled) == 1, compiled
    assert all(list(lib.kernels) == ["fill"] for lib in libraries)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(compiled[0]),
                                                   os.path.basename(compiled[0]) + ".lock"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_nan_outputs_are_numpys_nan(rng, dtype):
    """A NaN output of half logits is the positive quiet NaN (0x7e00, 0x7fc0: NumPy's and
    ml_dtypes' np.nan; PTX's cvt alone gives 0x7fff), whatever NaN the arithmetic made:
    the probabilities, gradient and loss map of a pixel with a NaN logit and of one whose
    logits are a negative NaN with a payload; where the CPU's NaN comes from an np.nan
    logit, its bits are the same."""
    nan_bits = 0x7e00
    if dtype == "bfloat16":
        import ml_dtypes
        dtype, nan_bits = ml_dtypes.bfloat16, 0x7fc0
    x = make_logits(rng, (2, 5, 3, 4), np.float32)
    x[0, 1, 0, 0] = np.nan
    x[1, :, 2, 3] = np.array([0xffd2a000] * 5, np.uint32).view(np.float32)
    x = x.astype(dtype)
    y = make_labels(rng, (2, 3, 4), 5, np.int64)
    cpu = [ssm.softmax(x), *ssm.spatial_softmax_with_loss_and_grad(x, y, reduction="none")]
    gx, gy = cudasim.asarray(x), cudasim.asarray(y)
    gpu = [cudasim.asnumpy(r) for r in
           (ssm.softmax(gx), *ssm.spatial_softmax_with_loss_and_grad(gx, gy, reduction="none"))]
    for c, g in zip(cpu, gpu):
        nan = np.isnan(c.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(g.astype(np.float32)), nan)
        assert (g.view(np.uint16)[nan] == nan_bits).all()
        at = (0, 1, 0, 0) if c.ndim == 4 else (0, 0, 0)  # the np.nan logit's pixel
        assert c[at].view(np.uint16) == nan_bits


def test_host_scalar_d_loss_with_device_arrays(rng):
    # a 0-d NumPy d_loss is a number (the CPU takes it too); a host map is still refused
    x = cudasim.asarray(make_logits(rng, (2, 5, 3, 4), np.float32))
    y = cudasim.asarray(make_labels(rng, (2, 3, 4), 5, np.int32))
    for f in (ssm.spatial_softmax_with_loss_and_grad, ssm.spatial_softmax_with_loss_grad):
        a = f(x, y, d_loss=np.array(2.5, np.float32))
        b = f(x, y, d_loss=2.5)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert cudasim.asnumpy(u).tobytes() == cudasim.asnumpy(v).tobytes()
    with pytest.raises(TypeError, match=r"^d_loss: a numpy.ndarray on the host cannot be mixed"):
        ssm.spatial_softmax_with_loss_grad(x, y, d_loss=np.ones((2, 3, 4), np.float32),
                                           reduction="none")
