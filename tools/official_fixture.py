#!/usr/bin/env python
"""Make the official-code fixtures of issue 15: tiny MuLAN (epsilon, velocity, velocity-from-epsilon) and VDM models
built, perturbed and run by the authors' own Flax code, with every parameter, input, random draw and output recorded.

NOT part of the package and never imported by it or by the tests: it needs JAX/Flax and the official code, which
live in a scratch environment outside the repository. The tests read only the .npz/.json files it writes.

Scratch environment (CPU builds are enough; no TensorFlow is needed, the model files do not import it):

    python3 -m venv /work/scratch15/venv
    /work/scratch15/venv/bin/pip install jax==0.4.23 jaxlib==0.4.23 flax==0.7.0 "numpy<2" scipy==1.12.0 chex ml_collections
    # resolved here to: jax 0.4.23, jaxlib 0.4.23, flax 0.7.0, numpy 1.26.4, scipy 1.12.0, chex 0.1.86,
    #                   ml_collections 1.1.0, optax 0.2.2 (Python 3 of the machine). Newer scipy breaks jax 0.4.23.

Official code (checked out as plain files, never into this repository):

    s-sahoo/MuLAN            e49dcc19cbae0af4998879be1351c4a8eb65b512  (2024-11-26) -> OFFICIAL/mulan/ldm/*.py
    google-research/vdm      dc27b98a554f65cdc654b800da5aa1846545d41b  (2022-09-20) -> OFFICIAL/vdm/model_vdm.py
    e.g.  git --git-dir=<mirror> show HEAD:ldm/model_mulan_velocity.py > OFFICIAL/mulan/ldm/model_mulan_velocity.py

Command that made the committed fixtures:

    /work/scratch15/venv/bin/python tools/official_fixture.py --official /work/scratch15/official \\
        --out tests/fixtures/official

What it does
- The official MuLAN code hard-codes 32x32x3 (`reshape(-1, 32, 32, 3)` in both `VDM.__call__`s and `32 * 32 * 3`
  for the schedule network's width and output size). The source text is read, exactly those literals are replaced
  (each replacement checks its count; lines keep their numbers) and the result is exec'd into a fresh module. The
  files themselves are untouched. Tiny size: images 8x6x3 (H != W on purpose, to catch H/W mix-ups), schedule width
  64 (!= D = 144 on purpose, to catch transposed matrices), sm_n_embd 32 (GroupNorm's 32 groups need C % 32 == 0),
  sm_n_layer 2, forward_n_layer 2, latent m = 10, k = 3.
- Initialises with the official `model.init` (as `Experiment_VDM.get_model_and_params`), then perturbs every
  parameter (the official init zeroes conv_out, conv2, cond_proj, proj_out and dense_out_a) and rounds each to a
  multiple of 2**-10, so that float32 and float64 hold the same values exactly and the file compresses.
- Records the random draws the forward pass makes, by name and in order, by replacing the `jax` global of the
  exec'd official modules with a proxy whose `jax.random.{uniform,normal,gamma,gumbel}` log their results; a second
  pass (float64, `jax_enable_x64`, separate process) replays the same draws instead of sampling.
- Records the official outputs of official methods only (no re-implementation here): the full loss
  (`VDM.__call__`: loss_recon, loss_klz, loss_diff, var_0, var_1), the score network's inputs and output inside
  that call, `apply_encoder` (logits), `_gamma_noise`, `_get_embedding_and_kl_z`, `_get_gamma` and its jvp in t,
  a direct `score_model` call for given (z, g, c), and `reverse_ode`.
- Records the parameter name/shape lists of the real configurations (CIFAR-10 mulan_velocity, ImageNet-32
  mulan_epsilon, VDM CIFAR-10 / ImageNet-32) from `jax.eval_shape` of the official init (no weights).

Array conventions: official layout, i.e. images and image-shaped arrays NHWC (B, H, W, 3); schedule outputs
flattened per image in H, W, C order (B, H*W*3), as `_get_gamma` returns them. Flax kernels: Dense (in, out),
Conv (kh, kw, in, out).
"""
import argparse, json, os, subprocess, sys, tempfile, types
import numpy as np

