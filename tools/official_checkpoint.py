#!/usr/bin/env python
"""Write the official checkpoint files of issue 15: the tiny MuLAN and VDM `TrainState`s saved by `clu.checkpoint`
exactly as the official train loops save them, packed into tests/fixtures/official/checkpoints.tar.xz.

NOT part of the package and never imported by it or by the tests: it needs JAX/Flax, CLU, TensorFlow and the official
code, which live in a scratch environment outside the repository (the one of tools/official_fixture.py plus CLU and
TensorFlow). The tests read only the archive it writes, with mulan_nb.official (no TensorFlow, no JAX).

Scratch environment (CPU builds are enough):

    python3 -m venv /work/scratch15/venv
    /work/scratch15/venv/bin/pip install jax==0.4.23 jaxlib==0.4.23 flax==0.7.0 "numpy<2" scipy==1.12.0 chex ml_collections
    /work/scratch15/venv/bin/pip install clu==0.0.12 "tensorflow-cpu==2.19.*" numpy==1.26.4 ml_dtypes==0.5.4 \\
        jax==0.4.23 jaxlib==0.4.23 flax==0.7.0 scipy==1.12.0     # the pins keep the first line's versions

Command that made the committed archive (after tools/official_fixture.py, whose npz files hold the parameters):

    /work/scratch15/venv/bin/python tools/official_checkpoint.py --official /work/scratch15/official \\
        --fixtures tests/fixtures/official

Needs, besides OFFICIAL/mulan/ldm/*.py and OFFICIAL/vdm/*.py of tools/official_fixture.py, the official training
files at the same commits: ldm/{experiment,experiment_vdm,train_state,utils}.py, ldm/configs/cifar10-conditioned.py,
vdm/{experiment,train_state,utils}.py, vdm/configs/cifar10.py.

What it does (the official code's own saving path, nothing re-implemented):
- The parameters are the ones of mulan_tiny.npz / vdm_tiny.npz (the tiny models that tools/official_fixture.py ran
  through the official code), so a reader can be checked bit for bit against them.
- The official `TrainState.create` (ldm/train_state.py, vdm/train_state.py) with the official optimizer
  (`Experiment.get_optimizer` of ldm/experiment.py: two masked AdamW; vdm/experiment.py: one AdamW) and the configs'
  optimizer settings; `flax.jax_utils.replicate` then `unreplicate`, as the train loop does before `ckpt.save`;
  `clu.checkpoint.MultihostCheckpoint(workdir/'checkpoints', max_to_keep=...)` as in the train loops, so the files
  land in `checkpoints-0/` (host 0), numbered ckpt-1, ckpt-2, ... by save, not by training step.
- MuLAN: ckpt-1 is the state at step 0; ckpt-2 the state after one official `apply_gradients` with the learning rate
  of the official warm-up schedule at step 0 (0.0), the config's EMA rate 0.9999 and zero gradients (so that the
  archive stays small: the optimizer moments stay zero; params stay the npz's bit for bit, ema_params equal them
  in value but the EMA update `x + (1 - rate)(y - x)` turns each -0.0 into +0.0; step becomes 1, Adam's counts 1). VDM: ckpt-1 only, at step 0 (vdm/train_state.py's `apply_gradients` calls
  `jax.tree_multimap`, which jax 0.4.23 no longer has).
- Checks with the official restore path (`checkpoint.Checkpoint(dir).restore_dict(...)`, as ldm/notebook_utils.py and
  ldm/experiment.py do) that `params` and `ema_params` are, bit for bit, those expected, and prints the layout.

The Flax state is in `ckpt-N.flax` (`flax.serialization.to_bytes`, msgpack); `ckpt-N.index` / `ckpt-N.data-*` are
TensorFlow's tensor bundle of the (empty) `tf.train.Checkpoint`: only `save_counter` and the object graph; `checkpoint`
is the CheckpointManager's text file (with wall-clock timestamps, so it differs between runs; the rest is identical).
"""
import argparse, importlib.metadata as md, io, json, os, sys, tarfile, tempfile, types
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_fixture as of   # noqa: E402  (the loaders, configs and commits of the npz fixtures)

ARCHIVE = 'checkpoints.tar.xz'

def stub_dataset(name):
    "The training modules import their data pipeline (tensorflow_datasets, tensorflow_addons); it is never called here."
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    pkg, _, leaf = name.rpartition('.')
    setattr(sys.modules[pkg], leaf, mod)

