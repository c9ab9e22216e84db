"""Issue 17, point 5: VDM against MuLAN along a long run (20,000 steps on digits), read from the runs' own logs.

`experiments/compare.py` trains the runs (resumably) and summarises them once they are finished; this script reads
their evaluation curves as they stand, finished or not, so that a run still going has its table so far:

    python experiments/compare.py --configs vdm-scalar mulan --seeds 0 --steps 20000 --eval-every 1000 --jobs 2 \
        --ode-images 0 --runs experiments/runs/steps-20000 --results experiments/results/digits-20000-steps
    python experiments/long_runs.py --runs experiments/runs/steps-20000 --results experiments/results/long-runs

At every evaluation step that both runs reached it reports each test bpd (the periodic evaluation: NELBO with 8 draws
of (t, ε, c) per test image, EMA weights; the final one of a finished run is the dense ELBO with 128 draws), the gap
MuLAN − VDM, and the steps each run needed to reach the other's bpd at the last common step (linear between
evaluations). The two runs are evaluated on the same test images, so the standard error of the gap given here, from
the two standard errors over images as if independent, is an upper bound on the gap's own when the two runs' per-image
bpd correlate positively (as the same images make likely; the per-image values are not logged, so this is not checked).
"""
import argparse, json, math, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))
from compare import steps_to_reach
from mulan_nb.training import _read_jsonl


def eval_curve(run:Path) -> list[dict]:
    "The evaluation rows of a run's metrics.jsonl, by step (a resumed run's repeated step keeps its last row)."
    path = run / 'metrics.jsonl'
    if not path.exists(): raise FileNotFoundError(f"{path} is missing: start the runs with experiments/compare.py (see this script's docstring)")
    rows = {m['step']: m for m in _read_jsonl(path)[0] if m.get('kind') == 'eval'}   # a torn last line (a run killed while logging) is dropped
    return [rows[s] for s in sorted(rows)]


def compare_curves(curves:dict) -> dict:
    "The table of two runs' curves {name: eval rows} at their common steps, their gap and the steps each needs to reach the other."
    (a, ca), (b, cb) = curves.items()
    by_a, by_b = {r['step']: r for r in ca}, {r['step']: r for r in cb}
    common = sorted(set(by_a) & set(by_b))
    if not common: raise ValueError(f"the runs {a} and {b} have no evaluation step in common yet")
    rows = [dict(step=s, **{f'{n}_bpd': by[s]['bpd'] for n, by in ((a, by_a), (b, by_b))}, gap=by_b[s]['bpd'] - by_a[s]['bpd'],
                 gap_se=math.hypot(by_a[s]['se'], by_b[s]['se']), n_t=(by_a[s]['n_t'], by_b[s]['n_t'])) for s in common]
    last = common[-1]
    reach = {f'{n}_steps_to_reach_{o}': steps_to_reach([(r['step'], r['bpd']) for r in c if r['step'] <= last], other[last]['bpd'])
             for n, c, o, other in ((a, ca, b, by_b), (b, cb, a, by_a))}
    return dict(names=[a, b], gap_of=f'{b} - {a}', rows=rows, last_common_step=last, **reach)


def markdown(summary:dict) -> str:
    a, b = summary['names']
    lines = [f"digits, {summary['planned_steps']} steps planned, seed {summary['seed']}; {', '.join(f'{n} at step {s}' for n, s in summary['reached'].items())}. "
             "Test bpd: NELBO with 8 draws of (t, ε, c) per test image at the periodic evaluations (128 at a finished run's last), EMA weights; "
             "the gap's se combines the two se's over images as if independent (an upper bound when the runs' per-image bpd correlate positively, as the same images make likely).", '',
             f'| step | {a} | {b} | {b} − {a} |', '|---|---|---|---|']
    lines += [f"| {r['step']} | {r[f'{a}_bpd']:.4f} | {r[f'{b}_bpd']:.4f} | {r['gap']:+.4f} ± {r['gap_se']:.4f} |" for r in summary['rows']]
    s = summary['last_common_step']
    for n, o in ((a, b), (b, a)):
        k = summary[f'{n}_steps_to_reach_{o}']
        lines.append(f"\nSteps {n} needed to reach {o}'s bpd at step {s}: " + ('not reached' if k is None else f"{k:.0f} ({k / s:.2f} × {s})"))
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', default='experiments/runs/steps-20000', help='the folder compare.py trains into')
    p.add_argument('--configs', nargs=2, default=['vdm-scalar', 'mulan'], help='the two configurations (the gap is the second minus the first)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--steps', type=int, default=20000, help='the steps the runs were started for')
    p.add_argument('--results', default='experiments/results/long-runs', help='the summary: RESULTS.json, RESULTS.md, RESULTS.png')
    a = p.parse_args(argv)
    runs = {name: Path(a.runs) / f'{name}-s{a.seed}' for name in a.configs}
    curves = {name: eval_curve(run) for name, run in runs.items()}
    summary = dict(compare_curves(curves), seed=a.seed, planned_steps=a.steps, reached={n: c[-1]['step'] for n, c in curves.items()},
                   finished={n: (run / 'result.json').exists() for n, run in runs.items()},
                   curves={n: [(r['step'], r['bpd'], r['se']) for r in c] for n, c in curves.items()},
                   command='python experiments/long_runs.py ' + ' '.join(argv if argv is not None else sys.argv[1:]))
    out = Path(a.results); out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(summary, indent=1))
    out.with_suffix('.md').write_text(markdown(summary))
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, c in summary['curves'].items(): ax.plot([s for s, _, _ in c], [v for _, v, _ in c], 'o-', ms=3, label=n)
    ax.set(xlabel='step', ylabel='test bpd', yscale='log', title=f"digits, seed {a.seed}"); ax.legend(); ax.grid(alpha=0.3)
    rows = summary['rows']
    gx.errorbar([r['step'] for r in rows], [r['gap'] for r in rows], yerr=[r['gap_se'] for r in rows], marker='o', ms=3, capsize=2)
    gx.axhline(0, color='k', lw=0.5); gx.set(xlabel='step', ylabel=summary['gap_of'] + ' (bpd)', title='the gap at equal steps'); gx.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(out.with_suffix('.png'), dpi=110)
    print(markdown(summary))


if __name__ == '__main__':
    main()
