"""Time per training step (forward, backward, AdamW) of two presets, measured side by side.

Steps of the two models are interleaved (A, B, A, B, ...) so that a noisy shared machine slows
both alike; the script prints the median time of each and their ratio.

    python benchmarks/step_time.py                         # digits-vdm vs digits-mulan, batch 64
    python benchmarks/step_time.py --presets cifar10-vdm cifar10-mulan --batch 8 --steps 5
"""
import argparse, statistics, time
import torch
from mulan_nb.model import MuLAN, parameter_counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--presets', nargs=2, default=['digits-vdm', 'digits-mulan'], help='baseline and candidate presets')
    p.add_argument('--batch', type=int, default=64, help='images per step')
    p.add_argument("--steps", type=int, default=30, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    runs = []
    for name in a.presets:
        model = MuLAN.from_preset(name).train()
        x = torch.randint(0, model.config.K, (a.batch, *model.config.data_shape))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
        runs.append((name, model, x, opt, []))

    def step(model, x, opt):
        opt.zero_grad(set_to_none=True)
        model.nelbo(x)['bpd'].mean().backward()
        opt.step()

    for i in range(a.warmup + a.steps):
        for name, model, x, opt, times in runs:
            t0 = time.perf_counter(); step(model, x, opt); dt = time.perf_counter() - t0
            if i >= a.warmup: times.append(dt)
    med = [statistics.median(r[4]) for r in runs]
    for (name, model, *_), m in zip(runs, med):
        print(f'{name:16s} {m * 1e3:8.1f} ms/step  (batch {a.batch}, {parameter_counts(model)["total"] / 1e6:.2f}M parameters)')
    print(f'ratio {a.presets[1]} / {a.presets[0]}: {med[1] / med[0]:.3f}  (median of {a.steps} interleaved steps, {torch.get_num_threads()} threads)')


if __name__ == '__main__':
    main()
