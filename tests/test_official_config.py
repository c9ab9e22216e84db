"Fast checks of `experiments/official_config.py`: the Monte-Carlo KL at its two known ends, the accountings and the summary of tiny runs, the sweep reference."
import importlib.util, json, math, statistics
from pathlib import Path
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('official_config', ROOT / 'experiments' / 'official_config.py')
oc = importlib.util.module_from_spec(spec); spec.loader.exec_module(oc)
TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)


class FixedLogits(nn.Module):
    "An encoder that returns the same logits for every image."
    def __init__(self, logits): super().__init__(); self.logits = logits
    def forward(self, f): return self.logits.expand(len(f), -1)


def test_kl_by_monte_carlo_at_a_point_mass_and_at_the_prior():
    from mulan_nb.model import MuLAN, MuLANConfig, PRESETS
    model = MuLAN(MuLANConfig(**{**PRESETS['digits-mulan-topk'], **TINY}))   # m = 8, k = 2: C(8, 2) = 28 states
    x = torch.randint(0, 17, (5, 1, 8, 8))
    sure = torch.full((1, 8), -1e4); sure[0, :2] = 1e4   # far beyond the perturbation (scale τ/k = 5)
    model.encoder = FixedLogits(sure)   # every draw of c is the same 2-hot vector: KL = log C(8, 2) exactly
    kl = oc.topk_kl_mc(model, x, n_draws=256, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(kl, torch.full((5,), math.log(28.), dtype=kl.dtype), atol=1e-9)
    model.encoder = FixedLogits(torch.zeros(1, 8))   # exchangeable logits: q(c|x) is the uniform prior, KL = 0
    kl = oc.topk_kl_mc(model, x, n_draws=4096, generator=torch.Generator().manual_seed(0))
    assert (kl >= 0).all() and kl.max() < 0.01, kl   # the plug-in bias, (28 − 1) / (2 · 4096) = 0.0033 nats, and its noise


def test_accountings_and_summary_of_tiny_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(oc, 'CONFIGS', {k: (p, {**o, **TINY}, w) for k, (p, o, w) in oc.CONFIGS.items()})
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    args = ['--configs', 'official', 'vdm-v', '--steps', '2', '--eval-every', '2', '--eval-n-t', '1', '--final-n-t', '2', '--seeds', '0', '1',
            '--runs', str(runs), '--results', str(results)]
    oc.main(args)
    s = json.loads((results / 'official-config.json').read_text())
    assert s['runs_done'] == s['runs_planned'] == 4 and not s['sweep']['settings_match']   # other settings than the sweep: its rows are not used
    rows = {r['config']: r for r in s['rows']}
    off = rows['official']
    assert list(off['accountings']) == ['as_trained', 'valid', 'kl_mc'] and off['accountings']['as_trained']['bound'] == 'no'
    log_c = math.log(28.) / (64 * math.log(2))
    for k in (0, 1):
        acc = json.loads((runs / f'official-s{k}' / 'accountings.json').read_text())
        own = json.loads((runs / f'official-s{k}' / 'result.json').read_text())['test_bpd']
        assert math.isclose(acc['valid']['latent_bpd'], log_c, rel_tol=1e-6)                          # the valid bound charges log C(m, k)
        assert off['accountings']['as_trained']['per_seed'][k] == own and off['accountings']['valid']['per_seed'][k] == acc['valid']['bpd']
        assert math.isclose(off['accountings']['kl_mc']['per_seed'][k], acc['valid']['bpd'] - log_c + acc['kl_mc']['bpd'], rel_tol=1e-6)
        assert 0 <= acc['kl_mc']['bpd'] <= log_c + 1e-12
    for key, x in off['accountings'].items():
        assert math.isclose(x['test_bpd'], statistics.fmean(x['per_seed'])) and math.isclose(x['se_over_seeds'], abs(x['per_seed'][0] - x['per_seed'][1]) / 2)
    vdm = rows['vdm-v']['accountings']['as_trained']['per_seed']
    g = s['gaps']['official, valid bound (same weights, kl=bound) − vdm-v']
    assert math.isclose(g['mean'], statistics.fmean(v - w for v, w in zip(off['accountings']['valid']['per_seed'], vdm)))
    assert rows['vdm-v']['accountings']['as_trained']['latent_share'] == 0 and (results / 'official-config.png').stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob('*')}
    oc.main(args)   # everything is done: nothing is trained or evaluated again
    assert {p: p.stat().st_mtime_ns for p in runs.rglob('*')} == stamps
    assert json.loads((results / 'official-config.json').read_text())['rows'] == s['rows']


def test_the_sweep_reference_is_used_only_at_its_settings():
    a = dict(data='digits', steps=1000, batch_size=64, eval_every=100, eval_n_t=8, final_n_t=128,
             sweep_results=str(ROOT / 'experiments/results/digits.json'), init_results=str(ROOT / 'experiments/results/schedule-init.json'))
    ref = oc.sweep_reference(a)
    sweep = {r['config']: r for r in json.loads((ROOT / 'experiments/results/digits.json').read_text())['rows']}
    assert ref['settings_match'] and ref['rows']['vdm-scalar']['per_seed'] == sweep['vdm-scalar']['per_seed']
    init = json.loads((ROOT / 'experiments/results/schedule-init.json').read_text())['configs']['random']
    assert math.isclose(ref['rows']['mulan']['latent_share'], init['terms_mean']['latent_bpd'] / init['test_bpd'])
    assert oc.sweep_reference({**a, 'steps': 2000})['differences'] == ['steps 1000 vs 2000']
