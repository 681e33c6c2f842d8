"""ssm on Dask arrays: the public functions, lazily, over chunks (``pip install "ssm[dask]"``).

``ssm.dask.spatial_softmax_with_loss_and_grad(x, y, ...)`` and the others take Dask arrays
(or NumPy ones, wrapped as one chunk) with NumPy or CuPy chunks, have the options and
defaults of the ``ssm`` functions (no ``out=``), and return Dask arrays: the loss as a
0-d array (or the loss map), the gradient and probabilities with the logits' chunks.
Nothing is computed until you ask (``dask.compute``, ``.compute()``, ``.persist()``).

Two paths, chosen by the chunks of the class axis:

* **One chunk along C** (chunks split N and the spatial axes in any way): each chunk is one
  call of ssm's kernels. The "mean" is exact: the graph runs the label pre-pass of every
  chunk (``ssm.loss_normalizer``'s, which also checks the labels), adds the chunks'
  normalisers in chunk order into the global one, then runs every chunk's fused pass with
  that divisor, as the single call hands its own to the kernel, and adds the chunks'
  float64 loss sums in chunk order. A pixel's gradient depends only on that pixel and
  ``d_loss / divisor``, so the gradient is the single call's whenever the global
  normaliser is (always for unweighted labels and for "sum", "batch" and "none": a count
  or no normaliser; with float weights the two float64 sums differ only in their order,
  a relative ``k * 2**-53`` at most for ``k`` partial sums), bit for bit in float32 and
  float64, and so are the probabilities, softmax, log-softmax and the loss map
  (``reduction="none"``): which pixels fall in a kernel loop's vector body or its scalar
  remainder depends on the chunk's extent, and the kernels' exp and log are inlined
  functions with the same bits in both. On the GPU every thread runs the same exp and
  log, so the same holds there, except for a chunk one pixel wide per image with C > 4:
  its (n, C, 1) view takes the contiguous-row kernel shape (a warp per pixel, the class
  sums in another order), a few ulps from the single call's (seen on the simulator; the
  CPU has no such switch). The reduced loss adds the same float64 per-pixel losses
  ``l_p`` (bit for bit the single call's) in another order: the tiles' and chunks'
  partial sums group them differently. Each order's sum of ``n`` pixels is within
  ``(n - 1) * 2**-53 * sum_p |l_p|`` of the exact sum, so the two are at most
  ``2 * (n - 1) * 2**-53 * sum_p |l_p|`` apart, times the divisor (1 for "sum", ``1 / N``
  for "batch", ``1 / normaliser`` for "mean", whose float64 normaliser may differ as
  above), before the one final rounding to the logits' dtype. In float32 that gap is
  below a float32 ulp of the loss for any ``n < 2**28`` whose ``l_p`` have one sign
  (the cross-entropy's are >= 0), so the two losses are the same or one ulp apart. For
  a given chunking every result is bit-identical run to run (a fixed graph, sums in
  chunk order, no atomics).
* **C split over several chunks** (vocabulary-sized class counts, Megatron-LM's
  vocabulary-parallel cross-entropy): an exact two-pass log-sum-exp. Pass one reduces
  every chunk to its per-pixel ``lse_j = m_j + log(sum exp(x - m_j))`` in float64 and
  combines them (``M + log(sum_j exp(lse_j - M))``); pass two computes each chunk's
  probabilities, loss terms and gradient from the global per-pixel log-sum-exp. ssm has
  no kernel for this: it is written in Dask array operations (NumPy or CuPy per chunk),
  in float64, and matches the single call to float tolerance. The normaliser and the
  label check are ssm's label pre-pass, as above.

Cost: per chunk, the fused pass and one task per output read from it (the gradient, the
loss's float64 sum; the backward pass alone is one task), and one label pre-pass task per
``LABEL_PASS_GROUP`` chunks (fewer where their labels are large). On a
``dask.distributed`` cluster every task costs the scheduler and a worker a round trip
(about 1 ms by Dask's documentation; several ms on a loaded 2-core machine), so chunks
should be large, as Dask's best practices advise for any graph (tens to a hundred MB: a
256 x 256 image of 21 classes in float32 is 5.5 MB): then the chunks' passes outweigh it.
``ssm-bench --dask`` measures it.

Softmax over positions (``spatial_softmax``, ``soft_argmax``, their gradients,
``spatial_expectation``): a map is one (n, c) row over all its positions, so the spatial
axes are made one chunk and each block of N and C is one call, with the same bits as the
single call; the temperature gradient's per-map float64 terms are gathered from every block
and added as the single call adds them.

A bad label in any chunk (``validate=True``) raises the single call's ``ValueError``,
naming the label's index in the whole array (the lowest flat index wins), when the result
is computed: every output depends on the label check.
"""
from __future__ import annotations

import functools
import operator

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:
    raise ImportError(f"ssm.dask needs Dask, which is not importable ({exc}); install it with "
                      "pip install 'ssm[dask]'") from exc

from . import _positions
from . import _threads
from . import _validation as V
from ._api import label_pass
from ._codes import LABEL_KINDS, Op, Target
from ._distributed import normalizer_call, shard_pass

__all__ = [
    "cross_entropy",
    "log_softmax",
    "loss_normalizer",
    "soft_argmax",
    "soft_argmax_grad",
    "softmax",
    "softmax_grad",
    "spatial_expectation",
    "spatial_softmax",
    "spatial_softmax_grad",
    "spatial_softmax_with_loss",
    "spatial_softmax_with_loss_and_grad",
    "spatial_softmax_with_loss_grad",
]

# Chunks per label pre-pass task: up to LABEL_PASS_GROUP of them, as long as their
# labels and weights take LABEL_PASS_BYTES at most (one chunk at least). Every task costs
# the distributed scheduler and a worker a round trip (about 1 ms, more on a loaded
# machine: more than the pre-pass of a small chunk of labels), but the group's task reads
# every chunk of the group, which a cluster may have to move to one worker: small chunks
# of labels are grouped, large ones are not.
LABEL_PASS_GROUP = 8
LABEL_PASS_BYTES = 4 << 20


