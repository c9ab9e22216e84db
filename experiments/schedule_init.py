"""Where MuLAN's slow start comes from: the polynomial schedule's initialisation (issue 17, point 0).

    OMP_NUM_THREADS=1 python experiments/schedule_init.py          # digits-mulan, init random and linear x seeds 0, 1, 2, 1000 steps each
    python experiments/schedule_init.py --summary-only              # rewrite the summary from the finished runs

MuLAN's polynomial schedule starts, with the official initialisation ('random'), as a random polynomial per pixel
and per latent; `schedule_init='linear'` zeroes the heads of a and b so that γ starts exactly linear in t for every
pixel and every c, as VDM-linear does. Both are trained here with the settings of the 1000-step sweep of
experiments/compare.py (batch 64, evaluation every 100 steps with 8 draws of (t, ε, c) per test image, final dense
ELBO with 128 draws, EMA weights), and compared with that sweep's VDM curves (experiments/results/digits.json) when
its settings match. A callback records, every 100 steps and at step 0 (the initial model rebuilt with the run's
seed), for the EMA weights at t = 0.5 with c ~ q(c|x) from a fixed seeded generator: the spread over pixels (mean
over test images of the std over pixels of γ) and the spread over images (mean over pixels of the std over test
images of γ); std with ddof = 0.

Runs go to --runs/{init}-s{seed}; finished runs (result.json) are skipped, killed ones resume from checkpoint.pt.
The summary goes to --results/schedule-init.{json,md,png}; nbs/16_experiments.ipynb reads the JSON.
"""
import json, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'experiments'))
from sweep import mean_se, experiment_parser, add_folder_arguments, parse_run_arguments, Summary

INITS = ('random', 'linear')
T_SPREAD = 0.5
SPREAD_SEED = 1234   # the generator of the draws c ~ q(c|x) for the spreads


class GammaSpread:
    "Callback: spreads of γ at t = 0.5 (EMA weights, test images, fixed draws of c) at step 0 and every `every` steps."
    key = 'gamma_spread'
    def __init__(self, every:int=100, t:float=T_SPREAD, seed:int=SPREAD_SEED):
        self.every, self.t, self.seed, self.rows = every, t, seed, []

    def measure(self, model, x) -> dict:
        import torch
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                c, _ = model.encode(x, torch.Generator(device=x.device).manual_seed(self.seed))
                g, _ = model.gamma(torch.full((len(x),), self.t, device=x.device), c)
                g = g.expand(len(x), *model.config.data_shape).reshape(len(x), -1).double()
        finally: model.train(was_training)
        return dict(over_pixels=g.std(1, correction=0).mean().item(), over_images=g.std(0, correction=0).mean().item(),
                    mean=g.mean().item())

    def initial_model(self, trainer):
        "The model as `Trainer` built it before step 1: the same config under the same seed (global RNG left as it was)."
        import torch
        from mulan_nb.model import MuLAN
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer.cfg.seed)
            return MuLAN(trainer.mcfg).to(trainer.device)

    def after_step(self, trainer):
        if trainer.rank: return
        if not any(r['step'] == 0 for r in self.rows):
            self.rows.insert(0, dict(step=0, **self.measure(self.initial_model(trainer), trainer.xtest)))
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.steps:
            if not any(r['step'] == trainer.step for r in self.rows):
                self.rows.append(dict(step=trainer.step, **self.measure(trainer.ema, trainer.xtest)))

    def state_dict(self): return dict(rows=self.rows)
    def load_state_dict(self, state): self.rows = list(state['rows'])
    def result(self, trainer): return dict(gamma_spread=dict(t=self.t, seed=self.seed, model='EMA', rows=self.rows))


