"""Time-to-accuracy of the probability-flow ODE solvers for one checkpoint, side by side (issue 18).

For each seed, on the same N test images in one batch, with one draw of the latent c ~ q(c|x), one
truncated-normal dequantization sample and one Rademacher probe (Hutchinson divergence) shared by
every solve, the script runs `pf_ode_logp` at its defaults and, at the peers' tolerance --rtol, under the other solver
options (dopri5 in 't' and 'gamma', with the 'separate' and the 'joint' error norm; bosh3), scipy's
`solve_ivp` RK45 on the flattened float64 state (z and the divergence integral together, as the
official MuLAN code and score_sde do it; its field is `torch.func.vjp` of the whole velocity, as the
official code's `jax.vjp`) and the same scipy solver with our field evaluation
(`velocity_and_divergence`), and a tight-tolerance reference (dopri5 at --reference-tol). The rows run
interleaved, --repeats times, so that a loaded machine slows all alike; each row's time is the
fastest repeat, as wall time and as CPU time of this process (steadier when other jobs share the
cores), summed over the seeds. It prints one Markdown table: NFE per solve, times, ms per NFE, the
error of log p(z_0) against the reference (mean and max over all images of all seeds, nats per
dimension) and each time divided by scipy RK45's; with --sweep, also the NFE and error of each option
at several tolerances (the error-against-NFE curves). --out writes all of it, per-image errors and
the machine's load included, to a JSON file that nbs/10_likelihood.ipynb reads. --jobs N measures N seeds at
once, each in a process of its own (the same problems, NFE and errors as in one process; each time is its own
process's).

    python benchmarks/ode_solvers.py --checkpoint runs/digits-mulan/checkpoint.pt --images 8 --threads 1 --repeats 3
    python benchmarks/ode_solvers.py --checkpoint CKPT --seeds 0 1 --threads 1 --repeats 2 --sweep 3e-5 1e-4 3e-4 --out benchmarks/results/ode_solvers-digits.json
    python benchmarks/ode_solvers.py --checkpoint CKPT --images 4 --seeds 0 1 --jobs 2 --threads 1 --out cifar-shaped.json
"""
import argparse, inspect, json, math, multiprocessing, os, shlex, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
import torch
from torch.func import vjp
from scipy.integrate import solve_ivp
from mulan_nb.model import model_from_checkpoint
from mulan_nb.data import load_data
from mulan_nb.likelihood import model_ode_fns, evaluating
from mulan_nb.dequantization import dequantize
from mulan_nb.pf_ode import pf_ode_logp, pf_velocity, velocity_and_divergence, divergence_probes

F64 = torch.float64
DEFAULTS = {k: v.default for k, v in inspect.signature(pf_ode_logp).parameters.items() if k in ('method', 'variable', 'error_norm', 'rtol')}
# the options compared: name -> pf_ode_logp keywords ('scipy' rows are scipy's RK45)
OPTIONS = {'dopri5, separate norm, t': dict(method='dopri5', error_norm='separate', variable='t'),
           'dopri5, joint norm, t': dict(method='dopri5', error_norm='joint', variable='t'),
           'dopri5, separate norm, γ': dict(method='dopri5', error_norm='separate', variable='gamma'),
           'bosh3, separate norm, t': dict(method='bosh3', error_norm='separate', variable='t'),
           'scipy RK45 (official field)': 'scipy-vjp'}
DEFAULT_NAME = f"{DEFAULTS['method']}, {DEFAULTS['error_norm']} norm, {'γ' if DEFAULTS['variable'] == 'gamma' else 't'}"


def log_prior(z1):
    "log N(z_1; 0, I) per image, in nats."
    return -0.5 * (z1**2).flatten(1).sum(1) - 0.5 * z1[0].numel() * math.log(2 * math.pi)