COMMITS = {'s-sahoo/MuLAN': 'e49dcc19cbae0af4998879be1351c4a8eb65b512',
           'google-research/vdm': 'dc27b98a554f65cdc654b800da5aa1846545d41b'}
H, W, C = 8, 6, 3
B = 4                    # a power of two, so that jnp.arange(0., 1., 1/B) is exact
SCHED_WIDTH = 64
M, K = 10, 3
QUANT = 2.0 ** -10
SEED = 0

# ---------------------------------------------------------------------------------------------------- config dicts
def mulan_config(tiny=True, dataset='cifar10'):
    "config.model of ldm/configs/cifar10-conditioned.py (or imagenet32.py), shrunk when tiny."
    cfg = dict(unet_type='vdm', vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
               with_fourier_features=True, with_attention=False, condition='input', encoder='unet',
               forward_n_layer=4, latent_size=50, latent_k=15, model_time=False, epsilon=0.0,
               monotone_layer='dense_monotone', gamma_type='poly_fixedend', latent_type='topk', z_conditioning=True,
               trace_matching=False, importance_sampling=False, topk_noise_type='gamma', sigma_prior=1.0,
               reparam_type='true', gamma_min=-13.3, gamma_max=5., velocity_from_epsilon=False,
               sigma_type='no_blur', sigma_min=0.0, sigma_max=20.0,
               sm_n_timesteps=0, sm_n_embd=128, sm_n_layer=32, sm_pdrop=0.1)
    if dataset == 'imagenet32':   # imagenet32.py: no latent_k (VDMConfig default 15), no trace_matching/sigma_*, width 256
        for k in ('latent_k', 'trace_matching', 'sigma_type', 'sigma_min', 'sigma_max'): del cfg[k]
        cfg['sm_n_embd'] = 256
    if tiny:
        cfg.update(sm_n_embd=32, sm_n_layer=2, forward_n_layer=2, latent_size=M, latent_k=K)
    return cfg

def vdm_config(tiny=True, dataset='cifar10'):
    "config.model of google-research/vdm configs/cifar10.py (imagenet32.py: sm_n_embd 256), shrunk when tiny."
    cfg = dict(vocab_size=256, sample_softmax=False, antithetic_time_sampling=True, with_fourier_features=True,
               with_attention=False, gamma_type='learnable_scalar', gamma_min=-13.3, gamma_max=5.,
               sm_n_timesteps=0, sm_n_embd=128 if dataset == 'cifar10' else 256, sm_n_layer=32, sm_pdrop=0.1)
    if tiny: cfg.update(sm_n_embd=32, sm_n_layer=2)
    return cfg

# ---------------------------------------------------------------------------------------------------- loading
def load_module(name, path, replacements=()):
    "Exec the official file at `path` as module `name`, after replacing literals (old, new, expected count)."
    src = open(path).read()
    for old, new, count in replacements:
        n = src.count(old)
        if n != count: raise RuntimeError(f"{path}: expected {count} occurrence(s) of {old!r}, found {n}")
        if old.count('\n') != new.count('\n'): raise RuntimeError("replacements must keep line numbers")
        src = src.replace(old, new)
    mod = types.ModuleType(name)
    mod.__file__ = path
    sys.modules[name] = mod
    pkg, _, leaf = name.rpartition('.')
    if pkg in sys.modules: setattr(sys.modules[pkg], leaf, mod)
    exec(compile(src, path, 'exec'), mod.__dict__)
    return mod

# float64 run only: two float32 literals of model_vdm.py would otherwise cast to float32 in the middle of the network
# (`get_timestep_embedding(..., dtype=jnp.float32)` and `dot_product_attention(..., dtype=jnp.float32, ...)`, whose
# `assert attn_weights.dtype == dtype` fails under x64). Nothing else changes.
X64_REPL = [('def get_timestep_embedding(timesteps, embedding_dim: int, dtype=jnp.float32):',
             'def get_timestep_embedding(timesteps, embedding_dim: int, dtype=jnp.float64):', 1),
            ('                          dtype=jnp.float32,\n', '                          dtype=jnp.float64,\n', 1)]

