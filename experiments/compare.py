"""MuLAN against VDM and the paper's ablations at small scale, with equal steps, batch and seeds.

    python experiments/compare.py                         # digits, 8 configurations x 3 seeds, 1000 steps each
    python experiments/compare.py --data my_images.npy --levels 256 --steps 2000 --jobs 2

Every run is `mulan_nb.training.train` with the same TrainConfig apart from the model; runs already finished
(their result.json exists) are skipped and interrupted ones resume from their checkpoint, so the script can be
killed and started again. The summary (JSON and a Markdown table) goes to --results; the notebook
nbs/16_experiments.ipynb reads it and draws the figures.

Test bpd: dense NELBO with 128 stratified draws of (t, ε, c) per test image, EMA weights (the final evaluation
of `train`); the spread reported is the standard error over seeds. Curves: the periodic evaluation of `train`
(`--eval-n-t` draws per test image), ending with the final one. ODE: `ode_bpd` (truncated-normal dequantization importance-weighted over
`--ode-samples`, cut at 3σ_0 or at the bin's edges; Hutchinson divergence with one probe, dopri5 at rtol = atol = 1e-5, float64 state) on the first `--ode-images` test images of each seed,
next to the dense ELBO of the same images, with the solver error estimated on the first `--ode-check-images` of them (solved again at a 10× tighter tolerance).
"""
import argparse, json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import mean_se   # the mean and its standard error over seeds, shared by the experiments

CONFIGS = {   # name: (preset, model overrides); the order is the table's
    'vdm-linear': ('digits-vdm', dict(schedule='linear')),
    'vdm-scalar': ('digits-vdm', {}),
    'mulan': ('digits-mulan', {}),
    'no-latent': ('digits-mulan', dict(latent='none')),
    'not-multivariate': ('digits-mulan', dict(multivariate=False)),
    'not-adaptive (linear)': ('digits-mulan', dict(schedule='linear')),
    'sigmoid': ('digits-mulan', dict(schedule='sigmoid')),
    'monotone-nn': ('digits-mulan', dict(schedule='monotone')),
}
WHAT = {
    'vdm-linear': 'VDM, fixed linear γ, no latent', 'vdm-scalar': 'VDM, learned scalar (linear-in-t) γ, no latent',
    'mulan': 'MuLAN: polynomial, multivariate, conditioned on c', 'no-latent': 'MuLAN without the auxiliary latent',
    'not-multivariate': 'MuLAN with one γ per image (mean over pixels)', 'not-adaptive (linear)': 'fixed linear γ, latent kept in the denoiser',
    'sigmoid': 'MuLAN with the sigmoid family', 'monotone-nn': 'MuLAN with the monotone network family',
}


ODE_FORMAT = 3   # truncated normal cut at min(3 σ_0, half-bin), c drawn from the seeded generator, the solver error estimated; older ODE files are recomputed
ODE_SOLVER = dict(method='dopri5', rtol=1e-5, atol=1e-5)   # the solver the committed tables were made with (ode_bpd's default before issue 18), kept so that they stay reproducible