def official_field(eps_fn, gamma_fn, probe):
    "(t, z) -> (v, uᵀJu) as the official code evaluates it: a vjp of the whole velocity (`torch.func.vjp` here, `jax.vjp` there) with the probe u."
    def field(t, z):
        gamma, dgamma = (g.to(F64) for g in gamma_fn(t))
        v, pullback = vjp(lambda z: pf_velocity(eps_fn(z, t), z, gamma, dgamma), z)
        (uJ,) = pullback(probe)
        return v, (uJ * probe).flatten(1).sum(1)
    return field


def our_field(eps_fn, gamma_fn, probe):
    "(t, z) -> (v, uᵀJu) by `velocity_and_divergence`, the field `pf_ode_logp` integrates."
    def field(t, z):
        gamma, dgamma = (g.to(F64) for g in gamma_fn(t))
        return velocity_and_divergence(eps_fn, z, t, gamma, dgamma, probe[None], 1.0)
    return field


def scipy_rk45(z0, field, rtol, atol):
    "log p(z_0) and the NFE by scipy's RK45 on the flattened float64 state [z, ∫div]."
    shape, B, nz, nfe = z0.shape, z0.shape[0], z0.numel(), 0
    def fun(t, y):
        nonlocal nfe; nfe += 1
        v, div = field(torch.tensor(t, dtype=F64), torch.from_numpy(y[:nz]).view(shape))
        return np.concatenate([v.reshape(-1).numpy(), div.numpy()])
    sol = solve_ivp(fun, (0.0, 1.0), np.concatenate([z0.reshape(-1).numpy(), np.zeros(B)]), method='RK45', rtol=rtol, atol=atol)
    if sol.status != 0: raise FloatingPointError(f"scipy RK45 failed after {nfe} evaluations: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1].copy())
    return log_prior(y1[:nz].view(shape)) + y1[nz:], nfe


def problem(model, x, seed):
    "eps_fn, gamma_fn, z_0 and the probe of one seed: c ~ q(c|x), truncated-normal dequantization, one Rademacher probe."
    gen = torch.Generator().manual_seed(seed)
    c, _ = model.encode(x, gen)
    eps_fn, gamma_fn = model_ode_fns(model, c, len(x))
    z0, _ = dequantize(x, model.config.K, gamma_fn(torch.zeros((), dtype=F64))[0], 'truncnormal', 1, gen, F64)
    probes = divergence_probes(z0[0].shape, 'hutchinson', 1, F64, gen)
    return eps_fn, gamma_fn, z0[0], probes


def solver(option, tol, eps_fn, gamma_fn, z0, probes):
    "A callable () -> (log p(z_0), NFE) for one option at rtol = atol = tol."
    if option == 'scipy-vjp': return lambda: scipy_rk45(z0, official_field(eps_fn, gamma_fn, probes[0][0]), tol, tol)
    if option == 'scipy-ours': return lambda: scipy_rk45(z0, our_field(eps_fn, gamma_fn, probes[0][0]), tol, tol)
    def solve():
        r = pf_ode_logp(z0, eps_fn, gamma_fn, 'hutchinson', rtol=tol, atol=tol, probes=probes, **option)
        return r.logp, r.nfe
    return solve


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', default='runs/digits-mulan/checkpoint.pt', help='checkpoint.pt written by mulan_train')
    p.add_argument('--data', default=None, help="test images from this data set (default: the checkpoint's)")
    p.add_argument('--images', type=int, default=8, help='test images, solved in one batch per seed')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='one problem (c, dequantization, probe) per seed, each on the same images')
    p.add_argument('--jobs', type=int, default=1, help='seeds measured at once, each in a process of its own with --threads threads')
    p.add_argument('--threads', type=int, default=0, help='torch threads per process (0: leave as is)')
    p.add_argument('--rtol', type=float, default=1e-5, help='rtol = atol of the peers and of the non-default options in the table')
    p.add_argument('--reference-tol', type=float, default=1e-8, help='rtol = atol of the dopri5 reference')
    p.add_argument('--repeats', type=int, default=1, help='timed solves per row (the fastest is reported); the reference runs once')
    p.add_argument('--sweep', type=float, nargs='*', default=[], help='tolerances at which every option is also solved once (NFE and error)')
    p.add_argument('--options', nargs='*', default=None, choices=[n for n, kw in OPTIONS.items() if kw != 'scipy-vjp'], metavar='OPTION',
                   help=f'the table rows besides the default and the two scipy peers (none when given without a name; default: all of {[n for n, kw in OPTIONS.items() if kw != "scipy-vjp"]})')
    p.add_argument('--sweep-options', nargs='+', default=None, choices=list(OPTIONS), metavar='OPTION', help='the options of the sweep (default: all)')
    p.add_argument('--raw', action='store_true', help='the raw weights instead of the EMA ones')
    p.add_argument('--out', default=None, help='JSON file for the results')
    a = p.parse_args(argv)
    if a.images < 1 or a.repeats < 1 or a.jobs < 1: p.error('--images, --repeats and --jobs must be >= 1')
    return a


