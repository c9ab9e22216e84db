"""Images held as uint8 (issue 16, point 1): the same numbers as int64 images, bit for bit, everywhere the images are
used; an eighth of the memory; and run folders written when `.npy` data were held as int64 still resume."""
import hashlib, math
import numpy as np
import pytest, torch
from mulan_nb.data import load_array_file, load_data, ImageData, level_dtype
from mulan_nb.dequantization import dequantize
from mulan_nb.likelihood import dense_elbo
from mulan_nb.model import MuLAN, load_checkpoint, save_checkpoint
from mulan_nb.training import Trainer, TrainConfig, data_fingerprint

TINY = dict(channels=8, n_blocks=1, encoder_channels=8, encoder_blocks=1)


def levels_file(tmp_path):
    "60 one-channel 8×8 images of 256 levels, stored as int64, with levels 0 and 255 present (where uint8 arithmetic would wrap)."
    x = np.random.default_rng(5).integers(0, 256, (60, 1, 8, 8)).astype(np.int64); x[0] = 255; x[1] = 0
    np.save(tmp_path / 'levels.npy', x)
    return tmp_path / 'levels.npy', x


def run_config(data, out, steps=4, **kw):
    return TrainConfig(preset='digits-mulan-topk', data=str(data), model=TINY, steps=steps, batch_size=16, eval_every=0, final_n_t=2,
                       n_samples=0, out=str(out), device='cpu', log_every=1, ckpt_every=2, **kw)


def params_hash(model):
    h = hashlib.blake2b(digest_size=8)
    for v in model.state_dict().values(): h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


# The same run with the code before this change (images held as int64), recorded on the development machine (torch 2.14,
# one thread), where the new code reproduces it bit for bit (parameters' hash cd0442c7cc51016f): the four training rows'
# bpd and the final test bpd, compared to 1e-5 here, since other CPUs may round differently.
BEFORE = dict(train=[10.406607627868652, 12.317267417907715, 12.195198059082031, 10.694148063659668], test=11.616490364074707)


def test_a_training_run_on_uint8_images_is_bit_identical_to_one_on_int64_images(tmp_path):
    path, x = levels_file(tmp_path)
    torch.set_num_threads(1)
    runs = {}
    for kind in ('uint8', 'int64'):
        tr = Trainer(run_config(path, tmp_path / kind), progress=False)
        assert tr.xtrain.dtype == torch.uint8 and tr.xtest.dtype == torch.uint8
        if kind == 'int64': tr.xtrain, tr.xtest = tr.xtrain.long(), tr.xtest.long()   # the old representation, on the device
        result = tr.fit(); tr.lock.close()
        runs[kind] = params_hash(tr.model), [m['bpd'] for m in tr.metrics if m['kind'] == 'train'], result['test_bpd']
    assert runs['uint8'] == runs['int64']                               # every parameter bit, every loss
    _, train, test = runs['uint8']
    assert len(train) == 4 and np.allclose(train, BEFORE['train'], rtol=1e-5, atol=0) and math.isclose(test, BEFORE['test'], rel_tol=1e-5)


def test_every_use_of_the_images_sees_the_same_values_at_levels_up_to_255():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 8, 8)); x[0] = 255
    model = MuLAN.from_preset('digits-mulan-topk', K=256, **TINY).eval()
    def both(fn):
        out = []
        for images in (x.to(torch.uint8), x):
            torch.manual_seed(1); out.append(fn(images))
        return out
    a, b = both(lambda im: model.nelbo(im))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = both(lambda im: dense_elbo(model, im, n_t=3).bpd)
    assert torch.equal(a, b)
    g0 = torch.tensor(-13.3)
    a, b = both(lambda im: dequantize(im, 256, g0, 'truncnormal', 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_npy_images_are_held_as_uint8_when_they_fit_and_int64_beyond(tmp_path):
    path, x = levels_file(tmp_path)
    data = load_array_file(path, 'train', K=256)
    assert data.images.dtype == torch.uint8 and data.images.element_size() == 1
    assert torch.equal(data.images.long(), torch.from_numpy(x[:54]))
    assert data.images.untyped_storage().nbytes() == 60 * 64                   # the file's 60 images at a byte a pixel (the split is a view): no int64 copy kept
    np.save(tmp_path / 'wide.npy', np.full((10, 2, 2), 1000, np.int64))
    wide = load_array_file(tmp_path / 'wide.npy', K=1001)
    assert wide.images.dtype == torch.int64 and int(wide.images.max()) == 1000   # 1001 levels: not a byte
    assert level_dtype(256) == torch.uint8 and level_dtype(257) == torch.int64
    assert load_data('digits').images.dtype == torch.uint8
    assert ImageData(torch.full((1, 1, 1, 1), 200), 256, 'x').images.dtype == torch.uint8


def test_a_run_folder_written_with_int64_images_resumes(tmp_path):
    "The checkpoint of a .npy run from before holds the fingerprint of the int64 images; it must be accepted, and other data refused."
    path, x = levels_file(tmp_path)
    out = tmp_path / 'run'
    tr = Trainer(run_config(path, out, steps=2), progress=False); tr.fit(); tr.lock.close()
    state = load_checkpoint(out / 'checkpoint.pt')
    old = hashlib.blake2b(f'{tuple(x[:54].shape)}:torch.int64'.encode(), digest_size=8)   # how the old code hashed its int64 tensor
    old.update(np.ascontiguousarray(x[:54]).data)
    assert state['data_fingerprint'] != old.hexdigest()                          # the new checkpoint has the uint8 one
    save_checkpoint(out / 'checkpoint.pt', {**state, 'data_fingerprint': old.hexdigest()})
    tr = Trainer(run_config(path, out, steps=4), resume=True, progress=False)
    assert tr.step == 2
    tr.fit(); tr.lock.close()
    assert load_checkpoint(out / 'checkpoint.pt')['data_fingerprint'] == data_fingerprint(torch.from_numpy(x[:54]).to(torch.uint8))   # written anew
    other = x.copy(); other[3, 0, 0, 0] = 255 - other[3, 0, 0, 0]
    np.save(path, other)                                                         # other images under the same name
    old = hashlib.blake2b(f'{tuple(x[:54].shape)}:torch.int64'.encode(), digest_size=8); old.update(np.ascontiguousarray(x[:54]).data)
    state = load_checkpoint(out / 'checkpoint.pt'); save_checkpoint(out / 'checkpoint.pt', {**state, 'data_fingerprint': old.hexdigest()})
    with pytest.raises(ValueError, match='the training images differ'):
        Trainer(run_config(path, out, steps=6), resume=True, progress=False)
