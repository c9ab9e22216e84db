"""Schedule dimensionality: MuLAN's γ shared over p×p patches, test bpd against d (issue 17, point 2).

    OMP_NUM_THREADS=1 python experiments/schedule_dims.py              # digits-mulan, p = 8, 4, 2, 1 x seeds 0, 1, 2, 1000 steps each
    python experiments/schedule_dims.py --summary-only                  # rewrite the summary from the finished runs

`MuLANConfig.schedule_patch = p` makes the polynomial schedule's heads output one (a, b, d) per p×p patch, expanded
to its pixels: d = C·(H/p)·(W/p) schedules, so on 1×8×8 digits p = 8, 4, 2, 1 give d = 1, 4, 16, 64 (p = 1, the
per-pixel schedule, is the default digits-mulan). The schedule network's trunk keeps the width D = 64 at every p;
only the heads shrink. Everything else is the digits-mulan preset and the settings of the 1000-step sweeps of
experiments/compare.py and experiments/schedule_init.py (batch 64, evaluation every 100 steps with 8 draws of
(t, ε, c) per test image, final dense ELBO with 128 draws per test image, EMA weights).

p = 1 is not retrained when --reuse holds a finished run `random-s{seed}` (experiments/schedule_init.py's default
init) whose checkpoint has exactly these training settings and model config: its result is read from there, and
the summary says so. Other runs go to --runs/p{p}-s{seed}; finished runs (result.json) are skipped, killed ones
resume from checkpoint.pt. Runs go seed by seed (seed 0 for every p first), so a sweep cut short leaves complete
seeds. The summary goes to --results/schedule-dims.{json,md,png}; it is rewritten after every finished run.
"""
import functools, json, statistics, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'experiments'))
import sweep
from sweep import TERMS, experiment_parser, add_folder_arguments, parse_run_arguments, Summary, pm, reused_run

PRESET = 'digits-mulan'
PATCHES = (8, 4, 2, 1)


def train_config(patch, seed, a, out):
    "The TrainConfig of one run (p = 1 leaves the model as the preset has it)."
    from mulan_nb.training import TrainConfig
    return TrainConfig(preset=PRESET, model={} if patch == 1 else dict(schedule_patch=patch), data=a['data'], steps=a['steps'],
                       batch_size=a['batch_size'], seed=seed, out=str(out), eval_every=a['eval_every'], eval_n_t=a['eval_n_t'],
                       final_n_t=a['final_n_t'], ckpt_every=a['eval_every'], n_samples=a['n_samples'])


def reusable(patch, seed, a):
    "(folder, note): the finished --reuse run standing for (p, seed), or (None, why not)."
    if patch != 1 or not a['reuse']: return None, None
    folder = Path(a['reuse']) / f'random-s{seed}'
    return reused_run(folder, train_config(patch, seed, a, folder))


def run_one(job):
    "Train (or resume, or skip, or reuse) one (p, seed) run; returns its record."
    patch, seed, a = job
    import torch
    torch.set_num_threads(1)
    from mulan_nb.training import train
    t0 = time.perf_counter()
    out, note = reusable(patch, seed, a)
    reused = out is not None
    if not reused:
        out = Path(a['runs']) / f'p{patch}-s{seed}'
        if not (out / 'result.json').exists():
            if a['summary_only']: return None
            train(train_config(patch, seed, a, out), resume=(out / 'checkpoint.pt').exists(), progress=False)
    result = json.loads((out / 'result.json').read_text())
    if (result['steps'], result['data'], result['preset']) != (a['steps'], a['data'], PRESET):
        raise ValueError(f"{out} holds a finished run of {result['steps']} steps of {result['preset']} on {result['data']}: use another --runs folder")
    metrics = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals, trains = [m for m in metrics if m.get('kind') == 'eval'], [m for m in metrics if m.get('kind') == 'train']
    final = evals[-1]   # the dense ELBO at the end: final_n_t draws per test image
    return dict(patch=patch, seed=seed, folder=str(out.resolve().relative_to(ROOT) if ROOT in out.resolve().parents else out), reused=reused, reuse_note=note,
                test_bpd=result['test_bpd'], test_se=result['test_se'], terms={k: final[k] for k in TERMS},
                latent_share=final['latent_bpd'] / final['bpd'], parameters=result['parameters'],
                curve=[(m['step'], m['bpd']) for m in evals],
                train_seconds=sum((m['step'] - prev) / m['steps_per_s'] for prev, m in zip([0] + [m['step'] for m in trains], trains)),
                seconds_this_call=time.perf_counter() - t0)


