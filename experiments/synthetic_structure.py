"""Does a learned schedule follow per-image structure that is known? MuLAN, VDM and the non-adaptive multivariate
schedule on synthetic squares (issue 17, point 1).

    OMP_NUM_THREADS=1 nohup python experiments/synthetic_structure.py > synthetic.log 2>&1 &   # 3 configurations x seeds 0, 1, 2
    python experiments/synthetic_structure.py --summary-only                                     # rewrite the summary from the finished runs

The data: `mulan_nb.data.region_images`, 8×8 one-channel images with K = 17 levels, flat at level 0 except one 4×4
square at a uniformly random position whose pixels are iid uniform over levels 1..16; 1500 training and 300 test
images from one seed (--data-seed), written once to --runs/squares.npz (arrays train, test and their masks) and read
by `TrainConfig(data=that file, K=17)`. Their entropy, 1.0725 bits per pixel, is the floor of every test bpd.

The models: the digits presets unchanged, 'vdm' (digits-vdm: learned scalar γ, no latent), 'mulan' (digits-mulan:
polynomial, multivariate, conditioned on a Gaussian latent c) and 'not-adaptive' (digits-mulan with
conditioned=False: the same multivariate polynomial schedule, one per pixel but the same for every image; the latent
stays in the denoiser). Equal steps, batch 64, evaluation every --eval-every steps with --eval-n-t draws per test
image, final dense ELBO with 128 draws, EMA weights; test bpd mean ± standard error over seeds.

Structure: for every test image, γ(c, t = 0.5) of each pixel (EMA weights, one c ~ q(c|x) from a generator seeded
with 1234) relative to the image's mean γ; its AUC against the image's mask (the probability that a content pixel's
relative γ exceeds a background pixel's, ties within 1e-5 counted half; 0.5: no relation; above 0.5: content pixels
noisier at equal t), averaged over the test images. 'auc_adaptive' first removes each pixel's mean over the test
images, so that only what changes from image to image is left (a schedule that is the same for every image scores 0.5
exactly). The same numbers for the initial model (rebuilt from the run's seed), to tell what training changed.
Reference: the AUC of the fixed map of how often each pixel is content (from the training masks).

Runs go to --runs/{config}-s{seed}; finished runs (result.json) are skipped, killed ones resume from checkpoint.pt.
The summary goes to --results/synthetic-structure.{json,md,png} and the γ maps of the first seed to
--results/synthetic-structure-gamma.npz; nbs/16_experiments.ipynb reads them.
"""
import statistics, sys, time
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'experiments'))
from sweep import TERMS, mean_se, train_run, run_record, experiment_parser, add_folder_arguments, parse_run_arguments, Summary

CONFIGS = {   # name: (preset, model overrides, what); the order is the table's
    'vdm': ('digits-vdm', {}, 'VDM: learned scalar γ, no latent'),
    'mulan': ('digits-mulan', {}, 'MuLAN: polynomial, multivariate, conditioned on c'),
    'not-adaptive': ('digits-mulan', dict(conditioned=False), 'multivariate polynomial γ, the same for every image (latent kept in the denoiser)'),
}
SIZE, REGION, K = 8, 4, 17
T_STRUCTURE, C_SEED, TIE = 0.5, 1234, 1e-5
N_SHOW, N_T_SHOW = 6, 21   # test images and times of the stored γ maps


def write_data(path:Path, n_train:int, n_test:int, seed:int):
    "The squares as an .npz (train, test, train_masks, test_masks), written once; an existing file must hold exactly these."
    from mulan_nb.data import region_images
    images, masks = region_images(n_train + n_test, SIZE, REGION, K, seed=seed)
    arrays = dict(train=images[:n_train], test=images[n_train:], train_masks=masks[:n_train], test_masks=masks[n_train:])
    if path.exists():
        old = np.load(path)
        if set(old.files) != set(arrays) or any(not np.array_equal(old[k], v) for k, v in arrays.items()):
            raise ValueError(f"{path} holds other images than region_images({n_train + n_test}, seed={seed}): use another --runs folder")
        return arrays
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp.npz')
    np.savez_compressed(tmp, **arrays); tmp.replace(path)
    return arrays


def auc(scores:np.ndarray, positive:np.ndarray, tie:float=TIE) -> float:
    "P(score of a positive > score of a negative) + ½ P(|difference| <= tie): the Mann–Whitney AUC of one image's pixels."
    d = scores[positive][:, None] - scores[~positive][None, :]
    return float(((d > tie) + 0.5 * (np.abs(d) <= tie)).mean())


