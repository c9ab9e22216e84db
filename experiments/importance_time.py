"""Importance-sampled time: the variance of the batch NELBO at fixed weights, and test bpd at equal steps (issue 17, point 4).

    OMP_NUM_THREADS=1 python experiments/importance_time.py            # (a) variance ratios, (b) VDM and MuLAN x uniform/importance x seeds 0, 1, 2
    python experiments/importance_time.py --summary-only                # rewrite the summary from what is finished

`TrainConfig(time_sampling='importance')` (nbs/12_training.ipynb) draws t from a piecewise-constant proposal over
`time_bins` = 20 bins, p_b ∝ √(EMA of E[ℓ²] in bin b) mixed with the uniform (weight `time_mix` = 0.1), learned online
after `time_warmup` = 100 steps of uniform t, and divides the diffusion term ℓ(t) by p(t), so that the bound it trains
on stays unbiased. Two measurements:

(a) Variance at fixed weights. For a trained checkpoint (the `model` weights, evaluation mode: no dropout), a proposal is
fitted from --fit-batches batches of 64 training images under uniform stratified t (plain per-bin means of ℓ², no EMA:
the weights do not move), then --fixed-batches fixed batches of 64 training images are each drawn --draws times
(stratified t, fresh ε and c) under uniform and under importance-sampled t. Reported: Var[batch NELBO] importance /
uniform, pooled over the fixed batches (sum of variances over sum of variances), with a bootstrap standard error over
the draws (--bootstrap resamples, draws resampled within each batch and each method), next to the ratio that the
fitted histogram predicts for one image with i.i.d. t: (mean_b M_b/p_b − L²) / (mean_b M_b − L²). Checkpoints: the
uniform-t runs of the training seeds --variance-seeds after 1000 steps: MuLAN = experiments/runs/schedule-init/random-s{seed}
(digits-mulan, reused as in (b), or this script's mulan-uniform-s{seed}), VDM = this script's vdm-uniform-s{seed}, each
measured right after its run is done; then the mean ± standard error of the ratios over those seeds. All checkpoints are
measured on the same fixed batches with the same draws (--seed), so the spread over seeds is that of the models alone;
each ratio's bootstrap error over the draws is shared by all of them and does not shrink with more seeds.

(b) Test bpd at equal steps. digits-vdm (learned scalar schedule, no latent) and digits-mulan, uniform vs importance t,
with the settings of the 1000-step sweeps of experiments/compare.py and experiments/schedule_init.py (batch 64,
evaluation every 100 steps with 8 draws of (t, ε, c) per test image, final dense ELBO with 128 draws per test image,
EMA weights; the evaluation never uses importance sampling). MuLAN with uniform t is not retrained when --reuse holds
a finished run `random-s{seed}` with exactly these settings and model config (checked on its checkpoint, fields it
lacks at their defaults). Runs go to --runs/{config}-{sampling}-s{seed}, seed by seed (seed 0 for all four first);
finished runs are skipped, killed ones resume from checkpoint.pt, a finished variance measurement is read from
--runs/variance-{config}.json. The summary goes to --results/importance-time.{json,md} after every finished piece.
"""
import functools, json, math, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'experiments'))
import sweep
from sweep import TERMS, experiment_parser, add_folder_arguments, parse_run_arguments, Summary, pm, reused_run

CONFIGS = {'vdm': 'digits-vdm', 'mulan': 'digits-mulan'}
SAMPLINGS = ('uniform', 'importance')


def rel(path):
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if ROOT in p.parents else str(p)


def train_config(config, sampling, seed, a, out):
    from mulan_nb.training import TrainConfig
    return TrainConfig(preset=CONFIGS[config], data=a['data'], steps=a['steps'], batch_size=a['batch_size'], seed=seed, out=str(out),
                       eval_every=a['eval_every'], eval_n_t=a['eval_n_t'], final_n_t=a['final_n_t'], ckpt_every=a['eval_every'],
                       n_samples=a['n_samples'], time_sampling=sampling)


def reusable(config, sampling, seed, a):
    "(folder, note): a finished --reuse run standing for this one, or (None, why not)."
    if (config, sampling) != ('mulan', 'uniform') or not a['reuse']: return None, None
    folder = Path(a['reuse']) / f'random-s{seed}'
    return reused_run(folder, train_config(config, sampling, seed, a, folder), rel)


