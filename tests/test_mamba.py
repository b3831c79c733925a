"""The selective scans and Mamba block: compiled and chunked scans == sequential loop (values and
gradients), the compiled scan's exp, backend choice, causality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrad.detectors import mamba
from hrad.detectors.mamba import (
    MambaBlock,
    fused_scan_available,
    kernel_scan_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_kernel,
    selective_scan_sequential,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_scan_inputs(length: int, seed: int, batch: int = 2, channels: int = 6, states: int = 16) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=generator)
    # dt spans weak to very strong decays (dt * |A| up to ~100 nats) to exercise the log-decay floor
    dt = F.softplus(torch.randn(batch, channels, length, generator=generator) * 2.5)
    A = -torch.rand(channels, states, generator=generator) * 16
    B = torch.randn(batch, states, length, generator=generator)
    C = torch.randn(batch, states, length, generator=generator)
    D = torch.randn(channels, generator=generator)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 8])
@pytest.mark.parametrize("length", [1, 45, 101])
def test_chunked_scan_equals_sequential_loop(chunk: int, length: int) -> None:
    inputs = random_scan_inputs(length, seed=length * 100 + chunk)
    expected = selective_scan_sequential(*(tensor.double() for tensor in inputs))  # float64 reference
    got = selective_scan_chunked(*inputs, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # float32 against a float64 reference: errors are float32 rounding of the largest terms
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, atol=1e-6 * scale, rtol=1e-5)


def test_sequential_loop_matches_closed_form_in_float64() -> None:
    """Brute force: h_t = sum_{s<=t} prod_{s<r<=t} exp(dt_r A) * dt_s B_s x_s, for one channel/state."""
    x, dt, A, B, C, D = (
        tensor.double() for tensor in random_scan_inputs(9, seed=3, batch=1, channels=1, states=1)
    )
    y = selective_scan_sequential(x, dt, A, B, C, D)[0, 0]
    a = (dt[0, 0] * A[0, 0]).tolist()
    for t in range(9):
        state = 0.0
        for s in range(t + 1):
            decay = torch.exp(torch.tensor(sum(a[s + 1 : t + 1]), dtype=torch.float64))
            state += float(decay) * float(dt[0, 0, s] * B[0, 0, s] * x[0, 0, s])
        expected = state * float(C[0, 0, t]) + float(D[0] * x[0, 0, t])
        assert abs(float(y[t]) - expected) < 1e-10


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_scan_gradients_equal_sequential(recompute: bool) -> None:
    inputs = random_scan_inputs(40, seed=7)
    leaves_a = [tensor.clone().requires_grad_() for tensor in inputs]
    leaves_b = [tensor.clone().requires_grad_() for tensor in inputs]
    weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    (selective_scan_sequential(*leaves_a) * weights).sum().backward()
    (selective_scan_chunked(*leaves_b, chunk=8, recompute=recompute) * weights).sum().backward()
    for a, b in zip(leaves_a, leaves_b, strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)


def test_chunk_size_is_validated() -> None:
    inputs = random_scan_inputs(5, seed=0)
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_chunked(*inputs, chunk=0)
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_chunked(*inputs, chunk=9)


def test_auto_backend_on_cpu_is_the_compiled_scan() -> None:
    assert kernel_scan_available()  # numba is a dependency
    inputs = random_scan_inputs(20, seed=5)
    assert torch.equal(selective_scan(*inputs, backend="auto"), selective_scan_kernel(*inputs))
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    assert torch.equal(selective_scan(*leaves, backend="auto"), selective_scan_kernel(*leaves))
    assert torch.equal(
        selective_scan(*inputs, backend="chunked", chunk=8), selective_scan_chunked(*inputs, chunk=8)
    )


def test_auto_backend_without_numba_trains_chunked_and_infers_sequentially(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mamba, "_kernels", None)
    monkeypatch.setattr(mamba, "_kernel_error", "ModuleNotFoundError: No module named 'numba'")
    inputs = random_scan_inputs(20, seed=5)
    assert torch.equal(selective_scan(*inputs, backend="auto", chunk=8), selective_scan_sequential(*inputs))
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    assert torch.equal(
        selective_scan(*leaves, backend="auto", chunk=8), selective_scan_chunked(*leaves, chunk=8)
    )
    with pytest.raises(RuntimeError, match="numba"):
        selective_scan(*inputs, backend="kernel")


@pytest.fixture(params=[(64, 64), (4, 5)], ids=["default-blocks", "small-blocks"])
def kernel_blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """The default channel block / checkpoint segment, and small ones that split a 6-channel,
    tens-of-tokens scan into several partial blocks and segments."""
    width, segment = request.param
    monkeypatch.setattr(mamba, "KERNEL_WIDTH", width)
    monkeypatch.setattr(mamba, "KERNEL_SEGMENT", segment)
    return width, segment


@pytest.mark.parametrize("length", [1, 45, 101])
def test_kernel_scan_equals_sequential_loop(length: int, kernel_blocks: tuple[int, int]) -> None:
    inputs = random_scan_inputs(length, seed=length)
    expected = selective_scan_sequential(*(tensor.double() for tensor in inputs))
    got = selective_scan_kernel(*inputs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, atol=1e-6 * scale, rtol=1e-5)
    # float64 inputs run the float64 kernel (libm exp): equal to the loop to rounding
    torch.testing.assert_close(
        selective_scan_kernel(*(tensor.double() for tensor in inputs)), expected, atol=1e-12, rtol=1e-10
    )


def test_kernel_scan_gradcheck_in_float64(kernel_blocks: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(4)
    inputs = [tensor.double() for tensor in random_scan_inputs(9, seed=4, channels=5, states=3)]
    inputs[1] = F.softplus(torch.randn(2, 5, 9, generator=generator, dtype=torch.float64))  # moderate decays
    leaves = [tensor.requires_grad_() for tensor in inputs]
    assert torch.autograd.gradcheck(selective_scan_kernel, leaves)


def test_kernel_scan_gradients_equal_the_loop_in_float32_at_varad_scale() -> None:
    """Half a ViT-S level's Mamba width (384 = 6 channel blocks), VarAD's 16 states, 300 tokens
    (5 checkpoint segments), two sequences; reference: the loop's autograd in float64."""
    generator = torch.Generator().manual_seed(8)
    batch, channels, length, states = 2, 384, 300, 16
    x = torch.randn(batch, channels, length, generator=generator)
    dt = F.softplus(torch.randn(batch, channels, length, generator=generator) - 3)  # Mamba's init range
    A = -torch.rand(channels, states, generator=generator) * 16
    B, C = (torch.randn(batch, states, length, generator=generator) for _ in range(2))
    D = torch.randn(channels, generator=generator)
    weights = torch.randn(batch, channels, length, generator=generator)
    reference = [tensor.double().requires_grad_() for tensor in (x, dt, A, B, C, D)]
    leaves = [tensor.clone().requires_grad_() for tensor in (x, dt, A, B, C, D)]
    expected = selective_scan_sequential(*reference)
    got = selective_scan_kernel(*leaves)
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5 * scale, rtol=1e-4)
    (expected * weights.double()).sum().backward()
    (got * weights).sum().backward()
    for name, ours, theirs in zip(["x", "dt", "A", "B", "C", "D"], leaves, reference, strict=True):
        assert ours.grad is not None and theirs.grad is not None
        error = float((ours.grad.double() - theirs.grad).abs().max())
        assert error <= 1e-4 * float(theirs.grad.abs().max()), name