def gammas(model, x, t):
    "γ(c, t) of every pixel, float64 array (n_images, len(t), D), one c ~ q(c|x) per image from a generator seeded with C_SEED (eval mode)."
    import torch
    from mulan_nb.likelihood import evaluating
    with evaluating(model):
        c, _ = model.encode(x, torch.Generator().manual_seed(C_SEED))
        n = len(x)
        rows = [model.gamma(torch.full((n,), float(s)), c)[0].expand(n, *model.config.data_shape).reshape(n, -1) for s in t]
    return torch.stack(rows, 1).double().numpy()


def structure(g:np.ndarray, masks:np.ndarray) -> dict:
    "How γ at one time (n_images, D) relates to the masks (n_images, D): AUCs, mean content − background γ, spreads."
    rel = g - g.mean(1, keepdims=True)
    adaptive = g - g.mean(0, keepdims=True)
    adaptive = adaptive - adaptive.mean(1, keepdims=True)
    return dict(auc=statistics.fmean(auc(r, m) for r, m in zip(rel, masks)),
                auc_adaptive=statistics.fmean(auc(r, m) for r, m in zip(adaptive, masks)),
                content_minus_background=statistics.fmean(r[m].mean() - r[~m].mean() for r, m in zip(rel, masks)),
                spread_over_pixels=float(g.std(1).mean()), spread_over_images=float(g.std(0).mean()))


def initial_model(config, seed:int):
    "The model as `train` builds it before step 1: the same config under the same seed (global RNG left as it was)."
    import torch
    from mulan_nb.model import MuLAN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MuLAN(config)


def run_one(name, seed, a, data):
    "Train (or resume, or skip) one run and measure its schedule's structure; returns its record (None if not finished and --summary-only)."
    import torch
    from mulan_nb.training import TrainConfig
    from mulan_nb.model import model_from_checkpoint
    preset, overrides, _ = CONFIGS[name]
    out = Path(a['runs']) / f'{name}-s{seed}'
    t0 = time.perf_counter()
    cfg = TrainConfig(preset=preset, model=overrides, data=a['data_file'], K=K, steps=a['steps'], batch_size=a['batch_size'], seed=seed,
                      out=str(out), eval_every=a['eval_every'], eval_n_t=a['eval_n_t'], final_n_t=a['final_n_t'], ckpt_every=a['eval_every'],
                      n_samples=a['n_samples'])
    if train_run(cfg, summary_only=a['summary_only']) is None: return None
    model, _ = model_from_checkpoint(out / 'checkpoint.pt')
    x, masks = torch.from_numpy(data['test'].astype(np.int64)), data['test_masks'].reshape(len(data['test']), -1)
    t = np.linspace(0, 1, N_T_SHOW)
    g = gammas(model, x, [T_STRUCTURE, *t])
    curves = {k: [statistics.fmean(gi[j][m == (k == 'content')].mean() for gi, m in zip(g[:, 1:], masks)) for j in range(len(t))]
              for k in ('content', 'background')}   # mean γ over each image's content (background) pixels, then over images
    at_init = structure(gammas(initial_model(model.config, seed), x, [T_STRUCTURE])[:, 0], masks)
    return dict(config=name, seed=seed, preset=preset, overrides=overrides, **run_record(out), structure=structure(g[:, 0], masks), structure_init=at_init,
                gamma_curves=dict(t=t.tolist(), **curves), gamma_show=g[:N_SHOW, 1:], seconds_this_call=time.perf_counter() - t0)