# ---- arguments ---------------------------------------------------------------------

def _as_dask(a, name):
    if a is None or isinstance(a, da.Array):
        return a
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected a Dask array (or a NumPy or CuPy array); "
                        f"got {V.type_name(a)}")
    return da.from_array(a, chunks=a.shape or (), asarray=False)


def _check_known_shape(a, name):
    """A Dask array whose chunk sizes are unknown (after boolean indexing) has NaN in its
    shape: say so, and how to learn them."""
    if any(n != n for n in a.shape):
        raise ValueError(f"{name}: shape {a.shape} has unknown chunk sizes (NaN); expected "
                         f"known ones: call {name}.compute_chunk_sizes() first")


def _class_axis(ndim, layout):
    return 1 if layout == "NCHW" else ndim - 1


def _meta(a):
    return a._meta


class _Geom:
    """The logits' shape and chunks seen per pixel: class axis, pixel shape and chunks."""

    def __init__(self, x, name, layout):
        self.layout = V.check_choice(layout, "layout", V.LAYOUTS)
        if not isinstance(x, da.Array):
            raise TypeError(f"{name}: expected a Dask array; got {V.type_name(x)}")
        V.check_float_dtype(_meta(x), name)
        _check_known_shape(x, name)
        self.g = V.geometry(x, name, self.layout)  # reads the shape only
        self.cax = _class_axis(x.ndim, self.layout)
        self.chunks = x.chunks
        self.pixel_chunks = x.chunks[:self.cax] + x.chunks[self.cax + 1:]
        self.sharded = len(x.chunks[self.cax]) > 1
        self.dtype = x.dtype

    @property
    def C(self):
        return self.g.C


def _check_target(y, G, x, name):
    """Labels or soft targets, rechunked to x's pixel chunks (x's chunks for soft targets);
    the eager checks of shape and dtype (the chunks' calls check the rest)."""
    g = G.g
    _check_known_shape(y, "target")
    if y.dtype in LABEL_KINDS and y.shape == g.pixel_shape:
        return y.rechunk(G.pixel_chunks), LABEL_KINDS[y.dtype]
    if y.dtype.kind != "f" and y.dtype not in LABEL_KINDS:
        raise TypeError(f"target: dtype {y.dtype} is not supported; expected integer labels "
                        f"({', '.join(map(str, LABEL_KINDS))}) of shape {g.pixel_shape}, or "
                        f"soft targets of {name}'s shape {g.shape} and dtype {x.dtype}")
    if y.dtype.kind == "f" and y.shape == g.shape:
        if y.dtype != x.dtype:
            raise TypeError(f"target: soft targets of dtype {y.dtype} differ from "
                            f"{name}'s dtype {x.dtype}")
        return y.rechunk(G.chunks), Target.SOFT
    raise ValueError(f"target: a {y.dtype} array of shape {y.shape} is neither labels "
                     f"({', '.join(map(str, LABEL_KINDS))}) of shape {g.pixel_shape} nor soft "
                     f"targets of {name}'s shape {g.shape} and dtype {x.dtype}")


def _check_pixel_map(a, G, name):
    if a is None:
        return None
    if a.dtype != G.dtype:
        raise TypeError(f"{name}: dtype {a.dtype} differs from the logits' {G.dtype}")
    if a.shape != G.g.pixel_shape:
        raise ValueError(f"{name}: shape {a.shape} does not match the logits; expected "
                         f"{G.g.pixel_shape}")
    return a.rechunk(G.pixel_chunks)


class _Call:
    """A validated loss call on Dask arrays."""

    def __init__(self, x, x_name, target, weights, d_loss, opts, reduction, validate,
                 threads):
        self.x = _as_dask(x, x_name)
        self.G = G = _Geom(self.x, x_name, opts["layout"])
        self.reduction = V.check_choice(reduction, "reduction", V.REDUCTIONS)
        self.validate = V.check_flag(validate, "validate")
        self.target, self.kind = _check_target(_as_dask(target, "target"), G, self.x, x_name)
        self.weights = _check_pixel_map(_as_dask(weights, "weights"), G, "weights")
        self.opts = dict(opts, class_weights=_host_or_none(opts["class_weights"]),
                         lens=_host_or_none(opts["lens"]))
        # every option checked here, as the single call checks them: the chunks' calls
        # would check some only at compute time, and the class-sharded path (C over
        # several chunks) does not call ssm on the options at all
        for name, check in (("class_weights", V.check_class_weights),
                            ("lens", functools.partial(V.check_lens, kind=self.kind))):
            a = opts[name]  # as given (a Dask array computed), for the single call's message
            check(self.opts[name] if isinstance(a, da.Array) else a, G.C, G.dtype)
        V.check_smoothing(opts["label_smoothing"])
        V.check_ignore_index(opts["ignore_index"])
        V.check_loss(opts["loss"])
        _threads.resolve(threads)
        self.threads = threads
        self.d, self.dmap = 1.0, None
        if isinstance(d_loss, da.Array) and d_loss.ndim == 0:
            raise TypeError("d_loss: a 0-d Dask array is not supported; expected a number "
                            "(compute it first: float(d_loss.compute())), or an array of the "
                            "pixels' shape with reduction='none'")
        if d_loss is not None:
            if isinstance(d_loss, da.Array) or (hasattr(d_loss, "shape") and d_loss.size > 1):
                if self.reduction != "none":
                    raise ValueError(f"d_loss: an array of shape {d_loss.shape} needs "
                                     f"reduction='none'")
                self.dmap = _check_pixel_map(_as_dask(d_loss, "d_loss"), G, "d_loss")
            else:
                self.d = V.check_d_loss(d_loss, self.reduction, G.g, G.dtype)[0]

    @property
    def soft(self):
        return self.kind == Target.SOFT


def _host_or_none(a):
    if a is None:
        return None
    if V.is_device_array(a):
        a = a.get()
    return np.asarray(a)


# ---- graph building ----------------------------------------------------------------

def _pixel_index(idx, cax):
    return idx[:cax] + idx[cax + 1:]


