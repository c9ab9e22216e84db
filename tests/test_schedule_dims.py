"Fast checks of `MuLANConfig.schedule_patch` through the public API and of `experiments/schedule_dims.py`'s reuse check and summary on tiny runs."
import importlib.util, json, math, statistics
from dataclasses import asdict, replace
from pathlib import Path
import pytest, torch
from mulan_nb.model import MuLAN, MuLANConfig, PRESETS

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('schedule_dims', ROOT / 'experiments' / 'schedule_dims.py')
sd = importlib.util.module_from_spec(spec); spec.loader.exec_module(sd)
TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)


def tiny(**overrides):
    return MuLAN.from_preset('digits-mulan', **TINY, **overrides).eval()


@pytest.mark.parametrize('patch', [2, 4, 8])
def test_gamma_is_constant_within_patches_and_differs_between_them(patch):
    torch.manual_seed(0)
    model, x = tiny(schedule_patch=patch), torch.randint(0, 17, (3, 1, 8, 8))
    with torch.no_grad(): g, dg = model.gamma(torch.rand(3), model.encode(x)[0])
    assert g.shape == dg.shape == (3, 1, 8, 8)
    n = 8 // patch
    for v in (g, dg):
        blocks = v.reshape(3, n, patch, n, patch)
        assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    if n > 1: assert g.reshape(3, n, patch, n, patch)[:, :, 0, :, 0].flatten(1).std(1).min() > 0


def test_patch_1_is_the_per_pixel_preset_exactly():
    x = torch.randint(0, 17, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    out = []
    for extra in ({}, dict(schedule_patch=1)):
        torch.manual_seed(0); m = tiny(**extra)
        torch.manual_seed(5)
        with torch.no_grad(): out.append((m.state_dict(), m.nelbo(x)))
    (s0, n0), (s1, n1) = out
    assert all(torch.equal(v, s1[k]) for k, v in s0.items()) and all(torch.equal(v, n1[k]) for k, v in n0.items())


def test_slope_is_the_finite_difference_per_pixel():
    torch.manual_seed(0)
    model = tiny(schedule_patch=2).double()
    with torch.no_grad():
        for q in model.schedule.parameters(): q.add_(torch.randn_like(q) * 0.3)   # off the initialisation
        t, c, h = torch.rand(16, dtype=torch.float64) * 0.98 + 0.01, torch.randn(16, 8, dtype=torch.float64), 1e-6
        fd = (model.gamma(t + h, c)[0] - model.gamma(t - h, c)[0]) / (2 * h)
        dg = model.gamma(t, c)[1]
    assert ((dg - fd).abs() <= 1e-4 * dg.abs() + 1e-7).all()


def test_schedule_parameters_fall_with_d_and_bad_patches_are_named():
    counts = [sum(q.numel() for q in tiny(schedule_patch=p).schedule.parameters()) for p in (1, 2, 4, 8)]
    trunk = (8 * 64 + 64) + (64 * 64 + 64)
    assert counts == [trunk + 3 * (64 * d + d) for d in (64, 16, 4, 1)]
    for bad, words in [(dict(schedule_patch=3), 'must divide the height and width'), (dict(schedule_patch=0), 'integer >= 1'),
                       (dict(schedule_patch=2.), 'schedule_patch must be an integer'), (dict(schedule_patch=2, schedule='linear'), "not schedule='linear'")]:
        with pytest.raises(ValueError, match=words): MuLANConfig(**{**PRESETS['digits-mulan'], **bad})


def settings(**kw):
    return {**dict(data='digits', steps=1000, batch_size=64, eval_every=100, eval_n_t=8, final_n_t=128, n_samples=0), **kw}


def test_reuse_only_with_the_same_settings_and_model():
    cfg = sd.train_config(1, 0, settings(), 'x')
    state = dict(train=asdict(replace(cfg, out='elsewhere', model=dict(schedule_init='random'))), step=1000,
                 config={k: v for k, v in asdict(cfg.model_config()).items() if k != 'schedule_patch'})   # written before the field existed
    assert sd.sweep.reuse_mismatch(state, cfg) == []
    older = {**state, 'train': {k: v for k, v in state['train'].items() if k != 'lr'}}   # a field added since: its default
    assert sd.sweep.reuse_mismatch(older, cfg) == [] and sd.sweep.reuse_mismatch(older, replace(cfg, lr=1e-3)) == ['lr 0.0002 vs 0.001']
    assert sd.sweep.reuse_mismatch({**state, 'step': 900}, cfg) == ['step 900 vs 1000']
    assert sd.sweep.reuse_mismatch(state, sd.train_config(1, 0, settings(batch_size=32), 'x')) == ['batch_size 64 vs 32']
    assert sd.sweep.reuse_mismatch({**state, 'config': {**state['config'], 'channels': 16}}, cfg) == ['model.channels 16 vs 48']
    assert sd.sweep.reuse_mismatch(state, sd.train_config(2, 0, settings(), 'x')) == ['model.schedule_patch 1 vs 2']


def test_summary_is_the_runs_own_numbers(tmp_path):
    # the script trains the preset's full network; here the runs are made tiny by hand, then summarised by the script
    from mulan_nb.training import TrainConfig, train
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    for p in (4, 1):
        for seed in (0, 1):
            train(TrainConfig(preset='digits-mulan', model=dict(TINY, schedule_patch=p), steps=2, batch_size=16, seed=seed, out=str(runs / f'p{p}-s{seed}'),
                              eval_every=2, eval_n_t=1, final_n_t=1, ckpt_every=2, n_samples=0), progress=False)
    sd.main(['--summary-only', '--patches', '4', '1', '--seeds', '0', '1', '--steps', '2', '--eval-every', '2', '--eval-n-t', '1', '--final-n-t', '1',
             '--batch-size', '16', '--reuse', '', '--runs', str(runs), '--results', str(results)])
    s = json.loads((results / 'schedule-dims.json').read_text())
    rows = {r['patch']: r for r in s['rows']}
    assert [rows[p]['d'] for p in (4, 1)] == [4, 64] and rows[4]['parameters']['schedule'] < rows[1]['parameters']['schedule']
    per = {p: [json.loads((runs / f'p{p}-s{k}' / 'result.json').read_text())['test_bpd'] for k in (0, 1)] for p in (4, 1)}
    for p, r in rows.items():
        assert r['per_seed'] == per[p] and math.isclose(r['test_bpd'], statistics.fmean(per[p]))
        assert math.isclose(r['se_over_seeds'], abs(per[p][0] - per[p][1]) / 2) and not r['reused']
        final = [[m for m in map(json.loads, (runs / f'p{p}-s{k}' / 'metrics.jsonl').read_text().splitlines()) if m['kind'] == 'eval'][-1] for k in (0, 1)]
        assert math.isclose(r['latent_share'], statistics.fmean(f['latent_bpd'] / f['bpd'] for f in final))
    assert math.isclose(rows[4]['minus_per_pixel'], statistics.fmean(a - b for a, b in zip(per[4], per[1])))
    assert (results / 'schedule-dims.md').exists() and (results / 'schedule-dims.png').exists()
