"""The stacked model and step: a member trained in a stack equals the same chain trained alone."""

import copy
import dataclasses

import pytest
import torch

import seqgen.model.cells.lstm as lstm_module
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.stacked import StackedGenerators, draw
from seqgen.training.losses import Objective, alpha_weights, make_loss
from seqgen.training.stacked_step import (
    StackedAdamW,
    StackedGradScaler,
    StackedPrecision,
    evaluate_stacked,
    stacked_precision,
    stacked_step,
)
from seqgen.training.step import (
    Precision,
    choose_precision,
    evaluate_loss,
    optimizer_step,
    sampling_generator,
    seed_epoch,
)

CPU = torch.device("cpu")
T, B, K, P = 12, 4, 3, 2
SHAPE = ModelConfig(n_components=K, n_params=P, hidden_size=8, num_layers=2, dropout=0.0)


@dataclasses.dataclass
class Chain:
    """One chain's settings, all different between the chains of these tests."""

    seed: int
    alpha: float
    max_lag: int
    lr: float
    weight_decay: float
    clip: float
    noise: float
    dropout: float
    ratio: float


CHAINS = [
    # pure MAE, its max_lag beyond the sequence (reported over the lags it has), no clipping
    Chain(0, 1.0, 20, 1e-2, 0.01, 1e9, 0.0, 0.0, 0.0),
    # pure autocorrelation, dropout and noise, teacher forcing half the time, clipped hard
    Chain(1, 0.0, 5, 3e-3, 0.0, 0.05, 0.1, 0.3, 0.5),
    Chain(2, 0.5, 3, 5e-3, 0.1, 0.5, 0.05, 0.2, 1.0),  # combined, always teacher-forced
]


def batches(steps, seed=10, members=3, accumulate_at=(2,)):
    """Per step a list of micro-batches (params (M,B,P), targets (M,B,T,K)): every member its own
    samples; two micro-batches at the steps in accumulate_at."""
    g = torch.Generator().manual_seed(seed)

    def one():
        return torch.randn(members, B, P, generator=g), torch.randn(members, B, T, K, generator=g)

    return [[one() for _ in range(2 if step in accumulate_at else 1)] for step in range(steps)]


def single_model(chain: Chain) -> StreamlinedSequenceGenerator:
    torch.manual_seed(chain.seed)
    return StreamlinedSequenceGenerator(dataclasses.replace(SHAPE, dropout=chain.dropout)).train()


def train_single(chain, model, m, steps, precision=None):
    """Today's training of one chain over member m's share of the batches: optimizer_step after
    seed_epoch's global seeding; the optimizer and the step results."""
    precision = precision or choose_precision(CPU, enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=chain.lr, weight_decay=chain.weight_decay)
    loss_fn = make_loss(chain.alpha, chain.max_lag)
    seed_epoch(chain.seed, 0)
    results = []
    for micro in steps:
        mine = [(p[m], y[m]) for p, y in micro]
        results.append(
            optimizer_step(
                model, loss_fn, mine, optimizer, precision, chain.ratio, chain.noise, chain.clip
            )
        )
    return optimizer, results


def make_stack(chains, models=None):
    models = models or [single_model(c) for c in chains]
    stack = StackedGenerators.from_models(models).train()
    optimizer = StackedAdamW(
        list(stack.parameters()), [c.lr for c in chains], [c.weight_decay for c in chains]
    )
    return stack, optimizer, stacked_loss(chains)


def stacked_loss(chains) -> Objective:
    return Objective([alpha_weights(c.alpha) for c in chains], [c.max_lag for c in chains])


def train_stack(chains, stack, optimizer, loss_fn, steps, precision=None, frozen=None, epoch=0):
    precision = precision or stacked_precision(choose_precision(CPU, False), len(chains))
    generators = [sampling_generator(c.seed, epoch, CPU) for c in chains]
    return [
        stacked_step(
            stack,
            loss_fn,
            micro,
            optimizer,
            precision,
            generators,
            [c.ratio for c in chains],
            [c.noise for c in chains],
            [c.clip for c in chains],
            frozen,
        )
        for micro in steps
    ]


def scaled_precision(dtype=None):
    return StackedPrecision(CPU, dtype, StackedGradScaler(3, CPU, enabled=True), str(dtype))


