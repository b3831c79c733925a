"""A Mamba (selective state-space) block in plain PyTorch, with a scan that is fast on CPU.

The selective scan computes, per channel ``d`` and state ``n``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        y_t = C_t . h_t + D * x_t

Four interchangeable implementations share one signature (mamba-ssm's ``selective_scan_fn``
layout: ``x, dt: b x d x L``, ``A: d x n``, ``B, C: b x n x L``, ``D: d``; ``dt`` already
positive):

- :func:`selective_scan_kernel` (the CPU default): the recurrence compiled by numba
  (:mod:`hrad.detectors.scan_kernels`) inside one ``torch.autograd.Function``. The forward pass
  runs token by token with each state held in a local array and the innermost loop over 64
  contiguous channels (SIMD), in parallel over (sequence, channel block); the decay
  ``exp(dt * A)`` is a vectorisable float32 polynomial ``exp`` (within 1.2e-7 of libm's).
  Training keeps only the state before every 64th token; the backward pass is the hand-derived
  reverse recurrence (``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` and the gradients of ``x,
  dt, A, B, C, D`` from ``g_t`` and ``h_{t-1}``), each 64-token segment's states recomputed
  from its checkpoint, so memory stays ``O(b d n L / 64)`` instead of ``O(b d n L)``.
  Why this one: the other CPU forms are bound by the per-op cost of thousands of tiny torch
  ops and of their autograd graph, not by arithmetic (the token loop builds ``6 L`` graph
  nodes; the chunked form below ``L / 8`` chunks of ~15 ops each), while a log-depth
  associative (Blelloch / Hillis-Steele) scan over the sequence moves the whole
  ``b x d x L x n`` state tensor (1.1 GB for a four-direction 1022 px level) through memory
  ``2 log2 L`` times. The compiled loop does the minimum work, touches each input once and
  builds one graph node; benchmarks/results/varad_scan.md has the measured ratios.
- :func:`selective_scan_sequential`: the literal recurrence, one token at a time (reference).
- :func:`selective_scan_chunked`: chunks of ``T <= 8`` tokens; inside a chunk the cumulative
  log-decay ``S_t = cumsum(dt * A)`` factorises the decay matrix ``exp(S_t - S_s)`` as
  ``exp(S_t - r) * exp(r - S_s)`` around the middle ``r`` of the chunk's log-decay range, so all ``T`` states
  come from one cumulative sum; across chunks a short sequential recurrence carries the chunk's
  last state (``L / T`` steps). Mamba-1's ``A`` differs per (channel, state), so the full
  ``T x T`` segment-sum matrix form would cost ``T`` times more work; the factorised form keeps
  the work linear. Every per-token log-decay is floored at -17 nats (a factor of 4e-8, below
  float32 resolution), so every exponent stays within +-8.5 (T + 1) <= 77 < 88 nats and the
  chunk is computed in float32. ``recompute=True`` keeps only each chunk's inputs and carried
  state for the backward pass and recomputes the rest. Pure torch: the CPU fallback where numba
  cannot be imported, and the non-CUDA-kernel path on GPUs.
- the fused CUDA kernel of the ``mamba-ssm`` package, used by ``backend="auto"`` when it is
  importable and the tensors are on a GPU (see :func:`selective_scan` for the CPU choice).
"""

from __future__ import annotations

import math
import os
import threading
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.utils.checkpoint import checkpoint

try:  # optional fused kernel; CUDA-only wheels, never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fused_selective_scan
except Exception:  # noqa: BLE001 - any import failure (missing package, CUDA mismatch) means "not available"
    _fused_selective_scan = None

ScanBackend = Literal["auto", "kernel", "chunked", "sequential", "fused"]

#: largest chunk the chunked scan accepts: exponents stay within +-8.5 (8 + 1) = 77 nats < 88
MAX_CHUNK = 8
#: per-token log-decay floor: exp(-17) ~ 4e-8 is below float32 resolution
_LOG_DECAY_FLOOR = -17.0


def fused_scan_available() -> bool:
    """Whether mamba-ssm's fused selective-scan kernel could be imported."""
    return _fused_selective_scan is not None


