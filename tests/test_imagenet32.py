"""ImageNet-32 from a local folder (issue 16, point 2): TFDS's `downsampled_imagenet/32x32` record shards and the
`train_32x32`/`valid_32x32` PNG folders, written here by the test's own writer (its own CRC-32C and protobuf
encoding), read back exactly and in order, cached as .npy (reused, renewed when a file changes), and damaged or
missing files named in one line."""
import io, os, struct
from pathlib import Path
import numpy as np
import pytest, torch
from PIL import Image
import mulan_nb.data as data_module
from mulan_nb.data import load_data, load_imagenet32, tfrecord_records, imagenet32_files
from conftest import run_cli, QUIET, TINY_MODEL

# --- an independent writer: CRC-32C by table, tf.train.Example by hand --------------------------------------------
_TABLE = []
for n in range(256):
    c = n
    for _ in range(8): c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    _TABLE.append(c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data: c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    c = crc32c(data)
    return ((c >> 15 | c << 17) + 0xA282EAD8) & 0xFFFFFFFF


def tf_frame(record: bytes) -> bytes:
    n = struct.pack('<Q', len(record))
    return n + struct.pack('<I', masked(n)) + record + struct.pack('<I', masked(record))


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0)); v >>= 7
        if not v: return bytes(out)


def ld(number: int, payload: bytes) -> bytes: return varint(number << 3 | 2) + varint(len(payload)) + payload


def tf_example(**features) -> bytes:
    "tf.train.Example with bytes features (bytes) and int64 features (int)."
    def feature(v): return ld(1, ld(1, v)) if isinstance(v, bytes) else ld(3, ld(1, varint(v)))   # bytes_list / int64_list (packed)
    return ld(1, b''.join(ld(1, ld(1, k.encode()) + ld(2, feature(v))) for k, v in features.items()))


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO(); Image.fromarray(a).save(buf, 'PNG'); return buf.getvalue()


def write_shards(folder: Path, tfds_split: str, images: np.ndarray, n_shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, chunk in enumerate(np.array_split(images, n_shards)):
        p = folder / f'downsampled_imagenet-{tfds_split}.tfrecord-{k:05d}-of-{n_shards:05d}'
        p.write_bytes(b''.join(tf_frame(tf_example(image=png_bytes(a), label=7)) for a in chunk)); paths.append(p)
    return paths


def write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f'{i + 1:07d}.png' for i in range(len(images))]
    for p, a in zip(paths, images): p.write_bytes(png_bytes(a))
    return paths


def pictures(n, seed): return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_the_writer_itself_matches_the_crc32c_check_value():
    assert crc32c(b'123456789') == 0xE3069283
    assert tf_example(image=b'ab')[:4] == b'\x0a\x11\x0a\x0f'


@pytest.mark.parametrize('layout', ['flat', 'tfds'])
def test_record_shards_and_png_folders_give_the_same_images_in_order(tmp_path, layout):
    train, valid = pictures(11, 0), pictures(5, 1)
    records, pngs = tmp_path / 'records', tmp_path / 'pngs'
    shard_dir = records / 'downsampled_imagenet/32x32/2.0.0' if layout == 'tfds' else records
    write_shards(shard_dir, 'train', train, 3); write_shards(shard_dir, 'validation', valid, 1)
    write_pngs(pngs / 'train_32x32', train); write_pngs(pngs / 'valid_32x32', valid)
    for split, want in (('train', train), ('test', valid)):
        a, b = (load_data('imagenet32', split, root=r) for r in (records, pngs))
        assert a.images.dtype == torch.uint8 and a.K == 256 and a.data_shape == (3, 32, 32) and a.name == f'imagenet32-{split}'
        assert np.array_equal(a.images.numpy(), want.transpose(0, 3, 1, 2))      # the written pixels, shard by shard, in order
        assert torch.equal(a.images, b.images)                                    # both forms: the same array
    assert len(list(records.glob('imagenet32-train-tfrecord-*.npy'))) == 1 and len(list(pngs.glob('imagenet32-test-png-*.npy'))) == 1


