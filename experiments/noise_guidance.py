"""Noise-awareness guidance on a trained checkpoint: Fréchet distance and noise shift for a sweep of guidance weights w and step counts T.

For each T and w the script draws `--n-samples` ancestral samples from the same seed (the same c, z_1 and step noise for every
w: paired comparisons), measures the shift t̂(z_t) − t of every state with a noise-level regressor trained on the checkpoint's
forward process (cached in the output folder), subtracts the regressor's own bias measured on forward-noised test images at
the same times (the "excess" shift), and scores the samples with the package's Fréchet distance (digits classifier features).

    python experiments/noise_guidance.py --checkpoint /tmp/run_nag/checkpoint.pt --out /tmp/nag_helper/run

Writes `noise_guidance.json`, `shift_density.png` (w = 0 against the best w, per T), `shift_curves.png` (mean excess shift
against t for every w) and `samples-T{T}-w{w}.png`, and prints a markdown table. w = 0 runs unguided (one network pass per
step; identical to guidance=0, see nbs/15_noise_guidance.ipynb).
"""
import argparse, json, math, sys, time
from pathlib import Path
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', required=True, help='checkpoint.pt of a model trained with noise_dropout > 0 (EMA weights are used)')
    p.add_argument('--n-samples', type=int, default=500, help='samples per (w, T)')
    p.add_argument('--steps', type=int, nargs='+', default=[20, 100], help='ancestral step counts T')
    p.add_argument('--weights', type=float, nargs='+', default=[0, 0.5, 1, 2, 3], help='guidance weights w')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--seed', type=int, default=0, help='sampling seed (the same for every w and T)')
    p.add_argument('--regressor-steps', type=int, default=3000, help='training steps of the noise-level regressor')
    p.add_argument('--regressor-channels', type=int, default=32)
    p.add_argument('--no-frechet', action='store_true', help='skip the Fréchet distance')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    a = p.parse_args(argv)
    if a.n_samples < 2: p.error(f'--n-samples must be >= 2, got {a.n_samples}')
    if min(a.steps) < 1: p.error(f'--steps must be >= 1, got {a.steps}')
    if not all(math.isfinite(w) for w in a.weights): p.error(f'--weights must be finite, got {a.weights}')
    if a.regressor_steps < 1: p.error(f'--regressor-steps must be >= 1, got {a.regressor_steps}')
    return a


