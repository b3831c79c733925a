"""Numba kernels of the CPU selective scan (the method: :mod:`hrad.detectors.mamba`).

Layouts are channel-last so the innermost loop runs over contiguous channels: ``x, dt, y:
b x L x d``; ``A: n x d``; ``Bt, Ct: b x L x n``. Both kernels run one job per (sequence,
block of ``width`` channels) in parallel, each holding its ``n x width`` states locally and
walking the tokens in order: no per-token tensor, no autograd graph, no ``b x L x n x d``
array. The decay ``exp(dt_t * A)`` is computed in the loop by :func:`exp_float`, which LLVM
vectorises in float32 (a libm ``exp`` call per element cost more than the rest of the
recurrence together; precomputing the decays with torch moved 1 GB per scan through memory).

Imported lazily by :mod:`hrad.detectors.mamba` (compiling takes seconds the first time;
``cache=True`` keeps the machine code on disk afterwards).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

_LOG2E = 1.4426950408889634
#: ln 2 split in a high part exact in float32 and a low part (Cody-Waite)
_LN2_HIGH = 0.693359375
_LN2_LOW = -2.12194440e-4


def exp_float(z: float) -> float:
    """``exp(z)``; compiled per dtype by the overload below (never called from Python)."""
    return math.exp(z)


@overload(exp_float, inline="always")
def _exp_float_overload(z):  # type: ignore[no-untyped-def]
    """float32: Cody-Waite range reduction, a degree-6 polynomial (Cephes ``expf``) and the
    power of two built from its exponent bits, all branch-free so it vectorises; within 1.2e-7
    relative of float64 ``exp`` over the argument range ``[-87, 88]`` it clamps to (``exp(-87)``
    = 1.6e-38 stands for anything smaller). float64: libm ``exp`` (the gradient checks)."""
    if isinstance(z, types.Float) and z.bitwidth == 32:
        low, high = np.float32(-87.0), np.float32(88.0)
        log2e, ln2_high, ln2_low = np.float32(_LOG2E), np.float32(_LN2_HIGH), np.float32(_LN2_LOW)
        c0, c1, c2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
        c3, c4, c5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
        one, half, bias = np.float32(1.0), np.float32(0.5), np.int32(127)

        def exp32(z):  # type: ignore[no-untyped-def]
            z = min(max(z, low), high)
            k = np.float32(np.floor(z * log2e + half))
            r = z - k * ln2_high - k * ln2_low
            p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
            p = (p * r) * r + r + one
            return p * np.int32((np.int32(k) + bias) << np.int32(23)).view(np.float32)

        return exp32
    return lambda z: math.exp(z)


@njit(parallel=True, fastmath=True, cache=True)
def forward(x, dt, A, Bt, Ct, y, checkpoints, width, segment):  # type: ignore[no-untyped-def]
    """``h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t``, ``y_t = C_t . h_t`` (``h_0 = 0``), into ``y``.

    One job per (sequence, block of ``width`` channels); the innermost loop runs over the
    block's contiguous channels (row views, so indices start at 0 and LLVM can vectorise). When
    ``checkpoints`` (``b x ceil(L / segment) x n x d``) is not empty, the state before every
    ``segment``-th token is kept there for :func:`backward`.
    """
    batch, length, channels = x.shape
    states = A.shape[0]
    blocks = (channels + width - 1) // width
    keep = checkpoints.shape[0] > 0
    for job in prange(batch * blocks):
        i = job // blocks
        first = (job - i * blocks) * width
        last = min(channels, first + width)
        size = last - first
        a = A[:, first:last]
        h = np.zeros((states, size), dtype=x.dtype)
        total = np.empty(size, dtype=x.dtype)
        u = np.empty(size, dtype=x.dtype)
        for t in range(length):
            if keep and t % segment == 0:
                checkpoints[i, t // segment, :, first:last] = h
            x_t = x[i, t, first:last]
            dt_t = dt[i, t, first:last]
            for k in range(size):
                u[k] = dt_t[k] * x_t[k]
                total[k] = 0
            for s in range(states):
                b_value = Bt[i, t, s]
                c_value = Ct[i, t, s]
                h_s = h[s]
                a_s = a[s]
                for k in range(size):
                    value = exp_float(dt_t[k] * a_s[k]) * h_s[k] + u[k] * b_value
                    h_s[k] = value
                    total[k] += c_value * value
            y[i, t, first:last] = total


@njit(parallel=True, fastmath=True, cache=True)
def backward(x, dt, A, Bt, Ct, gy, checkpoints, dx, ddt, dA, dB, dC, width, segment):  # type: ignore[no-untyped-def]
    """Gradients of ``sum(gy * y)`` by the reverse recurrence, segment by segment from the end.

    Each segment's states (and decays) are recomputed from its checkpoint, then with
    ``g_t = dL/dh_t = C_t gy_t + a_{t+1} g_{t+1}`` and ``a_t = exp(dt_t A)``:
    ``dC_t += gy_t h_t``; ``dB_t += g_t dt_t x_t``; with ``du_t = g_t . B_t`` and
    ``q_t = g_t * h_{t-1} * a_t``: ``dx_t = du_t dt_t``, ``ddt_t = du_t x_t + q_t . A``,
    ``dA += q_t dt_t``.

    Jobs are those of :func:`forward`; ``dB, dC: blocks x b x L x n`` hold each channel block's
    partial sums and ``dA: b x n x d`` each sequence's (the caller sums them), so no two jobs
    write the same entry.
    """
    batch, length, channels = x.shape
    states = A.shape[0]
    blocks = (channels + width - 1) // width
    for job in prange(batch * blocks):
        i = job // blocks
        block = job - i * blocks
        first = block * width
        last = min(channels, first + width)
        size = last - first
        a = A[:, first:last]
        grad_a = dA[i, :, first:last]
        history = np.empty((segment + 1, states, size), dtype=x.dtype)  # history[r + 1] = h_{start + r}
        decays = np.empty((segment, states, size), dtype=x.dtype)
        gh = np.zeros((states, size), dtype=x.dtype)
        u = np.empty(size, dtype=x.dtype)
        du = np.empty(size, dtype=x.dtype)
        w = np.empty(size, dtype=x.dtype)
        for start in range(((length - 1) // segment) * segment, -1, -segment):
            stop = min(length, start + segment)
            history[0] = checkpoints[i, start // segment, :, first:last]
            for t in range(start, stop):
                r = t - start
                x_t = x[i, t, first:last]
                dt_t = dt[i, t, first:last]
                for k in range(size):
                    u[k] = dt_t[k] * x_t[k]
                for s in range(states):
                    b_value = Bt[i, t, s]
                    a_s = a[s]
                    decay_s = decays[r, s]
                    before = history[r, s]
                    after = history[r + 1, s]
                    for k in range(size):
                        decay = exp_float(dt_t[k] * a_s[k])
                        decay_s[k] = decay
                        after[k] = decay * before[k] + u[k] * b_value
            for t in range(stop - 1, start - 1, -1):
                r = t - start
                x_t = x[i, t, first:last]
                dt_t = dt[i, t, first:last]
                gy_t = gy[i, t, first:last]
                for k in range(size):
                    u[k] = dt_t[k] * x_t[k]
                    du[k] = 0
                    w[k] = 0
                for s in range(states):
                    b_value = Bt[i, t, s]
                    c_value = Ct[i, t, s]
                    a_s = a[s]
                    grad_a_s = grad_a[s]
                    gh_s = gh[s]
                    decay_s = decays[r, s]
                    before = history[r, s]
                    after = history[r + 1, s]
                    db = x.dtype.type(0)
                    dc = x.dtype.type(0)
                    for k in range(size):
                        grad = gh_s[k] + c_value * gy_t[k]
                        dc += gy_t[k] * after[k]
                        db += grad * u[k]
                        du[k] += grad * b_value
                        q = grad * before[k] * decay_s[k]
                        w[k] += q * a_s[k]
                        grad_a_s[k] += q * dt_t[k]
                        gh_s[k] = grad * decay_s[k]
                    dB[block, i, t, s] = db
                    dC[block, i, t, s] = dc
                for k in range(size):
                    dx[i, t, first + k] = du[k] * dt_t[k]
                    ddt[i, t, first + k] = du[k] * x_t[k] + w[k]
