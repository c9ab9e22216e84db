"""What the checksum and the run-folder lock cost a checkpoint, side by side in one run.

    python benchmarks/checkpoint_io.py                      # cifar10-mulan size (70M parameters), CPU
    python benchmarks/checkpoint_io.py --preset digits-mulan --repeats 5

The state is what `Trainer.checkpoint` writes: raw and EMA weights and AdamW's two moments (4 copies of the
parameters). Plain = `torch.save` to a file with fsync / `torch.load(weights_only=True)`; ours = `save_checkpoint`
(checksum, fsync, atomic rename) / `load_checkpoint` (checksum verified). The lock is `claim_run_folder`, taken once
per run. Times are medians over --repeats, in seconds; the ratio is ours / plain.
"""
import argparse, os, statistics, tempfile, time
from pathlib import Path
import torch
from mulan_nb.model import MuLAN, save_checkpoint, load_checkpoint, state_checksum
from mulan_nb.training import claim_run_folder


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--preset', default='cifar10-mulan'); p.add_argument('--repeats', type=int, default=3)
    a = p.parse_args()
    model = MuLAN.from_preset(a.preset)
    opt = torch.optim.AdamW(model.parameters())
    for q in model.parameters(): q.grad = torch.randn_like(q)
    opt.step()
    state = dict(model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(), step=1)
    n = sum(q.numel() for q in model.parameters())
    with tempfile.TemporaryDirectory(dir='.') as d:
        plain, ours = Path(d) / 'plain.pt', Path(d) / 'ours.pt'
        def plain_save():
            with open(plain, 'wb') as fh: torch.save(state, fh); fh.flush(); os.fsync(fh.fileno())
        rows = [('save', median_time(plain_save, a.repeats), median_time(lambda: save_checkpoint(ours, state), a.repeats)),
                ('load', median_time(lambda: torch.load(plain, weights_only=True), a.repeats), median_time(lambda: load_checkpoint(ours), a.repeats))]
        checksum = median_time(lambda: state_checksum(state), a.repeats)
        lock = median_time(lambda: claim_run_folder(Path(d) / 'run', resume=True, overwrite=False).close(), a.repeats)
        size = ours.stat().st_size / 2**20
    print(f"{a.preset}: {n / 1e6:.1f}M parameters, checkpoint {size:.0f} MiB, {torch.get_num_threads()} threads, median of {a.repeats}")
    print("| operation | plain (s) | mulan_nb (s) | ratio |\n|---|---|---|---|")
    for name, t_plain, t_ours in rows: print(f"| {name} | {t_plain:.3f} | {t_ours:.3f} | {t_ours / t_plain:.2f} |")
    print(f"| checksum alone | | {checksum:.3f} | |\n| lock + folder check (once per run) | | {lock * 1e3:.2f} ms | |")


if __name__ == '__main__': main()
