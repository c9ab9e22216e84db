"Likelihood: the probability-flow ODE and the ELBO against closed forms, Hutchinson against exact, and bad input."
import math
import pytest, torch
from sklearn.datasets import load_digits
from mulan_nb.reference import correlated_gaussian
from mulan_nb.pf_ode import pf_ode_logp, mean_gamma_clock
from mulan_nb.dequantization import dequantize, iw_bound, DEQUANTIZATIONS
from mulan_nb.likelihood import ode_bpd, dense_elbo
from mulan_nb.model import MuLAN
from mulan_nb.schedules import GAMMA_MIN, GAMMA_MAX
from mulan_nb.diffusion import alpha_sigma, levels_to_data
from mulan_nb.bound import nats_to_bpd

F64, D = torch.float64, 6
ZERO, ONE = torch.tensor(0., dtype=F64), torch.tensor(1., dtype=F64)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "ODE solves are many small ops: one thread is fastest, and robust to a busy machine; restored afterwards."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


gaussian_reference = correlated_gaussian   # D = 6 correlated dimensions, a 'linear' or 'multivariate' schedule
TIGHT = dict(method='dopri5', rtol=1e-5, atol=1e-5)   # a smooth closed-form field: here the fifth order beats the default bosh3


def start(ref, n, seed=1):
    "n draws of z_0 from the exact marginal at t = 0."
    torch.manual_seed(seed)
    return torch.distributions.MultivariateNormal(*ref.marginal(ZERO)).sample((n,))


def error_per_dim(ref, z0, result):
    "|ODE − exact| log p_0 per example, nats per dimension, with the exact terminal density swapped in."
    return (ref.logp(result.z1, ONE) + result.delta_logp - ref.logp(z0, ZERO)).abs() / D


@pytest.mark.parametrize('variable', ['t', 'gamma'])
@pytest.mark.parametrize('kind', ['linear', 'multivariate'])
def test_exact_divergence_ode_recovers_the_exact_log_density(kind, variable):
    ref = gaussian_reference(kind)
    z0 = start(ref, 16)
    r = pf_ode_logp(z0, ref.eps, ref.gamma_fn, variable=variable, **TIGHT)
    assert error_per_dim(ref, z0, r).max() < 1e-3
    default = pf_ode_logp(z0, ref.eps, ref.gamma_fn, variable=variable)   # bosh3 at 2e-4: the accuracy of RK45 at 1e-5 on a trained model
    assert error_per_dim(ref, z0, default).max() < 1e-2
    assert r.logp.shape == (16,) and r.z1.shape == z0.shape and r.nfe > 0


def test_hutchinson_mean_over_probes_recovers_the_exact_log_density():
    ref = gaussian_reference('multivariate')
    z0 = start(ref, 4)
    r = pf_ode_logp(z0, ref.eps, ref.gamma_fn, 'hutchinson', n_probes=16384, variable='gamma', generator=torch.Generator().manual_seed(2), **TIGHT)
    assert error_per_dim(ref, z0, r).max() < 1e-3


def test_hutchinson_approaches_the_exact_divergence_as_probes_grow():
    ref = gaussian_reference('linear')
    z0 = start(ref, 8)
    exact = pf_ode_logp(z0, ref.eps, ref.gamma_fn, **TIGHT).delta_logp
    rms = {P: (pf_ode_logp(z0, ref.eps, ref.gamma_fn, 'hutchinson', P, generator=torch.Generator().manual_seed(3), **TIGHT).delta_logp - exact).pow(2).mean().sqrt().item()
           for P in (1, 64, 4096)}
    assert rms[4096] < rms[64] < rms[1], rms
    assert rms[4096] < rms[1] / 16, rms   # ~ 1/sqrt(P): 64 expected
    assert rms[4096] / D < 1e-3, rms


def test_gamma_clock_cuts_evaluations_for_a_multivariate_schedule():
    ref = gaussian_reference('multivariate')
    z0 = start(ref, 8)
    nfe = {v: pf_ode_logp(z0, ref.eps, ref.gamma_fn, variable=v, **TIGHT).nfe for v in ('t', 'gamma')}
    assert nfe['gamma'] < nfe['t'], nfe