def summarise(records, a, data):
    from mulan_nb.data import region_images_bpd
    floor = region_images_bpd(SIZE, REGION, K)
    prevalence = data['train_masks'].reshape(len(data['train_masks']), -1).mean(0)
    masks = data['test_masks'].reshape(len(data['test_masks']), -1)
    reference_auc = statistics.fmean(auc(prevalence - prevalence.mean(), m) for m in masks)
    rows = {}
    for name, (preset, overrides, what) in CONFIGS.items():
        rs = sorted([r for r in records if r['config'] == name], key=lambda r: r['seed'])
        if not rs: continue
        m, se = mean_se([r['test_bpd'] for r in rs])
        steps = sorted(set.intersection(*[{s for s, _ in r['curve']} for r in rs]))
        row = dict(config=name, what=what, preset=preset, overrides=overrides, seeds=[r['seed'] for r in rs], per_seed=[r['test_bpd'] for r in rs],
                   per_seed_se_within=[r['test_se'] for r in rs], test_bpd=m, se_over_seeds=se, above_floor=m - floor,
                   terms_mean={k: statistics.fmean(r['terms'][k] for r in rs) for k in TERMS},
                   latent_share=statistics.fmean(r['terms']['latent_bpd'] / r['test_bpd'] for r in rs),
                   mean_curve=[[s, statistics.fmean(dict(r['curve'])[s] for r in rs)] for s in steps],
                   per_seed_curves={str(r['seed']): r['curve'] for r in rs}, parameters=rs[0]['parameters'],
                   train_seconds=[r['train_seconds'] for r in rs],
                   gamma_curves={str(r['seed']): r['gamma_curves'] for r in rs})
        for q in rs[0]['structure']:
            row[q] = dict(zip(('mean', 'se'), mean_se([r['structure'][q] for r in rs])), per_seed=[r['structure'][q] for r in rs])
            row[f'{q}_init'] = dict(zip(('mean', 'se'), mean_se([r['structure_init'][q] for r in rs])), per_seed=[r['structure_init'][q] for r in rs])
        rows[name] = row
    paired = {}
    for x, y in (('mulan', 'vdm'), ('mulan', 'not-adaptive'), ('not-adaptive', 'vdm')):
        if x in rows and y in rows:
            common = sorted(set(rows[x]['seeds']) & set(rows[y]['seeds']))
            d = [dict(zip(rows[x]['seeds'], rows[x]['per_seed']))[s] - dict(zip(rows[y]['seeds'], rows[y]['per_seed']))[s] for s in common]
            if d: paired[f'{x} − {y}'] = dict(zip(('mean', 'se'), mean_se(d)), seeds=common, per_seed=d)
    settings = {k: a[k] for k in ('seeds', 'steps', 'batch_size', 'eval_every', 'eval_n_t', 'final_n_t', 'n_train', 'n_test', 'data_seed')}
    settings.update(data=Path(a['data_file']).name, size=SIZE, region=REGION, K=K, structure_t=T_STRUCTURE, c_seed=C_SEED, tie=TIE,
                    estimator='test bpd: dense NELBO (final_n_t draws of (t, ε, c) per test image), EMA weights; mean ± standard error over seeds',
                    auc_definition="per test image, the AUC of γ(c, t) − its mean over the image's pixels against the image's mask "
                                   "(P(content pixel > background pixel), ties within `tie` counted half), averaged over the test images; "
                                   "auc_adaptive: the same after removing each pixel's mean over the test images")
    return dict(settings=settings, floor_bpd=floor, reference_auc_prevalence=reference_auc, rows=list(rows.values()), paired=paired,
                train_hours=sum(r['train_seconds'] for r in records) / 3600)