def table_rows(a):
    "The table's rows: (name, option, rtol = atol)."
    return [(f'`pf_ode_logp` default ({DEFAULT_NAME}), rtol = atol = {DEFAULTS["rtol"]:g}', {}, DEFAULTS['rtol']),
            *[(f'`pf_ode_logp` {name}' + (' (the default before)' if name == 'dopri5, separate norm, t' else ''), kw, a.rtol)
              for name, kw in OPTIONS.items() if kw != 'scipy-vjp' and (a.options is None or name in a.options)],
            ('scipy `solve_ivp` RK45, flattened state, our field evaluation', 'scipy-ours', a.rtol),
            ('scipy `solve_ivp` RK45, flattened state (the official way)', 'scipy-vjp', a.rtol)]


def load(a):
    "The model (EMA weights unless --raw), the checkpoint's state and the first --images test images."
    if a.threads: torch.set_num_threads(a.threads)
    model, state = model_from_checkpoint(a.checkpoint, ema=not a.raw)
    run = state['train']
    return model, state, load_data(a.data or run['data'], 'test', run['root'], run['K']).images[:a.images]


def measure_seed(a, seed, loaded=None):
    "Every row's fastest wall and CPU time, NFE and per-image error, the reference and the sweep, for one seed's problem (`loaded`: `load(a)`'s result, when at hand)."
    model, _, x = loaded or load(a)
    rows, D = table_rows(a), model.D
    out = {name: dict(wall=math.inf, cpu=math.inf) for name, _, _ in rows}
    with evaluating(model):
        pr = problem(model, x, seed)
        solver({}, 1e-1, *pr)(); solver('scipy-vjp', 1e-1, *pr)(); solver('scipy-ours', 1e-1, *pr)()   # warm-up, untimed
        logps = {}
        for _ in range(a.repeats):   # rows interleaved, so that a noisy machine slows all alike
            for name, kw, tol in rows:
                w0, c0 = time.perf_counter(), time.process_time()
                logps[name], nfe = solver(kw, tol, *pr)()
                r = out[name]
                r['wall'], r['cpu'], r['nfe'] = min(r['wall'], time.perf_counter() - w0), min(r['cpu'], time.process_time() - c0), nfe
        w0, c0 = time.perf_counter(), time.process_time()
        ref_logp, ref_nfe = solver(OPTIONS['dopri5, separate norm, t'], a.reference_tol, *pr)()
        ref = dict(seed=seed, nfe=ref_nfe, wall=time.perf_counter() - w0, cpu=time.process_time() - c0, logp=ref_logp.tolist())
        for name in out: out[name]['err'] = ((logps[name] - ref_logp).abs() / D).tolist()
        sweep = []
        for name in a.sweep_options or list(OPTIONS):
            for tol in a.sweep:
                c0 = time.process_time()
                logp, nfe = solver(OPTIONS[name], tol, *pr)()
                sweep.append(dict(option=name, tol=tol, seed=seed, nfe=nfe, cpu=time.process_time() - c0, err=((logp - ref_logp).abs() / D).tolist()))
    return out, ref, sweep


