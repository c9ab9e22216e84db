"""MuLAN in the official configuration at small scale: top-k latent with the softmax KL surrogate, v-prediction and an
encoder as wide as the denoiser; does the sign of MuLAN − VDM change? (issue 17, point 3)

    OMP_NUM_THREADS=1 nohup python experiments/official_config.py > official.log 2>&1 &   # 4 configurations x seeds 0, 1, 2, 1000 steps
    python experiments/official_config.py --summary-only                                   # rewrite the summary from the finished runs

Configurations (digits, the settings of experiments/compare.py's 1000-step sweep: batch 64, an evaluation every 100
steps with 8 draws of (t, ε, c) per test image, the final dense ELBO with 128, EMA weights):

  official        digits-mulan-topk (top-k latent, m = 8, k = 2) with kl='softmax', prediction='v', encoder_channels=48 (= channels)
  vdm-v           digits-vdm with prediction='v': VDM with the same parametrisation of the denoiser
  topk-bound      digits-mulan-topk as it is: top-k latent with the valid KL log C(m, k), ε-prediction, encoder 16 wide
  official-bound  'official' trained with kl='bound' instead of the surrogate

A run trained with the softmax surrogate reports, as trained, a number that is NOT a bound: KL(softmax(ℓ) ‖ U(m)) in
place of KL(q(c|x) ‖ p(c)). Its valid bound is the same weights evaluated with kl='bound' (the KL term is then
log C(m, k), an upper bound on the true KL since q is discrete; the other terms do not depend on the choice): a second
dense ELBO of 128 draws per test image. For every top-k run the true KL(q(c|x) ‖ p(c)) = log C(m, k) − H(q(c|x)) is
also estimated, with the plug-in entropy of 4096 draws of c per test image (C(8, 2) = 28 states; biased low, so the
KL comes out high), and put in place of the charged KL: an estimate of the run's true ELBO. Both are stored in the run
folder as accountings.json. The latent term's share of the
bpd is reported for every configuration, both accountings for the softmax ones; VDM and MuLAN (ε-prediction, Gaussian
latent) come from the 1000-step sweep (experiments/results/digits.json, the same seeds and settings), MuLAN's latent
term from experiments/results/schedule-init.json (its 'random' runs reproduce the sweep's MuLAN seed by seed, to 1e-4 bpd).

Runs go to --runs/{config}-s{seed} (one configuration's seeds after the other, in the order above); finished runs are
skipped, killed ones resume. The summary goes to --results/official-config.{json,md,png}; nbs/16_experiments.ipynb reads it.
"""
import json, math, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'experiments'))
from sweep import TERMS, mean_se, train_run, run_record, experiment_parser, add_folder_arguments, parse_run_arguments, Summary

OFFICIAL = dict(kl='softmax', prediction='v', encoder_channels=48)
CONFIGS = {   # name: (preset, model overrides, what); the order is the table's and the runs'
    'official': ('digits-mulan-topk', OFFICIAL, 'top-k latent (m 8, k 2), softmax KL surrogate, v-prediction, encoder 48 wide'),
    'vdm-v': ('digits-vdm', dict(prediction='v'), 'VDM (learned scalar γ) with v-prediction'),
    'topk-bound': ('digits-mulan-topk', {}, 'top-k latent (m 8, k 2), valid KL log C(m, k), ε-prediction, encoder 16 wide'),
    'official-bound': ('digits-mulan-topk', {**OFFICIAL, 'kl': 'bound'}, "'official' trained with the valid KL log C(m, k)"),
}
SWEEP_KEYS = ('data', 'steps', 'batch_size', 'eval_every', 'eval_n_t')


KL_DRAWS, KL_SEED = 4096, 1234   # draws of c per test image for the plug-in entropy of q(c|x), and their generator's seed


def topk_kl_mc(model, x, n_draws:int=KL_DRAWS, generator=None):
    "KL(q(c|x) ‖ p(c)) in nats per image (B,) for a top-k latent: log C(m, k) − the plug-in entropy of `n_draws` draws of c (biased low: the KL comes out high)."
    import torch
    from mulan_nb.diffusion import levels_to_data
    from mulan_nb.likelihood import evaluating
    with evaluating(model):
        logits = model.encoder(levels_to_data(x, model.config.K))
        weights = 2 ** torch.arange(logits.shape[1], dtype=torch.float64)
        codes = torch.stack([model.latent.sample(logits, generator).double() @ weights for _ in range(n_draws)], 1).long()   # (B, n_draws): one integer per k-hot c
    entropy = []
    for row in codes:
        q = row.unique(return_counts=True)[1].double() / n_draws
        entropy.append(-(q * q.log()).sum())
    return model.latent.log_n_states - torch.stack(entropy)