def markdown(summary):
    s = summary['settings']
    lines = [f"Synthetic squares ({s['size']}×{s['size']}, a {s['region']}×{s['region']} square of iid uniform levels 1..{s['K'] - 1} on level 0; "
             f"{s['n_train']} train, {s['n_test']} test images, data seed {s['data_seed']}), {s['steps']} steps, batch {s['batch_size']}, seeds {s['seeds']} "
             f"({summary['runs_done']} of {summary['runs_planned']} runs done); test bpd = dense NELBO, {s['final_n_t']} draws per test image, EMA weights, "
             f"mean ± standard error over seeds. Floor (the data's entropy): {summary['floor_bpd']:.4f} bpd.", '',
             '| configuration | what | test bpd | per seed | above floor | diffusion | latent | latent share | recon | prior | params |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in summary['rows']:
        t = r['terms_mean']
        lines.append(f"| {r['config']} | {r['what']} | {r['test_bpd']:.4f} ± {r['se_over_seeds']:.4f} | {', '.join(f'{v:.4f}' for v in r['per_seed'])} | "
                     f"{r['above_floor']:+.4f} | {t['diffusion_bpd']:.4f} | {t['latent_bpd']:.4f} | {100 * r['latent_share']:.2f}% | {t['recon_bpd']:.4f} | "
                     f"{t['prior_bpd']:.4f} | {r['parameters'] / 1e6:.2f}M |")
    if summary['paired']:
        lines += ['', 'Paired by seed (test bpd): ' + '; '.join(f"{k}: {v['mean']:+.4f} ± {v['se']:.4f} (seeds {v['seeds']})" for k, v in summary['paired'].items())]
    lines += ['', f"Structure of γ at t = {s['structure_t']} (EMA, test images, one c ~ q(c|x) each), mean ± standard error over seeds. "
              f"AUC: relative γ of content against background pixels, 0.5 = no relation, > 0.5 = content noisier. "
              f"Reference: a fixed map of how often each pixel is content scores {summary['reference_auc_prevalence']:.4f}.", '',
              '| configuration | model | AUC | AUC, image-to-image part | content − background γ | spread over pixels | spread over images |', '|---|---|---|---|---|---|---|']
    f = lambda q: f"{q['mean']:.4f} ± {q['se']:.4f}"
    for r in summary['rows']:
        for when, x in (('trained', ''), ('step 0', '_init')):
            lines.append(f"| {r['config']} | {when} | {f(r['auc' + x])} | {f(r['auc_adaptive' + x])} | {f(r['content_minus_background' + x])} | "
                         f"{f(r['spread_over_pixels' + x])} | {f(r['spread_over_images' + x])} |")
    lines += ['', f"Training: {summary['train_hours'] * 60:.1f} min in all (one thread per run); this call {summary['wall_seconds_this_call'] / 60:.1f} min."]
    return '\n'.join(lines) + '\n'


def figure(summary, shows, data, path):
    "γ maps at t = 0.5 (relative to each image's mean) next to the images and masks; mean γ(t) on content and background pixels."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [n for n in ('mulan', 'not-adaptive', 'vdm') if n in shows]
    mid = N_T_SHOW // 2
    fig, axs = plt.subplots(2 + len(names), N_SHOW + 1, figsize=(1.6 * (N_SHOW + 1) + 2, 1.6 * (2 + len(names))), squeeze=False,
                            gridspec_kw=dict(width_ratios=[1] * N_SHOW + [2.2]), layout='constrained')
    lim = max([np.abs(shows[n][:, mid] - shows[n][:, mid].mean(1, keepdims=True)).max() for n in names] + [1e-3])
    for i in range(N_SHOW):
        axs[0, i].imshow(data['test'][i, 0], cmap='gray', vmin=0, vmax=K - 1); axs[1, i].imshow(data['test_masks'][i, 0], cmap='Reds', vmin=0, vmax=1)
        for k, n in enumerate(names):
            g = shows[n][i, mid]
            im = axs[2 + k, i].imshow((g - g.mean()).reshape(SIZE, SIZE), cmap='coolwarm', vmin=-lim, vmax=lim)
        for ax in axs[:, i]: ax.set_xticks([]); ax.set_yticks([])
    axs[0, 0].set_ylabel('image'); axs[1, 0].set_ylabel('mask')
    for k, n in enumerate(names): axs[2 + k, 0].set_ylabel(f'{n}\nγ(0.5) − mean', fontsize=8)
    if names: fig.colorbar(im, ax=axs[2:, N_SHOW - 1], fraction=0.05)
    for ax in axs[:, N_SHOW]: ax.axis('off')
    ax = axs[2, N_SHOW]; ax.axis('on')
    for k, r in enumerate(summary['rows']):
        c = next(iter(r['gamma_curves'].values()))
        t = np.array(c['t'])
        ax.plot(t, np.array(c['content']) - np.array(c['background']), color=f'C{k}', label=r['config'])
    ax.axhline(0, color='k', lw=0.7); ax.set_xlabel('t', fontsize=8); ax.set_title('content − background γ\n(first seed, test mean)', fontsize=8)
    ax.tick_params(labelsize=7); ax.legend(fontsize=6)
    fig.savefig(path, dpi=100); plt.close(fig)


def main(argv=None):
    p = experiment_parser(__doc__, '--configs', CONFIGS, steps=500, data=False)
    p.add_argument('--n-train', type=int, default=1500); p.add_argument('--n-test', type=int, default=300)
    p.add_argument('--data-seed', type=int, default=0)
    add_folder_arguments(p, 'synthetic-structure')
    p.add_argument('--summary-only', action='store_true', help='train nothing; summarise the finished runs')
    a = parse_run_arguments(p, argv, configs=list(CONFIGS))
    a['data_file'] = str(Path(a['runs']) / 'squares.npz')
    import mulan_nb
    print(f"mulan_nb from {mulan_nb.__file__}", flush=True)
    shows = {}
    def pictures(summary, path):   # the γ maps of the first seed, then the figure (`data` is the one written just below)
        np.savez_compressed(path.parent / 'synthetic-structure-gamma.npz', images=data['test'][:N_SHOW], masks=data['test_masks'][:N_SHOW],
                            t=np.linspace(0, 1, N_T_SHOW), **{f'gamma_{n}': g for n, g in shows.items()})
        figure(summary, shows, data, path)
    summary = Summary('synthetic_structure.py', argv, a['results'], len(a['configs']) * len(a['seeds']), lambda rs: summarise(rs, a, data), markdown, pictures)
    try: data = write_data(Path(a['data_file']), a['n_train'], a['n_test'], a['data_seed'])
    except ValueError as e: p.exit(2, f"synthetic_structure.py: error: {e}\n")
    for seed in a['seeds']:
        for name in a['configs']:
            try: r = run_one(name, seed, a, data)
            except ValueError as e: p.exit(2, f"synthetic_structure.py: error: {e}\n")
            if r is None: continue
            g = r.pop('gamma_show')
            if seed == a['seeds'][0]: shows[name] = g.reshape(len(g), N_T_SHOW, -1)
            s = r['structure']
            summary.add(r, f"{name:13s} seed {seed}: test bpd {r['test_bpd']:.4f} ± {r['test_se']:.4f}; AUC {s['auc']:.3f} (image-to-image {s['auc_adaptive']:.3f}) "
                           f"({r['seconds_this_call']:.0f} s)")
    summary.finish()


if __name__ == '__main__':
    main()
