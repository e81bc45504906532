"""The capacity overflow protocol end to end: adversarial routing stays exact, padding never
causes a false overflow.

Adversarial checkpoint: every token embedding gets +30 on coordinate 0, and every router gets
+50 on coordinate 0 for expert 3, so every token of every MoE layer picks expert 3 by a wide
margin (the residual stream keeps coordinate 0 large and positive).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llama4_deploy.build import build
from llama4_deploy.build.recipe import recipe_path
from llama4_deploy.export.reference import checkpoint_model, reference_logits
from llama4_deploy.quality.compare import compare, relative_logit_tolerance
from llama4_deploy.quality.verify import verify
from llama4_deploy.runtime import load
from llama4_deploy.runtime.engine import KVCache
from tests.conftest import write_checkpoint

HOT_EXPERT = 3


@pytest.fixture(scope="module")
def adversarial_checkpoint(tmp_path_factory) -> Path:
    from transformers import Llama4ForCausalLM

    directory = write_checkpoint(tmp_path_factory.mktemp("adv") / "ck")
    model = Llama4ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 30.0
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.router.weight[HOT_EXPERT, 0] += 50.0
    model.save_pretrained(directory)
    return directory


def _recipe(tmp_path: Path, capacity_factor: float) -> Path:
    data = yaml.safe_load(recipe_path("tiny").read_text())
    data.update(name="tiny-capacity", moe_dispatch="capacity", capacity_factor=capacity_factor)
    path = tmp_path / "tiny-capacity.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_router_really_is_adversarial(adversarial_checkpoint):
    model = checkpoint_model(adversarial_checkpoint)
    picks = []
    for layer in model.model.layers:
        if hasattr(layer.feed_forward, "router"):
            layer.feed_forward.router.register_forward_hook(lambda m, i, o: picks.append(o[1].argmax(-1)))
    reference_logits(model, list(range(40)))
    assert picks and all((p == HOT_EXPERT).all() for p in picks)


def test_adversarial_routing_stays_exact(adversarial_checkpoint, tmp_path):
    bundle = build(
        str(_recipe(tmp_path, 1.25)), checkpoint=adversarial_checkpoint, out=tmp_path / "b", log=lambda _: None
    ).bundle
    report = verify(str(bundle), log=lambda _: None)
    assert report.ok, report.table()
    assert report.graphs["prefill"] == "capacity"
    # every multi-token step overflows (all tokens on one expert) and is rerun exactly
    assert report.overflow_reruns > 0
    # the rerun-only graph's threads do not spin-wait, so they do not slow the steady graph's next step
    with load(bundle) as engine:
        exact = engine.graphs["exact"]["file"]
        assert exact not in (engine.graphs["prefill"]["file"], engine.graphs["decode"]["file"])
        assert {f: r.spin for f, r in engine.runners.items()} == {f: f != exact for f in engine.runners}


def test_padding_takes_no_capacity(adversarial_checkpoint, tmp_path):
    """Prompts of 16, 2 and 2 tokens in one prefill step: 48 token slots, 20 real, all on expert 3.
    Capacity factor 4 gives ceil(4 * 48 / 8) = 24 slots: enough for the real tokens, not for
    the padding. No overflow may be reported, and the real rows must match transformers."""
    # onnx23 attention: one 16-token step (the gqa form would cut it at tiny's chunk of 8, halving the padding)
    bundle = build(
        str(_recipe(tmp_path, 4.0)),
        checkpoint=adversarial_checkpoint,
        out=tmp_path / "b",
        attention="onnx23",
        log=lambda _: None,
    ).bundle
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (16, 2, 2)]
    reference = checkpoint_model(adversarial_checkpoint)
    with load(bundle) as engine:
        last, _ = engine.prefill(KVCache(engine.manifest, 3), prompts)
        assert engine.steps == 1 and engine.overflow_reruns == 0
    for row, prompt in zip(last, prompts):
        expected = reference_logits(reference, prompt)[-1]
        assert compare(row, expected, relative_logit_tolerance(expected)).ok
