"""Time-to-accuracy of the probability-flow ODE solvers for one checkpoint, side by side (issue 18).

On the same N test images in one batch, with one draw of the latent c ~ q(c|x), one truncated-normal
dequantization sample and one Rademacher probe (Hutchinson divergence) shared by every solve, the
script runs `pf_ode_logp` under each solver option (dopri5 with the 'separate' and the 'joint' error
norm, in the variable 't' and 'gamma', and bosh3), scipy's `solve_ivp` RK45 on the flattened float64
state (z and the divergence integral together, as the official MuLAN code and score_sde do it), and
a tight-tolerance reference (dopri5 at --reference-tol). It prints one Markdown table: NFE, wall
time, ms per NFE, the error of log p(z_0) against the reference (mean and max over the images, in
nats per dimension) and each wall time divided by scipy RK45's.

    python benchmarks/ode_solvers.py --checkpoint runs/digits-mulan/checkpoint.pt --images 8 --threads 2
    python benchmarks/ode_solvers.py --checkpoint CKPT --rtol 1e-4 --reference-tol 1e-8 --no-bosh3
"""
import argparse, math, time
import numpy as np
import torch
from torch.func import vjp
from scipy.integrate import solve_ivp
from mulan_nb.model import model_from_checkpoint
from mulan_nb.data import load_data
from mulan_nb.likelihood import model_ode_fns, evaluating
from mulan_nb.dequantization import dequantize
from mulan_nb.pf_ode import pf_ode_logp, pf_velocity, divergence_probes

F64 = torch.float64


def log_prior(z1):
    "log N(z_1; 0, I) per image, in nats."
    return -0.5 * (z1**2).flatten(1).sum(1) - 0.5 * z1[0].numel() * math.log(2 * math.pi)