def load_config(path, model):
    "config of an official config file, with config.model replaced by the tiny one."
    spec = types.ModuleType('official_config')
    exec(compile(open(path).read(), path, 'exec'), spec.__dict__)
    config = spec.get_config()
    config.model = type(config.model)(model)
    return config

def npz_params(path):
    z = np.load(path)
    return {n[len('params/'):]: z[n] for n in z.files if n.startswith('params/')}

def save_states(states, base, max_to_keep):
    "Save each state with the official call, `ckpt.save(flax_utils.unreplicate(state))` of a replicated state."
    import flax.jax_utils as flax_utils
    from clu import checkpoint
    ckpt = checkpoint.MultihostCheckpoint(os.path.join(base, 'checkpoints'), max_to_keep=max_to_keep)
    return [ckpt.save(flax_utils.unreplicate(flax_utils.replicate(s))) for s in states]

def check_restore(paths, expected):
    "The official restore path returns, bit for bit, the expected params, ema_params and step of each checkpoint."
    from clu import checkpoint
    for path, want in zip(paths, expected):
        d = checkpoint.Checkpoint(os.path.dirname(path)).restore_dict(path)
        for key in ('params', 'ema_params'):
            got = of.flatten(d[key])
            assert set(got) == set(want[key]), (key, set(got) ^ set(want[key]))
            for n, v in want[key].items():
                g = np.asarray(got[n])
                assert g.dtype == v.dtype and g.shape == v.shape and g.tobytes() == v.tobytes(), (path, key, n)
        assert int(d['step']) == want['step'], (path, d['step'], want['step'])
        print(f'  {os.path.basename(path)}: step {int(d["step"])}; top-level {sorted(d)}; opt_state leaves:')
        for n, v in sorted(of.flatten(d['opt_state']).items())[:6]:
            print(f'    opt_state/{n} {np.asarray(v).dtype} {np.shape(v)}')

def mulan_checkpoints(official, fixtures, work):
    import jax, jax.numpy as jnp
    from flax.core.frozen_dict import FrozenDict
    mv, meps, mvel = of.load_mulan(official, tiny=True)
    ldm_dir = os.path.join(official, 'mulan', 'ldm')
    train_state = of.load_module('ldm.train_state', os.path.join(ldm_dir, 'train_state.py'))
    of.load_module('ldm.utils', os.path.join(ldm_dir, 'utils.py'))
    stub_dataset('ldm.dataset')
    of.load_module('ldm.experiment', os.path.join(ldm_dir, 'experiment.py'))
    exp_vdm = of.load_module('ldm.experiment_vdm', os.path.join(ldm_dir, 'experiment_vdm.py'))
    config = load_config(os.path.join(ldm_dir, 'configs', 'cifar10-conditioned.py'), of.mulan_config(True))
    exp = object.__new__(exp_vdm.Experiment_VDM)   # __init__ would build the data pipeline; only the optimizer is needed
    exp.config = config
    model = mvel.VDM(mv.VDMConfig(**config.model))
    flat = npz_params(os.path.join(fixtures, 'mulan_tiny.npz'))
    params = FrozenDict(of.unflatten({n: jnp.asarray(v) for n, v in flat.items()}))
    s0 = train_state.TrainState.create(apply_fn=model.apply, variables=FrozenDict({'params': params}),
                                       optax_optimizer=exp.get_optimizer)
    lr = exp.get_lr_schedule()(s0.step)
    assert float(lr) == 0.
    s1 = s0.apply_gradients(grads=jax.tree_util.tree_map(jnp.zeros_like, s0.params), lr=lr,
                            ema_rate=config.optimizer.ema_rate)
    paths = save_states([s0, s1], os.path.join(work, 'mulan_tiny'), max_to_keep=100)   # ldm/experiment.py: 100
    # the EMA update x + (1 - rate)(y - x) with y = x turns the parameters' -0.0 into +0.0 (1,219 of them): ckpt-2's
    # ema_params are the npz's plus 0.0, bit for bit, while its params keep the signs (a reader that mixes them up shows)
    plus_zero = {n: v + np.float32(0) for n, v in flat.items()}
    check_restore(paths, [dict(params=flat, ema_params=flat, step=0), dict(params=flat, ema_params=plus_zero, step=1)])
    return dict(optimizer=config.optimizer.to_dict(), lr_schedule_at_0=float(lr), ema_rate=config.optimizer.ema_rate,
                checkpoints={'ckpt-1': 'TrainState.create: step 0', 'ckpt-2': 'one apply_gradients, zero gradients, lr 0: step 1'})

