"""Fréchet distance of ancestral samples on three time grids: uniform in t, EDM's ρ = 7 (hand-tuned) and score-optimal.

For each checkpoint (EMA weights): the corrector-optimised incremental cost is estimated on a fine uniform grid
from test images (`mulan_nb.score_optimal.incremental_cost`), Algorithm 1 gives the optimised grid for every T,
and n samples are drawn on each grid with the same seed (same c, z_1 and step noise draws) and scored with
`mulan_nb.frechet.FrechetEvaluator`. Also reported: the floor (train vs test, and n random training images vs test),
the max/min cost per step of each grid at a few T (a fresh estimate on test images), and a PNG of cost per step.

Example (about 20 minutes on one CPU core for two digits models):

    OMP_NUM_THREADS=1 python experiments/score_optimal_fd.py \
        --checkpoints /tmp/run_mulan/checkpoint.pt /tmp/run_vdm/checkpoint.pt --n-samples 500 --out /tmp/so_helper/fd
"""
import argparse, json, sys, time
from pathlib import Path
import torch
from mulan_nb.data import load_data
from mulan_nb.frechet import FrechetEvaluator
from mulan_nb.sampling import sample
from mulan_nb.score_optimal import (incremental_cost, optimal_times, hand_tuned_times, step_costs, cost_ratio,
                                    plot_step_costs)
from mulan_nb.model import model_from_checkpoint


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoints', nargs='+', required=True, help='checkpoint.pt files written by mulan_train (digits)')
    p.add_argument('--labels', nargs='*', default=None, help='a name per checkpoint (default: preset and folder)')
    p.add_argument('--n-samples', type=int, default=500, help='samples per (model, grid, T)')
    p.add_argument('--steps', type=int, nargs='+', default=[10, 20, 50, 100], help='numbers of steps T')
    p.add_argument('--fine', type=int, default=200, help='intervals of the fine uniform grid for the cost')
    p.add_argument('--cost-images', type=int, default=96, help='test images for the cost estimate')
    p.add_argument('--cost-repeats', type=int, default=1, help='draws of (eps, c) per image for the cost estimate')
    p.add_argument('--ratio-steps', type=int, nargs='*', default=[10, 20], help='T at which the per-step cost of each grid is re-estimated')
    p.add_argument('--ratio-images', type=int, default=128, help='test images for the per-step cost')
    p.add_argument('--plot-steps', type=int, default=20, help='T of the cost-per-step plot (must be in --ratio-steps)')
    p.add_argument('--rho', type=float, default=7., help="EDM's rho of the hand-tuned grid")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='score_optimal_fd', help='output prefix: PREFIX.json, PREFIX.md, PREFIX-<label>-cost.png')
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.checkpoints): p.error('--labels needs one name per checkpoint')
    if a.n_samples < 2 or min(a.steps) < 1 or a.fine < 2 or a.cost_images < 1: p.error('--n-samples >= 2, --steps >= 1, --fine >= 2, --cost-images >= 1')
    if a.plot_steps not in a.ratio_steps: p.error('--plot-steps must be one of --ratio-steps')
    return a


