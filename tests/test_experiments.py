"Integration test of `experiments/compare.py` on a user's `.npy` image set: runs, summary, resume."
import json, math, subprocess, sys
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def compare(*args, code=0):
    r = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'compare.py'), *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == code, r.stderr[-3000:]
    return r.stderr if code else r.stdout


def test_compare_on_a_npy_set_summarises_its_runs_and_skips_them_when_run_again(tmp_path):
    np.save(tmp_path / 'blobs.npy', np.random.default_rng(0).integers(0, 4, (40, 8, 8)).astype(np.uint8))
    runs, results = tmp_path / 'runs', tmp_path / 'results'
    args = ['--data', str(tmp_path / 'blobs.npy'), '--levels', '4', '--configs', 'vdm-scalar', 'mulan', '--seeds', '0', '1',
            '--steps', '4', '--eval-every', '2', '--batch-size', '16', '--ode-images', '1', '--runs', str(runs), '--results', str(results)]
    compare(*args)
    summary = json.loads((results / 'blobs.json').read_text())
    assert summary['runs_done'] == summary['runs_planned'] == 4
    rows = {r['config']: r for r in summary['rows']}
    assert list(rows) == ['vdm-scalar', 'mulan']
    for name, row in rows.items():   # the summary against the runs' own files
        per_seed = [json.loads((runs / f'{name}-s{s}' / 'result.json').read_text())['test_bpd'] for s in (0, 1)]
        odes = [json.loads((runs / f'{name}-s{s}' / 'ode-truncnormal2-1.json').read_text())['ode'][0] for s in (0, 1)]
        assert row['per_seed'] == per_seed and math.isclose(row['test_bpd'], sum(per_seed) / 2)
        assert math.isclose(row['se_over_seeds'], abs(per_seed[0] - per_seed[1]) / 2)   # std/√n for n = 2
        assert row['ode_per_seed'] == odes and all(math.isfinite(v) for v in odes)
        assert [s for s, _ in row['mean_curve']] == [2, 4]
    assert (results / 'blobs.md').read_text().count('| vdm-scalar |') == 1 and (results / 'blobs-gamma-maps.npz').exists()
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob('*')}
    compare(*args)   # everything is done: nothing is trained or solved again, and the summary is the same
    assert {p: p.stat().st_mtime_ns for p in runs.rglob('*')} == stamps
    again = json.loads((results / 'blobs.json').read_text())
    assert again['rows'] == summary['rows']


def test_compare_names_bad_data_in_one_line(tmp_path):
    np.save(tmp_path / 'few.npy', np.zeros((20, 8, 8), dtype=np.uint8) + np.arange(20, dtype=np.uint8)[:, None, None] % 4)
    err = compare('--data', str(tmp_path / 'few.npy'), '--levels', '4', '--configs', 'mulan', '--seeds', '0', '--steps', '2',
                  '--runs', str(tmp_path / 'runs'), '--results', str(tmp_path / 'results'), code=2)
    assert err.strip().splitlines() == ['compare.py: error: batch size 64 is larger than the training set (18 images)'], err
