"""What training and evaluation cost on a CUDA machine, and that save/kill/resume and NCCL hold there: one command, one table.

    python benchmarks/gpu_check.py                 # on a CUDA machine: cifar10-vdm and cifar10-mulan at full size
    python benchmarks/gpu_check.py --tiny          # tiny models, small images and batches, few steps (the default without CUDA; CI)
    python benchmarks/gpu_check.py --no-compile --batches 32 --steps 10    # a quicker look

Rows of the table:
- train: `Trainer.one_step` (forward, backward, AdamW, EMA) of both presets at each batch size, in fp32 (TF32 off),
  TF32 (matmuls and convolutions) and bf16 (autocast, fp32 weights), with and without `torch.compile`. The two presets'
  steps are interleaved (VDM, MuLAN, VDM, ...) so that a shared machine slows both alike; images/s is the batch over
  the median step time, MuLAN/VDM the ratio of the two medians; peak MiB is the most CUDA memory allocated during one
  of the preset's steps, less what the other preset holds (so, what it would take alone).
- dense ELBO and ODE: a few test images of each preset after a few training steps (fp32): `dense_elbo` (NFE = one
  denoiser call per image and draw) and `ode_bpd` (dopri5, rtol = atol = 1e-5 (1e-3 with --tiny), Hutchinson divergence
  with one probe as `mulan_eval` does, float64 state; NFE = the solver's). The weights are barely trained, on random images:
  the times show the cost of an evaluation, not the NFE of a trained model.
- resume: `mulan_train` on the device killed with SIGKILL right after its first checkpoint, resumed, against an
  uninterrupted run run alongside (max |Δθ| of the raw weights; on CUDA also a second uninterrupted run, the floor
  that non-deterministic kernels set; 'equal' means within 1e-6 or 10× that floor).
- 2 processes: `torchrun --standalone --nproc-per-node 2 mulan_train` (NCCL) against one process with accum=2 when
  there are 2 GPUs; on the CPU with --two-processes (gloo), as tests/test_training.py does.

The data are random uint8 images (32×32×3; 8×8×3 with --tiny) in a temporary .npy: throughput does not depend on them,
and the machine needs no data set. Exit code 1 when the resume or the 2-process check finds different parameters.
"""
import argparse, gc, os, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from mulan_nb.model import load_checkpoint
from mulan_nb.training import Trainer, TrainConfig
from mulan_nb.likelihood import dense_elbo, ode_bpd

PRESETS = ('cifar10-vdm', 'cifar10-mulan')
PRECISIONS = {'fp32': dict(precision='fp32', tf32=False), 'tf32': dict(precision='fp32', tf32=True), 'bf16': dict(precision='bf16', tf32=False)}
COLUMNS = ('check', 'preset', 'batch', 'precision', 'compile', 'images/s', 'peak MiB', 'MuLAN/VDM', 'time (s)', 'NFE', 'result')
TINY_MODEL = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)
FULL = dict(size=32, n_images=1280, batches=(32, 128), warmup=3, steps=20, eval_steps=50, elbo=(16, 32), ode=4, ode_tol=1e-5, resume_steps=40, ckpt_every=5, model={})
TINY = dict(size=8, n_images=80, batches=(4, 8), warmup=1, steps=3, eval_steps=3, elbo=(2, 2), ode=1, ode_tol=1e-3, resume_steps=12, ckpt_every=4, model=TINY_MODEL)


def cli(*args):
    "`mulan_train` with `args`, as a command line (the console script may not be on PATH)."
    return [sys.executable, '-c', 'import sys; from mulan_nb.cli import train_main; sys.exit(train_main())', *args]


def row(check, preset='', batch='', precision='', compiled='', ips='', peak='', ratio='', seconds='', nfe='', result=''):
    return dict(zip(COLUMNS, (check, preset, batch, precision, compiled, ips, peak, ratio, seconds, nfe, result)))