def markdown(results, floors, a):
    grids = ['uniform', 'EDM rho=7', 'optimised']
    lines = [f"Fréchet distance to the digits test split (299 images), {a.n_samples} ancestral samples per cell, same seed ({a.seed}) on every grid; lower is better.",
             f"Floor: train split (1498) vs test {floors['train']:.2f}; {a.n_samples} random training images vs test {floors['train_n']:.2f}.", '',
             '| model | grid | ' + ' | '.join(f'T={T}' for T in a.steps) + ' |', '|---|---|' + '---:|' * len(a.steps)]
    for r in results:
        for g in grids: lines.append(f"| {r['label']} | {g} | " + ' | '.join(f"{r['fd'][g][str(T)]:.2f}" for T in a.steps) + ' |')
    lines += ['', 'Max/min of the cost per step (fresh estimate on test images):', '',
              '| model | T | ' + ' | '.join(grids) + ' |', '|---|---:|' + '---:|' * len(grids)]
    for r in results:
        for T in a.ratio_steps: lines.append(f"| {r['label']} | {T} | " + ' | '.join(f"{r['ratio'][g][str(T)]:.3g}" for g in grids) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    log = lambda *s: print(f'[{time.perf_counter() - t_start:7.1f} s]', *s, flush=True)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    test = load_data('digits', 'test').images
    fd = FrechetEvaluator('digits')
    train = fd.train_data.images
    floors = dict(train=fd.floor(), train_n=fd(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed))[:a.n_samples]]))
    log(f"floor {floors['train']:.2f} (train vs test), {floors['train_n']:.2f} ({a.n_samples} training images vs test)")
    results = []
    for i, path in enumerate(a.checkpoints):
        model, state = model_from_checkpoint(path)
        model.eval()
        label = a.labels[i] if a.labels else f"{state['train'].get('preset', 'model')} ({Path(path).parent.name})"
        torch.manual_seed(a.seed)   # the encoder's c in the cost estimate uses the global generator
        fine = torch.linspace(0, 1, a.fine + 1)
        t0 = time.perf_counter()
        cost = incremental_cost(model, test[:a.cost_images], fine, a.cost_repeats, torch.Generator().manual_seed(a.seed))
        log(f'{label}: cost on {a.fine} intervals from {a.cost_images} test images in {time.perf_counter() - t0:.0f} s')
        grids = {T: {'uniform': torch.linspace(0, 1, T + 1), 'EDM rho=7': hand_tuned_times(model, T, a.rho, generator=torch.Generator().manual_seed(a.seed)),
                     'optimised': optimal_times(fine, cost, T)} for T in a.steps}
        r = dict(label=label, checkpoint=str(path), step=state['step'], fine_grid=fine.tolist(), fine_cost=cost.tolist(),
                 fd={g: {} for g in grids[a.steps[0]]}, ratio={g: {} for g in grids[a.steps[0]]}, step_costs={}, times={})
        for T in a.ratio_steps:
            gT = grids[T] if T in grids else {'uniform': torch.linspace(0, 1, T + 1), 'EDM rho=7': hand_tuned_times(model, T, a.rho), 'optimised': optimal_times(fine, cost, T)}
            torch.manual_seed(a.seed + 1)
            costs = {g: step_costs(model, test[:a.ratio_images], t, generator=torch.Generator().manual_seed(a.seed + 1)) for g, t in gT.items()}
            for g, c in costs.items(): r['ratio'][g][str(T)] = cost_ratio(c)
            r['step_costs'][str(T)] = {g: c.tolist() for g, c in costs.items()}
            log(f'{label}: T={T} max/min cost per step ' + ', '.join(f'{g} {v[str(T)]:.3g}' for g, v in r['ratio'].items()))
            if T == a.plot_steps:
                png = f"{out}-{Path(path).parent.name}-cost.png"
                plot_step_costs(gT, costs, png, f'{label}: cost per step, T = {T} ({a.ratio_images} test images)')
                r['plot'] = png
        for T in a.steps:
            r['times'][str(T)] = {g: t.tolist() for g, t in grids[T].items()}
            for g, t in grids[T].items():
                t0 = time.perf_counter()
                x = sample(model, a.n_samples, T=T, times=t, generator=torch.Generator().manual_seed(a.seed))
                r['fd'][g][str(T)] = fd(x)
                log(f"{label}: T={T:3d} {g:10s} FD {r['fd'][g][str(T)]:.2f} ({time.perf_counter() - t0:.0f} s)")
        results.append(r)
        json.dump(dict(args=vars(a), floors=floors, results=results), open(f'{out}.json', 'w'), indent=1)
    md = markdown(results, floors, a)
    open(f'{out}.md', 'w').write(md + '\n')
    print(md)
    log(f'done: {out}.json, {out}.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
