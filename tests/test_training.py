"""Integration tests of `mulan_train`: bad input, SIGKILL and resume, DistributedDataParallel under torchrun (one machine and two).

Bad input tried here (each must exit with code 2 and one line on stderr):
unknown preset; zero steps; negative learning rate; batch larger than the data set; batch not divisible by
processes × accum; missing .npy file; missing torchvision root; unknown data set; unwritable output folder;
unknown model field in --set; model field out of range in --set; --resume without a checkpoint; resume with
a checkpoint of another preset; an unknown precision; a non-integer step count.
"""
import json, os, random, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest, torch
from mulan_nb.cli import train_main as main
from mulan_nb.model import load_checkpoint
from conftest import run_cli

TINY = ['--set', 'channels=8', 'n_blocks=1', 'encoder_channels=8', 'encoder_blocks=1',
        '--batch-size', '16', '--eval-every', '0', '--final-n-t', '1', '--samples', '0', '--no-progress', '--lr', '2e-3']


def run_main(args): return run_cli(main, args)


@pytest.mark.parametrize('args, words', [
    (['--preset', 'nope'], 'unknown preset'),
    (['--steps', '0'], 'steps'),
    (['--lr', '-1'], 'learning rate'),
    (['--batch-size', '5000'], 'larger than the training set'),
    (['--batch-size', '15', '--accum', '2'], 'divisible'),
    (['--data', '/nonexistent/x.npy'], 'not found'),
    (['--data', 'mnist', '--root', '/nonexistent'], 'not found under /nonexistent'),
    (['--data', 'imagenet'], 'unknown data set'),
    (['--set', 'bogus=1'], '--set takes KEY=VALUE'),
    (['--set', 'channels=0'], 'channels'),
    (['--resume'], 'checkpoint not found'),
    (['--precision', 'fp16'], 'invalid choice'),
    (['--steps', 'ten'], 'invalid int'),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    code, err = run_main(['--out', str(tmp_path / 'run'), *args])
    assert code == 2, err
    assert err.count('\n') == 1 and words in err, err


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / 'file'; blocker.write_text('')
    code, err = run_main(['--out', str(blocker / 'run'), '--steps', '1', *TINY])
    assert code == 2 and err.count('\n') == 1 and 'not writable' in err, err


def test_resume_from_another_preset_is_refused(tmp_path):
    assert run_main(['--out', str(tmp_path), '--steps', '2', *TINY])[0] == 0
    code, err = run_main(['--out', str(tmp_path), '--steps', '4', '--resume', '--preset', 'digits-vdm', *TINY])
    assert code == 2 and 'cannot resume' in err and "preset 'digits-mulan' -> 'digits-vdm'" in err and 'model.schedule' in err, err


def cli(*args):
    return [sys.executable, '-c', 'import sys; from mulan_nb.cli import train_main; sys.exit(train_main())', *args]


def params(path):
    return load_checkpoint(path)['model']


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sigkill_and_resume_reach_the_same_parameters(tmp_path):
    "Three runs killed with SIGKILL at random moments and resumed end where an uninterrupted run ends."
    steps = ['--steps', '60', '--ckpt-every', '5']
    subprocess.run(cli('--out', str(tmp_path / 'ref'), *steps, *TINY), check=True, capture_output=True)
    ref = params(tmp_path / 'ref' / 'checkpoint.pt')
    rng = random.Random(0)
    for i in range(3):
        out = tmp_path / f'killed{i}'
        proc = subprocess.Popen(cli('--out', str(out), *steps, *TINY), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (out / 'checkpoint.pt').exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL); proc.wait()
        killed_at = load_checkpoint(out / 'checkpoint.pt')['step']
        subprocess.run(cli('--out', str(out), *steps, *TINY, '--resume'), check=True, capture_output=True)
        diff = max_diff(ref, params(out / 'checkpoint.pt'))
        print(f'kill {i}: last checkpoint at step {killed_at}, max |Δθ| after resuming to 60: {diff:.2e}')
        assert diff <= 1e-6


def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(tmp_path):
    "Killed during the final evaluation: --resume with the same --steps evaluates and writes result.json; fewer steps is refused."
    args = ['--out', str(tmp_path / 'run'), '--steps', '3', *TINY]
    assert run_main(args)[0] == 0
    first = json.loads((tmp_path / 'run' / 'result.json').read_text())
    (tmp_path / 'run' / 'result.json').unlink()
    code, err = run_main([*args, '--resume'])
    assert code == 0, err
    again = json.loads((tmp_path / 'run' / 'result.json').read_text())
    assert again['steps'] == 3 and again['test_bpd'] == first['test_bpd']   # same weights, same seeded evaluation
    code, err = run_main(['--out', str(tmp_path / 'run'), '--steps', '2', *TINY, '--resume'])
    assert code == 2 and 'beyond --steps 2' in err, err


def torchrun(*options):
    return [sys.executable, '-m', 'torch.distributed.run', *options, '--no-python']


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0)); return s.getsockname()[1]