#: channels per job of the compiled scan (its SIMD loop runs over them)
KERNEL_WIDTH = 64
#: tokens between the states the compiled scan keeps for its backward pass
KERNEL_SEGMENT = 64
_kernels: ModuleType | None = None
_kernel_error: str | None = None
# numba's default (workqueue) threading layer aborts when two threads enter parallel code at once
_kernel_lock = threading.Lock()


def _scan_kernels() -> ModuleType | None:
    """hrad.detectors.scan_kernels, imported on first use (numba loads in about a second)."""
    global _kernels, _kernel_error
    if _kernels is None and _kernel_error is None:
        try:
            import numba

            if "NUMBA_THREADING_LAYER" not in os.environ:
                # numba's OpenMP layer resets the OpenMP thread count torch shares with it (a
                # caller's torch.set_num_threads(1) became 2); its own pool leaves torch alone
                numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]
            from hrad.detectors import scan_kernels

            _kernels = scan_kernels
        except Exception as error:  # noqa: BLE001 - no numba / unsupported platform: use the torch forms
            _kernel_error = f"{type(error).__name__}: {error}"
    return _kernels


def kernel_scan_available() -> bool:
    """Whether the numba-compiled CPU scan can be used."""
    return _scan_kernels() is not None


def _run_kernel(name: str, *arguments: Any) -> None:
    kernels = _scan_kernels()
    if kernels is None:
        raise RuntimeError(f"scan backend 'kernel' needs numba (pip install numba): {_kernel_error}")
    import numba

    threads = torch.get_num_threads()
    with _kernel_lock:
        limit = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        numba.set_num_threads(max(1, min(threads, limit)))
        getattr(kernels, name)(*(a.numpy() if isinstance(a, Tensor) else a for a in arguments))
    if torch.get_num_threads() != threads:  # a threading layer chosen by NUMBA_THREADING_LAYER=omp
        torch.set_num_threads(threads)


def _kernel_forward(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: bool
) -> tuple[Tensor, Tensor]:
    """The compiled forward on ``b x L x d`` / ``n x d`` / ``b x L x n`` tensors: ``y`` and the checkpoints."""
    batch, length, channels = x.shape
    segments = -(-length // KERNEL_SEGMENT)
    checkpoints = x.new_empty((batch, segments, A.shape[0], channels) if keep else (0, 0, 0, 0))
    y = torch.empty_like(x)
    _run_kernel("forward", x, dt, A, B, C, y, checkpoints, KERNEL_WIDTH, KERNEL_SEGMENT)
    return y, checkpoints


class _KernelScan(torch.autograd.Function):
    """The compiled scan with its hand-derived backward (inputs channel-last, see _kernel_forward)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:  # type: ignore[override]
        y, checkpoints = _kernel_forward(x, dt, A, B, C, keep=True)
        ctx.save_for_backward(x, dt, A, B, C, checkpoints)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        x, dt, A, B, C, checkpoints = ctx.saved_tensors
        batch, length, channels = x.shape
        blocks = -(-channels // KERNEL_WIDTH)
        dx, ddt = torch.empty_like(x), torch.empty_like(x)
        dA = torch.zeros(batch, A.shape[0], channels, dtype=torch.float64)
        dB = x.new_empty(blocks, batch, length, A.shape[0])
        dC = torch.empty_like(dB)
        _run_kernel(
            "backward", x, dt, A, B, C, grad_y.contiguous(), checkpoints, dx, ddt, dA, dB, dC,
            KERNEL_WIDTH, KERNEL_SEGMENT,
        )  # fmt: skip
        return dx, ddt, dA.sum(0).to(A.dtype), dB.sum(0), dC.sum(0)


def selective_scan_kernel(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The numba-compiled CPU scan (module docstring): float32, or float64 when any input is."""
    y = selective_scan_kernel_channels_last(
        x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D
    )
    return y.transpose(1, 2)


def selective_scan_kernel_channels_last(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor
) -> Tensor:
    """:func:`selective_scan_kernel` on channel-last tensors, the kernels' own layout (no copies
    when contiguous): ``x, dt: b x L x d``, ``A: d x n``, ``B, C: b x L x n`` -> ``b x L x d``."""
    if x.device.type != "cpu":
        raise ValueError(f"scan backend 'kernel' runs on CPU tensors only, got {x.device}")
    dtype = torch.float64 if torch.float64 in {t.dtype for t in (x, dt, A, B, C, D)} else torch.float32
    x_l, dt_l, B_l, C_l = (t.to(dtype).contiguous() for t in (x, dt, B, C))
    A_t = A.to(dtype).t().contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C)):
        y = _KernelScan.apply(x_l, dt_l, A_t, B_l, C_l)
    else:
        with torch.no_grad():
            y = _kernel_forward(x_l, dt_l, A_t, B_l, C_l, keep=False)[0]
    return y + D.to(dtype) * x_l