def test_mean_gamma_clock_inverts_the_mean_gamma():
    gamma_fn = gaussian_reference('multivariate').gamma_fn
    clock = mean_gamma_clock(gamma_fn)
    for s in torch.linspace(0, 1, 11, dtype=F64):
        t, dt_ds = clock(s)
        assert abs(gamma_fn(t)[0].mean().item() - (GAMMA_MIN + s.item() * (GAMMA_MAX - GAMMA_MIN))) < 1e-9
        assert 0 <= t.item() <= 1 and dt_ds > 0


@pytest.mark.parametrize('kind', ['linear', 'multivariate'])
def test_elbo_is_above_the_exact_nll_by_the_endpoint_mismatch(kind):
    "NELBO and -log q(f) are quadratic in f: their averages are exact over the 2D sigma points μ ± sqrt(D) L[:, i]."
    ref = gaussian_reference(kind)
    L = torch.linalg.cholesky(ref.cov)
    sigma_points = ref.mean + math.sqrt(D) * torch.cat([L.T, -L.T])
    nll = -torch.distributions.MultivariateNormal(ref.mean, ref.cov).log_prob(sigma_points)
    gap = (sum(ref.nelbo(sigma_points, n_t=1024).values()) - nll).mean().item()
    predicted = (ref.prior_mismatch() + ref.decoder_mismatch()).item()
    assert predicted > 0 and abs(gap - predicted) < 1e-7, (gap, predicted)
    assert predicted / D < 1e-3   # close: under a thousandth of a nat per dimension


def test_elbo_with_the_optimal_denoiser_does_not_depend_on_the_path():
    lin, multi = gaussian_reference('linear'), gaussian_reference('multivariate')
    f = torch.distributions.MultivariateNormal(lin.mean, lin.cov).sample((50,))
    assert torch.allclose(sum(lin.nelbo(f).values()), sum(multi.nelbo(f).values()), atol=1e-5)


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=0)


@pytest.fixture(scope='module')
def digits():
    return torch.from_numpy(load_digits().images[:2]).long()[:, None]


@pytest.mark.parametrize('kind', DEQUANTIZATIONS)
def test_untrained_digits_ode_bpd_matches_its_closed_form(small, digits, kind):
    "At initialisation ε̂ = z: z_1 = z_0 (1 + σ_1)/(1 + σ_0) in every dimension."
    r = ode_bpd(small, digits, kind, n_samples=2, divergence='hutchinson', rtol=1e-7, atol=1e-7, method='dopri5', generator=torch.Generator().manual_seed(5))
    g_min, g_max = small.config.gamma_min, small.config.gamma_max
    gen = torch.Generator().manual_seed(5)
    small.encode(digits, gen)   # ode_bpd draws c first from its generator, then the dequantization
    z, log_q = dequantize(digits, 17, torch.tensor(g_min), kind, 2, gen)
    s0, s1 = alpha_sigma(torch.tensor([g_min, g_max], dtype=F64))[1]
    k = math.log((1 + s1) / (1 + s0))
    log_p = torch.distributions.Normal(0., 1.).log_prob(z * math.exp(k)).flatten(2).sum(2) + 64 * k
    assert torch.allclose(r.data_bpd, nats_to_bpd(-iw_bound(log_p, log_q), 64), atol=1e-5)
    assert torch.isfinite(r.bpd).all() and len(r.nfe) == 2 and r.c.shape == (2, 8) and 'bound' in r.note


