"""Importance-sampled time (`--time-sampling importance`, nbs/12_training.ipynb): the option through `mulan_train`, a bad
value, the resume that switches it, and DistributedDataParallel (the proposal's statistics all-reduced, so that 2
processes train as one process with the same 2 shards); and experiments/importance_time.py on tiny settings."""
import json, math, os, statistics, subprocess, sys
from pathlib import Path
import torch
from mulan_nb.cli import train_main as main
from mulan_nb.model import load_checkpoint
from conftest import run_cli

TINY = ['--set', 'channels=8', 'n_blocks=1', 'encoder_channels=8', 'encoder_blocks=1',
        '--batch-size', '16', '--eval-every', '0', '--final-n-t', '1', '--samples', '0', '--no-progress', '--lr', '2e-3']
IMPORTANCE = ['--time-sampling', 'importance', '--time-bins', '4', '--time-warmup', '2']


def test_bad_value_is_one_line():
    code, err = run_cli(main, ['--time-sampling', 'importants', '--steps', '1', *TINY])
    assert code == 2 and err.count('\n') == 1 and "time_sampling must be 'uniform' or 'importance'" in err, err
    code, err = run_cli(main, ['--time-mix', '0', '--steps', '1', *TINY])
    assert code == 2 and err.count('\n') == 1 and 'time_mix' in err, err


def test_option_is_used_stored_and_switching_it_on_resume_is_refused(tmp_path):
    out = tmp_path / 'run'
    code, err = run_cli(main, ['--out', str(out), '--steps', '4', *TINY, *IMPORTANCE])
    assert code == 0, err
    state = load_checkpoint(out / 'checkpoint.pt')
    assert state['train']['time_sampling'] == 'importance' and state['time_proposal']['updates'] == 4
    density = json.loads((out / 'result.json').read_text())['time_proposal']['density']
    assert len(density) == 4 and abs(sum(density) / 4 - 1) < 1e-9 and min(density) >= 0.1 and max(density) > 1   # not uniform after warm-up
    code, err = run_cli(main, ['--out', str(out), '--steps', '6', '--resume', *TINY])
    assert code == 2 and "time_sampling 'importance' -> 'uniform'" in err and err.count('\n') == 1, err


def cli(*args):
    return [sys.executable, '-c', 'import sys; from mulan_nb.cli import train_main; sys.exit(train_main())', *args]


def test_two_processes_match_one_with_importance_sampled_time(tmp_path):
    "torchrun with 2 CPU processes (gloo) against one process with accum 2: same parameters and proposal after 5 steps (3 with the proposal)."
    common = ['--steps', '5', '--ckpt-every', '5', *TINY, *IMPORTANCE]
    subprocess.run(cli('--out', str(tmp_path / 'single'), '--accum', '2', *common), check=True, capture_output=True)
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '--no-python',
                          *cli('--out', str(tmp_path / 'ddp'), *common)], env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = (load_checkpoint(tmp_path / d / 'checkpoint.pt') for d in ('single', 'ddp'))
    diff = max((a['model'][k].float() - b['model'][k].float()).abs().max().item() for k in a['model'])
    assert diff <= 1e-5, diff
    assert torch.equal(a['time_proposal']['seen'], b['time_proposal']['seen'])
    assert torch.allclose(a['time_proposal']['second_moment'], b['time_proposal']['second_moment'], rtol=1e-9, atol=0)


def test_the_script_measures_and_summarises_over_seeds_and_resumes_without_retraining(tmp_path):
    "experiments/importance_time.py on tiny settings: (a) per training seed and over seeds, (b) paired by seed; a second call recomputes nothing."
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    args = ['--steps', '3', '--seeds', '0', '1', '--eval-every', '3', '--eval-n-t', '1', '--final-n-t', '1', '--fit-batches', '2', '--fixed-batches', '1',
            '--draws', '4', '--bootstrap', '5', '--variance-seeds', '0', '1', '--runs', str(runs), '--results', str(results), '--reuse', '']
    script = Path(__file__).resolve().parents[1] / 'experiments' / 'importance_time.py'
    def call(*extra):
        r = subprocess.run([sys.executable, script, *args, *extra], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=600)
        return r, json.loads((results / 'importance-time.json').read_text()) if r.returncode == 0 else None
    r, first = call()
    assert r.returncode == 0, r.stderr[-2000:]
    assert first['runs_done'] == 8 and {c: sorted(v) for c, v in first['variance_seeds'].items()} == {'vdm': ['0', '1'], 'mulan': ['0', '1']}
    made = {f: f.stat().st_mtime_ns for f in runs.rglob('*') if f.name in ('result.json', 'checkpoint.pt') or f.name.startswith('variance-')}
    assert len(made) == 8 * 2 + 4
    r, s = call()
    assert r.returncode == 0 and {f: f.stat().st_mtime_ns for f in made} == made and s['variance_seeds'] == first['variance_seeds']   # nothing trained or measured again
    assert set(s['variance_over_seeds']) == set(s['importance_minus_uniform']) == {'vdm', 'mulan'}
    for c, o in s['variance_over_seeds'].items():
        ratios = [s['variance_seeds'][c][k]['ratio'] for k in ('0', '1')]
        assert o['ratios'] == ratios and math.isclose(o['ratio'], statistics.fmean(ratios)) and math.isclose(o['se_over_seeds'], abs(ratios[0] - ratios[1]) / 2)
        assert [s['variance_seeds'][c][k]['training_seed'] for k in ('0', '1')] == [0, 1]
        assert [s['variance_seeds'][c][k]['checkpoint'] for k in ('0', '1')] == [str(runs / f'{c}-uniform-s{k}' / 'checkpoint.pt') for k in (0, 1)]   # each seed's own uniform-t run
    by = {(r['config'], r['sampling']): dict(zip(r['seeds'], r['per_seed'])) for r in s['rows']}
    for c, d in s['importance_minus_uniform'].items():
        assert d['seeds'] == [0, 1] and math.isclose(d['importance_minus_uniform'], statistics.fmean(by[c, 'importance'][k] - by[c, 'uniform'][k] for k in (0, 1)))
    assert 'Over the training seeds' in (results / 'importance-time.md').read_text()
    r, _ = call('--variance-seeds', '2')
    assert r.returncode == 2 and 'not among --seeds' in r.stderr, r.stderr