def test_kernel_scan_leaves_torch_thread_count_alone() -> None:
    """numba's OpenMP threading layer reset torch's (shared) OpenMP thread count."""
    assert torch.get_num_threads() == 1  # the one_thread fixture
    leaves = [tensor.clone().requires_grad_() for tensor in random_scan_inputs(30, seed=2)]
    selective_scan_kernel(*leaves).sum().backward()
    assert torch.get_num_threads() == 1


def test_kernel_scan_rejects_non_cpu_tensors() -> None:
    inputs = [tensor.to("meta") for tensor in random_scan_inputs(4, seed=0)]
    with pytest.raises(ValueError, match="CPU"):
        selective_scan_kernel(*inputs)


def test_kernel_exp_is_within_float32_rounding_of_exp() -> None:
    from numba import njit

    from hrad.detectors.scan_kernels import exp_float

    @njit
    def apply(values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        for index in range(values.shape[0]):
            out[index] = exp_float(values[index])
        return out

    z = np.concatenate([np.linspace(-87, 88, 100_001), [0.0, -1e-8, np.log(0.5), -200.0]]).astype(np.float32)
    got = apply(z).astype(np.float64)
    expected = np.exp(z.astype(np.float64))
    inside = z >= -87
    assert np.abs(got[inside] / expected[inside] - 1).max() < 2.5e-7
    assert got[-4] == 1.0 and got[-2] == 0.5
    assert 0 < got[-1] < 2e-38  # below the range: clamped to exp(-87), no overflow, no NaN
    z64 = z.astype(np.float64)
    # float64: libm's exp, as Python's math.exp (numpy's own exp may be a SIMD one, an ulp apart
    # on CPUs with AVX-512)
    assert np.array_equal(apply(z64), np.array([math.exp(value) for value in z64.tolist()]))


@pytest.mark.skipif(fused_scan_available(), reason="mamba-ssm is installed")
def test_fused_backend_without_mamba_ssm_says_so() -> None:
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan(*random_scan_inputs(4, seed=0), backend="fused")


@pytest.mark.skipif(
    not (fused_scan_available() and torch.cuda.is_available()), reason="needs mamba-ssm and CUDA"
)
def test_fused_kernel_agrees_with_chunked_scan() -> None:
    inputs = [tensor.cuda() for tensor in random_scan_inputs(300, seed=11)]
    torch.testing.assert_close(
        selective_scan(*inputs, backend="fused"), selective_scan_chunked(*inputs), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("backend", ["kernel", "chunked", "sequential"])
def test_mamba_block_is_causal(backend: str) -> None:
    torch.manual_seed(0)
    block = MambaBlock(d_model=8, d_state=4, backend=backend, chunk=5)  # type: ignore[arg-type]
    tokens = torch.randn(2, 23, 8)
    perturbed = tokens.clone()
    perturbed[:, 11] += 3.0
    with torch.no_grad():
        before, after = block(tokens), block(perturbed)
    assert torch.equal(before[:, :11], after[:, :11])
    assert (before[:, 11:] - after[:, 11:]).abs().amax(dim=(0, 2)).min() > 0


@pytest.mark.parametrize("backend", ["kernel", "chunked"])
def test_mamba_block_backends_agree(backend: str) -> None:
    """Outputs and every parameter's gradient against the loop (the kernel runs the block
    channel-last, its own code path)."""
    torch.manual_seed(0)
    block = MambaBlock(d_model=8, d_state=4, backend=backend)  # type: ignore[arg-type]
    tokens = torch.randn(3, 50, 8)
    weights = torch.randn(3, 50, 8)
    gradients = {}
    outputs = {}
    for name in (backend, "sequential"):
        block.backend = name  # type: ignore[assignment]
        block.zero_grad()
        outputs[name] = block(tokens)
        (outputs[name] * weights).sum().backward()
        gradients[name] = {key: p.grad.clone() for key, p in block.named_parameters()}  # type: ignore[union-attr]
    torch.testing.assert_close(outputs[backend], outputs["sequential"], atol=1e-5, rtol=1e-5)
    for key, expected in gradients["sequential"].items():
        torch.testing.assert_close(gradients[backend][key], expected, atol=1e-4, rtol=1e-4, msg=key)


def test_causal_depthwise_conv_equals_the_padded_convolution() -> None:
    generator = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, 6, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 11, generator=generator, dtype=torch.float64)
    expected = conv(x)[..., :11]
    (expected * weights).sum().backward()
    grads = [tensor.grad.clone() for tensor in (x, conv.weight, conv.bias)]  # type: ignore[union-attr]
    for tensor in (x, conv.weight, conv.bias):
        tensor.grad = None
    got = mamba.causal_depthwise_conv(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    (got * weights).sum().backward()
    for before, tensor in zip(grads, (x, conv.weight, conv.bias), strict=True):
        torch.testing.assert_close(tensor.grad, before, atol=1e-12, rtol=1e-12)
    # one input token moves outputs t..t+3 only (causal, width 4)
    with torch.no_grad():
        moved = x.clone()
        moved[:, :, 5] += 1
        change = (
            mamba.causal_depthwise_conv(moved, conv.weight, None)
            - mamba.causal_depthwise_conv(x, conv.weight, None)
        ).abs()
    assert change[..., :5].max() == 0 and change[..., 9:].max() == 0 and change[..., 5:9].min() > 0
    channels_last = mamba.causal_depthwise_conv(x.transpose(1, 2), conv.weight, conv.bias, channels_last=True)
    torch.testing.assert_close(channels_last.transpose(1, 2), got, atol=1e-12, rtol=1e-12)


def test_fused_backend_gets_one_input_type_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """mamba-ssm's kernel refuses u, delta and the input-dependent B, C in different types
    ("Expected B.scalar_type() == ... input_type"); under autocast the projections make B, C
    bfloat16 next to float32 x, dt. The block casts them to x's type (the fake kernel checks it
    the way mamba-ssm does and scans with the loop)."""
    seen: list[tuple[torch.dtype, ...]] = []

    def fake_fused(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
    ) -> torch.Tensor:
        seen.append((u.dtype, delta.dtype, B.dtype, C.dtype, A.dtype))
        assert (
            delta.dtype == u.dtype and B.dtype == u.dtype and C.dtype == u.dtype and A.dtype == torch.float32
        )
        inputs = (u.float(), delta.float(), A, B.float(), C.float(), D)
        return selective_scan_sequential(*inputs).to(u.dtype)

    monkeypatch.setattr(mamba, "_fused_selective_scan", fake_fused)
    torch.manual_seed(0)
    block = MambaBlock(d_model=8, d_state=4, backend="fused")
    tokens = torch.randn(2, 13, 8)
    with torch.no_grad():
        expected = MambaBlock(d_model=8, d_state=4, backend="sequential")
        expected.load_state_dict(block.state_dict())
        reference = expected(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = block(tokens)
    assert seen and mixed.dtype == torch.float32  # the tokens' type
    torch.testing.assert_close(mixed.float(), reference, atol=0.1, rtol=0.1)