def run_one(init, seed, a):
    "Train (or resume, or skip) one run; returns its record."
    import torch
    torch.set_num_threads(1)
    from mulan_nb.training import TrainConfig, train
    out = Path(a['runs']) / f'{init}-s{seed}'
    t0 = time.perf_counter()
    if not (out / 'result.json').exists():
        if a['summary_only']: return None
        cfg = TrainConfig(preset='digits-mulan', model=dict(schedule_init=init), data=a['data'], steps=a['steps'], batch_size=a['batch_size'],
                          seed=seed, out=str(out), eval_every=a['eval_every'], eval_n_t=a['eval_n_t'], final_n_t=a['final_n_t'],
                          ckpt_every=a['eval_every'], n_samples=a['n_samples'])
        train(cfg, resume=(out / 'checkpoint.pt').exists(), progress=False, callbacks=[GammaSpread(a['eval_every'])])
    result = json.loads((out / 'result.json').read_text())
    if (result['steps'], result['data'], result['preset']) != (a['steps'], a['data'], 'digits-mulan'):
        raise ValueError(f"{out} holds a finished run of {result['steps']} steps of {result['preset']} on {result['data']}: use another --runs folder")
    metrics = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals = [m for m in metrics if m.get('kind') == 'eval']
    trains = [m for m in metrics if m.get('kind') == 'train']
    return dict(init=init, seed=seed, test_bpd=result['test_bpd'], test_se=result['test_se'],
                terms={k: evals[-1][k] for k in ('diffusion_bpd', 'recon_bpd', 'prior_bpd', 'latent_bpd')},
                curve=[(m['step'], m['bpd']) for m in evals], spreads=result['gamma_spread']['rows'],
                train_seconds=sum((m['step'] - prev) / m['steps_per_s'] for prev, m in zip([0] + [m['step'] for m in trains], trains)),
                seconds_this_call=time.perf_counter() - t0)


def vdm_reference(a):
    "VDM's rows from the 1000-step sweep, with a note on whether its settings match these runs."
    path = Path(a['vdm_results'])
    if not path.exists(): return None
    d = json.loads(path.read_text())
    s = d['settings']
    keys = ('data', 'steps', 'batch_size', 'eval_every', 'eval_n_t')
    diff = [f"{k} {s.get(k)!r} vs {a[k]!r}" for k in keys if s.get(k) != a[k]]
    if s.get('levels') is not None: diff.append(f"levels {s['levels']!r} vs None")
    if a['final_n_t'] != 128: diff.append(f"final_n_t 128 (compare.py) vs {a['final_n_t']}")
    rows = {r['config']: dict(config=r['config'], seeds=r['seeds'], test_bpd=r['test_bpd'], se_over_seeds=r['se_over_seeds'],
                              per_seed=r['per_seed'], mean_curve=r['mean_curve']) for r in d['rows'] if r['config'] in ('vdm-scalar', 'vdm-linear')}
    return dict(path=str(path.relative_to(ROOT) if path.is_absolute() and ROOT in path.parents else path), settings_match=not diff, differences=diff,
                matched_on=list(keys) + ['levels', 'final_n_t (compare.py uses the default 128)'], seeds=s.get('seeds'), rows=rows,
                per_seed_curves=False)


