"Reading the official checkpoints (mulan_nb.official): the committed clu.checkpoint files give the fixture parameters bit for bit; bad input is one line. No JAX or TensorFlow."
import tarfile
from pathlib import Path
import numpy as np
import pytest
from mulan_nb.official import flatten_tree, official_checkpoint_numbers, read_official_checkpoint

FIXTURES = Path(__file__).parent / 'fixtures' / 'official'


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "The committed archive of official checkpoint folders, unpacked."
    out = tmp_path_factory.mktemp('official')
    with tarfile.open(FIXTURES / 'checkpoints.tar.xz') as tar:
        tar.extractall(out, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    return out


def npz_params(name):
    z = np.load(FIXTURES / name)
    return {k[len('params/'):]: z[k] for k in z.files if k.startswith('params/')}


def assert_same_bits(tree, want):
    got = flatten_tree(tree)
    assert set(got) == set(want)
    for n, v in want.items():
        assert got[n].dtype == v.dtype and got[n].shape == v.shape and got[n].tobytes() == v.tobytes(), n


def test_mulan_checkpoint_matches_fixture(work):
    d = work / 'mulan_tiny' / 'checkpoints-0'
    p = npz_params('mulan_tiny.npz')
    assert official_checkpoint_numbers(d) == [1, 2]
    latest = read_official_checkpoint(d)
    assert (latest['number'], latest['step']) == (2, 1) and latest['path'] == str(d / 'ckpt-2.flax')
    assert_same_bits(latest['params'], p)
    # the official EMA update x + (1 - 0.9999)(y - x) with y = x makes each -0.0 a +0.0: ema_params differ in bits only there
    assert_same_bits(latest['ema_params'], {n: v + np.float32(0) for n, v in p.items()})
    assert any(np.signbit(v).sum() != np.signbit(flatten_tree(latest['ema_params'])[n]).sum() for n, v in p.items())
    first = read_official_checkpoint(d, 1)
    assert (first['number'], first['step']) == (1, 0)
    assert_same_bits(first['params'], p)
    assert_same_bits(first['ema_params'], p)
    arr = flatten_tree(first['ema_params'])['score_model/conv_in/kernel']
    assert arr.shape == (3, 3, 15, 32) and arr.flags.writeable


def test_vdm_checkpoint_matches_fixture(work):
    ck = read_official_checkpoint(work / 'vdm_tiny' / 'checkpoints-0')
    assert (ck['number'], ck['step']) == (1, 0)
    p = npz_params('vdm_tiny.npz')
    assert_same_bits(ck['params'], p)
    assert_same_bits(ck['ema_params'], p)


def _copy(src, dst, edit=lambda name, b: b):
    "Copy a checkpoint folder; edit(name, bytes) changes a file's bytes, or drops it by returning None."
    dst.mkdir()
    for p in src.iterdir():
        b = edit(p.name, p.read_bytes())
        if b is not None: (dst / p.name).write_bytes(b)
    return dst


def _state(ema_entries=b'\x81\xa1w' + b'\xc7\x15\x01\x93\x91\x02\xa7float32\xc4\x08' + bytes(8)):
    "A minimal official-looking state by hand: {'step': 5, 'params': {'w': float32 zeros (2,)}, 'ema_params': ..., 'opt_state': {}}."
    w = b'\xc7\x15\x01\x93\x91\x02\xa7float32\xc4\x08' + bytes(8)   # extension 1, 21 bytes: [[2], 'float32', 8 bytes]
    return b'\x84\xa4step\x05\xa6params\x81\xa1w' + w + b'\xaaema_params' + ema_entries + b'\xa9opt_state\x80'


def test_hand_made_state(tmp_path):
    (tmp_path / 'ckpt-7.flax').write_bytes(_state())
    ck = read_official_checkpoint(tmp_path)
    assert (ck['number'], ck['step']) == (7, 5)
    assert ck['params']['w'].dtype == np.float32 and ck['ema_params']['w'].tolist() == [0., 0.]


def _flax(fn):
    return lambda name, b: fn(b) if name == 'ckpt-2.flax' else b


@pytest.mark.parametrize('case, edit, target, args, error, words', [
    ('missing folder', None, lambda d: d / 'nowhere', (), FileNotFoundError, 'no such folder'),
    ('file, not folder', None, lambda d: d / 'ckpt-2.flax', (), FileNotFoundError, 'a file, not a checkpoint folder'),
    ('checkpoint prefix', None, lambda d: d / 'ckpt-2', (), FileNotFoundError, 'pass its folder'),
    ('missing number', None, None, (3,), FileNotFoundError, 'no ckpt-3.flax; it holds N = 1, 2'),
    ('number not an int', None, None, ('2',), ValueError, 'must be an integer'),
    ('workdir', None, lambda d: d.parent, (), FileNotFoundError, 'checkpoints-0: pass that folder'),
    ('TensorFlow files only', lambda name, b: None if name.endswith('.flax') else b, None, (), ValueError,
     'TensorFlow checkpoint files (ckpt-N.index) without ckpt-N.flax'),
    ('mulan_nb run folder', lambda name, b: None, None, (), ValueError, 'a mulan_nb run folder'),
    ('empty file', _flax(lambda b: b''), None, (), ValueError, 'truncated'),
    ('cut after one byte', _flax(lambda b: b[:1]), None, (), ValueError, 'truncated'),
    ('cut in an array', _flax(lambda b: b[:100]), None, (), ValueError, 'truncated: 128 more bytes needed'),
    ('cut in the middle', _flax(lambda b: b[:len(b) // 2]), None, (), ValueError, 'truncated'),
    ('last byte missing', _flax(lambda b: b[:-1]), None, (), ValueError, 'truncated'),
    ('trailing bytes', _flax(lambda b: b + b'\x00\x00'), None, (), ValueError, 'trailing bytes after the state (2)'),
    ('bad header byte', _flax(lambda b: b[:1] + b'\xc1' + b[2:]), None, (), ValueError, 'byte 0xc1 starts no msgpack value'),
    ('bad dtype', _flax(lambda b: b.replace(b'float32', b'float99', 1)), None, (), ValueError, "array dtype 'float99'"),
    ('object dtype', _flax(lambda b: b.replace(b'\xa7float32', b'\xa6object', 1)), None, (), ValueError, "array dtype 'object'"),
    ('length vs shape', _flax(lambda b: b.replace(b'float32\xc4\x80', b'float32\xc4\x7c', 1)), None, (), ValueError,
     '124 bytes of data for a float32 array of shape (32,)'),
    ('extension length', _flax(lambda b: b.replace(b'\xc7\x8d\x01', b'\xc7\x8c\x01', 1)), None, (), ValueError,
     'an extension of 140 bytes that holds 141'),
    ('unknown extension', _flax(lambda b: b.replace(b'\xc7\x8d\x01', b'\xc7\x8d\x09', 1)), None, (), ValueError,
     'msgpack extension type 9'),
    ('not msgpack', _flax(lambda b: b'PK\x03\x04' + b[4:]), None, (), ValueError, 'not a Flax state'),
    ('another Flax state', _flax(lambda b: b'\x81\xa6params\x80'), None, (), ValueError,
     "keys ['params'], not the official TrainState (no step, ema_params, opt_state)"),
    ('ema_params empty', _flax(lambda b: _state(b'\x80')), None, (), ValueError, 'params and ema_params are not the same tree'),
    ('ema_params other shape', _flax(lambda b: _state(b'\x81\xa1w\xc7\x10\x01\x93\x90\xa7float32\xc4\x04' + bytes(4))), None, (),
     ValueError, 'params and ema_params are not the same tree'),
    ('step not an integer', _flax(lambda b: _state().replace(b'step\x05', b'step\xc0')), None, (), ValueError, 'step None is not an integer'),
    ('step a boolean', _flax(lambda b: _state().replace(b'step\x05', b'step\xc3')), None, (), ValueError, 'step True is not an integer'),
    ('chunks that do not join', _flax(lambda b: _state().replace(b'step\x05', b'step\x83\xb9__msgpack_chunked_array__\xc3\xa5shape\x80\xa6chunks\x80')),
     None, (), ValueError, 'a chunked array at step that does not join'),
    ('bad complex', _flax(lambda b: _state().replace(b'step\x05', b'step\xd4\x02\xc0')), None, (), ValueError, 'complex number None'),
    ('top level a chunked array', _flax(lambda b: b'\x83\xb9__msgpack_chunked_array__\xc3\xa5shape\x81\xa10\x01\xa6chunks\x81\xa10'
                                                  + b'\xc7\x11\x01\x93\x91\x01\xa7float32\xc4\x04' + bytes(4)), None, (),
     ValueError, 'not a Flax state (a msgpack map of arrays)'),
])
def test_bad_input_is_one_line(work, tmp_path, case, edit, target, args, error, words):
    src = work / 'mulan_tiny' / 'checkpoints-0'
    d = src if edit is None else _copy(src, tmp_path / 'ck', edit)
    if case == 'mulan_nb run folder': (d / 'checkpoint.pt').write_bytes(b'')
    where = d if target is None else target(d)
    with pytest.raises(error) as e:
        read_official_checkpoint(where, *args)
    msg = str(e.value)
    assert '\n' not in msg and len(msg) < 300, msg
    assert words in msg, msg
    if case != 'number not an int': assert str(where) in msg, msg


# --- load_official and the two KL accountings (issue 15, point 5) ---
import contextlib, io, json, math, shutil
import torch
from mulan_nb.official import load_official, latent_terms, both_accountings
from mulan_nb.likelihood import dense_elbo
from conftest import run_cli

SHAPE = (3, 8, 6)   # the fixtures' images, C, H, W
D_NATS = math.prod(SHAPE) * math.log(2)   # nats per bit per dimension


def _fixture(name):
    with np.load(FIXTURES / name) as d: return {k: d[k] for k in d.files}


def _images():
    return torch.from_numpy(_fixture('mulan_tiny.npz')['inputs/images'].astype(np.int64)).permute(0, 3, 1, 2)


def _surrogate_to_bound_gap():
    "Per image, bpd: log C(10, 3) minus the official code's own softmax KL of the fixture's images (its float64 run)."
    return (math.log(math.comb(10, 3)) - _fixture('mulan_tiny.npz')['f64/topk/kl_softmax']) / D_NATS


def test_load_official_reports_what_it_loaded(work):
    d = work / 'mulan_tiny' / 'checkpoints-0'
    model, info = load_official(d, kind='mulan_velocity', data_shape=SHAPE, latent_k=3)
    assert (info['kind'], info['number'], info['step'], info['weights'], info['path']) == ('mulan_velocity', 2, 1, 'EMA', str(d / 'ckpt-2.flax'))
    official = json.loads(str(_fixture('mulan_tiny.npz')['meta_json']))['config']
    assert {k: v for k, v in info['official_config'].items() if k != 'vdm_type'} == {k: official[k] for k in info['official_config'] if k != 'vdm_type'}
    assert model.config.prediction == 'v' and model.config.kl == 'softmax' and not model.training
    raw, raw_info = load_official(d, 1, 'mulan_velocity', SHAPE, ema=False, latent_k=3)
    assert (raw_info['number'], raw_info['step'], raw_info['weights']) == (1, 0, 'raw')
    vdm, vdm_info = load_official(work / 'vdm_tiny' / 'checkpoints-0', kind='vdm', data_shape=SHAPE)
    assert vdm.config.latent == 'none' and vdm_info['official_config']['gamma_type'] == 'learnable_scalar'


@pytest.mark.parametrize('kwargs, error, words', [
    (dict(kind='mulan'), ValueError, "unknown kind 'mulan'"),
    (dict(ema=1), ValueError, 'ema must be True or False'),
    (dict(dtype=torch.int32), ValueError, 'dtype must be a floating torch dtype'),
    (dict(number=9, latent_k=3), FileNotFoundError, 'no ckpt-9.flax; it holds N = 1, 2'),
    (dict(kind='vdm'), ValueError, "a MuLAN parameter tree (it has encoder_model/...) given as kind='vdm'"),
    (dict(), ValueError, "latent_k=15 does not fit the checkpoint's latent of m = 10"),
    (dict(data_shape=(3, 32, 32), latent_k=3), ValueError, 'gamma/dense_out_a has 144 outputs, data_shape (3, 32, 32) has 3072 dimensions'),
])
def test_load_official_bad_input_is_one_line(work, kwargs, error, words):
    with pytest.raises(error) as e:
        load_official(work / 'mulan_tiny' / 'checkpoints-0', **{'data_shape': SHAPE, **kwargs})
    assert '\n' not in str(e.value) and words in str(e.value), str(e.value)


def test_nan_weights_are_named(work, tmp_path):
    src = work / 'mulan_tiny' / 'checkpoints-0'
    b = bytearray((src / 'ckpt-2.flax').read_bytes())
    at = b.index(b'float32', b.index(b'ema_params')) + 7
    at += {0xc4: 2, 0xc5: 3, 0xc6: 5}[b[at]]
    b[at:at + 4] = np.float32('nan').tobytes()
    d = _copy(src, tmp_path / 'ck', lambda name, data: bytes(b) if name == 'ckpt-2.flax' else data)
    with pytest.raises(ValueError, match=r"ckpt-2\.flax: 1 ema_params array\(s\) hold non-finite values"):
        load_official(d, data_shape=SHAPE, latent_k=3)
    assert load_official(d, data_shape=SHAPE, ema=False, latent_k=3)[1]['weights'] == 'raw'


def test_latent_terms_are_the_official_surrogate_and_log_binomial(work):
    model, _ = load_official(work / 'mulan_tiny' / 'checkpoints-0', data_shape=SHAPE, dtype=torch.float64, latent_k=3)
    terms = latent_terms(model, _images())
    np.testing.assert_allclose(terms['softmax'].numpy() * D_NATS, _fixture('mulan_tiny.npz')['f64/topk/kl_softmax'], rtol=1e-12)
    np.testing.assert_allclose(terms['bound'].numpy() * D_NATS, math.log(120), rtol=1e-14)
    assert (terms['softmax'] < terms['bound']).all()


def test_both_accountings_equal_a_second_evaluation_with_the_bound(work):
    "One dense ELBO of the official (surrogate) model, the latent term swapped, is the dense ELBO of the same weights with kl='bound' and the same seed."
    model, _ = load_official(work / 'mulan_tiny' / 'checkpoints-0', data_shape=SHAPE, latent_k=3)
    bound = type(model)(model.config, kl='bound').eval()
    bound.load_state_dict(model.state_dict())
    x = _images()
    torch.manual_seed(3); once = dense_elbo(model, x, n_t=4)
    torch.manual_seed(3); again = dense_elbo(bound, x, n_t=4)
    both = both_accountings(model, x, once.bpd, once.terms['latent'])
    torch.testing.assert_close(both['bound']['bpd'], again.bpd.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(both['bound']['bpd'] - both['softmax']['bpd'], torch.from_numpy(_surrogate_to_bound_gap()), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="not this model's 'softmax' term on these images"):
        both_accountings(model, x.flip(0), once.bpd, once.terms['latent'])


# --- mulan_eval --official (issue 15, point 5) ---
@pytest.fixture
def official_run(work, tmp_path):
    "Copies of the two official fixture folders and the MuLAN fixture's four images as an .npz data set."
    for name in ('mulan_tiny', 'vdm_tiny'): shutil.copytree(work / name, tmp_path / name)
    images = _fixture('mulan_tiny.npz')['inputs/images']   # N, H, W, C uint8
    np.savez(tmp_path / 'tiny.npz', train=images, test=images)
    return tmp_path


def _eval(args):
    "mulan_eval in-process: (exit code, stdout, stderr)."
    from mulan_nb.cli import eval_main
    out = io.StringIO()
    with contextlib.redirect_stdout(out): code, err = run_cli(eval_main, args)
    return code, out.getvalue(), err


def _tiny(run, *more, kind='mulan_velocity', folder='mulan_tiny'):
    return ['--official', str(run / folder / 'checkpoints-0'), '--kind', kind, '--data', str(run / 'tiny.npz'), '--no-progress', *more]


def test_eval_official_elbo_reports_both_accountings(official_run):
    code, out, err = _eval(_tiny(official_run, '--latent-k', '3', '--n-t', '4', '--seed', '5'))
    assert code == 0, err
    res = json.loads((official_run / 'mulan_tiny' / 'checkpoints-0' / 'eval-elbo-test-ckpt-2.json').read_text())   # next to the checkpoint
    assert (res['step'], res['official']['number'], res['official']['kind'], res['weights'], res['n_images']) == (1, 2, 'mulan_velocity', 'EMA', 4)
    acc = res['kl_accountings']
    assert acc['softmax']['own'] and not acc['bound']['own'] and 'NOT a bound' in acc['softmax']['meaning']
    assert acc['bound']['bpd'] - acc['softmax']['bpd'] == pytest.approx(_surrogate_to_bound_gap().mean(), abs=1e-6)
    assert acc['softmax']['bpd'] == pytest.approx(res['bpd'], abs=1e-6)
    model, _ = load_official(official_run / 'mulan_tiny' / 'checkpoints-0', data_shape=SHAPE, latent_k=3)   # the same evaluation by hand
    torch.manual_seed(5)
    np.testing.assert_allclose(res['per_image_bpd'], dense_elbo(model, _images(), n_t=4).bpd.numpy(), rtol=1e-6)
    assert 'NOT a bound' in out and 'a valid upper bound' in out


def test_eval_official_ode_reports_both_accountings(official_run):
    out_file = official_run / 'ode.json'
    code, _, err = _eval(_tiny(official_run, '--latent-k', '3', '--method', 'ode', '--solver', 'dopri5', '--rtol', '0.1', '--atol', '0.1',
                               '--check-images', '0', '--ode-batch', '4', '--out', str(out_file)))
    assert code == 0, err
    res = json.loads(out_file.read_text()); acc = res['kl_accountings']
    assert acc['bound']['bpd'] - acc['softmax']['bpd'] == pytest.approx(_surrogate_to_bound_gap().mean(), abs=1e-6)
    assert acc['softmax']['bpd'] < acc['bound']['bpd']
    np.testing.assert_allclose(res['per_image_latent_bpd'], _fixture('mulan_tiny.npz')['f64/topk/kl_softmax'] / D_NATS, rtol=1e-4)   # its own: the surrogate
    bound_per_image = np.array(res['per_image_bpd']) + _surrogate_to_bound_gap()   # image by image, the surrogate swapped for log C(m, k)
    se = lambda v: v.std(ddof=1) / math.sqrt(len(v))
    right, with_the_mean = se(bound_per_image), se(np.array(res['per_image_bpd']))   # the latter: the mean latent term swapped instead
    assert abs(right - with_the_mean) > 1e-6 and abs(acc['bound']['se'] - right) < abs(right - with_the_mean) / 10, (acc['bound']['se'], right, with_the_mean)


def test_eval_official_vdm_has_one_accounting(official_run):
    code, _, err = _eval(_tiny(official_run, '--n-t', '2', '--raw', kind='vdm', folder='vdm_tiny'))
    assert code == 0, err
    res = json.loads((official_run / 'vdm_tiny' / 'checkpoints-0' / 'eval-elbo-test-ckpt-1.json').read_text())
    assert res['kl_accountings'] == {} and res['weights'] == 'raw' and res['official']['kind'] == 'vdm'


@pytest.mark.parametrize('case, args, words', [
    ('checkpoint and --official', lambda r: ['ck.pt', *_tiny(r, '--latent-k', '3')], 'not both'),
    ('no --data', lambda r: ['--official', str(r / 'mulan_tiny' / 'checkpoints-0'), '--latent-k', '3'], '--official needs --data'),
    ('another kind', lambda r: _tiny(r, kind='vdm'), "given as kind='vdm'"),
    ('missing save', lambda r: _tiny(r, '--latent-k', '3', '--number', '3'), 'no ckpt-3.flax; it holds N = 1, 2'),
    ('missing folder', lambda r: ['--official', str(r / 'nowhere'), '--data', str(r / 'tiny.npz')], 'no such folder'),
    ('latent_k not given', lambda r: _tiny(r), "latent_k=15 does not fit the checkpoint's latent of m = 10"),
    ('images of another size', lambda r: ['--official', str(r / 'mulan_tiny' / 'checkpoints-0'), '--latent-k', '3', '--data', str(r / 'big.npz')],
     'has 144 outputs, data_shape (3, 32, 32)'),
    ('unknown kind', lambda r: _tiny(r, kind='mulan'), "invalid choice: 'mulan'"),
])
def test_eval_official_bad_input_is_one_line(official_run, case, args, words):
    big = np.zeros((2, 32, 32, 3), np.uint8)
    np.savez(official_run / 'big.npz', train=big, test=big)
    code, out, err = _eval(args(official_run))
    assert code == 2 and err.count('\n') == 1 and err.startswith('mulan_eval: error:') and words in err, (case, err)