def accountings(out:Path, data:str, n_t:int, seed:int, softmax:bool) -> dict:
    "The other accountings of a top-k run, computed once and kept in out/accountings.json: the KL of q(c|x) by Monte Carlo, and for a softmax-surrogate run its valid bound (the same weights with kl='bound', a second dense ELBO)."
    path = out / 'accountings.json'
    if not path.exists():
        import torch
        from dataclasses import asdict
        from mulan_nb.model import MuLAN, MuLANConfig, model_from_checkpoint
        from mulan_nb.likelihood import dense_elbo
        from mulan_nb.bound import nats_to_bpd
        from mulan_nb.data import load_data
        trained, state = model_from_checkpoint(out / 'checkpoint.pt')
        x = load_data(data, 'test', None, trained.config.K).images
        kl = topk_kl_mc(trained, x, generator=torch.Generator().manual_seed(KL_SEED))
        r = dict(step=state['step'], log_n_states=trained.latent.log_n_states, kl_mc=dict(bpd=nats_to_bpd(kl, trained.D).mean().item(), nats=kl.mean().item(),
                 draws=KL_DRAWS, seed=KL_SEED, estimator='log C(m, k) − plug-in entropy of the draws of c ~ q(c|x), per test image, averaged'))
        if softmax:
            model = MuLAN(MuLANConfig(**{**asdict(trained.config), 'kl': 'bound'}))   # the KL has no weights: the same model, the other accounting
            model.load_state_dict(trained.state_dict())
            torch.manual_seed(seed)
            r['valid'] = dict(dense_elbo(model, x, n_t=n_t).summary(), kl='bound')
        path.write_text(json.dumps(r))
    return json.loads(path.read_text())


def run_one(name, seed, a):
    "Train (or resume, or skip) one run; returns its record (None if not finished and --summary-only)."
    from mulan_nb.training import TrainConfig
    preset, overrides, _ = CONFIGS[name]
    out = Path(a['runs']) / f'{name}-s{seed}'
    t0 = time.perf_counter()
    cfg = TrainConfig(preset=preset, model=overrides, data=a['data'], steps=a['steps'], batch_size=a['batch_size'], seed=seed, out=str(out),
                      eval_every=a['eval_every'], eval_n_t=a['eval_n_t'], final_n_t=a['final_n_t'], ckpt_every=a['eval_every'], n_samples=a['n_samples'])
    if train_run(cfg, summary_only=a['summary_only']) is None: return None
    r = dict(config=name, seed=seed, preset=preset, overrides=overrides, kl=cfg.model_config().kl if cfg.model_config().latent == 'topk' else None,
             **run_record(out))
    if r['kl'] is not None:
        if a['summary_only'] and not (out / 'accountings.json').exists(): return None
        r['accountings'] = accountings(out, a['data'], a['final_n_t'], seed, r['kl'] == 'softmax')
    r['seconds_this_call'] = time.perf_counter() - t0
    return r


def sweep_reference(a):
    "VDM's and MuLAN's rows of the 1000-step sweep and MuLAN's latent term from the schedule-init runs, with whether their settings match."
    path, init_path = Path(a['sweep_results']), Path(a['init_results'])
    if not path.exists(): return None
    d = json.loads(path.read_text())
    s = d['settings']
    diff = [f"{k} {s.get(k)!r} vs {a[k]!r}" for k in SWEEP_KEYS if s.get(k) != a[k]]
    if s.get('levels') is not None: diff.append(f"levels {s['levels']!r} vs None")
    if a['final_n_t'] != 128: diff.append(f"final_n_t 128 (compare.py) vs {a['final_n_t']}")
    rows = {r['config']: dict(config=r['config'], what=r['what'], seeds=r['seeds'], per_seed=r['per_seed'], test_bpd=r['test_bpd'],
                              se_over_seeds=r['se_over_seeds']) for r in d['rows'] if r['config'] in ('vdm-scalar', 'mulan')}
    if 'vdm-scalar' in rows: rows['vdm-scalar']['latent_share'] = 0.   # no latent
    if init_path.exists() and 'mulan' in rows:
        init = json.loads(init_path.read_text())
        rnd = init['configs'].get('random')
        if rnd and rnd['seeds'] == rows['mulan']['seeds'] and all(abs(x - y) < 1e-4 for x, y in zip(rnd['per_seed'], rows['mulan']['per_seed'])):
            # the same configuration and seeds, reproducing the sweep's test bpd seed by seed: their final terms are MuLAN's
            rows['mulan']['latent_bpd'] = rnd['terms_mean']['latent_bpd']
            rows['mulan']['latent_share'] = rnd['terms_mean']['latent_bpd'] / rnd['test_bpd']
            rows['mulan']['latent_from'] = str(init_path.name)
    rel = lambda p: str(p.relative_to(ROOT)) if p.is_absolute() and ROOT in p.parents else str(p)
    return dict(path=rel(path), settings_match=not diff, differences=diff, rows=rows)


