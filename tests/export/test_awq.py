"""AWQ for INT4 (export/awq.py): lower output error than RTN where activations have outlier channels, and an AWQ
bundle verifies against a fake-quant simulation of exactly its AWQ'd weights."""

from __future__ import annotations

import copy

import numpy as np

from tests.conftest import manifest, quiet_build, tiny_config

OUTLIERS = [3, 17, 40, 61]  # hidden channels whose RMSNorm gain is raised x30: every linear input has outliers


def _outlier_checkpoint(directory):
    import torch

    from llama4_deploy.export.reference import random_model

    model = random_model(tiny_config(), seed=4)  # std 0.02, no peaked gains: quality means something
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIERS] *= 30.0
    model.save_pretrained(directory)
    return directory


def test_awq_has_lower_error_than_rtn_with_outlier_channels(tmp_path):
    from llama4_deploy.export import awq
    from llama4_deploy.export.calibrate import calibration_ids
    from llama4_deploy.export.checkpoint import Checkpoint
    from llama4_deploy.export.reference import checkpoint_model, reference_logits
    from llama4_deploy.export.simulate import quality, simulate
    from llama4_deploy.graphs.quantize import QuantConfig, make_spec

    ckpt = _outlier_checkpoint(tmp_path / "outliers")
    checkpoint = Checkpoint(ckpt)
    rtn = make_spec(QuantConfig(precision="int4", block_size=32))
    with_awq = make_spec(QuantConfig(precision="int4", block_size=32, method="awq"))
    scales = awq.run(ckpt, checkpoint, calibration_ids(None, checkpoint, seed=0), with_awq.rules[0])
    assert not np.allclose(scales["layers.0.attn_in"], 1.0)  # the search moved away from plain RTN
    fp32 = checkpoint_model(ckpt)
    held_out = [int(t) for t in np.random.default_rng(99).integers(0, 512, 48)]  # not the calibration tokens
    expected = reference_logits(fp32, held_out)
    q_rtn = quality(reference_logits(simulate(copy.deepcopy(fp32), rtn), held_out), expected)
    q_awq = quality(reference_logits(simulate(copy.deepcopy(fp32), with_awq, awq_scales=scales), held_out), expected)
    print(f"rtn: {q_rtn}\nawq: {q_awq}")
    assert q_awq["mean_kl"] < 0.8 * q_rtn["mean_kl"], (q_rtn, q_awq)
    assert q_awq["min_cosine"] > q_rtn["min_cosine"], (q_rtn, q_awq)


def test_awq_bundle_verifies_against_its_simulation(tmp_path):
    """int4 awq through ONNX Runtime's QMoE and MatMulNBits (native dispatch, block 32 divides tiny's sizes)."""
    from llama4_deploy.quality.verify import verify

    awq = dict(precision="int4", quant_method="awq", block_size=32, moe_dispatch="native")
    bundle = quiet_build("tiny", tmp_path / "awq", **awq)
    m = manifest(bundle)
    assert m["engine"]["quantization"]["rules"][0]["method"] == "awq"
    assert m["calibration"]["awq_scales"] == "awq_scales.npz" and (bundle / "awq_scales.npz").is_file()
    report = verify(str(bundle), log=lambda _: None)
    assert report.ok, report.table()
    assert all(row.greedy_agree == row.greedy_total for row in report.rows)