def _offsets(chunks):
    return [tuple(np.cumsum((0,) + c)[:-1].tolist()) for c in chunks]


def _block_stats(y, w, *, C, cax, dtype, block, offset, shape, opts, validate, threads):
    """One pixel block's label pre-pass: (normaliser, first bad label or None), the bad
    label as (flat index in the whole target, value, index tuple). Soft targets (y None)
    count their weights only: a stand-in of their shape is passed."""
    xp = V.array_module(y if y is not None else w)
    full = block[:cax] + (C,) + block[cax:]
    # the logits' shape and dtype, not their values (never read; the simulator has no
    # broadcast_to: an allocation there)
    stand_in = xp.broadcast_to(xp.zeros((), dtype), full) if hasattr(xp, "broadcast_to") \
        else xp.empty(full, dtype)
    if y is None:
        y = xp.zeros(full, dtype)
    L, device = normalizer_call(stand_in, y, w, class_weights=opts["class_weights"],
                                ignore_index=opts["ignore_index"], layout=opts["layout"],
                                validate=validate, threads=threads)
    with device:
        norm, bad = label_pass(L)
    if bad < 0:
        return norm, None
    local = np.unravel_index(bad, block)
    index = tuple(int(i + o) for i, o in zip(local, offset))
    value = int(L.problem.target.reshape(-1)[bad])
    return norm, (int(np.ravel_multi_index(index, shape)), value, index)


def _group_stats(ys, ws, *, blocks, offsets, **kw):
    """The label pre-pass of several pixel blocks in one task: their (normaliser, bad)
    in chunk order."""
    return [_block_stats(y, w, block=b, offset=o, **kw)
            for y, w, b, o in zip(ys, ws, blocks, offsets)]


def _ordered_sum(values):
    """The values added in the given (chunk) order: floats, or 0-d device arrays."""
    return functools.reduce(operator.add, values)


def _combine_stats(groups, *, C, ignore_index, reduction, N, pixels):
    """The global divisor from the blocks' label pre-passes (added in chunk order); the
    lowest bad label raises."""
    stats = [s for g in groups for s in g]
    bads = [b for _, b in stats if b is not None]
    if bads:
        _, value, index = min(bads)
        raise V.label_error(value, index, C, ignore_index)
    if reduction == "mean":
        return float(pixels) if stats is None else _ordered_sum([n for n, _ in stats])
    return float(N) if reduction == "batch" else 1.0


def _constant_divisor(*, reduction, N, pixels):
    return {"mean": float(pixels), "batch": float(N)}.get(reduction, 1.0)


def _finish_loss(totals, divisor, dtype):
    """The reduced loss from the chunks' float64 sums, as the single call's loss_value."""
    total = _ordered_sum(totals)
    if V.is_device_array(total):
        from . import _gpu
        return _gpu.loss_value(total, divisor, dtype)
    from . import _cpu
    return _cpu.loss_value(float(total), float(divisor), dtype)


def _divisor_graph(c: _Call):
    """(layer dict, key, dependencies) of the global divisor: the label pre-pass of every
    pixel block, then their combination (which raises on a bad label)."""
    G = c.G
    name = "ssm-divisor-" + tokenize(c.target, c.weights, G.g.shape, G.dtype, c.reduction,
                                     c.validate, c.opts["class_weights"],
                                     c.opts["ignore_index"], G.layout)
    key = (name,)
    need = (c.reduction == "mean" and not (c.soft and c.weights is None)) or \
        (c.validate and not c.soft)
    kw = dict(reduction=c.reduction, N=G.g.N, pixels=G.g.n_pixels)
    if not need:
        return {key: (functools.partial(_constant_divisor, **kw),)}, key, []
    layer = {}
    stats_name = "ssm-label-pass-" + name[len("ssm-divisor-"):]
    y, w = (None if c.soft else c.target), c.weights
    offs = _offsets(G.pixel_chunks)
    pidxs = list(np.ndindex(*[len(ch) for ch in G.pixel_chunks]))
    skeys = []
    for gi, group in enumerate(_label_groups(pidxs, G.pixel_chunks, y, w)):
        f = functools.partial(
            _group_stats, C=G.C, cax=G.cax, dtype=G.dtype,
            blocks=[tuple(ch[i] for ch, i in zip(G.pixel_chunks, pidx)) for pidx in group],
            offsets=[tuple(o[i] for o, i in zip(offs, pidx)) for pidx in group],
            shape=G.g.pixel_shape, opts=c.opts, validate=c.validate, threads=c.threads)
        skey = (stats_name, gi)
        layer[skey] = (f, [(y.name, *pidx) if y is not None else None for pidx in group],
                       [(w.name, *pidx) if w is not None else None for pidx in group])
        skeys.append(skey)
    layer[key] = (functools.partial(_combine_stats, C=G.C, ignore_index=c.opts["ignore_index"],
                                    **kw), skeys)
    return layer, key, [a for a in (y, w) if a is not None]


def _label_groups(pidxs, pixel_chunks, y, w):
    """The pixel blocks (in chunk order) cut into the label pre-pass's groups: runs of
    LABEL_PASS_GROUP blocks at most whose labels and weights take LABEL_PASS_BYTES at most,
    a block alone where it takes more."""
    per_pixel = sum(a.dtype.itemsize for a in (y, w) if a is not None)
    group, size = [], 0
    for pidx in pidxs:
        nbytes = per_pixel * int(np.prod([ch[i] for ch, i in zip(pixel_chunks, pidx)]))
        if group and (len(group) == LABEL_PASS_GROUP or size + nbytes > LABEL_PASS_BYTES):
            yield group
            group, size = [], 0
        group.append(pidx)
        size += nbytes
    if group:
        yield group


def _array(layer_name, layer, deps, name, chunks, meta):
    graph = HighLevelGraph.from_collections(layer_name, layer, dependencies=deps)
    return da.Array(graph, name, chunks, meta=meta)


def _scalar(graph_layer, key, deps, meta):
    return _array(key[0], graph_layer, deps, key[0], (), meta)


