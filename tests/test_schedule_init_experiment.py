"Fast checks of `experiments/schedule_init.py`: the step-0 model is the run's initial model, the spreads survive a resume, the summary is the runs' own numbers."
import importlib.util, json, math, statistics
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('schedule_init', ROOT / 'experiments' / 'schedule_init.py')
si = importlib.util.module_from_spec(spec); spec.loader.exec_module(si)
TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)


def cfg(out, init, seed=0, steps=4):
    from mulan_nb.training import TrainConfig
    return TrainConfig(preset='digits-mulan', model=dict(TINY, schedule_init=init), steps=steps, batch_size=16, seed=seed, out=str(out),
                       eval_every=2, eval_n_t=1, final_n_t=1, ckpt_every=2, n_samples=0)


def test_the_step_0_model_is_the_trainers_initial_model(tmp_path):
    from mulan_nb.training import Trainer
    t = Trainer(cfg(tmp_path / 'r', 'random', seed=3), progress=False)
    m0 = si.GammaSpread().initial_model(t)
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), t.model.state_dict().values()))
    t.lock.close()


def test_spreads_at_init_and_across_a_resume(tmp_path):
    from mulan_nb.training import train
    out = tmp_path / 'linear'
    train(cfg(out, 'linear', steps=2), progress=False, callbacks=[si.GammaSpread(2)])
    res = train(cfg(out, 'linear', steps=4), resume=True, progress=False, callbacks=[si.GammaSpread(2)])   # continues from step 2
    rows = res['gamma_spread']['rows']
    assert [r['step'] for r in rows] == [0, 2, 4]
    assert rows[0]['over_pixels'] < 1e-5 and rows[0]['over_images'] < 1e-5   # linear init: γ(t) the same for every pixel and c
    res = train(cfg(tmp_path / 'random', 'random', steps=2), progress=False, callbacks=[si.GammaSpread(2)])
    assert res['gamma_spread']['rows'][0]['over_pixels'] > 0.1


def test_summary_means_are_the_per_seed_means(tmp_path):
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    # the script trains the preset's full network; here the runs are made tiny by hand, then summarised by the script
    from mulan_nb.training import train
    for init in si.INITS:
        for seed in (0, 1):
            train(cfg(runs / f'{init}-s{seed}', init, seed, steps=2), progress=False, callbacks=[si.GammaSpread(2)])
    si.main(['--summary-only', '--steps', '2', '--eval-every', '2', '--eval-n-t', '1', '--final-n-t', '1', '--seeds', '0', '1',
             '--batch-size', '16', '--runs', str(runs), '--results', str(results)])
    s = json.loads((results / 'schedule-init.json').read_text())
    assert not s['vdm_used'] and s['vdm']['differences']   # other settings than the 1000-step sweep: VDM's numbers are not used
    for init, c in s['configs'].items():
        per = [json.loads((runs / f'{init}-s{k}' / 'result.json').read_text())['test_bpd'] for k in (0, 1)]
        assert c['per_seed'] == per and math.isclose(c['test_bpd'], statistics.fmean(per))
        assert math.isclose(c['se_over_seeds'], abs(per[0] - per[1]) / 2)
        for q in ('over_pixels', 'over_images'):
            for k, m in enumerate(c['spreads']['mean'][q]):
                assert math.isclose(m, statistics.fmean(v[k] for v in c['spreads']['per_seed'][q].values()))
    assert (results / 'schedule-init.md').exists() and (results / 'schedule-init.png').exists()