def load_mulan(official, tiny=True, x64=False):
    "ldm.model_vdm, ldm.model_mulan_epsilon, ldm.model_mulan_velocity; the last two patched to H x W x C when tiny."
    root = os.path.join(official, 'mulan')
    if root not in sys.path: sys.path.insert(0, root)
    import ldm   # noqa: F401  (namespace package)
    ldm_dir = os.path.join(root, 'ldm')
    load_module('ldm.model_vdm', os.path.join(ldm_dir, 'model_vdm.py'), X64_REPL if x64 else ())
    import ldm.ldm_unet   # noqa: F401  (imported as is; not used with unet_type='vdm')
    D = H * W * C
    eps_repl = [('x = images.reshape(-1, 32, 32, 3)', f'x = images.reshape(-1, {H}, {W}, {C})', 1),
                ('n_features: int = 32 * 32 * 3', f'n_features: int = {SCHED_WIDTH}', 2),
                ('n_out = 32 * 32 * 3', f'n_out = {D}', 1),
                ('n_out_nonlinear = 32 * 32 * 3', f'n_out_nonlinear = {D}', 1),
                ('(image_embedding.shape[0], 32, 32, 3)', f'(image_embedding.shape[0], {H}, {W}, {C})', 1)]
    vel_repl = [('x = images.reshape(-1, 32, 32, 3)', f'x = images.reshape(-1, {H}, {W}, {C})', 1),
                ('x.reshape(n_batch, 32, 32, 3)', f'x.reshape(n_batch, {H}, {W}, {C})', 1),
                ('32 * 32 * 3', f'{D}', 2)]   # both in the dead `_compute_exact_trace`
    eps = load_module('ldm.model_mulan_epsilon', os.path.join(ldm_dir, 'model_mulan_epsilon.py'), eps_repl if tiny else ())
    vel = load_module('ldm.model_mulan_velocity', os.path.join(ldm_dir, 'model_mulan_velocity.py'), vel_repl if tiny else ())
    return ldm.model_vdm, eps, vel

def load_vdm(official, x64=False):
    return load_module('gr_vdm_model_vdm', os.path.join(official, 'vdm', 'model_vdm.py'), X64_REPL if x64 else ())

# ---------------------------------------------------------------------------------------------------- draws
class Draws:
    "Logs (record) or returns in order (replay) the results of jax.random.{uniform,normal,gamma,gumbel}."
    WRAPPED = ('uniform', 'normal', 'gamma', 'gumbel')
    def __init__(self): self.mode, self.log, self.queue = 'off', [], []
    def record(self): self.mode, self.log = 'record', []
    def replay(self, draws): self.mode, self.queue = 'replay', list(draws)
    def off(self):
        if self.mode == 'replay' and self.queue: raise RuntimeError(f"{len(self.queue)} draws were not used")
        self.mode = 'off'
    def wrap(self, fname, fn):
        import jax.numpy as jnp
        def f(*args, **kw):
            out = fn(*args, **kw)
            if self.mode == 'record': self.log.append((fname, np.asarray(out)))
            elif self.mode == 'replay':
                name, arr = self.queue.pop(0)
                if name != fname or arr.shape != out.shape:
                    raise RuntimeError(f"replay: expected {name}{arr.shape}, the code drew {fname}{out.shape}")
                out = jnp.asarray(arr, out.dtype)
            return out
        return f

class _RandomProxy:
    def __init__(self, draws, jax): self._d, self._jax = draws, jax
    def __getattr__(self, n):
        f = getattr(self._jax.random, n)
        return self._d.wrap(n, f) if n in Draws.WRAPPED else f

class _JaxProxy:
    def __init__(self, draws, jax): self.random, self._jax = _RandomProxy(draws, jax), jax
    def __getattr__(self, n): return getattr(self._jax, n)

def install_draws(mods):
    import jax
    d = Draws()
    for m in mods: m.jax = _JaxProxy(d, jax)
    return d

class ScoreInputs:
    "Records (z, g_t, conditioning, output) of every score_model call (the official ScoreUNet, subclassed only to look)."
    def __init__(self): self.calls = []

