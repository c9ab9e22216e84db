"Noise-awareness guidance: the guided prediction, w = 0 exactness, trajectories equal to `sample`, the noise-level regressor and the shift measurement, and their bad input."
import math
import pytest
import torch
from mulan_nb.model import MuLAN
from mulan_nb.sampling import sample
from mulan_nb.bound import eps_from_v
from mulan_nb.data import load_data
from mulan_nb.guidance import (sample_trajectory, NoiseLevelRegressor, forward_noised, train_regressor, predict_times,
                               regressor_error, forward_shift, shift_summary, plot_shift_density)


def tiny(noise_dropout=0.1, **kw):
    "A tiny digits model with perturbed (untrained) weights, so that the null embedding changes the output."
    torch.manual_seed(0)
    m = MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=0, noise_dropout=noise_dropout, **kw).eval()
    with torch.no_grad():
        for p in m.denoiser.parameters(): p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope='module')
def model(): return tiny()


@pytest.fixture(scope='module')
def digits(): return load_data('digits', 'train').images, load_data('digits', 'test').images


@pytest.fixture(scope='module')
def regressor(model, digits):
    return train_regressor(model, digits[0], steps=200, batch_size=64, channels=8, n_layers=2)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_guided_prediction_is_the_formula_from_two_passes(prediction):
    m = tiny(prediction=prediction)
    z, c = torch.randn(5, 1, 8, 8), torch.randn(5, 8)
    g, _ = m.gamma(torch.rand(5), c)
    with torch.no_grad():
        out, null = m.denoiser(z, g, c), m.denoiser(z, g, c, torch.ones(5, dtype=torch.bool))
        assert (out - null).abs().max() > 1e-3
        for w in (0.5, 3.):
            want = out + w * (out - null)
            want = want if prediction == 'eps' else eps_from_v(want, z, g)
            torch.testing.assert_close(m.predict_eps(z, g, c, guidance=w), want, rtol=1e-5, atol=1e-5)


def test_w0_reproduces_unguided_sampling_exactly(model):
    run = lambda w, fn: fn(model, 10, T=6, generator=torch.Generator().manual_seed(5), guidance=w)
    assert torch.equal(run(0., sample), run(None, sample))
    x0, s0, _ = run(0., sample_trajectory)
    x1, s1, _ = run(None, sample_trajectory)
    assert torch.equal(x0, x1) and torch.equal(s0, s1)
    assert (run(2., sample_trajectory)[1] - s1).abs().max() > 1e-3


@pytest.mark.parametrize('kw', [dict(T=5), dict(T=5, guidance=2.), dict(times=torch.tensor([0., 0.2, 0.9, 1.]), guidance=1.)])
def test_trajectory_ends_where_sample_ends(model, kw):
    x, states, ts = sample_trajectory(model, 7, generator=torch.Generator().manual_seed(1), **kw)
    x_ref, z0 = sample(model, 7, generator=torch.Generator().manual_seed(1), return_z0=True, **kw)
    assert torch.equal(x, x_ref) and torch.equal(states[-1], z0)
    assert states.shape == (len(ts), 7, 1, 8, 8) and ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()


def test_guiding_a_model_without_null_embedding_is_an_error():
    with pytest.raises(ValueError, match='noise-condition dropout'):
        sample_trajectory(tiny(noise_dropout=0.), 2, T=2, guidance=1.)


def test_fresh_regressor_says_half_and_scores_one_twelfth():
    reg = NoiseLevelRegressor((1, 8, 8))
    t = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    pred = predict_times(reg, torch.randn(5000, 1, 8, 8))
    assert torch.equal(pred, torch.full_like(pred, 0.5))
    assert abs(((pred - t) ** 2).mean().item() - 1 / 12) < 4 * 0.0745 / math.sqrt(5000)


def test_forward_noised_has_the_forward_marginal():
    m = MuLAN.from_preset('digits-vdm', channels=8, n_blocks=0).eval()
    x = torch.randint(0, 17, (3000, 1, 8, 8))
    t = torch.rand(3000)
    torch.manual_seed(1)
    with torch.no_grad():
        z = forward_noised(m, x, t)
        g = m.gamma(t)[0]
    eps = (z - torch.sigmoid(-g).sqrt() * (2 * (x + 0.5) / 17 - 1)) / torch.sigmoid(g).sqrt()
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01


def test_trained_regressor_beats_the_constant_and_shift_of_forward_data_is_zero(model, digits, regressor):
    train, test = digits
    err = regressor_error(regressor, model, test)
    assert err['rmse_all'] < 0.6 * math.sqrt(1 / 12) and sum(err['count']) == 4 * len(test)
    ts = torch.linspace(0, 1, 11)
    s = shift_summary(forward_shift(regressor, model, train[:400], ts, seed=1), ts, forward_shift(regressor, model, test, ts))
    assert abs(s['excess']) < 4 * s['excess_se'], s


