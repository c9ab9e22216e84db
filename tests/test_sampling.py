"Integration: `mulan_sample` from a checkpoint, and its bad input."
import contextlib, io
import numpy as np
import pytest
from mulan_nb.training import main as train_main
from mulan_nb.sampling import sample_main

TINY = ['--no-progress', '--batch-size', '16', '--eval-every', '0', '--final-n-t', '1', '--samples', '0',
        '--set', 'channels=8', 'n_blocks=1', 'encoder_channels=8', 'encoder_blocks=1']


def run(fn, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: code = fn(args)
        except SystemExit as e: code = e.code
    return code, err.getvalue()


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    assert run(train_main, ['--out', str(out), '--steps', '3', *TINY])[0] == 0
    return out / 'checkpoint.pt'


def test_samples_are_integer_levels_in_a_png_and_npz(checkpoint, tmp_path):
    code, err = run(sample_main, [str(checkpoint), '--n', '6', '--steps', '5', '--out', str(tmp_path / 's')])
    assert code == 0, err
    data = np.load(tmp_path / 's.npz')
    assert data['samples'].shape == (6, 1, 8, 8) and data['samples'].max() < data['K'] == 17
    assert (tmp_path / 's.png').stat().st_size > 1000


def test_same_seed_same_samples(checkpoint, tmp_path):
    for name in ('a', 'b'): run(sample_main, [str(checkpoint), '--n', '4', '--steps', '3', '--seed', '7', '--out', str(tmp_path / name)])
    assert (np.load(tmp_path / 'a.npz')['samples'] == np.load(tmp_path / 'b.npz')['samples']).all()


@pytest.mark.parametrize('args, words', [
    (['/nonexistent/checkpoint.pt'], 'checkpoint not found'),
    (['CKPT', '--n', '0'], '--n and --steps must be >= 1'),
    (['CKPT', '--steps', '-2'], '--n and --steps must be >= 1'),
    (['CKPT', '--n', 'many'], 'invalid int'),
])
def test_bad_input_exits_2_with_one_line(checkpoint, args, words):
    code, err = run(sample_main, [str(checkpoint) if a == 'CKPT' else a for a in args])
    assert code == 2 and err.count('\n') == 1 and words in err, err
