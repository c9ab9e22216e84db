"`experiments/long_runs.py`: the table of two runs' evaluation curves, the gap and the steps to reach, against hand-made logs."
import json, math, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))
import long_runs


def write_log(folder:Path, curve, se=0.01):
    folder.mkdir(parents=True)
    rows = [dict(kind='train', step=s, bpd=9.) for s, _ in curve] + [dict(kind='eval', step=s, bpd=b, se=se, n_t=8) for s, b in curve]
    (folder / 'metrics.jsonl').write_text('\n'.join(map(json.dumps, rows)) + '\n')


def test_the_table_gap_and_steps_to_reach_match_a_hand_computation(tmp_path):
    write_log(tmp_path / 'vdm-scalar-s0', [(100, 3.0), (200, 2.0), (300, 1.5)])
    write_log(tmp_path / 'mulan-s0', [(100, 2.8), (200, 1.9)], se=0.02)   # still running: one step behind
    out = tmp_path / 'res' / 'long'
    long_runs.main(['--runs', str(tmp_path), '--results', str(out), '--steps', '400'])
    s = json.loads(out.with_suffix('.json').read_text())
    assert s['last_common_step'] == 200 and [r['step'] for r in s['rows']] == [100, 200]
    assert [round(r['gap'], 12) for r in s['rows']] == [-0.2, -0.1] and math.isclose(s['rows'][0]['gap_se'], math.hypot(0.01, 0.02))
    # VDM reaches MuLAN's 1.9 (at step 200) between 200 (2.0) and 300 (1.5): 200 + 100 * 0.1 / 0.5 = 220, but only steps <= 200 count
    assert s['vdm-scalar_steps_to_reach_mulan'] is None
    # MuLAN reaches VDM's 2.0 between 100 (2.8) and 200 (1.9): 100 + 100 * 0.8 / 0.9
    assert math.isclose(s['mulan_steps_to_reach_vdm-scalar'], 100 + 100 * 0.8 / 0.9)
    assert s['reached'] == {'vdm-scalar': 300, 'mulan': 200} and s['finished'] == {'vdm-scalar': False, 'mulan': False}
    assert '| 200 | 2.0000 | 1.9000 | -0.1000 ±' in out.with_suffix('.md').read_text() and out.with_suffix('.png').stat().st_size > 1000


def test_a_run_killed_while_logging_is_read_up_to_its_torn_line(tmp_path):
    write_log(tmp_path / 'vdm-scalar-s0', [(100, 3.0), (200, 2.0)])
    write_log(tmp_path / 'mulan-s0', [(100, 2.8), (200, 1.9)])
    with open(tmp_path / 'mulan-s0' / 'metrics.jsonl', 'a') as f: f.write('{"kind": "eval", "step": 300, "bp')   # killed mid-line
    assert [r['step'] for r in long_runs.eval_curve(tmp_path / 'mulan-s0')] == [100, 200]


def test_a_missing_run_is_named(tmp_path):
    write_log(tmp_path / 'vdm-scalar-s0', [(100, 3.0)])
    r = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'long_runs.py'), '--runs', str(tmp_path), '--results', str(tmp_path / 'r')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"{tmp_path / 'mulan-s0' / 'metrics.jsonl'} is missing" in r.stderr