def test_shift_summary_by_hand():
    s = shift_summary(torch.tensor([[0., 1.], [2., 3.]]), torch.tensor([1., 0.]), torch.tensor([[1.], [1.]]), n_bins=2)
    assert s['mean'] == 1.5 and math.isclose(s['se'], math.sqrt(2) / 2 / math.sqrt(2))
    assert s['bin_mean'] == [2.5, 0.5] and s['bin_excess'] == [1.5, -0.5] and s['excess'] == 0.5
    assert math.isclose(s['excess_rms'], math.sqrt((1.5**2 + 0.5**2) / 2))


def test_plot_writes_a_png(tmp_path):
    ts = torch.linspace(1, 0, 6)
    fig = plot_shift_density({'a': (ts, 0.1 * torch.randn(6, 30)), 'b': (ts, torch.full((6, 30), 2.))},
                             {'a': (ts, 0.1 * torch.randn(6, 9))}, path=tmp_path / 'd.png')
    assert (tmp_path / 'd.png').stat().st_size > 5000 and len(fig.axes) == 2


@pytest.mark.parametrize('call, words', [
    (lambda m: sample_trajectory(m, 0, T=3), 'n and T must be >= 1'),
    (lambda m: sample_trajectory(m, 2, T=0), 'n and T must be >= 1'),
    (lambda m: sample_trajectory(m, 2, times=torch.tensor([0., 0.5])), 'end at exactly 1'),
    (lambda m: sample_trajectory(m, 2, T=2, c=torch.zeros(3, 8)), 'latent c must have shape (2, 8)'),
    (lambda m: NoiseLevelRegressor((8, 8)), 'data_shape must be'),
    (lambda m: NoiseLevelRegressor((1, 8, 8), channels=0), 'channels must be >= 1'),
    (lambda m: NoiseLevelRegressor((1, 8, 8))(torch.zeros(2, 1, 4, 4)), 'states must have shape (B, 1, 8, 8)'),
    (lambda m: predict_times(NoiseLevelRegressor((1, 8, 8)), torch.zeros(8, 8)), 'states must have shape'),
    (lambda m: forward_noised(m, torch.zeros(2, 1, 8, 8), torch.rand(2)), 'integer levels'),
    (lambda m: forward_noised(m, torch.full((2, 1, 8, 8), 17), torch.rand(2)), 'levels must lie in [0, 17)'),
    (lambda m: forward_noised(m, torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.rand(3)), 't must have shape (2,)'),
    (lambda m: train_regressor(m, torch.zeros(4, 1, 8, 8, dtype=torch.long), steps=0), 'steps and batch_size must be >= 1'),
    (lambda m: regressor_error(NoiseLevelRegressor((1, 8, 8)), m, torch.zeros(4, 1, 8, 8, dtype=torch.long), n_bins=0), 'n_bins and repeats'),
    (lambda m: shift_summary(torch.zeros(3), torch.zeros(3)), 'shift must be (L, n)'),
    (lambda m: shift_summary(torch.zeros(3, 2), torch.zeros(2)), 'shift must be (L, n)'),
    (lambda m: shift_summary(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2, 5)), 'one row per time'),
    (lambda m: plot_shift_density({}), 'panels is empty'),
    (lambda m: plot_shift_density({'a': (torch.zeros(3), torch.zeros(4, 2))}), "panel 'a'"),
])
def test_bad_input_is_a_value_error_naming_the_problem(model, call, words):
    with pytest.raises(ValueError) as e: call(model)
    assert words in str(e.value), str(e.value)


def test_experiment_script_runs_and_refuses_unguidable_checkpoints(tmp_path):
    "The experiment script end to end on a 2-step tiny checkpoint (no Fréchet distance), and its refusal of a model without null embedding."
    import importlib.util, contextlib, io, json, pathlib
    from mulan_nb.cli import train_main
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('noise_guidance', root / 'experiments' / 'noise_guidance.py')
    script = importlib.util.module_from_spec(spec); spec.loader.exec_module(script)
    quiet = ['--steps', '2', '--batch-size', '8', '--eval-every', '0', '--final-n-t', '1', '--samples', '0', '--no-progress',
             '--set', 'channels=8', 'n_blocks=0', 'encoder_channels=8', 'encoder_blocks=0']
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(['--out', str(tmp_path / 'nag'), *quiet, 'noise_dropout=0.1']) == 0
        assert train_main(['--out', str(tmp_path / 'plain'), *quiet]) == 0
    out, err = io.StringIO(), io.StringIO()
    args = ['--n-samples', '6', '--steps', '2', '--weights', '0', '1', '--regressor-steps', '5', '--no-frechet']
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert script.main(['--checkpoint', str(tmp_path / 'nag' / 'checkpoint.pt'), '--out', str(tmp_path / 'o'), *args]) == 0
        code = script.main(['--checkpoint', str(tmp_path / 'plain' / 'checkpoint.pt'), '--out', str(tmp_path / 'p'), *args])
    assert code == 2 and 'cannot be guided' in err.getvalue()
    res = json.load(open(tmp_path / 'o' / 'noise_guidance.json'))
    assert [(r['T'], r['w']) for r in res['results']] == [(2, 0.), (2, 1.)] and (tmp_path / 'o' / 'shift_density.png').exists()
    assert '| w |' in out.getvalue()