def exact_flow_data_bpd(model, x, seed):
    "`data_bpd` of GaussianModel's exact flow from the z_0 ode_bpd draws with a generator seeded `seed` (uniform, one sample): per dimension (z_t − α_t μ)/√v_t is constant, v_t = α_t² s² + σ_t²."
    from mulan_nb.likelihood import model_ode_fns
    gamma_fn = model_ode_fns(model, None, len(x))[1]
    (a0, s0), (a1, s1) = (alpha_sigma(gamma_fn(torch.tensor(t, dtype=F64))[0]) for t in (0., 1.))
    mu, s = model.mu.double(), model.s.double()
    v0, v1 = a0**2 * s**2 + s0**2, a1**2 * s**2 + s1**2
    z0, log_q = dequantize(x, model.config.K, gamma_fn(ZERO)[0], 'uniform', 1, torch.Generator().manual_seed(seed))
    z1 = a1 * mu + (v1 / v0).sqrt() * (z0[0] - a0 * mu)
    logp = torch.distributions.Normal(0., 1.).log_prob(z1).flatten(1).sum(1) + 0.5 * (v1 / v0).log().flatten(1).sum(1)
    return nats_to_bpd(-(logp - log_q[0]), z1[0].numel())


@pytest.mark.parametrize('method, tol', [('dopri5', 1e-4), ('dopri5', 1e-3), ('bosh3', 1e-3), ('bosh3', 3e-3)])
def test_solver_error_estimate_tracks_the_error_against_the_exact_flow(method, tol):
    "A multivariate random schedule and a field nonlinear in t: the estimate is within a quarter of the actual error, per image."
    from mulan_nb.reference import GaussianModel
    torch.manual_seed(3)
    gauss = GaussianModel(0.4 * torch.randn(1, 2, 3), 0.05 + 0.3 * torch.rand(1, 2, 3), seed=2)
    x = gauss.data(5, seed=4)
    with torch.no_grad(): exact = exact_flow_data_bpd(gauss, x, 0)
    r = ode_bpd(gauss, x, method=method, rtol=tol, atol=tol, check_images=5, generator=torch.Generator().manual_seed(0))
    actual = r.data_bpd - exact
    assert actual.abs().max() > 1e-4   # well above rounding
    assert (r.solver_error - actual).abs().max() < 0.25 * actual.abs().max(), (actual, r.solver_error)
    assert abs(r.checked.abs().mean() - actual.abs().mean()) < 0.25 * actual.abs().mean()
    tight = ode_bpd(gauss, x, method=method, rtol=tol / 100, atol=tol / 100, generator=torch.Generator().manual_seed(0))
    assert (tight.data_bpd - exact).abs().max() < 0.1 * actual.abs().max()   # the closed form is what the solver converges to


def test_solver_error_is_estimated_on_the_first_images_only(small, digits):
    r = ode_bpd(small, digits, divergence='hutchinson', generator=torch.Generator().manual_seed(5))
    assert not r.solver_error[0].isnan() and r.solver_error[1:].isnan().all() and len(r.check_nfe) == 1 and r.check_nfe[0] > r.nfe[0]   # a tenth of the tolerance: more steps
    none = ode_bpd(small, digits, divergence='hutchinson', check_images=0, generator=torch.Generator().manual_seed(5))
    assert none.solver_error.isnan().all() and none.check_nfe == [] and len(none.checked) == 0
    assert torch.equal(none.bpd, r.bpd)   # the check draws nothing: the same numbers with or without it


def test_a_failed_check_solve_leaves_the_bpd_and_says_so(small, digits, monkeypatch):
    import mulan_nb.likelihood as likelihood
    solve = likelihood.pf_ode_logp
    def fails_when_tight(*a, **k):   # the check solve (rtol 1e-3 here, the solve 1e-2) cannot reach its tolerance
        if a[6] < 5e-3: raise FloatingPointError('the ODE solver (bosh3) could not reach rtol=1e-05')
        return solve(*a, **k)
    monkeypatch.setattr(likelihood, 'pf_ode_logp', fails_when_tight)
    r = ode_bpd(small, digits, divergence='hutchinson', rtol=1e-2, atol=1e-2, check_images=2, generator=torch.Generator().manual_seed(5))
    monkeypatch.undo()
    ok = ode_bpd(small, digits, divergence='hutchinson', rtol=1e-2, atol=1e-2, check_images=0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r.bpd, ok.bpd) and r.solver_error.isnan().all() and r.check_nfe == []
    assert r.note.endswith('; the solver-error check at rtol/10 failed (the ODE solver (bosh3) could not reach rtol=1e-05)'), r.note


