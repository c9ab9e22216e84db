"""CPU time of one probability-flow field evaluation, ours against the official way's, side by side (issue 18).

Ours is `velocity_and_divergence` (one backward pass of the network with the cotangent a ⊙ u, what `pf_ode_logp`
integrates); the official way's is `torch.func.vjp` of the whole velocity (as the official code's `jax.vjp`). Both
evaluate v and the Hutchinson divergence uᵀJu with one Rademacher probe at the same (t, z), on a preset's network as
initialised: the cost of an evaluation does not depend on the weights, so no trained checkpoint is needed, and the
full-size presets can be timed where no model of that size has been trained. The two run interleaved, --repeats
times, and the script prints the median and fastest CPU time of each and the ratio of the medians.

    python benchmarks/field_cost.py --preset cifar10-mulan --images 2 --repeats 6
    python benchmarks/field_cost.py --preset cifar10-mulan --set channels=16 n_blocks=2 encoder_channels=16 --repeats 20
"""
import argparse, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from ode_solvers import official_field, our_field, F64
from mulan_nb.model import MuLAN, PRESETS
from mulan_nb.likelihood import model_ode_fns, evaluating
from mulan_nb.pf_ode import divergence_probes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='cifar10-mulan', choices=sorted(PRESETS), help='the network to time, as initialised')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='integer fields of the preset to change, e.g. channels=16')
    p.add_argument('--images', type=int, default=2, help='images per evaluation')
    p.add_argument('--repeats', type=int, default=10, help='timed evaluations of each field (after one untimed)')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--seed', type=int, default=0, help='seeds the images, z, c and the probe')
    a = p.parse_args(argv)
    if a.images < 1 or a.repeats < 1 or a.threads < 1: p.error('--images, --repeats and --threads must be >= 1')
    try: overrides = {k: int(v) for k, v in (s.split('=', 1) for s in a.set)}
    except ValueError: p.error(f'--set takes KEY=INTEGER pairs, got {a.set}')
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    model = MuLAN.from_preset(a.preset, **overrides)
    shape = (a.images, *model.config.data_shape)
    x = torch.randint(0, model.config.K, shape, generator=gen)
    with evaluating(model):
        c, _ = model.encode(x, gen)
        eps_fn, gamma_fn = model_ode_fns(model, c, a.images)
        z = torch.randn(shape, dtype=F64, generator=gen)
        u = divergence_probes(shape, 'hutchinson', 1, F64, gen)[0][0]
        fields = {'ours (velocity_and_divergence)': our_field(eps_fn, gamma_fn, u), 'official way (vjp of the velocity)': official_field(eps_fn, gamma_fn, u)}
        for f in fields.values(): f(torch.tensor(0.5, dtype=F64), z)   # warm-up
        cpu = {k: [] for k in fields}
        for i in range(a.repeats):   # interleaved, so that a noisy machine slows both alike
            for k, f in fields.items():
                c0 = time.process_time(); f(torch.tensor(0.5 + 1e-3 * i, dtype=F64), z); cpu[k].append(time.process_time() - c0)
    params = sum(q.numel() for q in model.parameters())
    med = {k: statistics.median(v) for k, v in cpu.items()}
    (ours, official) = med.values()
    print(f"{a.preset}{' with ' + ' '.join(a.set) if a.set else ''} ({params / 1e6:.2f}M parameters, as initialised), {a.images} image(s), "
          f"{a.threads} thread(s), {a.repeats} interleaved repeats, CPU time per evaluation:\n")
    print('| field evaluation | median ms | fastest ms |\n|---|---|---|')
    for k, v in cpu.items(): print(f'| {k} | {1e3 * med[k]:.1f} | {1e3 * min(v):.1f} |')
    print(f'\nours / official way (medians): {ours / official:.3f}')


if __name__ == '__main__':
    main()
