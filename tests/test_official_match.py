"""The official MuLAN and VDM code, output for output (issue 15). Tiny models built, perturbed and run by the authors' own
Flax code (tests/fixtures/official, made by tools/official_fixture.py; no JAX here) are converted with
`convert_official` and must reproduce every recorded output: γ(c, t) and γ', the encoder's logits, the top-k noise, latent
and KL, the score network's output, each NELBO term as the official code counts it, the probability-flow drift; within
1e-5 relative in float32 and 1e-10 in float64 (relative: the largest error over the largest official value). The real
CIFAR-10 and ImageNet-32 parameter lists convert with nothing missing or left over. `pytest -s` prints the errors."""
import functools, json, math, tarfile, time
from pathlib import Path
import numpy as np
import pytest, torch
from mulan_nb.official import convert_official, read_official_checkpoint
from mulan_nb.latents import sum_of_gamma_noise
from mulan_nb.pf_ode import pf_velocity

FIXTURES = Path(__file__).parent / 'fixtures' / 'official'
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [pytest.param(torch.float32, id='float32'), pytest.param(torch.float64, id='float64')]
SHAPE = (3, 8, 6)   # the fixtures' images: C, H, W (H != W on purpose)


@functools.cache
def fixture(name):
    with np.load(FIXTURES / name) as d: return {k: d[k] for k in d.files}


def nested(arrays, prefix='params/'):
    "The flat `params/a/b` arrays as the nested dict the checkpoint reader returns."
    tree = {}
    for key, value in arrays.items():
        if not key.startswith(prefix): continue
        *path, leaf = key[len(prefix):].split('/')
        node = tree
        for p in path: node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def official(arrays, dtype):
    "Look-up of the official outputs in `dtype`: the `f64/` run for float64 (the same parameters and draws), else the float32 run."
    def get(key):
        a = arrays[f'f64/{key}'] if dtype == torch.float64 and f'f64/{key}' in arrays else arrays[key]
        return torch.from_numpy(np.asarray(a, np.float64 if dtype == torch.float64 else np.float32))
    return get


def official_times(arrays, dtype):
    "t = (t0 + [0, 1/B, ...]) mod 1 as the official code computes it, in `dtype` (the float64 run recomputes it from the same t0)."
    if dtype == torch.float32: return torch.from_numpy(arrays['inputs/t'])
    return torch.from_numpy(np.mod(np.float64(arrays['draws/t0']) + np.arange(0., 1., 1 / len(arrays['inputs/t'])), 1.))


nchw, nhwc = (lambda a: a.permute(0, 3, 1, 2)), (lambda a: a.permute(0, 2, 3, 1))
hwc = lambda g: nhwc(g).reshape(len(g), -1)   # a (B, C, H, W) γ as the official code flattens it


def replay_draws(monkeypatch, normals, gammas=()):
    "Make the model's draws return the official ones, in the order mulan_nb draws them (the Gamma terms of the top-k noise, then ε, then ε₀)."
    normals, gammas = list(normals), list(gammas)
    def pop(queue, like, what):
        assert queue, f"mulan_nb drew one {what} more than the official code"
        want = queue.pop(0)
        assert tuple(want.shape) == tuple(like.shape), f"{what}: mulan_nb draws {tuple(like.shape)}, the official code {tuple(want.shape)}"
        return want.to(like.dtype)
    monkeypatch.setattr(torch, 'randn_like', lambda x, **kw: pop(normals, x, 'normal draw'))
    monkeypatch.setattr(torch, '_standard_gamma', lambda alpha, generator=None: pop(gammas, alpha, 'Gamma draw'))
    return normals, gammas


def relative_error(ours, ref): return ((ours - ref).abs().max() / ref.abs().max()).item()


