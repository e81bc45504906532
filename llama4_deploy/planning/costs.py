"""`llama4-deploy cost`: the cost model's table for a bundle's graphs at its profiles' shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx_ir as ir

from llama4_deploy.export.shape import ConfigError, ModelShape
from llama4_deploy.graphs.cost import profile_points, step_cost
from llama4_deploy.runtime.bundle import BundleError, read_manifest
from llama4_deploy.runtime.integrity import check_files


@dataclasses.dataclass
class CostRow:
    point: str
    graph: str
    dispatch: str
    flops: float
    weight_bytes: float
    flops_vs_ideal: float
    bytes_vs_ideal: float
    dense_flops_vs_ideal: float
    dense_bytes_vs_ideal: float
    unresolved: int


def bundle_costs(bundle: str | Path) -> list[CostRow]:
    manifest = read_manifest(bundle)
    try:  # the sizes the cost model divides and multiplies by, checked as a config's are, before any graph is read
        ModelShape.from_facts(manifest.model, str(manifest.path / "manifest.json"))
    except ConfigError as err:
        raise BundleError(str(err)) from None
    graphs = manifest.engine["graphs"]
    stages = manifest.stages  # a split bundle is costed as the sum of its stages' graphs
    files = sorted({g["file"] for stage in stages for g in stage.graphs.values()})
    check_files(manifest, files)  # the graphs only: the cost model never reads weights.data
    models = {}
    for file in files:
        try:
            models[file] = ir.load(manifest.path / file)
        except Exception as err:  # onnx's own parse errors
            reason = " ".join(str(err).split())[:300]
            raise BundleError(f"{file} in {manifest.path} cannot be read as ONNX ({reason})") from None
    rows = []
    for label, role, dims in profile_points(manifest.profiles):
        graph = graphs[role]
        stage_files = [stage.graphs[role]["file"] for stage in stages]
        report = step_cost(
            [models[f] for f in stage_files] if len(stages) > 1 else models[stage_files[0]], manifest.model, dims
        )
        name = stage_files[0] if len(stages) == 1 else f"{len(stages)} stages"
        rows.append(
            CostRow(
                label,
                name,
                graph["moe_dispatch"],
                report.graph.flops,
                report.graph.weight_bytes,
                *report.graph.ratio(report.ideal),
                *report.dense.ratio(report.ideal),
                report.unresolved,
            )
        )
    vision = manifest.engine.get("vision")
    if vision is not None:
        rows.append(vision_cost(manifest, vision))
    return rows


def vision_cost(manifest, vision: dict) -> CostRow:
    """The vision engine's FLOPs and weight bytes for one tile (its graph at tiles = 1); no ideal to compare with."""
    from llama4_deploy.graphs.cost import graph_cost

    check_files(manifest, [vision["file"]])
    try:
        model = ir.load(manifest.path / vision["file"])  # external weights stay on disk (read lazily)
    except Exception as err:  # onnx's own parse errors
        reason = " ".join(str(err).split())[:300]
        raise BundleError(f"{vision['file']} in {manifest.path} cannot be read as ONNX ({reason})") from None
    total, _, unresolved = graph_cost(model, {"tiles": 1})
    nan = float("nan")
    return CostRow("image tile", vision["file"], "-", total.flops, total.weight_bytes, nan, nan, nan, nan, unresolved)


def _ratio(value: float) -> str:
    return f"{'-':>13}" if value != value else f"{value:>12.3f}x"


def cost_table(rows: list[CostRow]) -> str:
    lines = [
        f"{'step':<14}{'graph':<16}{'GFLOP':>10}{'MB':>10}{'FLOPs/ideal':>13}{'bytes/ideal':>13}"
        f"{'dense FLOPs':>13}{'dense bytes':>13}"
    ]
    for r in rows:
        lines.append(
            f"{r.point:<14}{r.graph:<16}{r.flops / 1e9:>10.3f}{r.weight_bytes / 1e6:>10.2f}"
            f"{_ratio(r.flops_vs_ideal)}{_ratio(r.bytes_vs_ideal)}{_ratio(r.dense_flops_vs_ideal)}"
            f"{_ratio(r.dense_bytes_vs_ideal)}"
        )
    return "\n".join(lines)
