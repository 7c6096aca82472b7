"""``make bench-throughput``: the machine's limits, the counted FLOPs, the phases."""

from __future__ import annotations

import re

from torch import nn

from experiments.benches.step import CRITEO_SAMPLE_VOCAB
from experiments.benches.throughput import MODELS, Run, batches, main


def test_the_flops_are_those_of_the_layers():
    """DeepFM's FLOPs per training sample: at least those of its MLP's linear layers
    (forward 2·in·out, backward twice that), and the FM's products beside them."""
    run = Run("deepfm", "none", 10.0, CRITEO_SAMPLE_VOCAB, {"embedding_l2": 0.0})
    linear = sum(6 * m.in_features * m.out_features for m in run.model.modules() if isinstance(m, nn.Linear))
    flops = run.flops(batches(CRITEO_SAMPLE_VOCAB, 1, 64)[0])
    assert 0.99 * linear <= flops < 1.2 * linear, (flops, linear)  # (no input gradient where none is needed)


def test_the_bench_reports_each_model_and_method(capsys):
    main(["--vocab", "sample", "--batch", "64", "--steps", "2", "--models", *MODELS, "--methods", "none", "hashing",
          "--trainer", "default", "fused"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"fp32 GEMM peak \d+ GFLOP/s .* copy bandwidth [\d.]+ GB/s", out)
    assert re.search(r"batch assembly .*: [\d.]+ ms", out)
    # the peak the steps are measured against: timed between the two rounds of steps
    assert re.search(r"GEMM peak between the rounds of steps \(\d+x\d+ @ \d+x\d+, median of 2\): \d+ GFLOP/s", out)
    for model in MODELS:
        for method in ("none", "hashing"):
            for trainer in ("default", "fused"):
                assert re.search(rf"^{model}\s+{method}\s+{trainer}\s+\d+\s+[\d.]+\s+[\d.]+%", out, re.M), out
