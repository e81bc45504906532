"""Generation over a bundle's engine: prefill, decode_step, generate, score (sampling: runtime/sampling.py).

A bundle split into pipeline stages runs them in order within each step (`run_step`): stage 0
takes the token ids, each later stage the previous one's hidden states, each reads its own layers'
caches, and the last gives the logits (docs/engine-abi.md, "Pipeline stages"). Each stage runs on
its device (runtime/devices.py: the CPU by default on ONNX Runtime, stage s on GPU s on TensorRT).

Letters in shape comments: B batch rows, T new tokens this step, V vocab. A position of -1
marks a padded token (the engine ignores it as a key and the runtime never writes it into the
cache). The cache itself (buffers, buckets, rings) is runtime/kv_cache.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llama4_deploy.runtime import abi, arguments, backends, images, integrity
from llama4_deploy.runtime.bundle import BundleError, Manifest, read_manifest
from llama4_deploy.runtime.devices import onnxruntime_providers, placement
from llama4_deploy.runtime.kv_cache import KVCache, cache_memory
from llama4_deploy.runtime.onnxruntime_backend import OnnxRuntimeRunner
from llama4_deploy.runtime.sampling import History, SamplingParams, sample
from llama4_deploy.runtime.tensorrt_backend import open_plans

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last one)
    logits: list[np.ndarray] | None = None  # per prompt [new tokens, V]: what each token was chosen from
    steps: int = 0  # engine calls made
    overflow_reruns: int = 0  # steps rerun on the exact engine after a capacity overflow


def prefill_chunk(
    prompts: Sequence[Sequence[int]], done: Sequence[int], chunk_tokens: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The next step of chunked prefill: row b feeds the next min(chunk_tokens, tokens left) tokens of
    prompts[b] from position done[b] on; a row with nothing left (an empty prompt: a row not prefilling)
    is all padding, and shorter rows are padded to the longest.

    Returns ids [B, T] (0 where padded), positions [B, T] (PAD_POSITION where padded) and each row's
    token count `take` (T = max(take))."""
    take = [min(chunk_tokens, len(prompt) - start) for prompt, start in zip(prompts, done)]
    width = max(take)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    positions = np.full((len(prompts), width), abi.PAD_POSITION, dtype=np.int64)
    for b, (prompt, start, count) in enumerate(zip(prompts, done, take)):
        ids[b, :count] = prompt[start : start + count]
        positions[b, :count] = np.arange(start, start + count)
    return ids, positions, take


class NonFiniteLogitsError(ValueError):
    """A step produced NaN or Inf logits (damaged weights, most likely)."""


