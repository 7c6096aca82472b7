"""Signed feature hashing (Weinberger et al., ICML 2009, "Feature Hashing for Large Scale
Multitask Learning"): the hashing trick with a second hash that gives every id a sign.

An id x of a hashed table reads row ``h(x) mod M`` times ``xi(x)`` in ``{-1, +1}``; a bag
sums the signed rows. Ids that collide in a row then add with random signs, so in
expectation they cancel instead of adding up: the inner product of two hashed ids is
unbiased (the paper's Lemma 2), where the unsigned trick biases every collision upwards.
The rows are a weighted TorchRec table (the signs are its per-sample weights), so the
fbgemm kernels, quantization and sharding take it as they take the plain trick; a table
whose plain form fits its share of the budget stays exact (sign +1). Sum pooling only:
the signs weight a sum.

Example::

    ebc = compress(tables, SignedHashingConfig(budget=Budget(ratio=10)))
    ebc.describe()   # {'t_user.rows': 1000, ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compression.api import BuildContext, register
from compression.bags import pooled_lookup
from compression.config_checks import bounded
from compression.hashing import UniversalHash
from compression.idmap import KeyParams
from compression.methods.hashing import HashedEmbeddingBagCollection, HashingConfig, _cost
from compression.sizing import Plan, build_sized


@dataclass
class SignedHashingConfig(HashingConfig):
    """Signed hashing. ``budget`` picks each table's rows; or give ``rows`` (budget: null)."""

    method: ClassVar[str] = "signed_hashing"
    takes_raw_ids: ClassVar[bool] = True  # every id goes through the hash (exact tables: in-range ids only)
    fusable_tables: ClassVar[bool] = True  # rows read only through its TorchRec collections
    poolings: ClassVar[tuple[str, ...]] = ("SUM",)
    pooling_reason: ClassVar[str] = "the signs weight a sum"
    # rows of every hashed table (tables with fewer ids stay exact)
    rows: Optional[int] = bounded(None, ge=1)


class SignedHashedCollection(HashedEmbeddingBagCollection):
    """The hashing trick's tables, weighted; every hashed id weighs its row by its sign."""

    def __init__(self, tables: list[EmbeddingBagConfig], plan: Plan, ctx: BuildContext) -> None:
        super().__init__(tables, plan, ctx, weighted=True, num_hashes=2)  # function 1: the sign

    def rows_and_signs(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner row and the sign (+1 or -1, float) of every id of ``features.values()``."""
        rows, own = self.lookup(features)  # an exact table's own ids: own row, +1
        signs = torch.where(own, 1, 1 - 2 * sign_bit(self.hasher(features.values(), PRIME_31, which=1)))
        return rows, signs.to(torch.float32)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows, signs = self.rows_and_signs(features)
        signed = KeyedJaggedTensor(keys=features.keys(), values=rows, weights=signs, lengths=features.lengths(),
                                   stride=features.stride(), length_per_key=features.length_per_key())  # fmt: skip
        return pooled_lookup(self.ebc, signed)


PRIME_31 = 2**31 - 1


def sign_bit(v: torch.Tensor) -> torch.Tensor:
    """A bit of a 31-bit hash value ``v`` (int64) after a 32-bit integer finaliser.

    The universal hash is linear in the id, so its low bit alone is correlated between
    neighbouring ids (consecutive ids had the same sign 64% to 91% of the time, by seed:
    the collisions the signs are meant to cancel would not cancel); two xor-shift-multiply
    rounds break the linearity (measured: under 1% correlation at lags 1, 7 and 1000).
    Products stay below 2^59, so int64 never overflows.
    """
    for _ in range(2):
        v = ((v ^ (v >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((v ^ (v >> 16)) >> 7) & 1


@register(SignedHashingConfig)
def build(tables: list[EmbeddingBagConfig], config: SignedHashingConfig, ctx: BuildContext) -> SignedHashedCollection:
    n_features = sum(len(t.feature_names) for t in tables)
    return build_sized(
        tables, config, ctx,
        costs=lambda fmt: [_cost(t, fmt) for t in tables],
        fixed=lambda fmt: UniversalHash.nbytes(2) + KeyParams.nbytes(2, n_features) + fmt.collection(tables),
        construct=lambda plan: SignedHashedCollection(tables, plan, ctx),
    )  # fmt: skip
