"""The codes that cross from Python into the kernels, defined once.

``Op`` names the kernel pass a backend runs; ``Target`` names how the target is stored;
``Loss`` names the per-pixel criterion of a loss pass. The CPU backend (ssm/_cpu.pyx) has
the same values as C enums (its ``OP_*`` selectors, the ``SSM_*`` target kinds and loss
kinds of ssm/_kernels.h); ``_cpu.kernel_codes()`` reads them back and tests/test_contract.py
checks them against these. The CUDA kernels take ``Loss`` as an ``int`` argument and no
other code: they are templates on the target's type, and the GPU backend turns an ``Op``
into the kernel and its flags (ssm/_gpu.py, one argument builder per kernel).
"""
from __future__ import annotations

import enum

import numpy as np


class Op(enum.IntEnum):
    """A kernel pass over the logits."""

    SOFTMAX = 0       # prob
    LOG_SOFTMAX = 1   # log-prob
    SOFTMAX_BWD = 2   # dx from prob and dprob
    SSWL_FWD = 3      # prob (unless out is None: the loss alone), the loss (sum and map)
    SSWL_FWD_BWD = 4  # the loss and dlogits in one pass (prob too if asked)
    SSWL_BWD = 5      # dlogits from prob


class PosOp(enum.IntEnum):
    """A kernel pass of softmax over positions (ssm/_positions.py; the C values are the
    SSM_POS_* of ssm/_positions.h)."""

    SOFTMAX = 0      # prob over each map's positions
    SOFTMAX_BWD = 1  # dx from prob and dprob (and the temperature's gradient)
    EXPECT = 2       # expected coordinates (and variances, prob)
    EXPECT_BWD = 3   # dx of the expected coordinates, from x (or prob) and d_keypoints


class Target(enum.IntEnum):
    """How a loss pass's target is stored."""

    NONE = 0  # no target (softmax passes)
    U8 = 1    # integer labels, (N, *spatial)
    I32 = 2
    I64 = 3
    SOFT = 4  # a soft target map of the logits' shape and dtype


class Loss(enum.IntEnum):
    """The per-pixel criterion of a loss pass (the public ``loss=`` option: ``LOSSES``)."""

    CROSS_ENTROPY = 0  # -sum_c a_c log q_c
    KL = 1             # sum_c a_c (log t_c - log q_c), 0 log 0 = 0: cross-entropy + sum a log t


LOSSES = {"cross_entropy": Loss.CROSS_ENTROPY, "kl": Loss.KL}  # loss= spelling -> code


# Integer label dtypes, and the kind each is passed as.
LABEL_KINDS = {np.dtype(np.uint8): Target.U8, np.dtype(np.int32): Target.I32,
               np.dtype(np.int64): Target.I64}

LOSS_OPS = frozenset({Op.SSWL_FWD, Op.SSWL_FWD_BWD})  # the passes that return a loss sum