def train_run(config, sampling, seed, a):
    "Train (or resume, or skip, or reuse) one run; returns its record, or None with --summary-only and no finished run."
    from mulan_nb.training import train
    t0 = time.perf_counter()
    out, note = reusable(config, sampling, seed, a)
    reused = out is not None
    if not reused:
        out = Path(a['runs']) / f'{config}-{sampling}-s{seed}'
        if not (out / 'result.json').exists():
            if a['summary_only']: return None
            train(train_config(config, sampling, seed, a, out), resume=(out / 'checkpoint.pt').exists(), progress=False)
    result = json.loads((out / 'result.json').read_text())
    if (result['steps'], result['data'], result['preset']) != (a['steps'], a['data'], CONFIGS[config]):
        raise ValueError(f"{out} holds a finished run of {result['steps']} steps of {result['preset']} on {result['data']}: use another --runs folder")
    metrics = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals, trains = [m for m in metrics if m.get('kind') == 'eval'], [m for m in metrics if m.get('kind') == 'train']
    return dict(config=config, sampling=sampling, seed=seed, folder=rel(out), reused=reused, reuse_note=note,
                test_bpd=result['test_bpd'], test_se=result['test_se'], terms={k: evals[-1][k] for k in TERMS},
                curve=[(m['step'], m['bpd']) for m in evals], proposal=result.get('time_proposal'),
                train_seconds=sum((m['step'] - prev) / m['steps_per_s'] for prev, m in zip([0] + [m['step'] for m in trains], trains)),
                seconds_this_call=time.perf_counter() - t0)