def synced(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def allocated(dev): return torch.cuda.memory_allocated(dev) if dev.type == 'cuda' else 0


def free_memory(dev):
    gc.collect()
    if dev.type == 'cuda': torch.cuda.empty_cache()


def trainer(s, data, dev, preset, out, **kw):
    "A `Trainer` of `preset` (with the size's model overrides) on the synthetic data, evaluation and samples off."
    cfg = TrainConfig(preset=preset, model=s['model'], data=data, steps=10**6, out=str(out), device=str(dev), eval_every=0, n_samples=0, **kw)
    return Trainer(cfg, progress=False)


def train_pair(s, data, dev, tmp, batch, precision, compiled, label):
    "Rows of both presets at one setting: median step time, images/s, peak memory, the MuLAN/VDM ratio, measured interleaved."
    head = dict(batch=batch, precision=precision, compiled='yes' if compiled else 'no')
    if compiled and dev.type != 'cuda':
        return [row('train', label(p), **head, result='skipped: torch.compile on the CPU (inductor) takes minutes per model') for p in PRESETS]
    torch._dynamo.reset(); torch._dynamo.utils.counters.clear()   # a fresh cache per setting: no recompile limit reached, no reuse
    free_memory(dev); base = allocated(dev)
    trainers, resident, first = [], [], []
    try:
        for p in PRESETS:
            tr = trainer(s, data, dev, p, tmp / f'{p}-{batch}-{precision}-{compiled}', batch_size=batch, compile=compiled, **PRECISIONS[precision])
            trainers.append(tr)
            synced(dev); t0 = time.perf_counter(); tr.one_step(); synced(dev); first.append(time.perf_counter() - t0)   # compiles, if asked
            for _ in range(s['warmup'] - 1): tr.one_step()
            resident.append(allocated(dev) - base - sum(resident))
        times, peaks = [[] for _ in PRESETS], [0] * len(PRESETS)
        for _ in range(s['steps']):
            for k, tr in enumerate(trainers):
                if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(dev)
                synced(dev); t0 = time.perf_counter(); tr.one_step(); synced(dev); times[k].append(time.perf_counter() - t0)
                if dev.type == 'cuda': peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated(dev) - base - (sum(resident) - resident[k]))
    except (torch.OutOfMemoryError, RuntimeError) as e:   # too large a batch for this GPU, or a compiler that fails here: a row, not a stop
        why = 'out of memory' if isinstance(e, torch.OutOfMemoryError) else f'failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}'
        return [row('train', label(p), **head, result=why) for p in PRESETS]
    finally:
        for tr in trainers: tr.lock.close()
        del trainers; free_memory(dev)
    med = [statistics.median(t) for t in times]
    breaks = sum(torch._dynamo.utils.counters['graph_break'].values())
    rows = []
    for k, p in enumerate(PRESETS):
        note = f"first step {first[k]:.1f} s" + (f", {breaks} graph break(s) in the setting" if compiled else '')
        rows.append(row('train', label(p), **head, ips=f'{batch / med[k]:.0f}', peak=f'{peaks[k] / 2**20:.0f}' if dev.type == 'cuda' else '–',
                        ratio=f'{med[k] / med[0]:.3f}' if k else '', seconds=f'{med[k]:.4f}', result=f"median of {s['steps']} steps; {note}"))
    return rows


