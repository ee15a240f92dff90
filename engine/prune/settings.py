"""Named per-layer settings of PFEC filter pruning (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017) and of later work that reuses its code.

Sources: the paper (§4.2-4.3); its public re-implementation in
github.com/Eric-mingjie/rethinking-network-pruning, `cifar/l1-norm-pruning/res56prune.py`,
`res110prune.py`, `vggprune.py` and `imagenet/l1-norm-pruning/prune.py` (A and B); and
github.com/lehduong/NPTM, `norm-pruning/cifar/l1-norm-pruning/` (C and D for the ResNets, B and C
for VGG-16, which are not in the paper).
"""

from __future__ import annotations

# ResNet settings prune the first conv of each residual block by a per-stage fraction and skip
# the listed layers, numbered as in the paper: convs from 1 at the stem, shortcut convs not
# counted, so the first conv of block b (0-based over the whole network) is layer 2 + 2b.
RESNET: dict[str, dict[str, tuple[tuple[float, ...], tuple[int, ...]]]] = {
    "resnet56": {
        "A": ((0.1, 0.1, 0.1), (16, 20, 38, 54)),
        "B": ((0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54)),
        "C": ((0.6, 0.5, 0.4), (16, 18, 20, 34, 38, 54)),
        "D": ((0.6, 0.6, 0.6), (16, 18, 20, 34, 38, 54)),
    },
    "resnet110": {
        "A": ((0.5, 0.0, 0.0), (36,)),
        "B": ((0.5, 0.4, 0.3), (36, 38, 74)),
        "C": ((0.5, 0.5, 0.5), (36, 38, 74)),
        "D": ((0.5, 0.6, 0.7), (36, 38, 74)),
    },
    "resnet34": {
        "A": ((0.3, 0.3, 0.3, 0.0), (2, 8, 14, 16, 26, 28, 30, 32)),
        "B": ((0.5, 0.6, 0.4, 0.0), (2, 8, 14, 16, 26, 28, 30, 32)),
    },
}
RESNET_BLOCKS: dict[str, int] = {"resnet56": 27, "resnet110": 54, "resnet34": 16}

# VGG settings give the filters kept in each of the 13 convs. A is VGG-16-pruned-A: half the
# filters of conv 1 and of convs 8-13.
VGG: dict[str, dict[str, tuple[int, ...]]] = {
    "vgg16": {
        "A": (32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256),
        "B": (32, 64, 128, 128, 196, 196, 196, 196, 196, 256, 256, 256, 256),
        "C": (32, 64, 64, 128, 128, 128, 128, 196, 196, 196, 196, 196, 196),
    },
}

SETTINGS: dict[str, tuple[str, ...]] = {arch: tuple(s) for arch, s in {**RESNET, **VGG}.items()}