def _block_pass(x, y, w, dmap, divisor, *, op, d, return_prob, loss_map, opts, threads,
                only_out=False, with_prob=True):
    r = shard_pass(op, x, y, w, dmap if dmap is not None else d, divisor=divisor,
                   return_prob=return_prob, loss_map=loss_map, threads=threads,
                   with_prob=with_prob, **opts)
    return r[1] if only_out else r


def _fused(c: _Call, op, return_prob=False, with_prob=True):
    """The chunked path (one chunk along C): (loss, out, prob) as Dask arrays; loss is the
    0-d reduced loss or the loss map, prob None unless asked; out None for SSWL_FWD
    without ``with_prob`` (the loss alone: no probabilities computed or stored)."""
    G, x = c.G, c.x
    layer, dkey, deps = _divisor_graph(c)
    token = tokenize(x, c.target, c.weights, c.dmap, dkey, op, c.d, return_prob, c.opts,
                     c.threads, with_prob)
    pname, oname, prname, tname, lname = (f"ssm-{s}-{token}" for s in
                                          ("pass", "out", "prob", "total", "loss"))
    want_map = c.reduction == "none"
    # one task per chunk where only the output is wanted (the backward pass); else the
    # pass's tuple, picked apart by a getitem per output (the loss's float64 sum too: the
    # task that adds them must not fetch the tuples, which hold the chunks' gradients)
    only_out = op == Op.SSWL_BWD and not return_prob
    f = functools.partial(_block_pass, op=op, d=c.d, return_prob=return_prob,
                          loss_map=want_map, opts=c.opts, threads=c.threads, only_out=only_out,
                          with_prob=with_prob)
    with_out = with_prob or op != Op.SSWL_FWD
    tkeys = []
    for idx in np.ndindex(*x.numblocks):
        pidx = _pixel_index(idx, G.cax)
        ykey = (c.target.name, *(idx if c.soft else pidx))
        wkey = (c.weights.name, *pidx) if c.weights is not None else None
        mkey = (c.dmap.name, *pidx) if c.dmap is not None else None
        task = (f, (x.name, *idx), ykey, wkey, mkey, dkey)
        if only_out:
            layer[(oname, *idx)] = task
            continue
        layer[(pname, *idx)] = task
        if with_out:
            layer[(oname, *idx)] = (operator.getitem, (pname, *idx), 1)
        if return_prob:
            layer[(prname, *idx)] = (operator.getitem, (pname, *idx), 2)
        if want_map:
            layer[(lname, *pidx)] = (operator.getitem, (pname, *idx), 3)
        elif op != Op.SSWL_BWD:
            layer[(tname, *idx)] = (operator.getitem, (pname, *idx), 0)
            tkeys.append((tname, *idx))
    if tkeys:
        layer[(lname,)] = (functools.partial(_finish_loss, dtype=G.dtype), tkeys, dkey)
    deps = [x, c.target] + [a for a in (c.weights, c.dmap) if a is not None] + deps
    deps = list({id(d): d for d in deps}.values())
    graph = _with_outputs(HighLevelGraph.from_collections(pname, layer, dependencies=deps),
                          pname, (oname, prname, tname, lname))
    meta = _meta(x)
    out = da.Array(graph, oname, x.chunks, meta=meta) if with_out else None
    prob = da.Array(graph, prname, x.chunks, meta=meta) if return_prob else None
    if want_map:
        loss = da.Array(graph, lname, G.pixel_chunks, meta=_meta0(meta, G.g.pixel_shape))
    elif op != Op.SSWL_BWD:
        loss = da.Array(graph, lname, (), meta=_meta0(meta))
    else:
        loss = None
    return loss, out, prob


def _with_outputs(graph, pname, names):
    """The graph with the keys of each output name moved out of layer ``pname`` into a
    layer of that name (a Dask array's name must be a layer of its graph); the tasks of
    the output layers may read any key of layer ``pname`` (the passes, the divisor), of
    its dependencies (the inputs) and of the outputs before them."""
    layers, deps = dict(graph.layers), dict(graph.dependencies)
    tasks = dict(layers[pname])
    made = set()
    for name in names:  # a later output may read an earlier one (the loss, the totals)
        mine = {k: v for k, v in tasks.items() if k[0] == name}
        if mine:
            for k in mine:
                del tasks[k]
            layers[name] = mine
            deps[name] = {pname} | set(deps[pname]) | made
            made.add(name)
    layers[pname] = tasks
    return HighLevelGraph(layers, deps)


def _meta0(meta, shape=()):
    xp = V.array_module(meta) if V.is_device_array(meta) else np
    return xp.empty((0,) * len(shape), meta.dtype)


def _divisor_array(c: _Call):
    """The global divisor as a 0-d float64 Dask array (raising on a bad label)."""
    layer, key, deps = _divisor_graph(c)
    graph = HighLevelGraph.from_collections(key[0], layer, dependencies=deps)
    meta = _meta(c.x)
    xp = V.array_module(meta) if V.is_device_array(meta) else np
    return da.Array(graph, key[0], (), meta=xp.empty((), np.float64))


# ---- the class-sharded path (C over several chunks) --------------------------------

def _lse_reduce(a, axis, keepdims=True):
    """Per-pixel log-sum-exp over ``axis`` in float64 (a chunk of logits, or the chunks'
    log-sum-exps): ``m + log(sum exp(a - m))``, -inf where every term is -inf."""
    a = a.astype(np.float64, copy=False)
    m = a.max(axis=axis, keepdims=True)
    finite_m = np.where(np.isneginf(m), 0.0, m)
    r = finite_m + np.log(np.exp(a - finite_m).sum(axis=axis, keepdims=True))
    r = np.where(np.isneginf(m), -np.inf, r)
    return r if keepdims else r.squeeze(axis)


def _lse(x, cax):
    def chunk(a, axis, keepdims):
        return _lse_reduce(a, axis[0] if isinstance(axis, tuple) else axis, keepdims)
    return da.reduction(x, chunk=chunk, combine=chunk, aggregate=chunk, axis=cax,
                        keepdims=True, dtype=np.float64, concatenate=True,
                        meta=_meta(x).astype(np.float64))