def evaluations(s, data, dev, tmp, label):
    "A dense ELBO and a probability-flow ODE bound of a few test images of each preset, after a few training steps."
    rows = []
    n_elbo, n_t = s['elbo']
    for p in PRESETS:
        tr = trainer(s, data, dev, p, tmp / f'eval-{p}', batch_size=s['batches'][0], lr=1e-3, warmup=5)
        try:
            for _ in range(s['eval_steps']): tr.one_step()
        finally: tr.lock.close()
        model, x = tr.model, tr.xtest
        torch.manual_seed(0); synced(dev); t0 = time.perf_counter()
        elbo = dense_elbo(model, x[:n_elbo], n_t); synced(dev); dt = time.perf_counter() - t0
        rows.append(row('dense ELBO', label(p), n_elbo, 'fp32', 'no', f'{n_elbo / dt:.1f}', seconds=f'{dt:.2f}', nfe=n_elbo * n_t,
                        result=f"{elbo.mean:.3f} bpd, {n_t} draws per image, after {s['eval_steps']} steps"))
        gen = torch.Generator(dev).manual_seed(0); synced(dev); t0 = time.perf_counter()
        ode = ode_bpd(model, x[:s['ode']], divergence='hutchinson', rtol=s['ode_tol'], atol=s['ode_tol'], check_images=0, generator=gen); synced(dev); dt = time.perf_counter() - t0
        rows.append(row('ODE', label(p), s['ode'], 'fp32 (float64 state)', 'no', f"{s['ode'] / dt:.2f}", seconds=f'{dt:.2f}', nfe=sum(ode.nfe),
                        result=f"{ode.bpd.mean().item():.3f} bpd, dopri5 rtol=atol={s['ode_tol']:g}, Hutchinson 1 probe, one solve of {s['ode']} image(s)"))
        del tr, model; free_memory(dev)
    return rows


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run(cmd, **kw):
    "Run a command; a failure stops the check with its last lines."
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode: raise RuntimeError(f"{' '.join(cmd[:6])}... exited with {r.returncode}: {r.stderr.strip()[-600:]}")
    return r


def train_args(s, data, dev, batch, steps):
    over = [f'{k}={v}' for k, v in s['model'].items()]
    return ['--preset', PRESETS[1], '--data', data, '--device', str(dev), '--steps', str(steps), '--ckpt-every', str(s['ckpt_every']), '--batch-size', str(batch),
            '--eval-every', '0', '--final-n-t', '1', '--samples', '0', '--no-progress', '--lr', '1e-3', '--warmup', '5', *(['--set', *over] if over else [])]


def verdict(diff, floor):
    "'equal' within 1e-6 (or the floor of two uninterrupted runs, on CUDA), else 'DIFFERENT'."
    return 'equal' if diff <= max(1e-6, 10 * floor) else 'DIFFERENT'


