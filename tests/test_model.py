"Integration: the model learns, and its public entry points reject bad input with clear messages."
import math, time
import pytest, torch
from sklearn.datasets import load_digits
from mulan_nb.model import MuLAN, MuLANConfig, PRESETS
from mulan_nb.schedules import PolynomialSchedule


def digits(n=64):
    return torch.from_numpy(load_digits().images[:n]).long()[:, None]


def eval_bpd(model, x, reps=16):
    "Mean NELBO over `reps` stratified draws per image, fixed seed: a low-variance number to compare."
    torch.manual_seed(123)
    model.eval()
    with torch.no_grad(): return torch.stack([model.nelbo(x)['bpd'] for _ in range(reps)]).mean().item()


def test_300_adamw_steps_lower_digits_mulan_bpd_by_30_percent():
    torch.manual_seed(0)
    x = digits(64)
    model = MuLAN.from_preset('digits-mulan')
    before = eval_bpd(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    t0 = time.perf_counter()
    model.train()
    for _ in range(300):
        opt.zero_grad()
        model.nelbo(x)['bpd'].mean().backward()
        opt.step()
    seconds = time.perf_counter() - t0
    after = eval_bpd(model, x)
    print(f'bpd {before:.3f} -> {after:.3f} in {seconds:.1f}s')
    assert after <= 0.7 * before, (before, after)


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_every_preset_builds_and_bounds_a_small_batch(name):
    cfg = MuLANConfig(**PRESETS[name])
    if cfg.data_shape[1] > 8:  # keep the big presets' depth, shrink only the test batch and width of the heavy parts
        cfg = MuLANConfig(**{**PRESETS[name], 'n_blocks': 1, 'channels': 32, 'encoder_channels': 32})
    model = MuLAN(cfg)
    out = model.nelbo(torch.randint(0, cfg.K, (2, *cfg.data_shape)))
    assert set(out) == {'bpd', 'diffusion', 'recon', 'prior', 'latent'} and all(v.shape == (2,) for v in out.values())
    assert torch.isfinite(out['bpd']).all()


@pytest.mark.parametrize('bad, words', [
    (lambda x: x.float(), 'dtype'),
    (lambda x: x.double() / 16, 'dtype'),
    (lambda x: x[:, :, :7], 'shape'),
    (lambda x: x[0], 'shape'),
    (lambda x: x.reshape(len(x), 64), 'shape'),
    (lambda x: x + 17, '[0, 17)'),
    (lambda x: x - 1, '[0, 17)'),
    (lambda x: x[:0], 'non-empty'),
    (lambda x: x.numpy(), 'torch.Tensor'),
])
def test_bad_images_get_a_value_error_naming_the_problem(bad, words):
    model = MuLAN.from_preset('digits-mulan')
    with pytest.raises(ValueError, match=words.replace('[', r'\[').replace(')', r'\)')):
        model.nelbo(bad(digits(4)))


def test_latent_of_the_wrong_size_is_named():
    s = PolynomialSchedule((1, 8, 8), latent_dim=8)
    with pytest.raises(ValueError, match=r'latent c must have shape'):
        s(torch.rand(4), torch.randn(4, 9))
    model = MuLAN.from_preset('digits-mulan')
    with pytest.raises(ValueError, match=r'latent c must have shape'):
        model.predict_eps(torch.randn(4, 1, 8, 8), torch.zeros(4, 1, 1, 1), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r'latent c must have shape'):
        model.check_latent(torch.randn(4, 3), 4)


@pytest.mark.parametrize('field, value, words', [
    ('schedule', 'cosine', 'unknown schedule'), ('latent', 'vq', 'unknown latent'), ('K', 1, 'K'),
    ('latent_k', 50, 'latent_k'), ('prediction', 'x', 'prediction'), ('T', -1, 'T'), ('dropout', 1.5, 'dropout'),
    ('data_shape', (8, 8), 'data_shape'), ('gamma_min', 6.0, 'gamma_min'), ('kl', 'none', 'kl'),
])
def test_config_values_out_of_range_are_named(field, value, words):
    with pytest.raises(ValueError, match=words):
        MuLAN.from_preset('digits-mulan-topk', **{field: value})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match='digits-mulan'):
        MuLAN.from_preset('imagenet64-mulan')