def summarise(records, a):
    vdm = vdm_reference(a)
    use_vdm = vdm is not None and vdm['settings_match']
    configs = {}
    for init in INITS:
        rs = sorted([r for r in records if r['init'] == init], key=lambda r: r['seed'])
        if not rs: continue
        m, se = mean_se([r['test_bpd'] for r in rs])
        steps = sorted(set.intersection(*[{s for s, _ in r['curve']} for r in rs]))
        curve = [[s, statistics.fmean(dict(r['curve'])[s] for r in rs)] for s in steps]
        curve_se = [[s, mean_se([dict(r['curve'])[s] for r in rs])[1]] for s in steps]
        ssteps = sorted(set.intersection(*[{q['step'] for q in r['spreads']} for r in rs]))
        sp = {q: {r['seed']: {x['step']: x[q] for x in r['spreads']} for r in rs} for q in ('over_pixels', 'over_images')}
        spreads = dict(steps=ssteps, per_seed={q: {str(sd): [v[s] for s in ssteps] for sd, v in sp[q].items()} for q in sp},
                       mean={q: [statistics.fmean(v[s] for v in sp[q].values()) for s in ssteps] for q in sp},
                       se={q: [mean_se([v[s] for v in sp[q].values()])[1] for s in ssteps] for q in sp})
        c = dict(init=init, seeds=[r['seed'] for r in rs], per_seed=[r['test_bpd'] for r in rs], per_seed_se_within=[r['test_se'] for r in rs],
                 test_bpd=m, se_over_seeds=se, terms_mean={k: statistics.fmean(r['terms'][k] for r in rs) for k in rs[0]['terms']},
                 per_seed_curves={str(r['seed']): r['curve'] for r in rs}, mean_curve=curve, mean_curve_se=curve_se, spreads=spreads,
                 train_seconds=[r['train_seconds'] for r in rs])
        if use_vdm:
            c['gap'] = {}
            for ref, row in vdm['rows'].items():
                vc = dict(row['mean_curve'])
                gaps = []
                for s in steps:
                    if s not in vc: continue
                    mu = [dict(r['curve'])[s] for r in rs]
                    if s == a['steps'] and row['seeds'] == c['seeds']:   # final dense ELBO: VDM's per-seed values exist, paired by seed
                        g, gse = mean_se([x - y for x, y in zip(mu, row['per_seed'])])
                        how = 'paired by seed (final dense ELBO, 128 draws)'
                    else:   # only VDM's mean curve is stored: MuLAN's seeds against VDM's mean; the error is MuLAN's only
                        g, gse = statistics.fmean(mu) - vc[s], mean_se(mu)[1]
                        how = "against VDM's mean curve; se is MuLAN's over seeds only (VDM's per-seed curves are not stored)"
                    gaps.append(dict(step=s, gap=g, se=gse, how=how))
                c['gap'][ref] = gaps
        configs[init] = c
    diff = None
    if all(i in configs for i in INITS) and configs['random']['seeds'] == configs['linear']['seeds']:   # linear − random, paired by seed
        r_, l_ = configs['random'], configs['linear']
        diff = [dict(step=s, diff=d, se=se) for s in [x for x, _ in l_['mean_curve']]
                for d, se in [mean_se([dict(l_['per_seed_curves'][k])[s] - dict(r_['per_seed_curves'][k])[s] for k in l_['per_seed_curves']])]]
    settings = {k: a[k] for k in ('data', 'seeds', 'steps', 'batch_size', 'eval_every', 'eval_n_t', 'final_n_t', 'n_samples', 'runs')}
    settings.update(preset='digits-mulan', inits=list(INITS), spread_t=T_SPREAD, spread_generator_seed=SPREAD_SEED,
                    spread_definition='over_pixels: mean over test images of the std (ddof 0) over pixels of γ(c, t=0.5); '
                                      'over_images: mean over pixels of the std (ddof 0) over test images; EMA weights, c ~ q(c|x) from a fixed seeded generator; step 0: the initial model',
                    estimator='test bpd: dense NELBO, EMA weights; curve points at eval steps use eval_n_t draws per test image, the last point the final dense ELBO with final_n_t draws')
    return dict(settings=settings, vdm=vdm, vdm_used=use_vdm, configs=configs, linear_minus_random=diff,
                train_hours=sum(r['train_seconds'] for r in records) / 3600)


def markdown(summary):
    s, cs = summary['settings'], summary['configs']
    lines = [f"digits-mulan, schedule_init random vs linear, {s['steps']} steps, batch {s['batch_size']}, seeds {s['seeds']}; "
             f"test bpd = dense NELBO ({s['final_n_t']} draws per test image, EMA weights), mean ± standard error over seeds.", '']
    v = summary['vdm']
    if v is None: lines.append('VDM reference: not found.')
    elif summary['vdm_used']: lines.append(f"VDM reference: {v['path']} (settings match: {', '.join(v['matched_on'])}); its curves are means over seeds {v['seeds']} (per-seed curves not stored), so gaps before the last step carry MuLAN's standard error only; at the last step they are paired by seed.")
    else: lines.append(f"VDM reference {v['path']} NOT used, settings differ: {'; '.join(v['differences'])}.")
    lines += ['', '| init | test bpd | per seed | diffusion | latent | recon | prior |', '|---|---|---|---|---|---|---|']
    for init, c in cs.items():
        t = c['terms_mean']
        lines.append(f"| {init} | {c['test_bpd']:.4f} ± {c['se_over_seeds']:.4f} | {', '.join(f'{x:.4f}' for x in c['per_seed'])} | "
                     f"{t['diffusion_bpd']:.4f} | {t['latent_bpd']:.4f} | {t['recon_bpd']:.4f} | {t['prior_bpd']:.4f} |")
    if v is not None:
        for ref, row in v['rows'].items():
            lines.append(f"| ({ref}, from {Path(v['path']).name}) | {row['test_bpd']:.4f} ± {row['se_over_seeds']:.4f} | {', '.join(f'{x:.4f}' for x in row['per_seed'])} | | | | |")
    if summary['vdm_used']:
        steps = [g['step'] for g in next(iter(cs.values()))['gap']['vdm-scalar']]
        lines += ['', 'MuLAN − VDM (test bpd) at each evaluation, mean ± standard error over seeds:', '',
                  '| step | ' + ' | '.join(f'{i} − {r}' for i in cs for r in v['rows']) + ' | linear − random (paired) |',
                  '|---|' + '---|' * (len(cs) * len(v['rows']) + 1)]
        lr = {d['step']: d for d in (summary['linear_minus_random'] or [])}
        for k, st in enumerate(steps):
            cells = [f"{c['gap'][r][k]['gap']:+.4f} ± {c['gap'][r][k]['se']:.4f}" for c in cs.values() for r in v['rows']]
            d = lr.get(st)
            paired = '' if d is None else f"{d['diff']:+.4f} ± {d['se']:.4f}"
            lines.append(f"| {st} | " + ' | '.join(cells) + f" | {paired} |")
    lines += ['', f"Spread of γ at t = {s['spread_t']} (EMA, test images), mean ± standard error over seeds:", '',
              '| step | ' + ' | '.join(f'{i}: over pixels | {i}: over images' for i in cs) + ' |', '|---|' + '---|---|' * len(cs)]
    steps = next(iter(cs.values()))['spreads']['steps']
    for k, st in enumerate(steps):
        cells = []
        for c in cs.values():
            sp = c['spreads']
            cells += [f"{sp['mean'][q][k]:.4f} ± {sp['se'][q][k]:.4f}" if st in sp['steps'] else '' for q in ('over_pixels', 'over_images')]
        lines.append(f"| {st} | " + ' | '.join(cells) + ' |')
    lines += ['', f"Training: {summary['train_hours'] * 60:.1f} min in all (one thread per run)."]
    return '\n'.join(lines) + '\n'