def assert_member_equals(stack, m, model, chain, atol=1e-5):
    for key, value in model.state_dict().items():
        if key == "head.bias" and chain.alpha == 0.0:
            # The autocorrelation does not see a constant shift: this gradient is zero up to
            # rounding, and Adam turns rounding noise into steps of +-lr. Not comparable.
            continue
        torch.testing.assert_close(stack.weight(key)[m], value, atol=atol, rtol=atol, msg=key)


def test_member_state_dict_is_the_single_models():
    model = single_model(CHAINS[1])
    single = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stack = StackedGenerators.from_models([single_model(CHAINS[0]), model])
    assert stack.shapes == single and list(stack.shapes) == list(single)  # keys, shapes, order
    # parameters() in the single model's order: optimiser state index i is the same weight
    single_order = [name for name, _ in model.named_parameters()]
    stack_order = [name for name, _ in stack.named_parameters()]
    assert stack_order == [name.replace(".", "_") for name in single_order]
    member = stack.member_state_dict(1)
    assert list(member) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(member[key], value), key
    assert stack.dropout == (0.0, 0.3) and stack.member_config(1) == model.config
    # a copy: saving a member must not write the whole stack, nor follow later updates
    assert member["cell.w_in"].untyped_storage().nbytes() == member["cell.w_in"].numel() * 4
    fresh = StreamlinedSequenceGenerator(model.config)
    fresh.load_state_dict(member)  # a model file of today's kind
    with pytest.raises(ValueError, match="missing keys \\['head.bias'\\]"):
        stack.load_member_state_dict(0, {k: v for k, v in member.items() if k != "head.bias"})
    bigger = StreamlinedSequenceGenerator(dataclasses.replace(SHAPE, hidden_size=16))
    with pytest.raises(ValueError, match="has shape"):
        StackedGenerators.from_models([model, bigger])


def test_member_draws_are_the_single_models_global_draws(monkeypatch):
    """A member's generator seeded x draws, bit for bit, what today's forward draws after
    torch.manual_seed(x): the noise, the teacher-forcing choices and the dropout masks."""
    seen = []
    real = lstm_module.autoregressive_lstm
    monkeypatch.setattr(lstm_module, "autoregressive_lstm", lambda *a: seen.append(a) or real(*a))
    chain = CHAINS[1]
    model = single_model(chain)
    params, targets = torch.randn(B, P), torch.randn(B, T, K)
    torch.manual_seed(7)
    expected = model(params, targets, chain.ratio, chain.noise)
    # the single model calls the recurrence as a stack of one: member 0 of each argument
    features, use_truth, drop = seen[0][1][0], seen[0][5][0], seen[0][8][0]

    stack = StackedGenerators.from_models([model]).train()
    g = torch.Generator().manual_seed(7)
    draws = draw(stack, [g], B, T, [chain.noise], [chain.ratio])
    got = stack(params[None], targets[None], torch.tensor([chain.ratio]), draws)
    assert torch.equal(draws.noise_y[0], features[:, :, 1 : 1 + K])
    assert torch.equal(draws.noise_p[0] + params, features[:, :, 1 + K :])
    assert torch.equal((draws.uniform[0] < chain.ratio).float(), use_truth)
    assert 0 < use_truth.mean() < 1
    assert torch.equal(draws.keep[0], drop)
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=1e-6)
    # another seed draws other numbers, and the predictions show it
    other = draw(stack, [torch.Generator().manual_seed(8)], B, T, [chain.noise], [chain.ratio])
    assert not torch.allclose(stack(params[None], targets[None], torch.tensor([0.5]), other), got)


def test_sampling_generator_is_seeded_as_seed_epoch():
    for seed, epoch in [(0, 0), (2, 37)]:
        seed_epoch(seed, epoch)
        expected = torch.rand(5)
        assert torch.equal(torch.rand(5, generator=sampling_generator(seed, epoch, CPU)), expected)