def test_the_cache_is_read_instead_of_the_files_and_renewed_when_one_changes(tmp_path, monkeypatch):
    imgs = pictures(6, 2)
    paths = write_pngs(tmp_path / 'train_32x32', imgs)
    first = load_imagenet32(tmp_path, 'train', progress=False)
    [cache] = tmp_path.glob('imagenet32-train-png-*.npy')
    assert np.array_equal(np.load(cache), first.images.numpy())
    def refuse(*a, **k): raise AssertionError('decoded a PNG although the cache is valid')
    with monkeypatch.context() as m:
        m.setattr(data_module, 'png_levels', refuse)
        assert torch.equal(load_imagenet32(tmp_path, 'train', progress=False).images, first.images)
        paths[2].write_bytes(png_bytes(imgs[0]))                                  # one image replaced
        st = paths[2].stat(); os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a coarse clock would not see it: the signature is names, sizes, mtimes
        with pytest.raises(AssertionError, match='decoded a PNG'): load_imagenet32(tmp_path, 'train', progress=False)
    renewed = load_imagenet32(tmp_path, 'train', progress=False)
    assert np.array_equal(renewed.images[2].numpy(), imgs[0].transpose(2, 0, 1))
    [new_cache] = tmp_path.glob('imagenet32-train-png-*.npy')
    assert new_cache != cache and not cache.exists()                             # the stale cache is gone
    paths[-1].unlink()                                                           # one image removed
    assert len(load_imagenet32(tmp_path, 'train', progress=False)) == 5
    assert not list(tmp_path.glob('*.tmp*'))                                     # written through a temporary file, none left


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match='imagenet32 needs --root'): load_data('imagenet32', 'train')
    with pytest.raises(FileNotFoundError) as e: load_data('imagenet32', 'test', root=tmp_path)
    assert str(e.value) == (f"imagenet32 test images not found under {tmp_path}: expected valid_32x32/*.png or TFDS's "
                            "downsampled_imagenet-validation.tfrecord-NNNNN-of-NNNNN shards")
    shards = write_shards(tmp_path, 'train', pictures(6, 3), 3)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match='missing downsampled_imagenet-train.tfrecord-00001-of-00003'): load_data('imagenet32', root=tmp_path)


@pytest.mark.parametrize('damage, words', [
    (lambda b: b[:-3], 'record 1 is damaged or cut short'),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], 'record 0 is damaged (the checksum of its data does not match)'),
    (lambda b: bytes([b[0] ^ 1]) + b[1:], 'record 0 is damaged or cut short'),
    (lambda b: tf_frame(tf_example(label=3)) + b, "record 0: no bytes feature 'image'"),
    (lambda b: tf_frame(tf_example(image=b'\x89PNG broken')) + b, 'record 0): not a readable 8-bit PNG'),
    (lambda b: tf_frame(tf_example(image=png_bytes(pictures(1, 9)[0][:16]))) + b, 'record 0): the image is 32×16, expected 32×32'),
])
def test_a_damaged_shard_is_named_with_its_record(tmp_path, damage, words):
    [shard] = write_shards(tmp_path, 'validation', pictures(2, 4), 1)
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ValueError) as e: load_data('imagenet32', 'test', root=tmp_path)
    msg = str(e.value)
    assert str(shard) in msg and words in msg and '\n' not in msg, msg
    assert not list(tmp_path.glob('*.npy'))                                      # nothing cached from a damaged set


def test_a_damaged_png_is_named(tmp_path):
    paths = write_pngs(tmp_path / 'valid_32x32', pictures(3, 5))
    paths[1].write_bytes(paths[1].read_bytes()[:60])
    with pytest.raises(ValueError, match=f'{paths[1]}: not a readable 8-bit PNG'): load_data('imagenet32', 'test', root=tmp_path)


def test_mulan_train_and_eval_read_imagenet32_from_root(tmp_path):
    from mulan_nb.cli import train_main, eval_main
    root = tmp_path / 'data'
    write_shards(root, 'train', pictures(16, 6), 2); write_pngs(root / 'valid_32x32', pictures(4, 7))
    out = tmp_path / 'run'
    code, err = run_cli(train_main, ['--out', str(out), '--preset', 'digits-vdm', '--data', 'imagenet32', '--root', str(root), '--steps', '2', *QUIET, *TINY_MODEL])
    assert code == 0, err
    from mulan_nb.model import load_checkpoint
    state = load_checkpoint(out / 'checkpoint.pt')
    assert state['config']['data_shape'] == (3, 32, 32) and state['config']['K'] == 256 and state['train']['root'] == str(root)
    code, err = run_cli(eval_main, [str(out / 'checkpoint.pt'), '--n-t', '1', '--first', '2', '--no-progress'])
    assert code == 0, err


def test_a_file_that_is_not_a_tfrecord_an_unknown_split_and_an_empty_set_are_named(tmp_path):
    with pytest.raises(ValueError) as e: tfrecord_records(b'12345', 'f.tfrecord')
    assert str(e.value) == 'f.tfrecord: not a TFRecord file (5 bytes, no complete record)'
    with pytest.raises(ValueError, match="unknown imagenet32 split 'validation': choose 'train' or 'test'"): imagenet32_files(tmp_path, 'validation')
    (tmp_path / 'downsampled_imagenet-train.tfrecord-00000-of-00001').write_bytes(b'')   # a shard set holding no record
    with pytest.raises(ValueError, match='the tfrecord files hold no images'): load_data('imagenet32', 'train', root=tmp_path)
    assert not list(tmp_path.glob('*.npy'))   # nothing cached