@pytest.mark.parametrize('preset, accum, launch', [
    ('digits-mulan', 1, 'standalone'),           # DDP's mean over 2 processes of one shard each
    ('digits-vdm', 2, 'standalone, resumed'),    # 2 shards per process, the first under no_sync; stopped after step 3, resumed to 5
    ('digits-mulan', 1, 'two machines'),         # torchrun's c10d rendezvous: 2 launchers ("machines") of 1 process each
])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, preset, accum, launch):
    "torchrun with 2 CPU processes (gloo, DistributedDataParallel) against one process with the same 2 × accum shards: same parameters after 5 steps."
    common = ['--preset', preset, '--ckpt-every', '5', *TINY]
    subprocess.run(cli('--out', str(tmp_path / 'single'), '--accum', str(2 * accum), '--steps', '5', *common), check=True, capture_output=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    ddp = cli('--out', str(tmp_path / 'ddp'), '--accum', str(accum), *common)
    if launch == 'two machines':
        rdzv = ['--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'localhost:{free_port()}', '--rdzv-id', 'test']
        machines = [subprocess.Popen(torchrun(*rdzv) + ddp + ['--steps', '5'], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        runs = [(m.communicate(timeout=600)[1], m.returncode) for m in machines]
    else:
        stops = [3, 5] if 'resumed' in launch else [5]
        runs = [(r.stderr, r.returncode) for r in (subprocess.run(torchrun('--standalone', '--nproc-per-node', '2') + ddp + ['--steps', str(n), *(['--resume'] if i else [])],
                                                                   env=env, capture_output=True, text=True) for i, n in enumerate(stops))]
    for err, code in runs: assert code == 0, err[-2000:]
    diff = max_diff(params(tmp_path / 'single' / 'checkpoint.pt'), params(tmp_path / 'ddp' / 'checkpoint.pt'))
    print(f'{preset}, 2 processes ({launch}) × accum {accum} vs 1 process × accum {2 * accum}: max |Δθ| = {diff:.2e}')
    assert diff <= 1e-5


def test_online_sampling_grid_is_optimised_stored_and_resumed(tmp_path):
    "Algorithm 2 as a training option: the grid moves after the warm-up, stays a valid grid, and a resumed run reaches the same grid."
    grid_args = ['--optimise-times-every', '2', '--optimise-times-warmup', '1', '--samples', '4']
    code, err = run_main(['--out', str(tmp_path / 'a'), '--steps', '6', *TINY, *grid_args])
    assert code == 0, err
    state = load_checkpoint(tmp_path / 'a' / 'checkpoint.pt')['sampling_times']
    times = state['times']
    assert state['n_updates'] == 3 and len(times) == 101 and times[0] == 0 and times[-1] == 1 and (times.diff() > 0).all()
    assert (times - torch.linspace(0, 1, 101)).abs().max() > 1e-3   # it moved
    assert run_main(['--out', str(tmp_path / 'b'), '--steps', '4', *TINY, *grid_args, '--ckpt-every', '4'])[0] == 0
    assert run_main(['--out', str(tmp_path / 'b'), '--steps', '6', *TINY, *grid_args, '--resume'])[0] == 0
    resumed = load_checkpoint(tmp_path / 'b' / 'checkpoint.pt')['sampling_times']
    assert resumed['n_updates'] == 3 and torch.allclose(resumed['times'], times, atol=1e-6)
    from mulan_nb.cli import sample_main
    code, err = run_cli(sample_main, [str(tmp_path / 'a' / 'checkpoint.pt'), '--optimised-times', '--n', '3', '--out', str(tmp_path / 's')])
    assert code == 0 and (tmp_path / 's.npz').exists(), err