def test_exact_and_hutchinson_agree_on_a_diagonal_jacobian(small, digits):
    kw = dict(generator=torch.Generator().manual_seed(6))
    exact = ode_bpd(small, digits, divergence='exact', **kw).bpd
    kw = dict(generator=torch.Generator().manual_seed(6))
    assert torch.allclose(exact, ode_bpd(small, digits, divergence='hutchinson', **kw).bpd, atol=1e-4)


def test_dense_elbo_is_finite_and_its_terms_add_up(small, digits):
    torch.manual_seed(7)
    res = dense_elbo(small, digits, n_t=8, batch_size=5)
    assert res.bpd.shape == res.sem.shape == (2,) and torch.isfinite(res.bpd).all() and (res.sem > 0).all()
    assert torch.allclose(sum(res.terms.values()), res.bpd, atol=1e-4)
    assert small.training   # mode restored


def test_dequantized_samples_stay_in_their_bins_and_iw_approaches_the_mass():
    g0 = torch.tensor(GAMMA_MIN, dtype=F64)
    a0, s0 = alpha_sigma(g0)
    x = torch.full((500, 1), 40)
    centre = a0 * levels_to_data(x, 256).double()[:, 0]
    p0 = torch.distributions.Normal(centre, 2 * s0)
    mass = torch.log(p0.cdf(centre + a0 / 256) - p0.cdf(centre - a0 / 256)).mean().item()
    bounds = []
    for S in (1, 32, 1024):
        z, log_q = dequantize(x, 256, g0, 'uniform', S, torch.Generator().manual_seed(S))
        assert (torch.floor((z / a0 + 1) * 128) == 40).all()
        bounds.append(iw_bound(p0.log_prob(z[..., 0]), log_q).mean().item())
    assert bounds[0] < bounds[1] < bounds[2] <= mass + 1e-3 and mass - bounds[2] < 0.01, (bounds, mass)


@pytest.mark.parametrize('g0', [GAMMA_MIN, -9., 40.])
def test_truncnormal_is_the_normal_conditioned_on_its_cut(g0):
    """q(z_0 | x) is N(α_0 f, σ_0²) conditioned on |u| <= min(3 σ_0, half-bin): at VDM's γ_min for 8 bits the cut is 3 σ_0 (b = 3),
    at γ = -9 the bin's edges (b = 0.35), at γ = 40 the bin is 1e-11 σ_0 wide and q is the uniform one. Density and CDF in closed form."""
    x = torch.full((40_000, 1), 7)
    g0 = torch.tensor(g0, dtype=torch.float64)
    a0, s0 = alpha_sigma(g0)
    cut = torch.minimum(3 * s0, a0 / 256)
    z, log_q = dequantize(x, 256, g0, 'truncnormal', generator=torch.Generator().manual_seed(0))
    u = z[0, :, 0] - a0 * levels_to_data(x, 256).double()[:, 0]
    assert u.abs().max() <= cut
    if cut / s0 > 1e-3:   # the conditioned normal, by its CDF
        normal = torch.distributions.Normal(0., s0)
        in_cut = normal.cdf(cut) - normal.cdf(-cut)
        density, cdf = normal.log_prob(u) - in_cut.log(), lambda v: (normal.cdf(v) - normal.cdf(-cut)) / in_cut
    else:   # the uniform limit (the normal's CDF differences would cancel here)
        density, cdf = torch.full_like(u, -math.log(2 * cut)), lambda v: (v + cut) / (2 * cut)
    assert torch.allclose(log_q[0], density, rtol=1e-9, atol=1e-9)
    for q in (-0.5, 0., 0.8):   # empirical CDF at a few points
        expected = cdf(q * cut)
        assert abs((u <= q * cut).double().mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / len(u))


