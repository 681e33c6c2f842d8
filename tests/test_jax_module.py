"""ssm.jax: custom-VJP functions under jit, grad and vmap, against plain JAX (float32)."""

import numpy as np
import pytest

import _reference as ref
from conftest import (REDUCTIONS, make_class_weights, make_labels, make_lens, make_logits,
                      make_soft_targets, make_weights, require_module)

jax = require_module("jax", "jax")
jnp = jax.numpy
sj = require_module("jax", "ssm.jax")

SHAPE, PIX, C = (2, 5, 3, 4), (2, 3, 4), 5


def _plain_jax(x, y, ignore_index=-1):
    """The integer-label "mean" loss written with jax.nn (optax's rule plus ignore_index)."""
    logp = jax.nn.log_softmax(x, axis=1)
    keep = y != ignore_index
    picked = jnp.take_along_axis(logp, jnp.where(keep, y, 0)[:, None], axis=1)[:, 0]
    return -jnp.sum(jnp.where(keep, picked, 0.0)) / jnp.maximum(keep.sum(), 1)


def test_loss_and_grad_match_plain_jax(rng):
    x = jnp.asarray(make_logits(rng, SHAPE, np.float32))
    y = jnp.asarray(make_labels(rng, PIX, C, np.int32))
    loss, g = jax.jit(jax.value_and_grad(sj.cross_entropy))(x, y)
    want, want_g = jax.value_and_grad(_plain_jax)(x, y)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
    assert float(sj.cross_entropy(x, y)) == float(loss)  # without grad: forward only


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "probs"])
def test_every_option_against_the_reference(rng, reduction, soft):
    x = make_logits(rng, SHAPE, np.float32)
    t = make_soft_targets(rng, SHAPE, np.float32) if soft else make_labels(rng, PIX, C, np.int64)
    w = make_weights(rng, PIX, np.float32)
    opts = dict(class_weights=make_class_weights(rng, C), label_smoothing=0.1,
                lens=None if soft else make_lens(rng, C), reduction=reduction)
    d_loss = rng.random(PIX).astype(np.float32) if reduction == "none" else np.float32(0.7)
    prob, want = ref.sswl_loss(x, t, w, **opts)
    want_g = ref.sswl_grad(prob, t, w, d_loss, **opts)

    def f(a):
        return sj.cross_entropy(a, jnp.asarray(t), jnp.asarray(w), **opts)

    loss, vjp = jax.vjp(jax.jit(f), jnp.asarray(x))
    (g,) = vjp(jnp.asarray(d_loss))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-6)


