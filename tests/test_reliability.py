"""Reliability: numerical extremes, non-finite losses, damaged checkpoints, and properties over configs.

What is tried here, besides tests/test_model.py and tests/test_training.py:
- every schedule family at t = 0 and t = 1 and on a grid, with latents of norm up to 100, in float32 and under
  bf16 autocast: finite γ, γ', bounds and gradients;
- a training run whose loss turns non-finite: the steps are skipped and counted, no non-finite value reaches
  the checkpoint; a run whose loss stays non-finite stops with a clear message and exit code 2;
- a truncated checkpoint, a file that is not a checkpoint, and a checkpoint of another preset, for --resume;
- hypothesis: random valid model configs give finite per-example bounds of the right shape; random
  command-line integers are either accepted or refused with exit code 2 and one line.

Bad input, faults and misuse tried across tests/ (147 distinct cases; library: a ValueError naming the problem; commands: exit
code 2 and one line on stderr, no traceback):

| where | cases | what |
|---|---|---|
| test_model: images | 9 | float dtype, wrong shape ×3, levels < 0 and ≥ K, empty batch, numpy input, ... |
| test_model: latent | 3 | c of the wrong size for the schedule, the model, and a missing c |
| test_model: config | 10 | unknown schedule / latent, K = 1, latent_k ≥ m, prediction, T < 0, dropout ≥ 1, ... |
| test_model: preset | 1 | unknown preset (the known ones are listed) |
| test_package | 1 | `check_levels` on bad levels |
| test_training: `mulan_train` | 15 | unknown preset, steps 0, negative lr, batch > data set, batch not divisible, missing .npy, missing root, unknown data set, bad --set, config out of range, --resume without checkpoint, bad --precision, non-integer steps, unwritable output folder, resume from another preset |
| test_reliability: data files | 9 | NaN, inf, fractional levels, empty, one image, N×D shape, levels ≥ K, negative levels, not a .npy |
| test_reliability: checkpoints | 5 | truncated, not a checkpoint, another preset, a pickle that runs code, an older format |
| test_sampling: `mulan_sample` | 5 | missing checkpoint, --n 0, --steps < 0, non-integer --n, unknown sampler |
| test_sampling: `sample` | 8 | n 0, T 0, unsorted / not-from-0 / 2-D times, unknown sampler, latent of the wrong size, guidance without a null embedding |
| test_likelihood: `ode_bpd` | 13 | dtype, shape, levels, unknown dequantization / divergence / variable / solver, n_samples 0, n_probes 0, rtol 0, ... |
| test_likelihood: `dense_elbo`, `pf_ode_logp` | 5 | dtype, shape, n_t 0, batch_size 0; integer state |
| test_likelihood: `mulan_eval` | 13 | missing checkpoint, --first < 0, --n-t 0, --batch-size 0, --n-samples 0, --ode-batch 0, --rtol 0, unknown method / divergence / data set, data of another shape, unwritable result, non-integer --n-t |
| test_runs: run folders, signals, resume, outputs, counts | 50 | fresh run over a run, of another preset, --resume with --overwrite; a second process on the folder; SIGTERM; a kill mid-write; stale temporaries; a torn and a damaged metrics line; a crash in a mid-run evaluation; resume with another seed / batch / accum / model / data name / data content; 12 values typed on the command line (non-finite γ ends and rates, overflowing Fourier exponents, 2.5 and True for integers, a string for a boolean, --levels 0, unknown and missing devices); mulan_eval onto the checkpoint and onto a foreign file, mulan_sample onto a foreign file, NaN in JSON, an empty result file after a failure; an edited checkpoint, one without EMA weights, one with non-finite weights, a missing CUDA device; a non-finite ODE field, a non-finite latent; floats and bools for counts in dense_elbo / dequantize / divergence_probes / sample, a zero batch_size; many samples decoded in chunks; a kill inside a checkpointed evaluation; a resume without the run's callback or with other grid settings; a weight-decay change on resume; a failed set-up with its traceback kept; a resume with null test errors |
"""
import math
import numpy as np
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from mulan_nb.model import MuLAN, MuLANConfig, SCHEDULES
from conftest import run_cli as run_main_cli
from mulan_nb.cli import train_main as main
from mulan_nb.model import load_checkpoint, save_checkpoint, CHECKPOINT_FORMAT
from mulan_nb.training import TrainConfig, train

SHAPE, M = (1, 4, 4), 6


def schedules():
    torch.manual_seed(0)
    return {'linear': SCHEDULES['linear'](SHAPE), 'scalar': SCHEDULES['scalar'](SHAPE),
            **{name: SCHEDULES[name](SHAPE, M) for name in ('monotone', 'polynomial', 'sigmoid')},
            'polynomial-scalar': SCHEDULES['polynomial'](SHAPE, M, multivariate=False)}


