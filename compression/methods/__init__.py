"""Every compression method; importing this package registers them all.

Adding a method: its module here, one import line below, a Hydra config in
``experiments/conf/compression/``, and its tests in ``tests/compression/``.
"""

from compression.methods import (  # noqa: F401
    dedup,
    dhe,
    double_hashing,
    dpq,
    frequency_hybrid,
    hashing,
    managed_collision,
    mixed_dim,
    none,
    optembed,
    qr,
    robe,
    tt_rec,
    unified_embedding,
)