def test_channels_last_and_vmap(rng):
    x = make_logits(rng, SHAPE, np.float32)
    y = make_labels(rng, PIX, C, np.int32)
    nhwc = jnp.asarray(np.moveaxis(x, 1, -1))
    g_nchw = jax.grad(lambda a: sj.cross_entropy(a, y, reduction="none").sum())(jnp.asarray(x))
    g_nhwc = jax.grad(lambda a: sj.cross_entropy(a, y, reduction="none",
                                                 layout="NHWC").sum())(nhwc)
    np.testing.assert_allclose(np.moveaxis(np.asarray(g_nhwc), -1, 1), g_nchw, rtol=1e-6)
    per_image = jax.vmap(lambda a, b: sj.cross_entropy(a[None], b[None], reduction="sum"))(
        jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(per_image.sum(), sj.cross_entropy(x, y, reduction="sum"),
                               rtol=1e-6)


def test_softmax_and_log_softmax(rng):
    x = jnp.asarray(make_logits(rng, SHAPE, np.float32))
    d = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    for ours, theirs in ((sj.softmax, jax.nn.softmax), (sj.log_softmax, jax.nn.log_softmax)):
        np.testing.assert_allclose(jax.jit(ours)(x), theirs(x, axis=1), rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda a: (ours(a) * d).sum())(x)
        want = jax.grad(lambda a: (theirs(a, axis=1) * d).sum())(x)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_training_loop_matches_plain_jax(rng):
    # 20 SGD steps of a 1x1-convolution head: the same losses with either loss function.
    feats = jnp.asarray(make_logits(rng, (4, 8, 16, 16), np.float32))
    y = jnp.asarray(make_labels(rng, (4, 16, 16), 6, np.int32))
    w0 = jnp.asarray(0.1 * rng.standard_normal((6, 8)).astype(np.float32))
    losses = {}
    for name, loss_fn in (("jax", _plain_jax), ("ssm", sj.cross_entropy)):
        @jax.jit
        def step(w, loss_fn=loss_fn):
            loss, g = jax.value_and_grad(
                lambda w: loss_fn(jnp.einsum("oc,nchw->nohw", w, feats), y))(w)
            return w - 0.5 * g, loss
        w, losses[name] = w0, []
        for _ in range(20):
            w, loss = step(w)
            losses[name].append(float(loss))
    assert losses["jax"][-1] < losses["jax"][0]  # it learns (random labels: a little)
    np.testing.assert_allclose(losses["ssm"], losses["jax"], rtol=1e-5)


def test_pure_callback_fallback(rng, monkeypatch):
    # JAX without buffer_callback (or a non-CPU backend): pure_callback, the same results
    x = jnp.asarray(make_logits(rng, SHAPE, np.float32))
    y = jnp.asarray(make_labels(rng, PIX, C, np.int32))
    d = jnp.asarray(rng.random(PIX).astype(np.float32))

    def run():
        loss, vjp = jax.vjp(lambda a: sj.cross_entropy(a, y, reduction="none"), x)
        g_mean = jax.jit(jax.grad(lambda a: 3.0 * sj.cross_entropy(a, y)))(x)
        return loss, vjp(d)[0], g_mean, jax.grad(lambda a: (sj.softmax(a) * x).sum())(x)

    fast = run()
    monkeypatch.setattr(sj, "_buffer_callback", None)
    for got, want in zip(run(), fast):
        np.testing.assert_array_equal(got, want)


def test_training_loop_matches_optax(rng):
    # The check: 20 steps of a small segmentation head, optax's SGD, the same
    # losses with ssm.jax.cross_entropy as with optax's integer-label cross-entropy.
    optax = require_module("jax", "optax")
    feats = jnp.asarray(make_logits(rng, (4, 8, 16, 16), np.float32))
    y = jnp.asarray(make_labels(rng, (4, 16, 16), 6, np.int32, ignore_frac=0))

    def optax_loss(logits, t):  # optax's loss is over the last axis
        return optax.softmax_cross_entropy_with_integer_labels(
            jnp.moveaxis(logits, 1, -1), t).mean()

    params0 = {"w": jnp.asarray(0.3 * rng.standard_normal((6, 8)).astype(np.float32)),
               "b": jnp.zeros((6,), jnp.float32)}
    losses = {}
    for name, loss_fn in (("optax", optax_loss), ("ssm", sj.cross_entropy)):
        opt = optax.sgd(0.5, momentum=0.9)

        @jax.jit
        def step(params, state, loss_fn=loss_fn, opt=opt):
            def f(p):
                logits = jnp.einsum("oc,nchw->nohw", p["w"], feats) + p["b"][:, None, None]
                return loss_fn(logits, y)
            loss, g = jax.value_and_grad(f)(params)
            updates, state = opt.update(g, state)
            return optax.apply_updates(params, updates), state, loss

        params, state, losses[name] = params0, opt.init(params0), []
        for _ in range(20):
            params, state, loss = step(params, state)
            losses[name].append(float(loss))
    assert losses["optax"][-1] < losses["optax"][0]
    np.testing.assert_allclose(losses["ssm"], losses["optax"], rtol=1e-5)


def test_xla_gradient_blocks_are_advised_huge_pages(rng, monkeypatch):
    # XLA allocates each output afresh; ssm advises huge pages on the ones it writes
    # (ssm/_pages.py), the gradient included, before writing them.
    seen = []
    monkeypatch.setattr(sj, "advise_huge", lambda a: seen.append((a.shape, a.dtype)))
    x = jnp.asarray(make_logits(rng, SHAPE, np.float32))
    y = jnp.asarray(make_labels(rng, PIX, C, np.int32))
    jax.block_until_ready(jax.jit(jax.value_and_grad(sj.cross_entropy))(x, y))
    if sj._buffer_callback is not None and jax.default_backend() == "cpu":
        assert (SHAPE, np.float32) in seen


def test_advise_huge_marks_the_mapping():
    # Linux records the advice as the "hg" flag of the mapping in /proc/self/smaps.
    import mmap

    from ssm import _pages
    block = np.frombuffer(mmap.mmap(-1, 2 * _pages.HUGE_BYTES, flags=mmap.MAP_PRIVATE), np.uint8)
    assert not _pages.advise_huge(block[:_pages.HUGE_BYTES - 1])  # small: left alone
    if not _pages.advise_huge(block[1:]):  # not Linux, or no THP in this kernel
        pytest.skip("madvise(MADV_HUGEPAGE) is not available here")
    start = block.ctypes.data
    with open("/proc/self/smaps") as f:
        text = f.read()
    for entry in text.split("\n")[:-1]:
        if "-" in entry.split(" ")[0] and ":" not in entry.split(" ")[0]:
            lo, hi = (int(v, 16) for v in entry.split(" ")[0].split("-"))
            inside = lo <= start + mmap.PAGESIZE < hi
        elif entry.startswith("VmFlags:") and inside:
            assert " hg" in entry
            return
    pytest.fail("the block's mapping was not found in /proc/self/smaps")


def test_errors_when_traced_with_ssms_messages(rng):
    # Shapes, dtypes and options are checked when the function is traced, with ssm's own
    # errors (inside the callback JAX would report each as an INTERNAL runtime error)
    import ssm
    x = make_logits(rng, (2, 5, 3, 4), np.float32)
    y = make_labels(rng, (2, 3, 4), 5, np.int32)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    cases = [((x, y), dict(reduction="avg")), ((x, y), dict(layout="CHW")),
             ((x, y), dict(ignore_index=1.5)), ((x, y.astype(np.int16)), {}),
             ((x.astype(np.int32), y), {}), ((x, y[:1]), {}),
             ((x, y, np.ones((2, 3, 4), np.float16)), {}),
             ((x, y, np.ones((2, 3), np.float32)), {})]
    for args, kw in cases:
        with pytest.raises((TypeError, ValueError)) as want:
            ssm.cross_entropy(*args, **kw)
        for f in (sj.cross_entropy, jax.jit(lambda *a, kw=kw: sj.cross_entropy(*a, **kw))):
            with pytest.raises(type(want.value)) as got:
                f(*map(jnp.asarray, args), **(kw if f is sj.cross_entropy else {}))
            assert str(got.value) == str(want.value), (args, kw)
    with pytest.raises(ValueError, match=r"^layout: 'CHW' is not one of"):
        sj.log_softmax(xj, layout="CHW")
    # nested lists, as JAX's own functions take them
    assert float(sj.cross_entropy(x.tolist(), y.tolist())) == float(sj.cross_entropy(xj, yj))
    np.testing.assert_array_equal(np.asarray(sj.softmax(x.tolist())), np.asarray(sj.softmax(xj)))
    # class weights as a list or tuple, as ssm takes them
    cw = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert float(sj.cross_entropy(xj, yj, class_weights=cw)) == \
        float(ssm.cross_entropy(x, y, class_weights=cw))
    g = jax.grad(lambda a: sj.cross_entropy(a, yj, class_weights=tuple(cw)))(xj)
    np.testing.assert_array_equal(
        np.asarray(g), ssm.spatial_softmax_with_loss_and_grad(x, y, class_weights=cw)[1])


@pytest.mark.parametrize("fallback", [False, True])
def test_bfloat16(rng, monkeypatch, fallback):
    # bfloat16 buffers reach ssm relabelled for NumPy (DLPack's kDLBfloat): the same bits
    # as ssm's own bfloat16 results, value and gradient, through either callback
    import ml_dtypes
    import ssm
    if fallback:
        monkeypatch.setattr(sj, "_buffer_callback", None)
    x = make_logits(rng, SHAPE, np.float32).astype(ml_dtypes.bfloat16)
    y = make_labels(rng, PIX, C, np.int32)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    loss, grad = jax.value_and_grad(lambda a: sj.cross_entropy(a, yj))(xj)
    want_loss, want_grad = ssm.spatial_softmax_with_loss_and_grad(x, y)
    assert loss.dtype == grad.dtype == jnp.bfloat16
    assert np.asarray(loss).view(np.uint16) == np.asarray(want_loss).view(np.uint16)
    np.testing.assert_array_equal(np.asarray(grad).view(np.uint16), want_grad.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(sj.softmax(xj)).view(np.uint16),
                                  ssm.softmax(x).view(np.uint16))


def test_no_gradient_but_the_logits_is_an_error(rng):
    # a gradient with respect to the target, the weights, class_weights or lens would be
    # JAX's zero (no VJP for them): a ValueError when traced, naming the argument; the
    # same arguments under stop_gradient, or not differentiated, are fine
    x = jnp.asarray(make_logits(rng, (2, 3, 4, 5), np.float32))
    y = jnp.asarray(make_labels(rng, (2, 4, 5), 3))
    w = jnp.ones((2, 4, 5), jnp.float32)
    cases = [("weights", lambda a: sj.cross_entropy(x, y, a, reduction="sum"), w),
             ("target", lambda a: sj.cross_entropy(x, a), jax.nn.softmax(x, 1)),
             ("class_weights", lambda a: sj.cross_entropy(x, y, class_weights=a), jnp.ones(3)),
             ("lens", lambda a: sj.cross_entropy(x, y, lens=a), jnp.eye(3))]
    for name, f, arg in cases:
        with pytest.raises(ValueError, match=rf"^{name}: ssm.jax.cross_entropy has a gradient "
                                             rf"with respect to the logits only"):
            jax.grad(f)(arg)
        with pytest.raises(ValueError, match=rf"^{name}: "):
            jax.jit(jax.grad(f))(arg)
    g, gw = jax.grad(lambda a, b: sj.cross_entropy(a, y, jax.lax.stop_gradient(b)),
                     argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(np.asarray(gw), 0)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(
        lambda a: sj.cross_entropy(a, y, w))(x)))


def test_bad_label_is_a_value_error_outside_jit(rng):
    # outside jit the labels are values: checked before the callback, ssm's ValueError;
    # under jit only JAX's runtime error can carry it (ssm's message in its text)
    x = jnp.asarray(make_logits(rng, (2, 3, 4, 5), np.float32))
    y = make_labels(rng, (2, 4, 5), 3)
    y[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"label 7 at index \(1, 2, 3\)"):
        sj.cross_entropy(x, jnp.asarray(y))
    with pytest.raises(ValueError, match=r"label 7 at index \(1, 2, 3\)"):
        jax.grad(lambda a: sj.cross_entropy(a, jnp.asarray(y)))(x)
    with pytest.raises(Exception, match=r"label 7 at index \(1, 2, 3\)"):
        jax.jit(sj.cross_entropy)(x, jnp.asarray(y)).block_until_ready()
    y[1, 2, 3] = -1  # ignore_index: fine
    assert np.isfinite(float(sj.cross_entropy(x, jnp.asarray(y))))