@pytest.mark.parametrize('name', list(schedules()))
@pytest.mark.parametrize('autocast', [False, True])
def test_schedules_stay_finite_for_latents_of_norm_100(name, autocast):
    s = schedules()[name]
    c = torch.randn(64, M)
    c = 100 * c / c.norm(dim=1, keepdim=True)
    t = torch.cat([torch.zeros(8), torch.ones(8), torch.rand(48)])
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        g, dg = s(t, c)
        loss = (g.float() ** 2).mean() + dg.float().mean()
    if loss.requires_grad: loss.backward()
    assert torch.isfinite(g).all() and torch.isfinite(dg).all() and (dg >= 0).all()
    assert all(torch.isfinite(p.grad).all() for p in s.parameters() if p.grad is not None)
    if s.fixed_ends:
        assert torch.allclose(g[:8].float(), torch.full_like(g[:8].float(), -13.3), atol=1e-3)
        assert torch.allclose(g[8:16].float(), torch.full_like(g[8:16].float(), 5.0), atol=1e-3)


@pytest.mark.parametrize('preset', ['digits-vdm', 'digits-mulan', 'digits-mulan-topk'])
@pytest.mark.parametrize('autocast', [False, True])
def test_bound_and_gradients_finite_at_extreme_times_and_latents(preset, autocast):
    torch.manual_seed(0)
    model = MuLAN.from_preset(preset, channels=16, n_blocks=1)
    x = torch.cat([torch.zeros(4, 1, 8, 8), torch.full((4, 1, 8, 8), 16)]).long()
    t = torch.tensor([0., 1e-7, 0.5, 1 - 1e-7] * 2)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = model.nelbo(x, t)
    out['bpd'].float().mean().backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if model.config.latent_dim:   # a latent of norm 100 straight into schedule and denoiser
        c = 100 * torch.nn.functional.normalize(torch.randn(8, model.config.latent_dim), dim=1)
        g, dg = model.gamma(t, c)
        assert torch.isfinite(g).all() and torch.isfinite(dg).all()
        assert torch.isfinite(model.predict_eps(torch.randn(8, 1, 8, 8), g, c)).all()


TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)


def run_cli(args): return run_main_cli(main, args)


def test_non_finite_losses_are_skipped_counted_and_kept_out_of_checkpoints(tmp_path, monkeypatch):
    calls = {'n': 0}
    original = MuLAN.forward
    def sometimes_nan(self, x, t=None):
        calls['n'] += 1
        out = original(self, x, t)
        if calls['n'] in (3, 4, 9): out = {k: v * float('nan') for k, v in out.items()}
        return out
    monkeypatch.setattr(MuLAN, 'forward', sometimes_nan)
    res = train(TrainConfig(model=TINY, steps=12, batch_size=16, out=str(tmp_path), ckpt_every=4, eval_every=0,
                            final_n_t=1, n_samples=0, lr=2e-3), progress=False)
    assert res['nonfinite_skipped'] == 3
    state = load_checkpoint(tmp_path / 'checkpoint.pt')
    assert state['nonfinite_total'] == 3 and state['step'] == 12
    for part in ('model', 'ema'):
        assert all(torch.isfinite(v).all() for v in state[part].values() if v.is_floating_point())


def test_a_loss_that_stays_non_finite_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(MuLAN, 'forward', lambda self, x, t=None: {k: torch.full((len(x),), float('nan'), requires_grad=True)
                                                                  for k in ('bpd', 'diffusion', 'recon', 'prior', 'latent')})
    code, err = run_cli(['--out', str(tmp_path), '--steps', '20', '--max-nonfinite', '3', '--no-progress', '--batch-size', '16',
                         '--set', 'channels=8', 'n_blocks=1'])
    assert code == 2 and err.count('\n') == 1 and '3 non-finite losses in a row' in err, err


@pytest.mark.parametrize('damage, words', [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), 'unreadable'),
    (lambda p: p.write_bytes(b'not a checkpoint at all'), 'unreadable'),
    (lambda p: torch.save({'weights': torch.ones(3)}, p), 'not a mulan_nb checkpoint'),
])
def test_damaged_checkpoints_are_refused_clearly(tmp_path, damage, words):
    args = ['--out', str(tmp_path), '--no-progress', '--batch-size', '16', '--eval-every', '0', '--final-n-t', '1',
            '--samples', '0', '--set', 'channels=8', 'n_blocks=1', 'encoder_channels=8', 'encoder_blocks=1']
    assert run_cli([*args, '--steps', '2'])[0] == 0
    damage(tmp_path / 'checkpoint.pt')
    code, err = run_cli([*args, '--steps', '4', '--resume'])
    assert code == 2 and err.count('\n') == 1 and words in err, err