mean_se = functools.partial(sweep.mean_se, single=None)   # None for one value, so that the JSON holds no bare NaN


def summarise(records, a, data_shape=(1, 8, 8)):
    "One row per patch side, from the finest d down: test bpd, latent share and their standard errors over seeds; the difference to p = 1 paired by seed."
    C, H, W = data_shape
    rows, finest = [], {r['seed']: r['test_bpd'] for r in records if r['patch'] == 1}
    for patch in sorted({r['patch'] for r in records}):
        rs = sorted([r for r in records if r['patch'] == patch], key=lambda r: r['seed'])
        m, se = mean_se([r['test_bpd'] for r in rs])
        share, share_se = mean_se([r['latent_share'] for r in rs])
        row = dict(patch=patch, d=C * (H // patch) * (W // patch), seeds=[r['seed'] for r in rs], test_bpd=m, se_over_seeds=se,
                   per_seed=[r['test_bpd'] for r in rs], per_seed_se_within=[r['test_se'] for r in rs],
                   terms_mean={k: statistics.fmean(r['terms'][k] for r in rs) for k in TERMS}, latent_share=share, latent_share_se=share_se,
                   parameters=rs[0]['parameters'], reused=[r['folder'] for r in rs if r['reused']],
                   reuse_notes=[r['reuse_note'] for r in rs if r['reuse_note']], train_seconds=[r['train_seconds'] for r in rs])
        paired = [r['test_bpd'] - finest[r['seed']] for r in rs if r['seed'] in finest]
        if patch != 1 and paired:
            row['minus_per_pixel'], row['minus_per_pixel_se'] = mean_se(paired)
            row['minus_per_pixel_seeds'] = [r['seed'] for r in rs if r['seed'] in finest]
        rows.append(row)
    settings = {k: a[k] for k in ('data', 'seeds', 'patches', 'steps', 'batch_size', 'eval_every', 'eval_n_t', 'final_n_t', 'n_samples', 'runs', 'reuse')}
    settings.update(preset=PRESET, data_shape=list(data_shape), schedule='polynomial (official random init), conditioned on a Gaussian latent of size 8',
                    d_definition='d = C·(H/p)·(W/p): one γ per p×p patch and channel; trunk width D = 64 at every p, the heads output d values',
                    estimator=f"test bpd: dense NELBO (continuous time, valid bound), {a['final_n_t']} draws of (t, ε, c) per test image, EMA weights; "
                              "mean ± standard error over seeds; latent share: latent term / bpd of the final evaluation")
    return dict(settings=settings, rows=rows, train_hours=sum(r['train_seconds'] for r in records) / 3600)


def markdown(summary):
    s = summary['settings']
    lines = [f"{s['preset']} with γ shared over p×p patches, {s['steps']} steps, batch {s['batch_size']}, seeds {s['seeds']} "
             f"({summary.get('runs_done', '?')} of {summary.get('runs_planned', '?')} runs done); test bpd = dense NELBO "
             f"({s['final_n_t']} draws per test image, EMA weights), mean ± standard error over the seeds done.", '',
             '| p | d | schedule params | total params | test bpd | per seed | − per-pixel (paired) | diffusion | latent | latent share |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in sorted(summary['rows'], key=lambda r: r['d']):
        t = r['terms_mean']
        diff = ('+' if r['minus_per_pixel'] >= 0 else '') + pm(r['minus_per_pixel'], r['minus_per_pixel_se']) if 'minus_per_pixel' in r else ''
        lines.append(f"| {r['patch']} | {r['d']} | {r['parameters']['schedule']:,} | {r['parameters']['total']:,} | {pm(r['test_bpd'], r['se_over_seeds'])} | "
                     f"{', '.join(f'{x:.4f}' for x in r['per_seed'])} | {diff} | {t['diffusion_bpd']:.4f} | {t['latent_bpd']:.5f} | "
                     f"{pm(r['latent_share'], r['latent_share_se'], 3, 100, '%')} |")
    reused = [f for r in summary['rows'] for f in r['reused']]
    if reused: lines += ['', f"p = 1 reused from {', '.join(reused)} (experiments/schedule_init.py, init 'random'): same training settings and model config, checked on the checkpoints."]
    notes = [n for r in summary['rows'] for n in r['reuse_notes']]
    if notes: lines += ['', 'Not reused: ' + ' | '.join(notes)]
    lines += ['', f"Training: {summary['train_hours'] * 60:.1f} min in all (one thread per run, from the logged rates, evaluations included)."]
    return '\n'.join(lines) + '\n'


def figure(summary, path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = sorted(summary['rows'], key=lambda r: r['d'])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar([r['d'] for r in rows], [r['test_bpd'] for r in rows], yerr=[r['se_over_seeds'] or 0 for r in rows],
                marker='o', capsize=3, label='mean ± se over seeds')
    for r in rows: ax.scatter([r['d']] * len(r['per_seed']), r['per_seed'], color='k', s=8, alpha=0.5, zorder=3)
    ax.set_xscale('log', base=2); ax.set_xticks([r['d'] for r in rows], [f"{r['d']}\n(p={r['patch']})" for r in rows])
    s = summary['settings']
    ax.set_xlabel('d, schedules per image'); ax.set_ylabel('test bpd (dense ELBO)')
    ax.set_title(f"{s['preset']}, {s['steps']} steps, seeds {sorted({x for r in rows for x in r['seeds']})}", fontsize=9)
    ax.legend(fontsize=8); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    p = experiment_parser(__doc__, '--patches', PATCHES, type=int, help='patch sides p (must divide 8)')
    p.add_argument('--jobs', type=int, default=1, help='runs in parallel (one thread each)')
    add_folder_arguments(p, 'schedule-dims', reuse_help="folder with schedule_init.py's random-s{seed} runs for p = 1 ('' for none)")
    p.add_argument('--summary-only', action='store_true', help='train nothing; summarise the finished runs')
    a = parse_run_arguments(p, argv)
    if a['data'] != 'digits' or any(q < 1 or 8 % q for q in a['patches']): p.error(f"this experiment is on 8×8 digits with patch sides dividing 8, got --data {a['data']} --patches {a['patches']}")
    import mulan_nb
    print(f"mulan_nb from {mulan_nb.__file__}", flush=True)
    jobs = [(patch, seed, a) for seed in a['seeds'] for patch in a['patches']]   # seed by seed: a cut-short sweep leaves whole seeds
    summary = Summary('schedule_dims.py', argv, a['results'], len(jobs), lambda rs: summarise(rs, a), markdown, figure)
    try:
        with ProcessPoolExecutor(a['jobs']) as pool:
            for r in (map if a['jobs'] == 1 else pool.map)(run_one, jobs):   # one job: in this process
                if r is None: continue
                summary.add(r, f"p {r['patch']} seed {r['seed']}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f}" + (' (reused)' if r['reused'] else '')
                               + f" ({r['seconds_this_call']:.0f} s)")
    except ValueError as e:   # bad data or settings, as the library names them; the runs done so far are kept
        p.exit(2, f"schedule_dims.py: error: {e}\n")
    summary.finish()


if __name__ == '__main__':
    main()
