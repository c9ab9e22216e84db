"Integration: `mulan_sample` from a checkpoint, and its bad input."
import numpy as np
import pytest
import torch
from mulan_nb.model import MuLAN
from mulan_nb.sampling import sample_main, sample
from conftest import run_cli as run


@pytest.fixture
def checkpoint(tiny_checkpoint): return tiny_checkpoint


def test_samples_are_integer_levels_in_a_png_and_npz(checkpoint, tmp_path):
    code, err = run(sample_main, [str(checkpoint), '--n', '6', '--steps', '5', '--out', str(tmp_path / 's')])
    assert code == 0, err
    data = np.load(tmp_path / 's.npz')
    assert data['samples'].shape == (6, 1, 8, 8) and data['samples'].max() < data['K'] == 17
    assert (tmp_path / 's.png').stat().st_size > 1000


def test_ode_sampler_gives_integer_levels(checkpoint, tmp_path):
    code, err = run(sample_main, [str(checkpoint), '--n', '3', '--sampler', 'ode', '--out', str(tmp_path / 'o')])
    assert code == 0, err
    data = np.load(tmp_path / 'o.npz')
    assert data['samples'].shape == (3, 1, 8, 8) and data['samples'].max() < 17


def test_same_seed_same_samples(checkpoint, tmp_path):
    for name in ('a', 'b'): run(sample_main, [str(checkpoint), '--n', '4', '--steps', '3', '--seed', '7', '--out', str(tmp_path / name)])
    assert (np.load(tmp_path / 'a.npz')['samples'] == np.load(tmp_path / 'b.npz')['samples']).all()


@pytest.mark.parametrize('args, words', [
    (['/nonexistent/checkpoint.pt'], 'checkpoint not found'),
    (['CKPT', '--n', '0'], '--n and --steps must be >= 1'),
    (['CKPT', '--steps', '-2'], '--n and --steps must be >= 1'),
    (['CKPT', '--n', 'many'], 'invalid int'),
    (['CKPT', '--sampler', 'ddim'], "invalid choice: 'ddim'"),
    (['CKPT', '--optimised-times'], 'holds no optimised sampling grid'),
])
def test_bad_input_exits_2_with_one_line(checkpoint, args, words):
    code, err = run(sample_main, [str(checkpoint) if a == 'CKPT' else a for a in args])
    assert code == 2 and err.count('\n') == 1 and words in err, err


@pytest.mark.parametrize('kw, words', [
    (dict(n=0), 'n and T must be >= 1'),
    (dict(T=0), 'n and T must be >= 1'),
    (dict(times=torch.tensor([0., 0.7, 0.5, 1.])), 'times must increase strictly'),
    (dict(times=torch.tensor([0.1, 0.5, 1.])), 'start at exactly 0'),
    (dict(times=torch.tensor([[0., 1.]])), '1-D floating tensor'),
    (dict(sampler='ddim'), "unknown sampler 'ddim'"),
    (dict(c=torch.zeros(4, 3)), 'latent c must have shape (4, 8)'),
    (dict(guidance=1.0), 'noise-condition dropout'),
    (dict(guidance=float('nan')), 'finite number'),
])
def test_sample_names_bad_input(kw, words):
    "The library function: a ValueError naming the problem (the model here has no null embedding, so guidance is refused)."
    model = MuLAN.from_preset('digits-mulan', channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=0).eval()
    with pytest.raises(ValueError) as e: sample(model, **{'n': 4, 'T': 3, **kw})
    assert words in str(e.value), e.value