class Engine:
    """A loaded bundle. `generate` for text, `score` for per-position logits.

    `generate` and `score` may be called from several threads on one engine: a lock serializes
    them (one call runs at a time), so each call's counters and cache are its own. The step
    methods (`prefill`, `decode_step`, `run_step`) are not guarded.
    """

    def __init__(
        self,
        manifest: Manifest,
        threads: int | None = None,
        verify_files: bool = True,
        allow_non_finite: bool = False,
        prepack: bool = True,
        backend: str | None = None,
        devices=None,
    ):
        self.manifest = manifest
        threads = arguments.threads(threads)
        self.allow_non_finite = arguments.flag(allow_non_finite, "allow_non_finite")
        self.prepack = arguments.flag(prepack, "prepack")
        engine = manifest.engine
        self.backend = backends.choose(manifest, backend)  # runtime/backends.py: best available, said once
        self.devices = placement(manifest, self.backend, devices)  # one per stage (runtime/devices.py)
        # ONNX Runtime's providers per stage, refused (no CUDA) before any file is read
        providers = [onnxruntime_providers(d) for d in self.devices] if self.backend != "tensorrt" else None
        if arguments.flag(verify_files, "verify_files"):
            count, size, seconds = integrity.check_files(manifest)
            log.info("checked SHA-256 of %d files (%.1f MB) in %.2fs", count, size / 1e6, seconds)
        self.graphs = engine["graphs"]  # role (prefill, decode, exact) -> graph record (dispatch, attention)
        # pipeline stages, run in order, each with its own sessions (one stage: the unsplit model), each on
        # its device: on the CPU all stages share the host
        self.stages = manifest.stages
        self._storage = None  # KV cache storage: host arrays (ONNX Runtime) or, per layer, device buffers (TensorRT)
        self._hand_off = None  # (hidden states, next stage) -> them on that stage's device (TensorRT)
        self._placement = None  # the TensorRT stages' device plan (streams, storages), closed with the engine
        if self.backend == "tensorrt":
            self._open_plans()
        else:
            self.runners = {}  # graph file -> runner; file names are unique across stages
            for stage in self.stages:
                # ONNX Runtime's threads spin after a run and slow the next session's; the exact graph does not spin
                steady = {graph["file"] for role, graph in stage.graphs.items() if role != "exact"}
                for file in dict.fromkeys(graph["file"] for graph in stage.graphs.values()):
                    self.runners[file] = self._open_graph(file, threads, file in steady, stage, providers[stage.index])
        self.vision = engine.get("vision")  # the vision engine and embedding step (runtime/images.py), or None
        self._no_vision = (
            "this bundle has no vision engine (built from a text-only checkpoint or with --no-vision); "
            "it takes text only"
        )
        if self.vision is not None and self.backend == "tensorrt":  # text runs there; images are refused
            self.vision = None
            self._no_vision = "images run on ONNX Runtime only: load this bundle with backend='onnxruntime'"
        if self.vision is not None:
            self._open_vision(threads)
        self._stage_caches = [abi.past_names(stage.layers) for stage in self.stages]
        # the gqa attention form writes each layer's new keys/values into the buffer it reads (bound as both the
        # past input and the present output): per stage, present name -> past name
        # (engine.graphs records the form; every graph of a bundle, in every stage, has the same one)
        self.in_place = any(graph.get("attention") == "gqa" for graph in self.graphs.values())
        self._shared = [
            dict(zip(abi.present_names(stage.layers), abi.past_names(stage.layers))) for stage in self.stages
        ]
        self._calls = threading.RLock()  # serializes generate / score
        self.vocab_size = manifest.vocab_size
        self.max_batch = manifest.profiles["max_batch"]
        self.prefill_tokens = manifest.profiles["prefill_tokens"]
        self.steps = 0
        self.overflow_reruns = 0
        self.cache_memory = cache_memory(manifest)  # bytes per token by layer kind, and at the limits

    def _open_plans(self) -> None:
        self.runners, self._placement = open_plans(self.manifest, [device.index for device in self.devices])
        self._storage, self._hand_off = self._placement.layer_storage, self._placement.hand_off

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache of `batch` rows in this backend's memory."""
        return KVCache(self.manifest, batch, self._storage)

    def _open_graph(self, file: str, threads: int | None, spin: bool, stage, providers=None) -> OnnxRuntimeRunner:
        """A runner for one graph, after checking it belongs to this bundle and matches its manifest."""
        path = self.manifest.path / file
        if not path.is_file():
            raise BundleError(f"bundle {self.manifest.path} is missing {file}, which its manifest lists")
        try:
            runner = OnnxRuntimeRunner(
                path, threads=threads, providers=providers, spin=spin, prepack=self.prepack
            ).activate()
        except Exception as err:  # ONNX Runtime's own errors for damaged graphs or external data
            reason = " ".join(str(err).split())[:300]
            raise BundleError(f"{file} in {self.manifest.path} cannot be loaded by ONNX Runtime ({reason})") from None
        session = runner.session
        if providers and providers[0] != "CPUExecutionProvider" and providers[0][0] not in session.get_providers():
            # ONNX Runtime falls back to the CPU when a provider fails to start: refuse rather than run elsewhere
            raise BundleError(
                f"ONNX Runtime could not start {providers[0][0]} on device {providers[0][1]['device_id']} "
                f"for {file} (it runs on {', '.join(session.get_providers())}); check the GPU and its "
                f"CUDA libraries"
            )
        integrity.check_layout(self.manifest, file, session.get_modelmeta().custom_metadata_map, stage)
        integrity.check_graph_io(
            self.manifest,
            file,
            {i.name: (i.type, list(i.shape)) for i in session.get_inputs()},
            {o.name: (o.type, list(o.shape)) for o in session.get_outputs()},
            stage,
        )
        return runner

    def _open_vision(self, threads: int | None) -> None:
        """The vision graph, the embedding step and the prefill graph that takes hidden_states (ONNX Runtime)."""
        vision = self.vision
        self.vision_runner = self._open_side_graph(vision["file"], threads, weights=False)
        self.embed_runner = self._open_side_graph(vision["embed"], threads, weights=True)
        self.embeds_runner = self._open_side_graph(vision["prefill"], threads, weights=True)
        exact = vision.get("exact")
        self.embeds_exact_runner = self._open_side_graph(exact, threads, weights=True) if exact else None
        self.image_spec = images.ImageSpec(
            tile_size=vision["image"]["tile_size"],
            max_patches=vision["image"]["max_patches"],
            patch_size=vision["image"]["patch_size"],
            pixel_shuffle_ratio=vision["image"]["pixel_shuffle_ratio"],
            image_mean=tuple(vision["image"]["image_mean"]),
            image_std=tuple(vision["image"]["image_std"]),
            rescale_factor=vision["image"]["rescale_factor"],
            resize_to_max_canvas=vision["image"]["resize_to_max_canvas"],
        )
        tokens = vision["tokens"]
        self.image_tokens = images.ImageTokens(
            image=tokens["<|image|>"],
            image_start=tokens["<|image_start|>"],
            image_end=tokens["<|image_end|>"],
            patch=tokens["<|patch|>"],
            tile_x_separator=tokens["<|tile_x_separator|>"],
            tile_y_separator=tokens["<|tile_y_separator|>"],
        )

    def _open_side_graph(self, file: str, threads: int | None, weights: bool) -> OnnxRuntimeRunner:
        path = self.manifest.path / file
        if not path.is_file():
            raise BundleError(f"bundle {self.manifest.path} is missing {file}, which its manifest lists")
        try:
            runner = OnnxRuntimeRunner(path, threads=threads, prepack=self.prepack).activate()
        except Exception as err:  # ONNX Runtime's own errors for damaged graphs or external data
            reason = " ".join(str(err).split())[:300]
            raise BundleError(f"{file} in {self.manifest.path} cannot be loaded by ONNX Runtime ({reason})") from None
        if weights:  # the embedding graphs read the stage's weights file: its layout must be theirs
            integrity.check_layout(self.manifest, file, runner.session.get_modelmeta().custom_metadata_map)
        self.runners[file] = runner
        return runner

    def close(self) -> None:
        for runner in getattr(self, "runners", {}).values():
            runner.deactivate()
        if getattr(self, "_placement", None) is not None:  # (getattr: __init__ may have failed before)
            self._placement.close()  # the TensorRT stages' streams
            self._placement = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks ---------------------------------------------------------------------------------
    def _check_prompt(self, ids: Sequence[int], new_tokens: int, what: str = "prompt") -> list[int]:
        ids = arguments.token_ids(ids, self.vocab_size, what)
        if not ids:
            raise ValueError(f"{what} is empty; give at least one token id")
        if len(ids) + new_tokens > self.manifest.max_context:
            raise ValueError(
                f"{what} of {len(ids)} tokens plus {new_tokens} new ones exceeds the bundle's context of "
                f"{self.manifest.max_context} tokens"
            )
        return ids

    # -- steps ----------------------------------------------------------------------------------
    def run_embeds_step(self, cache: KVCache, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One prefill step from embeddings [B, T, H] (image prompts: the embedding step's output with image
        features at the patch positions); returns logits [B, T, V] and updates the cache. The first stage runs its
        embeddings prefill graph, later stages their prefill graphs on its hidden_states."""
        return self.run_step(cache, None, positions, embeds)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """The embedding step: ids [B, T] -> hidden states [B, T, H] (float32)."""
        return self.embed_runner.infer({abi.INPUT_IDS: ids})[abi.HIDDEN_IN].astype(np.float32)

    def encode_images(self, prepared: list[images.PreparedImage]) -> np.ndarray:
        """Image features [sum of tiles x tokens_per_tile, H], one vision run per image (its tiles batched), in
        the order the images' <|patch|> tokens appear."""
        rows = []
        for image in prepared:
            features = self.vision_runner.infer({self.vision["input"]: image.pixel_values})[self.vision["output"]]
            rows.append(features.reshape(-1, features.shape[-1]).astype(np.float32))
        return np.concatenate(rows) if rows else np.zeros((0, self.manifest.model["hidden_size"]), np.float32)

    def _stage_graph(self, stage, role: str, embeds: bool):
        """(runner, its exact rerun's runner or None, the name its first input takes) of one stage in a step; an
        image prompt's prefill (`embeds`) runs the first stage's embeddings graph (hidden_states in)."""
        if embeds and stage.index == 0:
            return self.embeds_runner, self.embeds_exact_runner, abi.HIDDEN_IN
        graph = stage.graphs[role]
        exact = self.runners[stage.graphs["exact"]["file"]] if graph.get("reports_overflow") else None
        return self.runners[graph["file"]], exact, (abi.INPUT_IDS if stage.index == 0 else abi.HIDDEN_IN)

    @staticmethod
    def _exact(runner):
        if runner is None:
            raise BundleError(
                "a prefill graph reported a capacity overflow, and the bundle has no exact graph to rerun it on; "
                "rebuild the bundle"
            )
        return runner

    def run_step(self, cache: KVCache, ids, positions: np.ndarray, embeds=None) -> np.ndarray:
        """One engine call on ids/positions [B, T] (or, for an image prompt's prefill, embeddings [B, T, H] in
        place of ids); returns logits [B, T, V] and updates the cache.

        Pipeline stages run in order, each handing hidden_states to the next; each reads its own
        layers' caches. A capacity-limited graph reports `moe_overflow`; that stage is then rerun
        on its exact graph (before anything is written, and before the next stage reads its
        output), so results never depend on capacity."""
        if self.in_place:
            return self._run_in_place(cache, ids, positions, embeds)
        role = "decode" if embeds is None and ids.shape[1] == 1 else "prefill"
        caches = cache.feeds()
        shared = {abi.POSITION_IDS: positions, abi.PAST_LENGTHS: cache.lengths.copy()}
        outputs: dict[str, np.ndarray] = {}
        hidden, rerun = (ids if embeds is None else embeds), False
        for stage, names in zip(self.stages, self._stage_caches):
            runner, exact, first = self._stage_graph(stage, role, embeds is not None)
            feeds = {first: hidden, **shared}
            feeds.update(caches if len(self.stages) == 1 else {name: caches[name] for name in names})
            stage_outputs = runner.infer(feeds)
            if abi.MOE_OVERFLOW in stage_outputs and stage_outputs[abi.MOE_OVERFLOW].any():
                stage_outputs = self._exact(exact).infer(feeds)
                rerun = True
            hidden = stage_outputs.get(abi.HIDDEN_OUT)
            if hidden is not None and self._hand_off is not None:  # onto the next stage's device
                hidden = self._hand_off(hidden, stage.index + 1)
            outputs.update(stage_outputs)
        self.overflow_reruns += rerun
        cache.write(outputs, positions)
        self.steps += 1
        self._check_finite(outputs[abi.LOGITS])
        return outputs[abi.LOGITS]

    def _run_in_place(self, cache: KVCache, ids, positions: np.ndarray, embeds=None) -> np.ndarray:
        """run_step for graphs that write the cache in place (graphs/lower_attention_gqa.py): each row's real tokens
        must be its next positions, padding after them; the step is cut where a row's chunk ends (or the buffers
        would pass the context), the buffers grown before each part, the lengths advanced after it."""
        lengths = cache.lengths
        # every row: its real tokens first, at its next positions, then padding (one vectorized check per step)
        columns = np.arange(positions.shape[1])
        real = (positions >= 0).sum(axis=1)
        leading = columns[None, :] < real[:, None]
        wrong = np.where(leading, positions != lengths[:, None] + columns[None, :], positions >= 0).any(axis=1)
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise ValueError(
                f"row {row} feeds positions {positions[row].tolist()}; this bundle's attention (gqa) writes the "
                f"cache in place and takes each row's next positions from {int(lengths[row])} on, padding last"
            )
        if positions.max(initial=-1) >= self.manifest.max_context:
            raise ValueError(
                f"position {int(positions.max())} is beyond the bundle's context of {self.manifest.max_context} tokens"
            )
        parts, start, total = [], 0, positions.shape[1]
        while start < total:
            idle = positions[:, start] < 0  # real tokens come first: a row padded here has none left
            width = cache.step_width(total - start, idle)
            cache.reserve_step(width, idle)
            cut = slice(start, start + width)
            if embeds is not None:  # an image prompt's prefill: the first stage's embeddings graph
                part = self._step_in_place(cache, None, positions[:, cut], embeds[:, cut])
            else:
                part = self._step_in_place(cache, ids[:, cut], positions[:, cut])
            parts.append(part)
            start += width
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        self._check_finite(logits)
        return logits

    def _step_in_place(self, cache: KVCache, ids, positions: np.ndarray, embeds=None) -> np.ndarray:
        role = "decode" if embeds is None and ids.shape[1] == 1 else "prefill"
        shared = {abi.POSITION_IDS: np.ascontiguousarray(positions), abi.PAST_LENGTHS: cache.lengths.copy()}
        if embeds is None:
            hidden = np.ascontiguousarray(ids)
        else:  # in the graph's own dtype: an fp16 graph is not narrowed for it on this path (infer_in_place)
            hidden = np.ascontiguousarray(embeds, dtype=self.embeds_runner.inputs[abi.HIDDEN_IN][0])
        rerun, outputs = False, {}
        key = cache.binding_key()
        for stage, names, in_place in zip(self.stages, self._stage_caches, self._shared):
            runner, exact, first = self._stage_graph(stage, role, embeds is not None)
            small = {first: hidden, **shared}

            def stage_buffers(names=names) -> dict:  # asked for only by a runner not holding them bound
                every = cache.feeds()
                return {name: every[name] for name in names}

            outputs = runner.infer_in_place(small, in_place, key, stage_buffers)
            if abi.MOE_OVERFLOW in outputs and outputs[abi.MOE_OVERFLOW].any():
                # the rerun recomputes every key/value the first run wrote, into the same slots
                outputs = self._exact(exact).infer_in_place(small, in_place, key, stage_buffers)
                rerun = True
            hidden = outputs.get(abi.HIDDEN_OUT)
        self.overflow_reruns += rerun
        cache.advance(positions)
        self.steps += 1
        return outputs[abi.LOGITS]

    def _check_finite(self, logits: np.ndarray) -> None:
        """Refuse NaN/Inf logits (damaged weights propagate them silently otherwise)."""
        if not self.allow_non_finite and not np.isfinite(logits).all():
            raise NonFiniteLogitsError(
                f"the engine produced NaN or Inf logits at step {self.steps}; the bundle's weights are likely "
                f"damaged (load(..., allow_non_finite=True) lets them through)"
            )

    def prefill(self, cache: KVCache, prompts: list[list[int]], keep_all: bool = False, features=None):
        """Feed prompts in steps of the prefill profile; rows may differ in length. `features`: per row its image
        features [patch tokens, H] (None or empty for a text row), scattered into the row's <|patch|> positions in
        order; a group with any image runs every chunk through the embedding step.

        Returns the logits [B, V] at each prompt's last token, and, with keep_all, the logits at
        every position of each prompt.
        """
        batch = len(prompts)
        done = [0] * batch
        last = np.zeros((batch, self.vocab_size), dtype=np.float32)
        every = [[] for _ in prompts]
        with_images = features is not None and any(f is not None and len(f) for f in features)
        used = [0] * batch  # features scattered so far, per row
        while any(done[b] < len(prompts[b]) for b in range(batch)):
            ids, positions, take = prefill_chunk(prompts, done, self.prefill_tokens)
            if with_images:
                embeds = self.embed(ids)
                for b, row in enumerate(features):
                    if row is None or not len(row):
                        continue
                    slots = np.flatnonzero(ids[b, : take[b]] == self.image_tokens.patch)
                    embeds[b, slots] = row[used[b] : used[b] + len(slots)]
                    used[b] += len(slots)
                logits = self.run_embeds_step(cache, embeds, positions)
            else:
                logits = self.run_step(cache, ids, positions)
            for b in range(batch):
                if take[b]:
                    if keep_all:
                        every[b].append(logits[b, : take[b]])
                    done[b] += take[b]
                    if done[b] == len(prompts[b]):
                        last[b] = logits[b, take[b] - 1]
        return last, ([np.concatenate(chunks) for chunks in every] if keep_all else None)

    def decode_step(self, cache: KVCache, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """One new token per active row; inactive rows are padding. Returns logits [B, V]."""
        positions = np.where(active, cache.lengths, abi.PAD_POSITION)[:, None]
        return self.run_step(cache, tokens.astype(np.int64)[:, None], positions)[:, 0]

    # -- public API -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        return_logits: bool = False,
        top_k: int = 0,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: dict[int, float] | None = None,
        min_tokens: int = 0,
        images: list | None = None,
    ) -> Generation:
        """Generate up to max_new_tokens per prompt; the sampling parameters are runtime/sampling.py's (each
        row of the batch draws from one generator seeded with `seed`, in row order). `images`: one list per prompt
        of PIL images, HWC uint8 arrays, file paths or encoded bytes, one per `<|image|>` placeholder id in that
        prompt, in order (runtime/images.py); None: text only."""
        prompts = arguments.prompt_list(prompts)
        max_new_tokens = arguments.integer(max_new_tokens, "max_new_tokens", 1)
        temperature = arguments.temperature(temperature)
        top_p = arguments.top_p(top_p)
        seed = arguments.seed(seed)
        return_logits = arguments.flag(return_logits, "return_logits")
        stop = arguments.stop_tokens(stop_tokens, self.vocab_size)
        if stop is None:
            stop = set(self.manifest.eos_token_ids)
        params = SamplingParams(
            temperature,
            top_p,
            arguments.integer(top_k, "top_k"),
            arguments.real(min_p, "min_p"),
            arguments.real(presence_penalty, "presence_penalty"),
            arguments.real(frequency_penalty, "frequency_penalty"),
            arguments.real(repetition_penalty, "repetition_penalty"),
            arguments.logit_bias(logit_bias),
            arguments.integer(min_tokens, "min_tokens"),
        ).check(self.vocab_size)
        features = None  # images are decoded and encoded last: every cheap check first
        if images is not None or self.vision is not None:
            prompts, features = self.prepare_images(prompts, images, max_new_tokens)
        else:
            prompts = [self._check_prompt(p, max_new_tokens, f"prompt {i}") for i, p in enumerate(prompts)]
        with self._calls:
            return self._generate(prompts, max_new_tokens, params, seed, stop, return_logits, features)

    def prepare_images(self, prompts, images_per_prompt, new_tokens: int):
        """Prompts with their <|image|> placeholders expanded and each row's image features (None for a row with
        no image); every image is decoded, checked and encoded before any prompt is prefilled."""
        if images_per_prompt is not None and self.vision is None:
            raise ValueError(self._no_vision)
        if images_per_prompt is None:
            images_per_prompt = [[] for _ in prompts]
        if isinstance(images_per_prompt, (str, bytes)) or not isinstance(images_per_prompt, (list, tuple)):
            raise TypeError("images must be a list with one list of images per prompt")
        if len(images_per_prompt) != len(prompts):
            raise ValueError(
                f"images has {len(images_per_prompt)} lists for {len(prompts)} prompts; give one per prompt"
            )
        expanded, features = [], []
        for i, (prompt, given) in enumerate(zip(prompts, images_per_prompt)):
            ids = arguments.token_ids(prompt, self.vocab_size, f"prompt {i}")
            if given is None:
                given = []
            if isinstance(given, (str, bytes)) or not isinstance(given, (list, tuple)):
                raise TypeError(f"images[{i}] must be a list of images for prompt {i}")
            if self.image_tokens.patch in ids:
                raise ValueError(
                    f"prompt {i} holds <|patch|> (id {self.image_tokens.patch}) tokens itself; mark each image with "
                    f"one <|image|> placeholder (id {self.image_tokens.image}) and pass the image"
                )
            prepared = [
                images.preprocess(source, self.image_spec, f"prompt {i} image {j}") for j, source in enumerate(given)
            ]
            full = images.expand_placeholders(
                ids, prepared, self.image_spec.tokens_per_tile, self.image_tokens, f"prompt {i}"
            )
            image_tokens = len(full) - len(ids) + len(prepared)
            if len(full) + new_tokens > self.manifest.max_context:
                raise ValueError(
                    f"prompt {i} of {len(full)} tokens ({image_tokens} of them for {len(prepared)} "
                    f"image{'s' * (len(prepared) != 1)}) plus {new_tokens} new ones exceeds the bundle's context of "
                    f"{self.manifest.max_context} tokens"
                )
            expanded.append(self._check_prompt(full, new_tokens, f"prompt {i}"))
            features.append(self.encode_images(prepared) if prepared else None)
        return expanded, features

    def _generate(self, prompts, max_new_tokens, params, seed, stop, return_logits, features=None) -> Generation:
        rng = np.random.default_rng(seed)
        tokens: list[list[int]] = []
        logits: list[np.ndarray] = []
        steps_before, reruns_before = self.steps, self.overflow_reruns
        for start in range(0, len(prompts), self.max_batch):
            group = prompts[start : start + self.max_batch]
            cache = self.new_cache(len(group))
            group_features = None if features is None else features[start : start + self.max_batch]
            step_logits, _ = self.prefill(cache, group, features=group_features)
            active = np.ones(len(group), dtype=bool)
            new = [[] for _ in group]
            chosen_from = [[] for _ in group]
            histories = [History(prompt, self.vocab_size, params) for prompt in group]
            stops = [stop] * len(group)
            for step in range(max_new_tokens):
                chosen = sample(step_logits, params, rng, histories, stops)
                for b in np.flatnonzero(active):
                    histories[b].add(int(chosen[b]))
                    new[b].append(int(chosen[b]))
                    chosen_from[b].append(step_logits[b].copy())
                    if int(chosen[b]) in stop:
                        active[b] = False
                if step + 1 == max_new_tokens or not active.any():
                    break
                step_logits = self.decode_step(cache, np.where(active, chosen, 0), active)
            tokens.extend(new)
            logits.extend(np.stack(rows) for rows in chosen_from)
        return Generation(
            tokens, logits if return_logits else None, self.steps - steps_before, self.overflow_reruns - reruns_before
        )

    def score(self, ids: Sequence[int], mode: str = "prefill") -> np.ndarray:
        """Logits [len(ids), V] at every position, through the prefill path (in chunks of the
        prefill profile) or the decode path (one token per step)."""
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode is {mode!r}; use 'prefill' or 'decode'")
        ids = self._check_prompt(ids, 0, "sequence")
        with self._calls:
            cache = self.new_cache(1)
            if mode == "prefill":
                _, every = self.prefill(cache, [ids], keep_all=True)
                return every[0]
            rows = [self.decode_step(cache, np.array([token]), np.array([True]))[0] for token in ids]
            return np.stack(rows)


def load(
    bundle_dir: str | os.PathLike,
    threads: int | None = None,
    verify_files: bool | None = None,
    allow_non_finite: bool = False,
    prepack: bool = True,
    backend: str | None = None,
    devices=None,
) -> Engine:
    """Load a bundle built by `llama4-deploy build`. Logs (logger `llama4_deploy.runtime.engine`,
    INFO) what its KV cache costs per token and at the bundle's limits.

    verify_files: check every file's size and SHA-256 against the manifest (None: yes, unless the
    environment sets LLAMA4_DEPLOY_VERIFY_FILES=0); graphs' weight-layout fingerprints and their
    agreement with the manifest are checked either way. allow_non_finite: let NaN/Inf logits through.
    prepack: let ONNX Runtime copy MatMul weights into its kernels' layout (faster steps); False keeps every
    weight memory-mapped from weights.data, so the heap does not grow with the model.
    backend: onnxruntime, tensorrt, or None for the best available (runtime/backends.py; logged).
    devices: one device name per pipeline stage, "cpu" or "cuda:N" (runtime/devices.py); None: every stage on
    the CPU for ONNX Runtime, stage s on the GPU the manifest gives it (s) for TensorRT.
    """
    if not isinstance(bundle_dir, (str, os.PathLike)):
        raise TypeError(f"bundle_dir must be a path, got {bundle_dir!r}")
    if verify_files is None:
        verify_files = integrity.verify_files_default()
    engine = Engine(
        read_manifest(Path(bundle_dir)),
        threads=threads,
        verify_files=verify_files,
        allow_non_finite=allow_non_finite,
        prepack=prepack,
        backend=backend,
        devices=devices,
    )
    # engine.cache_memory holds the figures
    log.info(
        "%s: %s backend on %s; %s",
        engine.manifest.name,
        engine.backend,
        ", ".join(str(device) for device in engine.devices),
        engine.cache_memory,
    )
    return engine