@pytest.mark.parametrize('bad, kw, words', [
    (lambda x: x.float(), {}, 'dtype'),
    (lambda x: x.double() / 16, {}, 'dtype'),
    (lambda x: x[:, :, :7], {}, 'shape'),
    (lambda x: x.reshape(len(x), 64), {}, 'shape'),
    (lambda x: x + 17, {}, r'\[0, 17\)'),
    (lambda x: x, dict(dequantization='gaussian'), 'unknown dequantization'),
    (lambda x: x, dict(n_samples=0), 'n_samples'),
    (lambda x: x, dict(divergence='trace'), 'unknown divergence'),
    (lambda x: x, dict(divergence='hutchinson', n_probes=0), 'n_probes'),
    (lambda x: x, dict(variable='logsnr'), 'unknown variable'),
    (lambda x: x, dict(method='rk4'), 'adaptive torchdiffeq solver'),
    (lambda x: x, dict(method='ode45'), 'adaptive torchdiffeq solver'),
    (lambda x: x, dict(atol=0.), 'atol'),
    (lambda x: x, dict(check_images=-1), 'check_images must be >= 0'),
])
def test_ode_bpd_names_bad_input(small, digits, bad, kw, words):
    with pytest.raises(ValueError, match=words):
        ode_bpd(small, bad(digits), **kw)


@pytest.mark.parametrize('bad, kw, words', [
    (lambda x: x.float(), {}, 'dtype'), (lambda x: x[:, :, :7], {}, 'shape'),
    (lambda x: x, dict(n_t=0), 'n_t'), (lambda x: x, dict(batch_size=0), 'batch_size'),
])
def test_dense_elbo_names_bad_input(small, digits, bad, kw, words):
    with pytest.raises(ValueError, match=words):
        dense_elbo(small, bad(digits), **kw)


def test_pf_ode_logp_names_bad_input():
    ref = gaussian_reference('linear')
    with pytest.raises(ValueError, match='floating'):
        pf_ode_logp(torch.zeros(4, D, dtype=torch.long), ref.eps, ref.gamma_fn)
    with pytest.raises(ValueError, match='floating'):
        pf_ode_logp(torch.zeros(D, dtype=F64), ref.eps, ref.gamma_fn)
    with pytest.raises(ValueError, match='increases strictly'):
        pf_ode_logp(torch.zeros(4, D, dtype=F64), ref.eps, lambda t: (torch.zeros(D, dtype=F64), torch.zeros(D, dtype=F64)), variable='gamma')