def test_checkpoints_load_without_running_code(tmp_path):
    "A pickle that would run code on load is refused by weights_only loading."
    class Evil:
        def __reduce__(self): return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / 'pwned'),))
    torch.save({'format': CHECKPOINT_FORMAT, 'evil': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='could run code') as e:
        load_checkpoint(tmp_path / 'evil.pt')
    assert not (tmp_path / 'pwned').exists()
    assert 'weights_only' not in str(e.value)   # PyTorch's advice to disable the safety is not repeated


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.sampled_from(sorted(SCHEDULES)), latent=st.sampled_from(['topk', 'gaussian', 'none']),
       multivariate=st.booleans(), conditioned=st.booleans(), prediction=st.sampled_from(['eps', 'v']),
       T=st.sampled_from([0, 1, 10]), K=st.integers(2, 256), hw=st.integers(2, 6), channels=st.integers(1, 3), seed=st.integers(0, 10))
def test_random_valid_configs_give_finite_bounds(schedule, latent, multivariate, conditioned, prediction, T, K, hw, channels, seed):
    torch.manual_seed(seed)
    cfg = MuLANConfig(data_shape=(channels, hw, hw), K=K, schedule=schedule, latent=latent, latent_m=5, latent_k=2,
                      multivariate=multivariate, conditioned=conditioned, prediction=prediction, T=T,
                      channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1, schedule_width=16)
    x = torch.randint(0, K, (3, channels, hw, hw))
    out = MuLAN(cfg).nelbo(x)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in out.values())
    assert (out['recon'] >= 0).all() and (out['prior'] >= 0).all() and (out['latent'] >= -1e-6).all()


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(-3, 2), batch=st.integers(-2, 3000), accum=st.integers(-1, 3))
def test_random_command_line_integers_are_accepted_or_refused_in_one_line(tmp_path_factory, steps, batch, accum):
    out = tmp_path_factory.mktemp('run')
    code, err = run_cli(['--out', str(out), '--steps', str(steps), '--batch-size', str(batch), '--accum', str(accum),
                         '--no-progress', '--eval-every', '0', '--final-n-t', '1', '--samples', '0',
                         '--set', 'channels=4', 'n_blocks=0', 'encoder_channels=4', 'encoder_blocks=0'])
    ok = steps >= 1 and 1 <= batch <= 1498 and accum >= 1 and batch % accum == 0
    assert code == (0 if ok else 2), (code, err)
    if not ok: assert err.count('\n') == 1 and err.startswith('mulan_train: error:'), err


def test_checkpoint_of_an_older_format_is_refused_by_name(tmp_path):
    "Version-1 checkpoints were built with 8-bit γ_min and Fourier exponents whatever K: loading one must not silently change the model."
    torch.save({'format': 'mulan_nb-checkpoint-1', 'step': 3}, tmp_path / 'old.pt')
    with pytest.raises(ValueError, match="another version of mulan_nb .*'mulan_nb-checkpoint-1'"):
        load_checkpoint(tmp_path / 'old.pt')
    save_checkpoint(tmp_path / 'new.pt', {'step': 3})
    assert load_checkpoint(tmp_path / 'new.pt')['step'] == 3


BAD_ARRAYS = {
    'nan': (lambda: np.full((20, 8, 8), np.nan, dtype=np.float32), 'NaN or inf'),
    'inf': (lambda: np.where(np.eye(8)[None] > 0, np.inf, 0.).repeat(20, 0), 'NaN or inf'),
    'fractional': (lambda: np.full((20, 8, 8), 0.5), 'integer levels'),
    'empty': (lambda: np.zeros((0, 8, 8), dtype=np.uint8), 'at least 2 images'),
    'one-image': (lambda: np.zeros((1, 8, 8), dtype=np.uint8), 'at least 2 images'),
    'flat': (lambda: np.zeros((20, 64), dtype=np.uint8), 'N×H×W or N×C×H×W'),
    'above-K': (lambda: np.full((20, 8, 8), 300), 'levels must lie in [0, 256)'),
    'negative': (lambda: np.full((20, 8, 8), -1), 'levels must lie in [0, 256)'),
}


@pytest.mark.parametrize('name', list(BAD_ARRAYS))
def test_bad_image_files_are_refused_in_one_line(tmp_path, name):
    make, words = BAD_ARRAYS[name]
    np.save(tmp_path / f'{name}.npy', make())
    code, err = run_cli(['--data', str(tmp_path / f'{name}.npy'), '--out', str(tmp_path / 'run'), '--batch-size', '4', '--steps', '1', '--no-progress'])
    assert code == 2 and err.count('\n') == 1 and words in err, err


def test_a_file_that_is_not_numpy_is_refused_in_one_line(tmp_path):
    (tmp_path / 'junk.npy').write_text('not an array')
    code, err = run_cli(['--data', str(tmp_path / 'junk.npy'), '--out', str(tmp_path / 'run'), '--steps', '1', '--no-progress'])
    assert code == 2 and err.count('\n') == 1 and 'could not read' in err, err
