"""The generator: hand-written BPTT equals autograd, scheduled sampling, generation, noise."""

import pytest
import torch

from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.recurrence import AutoregressiveLSTM


def one_member(*args):
    """AutoregressiveLSTM on one model's tensors: a stack of M = 1, and the output unstacked."""
    return AutoregressiveLSTM.apply(None, *[a if a is None else a[None] for a in args])[0]


def reference_recurrence(pre0, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w):
    """The same recurrence written plainly with autograd, to check the hand-written backward."""
    T, B, _ = pre0.shape
    L, _, H = h0.shape
    h, c = list(h0), list(c0)
    outputs, y_prev = [], y_teacher[0]
    for t in range(T):
        y_in = y_teacher[0] if t == 0 else use_truth[t] * y_teacher[t] + (1 - use_truth[t]) * y_prev
        x = None
        for layer in range(L):
            if layer == 0:
                gates = pre0[t] + y_in @ w_y + h[0] @ layer_w[0]
            else:
                w_ih, w_hh, b = layer_w[3 * layer - 2 : 3 * layer + 1]
                x = h[layer - 1] * (drop[layer - 1, t] if drop is not None else 1.0)
                gates = b + x @ w_ih + h[layer] @ w_hh
            i, f, o = torch.sigmoid(gates[:, : 3 * H]).split(H, dim=1)
            g = torch.tanh(gates[:, 3 * H :])
            c[layer] = f * c[layer] + i * g
            h[layer] = o * torch.tanh(c[layer])
        y_prev = h[L - 1] @ w_out + b_out
        outputs.append(y_prev)
    return torch.stack(outputs)


def random_inputs(T=7, B=3, K=2, H=4, L=3, dropout=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    layer_w = [r(H, 4 * H) * 0.5]
    for _ in range(1, L):
        layer_w += [r(H, 4 * H) * 0.5, r(H, 4 * H) * 0.5, r(4 * H) * 0.1]
    use_truth = (torch.rand(T, B, 1, generator=g) < 0.5).to(dtype)
    drop = (torch.rand(L - 1, T, B, H, generator=g) < 0.7).to(dtype) / 0.7 if dropout else None
    args = [
        r(T, B, 4 * H),
        r(T, B, K),
        use_truth,
        r(L, B, H) * 0.5,
        r(L, B, H) * 0.5,
        drop,
        r(K, 4 * H) * 0.5,
        r(H, K) * 0.5,
        r(K) * 0.1,
        *layer_w,
    ]
    return args


@pytest.mark.parametrize("layers,dropout", [(1, False), (2, True), (3, True), (3, False)])
def test_hand_written_backward_matches_autograd(layers, dropout):
    args = random_inputs(L=layers, dropout=dropout)
    grad_idx = [0, 3, 4, 6, 7, 8, *range(9, len(args))]
    for i in grad_idx:
        args[i].requires_grad_(True)
    weights = torch.randn(7, 3, 2, dtype=torch.float64)

    ours = one_member(*args)
    (ours * weights).sum().backward()
    ours_grads = [args[i].grad.clone() for i in grad_idx]
    for i in grad_idx:
        args[i].grad = None
    ref = reference_recurrence(*args)
    (ref * weights).sum().backward()

    torch.testing.assert_close(ours, ref)
    for i, got in zip(grad_idx, ours_grads, strict=True):
        torch.testing.assert_close(got, args[i].grad, msg=f"gradient of input {i}")


def test_gradcheck_small():
    args = random_inputs(T=4, B=2, K=2, H=3, L=2)
    for i in [0, 3, 4, 6, 7, 8, 9, 10, 11, 12]:
        args[i].requires_grad_(True)
    assert torch.autograd.gradcheck(one_member, args)


def test_stacked_members_are_independent_models():
    """Three members stacked on a leading dimension: each one's output and gradients are those
    of its own tensors run alone."""
    members = [random_inputs(L=2, seed=seed) for seed in range(3)]
    stacked = [None if a[0] is None else torch.stack(a) for a in zip(*members, strict=True)]
    grad_idx = [0, 3, 4, 6, 7, 8, *range(9, len(stacked))]
    for i in grad_idx:
        stacked[i].requires_grad_(True)
        for args in members:
            args[i].requires_grad_(True)
    weights = torch.randn(3, 7, 3, 2, dtype=torch.float64)
    out = AutoregressiveLSTM.apply(None, *stacked)
    grads = torch.autograd.grad((out * weights).sum(), [stacked[i] for i in grad_idx])
    for m, args in enumerate(members):
        alone = one_member(*args)
        alone_grads = torch.autograd.grad((alone * weights[m]).sum(), [args[i] for i in grad_idx])
        torch.testing.assert_close(out[m], alone)
        for i, got, want in zip(grad_idx, grads, alone_grads, strict=True):
            torch.testing.assert_close(got[m], want, msg=f"member {m}, gradient of input {i}")


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_components=3, n_params=2, hidden_size=8, num_layers=2, **({"dropout": 0.0} | kw)
    )
    return StreamlinedSequenceGenerator(cfg)


