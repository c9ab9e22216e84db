"Integration: `mulan_sample` from a checkpoint, and its bad input."
import numpy as np
import pytest
import torch
from mulan_nb.diffusion import alpha_sigma
from mulan_nb.model import MuLAN, model_from_checkpoint
from mulan_nb.sampling import sample
from mulan_nb.cli import sample_main
from conftest import run_cli as run


@pytest.fixture
def checkpoint(tiny_checkpoint): return tiny_checkpoint


def nearest_level(z0, gamma0, K):
    "The decoder's most likely level, computed without `decoder_logprobs`: the level k whose α_0 f_k is nearest to z_0 (f_k = 2(k + 1/2)/K - 1)."
    alpha0, _ = alpha_sigma(torch.as_tensor(gamma0, dtype=z0.dtype))
    return ((z0 / alpha0 + 1) * K / 2 - 0.5).round().clamp(0, K - 1).long()


def library_samples(checkpoint, n, seed, **kw):
    "`sample` on the checkpoint's EMA weights with a fresh generator: what the command must write. Returns (levels, z_0, γ(0))."
    model, _ = model_from_checkpoint(checkpoint)
    assert model.schedule.fixed_ends   # so γ(c, 0) = γ_min whatever c the sampler drew
    x, z0 = sample(model.eval(), n, generator=torch.Generator().manual_seed(seed), return_z0=True, **kw)
    return x, z0, model.schedule.gamma_min


def check_decoded(x, z0, gamma0, K):
    "x is the nearest level to z_0 everywhere, and the comparison is not decided by the clamp alone."
    assert torch.equal(x, nearest_level(z0, gamma0, K))
    assert ((x > 0) & (x < K - 1)).float().mean() > 0.2, x.unique()


@pytest.mark.parametrize('sampler, args', [('ancestral', ['--steps', '5']), ('ode', ['--sampler', 'ode'])])
def test_the_command_writes_the_library_samples_decoded_to_the_nearest_level(checkpoint, tmp_path, sampler, args):
    "The .npz holds exactly what `sample` gives for the command's seed, steps, sampler and EMA weights, and each level is the one nearest to z_0."
    code, err = run(sample_main, [str(checkpoint), '--n', '6', *args, '--out', str(tmp_path / 's')])
    assert code == 0, err
    data = np.load(tmp_path / 's.npz')
    assert data['samples'].shape == (6, 1, 8, 8) and data['samples'].dtype == np.uint8 and data['K'] == 17 and data['seed'] == 0
    x, z0, gamma0 = library_samples(checkpoint, 6, seed=0, sampler=sampler, **(dict(T=5) if sampler == 'ancestral' else {}))
    assert np.array_equal(data['samples'], x.numpy())
    check_decoded(x, z0, gamma0, 17)
    assert (tmp_path / 's.png').stat().st_size > 1000


@pytest.mark.parametrize('sampler', ['ancestral', 'ode'])
def test_the_seed_alone_decides_the_samples(checkpoint, tmp_path, sampler):
    "Same --seed: the same samples, whatever the global RNG's state (the command's generator drives every draw); another --seed: other samples."
    def draw(name, seed, global_seed):
        torch.manual_seed(global_seed)
        code, err = run(sample_main, [str(checkpoint), '--n', '4', '--steps', '3', '--sampler', sampler, '--seed', str(seed), '--out', str(tmp_path / name)])
        assert code == 0, err
        return np.load(tmp_path / f'{name}.npz')['samples']
    a, b, c = draw('a', 7, global_seed=0), draw('b', 7, global_seed=1), draw('c', 8, global_seed=0)
    assert np.array_equal(a, b), 'the same seed gave different samples: something draws from the global RNG'
    assert not np.array_equal(a, c), 'another seed gave the same samples: the seed is ignored'


@pytest.mark.parametrize('args, words', [
    (['/nonexistent/checkpoint.pt'], 'checkpoint not found'),
    (['CKPT', '--n', '0'], 'argument --n: must be >= 1'),
    (['CKPT', '--steps', '-2'], 'argument --steps: must be >= 1'),
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