def _after(a, gate):
    """``a`` made to depend on the 0-d Dask array ``gate`` (the label check)."""
    ind = tuple(range(a.ndim))
    return da.blockwise(_first, ind, a, ind, gate, (), dtype=a.dtype, meta=_meta(a))


def _first(a, _):
    return a


def _class_view(G, a):
    """A per-pixel Dask array with a length-1 class axis, for broadcasting."""
    return da.expand_dims(a, G.cax)


def _class_vector(G, v, dtype):
    """A length-C NumPy vector shaped to broadcast along the class axis, chunked as x's."""
    shape = [1] * len(G.g.shape)
    shape[G.cax] = G.C
    chunks = tuple((1,) if i != G.cax else G.chunks[G.cax] for i in range(len(shape)))
    return da.from_array(np.asarray(v, dtype).reshape(shape), chunks=chunks)


def _lens_rows(y, lens, cax):
    xp = V.array_module(y)
    rows = xp.asarray(lens)[y]          # (*pixel, C)
    return xp.moveaxis(rows, -1, cax)


def _sharded_target(c: _Call):
    """(a, active, bad, t): the per-class target weights a_c = w cw_c t_c (float64, chunked
    as x), the per-pixel masks of pixels that count and of bad labels, and t."""
    G, y = c.G, c.target
    C, e = G.C, c.opts["label_smoothing"]
    cw = c.opts["class_weights"]
    if c.soft:
        t = y.astype(np.float64)
        active = None
        bad = None
    else:
        yi = y.astype(np.int64)
        ign = c.opts["ignore_index"]
        valid = yi != ign
        inrange = (yi >= 0) & (yi < C)
        active = valid & inrange
        bad = valid & ~inrange
        ys = da.where(active, yi, 0)
        if c.opts["lens"] is not None:
            lens = np.asarray(c.opts["lens"], G.dtype).astype(np.float64)
            t = ys.map_blocks(_lens_rows, lens, G.cax, new_axis=G.cax,
                              chunks=tuple((C,) if i == G.cax else ch
                                           for i, ch in enumerate(G.chunks)),
                              dtype=np.float64, meta=_meta(c.x).astype(np.float64))
            t = t.rechunk(G.chunks)
        else:
            cls = _class_vector(G, np.arange(C), np.int64)
            t = (_class_view(G, ys) == cls).astype(np.float64)
    if e:
        t = float(np.float64(1.0 - e)) * t + e / C
    a = t
    if cw is not None:
        a = a * _class_vector(G, np.asarray(cw, G.dtype), np.float64)
    if c.weights is not None:
        a = a * _class_view(G, c.weights.astype(np.float64))
    if active is not None:
        a = da.where(_class_view(G, active), a, 0.0)
        a = da.where(_class_view(G, bad), np.nan, a)
    return a, active, bad, t


def _quotient(a, b):
    """``a / b``, 0 when ``b`` is 0 (the single call's rule for its gradient scale and loss)."""
    xp = V.array_module(b) if V.is_device_array(b) else np
    b = xp.asarray(b, np.float64)
    return xp.where(b != 0, xp.asarray(a, np.float64) / xp.where(b != 0, b, 1.0), 0.0)


def _sharded(c: _Call, op, return_prob=False):
    """The class-sharded path: (loss, out, prob) as Dask arrays (see the module docstring)."""
    G = c.G
    x64 = c.x.astype(np.float64)
    divisor = _divisor_array(c)
    a, active, bad, t = _sharded_target(c)
    A = a.sum(axis=G.cax, keepdims=True)
    loss = q = None
    if op != Op.SSWL_BWD:
        lse = _lse(c.x, G.cax)
        q = da.exp(x64 - lse)
        lmap = (A * lse).squeeze(G.cax) - (a * x64).sum(axis=G.cax)
        if c.opts["loss"] == "kl":  # + sum_c a_c log t_c, 0 log 0 = 0
            lmap = lmap + da.where(a != 0, a * da.log(da.where(a != 0, t, 1.0)),
                                   0.0).sum(axis=G.cax)
        if active is not None:
            lmap = da.where(active, lmap, 0.0)
            lmap = da.where(bad, np.nan, lmap)
        if c.reduction == "none":
            loss = _after(lmap.astype(G.dtype), divisor)
        else:
            total = lmap.sum()
            loss = da.map_blocks(_quotient, total, divisor, dtype=np.float64,
                                 meta=_meta0(_meta(x64))).astype(G.dtype)
    else:
        q = x64
    out = prob = None
    if op == Op.SSWL_FWD:
        out = _after(q.astype(G.dtype), divisor)
    else:
        g = da.map_blocks(_quotient, c.d, divisor, dtype=np.float64, meta=_meta0(_meta(x64)))
        if c.dmap is not None:
            g = g * _class_view(G, c.dmap.astype(np.float64))
        dx = g * (A * q - a)
        if active is not None:
            dx = da.where(_class_view(G, active | bad), dx, 0.0)
        out = dx.astype(G.dtype).rechunk(G.chunks)
        if return_prob:
            prob = _after(q.astype(G.dtype), divisor)
    return loss, out, prob


# ---- the public functions -----------------------------------------------------------

def _loss(x, x_name, target, weights, d_loss, *, op, return_prob, ignore_index, class_weights,
          lens, label_smoothing, reduction, layout, validate, threads, loss, with_prob=True):
    opts = dict(ignore_index=ignore_index, class_weights=class_weights, lens=lens,
                label_smoothing=label_smoothing, layout=layout, loss=loss)
    c = _Call(x, x_name, target, weights, d_loss, opts, reduction, validate, threads)
    if c.G.sharded:
        return _sharded(c, op, return_prob)
    return _fused(c, op, return_prob, with_prob)


