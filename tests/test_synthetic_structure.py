"Fast checks of `region_images` and of `experiments/synthetic_structure.py`: the AUC against a second method, the summary against the runs' own files, skip on a second call, refusals."
import importlib.util, json, math, statistics
from pathlib import Path
import numpy as np
import pytest
import torch
from mulan_nb.data import region_images, region_images_bpd, load_data

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('synthetic_structure', ROOT / 'experiments' / 'synthetic_structure.py')
ss = importlib.util.module_from_spec(spec); spec.loader.exec_module(ss)
TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)
ARGS = ['--steps', '2', '--eval-every', '2', '--eval-n-t', '1', '--final-n-t', '2', '--n-train', '40', '--n-test', '12', '--batch-size', '16', '--seeds', '0', '1']


def test_region_images_on_another_background_and_size():
    x, m = region_images(500, size=6, region=3, K=5, background=2, seed=7)
    assert np.array_equal(m, x != 2) and (m.sum((1, 2, 3)) == 9).all()
    assert set(np.unique(x[m])) == {0, 1, 3, 4}                        # the other K − 1 levels, never the background
    assert np.array_equal(region_images(500, size=6, region=3, K=5, background=2, seed=7)[0], x)
    assert not np.array_equal(region_images(500, size=6, region=3, K=5, background=2, seed=8)[0], x)
    assert math.isclose(region_images_bpd(6, 3, 5), (math.log2(16) + 9 * 2) / 36)


@pytest.mark.parametrize('bad, words', [(dict(n=2.0), 'n must be an integer'), (dict(size=0), 'size must be'), (dict(K=2**16 + 1), 'K must be'),
                                        (dict(background=-1), 'background must be'), (dict(region=True), 'region must be')])
def test_region_images_names_bad_input(bad, words):
    with pytest.raises(ValueError, match=words): region_images(**{'n': 3, **bad})


def test_auc_is_the_rank_auc():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, positive = rng.standard_normal(64), rng.random(64) < 0.3
        scores[:5] = scores[5]   # some exact ties
        assert math.isclose(ss.auc(scores, positive), roc_auc_score(positive, scores), rel_tol=1e-12)
    assert ss.auc(np.zeros(64), np.arange(64) < 16) == 0.5                # a flat schedule: no relation


def test_summary_of_tiny_runs_is_their_own_numbers_and_a_second_call_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, 'CONFIGS', {k: (p, {**o, **TINY}, w) for k, (p, o, w) in ss.CONFIGS.items()})
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    args = ARGS + ['--runs', str(runs), '--results', str(results)]
    ss.main(args)
    s = json.loads((results / 'synthetic-structure.json').read_text())
    assert s['runs_done'] == s['runs_planned'] == 6 and math.isclose(s['floor_bpd'], region_images_bpd())
    data = np.load(runs / 'squares.npz')
    assert np.array_equal(data['test'], region_images(52, seed=0)[0][40:]) and np.array_equal(data['test_masks'], data['test'] != 0)
    assert np.array_equal(load_data(str(runs / 'squares.npz'), 'test', K=17).images.numpy(), data['test'])
    rows = {r['config']: r for r in s['rows']}
    assert list(rows) == ['vdm', 'mulan', 'not-adaptive']
    from mulan_nb.model import model_from_checkpoint
    from sklearn.metrics import roc_auc_score
    for name, row in rows.items():
        per = [json.loads((runs / f'{name}-s{k}' / 'result.json').read_text())['test_bpd'] for k in (0, 1)]
        assert row['per_seed'] == per and math.isclose(row['test_bpd'], statistics.fmean(per)) and math.isclose(row['se_over_seeds'], abs(per[0] - per[1]) / 2)
        aucs = []
        for k in (0, 1):   # the AUC again, by sklearn on γ from the model
            model, _ = model_from_checkpoint(runs / f'{name}-s{k}' / 'checkpoint.pt')
            x = torch.from_numpy(data['test'].astype(np.int64))
            with torch.no_grad():
                c, _ = model.eval().encode(x, torch.Generator().manual_seed(ss.C_SEED))
                g = model.gamma(torch.full((len(x),), 0.5), c)[0].expand(len(x), 1, 8, 8).reshape(len(x), -1).double().numpy()
            rel, m = g - g.mean(1, keepdims=True), data['test_masks'].reshape(len(x), -1)
            aucs.append(statistics.fmean(0.5 if np.ptp(r) < 1e-5 else roc_auc_score(mi, r) for r, mi in zip(rel, m)))
        assert np.allclose(row['auc']['per_seed'], aucs, atol=1e-3), (name, row['auc'], aucs)   # the script counts differences below 1e-5 as ties, sklearn does not
    assert rows['vdm']['auc']['per_seed'] == [0.5, 0.5] and rows['not-adaptive']['auc_adaptive']['per_seed'] == [0.5, 0.5]   # one γ per image; one map for all images
    assert rows['vdm']['latent_share'] == 0 and rows['mulan']['latent_share'] > 0
    assert rows['vdm']['auc_init']['per_seed'] == [0.5, 0.5] and rows['mulan']['spread_over_pixels_init']['mean'] > 0.1   # the random polynomial start
    d = [rows['mulan']['per_seed'][k] - rows['vdm']['per_seed'][k] for k in (0, 1)]
    assert math.isclose(s['paired']['mulan − vdm']['mean'], statistics.fmean(d))
    maps = np.load(results / 'synthetic-structure-gamma.npz')
    assert maps['gamma_mulan'].shape == (ss.N_SHOW, ss.N_T_SHOW, 64) and (results / 'synthetic-structure.png').stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob('*')}
    ss.main(args)   # everything is done: nothing is trained again, the summary is the same
    assert {p: p.stat().st_mtime_ns for p in runs.rglob('*')} == stamps
    assert json.loads((results / 'synthetic-structure.json').read_text())['rows'] == s['rows']


def test_refuses_other_data_and_other_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ss, 'CONFIGS', {k: (p, {**o, **TINY}, w) for k, (p, o, w) in ss.CONFIGS.items()})
    runs = tmp_path / 'runs'
    args = ARGS + ['--configs', 'vdm', '--seeds', '0', '--runs', str(runs), '--results', str(tmp_path / 'results')]
    ss.main(args)
    with pytest.raises(SystemExit) as e: ss.main(args + ['--data-seed', '1'])
    assert e.value.code == 2 and 'holds other images than region_images(52, seed=1)' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: ss.main([a if a != '2' else '4' for a in args])   # 4 steps where 2 are finished
    assert e.value.code == 2 and 'that is not this one (4 steps of digits-vdm' in capsys.readouterr().err


def test_the_initial_model_is_the_trainers(tmp_path):
    from mulan_nb.training import Trainer, TrainConfig
    cfg = TrainConfig(preset='digits-mulan', model=TINY, steps=2, batch_size=16, seed=3, out=str(tmp_path / 'r'), n_samples=0)
    t = Trainer(cfg, progress=False)
    m0 = ss.initial_model(t.mcfg, 3)
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), t.model.state_dict().values()))
    t.lock.close()