def test_eval_mode_has_no_noise_or_dropout_and_ratio_needs_draws_between_0_and_1():
    stack, _, _ = make_stack(CHAINS)
    params, targets = torch.randn(3, B, P), torch.randn(3, B, T, K)
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    noisy = draw(stack, g, B, T, [0.5] * 3, [1.0] * 3)
    stack.eval()
    ones = torch.ones(3)
    torch.testing.assert_close(stack(params, targets, ones, noisy), stack(params, targets, ones))
    free = stack(params, targets, torch.zeros(3))
    torch.testing.assert_close(free, stack(params, None, torch.zeros(3), seq_len=T))
    with pytest.raises(ValueError, match="between 0 and 1 needs draws"):
        stack(params, targets, torch.tensor([0.0, 0.5, 1.0]))
    stack.train()
    assert not torch.allclose(stack(params, targets, ones, noisy), stack(params, targets, ones))


def test_stacked_loss_is_each_members_loss():
    pred = torch.randn(3, 5, T, K, requires_grad=True)
    true = torch.randn(3, 5, T, K)
    result = stacked_loss(CHAINS)(pred, true)
    assert result.columns().shape == (3, 3) and result.total.shape == (3,)
    result.total.sum().backward()
    for m, chain in enumerate(CHAINS):
        p = pred.detach()[m].clone().requires_grad_(True)
        expected = make_loss(chain.alpha, chain.max_lag)(p[None], true[m][None])
        torch.testing.assert_close(result.columns()[m], expected.columns()[0], atol=1e-6, rtol=1e-6)
        expected.total.sum().backward()
        torch.testing.assert_close(pred.grad[m], p.grad, atol=1e-7, rtol=1e-6)
    # the pure MAE member reports autocorrelation but trains MAE only
    assert result.terms["autocorr"][0] > 0
    mae_grad = torch.autograd.grad((pred[0] - true[0]).abs().mean(), pred)[0][0]
    torch.testing.assert_close(pred.grad[0], mae_grad)
    with pytest.raises(ValueError, match="max_lag 12 must be below the sequence length 12"):
        stacked_loss(CHAINS[:1] + [dataclasses.replace(CHAINS[2], max_lag=12)])(pred[:2], true[:2])
    with pytest.raises(ValueError, match="the weight of autocorr cannot be negative"):
        Objective([alpha_weights(1.5)], [3])


def test_stack_of_three_equals_three_chains_trained_alone():
    """Different lr, weight decay, clipping, alpha, max_lag, noise, dropout and teacher forcing
    per member, a step with two micro-batches: weights, losses, norms and AdamW state within
    1e-5 of today's optimizer_step on each chain alone."""
    steps = batches(4)
    models = [single_model(c) for c in CHAINS]
    stack, optimizer, loss_fn = make_stack(CHAINS, [copy.deepcopy(m) for m in models])
    results = train_stack(CHAINS, stack, optimizer, loss_fn, steps)
    for m, (chain, model) in enumerate(zip(CHAINS, models, strict=True)):
        single_opt, single_results = train_single(chain, model, m, steps)
        for ours, theirs in zip(results, single_results, strict=True):
            ours = ours.members(loss_fn.names)[m]
            assert ours.finite and theirs.finite
            for field in ("loss", "terms", "grad_norm"):
                assert getattr(ours, field) == pytest.approx(getattr(theirs, field), rel=1e-5)
        assert_member_equals(stack, m, model, chain)
        ours_state, theirs_state = optimizer.member_state_dict(m), single_opt.state_dict()
        assert ours_state["param_groups"] == theirs_state["param_groups"]
        for i, state in theirs_state["state"].items():
            assert ours_state["state"][i]["step"] == state["step"] == 4
            for key in ("exp_avg", "exp_avg_sq"):
                got = ours_state["state"][i][key]
                torch.testing.assert_close(got, state[key], atol=1e-5, rtol=1e-5)
    assert bool(results[-1].stepped.all())
    # the clipping really differed: the hard-clipped member's pre-clip norm is above its limit
    assert results[0].grad_norm[1] > CHAINS[1].clip


def test_stack_of_one_is_todays_step():
    chain = CHAINS[2]
    steps = batches(3, members=1)
    model = single_model(chain)
    stack, optimizer, loss_fn = make_stack([chain], [copy.deepcopy(model)])
    results = train_stack([chain], stack, optimizer, loss_fn, steps)
    _, expected = train_single(chain, model, 0, steps)
    assert [r.members(loss_fn.names)[0].loss for r in results] == pytest.approx(
        [r.loss for r in expected]
    )
    assert_member_equals(stack, 0, model, chain, atol=1e-6)


