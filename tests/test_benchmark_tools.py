"""tools/photo_patches.py (the CIFAR-shaped stand-in of issue 18's benchmark), benchmarks/ode_solvers.py's --jobs and benchmarks/field_cost.py."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import torch
from sklearn.datasets import load_sample_images
from mulan_nb.data import load_data

REPO = Path(__file__).parents[1]


def where(crop, photos):
    "Every (photo, row, column, mirrored) at which the C×s×s crop is a window of a photo."
    found, side = [], crop.shape[-1]
    for i, photo in enumerate(photos):
        windows = np.lib.stride_tricks.sliding_window_view(photo, (side, side), axis=(0, 1))   # H', W', 3, s, s
        for mirrored, c in ((False, crop), (True, crop[:, :, ::-1])):
            ys, xs = np.nonzero((windows[:, :, :, 0, 0] == c[:, 0, 0]).all(-1))   # candidates by the top-left pixel
            found += [(i, y, x, mirrored) for y, x in zip(ys, xs) if (windows[y, x] == c).all()]
    return found


def test_photo_patches_are_crops_of_the_photos_with_test_columns_unseen_in_training(tmp_path):
    out = tmp_path / 'patches.npz'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'photo_patches.py'), '--out', str(out), '--train', '40', '--test', '6'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train, test = (load_data(str(out), split).images for split in ('train', 'test'))
    assert tuple(train.shape) == (40, 3, 32, 32) and tuple(test.shape) == (6, 3, 32, 32) and train.dtype == test.dtype == torch.uint8
    photos = load_sample_images().images
    width = photos[0].shape[1]
    for crop in test.numpy():
        hits = where(crop, photos)
        assert hits and all(x >= 0.75 * width and not m for _, _, x, m in hits), hits     # from the right quarter, never mirrored
    hits = [where(crop, photos) for crop in train.numpy()[:10]]
    assert all(h and all(x + 32 <= 0.75 * width for _, _, x, _ in h) for h in hits), hits   # wholly left of the test columns
    assert any(m for h in hits for _, _, _, m in h)                                        # some are mirrored (p = 1 - 2^-10)


def test_photo_patches_names_bad_counts(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'photo_patches.py'), '--out', str(tmp_path / 'x.npz'), '--test', '0'], capture_output=True, text=True)
    assert r.returncode == 2 and '--train, --test and --side must be >= 1' in r.stderr and not (tmp_path / 'x.npz').exists()


def test_ode_solvers_in_two_processes_measures_what_one_does(tiny_checkpoint, tmp_path):
    "The seeds' problems, NFE and errors do not depend on whether they run in one process or two."
    def bench(jobs):
        out = tmp_path / f'jobs{jobs}.json'
        args = ['--checkpoint', str(tiny_checkpoint), '--images', '2', '--seeds', '0', '1', '--jobs', str(jobs), '--threads', '1', '--rtol', '1e-3',
                '--reference-tol', '1e-5', '--options', 'bosh3, separate norm, t', '--sweep', '1e-2', '--sweep-options', 'bosh3, separate norm, t', '--out', str(out)]
        r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'ode_solvers.py'), *args], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(out.read_text())
    one, two = bench(1), bench(2)
    assert (one['jobs'], two['jobs']) == (1, 2)
    assert [r['logp'] for r in one['reference']['runs']] == [r['logp'] for r in two['reference']['runs']]
    assert [(r['name'], r['nfe'], r['err']) for r in one['table']] == [(r['name'], r['nfe'], r['err']) for r in two['table']]
    assert [(s['seed'], s['nfe'], s['err']) for s in one['sweep']] == [(s['seed'], s['nfe'], s['err']) for s in two['sweep']]
    seeds = [r['seed'] for r in two['reference']['runs']]
    assert seeds == [0, 1] and two['reference']['runs'][0]['logp'] != two['reference']['runs'][1]['logp']   # two problems, in order


def test_field_cost_prints_both_evaluations_and_the_ratio_of_their_medians():
    args = ['--preset', 'digits-mulan', '--set', 'channels=8', 'n_blocks=1', '--images', '2', '--repeats', '3']
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'field_cost.py'), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l.strip('|').split('|') for l in r.stdout.splitlines() if l.startswith('| ') and 'ms' not in l]
    assert [name.strip() for name, *_ in rows] == ['ours (velocity_and_divergence)', 'official way (vjp of the velocity)'], r.stdout
    (ours, ours_min), (official, official_min) = ([float(v) for v in rest] for _, *rest in rows)
    assert 0 < ours_min <= ours and 0 < official_min <= official
    ratio = float(r.stdout.split('ours / official way (medians):')[1])
    h = 0.05   # the medians are printed to 0.1 ms
    assert (ours - h) / (official + h) - 5e-4 <= ratio <= (ours + h) / (official - h) + 5e-4, (ours, official, ratio)


def test_field_cost_names_bad_input():
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'field_cost.py'), '--set', 'channels=wide'], capture_output=True, text=True)
    assert r.returncode == 2 and 'KEY=INTEGER' in r.stderr