def selective_scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """Reference selective scan: the recurrence, one token at a time."""
    batch, channels, length = x.shape
    state = x.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * A)
        state = decay * state + (dt[:, :, t] * x[:, :, t])[:, :, None] * B[:, None, :, t]
        outputs.append((state * C[:, None, :, t]).sum(-1))
    return torch.stack(outputs, dim=-1) + D[:, None] * x


def _scan_chunk(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One chunk: ``x, dt: b x d x T``, ``A: d x 1 x n``, ``B, C: b x T x n``, ``state: b x d x n``."""
    cumulative = (dt[..., None] * A).clamp(min=_LOG_DECAY_FLOOR).cumsum(dim=2)  # b x d x T x n
    # S_t lies in [S_0 - 17 (T - 1), S_0]; centre the exponents on the middle of that range.
    # The reference depends on the chunk's first token only, so outputs stay bitwise causal.
    middle = cumulative[:, :, :1] + 0.5 * _LOG_DECAY_FLOOR * (x.shape[-1] - 1)
    relative = cumulative - middle
    inputs = (dt * x)[..., None] * B[:, None]
    # exp(-relative) rather than 1 / exp(relative): the reciprocal's gradient squares exp(77)
    states = torch.exp(relative) * (
        (inputs * torch.exp(-relative)).cumsum(dim=2) + state[:, :, None] * torch.exp(middle)
    )
    return (states * C[:, None]).sum(-1), states[:, :, -1]


def selective_scan_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    chunk: int = MAX_CHUNK,
    recompute: bool = False,
) -> Tensor:
    """Selective scan in chunks of ``chunk`` tokens (see the module docstring for the method)."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in 1..{MAX_CHUNK}, got {chunk}")
    batch, channels, length = x.shape
    dtype = x.dtype
    x32, dt32 = x.float(), dt.float()
    state = x32.new_zeros(batch, channels, A.shape[1])
    A_c = A.float()[:, None, :]  # d x 1 x n
    B_t = B.float().transpose(1, 2)  # b x L x n
    C_t = C.float().transpose(1, 2)
    recompute = recompute and torch.is_grad_enabled()
    outputs = []
    for start in range(0, length, chunk):
        window = slice(start, min(start + chunk, length))
        pieces = (x32[:, :, window], dt32[:, :, window], A_c, B_t[:, window], C_t[:, window], state)
        if recompute:
            output, state = checkpoint(_scan_chunk, *pieces, use_reentrant=True)
        else:
            output, state = _scan_chunk(*pieces)
        outputs.append(output)
    return (torch.cat(outputs, dim=-1) + D[:, None] * x32).to(dtype)


def resolve_backend(backend: ScanBackend, x: Tensor, requires_grad: bool) -> ScanBackend:
    """``auto`` on CPU -> the kernel, or without numba chunked (training) / sequential (inference)."""
    if backend != "auto" or x.is_cuda:
        return backend
    if kernel_scan_available():
        return "kernel"
    return "chunked" if torch.is_grad_enabled() and requires_grad else "sequential"


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    backend: ScanBackend = "auto",
    chunk: int = MAX_CHUNK,
    recompute: bool = False,
) -> Tensor:
    """Dispatch to a scan implementation.

    ``auto``: the fused kernel on CUDA when present; on CPU the numba-compiled scan for
    training and inference (benchmarks/results/varad_scan.md: the fastest CPU form by far in
    both), or, where numba cannot be imported, the chunked scan when gradients are needed and
    the sequential loop for inference (its forward pass alone beat the chunked one).
    ``chunk`` and ``recompute`` apply to the chunked scan only.
    """
    backend = resolve_backend(backend, x, any(t.requires_grad for t in (x, dt, A, B, C, D)))
    if backend == "kernel":
        return selective_scan_kernel(x, dt, A, B, C, D)
    if backend == "fused" or (backend == "auto" and x.is_cuda and _fused_selective_scan is not None):
        if _fused_selective_scan is None:
            raise RuntimeError("scan backend 'fused' needs the mamba-ssm package (pip install mamba-ssm)")
        # the CUDA kernel wants u, delta and the input-dependent B, C in one type; under autocast
        # the projections give bfloat16 / float16 B, C next to float32 x, dt (elementwise ops)
        dtype = x.dtype
        return _fused_selective_scan(
            x.contiguous(), dt.to(dtype).contiguous(), A.float(), B.to(dtype).contiguous(),
            C.to(dtype).contiguous(), D.float(),
        )  # fmt: skip
    if backend == "sequential":
        return selective_scan_sequential(x, dt, A, B, C, D)
    return selective_scan_chunked(x, dt, A, B, C, D, chunk=chunk, recompute=recompute)


