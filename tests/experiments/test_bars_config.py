"""The BARS protocol as Hydra configs: trainer=bars, model=deepfm_bars / dcnv2_bars."""


def test_the_bars_trainer_config_is_the_peers_protocol(compose_cfg):
    cfg = compose_cfg(["trainer=bars", "model=deepfm_bars"])
    t, m = cfg.trainer, cfg.model
    assert (t.sparse_optimizer, t.sparse_lr, t.dense_lr) == ("adam", 1e-3, 1e-3)
    assert (t.embedding_l2, t.embedding_l2_mode, t.clip_grad_norm) == (0.05, "table", 10.0)
    assert (t.lr_decay, t.patience, t.min_delta, t.batch_size) == (0.1, 2, 1e-6, 4096)
    assert (m.embedding_dim, list(m.deep_layers), m.batch_norm, m.dropout, m.embedding_init_std) == (10, [400, 400, 400], True, 0.2, 1e-4)
    d = compose_cfg(["model=dcnv2_bars"]).model
    assert (d.structure, d.cross_layers, d.dropout) == ("parallel", 4, 0.4)