def figure(summary, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (init, c) in enumerate(summary['configs'].items()):
        for ref, ls in (('vdm-scalar', '-'), ('vdm-linear', ':')):
            g = c.get('gap', {}).get(ref)
            if not g: continue
            ax1.errorbar([x['step'] for x in g], [x['gap'] for x in g], yerr=[x['se'] for x in g], ls=ls, marker='o', ms=3, color=f'C{k}', capsize=2, label=f'{init} − {ref}')
        sp = c['spreads']
        ax2.errorbar(sp['steps'], sp['mean']['over_pixels'], yerr=sp['se']['over_pixels'], color=f'C{k}', marker='o', ms=3, capsize=2, label=f'{init}: over pixels')
        ax2.errorbar(sp['steps'], sp['mean']['over_images'], yerr=sp['se']['over_images'], color=f'C{k}', ls='--', marker='s', ms=3, capsize=2, label=f'{init}: over images')
    ax1.axhline(0, color='k', lw=0.8); ax1.set_xlabel('step'); ax1.set_ylabel('MuLAN − VDM, test bpd'); ax1.set_title('gap to VDM (mean ± se over seeds)')
    if ax1.get_legend_handles_labels()[0]: ax1.legend(fontsize=7)
    else: ax1.text(0.5, 0.5, "no VDM reference with these settings", ha='center', transform=ax1.transAxes)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel('step'); ax2.set_ylabel(f"std of γ at t = {summary['settings']['spread_t']}"); ax2.set_title('spread of the schedule (EMA, test images)')
    ax2.legend(fontsize=7); ax2.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    p = experiment_parser(__doc__, '--inits', INITS)
    add_folder_arguments(p, 'schedule-init')
    p.add_argument('--vdm-results', default=str(ROOT / 'experiments/results/digits.json'), help="compare.py's summary with the VDM rows")
    p.add_argument('--summary-only', action='store_true', help='train nothing; summarise the finished runs')
    a = parse_run_arguments(p, argv, inits=INITS)
    import mulan_nb
    print(f"mulan_nb from {mulan_nb.__file__}", flush=True)
    summary = Summary('schedule_init.py', argv, a['results'], len(a['inits']) * len(a['seeds']), lambda rs: summarise(rs, a), markdown, figure)
    for seed in a['seeds']:
        for init in a['inits']:
            r = run_one(init, seed, a)
            if r is None: continue
            summary.add(r, f"{init:7s} seed {seed}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f}; spread over pixels "
                           f"{r['spreads'][0]['over_pixels']:.3f} -> {r['spreads'][-1]['over_pixels']:.3f} ({r['seconds_this_call']:.0f} s)")
    summary.finish()


if __name__ == '__main__':
    main()