def hook_score_unet(model_vdm_mod, rec):
    Base = model_vdm_mod.ScoreUNet
    class ScoreUNet(Base):
        def __call__(self, z, g_t, conditioning, deterministic=True, time=False):
            out = super().__call__(z, g_t, conditioning, deterministic, time)
            rec.calls.append(tuple(np.asarray(a) for a in (z, g_t, conditioning, out)))
            return out
    model_vdm_mod.ScoreUNet = ScoreUNet

def hook_score_unet_vdm(gvdm, rec):
    Base = gvdm.ScoreUNet
    class ScoreUNet(Base):
        def __call__(self, z, g_t, conditioning, deterministic=True):
            out = super().__call__(z, g_t, conditioning, deterministic)
            rec.calls.append(tuple(np.asarray(a) for a in (z, g_t, conditioning, out)))
            return out
    gvdm.ScoreUNet = ScoreUNet

# ---------------------------------------------------------------------------------------------------- params
def flatten(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        name = f'{prefix}/{k}' if prefix else k
        if hasattr(v, 'items'): out.update(flatten(v, name))
        else: out[name] = v
    return out

def unflatten(flat):
    tree = {}
    for name, v in flat.items():
        node = tree
        *path, leaf = name.split('/')
        for p in path: node = node.setdefault(p, {})
        node[leaf] = v
    return tree

def perturb(flat, seed):
    "Every parameter moved off its (partly zero) init and rounded to a multiple of 2**-10."
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(flat):
        p = np.asarray(flat[name], np.float64)
        leaf = name.rsplit('/', 1)[-1]
        if leaf == 'kernel':
            fan_in = int(np.prod(p.shape[:-1]))
            q = p + rng.normal(size=p.shape) * 0.7 / np.sqrt(fan_in)
        elif leaf == 'scale': q = p + 0.2 * rng.normal(size=p.shape)
        elif leaf == 'bias': q = p + 0.2 * rng.normal(size=p.shape)
        elif leaf == 'w': q = p * (1 + 0.1 * rng.normal(size=p.shape))     # VDM scalar schedule: |w| = gamma range
        elif leaf == 'b': q = p + 0.5 * rng.normal(size=p.shape)
        else: raise RuntimeError(f"no perturbation rule for {name}")
        out[name] = (np.round(q / QUANT) * QUANT).astype(np.float32)
    return out

# ---------------------------------------------------------------------------------------------------- phases
def phase_shapes(official, out):
    "Name -> shape of the official init at the real sizes, without weights."
    import jax, jax.numpy as jnp
    mv, meps, mvel = load_mulan(official, tiny=False)
    gvdm = load_vdm(official)
    res = {}
    for key, mod, cfg in [('cifar10_mulan_velocity', mvel, mulan_config(False, 'cifar10')),
                          ('imagenet32_mulan_epsilon', meps, mulan_config(False, 'imagenet32'))]:
        model = mod.VDM(mv.VDMConfig(**cfg))
        inputs = dict(images=jnp.zeros((2, 32, 32, 3), 'uint8'), conditioning=jnp.zeros((2,)), labels=jnp.zeros((2,)))
        shapes = jax.eval_shape(lambda r1, r2: model.init({'params': r1, 'sample': r2}, **inputs, step=-1.),
                                jax.random.PRNGKey(0), jax.random.PRNGKey(1))
        res[key] = {n: list(s.shape) for n, s in flatten(shapes['params']).items()}
    for key, cfg in [('vdm_cifar10', vdm_config(False, 'cifar10')), ('vdm_imagenet32', vdm_config(False, 'imagenet32'))]:
        model = gvdm.VDM(gvdm.VDMConfig(**cfg))
        inputs = dict(images=jnp.zeros((2, 32, 32, 3), 'uint8'), conditioning=jnp.zeros((2,)))
        shapes = jax.eval_shape(lambda r1, r2: model.init({'params': r1, 'sample': r2}, **inputs),
                                jax.random.PRNGKey(0), jax.random.PRNGKey(1))
        res[key] = {n: list(s.shape) for n, s in flatten(shapes['params']).items()}
    counts = {k: int(sum(np.prod(s) for s in v.values())) for k, v in res.items()}
    with open(out, 'w') as fh:
        json.dump(dict(commits=COMMITS, parameter_counts=counts, configs=dict(
            cifar10_mulan_velocity=mulan_config(False, 'cifar10'), imagenet32_mulan_epsilon=mulan_config(False, 'imagenet32'),
            vdm_cifar10=vdm_config(False, 'cifar10'), vdm_imagenet32=vdm_config(False, 'imagenet32')),
            shapes=res), fh, indent=1, sort_keys=True)
    print('parameter counts', counts)

def _inputs(rng):
    x = rng.integers(0, 256, size=(B, H, W, C)).astype(np.uint8)
    x[0, 0, 0] = 0; x[0, 0, 1] = 255   # both extreme levels present
    return x

def phase_mulan(official, work, x64):
    import jax
    if x64: jax.config.update('jax_enable_x64', True)
    import jax.numpy as jnp
    dt = np.float64 if x64 else np.float32
    mv, meps, mvel = load_mulan(official, tiny=True, x64=x64)
    draws = install_draws([mv, meps, mvel])
    score_rec = ScoreInputs()
    hook_score_unet(mv, score_rec)
    rng = np.random.default_rng(SEED)
    res = {}
    base = mulan_config(True)
    variants = {'epsilon': (meps, {}), 'velocity': (mvel, {}), 'velocity_from_epsilon': (mvel, dict(velocity_from_epsilon=True))}
    models = {k: mod.VDM(mv.VDMConfig(**{**base, **over})) for k, (mod, over) in variants.items()}

    if not x64:   # init with the official path, perturb, quantise
        inputs = dict(images=jnp.zeros((2, H, W, C), 'uint8'), conditioning=jnp.zeros((2,)), labels=jnp.zeros((2,)))
        r1, r2 = jax.random.split(jax.random.PRNGKey(SEED))
        params = models['velocity'].init({'params': r1, 'sample': r2}, **inputs, step=-1.)['params']
        init_flat = {n: np.asarray(v) for n, v in flatten(params).items()}
        p_eps = flatten(models['epsilon'].init({'params': r1, 'sample': r2}, **inputs, step=-1.)['params'])
        assert {n: v.shape for n, v in p_eps.items()} == {n: v.shape for n, v in init_flat.items()}
        flat = perturb(init_flat, SEED + 1)
        images = _inputs(rng)
        res['init_zero_params'] = np.array(sorted(n for n, v in init_flat.items() if not np.any(v)))
    else:
        prev = dict(np.load(os.path.join(work, 'mulan_f32.npz')))
        flat = {n[len('params/'):]: prev[n] for n in prev if n.startswith('params/')}
        images = prev['inputs/images']
    P = {'params': unflatten({n: jnp.asarray(v, dt) for n, v in flat.items()})}
    images_j = jnp.asarray(images)
    cond0 = jnp.zeros((B,)); labels = jnp.zeros((B,))
    key = jax.random.PRNGKey(SEED + 2)
    step = 0

    # 1. the full loss of each variant (same params, same draws)
    forward_draws = draws_list(prev) if x64 else None
    for name, model in models.items():
        score_rec.calls.clear()
        if forward_draws is None: draws.record()
        else: draws.replay(forward_draws)
        o = model.apply(P, images=images_j, labels=labels, conditioning=cond0, step=step, deterministic=True,
                        rngs={'sample': key})
        if forward_draws is None:
            fn = [f for f, _ in draws.log]
            assert fn == ['uniform', 'gamma', 'normal', 'normal'], fn
            forward_draws = list(draws.log)
        draws.off()
        assert len(score_rec.calls) == 1, len(score_rec.calls)
        z_t, g_mean, c_in, out = score_rec.calls[0]
        for k, v in dict(loss_recon=o.loss_recon, loss_klz=o.loss_klz, loss_diff=o.loss_diff, var_0=o.var_0,
                         var_1=o.var_1, score_in_z=z_t, score_in_g=g_mean, score_in_c=c_in, score_out=out).items():
            res[f'{name}/forward/{k}'] = np.asarray(v)
    (_, t0), (_, G), (_, eps0), (_, eps) = forward_draws
    res.update({'draws/t0': np.asarray(t0), 'draws/topk_gamma_G': np.asarray(G), 'draws/eps0': np.asarray(eps0),
                'draws/eps': np.asarray(eps)})
    t = np.asarray(jnp.mod(jnp.asarray(t0) + jnp.arange(0., 1., step=1. / B), 1.))   # as VDM.__call__ computes it
    res['inputs/t'] = t

    model = models['velocity']   # encoder, latent and schedule are the same code in all variants
    # 2. encoder, gamma noise, embedding + softmax KL (official methods; the gamma noise replays G)
    res['encoder/logits'] = np.asarray(model.apply(P, images_j, method=model.apply_encoder))
    draws.replay([('gamma', G)])
    res['topk/noise'] = np.asarray(model.apply(P, K, (B, M), method=lambda m, k, s: m._gamma_noise(k=k, shape=s),
                                               rngs={'sample': key}))
    draws.off()
    f = model.apply(P, images_j, method=lambda m, x: m.encdec.encode(x))
    draws.replay([('gamma', G)])
    emb, kl = model.apply(P, f, method=lambda m, f: m._get_embedding_and_kl_z(f, step=step, deterministic=True),
                          rngs={'sample': key})
    draws.off()
    res['topk/embedding'], res['topk/kl_softmax'] = np.asarray(emb), np.asarray(kl)
    for name in variants: res[f'{name}/forward/prior'] = res[f'{name}/forward/loss_klz'] - res['topk/kl_softmax']

    # 3. the schedule at the forward pass's (c, t), t = 0, 1, and at soft latents on a grid of t
    def gamma_and_slope(e, tt):
        g = model.apply(P, e, tt, method=lambda m, e, t: m._get_gamma(e, t))
        _, dg = model.apply(P, e, tt, method=lambda m, e, t: jax.jvp(m._get_gamma, (e, t), (jnp.zeros_like(e), jnp.ones_like(t))))
        return np.asarray(g), np.asarray(dg)
    emb_j = jnp.asarray(emb)
    for tag, tt in [('t', jnp.asarray(t)), ('0', jnp.zeros(B, dt)), ('1', jnp.ones(B, dt))]:
        res[f'schedule/forward_gamma_{tag}'], res[f'schedule/forward_dgamma_{tag}'] = gamma_and_slope(emb_j, tt)
    if not x64:
        sc = rng.normal(size=(6, M)).astype(np.float32); sc[0] = 0.
        st = np.array([0., 1e-3, 0.25, 0.5, 0.9, 1.], np.float32)
    else: sc, st = prev['inputs/schedule_c'], prev['inputs/schedule_t']
    res['inputs/schedule_c'], res['inputs/schedule_t'] = sc, st
    res['schedule/gamma'], res['schedule/dgamma'] = gamma_and_slope(jnp.asarray(sc, dt), jnp.asarray(st, dt))

    # 4. the score network for given (z, g, c); g is the per-image scalar the official code passes
    if not x64:
        dz = rng.normal(size=(B, H, W, C)).astype(np.float32)
        dg = np.array([-13.3, -5., 0.5, 5.], np.float32)
        dc = rng.normal(size=(B, M)).astype(np.float32)
    else: dz, dg, dc = prev['inputs/denoiser_z'], prev['inputs/denoiser_g'], prev['inputs/denoiser_c']
    res['inputs/denoiser_z'], res['inputs/denoiser_g'], res['inputs/denoiser_c'] = dz, dg, dc
    res['denoiser/out'] = np.asarray(model.apply(P, jnp.asarray(dz, dt), jnp.asarray(dg, dt), jnp.asarray(dc, dt),
                                                 method=lambda m, z, g, c: m.score_model(z, g, c, deterministic=True)))

    # 5. the probability-flow drift `reverse_ode` of each variant for given (x_t, c, t)
    if not x64:
        ox = rng.normal(size=(B, H, W, C)).astype(np.float32)
        ot = np.array([0.05, 0.3, 0.6, 0.95], np.float32)
    else: ox, ot = prev['inputs/ode_x'], prev['inputs/ode_t']
    res['inputs/ode_x'], res['inputs/ode_t'] = ox, ot
    for name, mdl in models.items():
        res[f'{name}/reverse_ode'] = np.asarray(mdl.apply(P, jnp.asarray(ox, dt), emb_j, jnp.asarray(ot, dt),
                                                          method=mdl.reverse_ode))
    if not x64:
        res.update({f'params/{n}': v for n, v in flat.items()})
        res['inputs/images'] = images
    else:   # keep only outputs; inputs/params are the float32 run's
        res = {k: v for k, v in res.items() if not k.startswith(('inputs/', 'draws/', 'params/'))}
    np.savez(os.path.join(work, f'mulan_{"f64" if x64 else "f32"}.npz'), **res)

def draws_list(prev):
    return [(n, prev[f'draws/{n2}']) for n, n2 in zip(('uniform', 'gamma', 'normal', 'normal'), ('t0', 'topk_gamma_G', 'eps0', 'eps'))]

def phase_vdm(official, work, x64):
    import jax
    if x64: jax.config.update('jax_enable_x64', True)
    import jax.numpy as jnp
    dt = np.float64 if x64 else np.float32
    gvdm = load_vdm(official, x64)
    draws = install_draws([gvdm])
    score_rec = ScoreInputs()
    hook_score_unet_vdm(gvdm, score_rec)
    rng = np.random.default_rng(SEED + 10)
    model = gvdm.VDM(gvdm.VDMConfig(**vdm_config(True)))
    res = {}
    if not x64:
        inputs = dict(images=jnp.zeros((2, H, W, C), 'uint8'), conditioning=jnp.zeros((2,)))
        r1, r2 = jax.random.split(jax.random.PRNGKey(SEED))
        init_flat = {n: np.asarray(v) for n, v in flatten(model.init({'params': r1, 'sample': r2}, **inputs)['params']).items()}
        flat = perturb(init_flat, SEED + 11)
        images = _inputs(rng)
        res['init_zero_params'] = np.array(sorted(n for n, v in init_flat.items() if not np.any(v)))
    else:
        prev = dict(np.load(os.path.join(work, 'vdm_f32.npz')))
        flat = {n[len('params/'):]: prev[n] for n in prev if n.startswith('params/')}
        images = prev['inputs/images']
    P = {'params': unflatten({n: jnp.asarray(v, dt) for n, v in flat.items()})}
    key = jax.random.PRNGKey(SEED + 12)
    score_rec.calls.clear()
    if not x64: draws.record()
    else: draws.replay([(n, prev[f'draws/{n2}']) for n, n2 in zip(('normal', 'uniform', 'normal'), ('eps0', 't0', 'eps'))])
    o = model.apply(P, images=jnp.asarray(images), conditioning=jnp.zeros((B,)), deterministic=True, rngs={'sample': key})
    if not x64:
        assert [f for f, _ in draws.log] == ['normal', 'uniform', 'normal']
        (_, eps0), (_, t0), (_, eps) = draws.log
        res.update({'draws/eps0': eps0, 'draws/t0': t0, 'draws/eps': eps})
    else: t0 = prev['draws/t0']
    draws.off()
    assert len(score_rec.calls) == 1
    z_t, g_t, c_in, out = score_rec.calls[0]
    for k, v in dict(loss_recon=o.loss_recon, loss_klz=o.loss_klz, loss_diff=o.loss_diff, var_0=o.var_0, var_1=o.var_1,
                     score_in_z=z_t, score_in_g=g_t, score_in_c=c_in, score_out=out).items():
        res[f'forward/{k}'] = np.asarray(v)
    t = jnp.mod(jnp.asarray(t0) + jnp.arange(0., 1., step=1. / B), 1.)
    res['inputs/t'] = np.asarray(t)
    res['schedule/gamma_t'] = np.asarray(model.apply(P, t, method=lambda m, t: m.gamma(t)))
    res['schedule/dgamma_t'] = np.asarray(model.apply(P, t, method=lambda m, t: jax.jvp(m.gamma, (t,), (jnp.ones_like(t),))[1]))
    res['schedule/gamma_0'] = np.asarray(model.apply(P, method=lambda m: m.gamma(0.)))
    res['schedule/gamma_1'] = np.asarray(model.apply(P, method=lambda m: m.gamma(1.)))
    if not x64:
        dz = rng.normal(size=(B, H, W, C)).astype(np.float32)
        dg = np.array([-13.3, -5., 0.5, 5.], np.float32)
    else: dz, dg = prev['inputs/denoiser_z'], prev['inputs/denoiser_g']
    res['inputs/denoiser_z'], res['inputs/denoiser_g'] = dz, dg
    res['denoiser/out'] = np.asarray(model.apply(P, jnp.asarray(dz, dt), jnp.asarray(dg, dt), jnp.zeros((B,), dt),
                                                 method=lambda m, z, g, c: m.score_model(z, g, c, deterministic=True)))
    if not x64:
        res.update({f'params/{n}': v for n, v in flat.items()})
        res['inputs/images'] = images
    else: res = {k: v for k, v in res.items() if not k.startswith(('inputs/', 'draws/', 'params/'))}
    np.savez(os.path.join(work, f'vdm_{"f64" if x64 else "f32"}.npz'), **res)

# ---------------------------------------------------------------------------------------------------- main
def versions():
    import importlib.metadata as md
    return {p: md.version(p) for p in ('jax', 'jaxlib', 'flax', 'numpy', 'scipy', 'chex', 'ml_collections')}

def assemble(work, out, name, meta):
    f32 = dict(np.load(os.path.join(work, f'{name}_f32.npz')))
    f64 = dict(np.load(os.path.join(work, f'{name}_f64.npz')))
    arrays = {**f32, **{f'f64/{k}': v for k, v in f64.items() if k != 'init_zero_params'}}
    arrays['meta_json'] = np.array(json.dumps(meta, sort_keys=True))
    path = os.path.join(out, f'{name}_tiny.npz')
    np.savez_compressed(path, **arrays)
    # the float64 run must agree with the float32 one to float32 accuracy, or something is off
    for k, v in f64.items():
        if k in f32 and f32[k].dtype.kind == 'f' and k != 'init_zero_params':
            err = np.max(np.abs(f32[k] - v)) / (np.abs(v).max() + 1e-30)   # relative to the array's largest value
            if err > 1e-4: print(f'  warning: {name} {k}: float32 vs float64 difference {err:.2e} of max |value|')
    print(f'{path}: {os.path.getsize(path) / 1e6:.2f} MB, {len(arrays)} arrays')

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--official', default='/work/scratch15/official', help='folder with mulan/ldm/*.py and vdm/*.py')
    ap.add_argument('--out', default='tests/fixtures/official')
    ap.add_argument('--phase', default='all', choices=['all', 'shapes', 'mulan', 'mulan64', 'vdm', 'vdm64'])
    ap.add_argument('--work', default=None)
    a = ap.parse_args()
    if a.phase != 'all':
        {'shapes': lambda: phase_shapes(a.official, os.path.join(a.work, 'shapes.json')),
         'mulan': lambda: phase_mulan(a.official, a.work, False), 'mulan64': lambda: phase_mulan(a.official, a.work, True),
         'vdm': lambda: phase_vdm(a.official, a.work, False), 'vdm64': lambda: phase_vdm(a.official, a.work, True)}[a.phase]()
        return
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for ph in ('mulan', 'mulan64', 'vdm', 'vdm64', 'shapes'):   # each in its own process (x64 is process-wide)
            print('phase', ph, flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), '--phase', ph, '--work', work,
                            '--official', a.official], check=True)
        common = dict(commits=COMMITS, versions=versions(), image_shape_hwc=[H, W, C], batch=B, seed=SEED,
                      quantum=QUANT, script='tools/official_fixture.py')
        assemble(work, a.out, 'mulan', {**common, 'schedule_width': SCHED_WIDTH, 'latent_m': M, 'latent_k': K,
                                        'config': mulan_config(True), 'variants': {
                                            'epsilon': 'ldm/model_mulan_epsilon.py VDM', 'velocity': 'ldm/model_mulan_velocity.py VDM',
                                            'velocity_from_epsilon': 'ldm/model_mulan_velocity.py VDM, velocity_from_epsilon=True'}})
        assemble(work, a.out, 'vdm', {**common, 'config': vdm_config(True), 'model': 'google-research/vdm model_vdm.py VDM'})
        with open(os.path.join(work, 'shapes.json')) as fh: shapes = json.load(fh)
        with open(os.path.join(a.out, 'official_param_shapes.json'), 'w') as fh: json.dump(shapes, fh, indent=1, sort_keys=True)

if __name__ == '__main__':
    main()