def test_ratio_one_is_teacher_forcing_and_zero_is_generation():
    model = small_model(dropout=0.0).train()
    params, targets = torch.randn(4, 2), torch.randn(4, 6, 3)
    free = model(params, targets, teacher_forcing_ratio=0.0)
    torch.testing.assert_close(free, model.generate(params, 6))
    forced = model(params, targets, teacher_forcing_ratio=1.0)
    assert not torch.allclose(forced, free)
    # teacher forcing: step t's output cannot depend on the prediction at t-1, only on the truth
    changed = targets.clone()
    changed[:, 3] += 5.0
    forced2 = model(params, changed, teacher_forcing_ratio=1.0)
    torch.testing.assert_close(forced2[:, :4], forced[:, :4])
    assert not torch.allclose(forced2[:, 4], forced[:, 4])


def test_scheduled_sampling_is_per_sample_and_per_step():
    model = small_model(dropout=0.0).train()
    params, targets = torch.randn(64, 2), torch.randn(64, 12, 3)
    forced = model(params, targets, teacher_forcing_ratio=1.0)
    free = model(params, targets, teacher_forcing_ratio=0.0)
    torch.manual_seed(1)
    mixed = model(params, targets, teacher_forcing_ratio=0.5)
    # step 1 sees either the truth (as forced) or the model's own step 0 (as free), per sample
    as_forced = torch.isclose(mixed[:, 1], forced[:, 1]).all(dim=1)
    as_free = torch.isclose(mixed[:, 1], free[:, 1]).all(dim=1)
    assert bool((as_forced | as_free).all())
    assert 10 < int(as_forced.sum()) < 54


def test_generation_needs_only_parameters_and_is_deterministic_in_eval():
    model = small_model()
    params = torch.randn(5, 2)
    out = model.generate(params, 9)
    assert out.shape == (5, 9, 3)
    torch.testing.assert_close(out, model.generate(params, 9))
    assert model.training  # generate restores the mode


def test_noise_and_dropout_only_in_training():
    model = small_model(dropout=0.5)
    params, targets = torch.randn(4, 2), torch.randn(4, 6, 3)
    model.eval()
    a = model(params, targets, 1.0, noise_level=0.5)
    b = model(params, targets, 1.0, noise_level=0.0)
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(3)
    c = model(params, targets, 1.0, noise_level=0.5)
    assert not torch.allclose(c, a)


def test_model_trains_on_a_toy_task():
    model = small_model(dropout=0.0).train()
    params = torch.randn(32, 2)
    t = torch.linspace(0, 1, 10)
    targets = torch.stack(
        [params[:, :1] * t, torch.sin(3 * t) + 0 * params[:, :1], params[:, 1:] * t * t], dim=2
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = (model(params, targets, 0.5) - targets).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_mixed_precision_recurrence_tracks_float32(dtype):
    """GEMM operands in low precision, states and gradients in float32: close to float32."""
    cfg = ModelConfig(n_components=5, n_params=2, hidden_size=64, num_layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = StreamlinedSequenceGenerator(cfg).train()
    params, targets = torch.randn(16, 2), torch.randn(16, 40, 5).cumsum(1) * 0.1

    def run(autocast: bool):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(params, targets, 0.5)
        (out - targets).abs().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = run(False)
    low, low_grads = run(True)
    assert low.dtype == torch.float32
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    for a, b in zip(full_grads, low_grads, strict=True):
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.99
    assert not torch.equal(low, full)  # the low-precision path really ran
