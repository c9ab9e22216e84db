"Score-optimal sampling times: the cost against closed forms, Algorithm 1 against a known answer, the grids' invariants, the online blend, bad input."
import math
from functools import partial
import pytest
import torch
from mulan_nb.diffusion import alpha_sigma, levels_to_data
from mulan_nb.reference import GaussianModel
from mulan_nb.model import MuLAN
from mulan_nb.score_optimal import (incremental_cost, step_costs, cost_ratio, cumulative_length, optimal_times, edm_times,
                                    hand_tuned_times, blend_times, OnlineTimes, plot_step_costs)


Gaussian = partial(GaussianModel, gamma_min=-8., gamma_max=5.)   # the shared reference model on γ from -8 to 5


@pytest.fixture(scope='module')
def gauss():
    torch.manual_seed(3)
    return Gaussian(0.3 * torch.randn(1, 2, 2), 0.05 + 0.1 * torch.rand(1, 2, 2))


@torch.no_grad()
def population_cost(model, t_from, t_to):
    "L(t_from, t_to) for Gaussian data, averaged over the data distribution as well: σ'² E[(A z + B)²], z ~ N(α μ, v)."
    (a, s), (a2, s2) = alpha_sigma(model.gamma(torch.tensor([t_from]))[0]), alpha_sigma(model.gamma(torch.tensor([t_to]))[0])
    v, v2 = a**2 * model.s**2 + s**2, a2**2 * model.s**2 + s2**2
    A, B = 1 / v - 1 / v2, a2 * model.mu / v2 - a * model.mu / v
    return (s2**2 * ((A * a * model.mu + B)**2 + A**2 * v)).sum().item()


def test_cost_matches_the_gaussian_closed_form_with_per_dimension_sigma(gauss):
    grid = torch.tensor([0., 0.1, 0.3, 0.5, 0.7, 1.])
    est = incremental_cost(gauss, gauss.data(6000), grid, n_repeats=2, generator=torch.Generator().manual_seed(1))
    exact = torch.tensor([population_cost(gauss, b.item(), a.item()) for a, b in zip(grid[:-1], grid[1:])], dtype=torch.float64)
    assert est.shape == (5,) and est.dtype == torch.float64
    assert torch.allclose(est, exact, rtol=0.06), (est, exact)


def test_cost_falls_like_the_square_of_the_step(gauss):
    x = gauss.data(1000)
    c = [incremental_cost(gauss, x, torch.tensor([0., .5, .5 + d, 1.]), generator=torch.Generator().manual_seed(2))[1].item() for d in (0.02, 0.01)]
    assert 3.5 < c[0] / c[1] < 4.5


def test_scalar_schedule_weight_is_sigma_of_the_target_time():
    "With a scalar schedule the cost is σ(t')² E‖s_t' - s_t‖², computed here from scores of point-mass data."
    mu, s = torch.zeros(1, 1, 3), torch.full((1, 1, 3), 1e-3)
    model = Gaussian(mu, s, linear=True)
    t_from, t_to = 0.6, 0.4
    est = incremental_cost(model, model.data(4000), torch.tensor([0., t_to, t_from, 1.]), generator=torch.Generator().manual_seed(3))[1].item()
    assert math.isclose(est, population_cost(model, t_from, t_to), rel_tol=0.05)


def test_optimal_times_recovers_a_known_grid():
    fine = torch.linspace(0, 1, 4001, dtype=torch.float64)
    for T in (5, 10, 37):   # Λ(t) = t³ ⇒ t_i = (i/T)^(1/3)
        t = optimal_times(fine, (fine[1:]**3 - fine[:-1]**3)**2, T)
        assert torch.allclose(t, (torch.arange(T + 1, dtype=torch.float64) / T)**(1 / 3), atol=1e-4)
    cost = torch.rand(400, generator=torch.Generator().manual_seed(0)).double() + 0.1
    grid = torch.linspace(0, 1, 401, dtype=torch.float64)
    assert torch.allclose(optimal_times(grid, cost, 20), optimal_times(grid, 123. * cost, 20))


@pytest.mark.parametrize('seed', range(5))
def test_optimised_grid_is_strictly_increasing_with_fixed_ends(seed):
    g = torch.Generator().manual_seed(seed)
    M = int(torch.randint(3, 300, (1,), generator=g))
    grid = torch.cat([torch.zeros(1), torch.rand(M - 1, generator=g).sort().values, torch.ones(1)])
    cost = torch.rand(M, generator=g) ** 8 * (torch.rand(M, generator=g) > 0.3)   # spiky, with zeros
    cost[0] = cost[0] + 1e-3
    for T in (1, 2, 10, 100, 1000):
        t = optimal_times(grid, cost, T)
        assert t.shape == (T + 1,) and t.dtype == torch.float32
        assert t[0].item() == 0. and t[-1].item() == 1. and (t.diff() > 0).all()
        lam = cumulative_length(grid, cost)
        assert lam[0] == 0 and (lam.diff() > 0).all()