def test_resume_from_per_member_state_equals_uninterrupted():
    """3 steps, every member's model, optimizer and scaler state saved in today's formats and
    loaded into a fresh stack, 2 more steps: the same as 5 steps without a break."""
    steps = batches(5, accumulate_at=())
    stack, optimizer, loss_fn = make_stack(CHAINS)
    train_stack(CHAINS, stack, optimizer, loss_fn, steps[:3], epoch=0)
    saved = [
        {"model": stack.member_state_dict(m), "optimizer": optimizer.member_state_dict(m)}
        for m in range(3)
    ]
    saved = torch.load(_saved(saved), weights_only=True)  # through a file, as checkpoints go
    train_stack(CHAINS, stack, optimizer, loss_fn, steps[3:], epoch=1)

    models = [single_model(c) for c in CHAINS]
    fresh, fresh_opt, _ = make_stack(CHAINS, models)
    for m, state in enumerate(saved):
        fresh.load_member_state_dict(m, state["model"])
        fresh_opt.load_member_state_dict(m, state["optimizer"])
        # today's AdamW takes the same state
        torch.optim.AdamW(models[m].parameters()).load_state_dict(state["optimizer"])
    train_stack(CHAINS, fresh, fresh_opt, loss_fn, steps[3:], epoch=1)
    for a, b in zip(stack.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.exp_avg_sq, fresh_opt.exp_avg_sq, strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.steps.tolist() == [5.0] * 3


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_frozen_member_is_untouched_and_the_others_go_on():
    """Frozen: its weights, AdamW state and GradScaler state stay as they were (the scaler on,
    in float32: it scales and unscales all the same)."""
    steps = batches(3)
    stack, optimizer, loss_fn = make_stack(CHAINS)
    free_stack, free_opt, _ = make_stack(CHAINS)
    precision = scaled_precision()
    before = stack.member_state_dict(1)
    frozen = [False, True, False]
    results = train_stack(CHAINS, stack, optimizer, loss_fn, steps, precision, frozen)
    train_stack(CHAINS, free_stack, free_opt, loss_fn, steps, scaled_precision())
    for key, value in before.items():
        assert torch.equal(stack.weight(key)[1], value), key
    assert optimizer.member_state_dict(1)["state"] == {} and optimizer.steps[1] == 0
    assert precision.scaler.growth_tracker.tolist() == [3, 0, 3]
    assert [r.stepped.tolist() for r in results] == [[True, False, True]] * 3
    for m in (0, 2):  # the others as if nothing were frozen
        for a, b in zip(stack.parameters(), free_stack.parameters(), strict=True):
            assert torch.equal(a[m], b[m])


def test_nonfinite_member_skips_alone():
    steps = batches(2, accumulate_at=())
    stack, optimizer, loss_fn = make_stack(CHAINS)
    steps[1][0][1][2, 0, 3, 1] = float("nan")  # a NaN target for member 2 at step 2
    before = stack.member_state_dict(2)
    results = train_stack(CHAINS, stack, optimizer, loss_fn, steps)
    assert results[1].finite.tolist() == [True, True, False]
    assert results[1].stepped.tolist() == [True, True, False]
    assert optimizer.steps.tolist() == [2.0, 2.0, 1.0]
    # the first step went on
    assert not torch.equal(stack.weight("cell.w_in")[2], before["cell.w_in"])
    assert all(torch.isfinite(p).all() for p in stack.parameters())


def scaler_state(scale: float) -> dict:
    return torch.amp.GradScaler("cpu", init_scale=scale).state_dict()


def test_fp16_overflow_skips_only_that_member():
    """CPU fp16 autocast with a GradScaler per member: member 1's scale is so large that its
    gradients overflow; it skips and backs off alone, the others step as today's GradScaler."""
    chains = [dataclasses.replace(c, dropout=0.0, noise=0.0) for c in CHAINS]
    steps = batches(3, accumulate_at=())
    huge = 2.0**40
    models = [single_model(c) for c in chains]
    model_copies = [copy.deepcopy(m) for m in models]
    stack, optimizer, loss_fn = make_stack(chains, [copy.deepcopy(m) for m in models])
    precision = scaled_precision(torch.float16)
    scaler = precision.scaler
    # member 1 overflows; the others start where fp16 gradients of this model stay finite (the
    # plain path's backward runs its GEMMs in fp16: torch's default 2^16 overflows there too)
    modest = 2.0**8
    for m, scale in enumerate([modest, huge, modest]):
        assert scaler.load_member_state_dict(m, scaler_state(scale)) == ""
    before = stack.member_state_dict(1)
    results = train_stack(chains, stack, optimizer, loss_fn, steps, precision=precision)
    assert [r.stepped.tolist() for r in results] == [[True, False, True]] * 3
    assert all(r.finite.all() for r in results)  # an overflow is the scaler's business
    assert not torch.isfinite(results[0].grad_norm[1])
    for key, value in before.items():
        assert torch.equal(stack.weight(key)[1], value), key
    for m, (chain, model) in enumerate(zip(chains, models, strict=True)):
        single_scaler = torch.amp.GradScaler("cpu", init_scale=huge if m == 1 else modest)
        single = Precision(CPU, torch.float16, single_scaler, "fp16")
        _, expected = train_single(chain, model, m, steps, precision=single)
        assert scaler.member_state_dict(m) == single_scaler.state_dict()
        if m == 1:
            continue
        # fp16 on CPU runs the plain path, which rounds its GEMM outputs to fp16: there a single
        # model's GEMMs and a stack's batched ones differ, and Adam at lr 0.01 turns that into
        # steps. A member equals its chain trained alone, as the trainer runs it: a stack of one.
        alone, alone_optimizer, alone_loss = make_stack([chain], [copy.deepcopy(model_copies[m])])
        alone_scaler = StackedGradScaler(1, CPU, enabled=True)
        alone_scaler.load_member_state_dict(0, scaler_state(modest))
        alone_precision = StackedPrecision(CPU, torch.float16, alone_scaler, "fp16")
        mine = [[(p[m : m + 1], y[m : m + 1]) for p, y in micro] for micro in steps]
        train_stack([chain], alone, alone_optimizer, alone_loss, mine, precision=alone_precision)
        for key in stack.shapes:
            assert torch.equal(stack.weight(key)[m], alone.weight(key)[0]), key
    assert scaler.member_state_dict(1)["scale"] == huge / 8


def test_scaler_grows_after_its_interval_and_converts():
    scaler = StackedGradScaler(2, CPU, enabled=True)
    torch_scaler = torch.amp.GradScaler("cpu")
    assert scaler.member_state_dict(0) == torch_scaler.state_dict()
    for _ in range(scaler.growth_interval):
        scaler.update(torch.tensor([False, False]), torch.tensor([True, False]))
    assert scaler.scale.tolist() == [2.0**17, 2.0**16]
    scaler.update(torch.tensor([True, True]), torch.tensor([True, True]))
    assert scaler.scale.tolist() == [2.0**16, 2.0**15]
    torch_scaler.load_state_dict(scaler.member_state_dict(1))
    fresh = StackedGradScaler(2, CPU, enabled=True)
    fresh.load_member_state_dict(1, torch_scaler.state_dict())
    assert fresh.member_state_dict(1) == scaler.member_state_dict(1)
    off = StackedGradScaler(2, CPU, enabled=False)
    assert off.member_state_dict(0) == torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert "starting at scale 65536" in fresh.load_member_state_dict(0, {})


def test_evaluate_stacked_is_evaluate_loss_per_member():
    models = [single_model(c) for c in CHAINS]
    stack, _, loss_fn = make_stack(CHAINS, [copy.deepcopy(m) for m in models])
    params, targets = torch.randn(600, P), torch.randn(600, T, K)  # two evaluation batches
    precision = stacked_precision(choose_precision(CPU, False), 3)
    for ratio in (0.0, 1.0):
        shared = params.expand(3, -1, -1), targets.expand(3, -1, -1, -1)
        got = evaluate_stacked(stack, loss_fn, *shared, ratio, precision)
        assert stack.training
        for m, (chain, model) in enumerate(zip(CHAINS, models, strict=True)):
            loss = make_loss(chain.alpha, chain.max_lag)
            want = evaluate_loss(model, loss, params, targets, ratio, choose_precision(CPU, False))
            assert got.columns()[m].tolist() == pytest.approx(want.columns()[0].tolist(), rel=1e-5)