class Errors:
    """Max relative errors of our outputs against the official ones, printed as a table; fails on any above its tolerance.
    float64: against the official float64 run, tolerance 1e-10. float32: against the official float32 run, tolerance 1e-5,
    or three times the official float32 output's own error (against its float64 run) where that is larger: the Fourier
    features sin(2π·2⁷z) and sums of cancelling terms (the prior KL, the diffusion loss) lose up to 4e-5 in float32, and two
    float32 computations in different orders each lose that much. Our float32 error against the float64 run is printed too."""
    def __init__(self, title, arrays, dtype):
        self.title, self.dtype, self.rows = title, dtype, []
        self.get, self.get64 = official(arrays, dtype), official(arrays, torch.float64)
    def add(self, name, ours, key):
        ref = self.get(key)
        ours = ours.detach().to(ref.dtype)
        assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, official {tuple(ref.shape)}"
        if self.dtype == torch.float64: self.rows.append((name, relative_error(ours, ref), None, None, TOL[torch.float64])); return
        exact = self.get64(key)
        official32 = relative_error(ref.double(), exact)
        self.rows.append((name, relative_error(ours, ref), relative_error(ours.double(), exact), official32, max(TOL[torch.float32], 3 * official32)))
    def check(self):
        if self.dtype == torch.float64: print(f"\n{self.title}: max |ours - official| / max |official| (tolerance {TOL[torch.float64]:.0e})")
        else: print(f"\n{self.title}: max |ours - official| / max |official|; ours and the official against the official float64; tolerance")
        for name, err, err64, official32, tol in self.rows:
            print(f"  {name:34s} {err:.1e}" + (f"   {err64:.1e}   {official32:.1e}   {tol:.1e}" if err64 is not None else ""))
        bad = [f"{n} {e:.1e} > {tol:.1e}" for n, e, _, _, tol in self.rows if not e <= tol]
        assert not bad, "above the tolerance: " + ', '.join(bad)