def cross_entropy(logits, target, weights=None, *, ignore_index=-1, class_weights=None,
                  lens=None, label_smoothing=0.0, reduction="mean", layout="NCHW",
                  validate=True, threads=None, loss="cross_entropy"):
    """:func:`ssm.cross_entropy` on Dask arrays: the loss alone, lazily, as a 0-d Dask
    array (the loss map for ``reduction="none"``); the loss of
    :func:`spatial_softmax_with_loss`, bit for bit. With one chunk along C each chunk's
    pass writes no probabilities; with C over several chunks, the two-pass log-sum-exp
    (its probabilities are never asked for, so never computed)."""
    value, _, _ = _loss(logits, "logits", target, weights, None, op=Op.SSWL_FWD,
                        return_prob=False, ignore_index=ignore_index,
                        class_weights=class_weights, lens=lens,
                        label_smoothing=label_smoothing, reduction=reduction, layout=layout,
                        validate=validate, threads=threads, loss=loss, with_prob=False)
    return value


def spatial_softmax_with_loss(logits, target, weights=None, *, ignore_index=-1,
                              class_weights=None, lens=None, label_smoothing=0.0,
                              reduction="mean", layout="NCHW", validate=True, threads=None,
                              loss="cross_entropy"):
    """:func:`ssm.spatial_softmax_with_loss` on Dask arrays: ``(prob, loss)``, lazily.

    ``prob`` has the logits' chunks; ``loss`` is a 0-d Dask array (the loss map for
    ``reduction="none"``). See the module docstring for how the chunks are combined.
    """
    value, prob, _ = _loss(logits, "logits", target, weights, None, op=Op.SSWL_FWD,
                           return_prob=False, ignore_index=ignore_index,
                           class_weights=class_weights, lens=lens,
                           label_smoothing=label_smoothing, reduction=reduction,
                           layout=layout, validate=validate, threads=threads, loss=loss)
    return prob, value


def spatial_softmax_with_loss_grad(prob, target, weights=None, d_loss=1.0, *, ignore_index=-1,
                                   class_weights=None, lens=None, label_smoothing=0.0,
                                   reduction="mean", layout="NCHW", validate=True,
                                   threads=None, loss="cross_entropy"):
    """:func:`ssm.spatial_softmax_with_loss_grad` on Dask arrays: ``dlogits``, lazily,
    scaled by the global divisor. ``d_loss`` is a number, or for ``reduction="none"`` also
    an ``(N, *spatial)`` array (Dask or NumPy)."""
    _, dx, _ = _loss(prob, "prob", target, weights, d_loss, op=Op.SSWL_BWD,
                     return_prob=False, ignore_index=ignore_index,
                     class_weights=class_weights, lens=lens, label_smoothing=label_smoothing,
                     reduction=reduction, layout=layout, validate=validate, threads=threads,
                     loss=loss)
    return dx


def spatial_softmax_with_loss_and_grad(logits, target, weights=None, d_loss=1.0, *,
                                       ignore_index=-1, class_weights=None, lens=None,
                                       label_smoothing=0.0, reduction="mean", layout="NCHW",
                                       validate=True, return_prob=False, threads=None,
                                       loss="cross_entropy"):
    """:func:`ssm.spatial_softmax_with_loss_and_grad` on Dask arrays, lazily.

    Returns ``(loss, dlogits)`` (``+ prob`` with ``return_prob=True``): ``loss`` a 0-d Dask
    array (or the loss map), ``dlogits`` with the logits' chunks. The "mean" divides by the
    normaliser of the whole array, not per chunk.
    """
    return_prob = V.check_flag(return_prob, "return_prob")
    value, dx, prob = _loss(logits, "logits", target, weights, d_loss, op=Op.SSWL_FWD_BWD,
                            return_prob=return_prob, ignore_index=ignore_index,
                            class_weights=class_weights, lens=lens,
                            label_smoothing=label_smoothing, reduction=reduction,
                            layout=layout, validate=validate, threads=threads, loss=loss)
    return (value, dx, prob) if return_prob else (value, dx)


def loss_normalizer(logits, target, weights=None, *, class_weights=None, ignore_index=-1,
                    layout="NCHW", validate=True, threads=None):
    """:func:`ssm.loss_normalizer` of the whole Dask array: a 0-d float64 Dask array, the
    chunks' normalisers added in chunk order (the logits are not read)."""
    opts = dict(ignore_index=ignore_index, class_weights=class_weights, lens=None,
                label_smoothing=0.0, layout=layout, loss="cross_entropy")
    c = _Call(logits, "logits", target, weights, None, opts, "mean", validate, threads)
    norm = _divisor_array(c)
    return norm.map_blocks(_as_float64, dtype=np.float64, meta=_meta(norm))


def _as_float64(a):
    xp = V.array_module(a) if V.is_device_array(a) else np
    return xp.asarray(a, np.float64)


def _softmax_like(x, layout, threads, fn, sharded):
    x = _as_dask(x, "x")
    G = _Geom(x, "x", layout)
    _threads.resolve(threads)
    if G.sharded:
        return sharded(x, G)
    from . import _api
    return x.map_blocks(getattr(_api, fn), layout=G.layout, threads=threads, dtype=x.dtype,
                        meta=_meta(x))


def softmax(x, *, layout="NCHW", threads=None):
    """:func:`ssm.softmax` on a Dask array, lazily (C over several chunks: a two-pass
    log-sum-exp in Dask array operations)."""
    return _softmax_like(x, layout, threads, "softmax",
                         lambda x, G: da.exp(x.astype(np.float64) - _lse(x, G.cax))
                         .astype(x.dtype))


def log_softmax(x, *, layout="NCHW", threads=None):
    """:func:`ssm.log_softmax` on a Dask array, lazily."""
    return _softmax_like(x, layout, threads, "log_softmax",
                         lambda x, G: (x.astype(np.float64) - _lse(x, G.cax)).astype(x.dtype))