def main(argv=None):
    a = parse(argv)
    load_before = os.getloadavg()
    model, state, x = load(a)
    run, rows, N, D = state['train'], table_rows(a), len(x), model.D
    if a.jobs == 1: measured = [measure_seed(a, seed, (model, state, x)) for seed in a.seeds]
    else:
        del model   # each process loads its own
        with ProcessPoolExecutor(min(a.jobs, len(a.seeds)), mp_context=multiprocessing.get_context('spawn')) as pool:
            measured = list(pool.map(measure_seed, [a] * len(a.seeds), a.seeds))
    results = {name: {k: [m[0][name][k] for m in measured] for k in ('wall', 'cpu', 'nfe', 'err')} for name, _, _ in rows}
    refs, sweep = [m[1] for m in measured], [s for m in measured for s in m[2]]
    swept = a.sweep_options or list(OPTIONS)

    def stats(errs): e = torch.tensor([v for es in errs for v in es]); return e.mean().item(), e.max().item()
    peer = results[rows[-1][0]]
    lines = [f"Checkpoint `{a.checkpoint}` (step {state['step']}, {run['preset']}, {run['data']}), {N} test images in one batch, D = {D}, "
             f"seeds {a.seeds} (one c, dequantization and probe each; {min(a.jobs, len(a.seeds))} at once); truncated-normal dequantization, Hutchinson divergence with one Rademacher probe "
             f"shared by all solvers; {torch.get_num_threads()} torch thread(s) per process; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after "
             f"on {os.cpu_count()} cores; reference: dopri5 at rtol = atol = {a.reference_tol:g} ({sum(r['nfe'] for r in refs) / len(refs):.0f} NFE); "
             f"times: the fastest of {a.repeats} interleaved repeat(s), summed over the seeds.", '',
             '| solver | rtol = atol | NFE | wall time | CPU time | CPU ms per NFE | error vs reference, mean / max (nats per dim) | wall / scipy | CPU / scipy |',
             '|---|---|---|---|---|---|---|---|---|']
    table = []
    for name, kw, tol in rows:
        r = results[name]
        mean, mx = stats(r['err'])
        wall, cpu, nfe = sum(r['wall']), sum(r['cpu']), sum(r['nfe']) / len(r['nfe'])
        table.append(dict(name=name, option=kw if isinstance(kw, str) else {**DEFAULTS, **kw, 'rtol': tol}, tol=tol, nfe=nfe, wall=wall, cpu=cpu,
                          err_mean=mean, err_max=mx, wall_ratio=wall / sum(peer['wall']), cpu_ratio=cpu / sum(peer['cpu']), err=r['err']))
        lines.append(f"| {name} | {tol:g} | {nfe:.0f} | {wall:.2f} s | {cpu:.2f} s | {1e3 * cpu / sum(r['nfe']):.1f} | {mean:.1e} / {mx:.1e} | "
                     f"{wall / sum(peer['wall']):.2f} | {cpu / sum(peer['cpu']):.2f} |")
    if sweep:
        lines += ['', '| option | rtol = atol | NFE (mean per solve) | error mean / max (nats per dim) |', '|---|---|---|---|']
        for name in swept:
            for tol in a.sweep:
                pts = [s for s in sweep if s['option'] == name and s['tol'] == tol]
                mean, mx = stats([s['err'] for s in pts])
                lines.append(f"| {name} | {tol:g} | {sum(s['nfe'] for s in pts) / len(pts):.0f} | {mean:.1e} / {mx:.1e} |")
    print('\n'.join(lines))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(
            command='python benchmarks/ode_solvers.py ' + shlex.join(argv if argv is not None else sys.argv[1:]),
            checkpoint=str(a.checkpoint), step=state['step'], preset=run['preset'], data=a.data or run['data'], images=N, D=D, seeds=a.seeds,
            threads=torch.get_num_threads(), jobs=min(a.jobs, len(a.seeds)), cores=os.cpu_count(), load_before=load_before, load_after=os.getloadavg(), repeats=a.repeats,
            reference=dict(method='dopri5', tol=a.reference_tol, runs=refs), defaults=DEFAULTS, table=table, sweep=sweep, markdown='\n'.join(lines)), indent=1))


if __name__ == '__main__':
    main()