VARIANTS = {'epsilon': 'mulan_epsilon', 'velocity': 'mulan_velocity', 'velocity_from_epsilon': 'mulan_epsilon'}   # the ImageNet-32 path: an ε network


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_converted_mulan_reproduces_every_official_output(variant, dtype, monkeypatch):
    d = fixture('mulan_tiny.npz')
    get, B, D = official(d, dtype), len(d['inputs/t']), math.prod(SHAPE)
    model = convert_official(nested(d), VARIANTS[variant], SHAPE, dtype=dtype, latent_k=3)
    assert next(model.parameters()).dtype == dtype
    err = Errors(f"{variant}, {str(dtype)[6:]}", d, dtype)
    x = torch.from_numpy(d['inputs/images'].astype(np.int64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        g, dg = model.gamma(get('inputs/schedule_t'), get('inputs/schedule_c'))
        err.add('schedule γ(c, t)', hwc(g), 'schedule/gamma'); err.add("schedule γ'(c, t)", hwc(dg), 'schedule/dgamma')
        c, t = get('topk/embedding'), official_times(d, dtype)
        for name, tt in (('t', t), ('0', torch.zeros_like(t)), ('1', torch.ones_like(t))):
            g, dg = model.gamma(tt, c)
            err.add(f'γ(c, {name}) in the loss', hwc(g), f'schedule/forward_gamma_{name}')
            err.add(f"γ'(c, {name}) in the loss", hwc(dg), f'schedule/forward_dgamma_{name}')
        logits = model.encoder(2 * (x.to(dtype) + 0.5) / 256 - 1)
        err.add('encoder logits', logits, 'encoder/logits')
        G = torch.from_numpy(d['draws/topk_gamma_G'])
        replay_draws(monkeypatch, [], [G]); err.add('top-k noise', sum_of_gamma_noise((B, 10), 3, dtype=dtype), 'topk/noise')
        _, left = replay_draws(monkeypatch, [], [G])
        sample = model.latent.sample(get('encoder/logits'))
        assert not left and torch.equal(sample, get('topk/embedding')), "the top-k latent differs"
        err.add('top-k KL (softmax surrogate)', model.latent.kl(get('encoder/logits')), 'topk/kl_softmax')
        err.add('score network output', nhwc(model.denoiser(nchw(get('inputs/denoiser_z')), get('inputs/denoiser_g')[:, None, None, None], get('inputs/denoiser_c'))), 'denoiser/out')
        f = f'{variant}/forward/'
        err.add('score network output in the loss', nhwc(model.denoiser(nchw(get(f + 'score_in_z')), get(f + 'score_in_g')[:, None, None, None], get(f + 'score_in_c'))), f + 'score_out')
        normals, gammas = replay_draws(monkeypatch, [nchw(get('draws/eps')), nchw(get('draws/eps0'))], [G])
        out = {k: v * D * math.log(2) for k, v in model.nelbo(x, t).items()}   # bpd -> nats per image
        assert not normals and not gammas, "the official code drew more than mulan_nb"
        for ours, theirs in (('diffusion', 'loss_diff'), ('recon', 'loss_recon'), ('prior', 'prior'), ('latent', 'kl_softmax')):
            err.add(f'NELBO {theirs}', out[ours], 'topk/kl_softmax' if theirs == 'kl_softmax' else f + theirs)
        err.add('NELBO loss_klz (latent + prior)', out['latent'] + out['prior'], f + 'loss_klz')
        for end in (0, 1):
            g, _ = model.gamma(torch.full((B,), float(end), dtype=dtype), c)
            err.add(f'var_{end} (mean σ²({end}))', torch.sigmoid(g).mean(), f + f'var_{end}')
        xt, tt = nchw(get('inputs/ode_x')), get('inputs/ode_t')
        g, dg = model.gamma(tt, c)
        err.add('probability-flow drift', nhwc(pf_velocity(model.predict_eps(xt, g, c), xt, g, dg)), f'{variant}/reverse_ode')
    err.check()


@pytest.mark.parametrize('dtype', DTYPES)
def test_converted_vdm_reproduces_every_official_output(dtype, monkeypatch):
    d = fixture('vdm_tiny.npz')
    get, B, D = official(d, dtype), len(d['inputs/t']), math.prod(SHAPE)
    model = convert_official(nested(d), 'vdm', SHAPE, dtype=dtype)
    err = Errors(f"vdm, {str(dtype)[6:]}", d, dtype)
    x = torch.from_numpy(d['inputs/images'].astype(np.int64)).permute(0, 3, 1, 2)
    t = official_times(d, dtype)
    with torch.no_grad():
        g, dg = model.gamma(t)
        err.add('schedule γ(t)', g.flatten(), 'schedule/gamma_t'); err.add("schedule γ'(t)", dg.flatten(), 'schedule/dgamma_t')
        for end in (0, 1): err.add(f'schedule γ({end})', model.gamma(torch.full((1,), float(end), dtype=dtype))[0].flatten(), f'schedule/gamma_{end}')
        err.add('score network output', nhwc(model.denoiser(nchw(get('inputs/denoiser_z')), get('inputs/denoiser_g')[:, None, None, None])), 'denoiser/out')
        err.add('score network output in the loss', nhwc(model.denoiser(nchw(get('forward/score_in_z')), get('forward/score_in_g')[:, None, None, None])), 'forward/score_out')
        normals, _ = replay_draws(monkeypatch, [nchw(get('draws/eps')), nchw(get('draws/eps0'))])
        out = {k: v * D * math.log(2) for k, v in model.nelbo(x, t).items()}
        assert not normals
        for ours, theirs in (('diffusion', 'loss_diff'), ('recon', 'loss_recon'), ('prior', 'loss_klz')): err.add(f'NELBO {theirs}', out[ours], f'forward/{theirs}')
        for end in (0, 1): err.add(f'var_{end}', torch.sigmoid(model.gamma(torch.full((1,), float(end), dtype=dtype))[0]).flatten(), f'forward/var_{end}')
    err.check()


REAL = {'cifar10_mulan_velocity': 'mulan_velocity', 'imagenet32_mulan_epsilon': 'mulan_epsilon', 'vdm_cifar10': 'vdm', 'vdm_imagenet32': 'vdm'}


def folded_count(shapes, kind):
    "Official parameters that a converted model holds inside others: the encoder's constant time MLP and its blocks' `cond_proj` (MuLAN), the row of `dense0` that multiplies VDM's zero conditioning."
    size = lambda n: math.prod(shapes[n])
    if kind == 'vdm': return shapes['score_model/dense0/kernel'][1]
    return sum(size(n) for n in shapes if n.startswith(('encoder_model/dense0/', 'encoder_model/dense1/')) or
               (n.startswith('encoder_model/') and '/cond_proj/' in n))


@pytest.mark.parametrize('name', list(REAL))
def test_real_parameter_lists_convert_with_nothing_missing_or_left_over(name):
    real = json.loads((FIXTURES / 'official_param_shapes.json').read_text())
    shapes = {k.removeprefix('params/'): tuple(v) for k, v in real['shapes'][name].items()}
    assert sum(math.prod(s) for s in shapes.values()) == real['parameter_counts'][name]
    t0 = time.perf_counter()
    model = convert_official({k: torch.empty(s, device='meta') for k, s in shapes.items()}, REAL[name])   # shapes only
    seconds = time.perf_counter() - t0
    ours, folded = sum(p.numel() for p in model.parameters()), folded_count(shapes, REAL[name])
    print(f"\n{name}: official {real['parameter_counts'][name]:,} = converted {ours:,} + folded {folded:,} ({seconds:.2f} s on the meta device)")
    assert ours + folded == real['parameter_counts'][name]
    cfg = model.config
    assert (cfg.channels, cfg.n_blocks) == ((128 if 'cifar10' in name else 256), 32)
    if REAL[name] != 'vdm': assert (cfg.latent_m, cfg.latent_k, cfg.schedule_width, cfg.encoder_channels, cfg.encoder_blocks) == (50, 15, 3072, cfg.channels, 4)


def test_cifar10_velocity_converts_from_arrays_in_seconds():
    real = json.loads((FIXTURES / 'official_param_shapes.json').read_text())
    rng = np.random.default_rng(0)
    arrays = {k.removeprefix('params/'): np.zeros(s, np.float32) for k, s in real['shapes']['cifar10_mulan_velocity'].items()}
    arrays['gamma/dense_out_b/bias'] = rng.standard_normal(3072).astype(np.float32)
    t0 = time.perf_counter()
    model = convert_official(arrays, 'mulan_velocity')
    seconds = time.perf_counter() - t0
    print(f"\ncifar10_mulan_velocity from float32 arrays: {seconds:.1f} s")
    perm = torch.arange(3072).reshape(32, 32, 3).permute(2, 0, 1).reshape(-1)
    assert torch.equal(model.schedule.net.heads[1].bias, torch.from_numpy(arrays['gamma/dense_out_b/bias'])[perm])
    assert all(p.device.type == 'cpu' and p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert seconds < 60


@pytest.mark.parametrize('change, kind, words', [
    (lambda t: t['score_model']['down.block_1'].pop('conv2'), 'mulan_velocity', 'score_model/down.block_1/conv2/kernel is missing'),
    (lambda t: t['gamma'].update(extra={'kernel': np.zeros((3, 3))}), 'mulan_velocity', 'gamma/extra/kernel is not used'),
    (lambda t: t['score_model']['up.block_0']['conv1'].update(kernel=np.zeros((3, 3, 32, 32))), 'mulan_epsilon', 'score_model/up.block_0/conv1/kernel has the wrong shape: it converts to (32, 32, 3, 3), mulan_nb\'s denoiser.up.0.conv1.weight is (32, 64, 3, 3)'),
    (lambda t: t['score_model']['mid.attn_1']['q'].update(bias=np.zeros(31)), 'mulan_epsilon', 'score_model/mid.attn_1/{q,k,v}/bias has the wrong shape'),
    (lambda t: None, 'vdm', "a MuLAN parameter tree (it has encoder_model/...) given as kind='vdm'"),
    (lambda t: None, 'mulan', "unknown kind 'mulan'"),
])
def test_a_tree_that_does_not_fit_is_a_one_line_error_naming_the_parameter(change, kind, words):
    tree = nested(fixture('mulan_tiny.npz'))
    change(tree)
    with pytest.raises(ValueError) as e: convert_official(tree, kind, SHAPE, latent_k=3)
    assert words in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_a_vdm_tree_given_as_mulan_is_refused():
    with pytest.raises(ValueError, match=r"without encoder_model/\.\.\. \(VDM's\?\) given as kind='mulan_velocity'"):
        convert_official(nested(fixture('vdm_tiny.npz')), 'mulan_velocity', SHAPE)


def test_the_official_checkpoint_files_convert_to_the_same_model(tmp_path):
    "From disk: clu.checkpoint's ckpt-2.flax, read and converted (EMA weights), gives the official float64 score network output."
    with tarfile.open(FIXTURES / 'checkpoints.tar.xz') as tar: tar.extractall(tmp_path, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    d, get = fixture('mulan_tiny.npz'), official(fixture('mulan_tiny.npz'), torch.float64)
    model = convert_official(read_official_checkpoint(tmp_path / 'mulan_tiny' / 'checkpoints-0')['ema_params'], 'mulan_velocity', SHAPE, dtype=torch.float64, latent_k=3)
    with torch.no_grad(): out = model.denoiser(nchw(get('inputs/denoiser_z')), get('inputs/denoiser_g')[:, None, None, None], get('inputs/denoiser_c'))
    assert relative_error(nhwc(out), get('denoiser/out')) < 1e-12