def scipy_rk45(z0, eps_fn, gamma_fn, probe, rtol, atol):
    "log p(z_0) by scipy's RK45 on the flattened float64 state [z, ∫div]: velocity by `pf_velocity`, divergence `uᵀJu` by one vjp with the probe u."
    shape, B = z0.shape, z0.shape[0]
    nz, nfe = z0.numel(), 0
    def fun(t, y):
        nonlocal nfe; nfe += 1
        tt = torch.tensor(t, dtype=F64)
        z = torch.from_numpy(y[:nz]).view(shape)
        gamma, dgamma = (g.to(F64) for g in gamma_fn(tt))
        v, pullback = vjp(lambda z: pf_velocity(eps_fn(z, tt), z, gamma, dgamma), z)
        (uJ,) = pullback(probe)
        div = (uJ * probe).flatten(1).sum(1)
        return np.concatenate([v.reshape(-1).numpy(), div.numpy()])
    y0 = np.concatenate([z0.reshape(-1).numpy(), np.zeros(B)])
    sol = solve_ivp(fun, (0.0, 1.0), y0, method='RK45', rtol=rtol, atol=atol)
    if sol.status != 0: raise FloatingPointError(f"scipy RK45 failed after {nfe} evaluations: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1].copy())
    z1, delta = y1[:nz].view(shape), y1[nz:]
    return log_prior(z1) + delta, nfe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', default='runs/digits-mulan/checkpoint.pt', help='checkpoint.pt written by mulan_train')
    p.add_argument('--images', type=int, default=8, help='test images, solved in one batch')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    p.add_argument('--rtol', type=float, default=1e-5, help='rtol = atol of every solver but the reference')
    p.add_argument('--reference-tol', type=float, default=1e-9, help='rtol = atol of the dopri5 reference')
    p.add_argument('--seed', type=int, default=0, help='seed of c ~ q(c|x), the dequantization noise and the probe')
    p.add_argument('--repeats', type=int, default=1, help='timed solves per row (the fastest is reported); the reference runs once')
    p.add_argument('--no-bosh3', action='store_true', help='skip the bosh3 row')
    p.add_argument('--raw', action='store_true', help='the raw weights instead of the EMA ones')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    if a.images < 1 or a.repeats < 1: p.error('--images and --repeats must be >= 1')

    model, state = model_from_checkpoint(a.checkpoint, ema=not a.raw)
    run = state['train']
    data = load_data(run['data'], 'test', run['root'], run['K'])
    x = data.images[:a.images]
    N, D = len(x), model.D
    gen = torch.Generator().manual_seed(a.seed)
    probe_seed = a.seed + 1
    with evaluating(model):
        c, _ = model.encode(x, gen)
        eps_fn, gamma_fn = model_ode_fns(model, c, N)
        z0, _ = dequantize(x, model.config.K, gamma_fn(torch.zeros((), dtype=F64))[0], 'truncnormal', 1, gen, F64)
        z0 = z0[0]
        # the probe pf_ode_logp draws from a generator seeded with probe_seed: the same one for scipy
        probes, _ = divergence_probes(z0.shape, 'hutchinson', 1, F64, torch.Generator().manual_seed(probe_seed))

        def ours(**kw):
            def solve(tol):
                r = pf_ode_logp(z0, eps_fn, gamma_fn, 'hutchinson', 1, rtol=tol, atol=tol, dtype=F64,
                                generator=torch.Generator().manual_seed(probe_seed), **kw)
                return r.logp, r.nfe
            return solve
        rows = [('`pf_ode_logp` default (dopri5, separate norm, t)', ours()),
                ("`pf_ode_logp`, `error_norm='joint'`", ours(error_norm='joint')),
                ("`pf_ode_logp`, `variable='gamma'`", ours(variable='gamma')),
                ("`pf_ode_logp`, `error_norm='joint'`, `variable='gamma'`", ours(error_norm='joint', variable='gamma'))]
        if not a.no_bosh3: rows.append(("`pf_ode_logp`, `method='bosh3'`", ours(method='bosh3')))
        rows.append(('scipy `solve_ivp` RK45, flattened state', lambda tol: scipy_rk45(z0, eps_fn, gamma_fn, probes[0], tol, tol)))

        # warm-up: a few field evaluations of each kind, untimed
        ours()(1e-1); scipy_rk45(z0, eps_fn, gamma_fn, probes[0], 1e-1, 1e-1)

        results = {name: dict(time=math.inf) for name, _ in rows}
        for _ in range(a.repeats):   # rows interleaved, so that a noisy machine slows all alike
            for name, solve in rows:
                t0 = time.perf_counter(); logp, nfe = solve(a.rtol); dt = time.perf_counter() - t0
                r = results[name]
                r.update(logp=logp, nfe=nfe, time=min(r['time'], dt))
        t0 = time.perf_counter(); ref_logp, ref_nfe = ours()(a.reference_tol); ref_time = time.perf_counter() - t0

    scipy_time = results[rows[-1][0]]['time']
    lines = [f"Checkpoint `{a.checkpoint}` (step {state['step']}, {run['preset']}, {run['data']}), {N} test images in one batch, D = {D}; "
             f"truncated-normal dequantization, Hutchinson divergence with one shared Rademacher probe; rtol = atol = {a.rtol:g}; "
             f"{torch.get_num_threads()} torch threads; reference: dopri5 at rtol = atol = {a.reference_tol:g} "
             f"({ref_nfe} NFE, {ref_time:.1f} s); wall time: the fastest of {a.repeats} solve(s).", '',
             '| solver | NFE | wall time | ms per NFE | error vs reference, mean / max (nats per dim) | time / scipy RK45 |',
             '|---|---|---|---|---|---|']
    for name, _ in rows:
        r = results[name]
        err = (r['logp'] - ref_logp).abs() / D
        lines.append(f"| {name} | {r['nfe']} | {r['time']:.2f} s | {1e3 * r['time'] / r['nfe']:.1f} | "
                     f"{err.mean().item():.1e} / {err.max().item():.1e} | {r['time'] / scipy_time:.2f} |")
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
