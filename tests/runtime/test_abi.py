"""runtime/abi.py: the engine's input and output names are the ones docs/engine-abi.md documents (once
documented, a bundle's names are kept), and a stage's lists come in the order manifests record them."""

from __future__ import annotations

from pathlib import Path

from llama4_deploy.runtime import abi

DOC = Path(__file__).resolve().parents[2] / "docs" / "engine-abi.md"


def test_names_are_the_documented_ones():
    names = (
        abi.INPUT_IDS,
        abi.HIDDEN_IN,
        abi.HIDDEN_OUT,
        abi.POSITION_IDS,
        abi.PAST_LENGTHS,
        abi.LOGITS,
        abi.MOE_OVERFLOW,
    )
    assert names == (
        "input_ids",
        "hidden_states",
        "hidden_states_out",
        "position_ids",
        "past_lengths",
        "logits",
        "moe_overflow",
    )
    per_layer = (abi.past_key(3), abi.past_value(3), abi.present_key(3), abi.present_value(3))
    assert per_layer == ("past_key.3", "past_value.3", "present_key.3", "present_value.3")
    doc = DOC.read_text(encoding="utf-8")
    for name in names + tuple(name.replace(".3", ".l") for name in per_layer):
        assert f"`{name}`" in doc, name
    assert abi.PAD_POSITION == -1 and "**-1 marks padding**" in doc


def test_stage_io_lists_names_in_manifest_order():
    assert abi.stage_io(range(2), first=True, last=True, overflow=True) == (
        ["input_ids", "position_ids", "past_lengths", "past_key.0", "past_value.0", "past_key.1", "past_value.1"],
        ["logits", "present_key.0", "present_value.0", "present_key.1", "present_value.1", "moe_overflow"],
    )
    assert abi.stage_io([2, 3], first=False, last=False) == (
        ["hidden_states", "position_ids", "past_lengths", "past_key.2", "past_value.2", "past_key.3", "past_value.3"],
        ["hidden_states_out", "present_key.2", "present_value.2", "present_key.3", "present_value.3"],
    )
    assert abi.stage_io(iter([4]), first=False, last=True)[1] == ["logits", "present_key.4", "present_value.4"]