@pytest.mark.parametrize('level', [0, 16])
def test_ode_and_elbo_are_finite_for_blank_images(small, level):
    "All-0 and all-max images sit at the edge of [-1, 1]: the ODE and the ELBO stay finite."
    x = torch.full((2, 1, 8, 8), level)
    for divergence in ('exact', 'hutchinson'):
        r = ode_bpd(small, x, 'truncnormal', divergence=divergence, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(r.bpd).all() and (r.bpd > 0).all()
    assert torch.isfinite(dense_elbo(small, x, n_t=4).bpd).all()


# ---- the mulan_eval command ----
import json
from conftest import run_cli
from mulan_nb.cli import eval_main
from mulan_nb.model import model_from_checkpoint
from mulan_nb.data import load_data


def test_mulan_eval_elbo_is_dense_elbo_of_the_ema_weights(tiny_checkpoint, tmp_path):
    code, err = run_cli(eval_main, [str(tiny_checkpoint), '--first', '6', '--n-t', '8', '--seed', '3', '--out', str(tmp_path / 'e.json')])
    assert code == 0, err
    res = json.loads((tmp_path / 'e.json').read_text())
    model, _ = model_from_checkpoint(tiny_checkpoint)
    torch.manual_seed(3)
    direct = dense_elbo(model, load_data('digits', 'test').images[:6], n_t=8)
    assert res['n_images'] == 6 and res['split'] == 'test' and res['weights'] == 'EMA'
    assert math.isclose(res['bpd'], direct.mean, rel_tol=1e-6) and math.isclose(res['se'], direct.test_sem, rel_tol=1e-5)
    assert torch.allclose(torch.tensor(res['per_image_bpd']), direct.bpd, atol=1e-5)


def test_mulan_eval_ode_reports_nfe_and_matches_ode_bpd(tiny_checkpoint, tmp_path):
    args = [str(tiny_checkpoint), '--method', 'ode', '--first', '2', '--ode-batch', '2', '--seed', '4', '--no-progress', '--out', str(tmp_path / 'o.json')]
    code, err = run_cli(eval_main, args)
    assert code == 0, err
    res = json.loads((tmp_path / 'o.json').read_text())
    model, _ = model_from_checkpoint(tiny_checkpoint)
    torch.manual_seed(4)
    direct = ode_bpd(model, load_data('digits', 'test').images[:2], divergence='hutchinson', generator=torch.Generator().manual_seed(4))
    assert res['nfe'] == direct.nfe and res['nfe_mean'] > 10 and res['seconds_per_image'] > 0
    assert torch.allclose(torch.tensor(res['per_image_bpd']), direct.bpd.float(), atol=1e-5)
    assert 'PF-ODE' in res['estimator'] and res['options']['rtol'] == direct_rtol()
    checked = ode_bpd(model, load_data('digits', 'test').images[:2], divergence='hutchinson', check_images=2, generator=torch.Generator().manual_seed(4))
    assert res['solver_error_images'] == 2 and torch.allclose(torch.tensor(res['per_image_solver_error'], dtype=F64), checked.solver_error, atol=1e-6)
    assert math.isclose(res['solver_error_bpd'], checked.solver_error.abs().mean().item(), rel_tol=1e-4, abs_tol=1e-7)
    assert 'estimated' in res['solver_error_note'] and len(res['check_nfe']) == 1


def direct_rtol():
    from fastcore.docments import docments
    return docments(ode_bpd, full=True)['rtol']['default']


def test_mulan_eval_ode_prints_the_solver_error(tiny_checkpoint, tmp_path):
    args = [str(tiny_checkpoint), '--method', 'ode', '--first', '3', '--check-images', '1', '--rtol', '1e-3', '--atol', '1e-3', '--no-progress', '--out', str(tmp_path / 'o.json')]
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()) as out: code, err = run_cli(eval_main, args)
    assert code == 0, err
    res = json.loads((tmp_path / 'o.json').read_text())
    assert res['solver_error_images'] == 1 and res['per_image_solver_error'][1:] == [None, None]
    assert f"solver error ~{res['solver_error_bpd']:.1e} bpd (estimated" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize('args, words', [
    (['/nonexistent/checkpoint.pt'], 'checkpoint not found'),
    (['CKPT', '--first', '-1'], '--first must be >= 0'),
    (['CKPT', '--n-t', '0'], 'argument --n-t: must be >= 1'),
    (['CKPT', '--batch-size', '0'], 'argument --batch-size: must be >= 1'),
    (['CKPT', '--method', 'ode', '--n-samples', '0'], 'argument --n-samples: must be >= 1'),
    (['CKPT', '--method', 'ode', '--ode-batch', '0'], 'argument --ode-batch: must be >= 1'),
    (['CKPT', '--method', 'ode', '--rtol', '0'], 'argument --rtol: must be > 0'),
    (['CKPT', '--method', 'ode', '--check-images', '-1'], '--check-images must be >= 0'),
    (['CKPT', '--method', 'exact'], "invalid choice: 'exact'"),
    (['CKPT', '--divergence', 'trace'], "invalid choice: 'trace'"),
    (['CKPT', '--data', 'nope'], "unknown data set 'nope'"),
    (['CKPT', '--data', 'WRONGSHAPE'], 'the model wants 17 and (1, 8, 8)'),
    (['CKPT', '--out', '/proc/no/such/result.json'], 'cannot write the result'),
    (['CKPT', '--n-t', 'many'], 'invalid int'),
])
def test_mulan_eval_bad_input_exits_2_with_one_line(tiny_checkpoint, tmp_path, args, words):
    import numpy as np
    np.save(tmp_path / 'wrong.npy', np.zeros((10, 28, 28), dtype=np.uint8))
    subst = {'CKPT': str(tiny_checkpoint), 'WRONGSHAPE': str(tmp_path / 'wrong.npy')}
    code, err = run_cli(eval_main, [subst.get(a, a) for a in args])
    assert code == 2 and err.count('\n') == 1 and words in err, err
