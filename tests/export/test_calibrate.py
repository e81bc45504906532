"""Calibration ranges collected layer by layer (memory: one layer + the calibration activations) equal the ones
transformers' whole model gives. Tolerance: the same fp32 ops in the same order, so equal up to summation-order
noise (observed exactly equal; bound rtol 1e-6)."""

from __future__ import annotations

import numpy as np

from tests.conftest import write_checkpoint


def test_layer_by_layer_ranges_equal_whole_model_ones(tmp_path):
    from llama4_deploy.export.calibrate import calibration_ids, collect_amax, collect_amax_whole_model
    from llama4_deploy.export.checkpoint import Checkpoint

    ckpt = write_checkpoint(tmp_path / "mm", seed=5, multimodal=True)  # text model under language_model.
    ids = calibration_ids(None, Checkpoint(ckpt), seed=2)[:3] + [[7, 8, 9]]  # ragged lengths
    layered = collect_amax(ckpt, ids)
    whole = collect_amax_whole_model(ckpt, ids)
    assert set(layered) == set(whole) and {
        "layers.0.q",
        "layers.1.experts_gate_up",
        "layers.3.experts_down",
        "layers.2.mlp_down",
        "layers.0.o",
    } <= set(layered)
    names = sorted(whole)
    np.testing.assert_allclose([layered[n] for n in names], [whole[n] for n in names], rtol=1e-6)