def paired(x:dict, y:dict) -> dict|None:
    "x − y by seed over the seeds both have (two {seed: value} dicts)."
    common = sorted(set(x) & set(y))
    if not common: return None
    d = [x[s] - y[s] for s in common]
    return dict(zip(('mean', 'se'), mean_se(d)), seeds=common, per_seed=d)


ACCOUNTINGS = {   # key: (label, is it a bound)
    'as_trained': (None, None),   # the run's own final dense ELBO: labelled by its KL below
    'valid': ('valid bound (same weights, kl=bound)', 'yes'),
    'kl_mc': ('ELBO with KL(q(c|x) ‖ p(c)) by Monte Carlo', 'estimate'),
}


def run_accountings(r) -> dict:
    "One run's test bpd and terms under each accounting it has: key -> dict(bpd, terms)."
    own = dict(bpd=r['test_bpd'], terms=r['terms'])
    out = dict(as_trained=own)
    acc = r.get('accountings')
    if acc is None: return out
    if 'valid' in acc: out['valid'] = dict(bpd=acc['valid']['bpd'], terms={k: acc['valid'][k] for k in TERMS})
    base = out.get('valid', own)   # a valid evaluation of the diffusion, recon and prior terms
    terms = {**base['terms'], 'latent_bpd': acc['kl_mc']['bpd']}
    out['kl_mc'] = dict(bpd=base['bpd'] - base['terms']['latent_bpd'] + acc['kl_mc']['bpd'], terms=terms)
    return out


def label(row, key) -> tuple[str, str]:
    "The accounting's words and whether it is a bound ('yes', 'no', 'estimate')."
    if key != 'as_trained': return ACCOUNTINGS[key]
    if row['kl'] == 'softmax': return 'softmax KL surrogate (NOT a bound)', 'no'
    return ('valid bound (KL log C(m, k))', 'yes') if row['kl'] == 'bound' else ('valid bound', 'yes')


