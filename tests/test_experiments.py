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
            '--steps', '4', '--eval-every', '2', '--batch-size', '16', '--ode-images', '2', '--runs', str(runs), '--results', str(results)]
    compare(*args)
    summary = json.loads((results / 'blobs.json').read_text())
    assert summary['runs_done'] == summary['runs_planned'] == 4
    rows = {r['config']: r for r in summary['rows']}
    assert list(rows) == ['vdm-scalar', 'mulan']
    mean = lambda v: sum(v) / len(v)
    for name, row in rows.items():   # the summary against the runs' own files
        per_seed = [json.loads((runs / f'{name}-s{s}' / 'result.json').read_text())['test_bpd'] for s in (0, 1)]
        odes = [json.loads((runs / f'{name}-s{s}' / 'ode-truncnormal2-2.json').read_text()) for s in (0, 1)]
        assert row['per_seed'] == per_seed and math.isclose(row['test_bpd'], mean(per_seed))
        assert math.isclose(row['se_over_seeds'], abs(per_seed[0] - per_seed[1]) / 2)   # std/√n for n = 2
        assert all(len(o['ode']) == len(o['elbo']) == 2 and all(map(math.isfinite, o['ode'])) for o in odes)
        diffs = [mean(o['ode']) - mean(o['elbo']) for o in odes]   # paired per seed: the same images, the same model
        assert math.isclose(row['ode_bpd'], mean([mean(o['ode']) for o in odes]))
        assert math.isclose(row['ode_minus_elbo'], mean(diffs)) and math.isclose(row['ode_minus_elbo_se'], abs(diffs[0] - diffs[1]) / 2)
        assert [s for s, _ in row['mean_curve']] == [2, 4] and math.isclose(row['mean_curve'][-1][1], row['test_bpd'], rel_tol=1e-6)
        checked = [abs(e) for o in odes for e in o['solver_error']]   # both images of each seed solved again at a 10x tighter tolerance
        assert len(checked) == 4 and all(len(o['check_nfe']) == 2 for o in odes) and 'dopri5, rtol=1e-05' in odes[0]['note']
        assert math.isclose(row['ode_solver_error'], mean(checked)) and row['ode_solver_error_max'] == max(checked) and 0 < max(checked) < 0.5
    ratio = summary['steps_ratio']
    assert math.isclose(ratio['vdm_final_bpd'], rows['vdm-scalar']['test_bpd'])
    (s0, b0), (s1, b1) = rows['mulan']['mean_curve']
    target = ratio['vdm_final_bpd']
    reach = s0 if b0 <= target else s0 + (s1 - s0) * (b0 - target) / (b0 - b1) if b1 <= target else None
    assert ratio['mulan_steps_to_reach'] == reach or math.isclose(ratio['mulan_steps_to_reach'], reach)
    assert (results / 'blobs.md').read_text().count('| vdm-scalar |') == 1 and (results / 'blobs-gamma-maps.npz').exists()
    assert f"| {rows['mulan']['ode_solver_error']:.1e} / {rows['mulan']['ode_solver_error_max']:.1e} |" in (results / 'blobs.md').read_text()
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


def test_compare_refuses_a_runs_folder_of_other_settings(tmp_path):
    run = tmp_path / 'runs' / 'mulan-s0'
    run.mkdir(parents=True)
    (run / 'result.json').write_text(json.dumps(dict(steps=1000, data='digits', preset='digits-mulan')))
    err = compare('--configs', 'mulan', '--seeds', '0', '--steps', '2000', '--runs', str(tmp_path / 'runs'), '--results', str(tmp_path / 'results'), code=2)
    assert 'holds a finished run of 1000 steps of digits-mulan on digits, not 2000 steps' in err and len(err.strip().splitlines()) == 1, err