def softmax_grad(prob, dprob, *, layout="NCHW", threads=None):
    """:func:`ssm.softmax_grad` on Dask arrays, lazily: ``prob * (dprob - sum_c prob *
    dprob)``."""
    prob = _as_dask(prob, "prob")
    dprob = _as_dask(dprob, "dprob")
    G = _Geom(prob, "prob", layout)
    _threads.resolve(threads)
    if dprob.shape != prob.shape or dprob.dtype != prob.dtype:
        raise ValueError(f"dprob: shape {dprob.shape} and dtype {dprob.dtype} differ from "
                         f"prob's {prob.shape}, {prob.dtype}")
    dprob = dprob.rechunk(prob.chunks)
    if G.sharded:
        p64, d64 = prob.astype(np.float64), dprob.astype(np.float64)
        s = (p64 * d64).sum(axis=G.cax, keepdims=True)
        return (p64 * (d64 - s)).astype(prob.dtype)
    from . import _api
    return da.map_blocks(_api.softmax_grad, prob, dprob, layout=G.layout, threads=threads,
                         dtype=prob.dtype, meta=_meta(prob))


# ---- softmax over positions -------------------------------------------------------------
# A map is one (n, c) row over all its positions, so the spatial axes are made one chunk
# (rechunked if they are not) and every block of N and C is one call of ssm's function
# with its channels' temperatures: the outputs are the single call's bit for bit (a map's
# result depends only on the map). The temperature gradient is one float64 term per map,
# gathered from every block and added as the single call adds them: the same bits too.

def _stand_in(shape, dtype):
    return np.broadcast_to(np.zeros((), dtype), shape)


def _pos_args(x, name, layout, temperature, threads):
    """(x with its spatial axes one chunk, geometry, temperatures (C,), one number?, cax)"""
    x = _as_dask(x, name)
    _check_known_shape(x, name)
    layout = V.check_choice(layout, "layout", V.LAYOUTS)
    V.check_float_dtype(np.zeros((), x.dtype), name)
    geom = V.positions_geometry(_stand_in(x.shape, x.dtype), name, layout)
    t, scalar = V.check_temperature(temperature, geom.C, x.dtype)
    _threads.resolve(threads)
    cax = _class_axis(x.ndim, layout)
    x = x.rechunk({i: -1 for i in range(1, x.ndim) if i != cax})
    return x, geom, t, scalar, cax


def _channel_ranges(chunks):
    (starts,) = _offsets((chunks,))
    return [(a, a + n) for a, n in zip(starts, chunks)]


def _pos_call(block, *others, fn, c0, c1, t, scalar, kwargs):
    temperature = float(t[0]) if scalar else t[c0:c1]
    r = fn(block, *others, temperature=temperature, **kwargs)
    return r if isinstance(r, tuple) else (r,)


def _terms_only(per_map, geom, scalar, dtype):
    return per_map.reshape(geom.N, geom.C)


def _dt_total(terms, *, N, C, scalar, dtype):
    """The temperature gradient from every block's (n, c) float64 terms (a nested list,
    blocks of N then C), added as the single call adds them (_positions._d_temperature),
    on the blocks' device (by way of the host where its module cannot concatenate: the
    simulator's)."""
    first = terms[0][0]
    xp = V.array_module(first) if V.is_device_array(first) else np
    host = not hasattr(xp, "concatenate")
    if host:
        terms = [[xp.asnumpy(t) for t in row] for row in terms]
    cat = np.concatenate if host else xp.concatenate
    per_map = cat([cat(row, axis=1) for row in terms], axis=0)
    geom = type("Maps", (), {"N": N, "C": C})
    total = _positions._d_temperature(per_map.reshape(-1), geom, scalar, np.dtype(dtype))
    return xp.asarray(total) if host and xp is not np else total


def _pos_graph(fn, x, others, cax, t, scalar, kwargs, outs, token, D=None):
    """Dask arrays of ``fn``'s outputs, one call per block of x: ``others`` are (array,
    kind) with kind "map" (x's chunks) or "kp" ((N, C, D) by x's N and C chunks); ``outs``
    the kinds of the call's results in order: "map", "kp" (``D`` wide), "dt" (the
    temperature gradient's terms)."""
    name = f"ssm-pos-{token}"
    names = [f"ssm-pos-out{i}-{token}" for i in range(len(outs))]
    layer = {}
    ranges = _channel_ranges(x.chunks[cax])
    dt_keys = {}
    for idx in np.ndindex(*x.numblocks):
        n, c = idx[0], idx[cax]
        c0, c1 = ranges[c]
        args = [(x.name, *idx)]
        for a, kind in others:
            args.append((a.name, *idx) if kind == "map" else (a.name, n, c, 0))
        f = functools.partial(_pos_call, fn=fn, c0=c0, c1=c1, t=t, scalar=scalar,
                              kwargs=kwargs)
        layer[(name, *idx)] = (f, *args)
        for i, kind in enumerate(outs):
            key = (names[i], *idx) if kind == "map" else (names[i], n, c, 0) if kind == "kp" \
                else (names[i] + "-terms", n, c)
            layer[key] = (operator.getitem, (name, *idx), i)
            if kind == "dt":
                dt_keys[(n, c)] = key
    results = []
    meta = _meta(x)
    for i, kind in enumerate(outs):
        if kind == "dt":
            nn, nc = x.numblocks[0], x.numblocks[cax]
            nested = [[dt_keys[(a, b)] for b in range(nc)] for a in range(nn)]
            layer[(names[i],) if scalar else (names[i], 0)] = (
                functools.partial(_dt_total, N=x.shape[0], C=x.shape[cax], scalar=scalar,
                                  dtype=x.dtype), nested)
    deps = [x] + [a for a, _ in others]
    graph = _with_outputs(HighLevelGraph.from_collections(name, layer, dependencies=deps),
                          name, [n + "-terms" for n in names] + names)
    for i, kind in enumerate(outs):
        if kind == "map":
            results.append(da.Array(graph, names[i], x.chunks, meta=meta))
        elif kind == "kp":
            results.append(da.Array(graph, names[i], (x.chunks[0], x.chunks[cax], (D,)),
                                    meta=_meta0(meta, (0, 0, 0))))
        else:
            results.append(da.Array(graph, names[i], () if scalar else ((x.shape[cax],),),
                                    meta=_meta0(meta, () if scalar else (0,))))
    return results


