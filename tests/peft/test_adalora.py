"""AdaLoRA: geometry matrix, budget schedule, masking under Adam, rank_pattern save/load,
orthogonality penalty, error paths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from liegroup.errors import AdapterStateError, CheckpointError, ConfigError
from liegroup.peft import LieRAConfig, LieRAModel, RankAllocator, get_peft_model
from liegroup.peft.generators import AdaLoRAGenerator, budget_schedule, orthogonality_penalty
from tests.peft._matrix import FAST_MAPS, SLOW_MAPS, check_generator_case
from tests.peft.test_layer_geometry import CASES, DT, EQUAL_KERNEL


def _ref(p, s, shape):
    return (s * (p["P"] * p["lam"]) @ p["Q"]).reshape(shape)


def _rand(gen):
    with torch.no_grad():
        gen.lam.normal_(0, 0.3)
        gen.P.add_(0.1 * torch.randn_like(gen.P))


def _params(maps):
    out = []
    for case in CASES:
        for g, m in maps:
            out.append(pytest.param(case, g, m, "mode1", id=f"{case}-{g}-{m}-mode1"))
        if case in EQUAL_KERNEL and "conv" in case:
            out.append(pytest.param(case, "hadamard", "exact", "loralib",
                                    id=f"{case}-loralib"))
    return out


@pytest.mark.parametrize(("case", "group", "exp_map", "layout"), _params(FAST_MAPS))
def test_geometry_matrix(case, group, exp_map, layout):
    check_generator_case(case, group, exp_map, "adalora", _rand, _ref, layout=layout)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "group", "exp_map", "layout"), _params(SLOW_MAPS))
def test_geometry_matrix_taylor(case, group, exp_map, layout):
    check_generator_case(case, group, exp_map, "adalora", _rand, _ref, layout=layout)


def _paper_budget(t, b0, bT, ti, tf, T):
    """AdaLoRA (Zhang et al. 2023), Eq. (12), written out independently."""
    if t < ti:
        return b0
    if t >= T - tf:
        return bT
    return bT + math.floor((b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** 3)


@pytest.mark.parametrize(("b0", "bT", "ti", "tf", "T"),
                         [(24, 8, 5, 7, 60), (12, 0, 0, 0, 17), (100, 37, 13, 2, 211)])
def test_budget_schedule_matches_formula_every_step(b0, bT, ti, tf, T):
    got = [budget_schedule(t, b0, bT, ti, tf, T) for t in range(T + 5)]
    want = [_paper_budget(t, b0, bT, ti, tf, T) for t in range(T + 5)]
    assert got == want
    assert all(a >= b for a, b in itertools.pairwise(got))  # non-increasing
    assert got[0] == b0 and got[-1] == bT


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, groups=6, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(h.flatten(1))


def _setup(exp_map="exact", rank=4, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(
        Net().to(DT),
        LieRAConfig(rank=rank, alpha=4.0, generator="adalora", exp_map=exp_map,
                    target_modules=["conv", "dw", "fc"]),
    )
    x = torch.randn(16, 4, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def _gens(model):
    return {n: layer.generators["default"] for n, layer in model.lie_layers()}


@pytest.mark.parametrize("exp_map", ["exact", "first_order"])
@pytest.mark.parametrize("pass_optimizer", [True, False])
def test_masked_triplets_stay_zero_under_adam(exp_map, pass_optimizer):
    model, x, y = _setup(exp_map)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    T = 60
    alloc = RankAllocator(model.generators(), target_r=2, tinit=5, tfinal=10, deltaT=5,
                          total_step=T,
                          optimizer=opt if pass_optimizer else None)
    assert alloc.init_budget == 12 and alloc.target_budget == 6
    gens = _gens(model)
    ever_masked = False
    for t in range(T):
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.1 * orthogonality_penalty(model.generators())
        loss.backward()
        opt.step()
        masks_before = {n: g.rank_mask.clone() for n, g in gens.items()}
        applied = alloc.step(t)
        opt.zero_grad()
        kept = sum(int(g.rank_mask.sum()) for g in gens.values())
        if applied is not None:
            assert applied == alloc.budget(t) == kept
        else:
            # between masking steps the masks do not change
            assert all(torch.equal(masks_before[n], g.rank_mask) for n, g in gens.items())
        for g in gens.values():
            m = ~g.rank_mask
            ever_masked |= bool(m.any())
            assert torch.all(g.effective_lambda()[m] == 0)
            # the gradient that reached masked λ (this step) is exactly zero
            if pass_optimizer:
                assert torch.all(g.lam.detach()[m] == 0)  # raw λ too: Adam state was reset
    assert ever_masked
    pattern = alloc.rank_pattern
    assert pattern is not None and sum(sum(v) for v in pattern.values()) == 6
    # a masked triplet contributes nothing: dropping it leaves the output unchanged
    with torch.no_grad():
        out = model(x)
        for g in gens.values():
            g.P[:, ~g.rank_mask] = 123.0
            g.Q[~g.rank_mask] = -7.0
        assert torch.equal(model(x), out)


def test_masked_lambda_gets_zero_gradient():
    model, x, y = _setup()
    g = _gens(model)["fc"]
    with torch.no_grad():
        g.lam.normal_()
        g.rank_mask[1] = False
    nn.functional.cross_entropy(model(x), y).backward()
    assert g.lam.grad[1] == 0 and g.lam.grad.abs().sum() > 0
    assert torch.all(g.P.grad[:, 1] == 0) and torch.all(g.Q.grad[1] == 0)


def _train_to_pattern(model, x, y, T=30):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    alloc = RankAllocator(model.generators(), target_r=2, tinit=3, tfinal=5, deltaT=3,
                          total_step=T, optimizer=opt)
    for t in range(T):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        alloc.step(t)
        opt.zero_grad()
    return alloc


def test_rank_pattern_round_trip_with_pruned_tensors(tmp_path):
    model, x, y = _setup()
    pattern = _train_to_pattern(model, x, y).rank_pattern
    assert pattern is not None and not all(all(v) for v in pattern.values())
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, keep in pattern.items():
        k = sum(keep)
        assert saved[f"{name}.lam"].shape == (k,)
        assert saved[f"{name}.P"].shape[1] == k and saved[f"{name}.Q"].shape[0] == k
    cfg = LieRAConfig.load(tmp_path)
    assert cfg.rank_pattern == pattern

    torch.manual_seed(99)
    fresh = Net().to(DT)
    fresh.load_state_dict(model.unload().state_dict())
    loaded = LieRAModel.from_pretrained(fresh, tmp_path)
    for name, g in _gens(loaded).items():
        assert g.n_triplets == sum(pattern[name])
        assert g.rank_pattern() == pattern[name]
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, rtol=0, atol=1e-12)
    # saving the pruned model again writes the same pattern (original numbering)
    loaded.save_pretrained(tmp_path / "again")
    assert LieRAConfig.load(tmp_path / "again").rank_pattern == pattern


def test_rank_pattern_that_does_not_fit_is_refused(tmp_path):
    model, x, y = _setup()
    _train_to_pattern(model, x, y)
    model.save_pretrained(tmp_path)
    cfg = LieRAConfig.load(tmp_path)
    d = cfg.to_dict()
    d["rank_pattern"]["fc"] = [True]  # wrong length
    bad = tmp_path / "bad"
    bad.mkdir()
    LieRAConfig.from_dict(d).save(bad)
    (bad / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        LieRAModel.from_pretrained(Net().to(DT), bad)


def test_orthogonality_penalty_zero_iff_orthonormal():
    model, _x, _y = _setup()
    assert orthogonality_penalty(model.generators()).item() < 1e-24  # orthonormal init
    g = _gens(model)["conv"]
    with torch.no_grad():
        g.P.mul_(1.1)
    pen = orthogonality_penalty(model.generators())
    assert pen.item() > 1e-3
    pen.backward()
    assert g.P.grad is not None and g.P.grad.abs().max() > 0


def test_penalty_and_allocator_need_adalora():
    m = get_peft_model(nn.Sequential(nn.Linear(3, 3)), LieRAConfig(rank=1, target_modules=["0"]))
    with pytest.raises(ConfigError, match="AdaLoRA"):
        orthogonality_penalty(m.generators())
    with pytest.raises(ConfigError, match="AdaLoRA"):
        RankAllocator(m.generators(), target_r=1, tinit=0, tfinal=0, deltaT=1, total_step=5)


@pytest.mark.parametrize("kw", [
    {"total_step": 10, "tinit": 5, "tfinal": 5},
    {"deltaT": 0},
    {"beta1": 1.0},
    {"target_r": 9},
    {"tinit": -1},
])
def test_allocator_bad_arguments(kw):
    model, _, _ = _setup()
    args = {"target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 1, "total_step": 20} | kw
    with pytest.raises(ConfigError):
        RankAllocator(model.generators(), **args)


def test_allocator_step_without_gradients_raises():
    model, _, _ = _setup()
    alloc = RankAllocator(model.generators(), target_r=2, tinit=2, tfinal=2, deltaT=1,
                          total_step=20)
    with pytest.raises(AdapterStateError, match="backward"):
        alloc.step(0)


def test_adalora_dropout_acts_on_Q():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 4)),
                           LieRAConfig(rank=2, generator="adalora", dropout=0.5,
                                       target_modules=["0"]))
    g = _gens(model)["0"]
    assert isinstance(g, AdaLoRAGenerator)
    with torch.no_grad():
        g.lam.fill_(1.0)
    model.train()
    _, R = g.factors()
    assert (R == 0).any()  # dropped entries of Q
    model.eval()
    _L, R = g.factors()
    assert torch.equal(R, g.Q)
