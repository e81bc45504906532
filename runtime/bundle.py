"""Bundle format: a directory with manifest.json, the engine files, tokenizer and golden I/O.

The runtime learns everything from the manifest; nothing about the model is hard-coded here.
Written by the build (export/ and graphs/ may import this module), read by `load`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llama4_deploy.runtime.paths import kind

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: file hashes (`files`) and the weight-layout fingerprint (`engine.weights_layout`)
GOLDEN = "golden.npz"
WRITER = "llama4-deploy"  # `written_by`: the out-dir policy replaces only directories this tool wrote


class BundleError(ValueError):
    """A bundle directory that cannot be loaded; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class LayerCache:
    index: int
    attention: str  # "chunked" (ring buffer of `slots`) or "global" (slot j holds position j)
    slots: int | None  # ring size for chunked layers; None: sized by the context at run time


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One pipeline stage: layers [start, stop), its graph per role, its external data and I/O.
    A bundle without `engine.stages` is one stage made of the engine record itself."""

    index: int
    start: int
    stop: int
    graphs: dict[str, dict[str, Any]]  # role -> {"file", "reports_overflow"}
    external_data: str
    weights_layout: str
    inputs: list[str]
    outputs: list[str]
    last: bool
    device: int = 0  # the GPU this stage runs on by default (engine.stages[s].device; stage s on s when absent)

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


@dataclasses.dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def layers(self) -> list[LayerCache]:
        return [LayerCache(l["index"], l["attention"], l.get("cache_slots")) for l in self.raw["layers"]]

    @property
    def model(self) -> dict[str, Any]:
        return self.raw["model"]

    @property
    def engine(self) -> dict[str, Any]:
        return self.raw["engine"]

    @property
    def stages(self) -> list[StageRecord]:
        """The pipeline stages in order (one for an unsplit bundle)."""
        engine = self.engine
        records = engine.get("stages")
        if records is None:  # (.get: integrity checks build partial manifests of a few keys)
            return [
                StageRecord(
                    0,
                    0,
                    len(self.raw.get("layers") or []),
                    engine["graphs"],
                    engine["external_data"],
                    engine.get("weights_layout", ""),
                    engine.get("inputs", []),
                    engine.get("outputs", []),
                    True,
                )
            ]
        return [
            StageRecord(
                i,
                r["layers"][0],
                r["layers"][1],
                r["graphs"],
                r["external_data"],
                r["weights_layout"],
                r["inputs"],
                r["outputs"],
                i == len(records) - 1,
                r.get("device", i),
            )
            for i, r in enumerate(records)
        ]

    @property
    def profiles(self) -> dict[str, int]:
        return self.raw["profiles"]

    @property
    def vocab_size(self) -> int:
        return self.model["vocab_size"]

    @property
    def max_context(self) -> int:
        return self.profiles["max_context"]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model.get("eos_token_ids") or [])

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.raw.get("tokenizer")
        return self.path / name if name else None

    @property
    def tokenizer_config_path(self) -> Path | None:
        """tokenizer_config.json copied from the checkpoint (its chat template), when it had one."""
        name = self.raw.get("tokenizer_config")
        return self.path / name if name else None

    @property
    def used_files(self) -> list[str]:
        """The files the runtime opens: graphs, external data, tokenizer."""
        names = []
        for stage in self.stages:
            names += [graph["file"] for graph in stage.graphs.values()] + [stage.external_data]
        for key in ("tokenizer", "tokenizer_config"):
            if self.raw.get(key):
                names.append(self.raw[key])
        return list(dict.fromkeys(names))

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """{file name: {"size", "sha256"}} of every bundle file but manifest.json."""
        return self.raw["files"]


# What `load` and every command rely on: (dotted key, accepted types, what it must be).
_REQUIRED: list[tuple[str, type | tuple[type, ...], str]] = [
    ("name", str, "a string"),
    ("model", dict, "an object"),
    ("model.vocab_size", int, "an integer"),
    ("model.num_layers", int, "an integer"),
    ("model.num_kv_heads", int, "an integer"),
    ("model.head_dim", int, "an integer"),
    ("model.attention_chunk_size", int, "an integer"),
    ("layers", list, "a list"),
    ("engine", dict, "an object"),
    ("engine.backend", str, "a string"),
    ("engine.graphs", dict, "an object"),
    ("engine.inputs", list, "a list"),
    ("engine.outputs", list, "a list"),
    ("engine.cache_dtype", str, "a string"),
    ("engine.logits_dtype", str, "a string"),
    ("profiles", dict, "an object"),
    ("profiles.max_batch", int, "an integer"),
    ("profiles.prefill_tokens", int, "an integer"),
    ("profiles.max_context", int, "an integer"),
    ("files", dict, "an object"),
]


def _lookup(raw: dict[str, Any], dotted: str):
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _plain_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def validate_manifest(raw: Any, where: Path) -> None:
    """Refuse, in one sentence, a manifest that lacks or mistypes what the runtime relies on."""
    if not isinstance(raw, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(raw), "null")
        raise BundleError(f"{where} holds a JSON {kind}, not an object")
    for dotted, types, what in _REQUIRED:
        value = _lookup(raw, dotted)
        if value is _MISSING:
            raise BundleError(f"{where} has no {dotted}")
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise BundleError(f"{where}: {dotted} must be {what}, got {value!r}")
    for key in ("max_batch", "prefill_tokens", "max_context"):
        if raw["profiles"][key] < 1:
            raise BundleError(f"{where}: profiles.{key} must be at least 1, got {raw['profiles'][key]}")
    model = raw["model"]
    for key in ("vocab_size", "num_layers", "num_kv_heads", "head_dim", "attention_chunk_size"):
        if model[key] < 1:
            raise BundleError(f"{where}: model.{key} must be at least 1, got {model[key]}")
    layers = raw["layers"]
    if len(layers) != model["num_layers"]:
        raise BundleError(f"{where} lists {len(layers)} layers, but model.num_layers is {model['num_layers']}")
    for position, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("index") != position:
            raise BundleError(f"{where}: layers[{position}] must be an object with index {position}")
        if layer.get("attention") not in ("chunked", "global"):
            raise BundleError(
                f"{where}: layer {position} has attention {layer.get('attention')!r}; expected 'chunked' or 'global'"
            )
        slots = layer.get("cache_slots")
        if layer["attention"] == "chunked" and not (
            isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1
        ):
            raise BundleError(f"{where}: chunked layer {position} needs cache_slots >= 1, got {slots!r}")
    for key in ("inputs", "outputs"):
        if not all(isinstance(name, str) for name in raw["engine"][key]):
            raise BundleError(f"{where}: engine.{key} must be a list of names")
    eos = model.get("eos_token_ids")
    if eos is not None and not (
        isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)
    ):
        raise BundleError(f"{where}: model.eos_token_ids must be a list of integers, got {eos!r}")
    vocab = model["vocab_size"]
    for key, ids in (("eos_token_ids", eos or []), ("bos_token_id", [model.get("bos_token_id")])):
        bad = next((i for i in ids if i is not None and not (type(i) is int and 0 <= i < vocab)), None)
        if bad is not None:
            raise BundleError(f"{where}: model.{key} holds {bad!r}, not a token id inside the vocabulary [0, {vocab})")
    # the limits the model was trained to: a manifest asking for more context than the model has was edited
    positions = model.get("max_position_embeddings")
    if positions is not None:
        if type(positions) is not int or positions < 1:
            raise BundleError(f"{where}: model.max_position_embeddings must be a positive integer, got {positions!r}")
        if raw["profiles"]["max_context"] > positions:
            raise BundleError(
                f"{where}: profiles.max_context {raw['profiles']['max_context']} exceeds the model's "
                f"max_position_embeddings of {positions}"
            )
    engine = raw["engine"]
    graphs = engine["graphs"]
    for role in ("prefill", "decode"):
        if not isinstance(graphs.get(role), dict):
            raise BundleError(f"{where} has no engine.graphs.{role} record")
    if "stages" in engine:
        _validate_stages(engine, model["num_layers"], where)
    else:
        for dotted, types, what in (
            ("engine.external_data", str, "a file name"),
            ("engine.weights_layout", str, "a string"),
        ):
            value = _lookup(raw, dotted)
            if value is _MISSING:
                raise BundleError(f"{where} has no {dotted}")
            if not isinstance(value, types):
                raise BundleError(f"{where}: {dotted} must be {what}, got {value!r}")
        _validate_graph_files(graphs, "engine.graphs", where)
    files = raw["files"]
    for name, record in files.items():
        if not _plain_file_name(name):
            raise BundleError(f"{where}: files lists {name!r}, which is not a file inside the bundle")
        if not (
            isinstance(record, dict) and isinstance(record.get("size"), int) and isinstance(record.get("sha256"), str)
        ):
            raise BundleError(f"{where}: files.{name} must record size and sha256")
    for key in ("tokenizer", "tokenizer_config"):
        name = raw.get(key)
        if name is not None and not _plain_file_name(name):
            raise BundleError(f"{where}: {key} must name a file inside the bundle, got {name!r}")


def _validate_graph_files(graphs: dict, where_key: str, where: Path) -> None:
    for role, graph in graphs.items():
        if not isinstance(graph, dict) or not _plain_file_name(graph.get("file")):
            raise BundleError(f"{where}: {where_key}.{role} must name a graph file inside the bundle")
        if graph.get("reports_overflow") and not isinstance(graphs.get("exact"), dict):
            raise BundleError(f"{where}: {where_key}.{role} reports overflow but there is no exact graph")


def _validate_stages(engine: dict, num_layers: int, where: Path) -> None:
    """engine.stages: a list of stages whose layers run [0, a), [a, b), ... [z, num_layers), each with a
    graph for every role of engine.graphs, its external data, layout fingerprint and I/O names."""
    stages = engine["stages"]
    if not isinstance(stages, list) or not stages:
        raise BundleError(f"{where}: engine.stages must be a non-empty list of stages")
    expected_start = 0
    for index, stage in enumerate(stages):
        key = f"engine.stages[{index}]"
        if not isinstance(stage, dict):
            raise BundleError(f"{where}: {key} must be an object")
        layers = stage.get("layers")
        if not (
            isinstance(layers, list)
            and len(layers) == 2
            and all(type(n) is int for n in layers)
            and layers[0] == expected_start
            and layers[1] > layers[0]
        ):
            raise BundleError(
                f"{where}: {key}.layers must be [{expected_start}, stop] with stop > {expected_start}, got {layers!r}"
            )
        expected_start = layers[1]
        graphs = stage.get("graphs")
        if not isinstance(graphs, dict) or set(graphs) != set(engine["graphs"]):
            raise BundleError(
                f"{where}: {key}.graphs must give a graph for each role of engine.graphs "
                f"({', '.join(engine['graphs'])})"
            )
        _validate_graph_files(graphs, f"{key}.graphs", where)
        if not _plain_file_name(stage.get("external_data")):
            raise BundleError(f"{where}: {key}.external_data must name a file inside the bundle")
        if not isinstance(stage.get("weights_layout"), str):
            raise BundleError(f"{where}: {key}.weights_layout must be a string")
        device = stage.get("device", index)
        if type(device) is not int or device < 0:
            raise BundleError(f"{where}: {key}.device must be a GPU index (an integer of at least 0), got {device!r}")
        for names in ("inputs", "outputs"):
            value = stage.get(names)
            if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
                raise BundleError(f"{where}: {key}.{names} must be a list of names")
    if expected_start != num_layers:
        raise BundleError(
            f"{where}: engine.stages cover layers 0-{expected_start - 1}, but model.num_layers is {num_layers}"
        )


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        found = kind(manifest_path)
        if found not in ("missing", "a file"):  # read_text would block on a FIFO
            raise BundleError(f"{manifest_path} is {found}, not a file")
        raise BundleError(f"{path} is not a bundle: it has no {MANIFEST}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err})") from None
    except OSError as err:
        raise BundleError(f"{manifest_path} cannot be read ({err.strerror})") from None
    if isinstance(raw, dict) and raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {raw.get('format_version')}; this runtime reads "
            f"{FORMAT_VERSION} (rebuild the bundle)"
        )
    validate_manifest(raw, manifest_path)
    return Manifest(raw, path.resolve())


def written_by_this_tool(bundle_dir: Path) -> list[str] | None:
    """The files a bundle's manifest lists when the manifest says this tool wrote it; None otherwise."""
    try:
        raw = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    if raw.get("written_by") == WRITER:
        files = raw.get("files")
        return sorted(files) if isinstance(files, dict) else []
    engine = raw.get("engine")
    if raw.get("format_version") == 1 and isinstance(raw.get("build"), dict) and isinstance(engine, dict):
        # format 1 predates `written_by` and `files`: its build record says who wrote it, its
        # engine record what it holds
        graphs = engine.get("graphs") if isinstance(engine.get("graphs"), dict) else {}
        names = [g.get("file") for g in graphs.values() if isinstance(g, dict)]
        names += [engine.get("external_data"), raw.get("tokenizer"), raw.get("golden")]
        return sorted(name for name in names if isinstance(name, str))
    return None


def write_manifest(bundle_dir: str | Path, raw: dict[str, Any]) -> None:
    raw = {"format_version": FORMAT_VERSION, "written_by": WRITER, **raw}
    (Path(bundle_dir) / MANIFEST).write_text(json.dumps(raw, indent=2, sort_keys=False) + "\n")
