"""Cross-entropy and fused linear cross-entropy vs F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F
from kernel_tolerances import assert_close_rule, dtype_params

import tritium.kernels.loss as ce_mod
from tritium.kernels.loss import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)

N, H, V = 19, 16, 301  # odd token count, vocab not a multiple of any block


def _data(device, dtype, seed, ignore_every=4, n=N, h=H, v=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def _torch_unfused(hidden, weight, targets, reduction, label_smoothing, z_loss, ignore_index=-100):
    """F.cross_entropy on hidden @ weight.T (plus z * lse^2 over kept tokens when z_loss > 0)."""
    logits = (hidden @ weight.t()).float()
    if z_loss == 0 and not (reduction == "mean" and (targets == ignore_index).all()):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    return cross_entropy_ref(logits, targets, ignore_index, reduction, label_smoothing, z_loss)


def _loss_and_grads(fn, hidden, weight, targets, upstream, **kw):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, targets, **kw)
    dh, dw = torch.autograd.grad(loss, [h, w], upstream if loss.dim() else None)
    return loss, dh, dw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_flce_matches_unfused_fp32(reduction, label_smoothing, z_loss, device, launches):
    hidden, weight, targets = _data(device, torch.float32, seed=1)
    # Per-token upstream gradients for "none" (as DPO uses it): exactness beyond uniform scaling.
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing, "z_loss": z_loss}
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, upstream, chunk_size=8, **kw)
    want = _loss_and_grads(_torch_unfused, hidden, weight, targets, upstream, **kw)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(["loss", "dhidden", "dweight"], got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    if reduction == "none":
        assert (got[0][targets == -100] == 0).all()
    launches.require("_cross_entropy_kernel")


@pytest.mark.parametrize("dtype", dtype_params(cpu_bf16=True))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flce_low_precision_rule(reduction, dtype, device, launches):
    hidden, weight, targets = _data(device, dtype, seed=3)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(device)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3}
    got = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, upstream, chunk_size=8, **kw)
    same = _loss_and_grads(fused_linear_cross_entropy_ref, hidden, weight, targets, upstream, **kw)
    ref32 = _loss_and_grads(fused_linear_cross_entropy_ref, hidden.float(), weight.float(), targets,
                            upstream, **kw)
    for name, a, b, b32 in zip(["loss", "dhidden", "dweight"], got, same, ref32):
        assert a.dtype == b.dtype
        assert_close_rule(name, a, b32, b, dtype)
    launches.require("_cross_entropy_kernel")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction, device, launches):
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(2, 7, V, generator=gen)).to(device)  # leading dims (B, T)
    targets = torch.randint(0, V, (2, 7), generator=gen).to(device)
    targets[0, :3] = -100
    upstream = torch.randn(2, 7, generator=gen).to(device)
    for ls, z in [(0.0, 0.0), (0.15, 1e-2)]:
        x = logits.clone().requires_grad_()
        x_ref = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets, reduction=reduction, label_smoothing=ls, z_loss=z)
        if z == 0:
            ref = F.cross_entropy(x_ref.flatten(0, 1), targets.flatten(), reduction=reduction, label_smoothing=ls)
            ref = ref.view(2, 7) if reduction == "none" else ref
        else:
            ref = cross_entropy_ref(x_ref, targets, reduction=reduction, label_smoothing=ls, z_loss=z)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        g = upstream if reduction == "none" else None
        torch.testing.assert_close(torch.autograd.grad(loss, x, g)[0], torch.autograd.grad(ref, x_ref, g)[0],
                                   atol=1e-6, rtol=1e-5)
    assert launches["_cross_entropy_kernel"] == 4  # forward + backward, for both option sets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_low_precision_logits(dtype, device, launches):
    gen = torch.Generator().manual_seed(6)
    logits = (4 * torch.randn(9, V, generator=gen)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (9,), generator=gen).to(device)
    loss = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.float(), targets)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    grad, = torch.autograd.grad(loss, logits)
    grad_ref, = torch.autograd.grad(ref, logits)
    assert grad.dtype == dtype
    # the gradient is rounded once to the logits' dtype: within one ulp of the reference
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-3 if dtype == torch.float16 else 8e-3)
    launches.require("_cross_entropy_kernel")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_grads(reduction, device, launches):
    """Documented choice: "mean" over zero tokens is 0 (F.cross_entropy says nan), grads are 0."""
    hidden, weight, targets = _data(device, torch.float32, seed=7)
    targets = torch.full_like(targets, -100)
    assert torch.isnan(F.cross_entropy((hidden @ weight.t()), targets))  # what we deliberately differ from
    loss, dh, dw = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets,
                                   torch.ones(N, device=device), reduction=reduction)
    assert torch.count_nonzero(loss) == 0 and torch.isfinite(loss).all()
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    logits = (hidden @ weight.t()).requires_grad_()
    plain = cross_entropy(logits, targets, reduction=reduction)
    assert torch.count_nonzero(plain) == 0
    assert torch.count_nonzero(torch.autograd.grad(plain.sum(), logits)[0]) == 0
    launches.require("_cross_entropy_kernel")


def test_flce_custom_ignore_index_and_shapes(device, launches):
    hidden, weight, targets = _data(device, torch.float32, seed=8, ignore_every=0)
    targets[1::3] = 5  # ignore_index inside the vocab range
    got = fused_linear_cross_entropy(hidden.view(1, N, H), weight, targets.view(1, N), ignore_index=5,
                                     reduction="none")
    assert got.shape == (1, N)
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=5, reduction="none")
    torch.testing.assert_close(got.view(N), want, atol=1e-5, rtol=1e-5)
    launches.require("_cross_entropy_kernel")


def test_flce_errors(device):
    hidden, weight, targets = _data(device, torch.float32, seed=10)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_cross_entropy(hidden, torch.empty(0, device=device), targets)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets must be in"):
        fused_linear_cross_entropy(hidden, weight, torch.full_like(targets, V))
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(TypeError, match="weight must have dtype"):
        fused_linear_cross_entropy(hidden, weight.half(), targets)
    h = hidden.detach().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def _peak_cpu_bytes(fn) -> int:
    """Peak bytes held by the CPU allocator while fn runs (profiler allocation events carry the
    allocator's running total)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    totals = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            alloc = event.typed[1]
            totals.append((event.start_time_ns, alloc.total_allocated, alloc.alloc_size))
    assert totals, "the profiler recorded no allocations"
    totals.sort()
    baseline = totals[0][1] - totals[0][2]
    return max(total for _, total, _ in totals) - baseline


def test_flce_peak_memory_is_far_below_unfused():
    n, h, v = 256, 64, 32000
    hidden, weight, targets = _data("cpu", torch.float32, seed=11, ignore_every=5, n=n, h=h, v=v)
    hidden.requires_grad_()
    weight.requires_grad_()

    def step(fn):
        def run():
            fn(hidden, weight, targets).backward()
            hidden.grad = weight.grad = None
        return run

    unfused = _peak_cpu_bytes(step(lambda a, b, c: F.cross_entropy(a @ b.t(), c)))
    fused = _peak_cpu_bytes(step(fused_linear_cross_entropy))
    logits_bytes = n * v * 4
    assert unfused >= 2 * logits_bytes  # logits + their gradient at least
    assert fused < 0.25 * unfused, f"FLCE peak {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"


def test_cross_entropy_custom_ops_pass_opcheck(device):
    hidden, weight, targets = _data(device, torch.float32, seed=12, n=5, v=11)
    torch.library.opcheck(ce_mod._flce_fwd_op, (hidden, weight, targets, -100, "mean", 0.1, 1e-3, True, True, 2))
    _loss, lse, _, _ = ce_mod.flce_fwd(hidden, weight, targets)
    torch.library.opcheck(ce_mod._flce_bwd_op, (torch.randn(5, device=device), hidden, weight, targets, lse,
                                                -100, 0.0, 0.0, True, True, 2))
    logits = hidden @ weight.t()
    torch.library.opcheck(ce_mod._ce_fwd_op, (logits, targets, -100, 0.0, 0.0))
    torch.library.opcheck(ce_mod._ce_bwd_op, (torch.randn(5, device=device), logits, targets, lse, -100, 0.0, 0.0))


@pytest.mark.gpu
def test_flce_bf16_and_torch_compile(device):
    hidden, weight, targets = _data(device, torch.bfloat16, seed=13, n=512, h=256, v=32000)
    fn = torch.compile(fused_linear_cross_entropy, fullgraph=True)
    got = _loss_and_grads(fn, hidden, weight, targets, None)
    want = _loss_and_grads(fused_linear_cross_entropy_ref, hidden.float(), weight.float(), targets, None)
    for name, a, b in zip(["loss", "dhidden", "dweight"], got, want):
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_flce_peak_memory_cuda(device):
    n, h, v = 4096, 1024, 128256
    hidden, weight, targets = _data(device, torch.bfloat16, seed=14, n=n, h=h, v=v)
    hidden.requires_grad_()
    weight.requires_grad_()
    peaks = {}
    for name, fn in [("unfused", lambda a, b, c: F.cross_entropy((a @ b.t()).float(), c)),
                     ("fused", fused_linear_cross_entropy)]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, targets).backward()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] <= 0.25 * peaks["unfused"], peaks


def test_cross_entropy_falls_back_to_reference_without_triton(monkeypatch, device, launches):
    monkeypatch.setattr(ce_mod, "can_use_triton", lambda *tensors: False)
    monkeypatch.setattr(ce_mod, "FusedLinearCrossEntropyFunction", None)  # kernel use would fail loudly
    monkeypatch.setattr(ce_mod, "CrossEntropyFunction", None)
    hidden, weight, targets = _data(device, torch.float32, seed=15)
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1),
                               F.cross_entropy(hidden @ weight.t(), targets, label_smoothing=0.1))
    torch.testing.assert_close(cross_entropy(hidden @ weight.t(), targets, reduction="sum"),
                               F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"))
    assert not launches, dict(launches)


def test_flce_without_autograd_computes_no_gradients(monkeypatch, device):
    hidden, weight, targets = _data(device, torch.float32, seed=16)
    hidden.requires_grad_()
    seen = []
    original = ce_mod.flce_fwd

    def spy(*args):
        seen.append(args[7:9])  # (grad_hidden, grad_weight)
        return original(*args)

    monkeypatch.setattr(ce_mod, "flce_fwd", spy)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets, reduction="none"))
    assert seen == [(False, False)]
