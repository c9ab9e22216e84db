"""benchmarks/gpu_check.py on the CPU with its tiny preset: how CI runs the check a person runs on a CUDA machine."""
import itertools, math, os, re, subprocess, sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / 'benchmarks' / 'gpu_check.py'
COLUMNS = ['check', 'preset', 'batch', 'precision', 'compile', 'images/s', 'peak MiB', 'MuLAN/VDM', 'time (s)', 'NFE', 'result']


def table(stdout):
    "The rows of the one markdown table in `stdout`, as dicts by column."
    lines = [l for l in stdout.splitlines() if l.startswith('|')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header == COLUMNS, header
    assert set(lines[1]) <= set('|-')
    return [dict(zip(header, (c.strip() for c in l[1:-1].split(' | ')))) for l in lines[2:]]


def test_the_tiny_check_prints_one_complete_table_and_the_resume_is_exact():
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(SCRIPT), '--tiny'], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = table(r.stdout)
    presets = ['cifar10-vdm (tiny)', 'cifar10-mulan (tiny)']
    train = [x for x in rows if x['check'] == 'train']
    assert sorted((x['preset'], x['batch'], x['precision'], x['compile']) for x in train) == sorted(itertools.product(presets, ['4', '8'], ['fp32', 'tf32', 'bf16'], ['no', 'yes']))
    for x in train:
        if x['compile'] == 'yes':
            assert x['result'].startswith('skipped: torch.compile on the CPU'), x   # inductor takes minutes on a CPU
            continue
        seconds = float(x['time (s)'])
        assert seconds > 0, x
        rounding = int(x['batch']) * 5e-5 / seconds ** 2   # the time is printed to 4 decimals
        assert abs(float(x['images/s']) - int(x['batch']) / seconds) <= 0.5 + rounding + 1e-3 * int(x['batch']) / seconds, x   # images/s is batch / median step
        assert x['peak MiB'] == '–'                                                                           # no CUDA memory on the CPU
    for vdm, mulan in zip(train[::2], train[1::2]):                                                            # the pair of one setting
        assert (vdm['preset'], mulan['preset']) == tuple(presets) and vdm['MuLAN/VDM'] == ''
        if mulan['compile'] == 'no':
            m, v, h = float(mulan['time (s)']), float(vdm['time (s)']), 5e-5                               # times printed to 4 decimals
            assert (m - h) / (v + h) - 5e-4 - 1e-9 <= float(mulan['MuLAN/VDM']) <= (m + h) / (v - h) + 5e-4 + 1e-9, (vdm, mulan)   # the ratio of the unrounded medians, to 3 decimals
    elbo, ode = ([x for x in rows if x['check'] == c] for c in ('dense ELBO', 'ODE'))
    assert [x['preset'] for x in elbo] == presets == [x['preset'] for x in ode]
    for x in elbo: assert int(x['NFE']) == int(x['batch']) * 2 and math.isfinite(float(x['result'].split(' bpd')[0]))   # one call per image and draw
    for x in ode: assert int(x['NFE']) > 0 and float(x['time (s)']) > 0 and math.isfinite(float(x['result'].split(' bpd')[0]))
    (resume,) = [x for x in rows if x['check'] == 'resume']
    assert re.fullmatch(r'equal: max \|Δθ\| 0\.0e\+00 \(SIGKILL after the checkpoint of step (4|8) of 12\)', resume['result']), resume   # killed mid-run
    assert rows[-1]['check'] == '2 processes (NCCL)' and rows[-1]['result'].startswith('skipped'), rows[-1]
    assert len(rows) == 24 + 2 + 2 + 1 + 1