def run_one(job):
    "Train (or resume, or skip) one (config, seed) run; returns its record."
    name, seed, a = job
    os.environ['OMP_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)
    from mulan_nb.training import TrainConfig, train
    from mulan_nb.model import model_from_checkpoint
    from mulan_nb.likelihood import dense_elbo, ode_bpd
    from mulan_nb.data import load_data
    preset, overrides = CONFIGS[name]
    out = Path(a['runs']) / f"{name.split(' ')[0]}-s{seed}"
    result_path = out / 'result.json'
    t0 = time.perf_counter()
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if (done['steps'], done['data'], done['preset']) != (a['steps'], a['data'], preset):
            raise ValueError(f"{out} holds a finished run of {done['steps']} steps of {done['preset']} on {done['data']}, not "
                             f"{a['steps']} steps of {preset} on {a['data']}: use another --runs folder")
    else:
        cfg = TrainConfig(preset=preset, model=overrides, data=a['data'], K=a['levels'], steps=a['steps'], batch_size=a['batch_size'],
                          seed=seed, out=str(out), eval_every=a['eval_every'], eval_n_t=a['eval_n_t'], ckpt_every=a['eval_every'], n_samples=64)
        train(cfg, resume=(out / 'checkpoint.pt').exists(), progress=False)
    result = json.loads(result_path.read_text())
    metrics = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if l.strip()]
    evals = [m for m in metrics if m.get('kind') == 'eval']
    curve = [(m['step'], m['bpd']) for m in evals]   # the periodic evaluations (eval_n_t draws per image), then the final one
    final = evals[-1]   # the dense ELBO at the end (128 draws per image)
    trains = [m for m in metrics if m.get('kind') == 'train']   # logged every few steps with the rate since the last log
    record = dict(config=name, seed=seed, preset=preset, overrides=overrides, test_bpd=result['test_bpd'], test_se=result['test_se'],
                  terms={k: final[k] for k in ('diffusion_bpd', 'recon_bpd', 'prior_bpd', 'latent_bpd')},
                  curve=curve, parameters=result['parameters']['total'],
                  train_seconds=sum((m['step'] - prev) / m['steps_per_s'] for prev, m in zip([0] + [m['step'] for m in trains], trains)))
    if a['ode_images'] and name in a['ode_configs']:
        ode_path = out / f"ode-truncnormal{a['ode_samples']}-{a['ode_images']}.json"
        if not ode_path.exists() or json.loads(ode_path.read_text()).get('format') != ODE_FORMAT:   # older files: other dequantization or c
            model, _ = model_from_checkpoint(out / 'checkpoint.pt')
            x = load_data(a['data'], 'test', None, a['levels']).images[:a['ode_images']]
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            r = ode_bpd(model, x, 'truncnormal', a['ode_samples'], divergence='hutchinson', **ODE_SOLVER, check_images=min(a['ode_check_images'], len(x)),
                        generator=torch.Generator().manual_seed(seed))
            ode_seconds = time.perf_counter() - t1
            torch.manual_seed(seed)
            e = dense_elbo(model, x, n_t=128)
            ode_path.write_text(json.dumps(dict(format=ODE_FORMAT, ode=r.bpd.tolist(), elbo=e.bpd.tolist(), nfe=r.nfe, seconds=ode_seconds, note=r.note,
                                              solver_error=r.checked.tolist(), check_nfe=r.check_nfe)))
        record['ode'] = json.loads(ode_path.read_text())
    record['seconds_this_call'] = time.perf_counter() - t0   # training (unless done before) and ODE (unless done before)
    return record


def save_gamma_maps(checkpoint, a, path, n_images=4, n_t=101):
    "The learned γ(c, t) of every pixel for a few test images (one draw c ~ q(c|x), seed 0), for the notebook."
    import numpy as np, torch
    from mulan_nb.model import model_from_checkpoint
    from mulan_nb.data import load_data
    model, state = model_from_checkpoint(checkpoint)
    x = load_data(a['data'], 'test', None, a['levels']).images[:n_images]
    torch.manual_seed(0)
    with torch.no_grad():
        c, _ = model.eval().encode(x)
        t = torch.linspace(0, 1, n_t)
        gammas = [model.gamma(t, None if c is None else c[i:i + 1].expand(n_t, -1))[0].expand(n_t, *model.config.data_shape) for i in range(n_images)]
    np.savez_compressed(path, images=x.numpy(), t=t.numpy(), gamma=torch.stack(gammas).numpy(), K=model.config.K, step=state['step'],
                        gamma_min=model.config.gamma_min, gamma_max=model.config.gamma_max)


def steps_to_reach(curve, target):
    "First step at which a curve [(step, bpd)] reaches `target` (linear between evaluations); None if never."
    for (s0, b0), (s1, b1) in zip(curve, curve[1:]):
        if b1 <= target: return s0 + (s1 - s0) * ((b0 - target) / (b0 - b1) if b0 > target else 0.)
    return None