def variance(config, checkpoint, a, seed=0):
    "(a): fit a proposal at fixed weights of the checkpoint of training seed `seed`, then Var[batch NELBO] under uniform and importance t; cached in --runs/variance-{config}[-s{seed}].json."
    cache = Path(a['runs']) / (f'variance-{config}.json' if seed == 0 else f'variance-{config}-s{seed}.json')
    keys = ('fit_batches', 'fixed_batches', 'draws', 'batch_size', 'bins', 'mix', 'bootstrap', 'seed')
    if cache.exists():
        got = json.loads(cache.read_text())
        if got['checkpoint'] == rel(checkpoint) and got['checkpoint_step'] == a['steps'] and all(got['settings'][k] == a[k] for k in keys): return got
    if a['summary_only'] or not Path(checkpoint).exists(): return None
    import torch
    from mulan_nb.model import MuLAN, MuLANConfig, load_checkpoint
    from mulan_nb.data import load_data, batch_indices
    from mulan_nb.bound import stratified_times
    from mulan_nb.training import TimeProposal, importance_weighted
    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint)
    if state['step'] != a['steps']: raise ValueError(f"{rel(checkpoint)} is at step {state['step']}, not --steps {a['steps']}: (a) measures finished runs")
    model = MuLAN(MuLANConfig(**state['config'])); model.load_state_dict(state['model']); model.eval()
    x_all = load_data(state['train']['data'], 'train', state['train'].get('root'), state['train'].get('K')).images
    B, prop = a['batch_size'], TimeProposal(a['bins'], a['mix'], warmup=0)
    chunk = max(1, 1024 // B)   # draws per forward pass (rows = chunk × B)

    @torch.no_grad()
    def draws(batches, proposal):
        "One draw of (t, ε, c) for each batch of `batches` (m, B, ...): (batch NELBO (m,), t (m·B), raw diffusion (m·B)), `chunk` batches per forward pass."
        out = []
        for k in range(0, len(batches), chunk):
            xs = batches[k:k + chunk]
            u = torch.cat([stratified_times(B) for _ in range(len(xs))])
            t, p_t = proposal.sample(u) if proposal is not None else (u, torch.ones_like(u))
            terms = model.nelbo(xs.flatten(0, 1), t)
            out.append((importance_weighted(terms, p_t)['bpd'].view(len(xs), B).mean(1), t, terms['diffusion']))
        return [torch.cat(z) for z in zip(*out)]
    torch.manual_seed(a['seed'])
    fit = torch.stack([x_all[batch_indices(len(x_all), B, n, a['seed'] + 1)] for n in range(a['fit_batches'])])   # fresh batches of training images
    fit_nelbo, t, ell = draws(fit, None)   # uniform t, one draw each
    stats = prop.bin_stats(t, ell)
    sq, cnt = stats.split(a['bins'])
    prop.load_state_dict(dict(bins=a['bins'], second_moment=sq / cnt.clamp(min=1), seen=cnt.long(), updates=1))
    if not bool((cnt > 0).all()): raise ValueError(f"--fit-batches {a['fit_batches']} left bins of t empty: use more")
    p, M = prop.density, sq / cnt
    per_batch = []
    for k in range(a['fixed_batches']):
        x = x_all[batch_indices(len(x_all), B, 10_000 + k, a['seed'] + 2)].expand(a['draws'], B, *x_all.shape[1:])
        uni, _, ell_u = draws(x, None)
        imp, _, _ = draws(x, prop)
        per_batch.append(dict(uniform=uni.double(), importance=imp.double(), ell_mean=ell_u.double().mean().item()))
        print(f"  {config}: fixed batch {k}: Var uniform {uni.var():.3e}, importance {imp.var():.3e}, ratio {imp.var() / uni.var():.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    pooled = lambda us, is_: sum(v.var() for v in is_) / sum(v.var() for v in us)
    ratio = pooled([b['uniform'] for b in per_batch], [b['importance'] for b in per_batch]).item()
    g = torch.Generator().manual_seed(a['seed'] + 3)
    resample = lambda v: v[torch.randint(len(v), (len(v),), generator=g)]
    boot = torch.tensor([pooled([resample(b['uniform']) for b in per_batch], [resample(b['importance']) for b in per_batch]).item()
                         for _ in range(a['bootstrap'])])
    L = statistics.fmean(b['ell_mean'] for b in per_batch)   # mean diffusion term per image (uniform draws of the fixed batches)
    predicted = (((M / p).mean() - L ** 2) / (M.mean() - L ** 2)).item()
    res = dict(config=config, training_seed=seed, checkpoint=rel(checkpoint), checkpoint_step=state['step'], weights="the checkpoint's `model` weights (not the EMA), evaluation mode (no dropout)",
               settings={k: a[k] for k in keys}, ratio=ratio, ratio_se=boot.std().item(), ratio_ci95=[boot.quantile(0.025).item(), boot.quantile(0.975).item()],
               per_batch=[dict(var_uniform=b['uniform'].var().item(), var_importance=b['importance'].var().item(), ratio=(b['importance'].var() / b['uniform'].var()).item(),
                               mean_uniform=b['uniform'].mean().item(), mean_importance=b['importance'].mean().item(),
                               mean_diff_se=math.sqrt(b['uniform'].var().item() / a['draws'] + b['importance'].var().item() / a['draws'])) for b in per_batch],
               predicted_iid_ratio=predicted, density=p.tolist(), rms_by_bin=M.sqrt().tolist(), fit_nelbo_mean=fit_nelbo.mean().item(),
               seconds=time.perf_counter() - t0)
    cache.parent.mkdir(parents=True, exist_ok=True); cache.write_text(json.dumps(res, indent=1))
    return res


mean_se = functools.partial(sweep.mean_se, single=None)   # None for one value, so that the JSON holds no bare NaN


def summarise(records, variances, a):
    "The summary: (a) per model and training seed, and over the seeds; (b) per model and sampling, over the seeds, and importance − uniform paired by seed."
    rows = []
    for config in a['configs']:
        for sampling in SAMPLINGS:
            rs = sorted([r for r in records if (r['config'], r['sampling']) == (config, sampling)], key=lambda r: r['seed'])
            if not rs: continue
            m, se = mean_se([r['test_bpd'] for r in rs])
            rows.append(dict(config=config, preset=CONFIGS[config], sampling=sampling, seeds=[r['seed'] for r in rs], test_bpd=m, se_over_seeds=se,
                             per_seed=[r['test_bpd'] for r in rs], per_seed_se_within=[r['test_se'] for r in rs],
                             terms_mean={k: statistics.fmean(r['terms'][k] for r in rs) for k in TERMS},
                             folders=[r['folder'] for r in rs], reused=[r['folder'] for r in rs if r['reused']],
                             reuse_notes=[r['reuse_note'] for r in rs if r['reuse_note']], train_seconds=[r['train_seconds'] for r in rs],
                             per_seed_curves={str(r['seed']): r['curve'] for r in rs}, proposals={str(r['seed']): r['proposal'] for r in rs if r['proposal']}))
    paired = {}
    for config in a['configs']:
        by = {s: {r['seed']: r['test_bpd'] for r in records if (r['config'], r['sampling']) == (config, s)} for s in SAMPLINGS}
        seeds = sorted(set(by['uniform']) & set(by['importance']))
        if seeds:
            d, se = mean_se([by['importance'][s] - by['uniform'][s] for s in seeds])
            paired[config] = dict(seeds=seeds, importance_minus_uniform=d, se=se)
    settings = {k: a[k] for k in ('data', 'seeds', 'configs', 'steps', 'batch_size', 'eval_every', 'eval_n_t', 'final_n_t', 'n_samples', 'runs', 'reuse',
                                  'fit_batches', 'fixed_batches', 'draws', 'bins', 'mix', 'bootstrap', 'variance_seeds')}
    settings.update(proposal='TrainConfig defaults: time_bins 20, time_mix 0.1, time_warmup 100, EMA decay 0.99 per step',
                    estimator='test bpd: dense NELBO (continuous time, valid bound), final_n_t draws of (t, ε, c) per test image with uniform stratified t, '
                              'EMA weights; mean ± standard error over seeds; importance − uniform paired by seed',
                    variance='Var over draws of (t, ε, c) of the mean NELBO of a fixed batch of 64 training images, fixed weights; pooled over the fixed batches; '
                             'se: bootstrap over draws')
    by_seed = {c: {str(seed): {**v, 'training_seed': seed} for seed, v in sorted(vs.items()) if v is not None} for c, vs in variances.items()}
    over = {}
    for c, vs in by_seed.items():
        if vs:
            m, se = mean_se([v['ratio'] for v in vs.values()])
            over[c] = dict(seeds=[int(k) for k in vs], ratios=[v['ratio'] for v in vs.values()], ratio=m, se_over_seeds=se)
    return dict(settings=settings, variance_seeds=by_seed, variance_over_seeds=over,
                rows=rows, importance_minus_uniform=paired,
                train_hours=sum(r['train_seconds'] for r in records if not r['reused']) / 3600)


def markdown(summary):
    s = summary['settings']
    lines = [f"Importance-sampled time on digits (issue 17, point 4). Proposal: {s['proposal']}.", '',
             f"(a) Variance of the batch NELBO at fixed weights (batch of {s['batch_size']} training images; proposal fitted from {s['fit_batches']} batches; "
             f"{s['fixed_batches']} fixed batches × {s['draws']} draws of (t, ε, c) per method; ratio pooled over the batches, ± bootstrap se):", '',
             '| model | checkpoint | Var importance / Var uniform | 95% interval | per fixed batch | predicted, one image, i.i.d. t | time |', '|---|---|---|---|---|---|---|']
    for c, v in ((c, v) for c, vs in summary['variance_seeds'].items() for v in vs.values()):
        lines.append(f"| {CONFIGS[c]} | {v['checkpoint']} (step {v['checkpoint_step']}) | {v['ratio']:.3f} ± {v['ratio_se']:.3f} | "
                     f"{v['ratio_ci95'][0]:.3f}–{v['ratio_ci95'][1]:.3f} | {', '.join(format(b['ratio'], '.3f') for b in v['per_batch'])} | {v['predicted_iid_ratio']:.3f} | {v['seconds'] / 60:.1f} min |")
    if not any(summary['variance_seeds'].values()): lines.append('| (not measured yet) | | | | | | |')
    if summary['variance_over_seeds']:
        lines += ['', 'Over the training seeds (mean ± standard error of the ratios): ' + '; '.join(
            f"{CONFIGS[c]} {pm(o['ratio'], o['se_over_seeds'], 3)} (seeds {o['seeds']})" for c, o in summary['variance_over_seeds'].items())]
    lines += ['', f"(b) Test bpd after {s['steps']} steps, batch {s['batch_size']} (dense NELBO, {s['final_n_t']} draws per test image, uniform stratified t, EMA weights); "
              "mean ± standard error over the seeds done:", '', '| model | time sampling | seeds | test bpd | per seed | diffusion | latent | train time per run |', '|---|---|---|---|---|---|---|---|']
    for r in summary['rows']:
        t = r['terms_mean']
        mins = ', '.join(f"{x / 60:.0f}" for x in r['train_seconds'])
        lines.append(f"| {r['preset']} | {r['sampling']} | {r['seeds']} | {pm(r['test_bpd'], r['se_over_seeds'])} | {', '.join(f'{x:.4f}' for x in r['per_seed'])} | "
                     f"{t['diffusion_bpd']:.4f} | {t['latent_bpd']:.4f} | {mins} min{' (reused)' if r['reused'] else ''} |")
    if summary['importance_minus_uniform']:
        lines += ['', 'Importance − uniform, test bpd, paired by seed: ' + '; '.join(
            f"{CONFIGS[c]} {('+' if d['importance_minus_uniform'] >= 0 else '')}{pm(d['importance_minus_uniform'], d['se'])} (seeds {d['seeds']})" for c, d in summary['importance_minus_uniform'].items())]
    reused = [f for r in summary['rows'] for f in r['reused']]
    if reused: lines += ['', f"MuLAN with uniform t reused from {', '.join(reused)} (experiments/schedule_init.py, init 'random'): the same training settings and model config, checked on the checkpoints."]
    notes = [n for r in summary['rows'] for n in r['reuse_notes']]
    if notes: lines += ['', 'Not reused: ' + ' | '.join(notes)]
    lines += ['', f"Training: {summary['train_hours'] * 60:.0f} min in all for the runs trained here (one thread per run); "
              f"{summary.get('runs_done', '?')} of {summary.get('runs_planned', '?')} runs done."]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = experiment_parser(__doc__, '--configs', CONFIGS, help=f'subset of {list(CONFIGS)}')
    p.add_argument('--fit-batches', type=int, default=300, help='(a): batches of uniform t that fit the proposal')
    p.add_argument('--fixed-batches', type=int, default=4, help='(a): fixed batches of images whose NELBO variance is measured')
    p.add_argument('--draws', type=int, default=250, help='(a): draws of (t, ε, c) per fixed batch and method')
    p.add_argument('--bins', type=int, default=20); p.add_argument('--mix', type=float, default=0.1)
    p.add_argument('--bootstrap', type=int, default=2000); p.add_argument('--seed', type=int, default=0, help='(a): seed of the draws')
    p.add_argument('--variance-seeds', type=int, nargs='*', default=[0, 1, 2], help='(a): the training seeds (of --seeds) whose uniform-t checkpoints are measured')
    p.add_argument('--skip-variance', action='store_true', help='train only')
    p.add_argument('--jobs', type=int, default=1, help='only 1: runs go one after another (one thread)')
    add_folder_arguments(p, 'importance-time', reuse_help="finished digits-mulan runs random-s{seed} standing for MuLAN with uniform t ('' : none)")
    p.add_argument('--summary-only', action='store_true', help='train and measure nothing; summarise what is finished')
    a = parse_run_arguments(p, argv, configs=list(CONFIGS))
    if a['jobs'] != 1: p.error('--jobs: only 1 (the runs share the machine with others)')
    if set(a['variance_seeds']) - set(a['seeds']): p.error(f"--variance-seeds {sorted(set(a['variance_seeds']) - set(a['seeds']))} are not among --seeds {a['seeds']}: (a) measures the uniform-t runs of --seeds")
    import torch, mulan_nb
    torch.set_num_threads(1)
    print(f"mulan_nb from {mulan_nb.__file__}", flush=True)
    variances = {}
    order = [(c, s, seed) for seed in a['seeds'] for c, s in (('vdm', 'uniform'), ('vdm', 'importance'), ('mulan', 'importance'), ('mulan', 'uniform')) if c in a['configs']]
    summary = Summary('importance_time.py', argv, a['results'], len(order), lambda rs: summarise(rs, variances, a), markdown)
    def measure(config, seed, checkpoint):
        if a['skip_variance'] and not a['summary_only'] or config not in a['configs'] or seed not in a['variance_seeds']: return
        v = variances.setdefault(config, {})[seed] = variance(config, checkpoint, a, seed)
        if v: print(f"{config} seed {seed}: Var importance / uniform = {v['ratio']:.3f} ± {v['ratio_se']:.3f}", flush=True)
        summary.write()
    for config, sampling, seed in order:
        r = train_run(config, sampling, seed, a)
        if r is not None:
            summary.add(r, f"{config} {sampling:10s} seed {seed}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f} ({r['seconds_this_call']:.0f} s this call)")
        if sampling == 'uniform' and r is not None: measure(config, seed, Path(ROOT, r['folder']) / 'checkpoint.pt')   # the folder train_run chose (reused or trained here)
    summary.finish(need_runs=False)


if __name__ == '__main__':
    main()