@pytest.mark.parametrize('linear, T, factor', [(True, 10, 100), (True, 20, 100), (False, 20, 50)])
def test_optimised_grid_has_flatter_step_costs_than_uniform(linear, T, factor):
    "Max/min of a fresh estimate of the cost of each step (the first step, into t = 0, is weighted by the small σ(0)² and comes out cheapest)."
    torch.manual_seed(3)
    model = Gaussian(0.3 * torch.randn(1, 2, 2), 0.05 + 0.1 * torch.rand(1, 2, 2), linear=linear)
    x = model.data(2000)
    fine = torch.linspace(0, 1, 201)
    cost = incremental_cost(model, x[:300], fine, generator=torch.Generator().manual_seed(4))
    uniform, optimised = torch.linspace(0, 1, T + 1), optimal_times(fine, cost, T)
    r_uniform, r_optimised = [cost_ratio(step_costs(model, x, t, generator=torch.Generator().manual_seed(5))) for t in (uniform, optimised)]
    print(f"{'linear' if linear else 'polynomial'} schedule, T = {T}: max/min cost per step, uniform {r_uniform:.1f}, optimised {r_optimised:.2f}")
    assert r_optimised < 20 and r_uniform > factor * r_optimised


def test_edm_times_on_a_linear_schedule_match_the_closed_form():
    model = Gaussian(torch.zeros(1, 1, 2), torch.ones(1, 1, 2), linear=True)
    T, rho = 12, 7.
    sig = torch.linspace(math.exp(5. / (2 * rho)), math.exp(-8. / (2 * rho)), T + 1, dtype=torch.float64)**rho
    assert torch.allclose(hand_tuned_times(model, T, rho).double(), ((2 * sig.log() + 8.) / 13.).flip(0), atol=1e-5)
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(edm_times(-8. + 13. * grid, grid, 4, rho=1e6), torch.linspace(0, 1, 5, dtype=torch.float64), atol=1e-4)   # ρ → ∞: uniform in log σ


