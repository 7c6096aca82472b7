"""The deployable export (``compression.export``): saved, reloaded, same predictions."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import compression
from compression import compress, memory_report
from compression.budget import Budget
from compression.export import export_model, inputs, load_exported
from compression.quantization import Quantization, quantize_
from recsys.models import DCNv2, DLRMConfig

TABLES = [
    EmbeddingBagConfig(name="t_user", embedding_dim=16, num_embeddings=20000, feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=16, num_embeddings=3000, feature_names=["item"]),
    EmbeddingBagConfig(name="t_tags", embedding_dim=16, num_embeddings=300, feature_names=["tags"]),
]


def batch(size: int, seed: int, multi_hot: bool = True) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    tags = torch.randint(0, 4 if multi_hot else 2, (size,), generator=g) if multi_hot else torch.ones(size, dtype=torch.int64)
    values = torch.cat([torch.randint(0, 20000, (size,), generator=g), torch.randint(0, 3000, (size,), generator=g),
                        torch.randint(0, 300, (int(tags.sum()),), generator=g)])  # fmt: skip
    lengths = torch.cat([torch.ones(2 * size, dtype=torch.int32), tags.int()])
    return torch.randn(size, 4, generator=g), KeyedJaggedTensor(keys=["user", "item", "tags"], values=values, lengths=lengths)


def trained_model(method: str, quantization: Quantization | None, model: str = "dcnv2"):
    cls = compression.config_class(method)
    extra = {} if method == "none" else {"budget": Budget(ratio=4 if method == "dedup" else 10)}
    counts = {t.feature_names[0]: np.arange(t.num_embeddings)[::-1].copy() for t in TABLES}  # MGQE's tiers
    module = compress(TABLES, cls(quantization=quantization, **extra), counts=counts, seed=0)
    torch.manual_seed(0)
    net = (
        DCNv2(module, dense_in_features=4, deep_layers=[16], cross_layers=1)
        if model == "dcnv2"
        else DLRMConfig(dense_arch=[8], over_arch=[8]).build(module, 4)
    )
    if quantization is not None and quantization.aware:  # move α and the rows off their init
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(5):
            dense, kjt = batch(32, seed=100 + step)
            net(dense, kjt).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    net.eval()
    return module, net


CASES = [
    ("none", None, "dcnv2"),
    ("none", Quantization("int8"), "dlrm"),
    ("hashing", Quantization("int8"), "dcnv2"),
    ("qr", Quantization("int4"), "dcnv2"),
    ("unified_embedding", Quantization("int8"), "dcnv2"),
    ("robe", Quantization("int8"), "dcnv2"),
    ("tt_rec", None, "dcnv2"),
    ("dhe", None, "dcnv2"),
    # staged methods: exported in their deployed form, after their compacting stage
    ("dpq", None, "dcnv2"),
    ("mgqe", None, "dcnv2"),
    ("dedup", None, "dcnv2"),
    ("pep", None, "dcnv2"),
    ("deeplight", None, "dlrm"),
    ("binary", Quantization("int8"), "dcnv2"),
    ("matryoshka", Quantization("int8"), "dlrm"),
    ("mpzch", Quantization("int8"), "dcnv2"),
]
COMPACT = {"dpq": "pack", "mgqe": "pack", "dedup": "merge", "pep": "compact", "deeplight": "compact", "binary": "pack", "matryoshka": "deploy_to_budget"}  # the stage that makes the deployed form


@pytest.mark.parametrize("method, quantization, model", CASES, ids=lambda x: getattr(x, "label", lambda: x)())
def test_round_trip_gives_equal_predictions(tmp_path, method, quantization, model):
    module, net = trained_model(method, quantization, model)
    if method in COMPACT:
        getattr(module, COMPACT[method])()
        net.eval()
    if quantization is not None:
        quantize_(module, quantization)
    result = export_model(net, batch(6, seed=0), tmp_path / "model.pt2")
    assert result.method == "torch.export" and result.keys == ["user", "item", "tags"]
    assert result.bytes_on_disk == result.path.stat().st_size > 0
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed
    program = load_exported(result.path)
    with torch.no_grad():
        for size, seed, multi in ((9, 1, True), (5, 2, False), (64, 3, True)):
            b = batch(size, seed, multi)
            torch.testing.assert_close(program(*inputs(b)), net(*b), rtol=1e-6, atol=1e-6)
    if quantization is not None:
        # the quantized rows are in the artifact once (not once more per table view)
        weights = next(m.tbes[0].weights_host for m in module.modules() if hasattr(m, "tbes"))
        with zipfile.ZipFile(result.path) as z:
            sizes = [i.file_size for i in z.infolist()]
        assert sizes.count(weights.numel()) == 1
        assert result.bytes_on_disk < memory_report(module).bytes + 400_000  # + graph and dense layers


def test_quantization_aware_model_exports_as_it_trained(tmp_path):
    """QAT's fake-quantized forward = the exported integer model's forward."""
    q = Quantization("int4", aware=True)
    module, net = trained_model("none", q)
    b = batch(32, seed=7)
    with torch.no_grad():
        fake = net(*b)
    quantize_(module, q)
    program = load_exported(export_model(net, batch(6, seed=0), tmp_path / "qat.pt2").path)
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs(b)), fake, rtol=1e-5, atol=1e-5)


def test_smaller_on_disk_when_quantized(tmp_path):
    sizes = {}
    for label, q in (("fp32", None), ("int4", Quantization("int4"))):
        module, net = trained_model("none", q)
        if q is not None:
            quantize_(module, q)
        sizes[label] = export_model(net, batch(6, seed=0), tmp_path / f"{label}.pt2").bytes_on_disk
    assert sizes["int4"] < sizes["fp32"] / 3


def test_an_example_batch_of_one_row_is_refused(tmp_path):
    _, net = trained_model("none", None)
    with pytest.raises(ValueError, match="at least 2 rows"):
        export_model(net, batch(1, seed=0), tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())