def summarise(records, a):
    rows, table = {}, []
    for name in CONFIGS:
        rs = [r for r in records if r['config'] == name]
        if not rs: continue
        m, se = mean_se([r['test_bpd'] for r in rs])
        steps = sorted({s for r in rs for s, _ in r['curve']})
        curve = [(s, sum(dict(r['curve'])[s] for r in rs) / len(rs)) for s in steps if all(s in dict(r['curve']) for r in rs)]
        row = dict(config=name, what=WHAT[name], seeds=[r['seed'] for r in rs], test_bpd=m, se_over_seeds=se,
                   per_seed=[r['test_bpd'] for r in rs], mean_curve=curve, parameters=rs[0]['parameters'])
        odes = [r['ode'] for r in rs if 'ode' in r]
        if odes:
            row['ode_per_seed'] = [sum(o['ode']) / len(o['ode']) for o in odes]
            row['elbo_same_images_per_seed'] = [sum(o['elbo']) / len(o['elbo']) for o in odes]
            row['ode_bpd'], row['ode_se'] = mean_se(row['ode_per_seed'])
            row['elbo_same_images'], _ = mean_se(row['elbo_same_images_per_seed'])
            row['ode_minus_elbo'], row['ode_minus_elbo_se'] = mean_se([o - e for o, e in zip(row['ode_per_seed'], row['elbo_same_images_per_seed'])])
            row['ode_nfe_mean'] = sum(n for o in odes for n in o['nfe']) / sum(len(o['nfe']) for o in odes)
            row['ode_seconds_per_image'] = sum(o['seconds'] for o in odes) / sum(len(o['ode']) for o in odes)
            checked = [abs(e) for o in odes for e in o['solver_error']]   # |bpd − the same images solved at rtol/10, atol/10|
            row['ode_solver_error'] = sum(checked) / len(checked) if checked else None
            row['ode_solver_error_max'] = max(checked) if checked else None
        rows[name] = row
    ratio = None
    if 'mulan' in rows and 'vdm-scalar' in rows:
        target = rows['vdm-scalar']['test_bpd']   # the final dense ELBO, mean over seeds: the last point of VDM's mean curve
        reach = steps_to_reach(rows['mulan']['mean_curve'], target)
        ratio = dict(vdm_final_bpd=target, vdm_steps=a['steps'], mulan_steps_to_reach=reach,
                     ratio=None if reach is None else reach / a['steps'])
    compute = dict(train_hours=sum(r['train_seconds'] for r in records) / 3600,   # from the logged rates: periodic evaluations and checkpoints included
                   ode_hours=sum(r['ode']['seconds'] for r in records if 'ode' in r) / 3600)
    return dict(settings=a, rows=list(rows.values()), steps_ratio=ratio, compute=compute)