def test_with_a_latent_model_the_same_c_serves_both_times_and_the_mode_is_restored():
    model = MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1).train()
    seen = []
    gamma = model.gamma
    def spy(t, c=None):
        seen.append(c.clone()); return gamma(t, c)
    model.gamma = spy
    x = torch.randint(0, 17, (5, 1, 8, 8))
    cost = incremental_cost(model, x, torch.linspace(0, 1, 5), batch_size=7)
    assert cost.shape == (4,) and torch.isfinite(cost).all() and (cost > 0).all()
    assert model.training
    assert seen and all(c is not None and len(c) % 2 == 0 for c in seen), 'gamma was not called with a latent'   # else the loop below checks nothing
    assert len(seen) == -(-4 * 5 // 7)   # one call per batch of (interval, image) pairs: ceil(20 / 7)
    for c in seen:
        first, second = c.chunk(2)
        assert torch.equal(first, second)
    t = hand_tuned_times(model, 8, resolution=100)
    assert t[0].item() == 0 and t[-1].item() == 1 and (t.diff() > 0).all()


def test_blend_and_online_updates(gauss):
    a, b = torch.linspace(0, 1, 7), torch.tensor([0., .001, .002, .003, .5, .99, 1.])
    for w in (0., 0.05, 0.3, 1.):
        ab = blend_times(a, b, w)
        assert ab[0].item() == 0 and ab[-1].item() == 1 and (ab.diff() > 0).all()
        assert torch.allclose(ab, w * b + (1 - w) * a)
    x = gauss.data(300)
    online = OnlineTimes(T=6, weight=0.1, warmup=3, refine=2)
    for _ in range(3): assert torch.equal(online.update(gauss, x), torch.linspace(0, 1, 7))
    grid = online.estimate_grid()
    assert len(grid) == 13 and torch.allclose(grid, torch.linspace(0, 1, 13))
    target = optimal_times(grid, incremental_cost(gauss, x, grid, generator=torch.Generator().manual_seed(8)), 6)
    new = online.update(gauss, x, torch.Generator().manual_seed(8))
    assert torch.allclose(new, 0.1 * target + 0.9 * torch.linspace(0, 1, 7), atol=1e-6)
    state = online.state_dict()
    other = OnlineTimes()
    other.load_state_dict(state)
    assert torch.equal(other.times, online.times) and other.n_updates == 4 and other.T == 6 and other.refine == 2
    state['times'][3] = 5.   # the state is a copy
    assert online.times[3] < 1


def test_optimised_grid_samples_from_a_checkpoint(tiny_checkpoint):
    from mulan_nb.sampling import sample
    from mulan_nb.model import model_from_checkpoint
    "The sampler walks the optimised grid (every recorded state at its times, t = 1 down to 0), the grid changes the samples, and each level is the one nearest to z_0."
    model, _ = model_from_checkpoint(tiny_checkpoint)
    model.eval()
    x = torch.randint(0, 17, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    fine = torch.linspace(0, 1, 21)
    t = optimal_times(fine, incremental_cost(model, x, fine, generator=torch.Generator().manual_seed(1)), 6)
    assert (t - torch.linspace(0, 1, 7)).abs().max() > 0.01, t   # not the uniform grid, or the comparison below says nothing
    states = []
    out, z0 = sample(model, 4, T=6, times=t, generator=torch.Generator().manual_seed(0), return_z0=True, states=states)
    assert torch.equal(torch.stack([s for s, _ in states]), t.flip(0)) and torch.equal(states[-1][1], z0)
    assert not torch.equal(out, sample(model, 4, T=6, generator=torch.Generator().manual_seed(0)))
    alpha0, _ = alpha_sigma(torch.tensor(model.schedule.gamma_min))   # fixed ends: γ(c, 0) = γ_min for every c
    assert model.schedule.fixed_ends and out.shape == (4, 1, 8, 8)
    assert torch.equal(out, ((z0 / alpha0 + 1) * 17 / 2 - 0.5).round().clamp(0, 16).long())


def test_plot_writes_a_png(tmp_path):
    grids = {'uniform': torch.linspace(0, 1, 5), 'optimised': torch.tensor([0., .1, .2, .4, 1.])}
    costs = {'uniform': torch.tensor([1., 2., 3., 40.]), 'optimised': torch.tensor([1., 1.1, 1., 1.2])}
    plot_step_costs(grids, costs, tmp_path / 'c.png', 'test')
    assert (tmp_path / 'c.png').stat().st_size > 5000


GRID = torch.linspace(0, 1, 5)
COST = torch.ones(4)

@pytest.mark.parametrize('call, words', [
    (lambda m: optimal_times(torch.tensor([0., .5, .4, 1.]), torch.ones(3), 4), 'increase strictly'),
    (lambda m: optimal_times(torch.tensor([0., .5, .9]), torch.ones(2), 4), 'end at exactly 1'),
    (lambda m: optimal_times(torch.tensor([.1, .5, 1.]), torch.ones(2), 4), 'start at exactly 0'),
    (lambda m: optimal_times(GRID, torch.ones(3), 4), 'one value per interval'),
    (lambda m: optimal_times(GRID, -COST, 4), '>= 0'),
    (lambda m: optimal_times(GRID, COST * float('nan'), 4), 'finite'),
    (lambda m: optimal_times(GRID, 0 * COST, 4), 'zero on every interval'),
    (lambda m: optimal_times(GRID, COST, 0), 'T (steps)'),
    (lambda m: optimal_times(GRID, COST, 2.5), 'T (steps)'),
    (lambda m: incremental_cost(m, m.data(3).float(), GRID), 'integer levels'),
    (lambda m: incremental_cost(m, m.data(3)[:, 0], GRID), 'shape'),
    (lambda m: incremental_cost(m, m.data(3), GRID, n_repeats=0), 'n_repeats'),
    (lambda m: incremental_cost(m, m.data(3), torch.tensor([[0., 1.]])), '1-D'),
    (lambda m: blend_times(GRID, torch.linspace(0, 1, 4), 0.1), 'must have 5 points'),
    (lambda m: blend_times(GRID, GRID, 1.5), 'weight'),
    (lambda m: OnlineTimes(T=4, weight=0.), 'weight'),
    (lambda m: OnlineTimes(T=4, times=torch.linspace(0, 1, 3)), 'must have 5 points'),
    (lambda m: edm_times(torch.zeros(5), GRID, 4), 'increase strictly'),
    (lambda m: hand_tuned_times(m, 4, rho=0.), 'rho'),
])
def test_bad_input_raises_value_error_naming_the_problem(gauss, call, words):
    with pytest.raises(ValueError, match=None) as e: call(gauss)
    assert words in str(e.value), str(e.value)