def vdm_checkpoints(official, fixtures, work):
    import jax.numpy as jnp
    from flax.core.frozen_dict import FrozenDict
    if official not in sys.path: sys.path.insert(0, official)
    import vdm   # noqa: F401  (namespace package OFFICIAL/vdm)
    vdm_dir = os.path.join(official, 'vdm')
    gvdm = of.load_module('vdm.model_vdm', os.path.join(vdm_dir, 'model_vdm.py'))
    train_state = of.load_module('vdm.train_state', os.path.join(vdm_dir, 'train_state.py'))
    of.load_module('vdm.utils', os.path.join(vdm_dir, 'utils.py'))
    stub_dataset('vdm.dataset')
    experiment = of.load_module('vdm.experiment', os.path.join(vdm_dir, 'experiment.py'))
    config = load_config(os.path.join(vdm_dir, 'configs', 'cifar10.py'), of.vdm_config(True))
    Exp = type('Experiment', (experiment.Experiment,), {m: None for m in experiment.Experiment.__abstractmethods__})
    exp = object.__new__(Exp)
    exp.config = config
    model = gvdm.VDM(gvdm.VDMConfig(**config.model))
    flat = npz_params(os.path.join(fixtures, 'vdm_tiny.npz'))
    params = FrozenDict(of.unflatten({n: jnp.asarray(v) for n, v in flat.items()}))
    s0 = train_state.TrainState.create(apply_fn=model.apply, variables=FrozenDict({'params': params}),
                                       optax_optimizer=exp.get_optimizer)
    paths = save_states([s0], os.path.join(work, 'vdm_tiny'), max_to_keep=5)   # vdm/experiment.py: 5
    check_restore(paths, [dict(params=flat, ema_params=flat, step=0)])
    return dict(optimizer=config.optimizer.to_dict(), checkpoints={'ckpt-1': 'TrainState.create: step 0'})

def pack(work, path, meta):
    "A reproducible tar.xz of the written folders (sorted names, no owners, mtime 0) plus meta.json."
    def info(name, size):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, '', ''
        return ti
    with tarfile.open(path, 'w:xz', preset=9) as tar:
        blob = json.dumps(meta, indent=1, sort_keys=True).encode()
        tar.addfile(info('meta.json', len(blob)), io.BytesIO(blob))
        for root, dirs, files in sorted(os.walk(work)):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(root, f)
                with open(full, 'rb') as fh:
                    tar.addfile(info(os.path.relpath(full, work), os.path.getsize(full)), fh)
    with tarfile.open(path) as tar:
        for m in tar.getmembers(): print(f'  {m.name:50s} {m.size:>10,d} bytes')
    print(f'{path}: {os.path.getsize(path) / 1e6:.3f} MB')

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--official', default='/work/scratch15/official', help='folder with mulan/ldm/... and vdm/...')
    ap.add_argument('--fixtures', default='tests/fixtures/official', help='holds mulan_tiny.npz, vdm_tiny.npz; gets the archive')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print('mulan_tiny', flush=True)
        mulan = mulan_checkpoints(a.official, a.fixtures, work)
        print('vdm_tiny', flush=True)
        vdm_meta = vdm_checkpoints(a.official, a.fixtures, work)
        versions = {p: md.version(p) for p in ('jax', 'jaxlib', 'flax', 'numpy', 'optax', 'clu', 'tensorflow-cpu',
                                               'protobuf', 'msgpack', 'ml_collections')}
        meta = dict(commits=of.COMMITS, versions=versions, script='tools/official_checkpoint.py',
                    params_from={'mulan_tiny': 'mulan_tiny.npz', 'vdm_tiny': 'vdm_tiny.npz'},
                    mulan_tiny=dict(config=of.mulan_config(True), **mulan), vdm_tiny=dict(config=of.vdm_config(True), **vdm_meta))
        pack(work, os.path.join(a.fixtures, ARCHIVE), meta)
        print(json.dumps(versions))

if __name__ == '__main__':
    main()