def summarise(records, a):
    ref = sweep_reference(a)
    rows = {}
    for name, (preset, overrides, what) in CONFIGS.items():
        rs = sorted([r for r in records if r['config'] == name], key=lambda r: r['seed'])
        if not rs: continue
        steps = sorted(set.intersection(*[{s for s, _ in r['curve']} for r in rs]))
        row = dict(config=name, what=what, preset=preset, overrides=overrides, kl=rs[0]['kl'], seeds=[r['seed'] for r in rs],
                   mean_curve=[[s, statistics.fmean(dict(r['curve'])[s] for r in rs)] for s in steps],
                   parameters=rs[0]['parameters'], train_seconds=[r['train_seconds'] for r in rs], accountings={})
        per_run = [run_accountings(r) for r in rs]
        for key in per_run[0]:
            m, se = mean_se([x[key]['bpd'] for x in per_run])
            row['accountings'][key] = dict(label=label(row, key)[0], bound=label(row, key)[1], per_seed=[x[key]['bpd'] for x in per_run], test_bpd=m, se_over_seeds=se,
                                           terms_mean={k: statistics.fmean(x[key]['terms'][k] for x in per_run) for k in TERMS},
                                           latent_share=statistics.fmean(x[key]['terms']['latent_bpd'] / x[key]['bpd'] for x in per_run))
        if rs[0].get('accountings'):
            row['kl_mc_nats_per_seed'] = [r['accountings']['kl_mc']['nats'] for r in rs]
            row['log_n_states'] = rs[0]['accountings']['log_n_states']
        rows[name] = row
    by_seed = lambda acc, seeds: dict(zip(seeds, acc['per_seed']))
    bases = {} if ref is None or not ref['settings_match'] else {k: by_seed(r, r['seeds']) for k, r in ref['rows'].items()}   # vdm-scalar and mulan (ε, Gaussian c)
    if 'vdm-v' in rows: bases['vdm-v'] = by_seed(rows['vdm-v']['accountings']['as_trained'], rows['vdm-v']['seeds'])
    gaps = {}
    for name, row in rows.items():
        for key, acc in row['accountings'].items():
            for base, values in bases.items():
                if base == name or (name == 'vdm-v' and base != 'vdm-scalar'): continue   # VDM with v against VDM with ε only
                g = paired(by_seed(acc, row['seeds']), values)
                if g: gaps[f"{name}, {acc['label']} − {base}"] = dict(g, config=name, accounting=key, base=base)
    if ref is not None and ref['settings_match'] and {'mulan', 'vdm-scalar'} <= set(ref['rows']):
        m, v = ref['rows']['mulan'], ref['rows']['vdm-scalar']
        gaps['mulan (sweep), valid bound − vdm-scalar'] = dict(paired(by_seed(m, m['seeds']), by_seed(v, v['seeds'])), config='mulan (sweep)', accounting='as_trained', base='vdm-scalar')
    settings = {k: a[k] for k in ('data', 'seeds', 'steps', 'batch_size', 'eval_every', 'eval_n_t', 'final_n_t', 'n_samples', 'runs')}
    settings.update(estimator='test bpd: dense NELBO, final_n_t draws of (t, ε, c) per test image, EMA weights, mean ± standard error over seeds',
                    accountings="as_trained: the run's final dense ELBO with the KL it was trained with (the softmax surrogate is NOT a bound); "
                                "valid: a softmax run's weights evaluated with kl='bound' (a second dense ELBO, torch seed = run seed); "
                                f"kl_mc: the valid (or bound-trained) evaluation's other terms plus log C(m, k) − the plug-in entropy of {KL_DRAWS} draws of c per test image "
                                "(an estimate of the true ELBO; the plug-in entropy is biased low, so this KL is biased high)",
                    latent_share='latent term / total bpd of the final dense ELBO, mean over seeds')
    return dict(settings=settings, sweep=ref, rows=list(rows.values()), gaps=gaps, train_hours=sum(r['train_seconds'] for r in records) / 3600)