def _align(a, x, name, kind, cax, D=None):
    """``a`` (x's shape, or (N, C, D) keypoints) as a Dask array chunked as x's blocks."""
    a = _as_dask(a, name)
    if kind == "map":
        return a.rechunk(x.chunks)
    return a.rechunk((x.chunks[0], x.chunks[cax], (D,)))


def spatial_softmax(x, *, temperature=1.0, layout="NCHW", threads=None):
    """:func:`ssm.spatial_softmax` on a Dask array, lazily (the spatial axes one chunk;
    the single call's bits)."""
    x, geom, t, scalar, cax = _pos_args(x, "x", layout, temperature, threads)
    kw = dict(layout=layout, threads=threads)
    token = tokenize(x, t, scalar, "spatial_softmax", kw)
    return _pos_graph(_positions.spatial_softmax, x, [], cax, t, scalar, kw, ["map"],
                      token)[0]


def spatial_softmax_grad(prob, dprob, *, temperature=1.0, layout="NCHW",
                         return_temperature_grad=False, threads=None):
    """:func:`ssm.spatial_softmax_grad` on Dask arrays, lazily: ``dx`` (and the
    temperature's gradient, a 0-d or ``(C,)`` Dask array); the single call's bits."""
    prob, geom, t, scalar, cax = _pos_args(prob, "prob", layout, temperature, threads)
    want = V.check_flag(return_temperature_grad, "return_temperature_grad")
    dprob = _as_dask(dprob, "dprob")
    if dprob.shape != prob.shape:
        raise ValueError(f"dprob: shape {dprob.shape} differs from prob's {prob.shape}")
    if dprob.dtype != prob.dtype:
        raise TypeError(f"dprob: dtype {dprob.dtype} differs from prob's {prob.dtype}")
    dprob = _align(dprob, prob, "dprob", "map", cax)
    def fn(p, dp, temperature):
        return _positions._spatial_softmax_grad(p, dp, temperature, layout, want, None,
                                                threads, _terms_only)

    token = tokenize(prob, dprob, t, scalar, "spatial_softmax_grad", layout, want, threads)
    r = _pos_graph(fn, prob, [(dprob, "map")], cax, t, scalar, {},
                   ["map", "dt"] if want else ["map"], token)
    return tuple(r) if want else r[0]


def soft_argmax(x, *, temperature=1.0, coordinates="normalized", return_variance=False,
                return_prob=False, layout="NCHW", threads=None):
    """:func:`ssm.soft_argmax` on a Dask array, lazily: the keypoints ``(N, C, ndim)``
    (and the variance, the probabilities) as Dask arrays; the single call's bits."""
    x, geom, t, scalar, cax = _pos_args(x, "x", layout, temperature, threads)
    coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
    var = V.check_flag(return_variance, "return_variance")
    prob = V.check_flag(return_prob, "return_prob")
    kw = dict(coordinates=coordinates, return_variance=var, return_prob=prob, layout=layout,
              threads=threads)
    outs = ["kp"] + (["kp"] if var else []) + (["map"] if prob else [])
    token = tokenize(x, t, scalar, "soft_argmax", kw)
    r = _pos_graph(_positions.soft_argmax, x, [], cax, t, scalar, kw, outs, token,
                   D=len(geom.spatial))
    return tuple(r) if len(r) > 1 else r[0]


def soft_argmax_grad(x, d_keypoints, *, temperature=1.0, coordinates="normalized",
                     from_prob=False, return_temperature_grad=False, layout="NCHW",
                     threads=None):
    """:func:`ssm.soft_argmax_grad` on Dask arrays, lazily: ``dx`` (and the temperature's
    gradient); the single call's bits."""
    x, geom, t, scalar, cax = _pos_args(x, "x", layout, temperature, threads)
    coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
    from_prob = V.check_flag(from_prob, "from_prob")
    want = V.check_flag(return_temperature_grad, "return_temperature_grad")
    D = len(geom.spatial)
    dk = _as_dask(d_keypoints, "d_keypoints")
    if dk.shape != (geom.N, geom.C, D):
        raise ValueError(f"d_keypoints: shape {dk.shape}; expected {(geom.N, geom.C, D)}")
    if dk.dtype != x.dtype:
        raise TypeError(f"d_keypoints: dtype {dk.dtype} differs from x's {x.dtype}")
    dk = _align(dk, x, "d_keypoints", "kp", cax, D)
    def fn(a, k, temperature):
        return _positions._soft_argmax_grad(a, k, temperature, coordinates, from_prob, want,
                                            layout, None, threads, _terms_only)

    token = tokenize(x, dk, t, scalar, "soft_argmax_grad", coordinates, from_prob, want,
                     layout, threads)
    r = _pos_graph(fn, x, [(dk, "kp")], cax, t, scalar, {}, ["map", "dt"] if want else ["map"],
                   token)
    return tuple(r) if want else r[0]


def spatial_expectation(prob, grid=None, *, coordinates="normalized", return_variance=False,
                        layout="NCHW", threads=None):
    """:func:`ssm.spatial_expectation` on a Dask array, lazily (``grid``, if given, a NumPy
    array: every block's call reads all of it); the single call's bits."""
    prob, geom, t, scalar, cax = _pos_args(prob, "prob", layout, 1.0, threads)
    coordinates = V.check_choice(coordinates, "coordinates", V.COORDINATES)
    var = V.check_flag(return_variance, "return_variance")
    g = None if grid is None else V.check_grid(grid, geom.spatial)
    D = len(geom.spatial) if g is None else g.shape[0]
    grid_arg = None if grid is None else np.asarray(grid)

    def fn(p, temperature):
        return _positions.spatial_expectation(p, grid_arg, coordinates=coordinates,
                                              return_variance=var, layout=layout,
                                              threads=threads)

    token = tokenize(prob, grid_arg, "spatial_expectation", coordinates, var, layout, threads)
    r = _pos_graph(fn, prob, [], cax, t, scalar, {}, ["kp", "kp"] if var else ["kp"], token,
                   D=D)
    return tuple(r) if var else r[0]