def resume_check(s, data, dev, tmp, label):
    "`mulan_train` killed with SIGKILL just after its first checkpoint and resumed, against an uninterrupted run (and, on CUDA, a rerun); the row and the rerun's max |Δθ|."
    args = train_args(s, data, dev, s['batches'][0], s['resume_steps'])
    t0 = time.perf_counter()
    uninterrupted = [subprocess.Popen(cli('--out', str(tmp / name), *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for name in ('ref', 'rerun')[:1 + (dev.type == 'cuda')]]   # side by side with the killed run
    killed = tmp / 'killed'
    proc = subprocess.Popen(cli('--out', str(killed), *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / 'checkpoint.pt').exists() and proc.poll() is None: time.sleep(0.01)
    proc.send_signal(signal.SIGKILL); proc.wait()
    at = load_checkpoint(killed / 'checkpoint.pt')['step']
    run(cli('--out', str(killed), *args, '--resume'))
    for u in uninterrupted:
        err = u.communicate()[1]
        if u.returncode: raise RuntimeError(f"mulan_train exited with {u.returncode}: {err.strip()[-600:]}")
    ref = load_checkpoint(tmp / 'ref' / 'checkpoint.pt')['model']
    floor = max_diff(ref, load_checkpoint(tmp / 'rerun' / 'checkpoint.pt')['model']) if dev.type == 'cuda' else 0.
    diff = max_diff(ref, load_checkpoint(killed / 'checkpoint.pt')['model'])
    rerun = f", rerun {floor:.1e}" if dev.type == 'cuda' else ''
    return row('resume', label(PRESETS[1]), s['batches'][0], 'fp32', 'no', seconds=f'{time.perf_counter() - t0:.1f}',
               result=f"{verdict(diff, floor)}: max |Δθ| {diff:.1e}{rerun} (SIGKILL after the checkpoint of step {at} of {s['resume_steps']})"), floor


def two_process_check(s, data, dev, tmp, label, floor=0.):
    "torchrun with 2 processes (NCCL on 2 GPUs, gloo on the CPU) against one process with accum=2: the parameters after 5 steps."
    backend = 'NCCL' if dev.type == 'cuda' else 'gloo'
    args = train_args(s, data, dev.type, 2 * s['batches'][0], 5)
    t0 = time.perf_counter(); run(cli('--out', str(tmp / 'one'), *args, '--accum', '2')); t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '--no-python', *cli('--out', str(tmp / 'two'), *args)], env={**os.environ, 'OMP_NUM_THREADS': '1'})
    t_two = time.perf_counter() - t0
    diff = max_diff(load_checkpoint(tmp / 'one' / 'checkpoint.pt')['model'], load_checkpoint(tmp / 'two' / 'checkpoint.pt')['model'])
    return row(f'2 processes ({backend})', label(PRESETS[1]), 2 * s['batches'][0], 'fp32', 'no', seconds=f'{t_two:.1f}',
               result=f"{verdict(diff, floor)}: max |Δθ| {diff:.1e} against 1 process × accum 2 after 5 steps (whole runs: {t_two:.0f} s vs {t_one:.0f} s)")


def markdown(rows):
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(r[c]) for c in COLUMNS) + ' |' for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='tiny models, 8×8 images, small batches, few steps (the default without CUDA)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batches', type=int, nargs='+', default=None, help='batch sizes of the train rows (default 32 128; tiny 4 8)')
    p.add_argument('--precisions', nargs='+', choices=tuple(PRECISIONS), default=tuple(PRECISIONS))
    p.add_argument('--steps', type=int, default=None, help='timed steps per preset and setting (default 20; tiny 3)')
    p.add_argument('--no-compile', action='store_true', help='leave out the torch.compile rows')
    p.add_argument('--two-processes', action='store_true', help='run the 2-process check on the CPU too (gloo)')
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    tiny = a.tiny or dev.type != 'cuda'
    s = dict(TINY if tiny else FULL)
    if a.batches: s['batches'] = tuple(a.batches)
    if a.steps: s['steps'] = a.steps
    label = (lambda name: f'{name} (tiny)') if tiny else (lambda name: name)
    t_start = time.perf_counter()
    gpu = f"{torch.cuda.get_device_name(dev)}, {torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}" if dev.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f"gpu_check: torch {torch.__version__}, {gpu}{'; tiny preset (' + str(TINY_MODEL) + ')' if tiny else ''}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = np.random.default_rng(0).integers(0, 256, (s['n_images'], s['size'], s['size'], 3), dtype=np.uint8)
        data = str(tmp / 'random.npy'); np.save(data, images)
        for batch in s['batches']:
            for precision in a.precisions:
                for compiled in ((False,) if a.no_compile else (False, True)):
                    rows += train_pair(s, data, dev, tmp, batch, precision, compiled, label)
                    print(f'gpu_check: train rows at batch {batch}, {precision}, compile {compiled} done ({time.perf_counter() - t_start:.0f} s)', file=sys.stderr, flush=True)
        rows += evaluations(s, data, dev, tmp, label)
        resumed, floor = resume_check(s, data, dev, tmp / 'resume', label); rows.append(resumed)
        if (dev.type == 'cuda' and torch.cuda.device_count() >= 2) or (dev.type == 'cpu' and a.two_processes):
            rows.append(two_process_check(s, data, dev, tmp / 'ddp', label, floor))
        else:
            why = 'one GPU' if dev.type == 'cuda' else 'the CPU (gloo with --two-processes; tests/test_training.py runs it)'
            rows.append(row('2 processes (NCCL)', label(PRESETS[1]), result=f'skipped: {why}'))
    print(markdown(rows))
    print(f"gpu_check: {time.perf_counter() - t_start:.0f} s in all")
    return 1 if any(r['result'].startswith('DIFFERENT') for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