def markdown(summary):
    s = summary['settings']
    lines = [f"digits, {s['steps']} steps, batch {s['batch_size']}, seeds {s['seeds']} ({summary['runs_done']} of {summary['runs_planned']} runs done); "
             f"test bpd = dense NELBO ({s['final_n_t']} draws per test image, EMA weights), mean ± standard error over the seeds done.", '',
             '| configuration | what | accounting | bound? | seeds | test bpd | per seed | diffusion | latent | latent share | recon | prior | params |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in summary['rows']:
        for x in r['accountings'].values():
            t = x['terms_mean']
            lines.append(f"| {r['config']} | {r['what']} | {x['label']} | {x['bound']} | {len(r['seeds'])} | {x['test_bpd']:.4f} ± {x['se_over_seeds']:.4f} | "
                         f"{', '.join(f'{v:.4f}' for v in x['per_seed'])} | {t['diffusion_bpd']:.4f} | {t['latent_bpd']:.4f} | {100 * x['latent_share']:.2f}% | "
                         f"{t['recon_bpd']:.4f} | {t['prior_bpd']:.4f} | {r['parameters'] / 1e6:.2f}M |")
    ref = summary['sweep']
    if ref is None: lines.append('\nSweep reference (VDM, MuLAN): not found.')
    elif not ref['settings_match']: lines.append(f"\nSweep reference {ref['path']} NOT used, settings differ: {'; '.join(ref['differences'])}.")
    else:
        for k, r in ref['rows'].items():
            share = f"{100 * r['latent_share']:.2f}%" if 'latent_share' in r else ''
            lat = f"{r['latent_bpd']:.4f}" if 'latent_bpd' in r else ('0' if k == 'vdm-scalar' else '')
            lines.append(f"| {k} (from {Path(ref['path']).name}) | {r['what']} | valid bound | yes | {len(r['seeds'])} | {r['test_bpd']:.4f} ± {r['se_over_seeds']:.4f} | "
                         f"{', '.join(f'{v:.4f}' for v in r['per_seed'])} | | {lat} | {share} | | | |")
    kl = [r for r in summary['rows'] if 'kl_mc_nats_per_seed' in r]
    if kl: lines += ['', 'KL(q(c|x) ‖ p(c)) by Monte Carlo, nats per image (the valid bound charges log C(m, k) = '
                     f"{kl[0]['log_n_states']:.3f}): " + '; '.join(f"{r['config']}: {', '.join(f'{v:.3f}' for v in r['kl_mc_nats_per_seed'])}" for r in kl)]
    if summary['gaps']:
        lines += ['', 'Differences in test bpd, paired by seed (mean ± standard error over the seeds both have):', '', '| difference | mean ± se | seeds | per seed |', '|---|---|---|---|']
        for k, g in summary['gaps'].items():
            lines.append(f"| {k} | {g['mean']:+.4f} ± {g['se']:.4f} | {g['seeds']} | {', '.join(f'{v:+.4f}' for v in g['per_seed'])} |")
    lines += ['', f"Training: {summary['train_hours'] * 60:.1f} min in all (one thread per run); this call {summary['wall_seconds_this_call'] / 60:.1f} min."]
    return '\n'.join(lines) + '\n'


def figure(summary, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    bars = []   # (label, per seed, mean, se, latent share, bound?)
    ref = summary['sweep']
    if ref and ref['settings_match']:
        for k, r in ref['rows'].items(): bars.append((f'{k} (sweep)', r['per_seed'], r['test_bpd'], r['se_over_seeds'], r.get('latent_share', math.nan), 'yes'))
    short = dict(as_trained='', valid=' (valid)', kl_mc=' (MC KL)')
    for r in summary['rows']:
        for key, x in r['accountings'].items():
            bars.append((r['config'] + (' (surrogate)' if x['bound'] == 'no' else short[key]), x['per_seed'], x['test_bpd'], x['se_over_seeds'], x['latent_share'], x['bound']))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.4 * len(bars) + 1.6), gridspec_kw=dict(width_ratios=[2, 1]))
    y = list(range(len(bars)))[::-1]
    style = dict(yes=dict(alpha=0.8), estimate=dict(alpha=0.4), no=dict(color='none', hatch='//'))
    for yi, (name, per, m, se, share, bound) in zip(y, bars):
        ax1.barh(yi, m, xerr=0 if math.isnan(se) else se, **{'color': 'C0', 'edgecolor': 'C0', **style[bound]})
        ax1.plot(per, [yi] * len(per), 'k.', ms=4)
        if not math.isnan(share): ax2.barh(yi, 100 * share, **{'color': 'C1', 'edgecolor': 'C1', **style[bound]})
    lo = min(min(b[1]) for b in bars); hi = max(max(b[1]) for b in bars)
    ax1.set_xlim(lo - 0.1 * (hi - lo + 0.05), hi + 0.1 * (hi - lo + 0.05))
    ax1.set_yticks(y, [b[0] for b in bars], fontsize=8); ax2.set_yticks(y, [''] * len(bars))
    ax1.set_xlabel('test bpd (dots: seeds; hatched: softmax surrogate, not a bound; pale: MC estimate)', fontsize=8); ax2.set_xlabel('latent term, % of the bpd', fontsize=8)
    ax1.grid(alpha=0.3, axis='x'); ax2.grid(alpha=0.3, axis='x')
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    p = experiment_parser(__doc__, '--configs', CONFIGS)
    add_folder_arguments(p, 'official-config')
    p.add_argument('--sweep-results', default=str(ROOT / 'experiments/results/digits.json'), help="compare.py's summary with the VDM and MuLAN rows")
    p.add_argument('--init-results', default=str(ROOT / 'experiments/results/schedule-init.json'), help="schedule_init.py's summary (MuLAN's latent term)")
    p.add_argument('--summary-only', action='store_true', help='train nothing; summarise the finished runs')
    a = parse_run_arguments(p, argv, configs=list(CONFIGS))
    import mulan_nb
    print(f"mulan_nb from {mulan_nb.__file__}", flush=True)
    summary = Summary('official_config.py', argv, a['results'], len(a['configs']) * len(a['seeds']), lambda rs: summarise(rs, a), markdown, figure)
    for name in [n for n in CONFIGS if n in a['configs']]:
        for seed in a['seeds']:
            try: r = run_one(name, seed, a)
            except ValueError as e: p.exit(2, f"official_config.py: error: {e}\n")
            if r is None: continue
            v = ''.join(f"; {k} {x['bpd']:.4f}" for k, x in run_accountings(r).items() if k != 'as_trained')
            summary.add(r, f"{name:14s} seed {seed}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f} (latent {r['terms']['latent_bpd']:.4f}){v} "
                           f"({r['seconds_this_call']:.0f} s)")
    summary.finish()


if __name__ == '__main__':
    main()