def load_or_train_regressor(model, state, train_images, a, out, log):
    "The regressor cached in `out/regressor.pt` if it was trained for this checkpoint with these settings, else a fresh one."
    from mulan_nb.guidance import NoiseLevelRegressor, train_regressor
    meta = dict(checkpoint=str(Path(a.checkpoint).resolve()), checkpoint_step=int(state['step']), steps=a.regressor_steps,
                channels=a.regressor_channels, n_layers=3, seed=0)
    path = out / 'regressor.pt'
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached['meta'] == meta:
            reg = NoiseLevelRegressor(model.config.data_shape, meta['channels'], meta['n_layers'], model.config.fourier)
            reg.load_state_dict(cached['state']); log(f'regressor: cached {path}')
            return reg.eval(), 0.
    start = time.perf_counter()
    reg = train_regressor(model, train_images, steps=a.regressor_steps, channels=a.regressor_channels, n_layers=3, seed=0,
                          log=lambda s, l: log(f'  regressor step {s}: loss {l:.5f}') if s % 500 == 0 or s == a.regressor_steps - 1 else None)
    seconds = time.perf_counter() - start
    torch.save(dict(meta=meta, state=reg.state_dict()), path)
    log(f'regressor: trained {a.regressor_steps} steps in {seconds:.0f} s -> {path}')
    return reg, seconds


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from mulan_nb.model import model_from_checkpoint
    from mulan_nb.data import plot_samples
    from mulan_nb.data import load_data
    from mulan_nb.guidance import (sample_trajectory, predict_times, regressor_error, forward_shift, shift_summary,
                                   plot_shift_density)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)
    t_start = time.perf_counter()
    try: model, state = model_from_checkpoint(a.checkpoint)
    except ValueError as e: print(f'noise_guidance: error: {e}', file=sys.stderr); return 2
    model.eval()
    if model.denoiser.null_noise is None and any(w != 0 for w in a.weights):
        print(f"noise_guidance: error: {a.checkpoint} was trained without noise-condition dropout (noise_dropout = 0), so it has no "
              "null embedding and cannot be guided; train with --set noise_dropout=0.1, or pass --weights 0", file=sys.stderr)
        return 2
    cfg = model.config
    data_name = state['train'].get('data', 'digits') if isinstance(state.get('train'), dict) else 'digits'
    train, test = load_data(data_name, 'train'), load_data(data_name, 'test')
    log(f'checkpoint {a.checkpoint}: step {state["step"]}, noise_dropout {cfg.noise_dropout}, prediction {cfg.prediction}, data {data_name}')

    reg, reg_seconds = load_or_train_regressor(model, state, train.images, a, out, log)
    err = regressor_error(reg, model, test.images, n_bins=10, repeats=8)
    log(f"regressor held-out error (forward-noised test images, t ~ U(0, 1), {sum(err['count'])} states): RMSE {err['rmse_all']:.4f}")
    log('| t bin | ' + ' | '.join(f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(err['bin_edges'][:-1], err['bin_edges'][1:])) + ' |')
    log('|---|' + '---|' * len(err['bias']))
    log('| bias | ' + ' | '.join(f'{b:+.3f}' for b in err['bias']) + ' |')
    log('| RMSE | ' + ' | '.join(f'{r:.3f}' for r in err['rmse']) + ' |')

    fe = None
    if not a.no_frechet:
        from mulan_nb.frechet import FrechetEvaluator
        fe = FrechetEvaluator(data_name)
        g = torch.Generator().manual_seed(1)
        floors = [fe(train.images[torch.randperm(len(train.images), generator=g)[:a.n_samples]]) for _ in range(5)]
        floor = dict(mean=sum(floors) / 5, sd=torch.tensor(floors).std().item(), n=min(a.n_samples, len(train.images)))
        log(f"Fréchet floor: {floor['n']} training images vs the test split: {floor['mean']:.2f} ± {floor['sd']:.2f} (sd over 5 subsets)")
    else: floor = None

    results, shifts, refs = [], {}, {}
    for T in a.steps:
        ts = torch.linspace(0, 1, T + 1).flip(0)
        ref = forward_shift(reg, model, test.images, ts, seed=T)
        refs[T] = ref
        for w in a.weights:
            start = time.perf_counter()
            x, states, ts_run = sample_trajectory(model, a.n_samples, T=T, generator=torch.Generator().manual_seed(a.seed),
                                                  guidance=None if w == 0 else w)
            seconds = time.perf_counter() - start
            shift = predict_times(reg, states) - ts_run[:, None]
            shifts[T, w] = (ts_run, shift)
            s = shift_summary(shift, ts_run, ref)
            fd = fe(x) if fe is not None else float('nan')
            row = dict(T=T, w=w, frechet=fd, sample_seconds=seconds, **s)
            results.append(row)
            if w == 0 or w == max(a.weights): plot_samples(x[:64], cfg.K, out / f'samples-T{T}-w{w:g}.png', f'T = {T}, w = {w:g}, seed {a.seed}')
            log(f"T={T:4d} w={w:4g}: FD {fd:7.2f}  shift {s['mean']:+.4f} ± {s['se']:.4f}  excess {s['excess']:+.4f} ± {s['excess_se']:.4f}  RMS {s['excess_rms']:.4f}  ({seconds:.0f} s)")
            del states

    best = {T: min((r for r in results if r['T'] == T), key=lambda r: r['frechet'] if fe is not None else abs(r['excess']))['w'] for T in a.steps}
    panels, ref_panels = {}, {}
    for T in a.steps:
        for w in dict.fromkeys([0. if 0 in a.weights else a.weights[0], best[T]]):
            title = f'T = {T}, w = {w:g}' + (' (best FD)' if w == best[T] and fe is not None else '')
            panels[title], ref_panels[title] = shifts[T, w], (shifts[T, w][0], refs[T])
    plot_shift_density(panels, ref_panels, out / 'shift_density.png', n_rows=len(a.steps), ylim=(-0.4, 0.4))
    plot_curves(results, shifts, refs, a, out / 'shift_curves.png')

    lines = [f"| w | " + ' | '.join(f'T={T} FD | T={T} shift t̂−t | T={T} excess shift | T={T} RMS excess per t bin' for T in a.steps) + ' |',
             '|---|' + '---|---|---|---|' * len(a.steps)]
    for w in a.weights:
        cells = []
        for T in a.steps:
            r = next(r for r in results if r['T'] == T and r['w'] == w)
            cells += [f"{r['frechet']:.2f}", f"{r['mean']:+.4f} ± {r['se']:.4f}", f"{r['excess']:+.4f} ± {r['excess_se']:.4f}", f"{r['excess_rms']:.4f}"]
        lines.append(f'| {w:g} | ' + ' | '.join(cells) + ' |')
    table = '\n'.join(lines)
    total = time.perf_counter() - t_start
    print('\n' + table)
    if floor: print(f"\nFréchet floor ({floor['n']} training images vs test): {floor['mean']:.2f} ± {floor['sd']:.2f}")
    print(f"regressor held-out RMSE {err['rmse_all']:.4f}; total {total:.0f} s")
    json.dump(dict(args=vars(a), checkpoint_step=int(state['step']), noise_dropout=cfg.noise_dropout, regressor_error=err,
                   regressor_train_seconds=reg_seconds, frechet_floor=floor, best_w=best, results=results, table=table,
                   seconds=total, pictures=[str(out / 'shift_density.png'), str(out / 'shift_curves.png')]),
              open(out / 'noise_guidance.json', 'w'), indent=1)
    print(f"wrote {out / 'noise_guidance.json'}, {out / 'shift_density.png'}, {out / 'shift_curves.png'}")
    return 0


def plot_curves(results, shifts, refs, a, path):
    "Mean excess shift against t (run minus forward-noised baseline), one line per w, one panel per T."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.5 * len(a.steps), 3.3))
    axes = fig.subplots(1, len(a.steps), squeeze=False)[0]
    for ax, T in zip(axes, a.steps):
        for w in a.weights:
            ts, shift = shifts[T, w]
            ax.plot(ts.numpy(), (shift.mean(1) - refs[T].mean(1)).numpy(), label=f'w = {w:g}')
        ax.axhline(0, color='grey', lw=0.5)
        ax.set(title=f'T = {T}', xlabel='nominal t', ylabel='excess t̂ − t (sampled − forward)')
        ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=120)


if __name__ == '__main__':
    sys.exit(main())
