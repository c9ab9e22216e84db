#!/usr/bin/env python
"""A CIFAR-shaped stand-in made of natural images, offline: 32×32 colour crops of scikit-learn's two embedded
photographs (`sklearn.datasets.load_sample_images`: china.jpg and flower.jpg, 427×640×3 each), written as an `.npz`
(arrays `train` and `test`, uint8, N×3×32×32) that `--data PATH` reads.

Training crops come from the left 75% of each photograph's columns, test crops from the right 25%, so no test pixel
was seen in training. Crop corners are drawn with a seeded generator; half the training crops are mirrored.

    python tools/photo_patches.py --out /tmp/photo_patches.npz                       # 20000 train, 256 test
    mulan_train --preset cifar10-mulan --data /tmp/photo_patches.npz --set channels=16 n_blocks=2 ...

Used by issue 18's `cifar10-mulan`-shaped solver benchmark (nbs/10_likelihood.ipynb), where no CIFAR-10 is at hand.
"""
import argparse
import numpy as np
from sklearn.datasets import load_sample_images


def crops(photos, n, side, columns, rng, mirror):
    "n crops of side×side from the given column range (fractions) of the photos, N×3×side×side uint8."
    out = np.empty((n, 3, side, side), np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w, _ = photo.shape
        lo, hi = int(columns[0] * w), int(columns[1] * w) - side
        y, x = rng.integers(0, h - side + 1), rng.integers(lo, hi + 1)
        crop = photo[y:y + side, x:x + side].transpose(2, 0, 1)
        out[i] = crop[:, :, ::-1] if mirror and rng.random() < 0.5 else crop
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='the .npz to write')
    p.add_argument('--train', type=int, default=20000, help='training crops')
    p.add_argument('--test', type=int, default=256, help='test crops')
    p.add_argument('--side', type=int, default=32, help='crop side in pixels')
    p.add_argument('--seed', type=int, default=0, help='seeds the crop corners')
    a = p.parse_args(argv)
    if min(a.train, a.test, a.side) < 1: p.error('--train, --test and --side must be >= 1')
    photos = load_sample_images().images
    rng = np.random.default_rng(a.seed)
    train = crops(photos, a.train, a.side, (0, 0.75), rng, mirror=True)
    test = crops(photos, a.test, a.side, (0.75, 1), rng, mirror=False)
    np.savez(a.out, train=train, test=test)
    print(f'{a.out}: train {train.shape}, test {test.shape}, mean level {train.mean():.1f}')


if __name__ == '__main__': main()