def markdown(summary):
    a = summary['settings']
    lines = [f"Data {a['data']}, {a['steps']} steps, batch {a['batch_size']}, seeds {a['seeds']} ({summary['runs_done']} of {summary['runs_planned']} runs done); test bpd = dense NELBO, 128 draws per test image, EMA weights, mean ± standard error over the seeds done.", '',
             '| configuration | what | test bpd (ELBO) | per seed | ODE bpd (first %d test images, truncated normal ×%d) | ELBO, same images | ODE − ELBO | ODE solver error, mean / max (est.) | NFE | params |' % (a['ode_images'], a['ode_samples']),
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in summary['rows']:
        ode = f"{r['ode_bpd']:.3f} ± {r['ode_se']:.3f}" if 'ode_bpd' in r else ''
        same = f"{r['elbo_same_images']:.3f}" if 'ode_bpd' in r else ''
        diff = f"{r['ode_minus_elbo']:+.3f} ± {r['ode_minus_elbo_se']:.3f}" if 'ode_bpd' in r else ''
        nfe = f"{r['ode_nfe_mean']:.0f}" if 'ode_bpd' in r else ''
        err = f"{r['ode_solver_error']:.1e} / {r['ode_solver_error_max']:.1e}" if r.get('ode_solver_error') is not None else ''
        lines.append(f"| {r['config']} | {r['what']} | {r['test_bpd']:.3f} ± {r['se_over_seeds']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | {ode} | {same} | {diff} | {err} | {nfe} | {r['parameters'] / 1e6:.2f}M |")
    s = summary['steps_ratio']
    if s: lines += ['', f"Steps MuLAN's mean curve needs to reach VDM's final test bpd ({s['vdm_final_bpd']:.3f}, dense ELBO at {s['vdm_steps']} steps, mean over seeds): "
                    + (f"{s['mulan_steps_to_reach']:.0f} (ratio {s['ratio']:.2f})" if s['ratio'] is not None else 'not reached')]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default='digits'); p.add_argument('--levels', type=int, default=None)
    p.add_argument('--configs', nargs='*', default=list(CONFIGS), help=f"subset of {list(CONFIGS)}")
    p.add_argument('--seeds', type=int, nargs='*', default=[0, 1, 2])
    p.add_argument('--steps', type=int, default=1000); p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--eval-every', type=int, default=100); p.add_argument('--eval-n-t', type=int, default=8)
    p.add_argument('--ode-images', type=int, default=30, help='test images per seed for the ODE (0: none)')
    p.add_argument('--ode-samples', type=int, default=2, help='truncated-normal dequantization samples per image (importance weighted)')
    p.add_argument('--ode-check-images', type=int, default=4, help='of those, the first N solved again at rtol/10, atol/10: the solver-error estimate (0: none)')
    p.add_argument('--ode-configs', nargs='*', default=list(CONFIGS), help='configurations whose runs also get the ODE bpd')
    p.add_argument('--jobs', type=int, default=1, help='runs in parallel (one thread each)')
    p.add_argument('--runs', default='experiments/runs', help='folder of the runs (checkpoints, metrics)')
    p.add_argument('--results', default='experiments/results', help='folder of the summary (JSON, Markdown)')
    a = vars(p.parse_args(argv))
    unknown = set(a['configs']) - set(CONFIGS)
    if unknown: p.error(f"unknown configs {sorted(unknown)}: choose from {list(CONFIGS)}")
    if a['ode_images'] < 0 or a['ode_samples'] < 1: p.error(f"--ode-images must be >= 0 and --ode-samples >= 1, got {a['ode_images']} and {a['ode_samples']}")
    t0 = time.perf_counter()
    jobs = [(name, seed, a) for seed in a['seeds'] for name in a['configs']]
    out = Path(a['results']); out.mkdir(parents=True, exist_ok=True)
    name = Path(a['data']).stem
    def finished(r):   # after every finished run, so that a killed sweep still leaves its summary so far
        records.append(r)
        print(f"{r['config']:24s} seed {r['seed']}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f} ({r['seconds_this_call']:.0f} s)", flush=True)
        write(records)
        if r['config'] == 'mulan' and r['seed'] == a['seeds'][0]:
            save_gamma_maps(Path(a['runs']) / f"mulan-s{r['seed']}" / 'checkpoint.pt', a, out / f'{name}-gamma-maps.npz')
    def write(records):
        summary = summarise(records, a)
        summary.update(wall_seconds=time.perf_counter() - t0, runs_done=len(records), runs_planned=len(jobs))
        (out / f'{name}.json').write_text(json.dumps(summary, indent=1))
        (out / f'{name}.md').write_text(markdown(summary))
        return summary
    records = []
    try:
        with ProcessPoolExecutor(a['jobs']) as pool:
            for r in pool.map(run_one, jobs): finished(r)
    except ValueError as e:   # bad data or settings, as the library names them; the runs done so far are kept
        p.exit(2, f"compare.py: error: {e}\n")
    summary = write(records)
    print(markdown(summary)); print(f"{len(records)} runs in {summary['wall_seconds']:.0f} s; {out / name}.json")


if __name__ == '__main__':
    main()