def causal_depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, channels_last: bool = False
) -> Tensor:
    """``nn.Conv1d(d, d, K, groups=d, padding=K - 1)(x)[..., :L]`` as ``K`` shifted multiply-adds.

    ``x: b x d x L`` (``b x L x d`` with ``channels_last``), ``weight: d x 1 x K``:
    ``y_t = bias + sum_j weight_j x_{t - K + 1 + j}``.
    Same values and gradients as the convolution; on CPU the convolution's backward pass
    (the depthwise weight gradient) took 87% of a 1022 px, four-direction VarAD training step
    (74 of 85 s, torch.profiler), the shifted form a fraction of a second.
    """
    taps = weight.shape[-1]
    if channels_last:
        length = x.shape[1]
        padded = F.pad(x, (0, 0, taps - 1, 0))
        out = padded[:, :length] * weight[:, 0, 0]
        for tap in range(1, taps):
            out = out + padded[:, tap : tap + length] * weight[:, 0, tap]
        return out if bias is None else out + bias
    length = x.shape[-1]
    padded = F.pad(x, (taps - 1, 0))
    out = padded[..., :length] * weight[:, 0, 0, None]
    for tap in range(1, taps):
        out = out + padded[..., tap : tap + length] * weight[:, 0, tap, None]
    return out if bias is None else out + bias[:, None]


class MambaBlock(nn.Module):
    """One Mamba block (Gu & Dao 2023): in_proj -> causal depthwise conv -> SiLU -> selective scan,
    gated by SiLU(z), -> out_proj. Causal: output ``t`` depends on inputs ``<= t`` only."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: ScanBackend = "auto",
        chunk: int = MAX_CHUNK,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.backend: ScanBackend = backend
        self.chunk = chunk
        self.recompute = recompute
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # Mamba's initialisation: dt log-uniform in [dt_min, dt_max] through the softplus bias,
        # A = -(1..n) per channel (S4D-real), D = 1.
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        states = torch.arange(1, d_state + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(states).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, tokens: Tensor) -> Tensor:
        """``b x L x d_model`` -> ``b x L x d_model`` in the tokens' type (also under autocast,
        whose projections would return bfloat16 / float16)."""
        projected = self.in_proj(tokens)
        if resolve_backend(self.backend, tokens, projected.requires_grad) == "kernel":
            return self._forward_channels_last(projected).to(tokens.dtype)
        x, z = projected.transpose(1, 2).chunk(2, dim=1)  # b x d_inner x L each
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        dt_raw, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = F.softplus(self.dt_proj(dt_raw)).transpose(1, 2)  # b x d_inner x L
        A = -torch.exp(self.A_log.float())
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        y = selective_scan(x, dt, A, B, C, self.D, self.backend, self.chunk, self.recompute)
        return self.out_proj((y * F.silu(z)).transpose(1, 2)).to(tokens.dtype)

    def _forward_channels_last(self, projected: Tensor) -> Tensor:
        """:meth:`forward` for the compiled scan: every tensor stays ``b x L x channels``
        (the kernel's layout), so the five transposed copies of the other path disappear."""
        x, z = projected.chunk(2, dim=-1)  # b x L x d_inner each
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias, channels_last=True))
        dt_raw, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_raw))
        A = -torch.exp(self.A_log.float())
        y = selective_scan_kernel_channels_last(x, dt, A, B, C, self.D)
        return self.out_proj(y * F.silu(z))
