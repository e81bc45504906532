"""Parity of a bundle against transformers' Llama4ForCausalLM, rebuilt from the bundle's source.

For a ragged batch of prompts that cross at least two attention chunks, the engine generates
greedily (prefill path, then decode path); transformers then runs each prompt plus the engine's
tokens in one uncached forward, one decoder layer at a time (export/layerwise.py: the same logits as
the whole model, with one layer's weights in memory; a quantized bundle's fake-quant simulation is
applied to each layer as it is materialized). Greedy agreement at every step means transformers' own greedy
decoding would have produced the same tokens. `score` is checked on both paths as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llama4_deploy.export import layerwise
from llama4_deploy.export.awq import read_scales
from llama4_deploy.export.simulate import quality as measure
from llama4_deploy.export.simulate import simulate
from llama4_deploy.graphs.quantize import QuantSpec
from llama4_deploy.quality.compare import Comparison, compare, relative_logit_tolerance
from llama4_deploy.quality.evaluate import default_text, evaluate
from llama4_deploy.quality.images import image_rows
from llama4_deploy.runtime import BundleError, load, read_manifest

REL_TOLERANCE = 1e-3  # fp32 engine vs fp32 eager: summation order only, far below this
# A quantized or narrowed engine is checked against the fake-quant simulation of its own spec
# (export/simulate.py) at these tolerances, by compute dtype; its quality against fp32 is reported.
# float32: the same dequantized weights, only summation order differs (and, with fp8 activations,
#   an activation rounding to a neighbouring fp8 value now and then), so twice the fp32 bound;
# float16: every activation rounds to 11 bits (relative 2^-11 ~ 5e-4 per op; observed 8e-4 on tiny).
SIMULATION_TOLERANCE = {"float32": 2e-3, "float16": 5e-3}
# int4 with int8 activations (--int4-compute int8, MatMulNBits and QMoE accuracy_level 4): the simulation rounds each
# activation to int8 exactly as the kernels do (graphs/quantize.py fake_quant_int8_blocks), but an input that sits
# within float summation noise of a rounding tie lands on the neighbouring int8 value (1/127 of its block's |max|)
# in one of the two (docs/precision.md has the figures)
INT8_ACTIVATION_TOLERANCE = 5e-3
# Rounded activations (fp8, int8) make the computation itself tie-sensitive: where an activation sits within float
# summation noise of a rounding tie, two float orders of the same graph round it to neighbouring values, and a
# trained or peaked model carries that step forward. Measured on tiny-trained fp8: the engine's own prefill and
# decode paths differ by 0.11 in logits (max|logit| 17.4, the fixed bound 0.035), and the simulation moves by 0.15
# when its rounded activations are perturbed by 2 ulps. So verify measures that floor on the simulation itself (the
# engine cannot inflate it): the simulation of the longest sequence again, every rounded activation perturbed by
# ROUNDING_JITTER relative (export/simulate.py `jittered`: a few ulps, float summation noise). Each statistic is
# checked against max(the fixed bound, NOISE_MARGIN x the simulation's own move in it); 2: the engine's order is
# another draw of the same noise, not the same draw:
#   max|dlogit|, where a flip shows at full size;
#   the typical position (TYPICAL: median over positions of each position's max|dlogit|), which a wiring error moves
#   everywhere and a flip only where it lands and after; its floor is read over the whole sequence for the score
#   rows and over the generated positions for the generate rows (they hold the tails of their sequences, where a
#   flip has had longest to grow). On tiny-trained fp8 the whole-sequence floor stays near the fixed bound
#   (jittered simulation up to 0.021, x2 = 0.041; the correct engine 1e-5), while each of the 8 single-site wiring
#   errors measured (weight scales on the wrong axis, an activation Q/DQ missing; tests/test_verify_noise.py) moves
#   it by 0.045-0.12;
#   greedy agreement, pooled over the rows: at most NOISE_MARGIN x the rate at which the jitter changes the argmax
#   (tiny-trained: 1 position in 192 in one draw; the correct engine agrees everywhere).
# On the random peaked minis one flip reroutes every later token (maverick-mini fp8: the engine's own two paths
# differ by 0.38 at the typical position, the jittered simulation by up to 0.45; scout-mini fp8 by 0.82-1.2 and up
# to 1.10 over the generated positions, its argmax moved at 14% of positions), so there the bounds are the noise
# floor, and the table says so: the check is as tight as the model allows, no tighter.
ROUNDING_JITTER = 2.0**-20
# The floor is the worst of several draws: where the first tie a perturbation crosses lands decides how far one
# draw moves, so one draw under-reads a chaotic model (scout-mini fp8: 0.41 at the typical position in one draw,
# the engine's own prefill path 0.96). The sign flips the alternating pattern; the third draw is twice the size.
JITTER_DRAWS = (ROUNDING_JITTER, -ROUNDING_JITTER, 2 * ROUNDING_JITTER)
NOISE_MARGIN = 2.0
TYPICAL = "rowq0.5"


@dataclasses.dataclass
class Row:
    path: str
    prompt: int
    tokens: int
    comparison: Comparison
    greedy_agree: int
    greedy_total: int
    typical: Comparison | None = None  # the typical position against the tight bound (specs that round activations)
    # greedy agreement checked over all rows together against the rounding-tie noise floor (Report.greedy_allowed)
    # instead of exactly (specs that round activations)
    greedy_pooled: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.comparison.ok
            and (self.typical is None or self.typical.ok)
            and (self.greedy_pooled or self.greedy_agree == self.greedy_total)
        )


@dataclasses.dataclass
class Report:
    rows: list[Row]
    prompt_lengths: list[int]
    new_tokens: int
    chunk_size: int
    temperature_tuning_from: int | None
    graphs: dict[str, str]  # role -> MoE dispatch
    steps: int = 0
    overflow_reruns: int = 0
    reference: str = "transformers fp32"
    quality: dict[str, float] | None = None  # vs transformers fp32, for quantized / narrowed engines
    # the simulation's largest move over JITTER_DRAWS, for specs that round activations: (max|dlogit|, typical
    # position, typical generated position, fraction of positions whose argmax it changes)
    rounding_noise: tuple[float, float, float, float] | None = None
    greedy_allowed: int | None = (
        None  # argmax disagreements allowed over the pooled rows (specs that round activations)
    )
    evaluation: Any = None  # a trained checkpoint's held-out perplexity (llama4_deploy.evaluate.Evaluation)
    layers: Any = None  # layer by layer (quality/layers.py LayerReport): when verify fails, or for --plot
    image_quality: dict[str, Any] | None = None  # the image rows' generated positions vs transformers fp32

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows) and self.greedy_ok

    @property
    def greedy_disagreements(self) -> int:
        return sum(row.greedy_total - row.greedy_agree for row in self.rows if row.greedy_pooled)

    @property
    def greedy_ok(self) -> bool:
        return self.greedy_allowed is None or self.greedy_disagreements <= self.greedy_allowed

    @property
    def max_abs_diff(self) -> float:
        return max(row.comparison.value for row in self.rows)

    def table(self) -> str:
        lines = [
            f"prompts {self.prompt_lengths} tokens + {self.new_tokens} new; chunk {self.chunk_size} "
            f"(positions cross up to {(max(self.prompt_lengths) + self.new_tokens - 1) // self.chunk_size} chunk "
            f"boundaries); temperature tuning active from position {self.temperature_tuning_from}",
            f"MoE dispatch {self.graphs}; {self.steps} engine steps, {self.overflow_reruns} rerun on the exact "
            f"graph after a capacity overflow",
            f"{'path':<16}{'prompt':>7}{'tokens':>8}{'max|dlogit|':>14}{'tolerance':>12}{'greedy':>10}  result",
        ]
        for row in self.rows:
            c, t = row.comparison, row.typical
            result = "ok" if c.ok else "FAIL: " + str(c)
            if not row.greedy_pooled and row.greedy_agree != row.greedy_total:
                result = ("" if c.ok else result + "; ") + f"FAIL: greedy {row.greedy_agree}/{row.greedy_total}"
            if t is not None:
                result += (
                    f"; typical position {t.value:.3e} vs {t.tolerance:.3e}"
                    if t.ok
                    else f"; typical position FAIL: {t}"
                )
            lines.append(
                f"{row.path:<16}{row.prompt:>7}{row.tokens:>8}{c.value:>14.3e}{c.tolerance:>12.3e}"
                f"{f'{row.greedy_agree}/{row.greedy_total}':>10}  {result}"
            )
        if self.rounding_noise is not None:
            moved, typical, typical_generated, flipped = self.rounding_noise
            lines.append(
                f"rounding-tie noise floor: with its rounded activations perturbed by {ROUNDING_JITTER:.2g} "
                f"relative ({len(JITTER_DRAWS)} draws, the largest move of each statistic), the simulation "
                f"moves by max|dlogit| {moved:.3e}, at the typical position (median over positions of "
                f"max|dlogit|) by {typical:.3e} over the sequence and {typical_generated:.3e} over the "
                f"generated positions, and changes the argmax at {flipped:.1%} of positions; each bound is at "
                f"least {NOISE_MARGIN:g}x its move"
            )
            total = sum(row.greedy_total for row in self.rows if row.greedy_pooled)
            lines.append(
                f"greedy over all rows: {self.greedy_disagreements} of {total} positions disagree, at most "
                f"{self.greedy_allowed} may ({NOISE_MARGIN:g}x that rate, rounded up)"
                + ("" if self.greedy_ok else ": FAIL")
            )
        if self.quality is not None:
            q = self.quality
            lines.append(
                f"reference: {self.reference}; quality against transformers fp32 over {q['positions']} "
                f"positions: min cosine {q['min_cosine']:.4f}, max KL {q['max_kl']:.4g}, mean KL "
                f"{q['mean_kl']:.4g}, greedy agreement {q['greedy_agree']}/{q['positions']} "
                f"(generated {q['generated_agree']}/{q['generated']})"
            )
        if self.image_quality is not None:
            q = self.image_quality
            lines.append(
                f"image prompts: quality against transformers fp32 over their {q['positions']} generated positions: "
                f"min cosine {q['min_cosine']:.4f}, max KL {q['max_kl']:.4g}, mean KL {q['mean_kl']:.4g}, greedy "
                f"agreement {q['greedy_agree']}/{q['positions']}"
            )
        if self.evaluation is not None:
            lines.append(self.evaluation.summary())
        if self.layers is not None:
            lines.append(self.layers.table())
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def default_prompt_lengths(chunk: int, context: int, new_tokens: int) -> list[int]:
    """Three ragged prompts, the longest crossing two chunk boundaries, within the context."""
    room = context - new_tokens
    lengths = [2 * chunk + 3, chunk + 3, 2 * chunk + chunk // 2]
    if max(lengths) > room:
        raise ValueError(
            f"the bundle's context ({context}) is too short to verify prompts crossing two chunks of {chunk}"
        )
    return lengths


def reference_weights(manifest):
    """The weights of the transformers model the bundle was built from, to be read one decoder layer at a time
    (export/layerwise.py: the source checkpoint's memory-mapped shards, or the recipe's seeded random draws), or
    one sentence saying why not."""
    source = manifest.raw.get("source")
    where = manifest.path / "manifest.json"
    if not isinstance(source, dict) or source.get("kind") not in ("checkpoint", "random"):
        raise BundleError(
            f"{where} has no usable source record (kind 'checkpoint' or 'random'), so there is "
            f"nothing to verify against"
        )
    if source["kind"] == "checkpoint":
        path = source.get("path")
        if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
            raise BundleError(
                f"the bundle's source checkpoint {path} is gone; verify needs it to rebuild the reference"
            )
    else:
        random = source.get("random")
        if not isinstance(random, dict) or not {"config", "seed", "logit_gain", "router_gain"} <= set(random):
            raise BundleError(f"{where}: source.random must hold config, seed, logit_gain and router_gain")
    try:
        if source["kind"] == "checkpoint":
            return layerwise.CheckpointWeights(source["path"])
        return layerwise.RandomWeights(random["config"], random["seed"], random["logit_gain"], random["router_gain"])
    except (TypeError, ValueError, KeyError, OSError) as err:
        reason = " ".join(str(err).split())[:300]
        raise BundleError(f"the reference model cannot be rebuilt from the bundle's source ({reason})") from None


def _verify_settings(manifest) -> dict:
    settings = manifest.raw.get("verify") or {}
    lengths = settings.get("prompt_lengths") if isinstance(settings, dict) else None
    new_tokens = settings.get("new_tokens", 32) if isinstance(settings, dict) else None
    positive = lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1  # noqa: E731
    if (
        not isinstance(settings, dict)
        or not positive(new_tokens)
        or not (lengths is None or (isinstance(lengths, list) and lengths and all(map(positive, lengths))))
    ):
        raise BundleError(
            f"{manifest.path / 'manifest.json'}: verify must hold new_tokens >= 1 and prompt_lengths, "
            f"a list of positive integers or null"
        )
    return settings


def verify(
    bundle: str,
    threads: int | None = None,
    log=print,
    new_tokens: int | None = None,
    perplexity: bool = True,
    layers: bool = False,
) -> Report:
    """`new_tokens` overrides the manifest's (a quick check); `perplexity` False skips the held-out evaluation of a
    trained checkpoint's bundle (tools/quant_report.py reports parity and quality only). The layer-by-layer
    comparison (quality/layers.py: which layer's hidden states first leave the tolerance) runs when the check
    fails, or always with `layers` (verify --plot draws it)."""
    manifest = read_manifest(bundle)
    model = manifest.model
    settings = _verify_settings(manifest)
    new_tokens = new_tokens or settings.get("new_tokens", 32)
    chunk = model["attention_chunk_size"]
    lengths = settings.get("prompt_lengths") or default_prompt_lengths(chunk, manifest.max_context, new_tokens)
    rng = np.random.default_rng(1234)
    prompts = [[int(t) for t in rng.integers(0, manifest.vocab_size, size=n)] for n in lengths]

    rows = []
    graphs = {role: graph.get("moe_dispatch") for role, graph in manifest.engine["graphs"].items()}
    # integrity and consistency first: they are cheap; weights stay memory-mapped (no prepacked copies)
    # weights stay memory-mapped (no prepacked copies), except for int8 activations: ONNX Runtime's MatMulNBits
    # runs its int8 kernels only on prepacked weights (QuantSpec.int8_activations), and verify checks those numbers
    with load(bundle, threads=threads, prepack=_int8_activations(manifest)) as engine:
        log("[verify] rebuilding the transformers reference from the bundle's source")
        weights = reference_weights(manifest)
        spec, simulation, rel_tolerance = bundle_simulation(manifest)
        # the same simulation (spec, ranges and scales read once) with its rounded activations jittered
        jittered = (
            [functools.partial(simulation, jitter=jitter) for jitter in JITTER_DRAWS]
            if spec is not None and _rounds_activations(spec)
            else []
        )
        if simulation is not None:
            log(f"[verify] reference: fake-quant simulation of {spec.summary()}")
        log(f"[verify] generating {new_tokens} tokens for {len(prompts)} prompts")
        generation = engine.generate(prompts, new_tokens, stop_tokens=[], return_logits=True)
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        sequences = [prompt + tokens for prompt, tokens in zip(prompts, generation.tokens)]
        # the simulation (or the fp32 model) over every sequence; a quantized bundle's quality is measured against
        # the fp32 model on the longest, in the same walk over the layers
        passes = [layerwise.Pass(sequences, simulation)]
        passes += [layerwise.Pass([sequences[longest]])] if simulation is not None else []
        passes += [layerwise.Pass([sequences[longest]], draw) for draw in jittered]
        log(
            f"[verify] reference logits layer by layer ({weights.config.num_hidden_layers} decoder layers, one in "
            f"memory at a time)"
        )
        try:
            reference_sets = layerwise.run_layer_by_layer(weights, passes)
        except (TypeError, ValueError, KeyError, OSError) as err:  # a damaged source tensor, read only now
            raise BundleError(
                f"the reference model cannot be rebuilt from the bundle's source ({' '.join(str(err).split())[:300]})"
            ) from None
        noise = None
        if jittered:  # passes 2, 3, ...: the draws, over the longest sequence
            simulated = reference_sets[0][longest]
            moves = []
            for (drawn,) in reference_sets[2:]:
                moved = np.abs(drawn - simulated)
                # the typical position, over the whole sequence (the score rows') and over the generated positions
                # (the generate rows hold the tail of their sequences, and a move grows along the sequence once a
                # tie has flipped)
                rows_max = moved.max(-1)
                moves.append(
                    (
                        float(moved.max()),
                        float(np.median(rows_max)),
                        float(np.median(rows_max[len(prompts[longest]) - 1 :])),
                        float((drawn.argmax(-1) != simulated.argmax(-1)).mean()),
                    )
                )
            noise = tuple(max(statistic) for statistic in zip(*moves))

        def checked(actual, expected, generated: bool) -> tuple[Comparison, Comparison | None]:
            """(max|dlogit|, and the typical position where activations are rounded), each against its bound."""
            base = relative_logit_tolerance(expected, rel_tolerance)
            if noise is None:
                return compare(actual, expected, base), None
            return (
                compare(actual, expected, max(base, NOISE_MARGIN * noise[0])),
                compare(actual, expected, max(base, NOISE_MARGIN * noise[2 if generated else 1]), TYPICAL),
            )

        for i, (prompt, tokens, logits) in enumerate(zip(prompts, generation.tokens, generation.logits)):
            expected_all = reference_sets[0][i]
            expected = expected_all[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
            agree = int((expected.argmax(-1) == np.array(tokens)).sum())
            comparison, typical = checked(logits, expected, generated=True)
            rows.append(Row("generate", i, len(tokens), comparison, agree, len(tokens), typical, noise is not None))
            if i == longest:
                sequence, sequence_expected = prompt + tokens, expected_all
        for mode in ("prefill", "decode"):
            log(f"[verify] score through the {mode} path ({len(sequence)} tokens)")
            scored = engine.score(sequence, mode=mode)
            agree = int((scored.argmax(-1) == sequence_expected.argmax(-1)).sum())
            comparison, typical = checked(scored, sequence_expected, generated=False)
            rows.append(
                Row(
                    f"score:{mode}",
                    longest,
                    len(sequence),
                    comparison,
                    agree,
                    len(sequence),
                    typical,
                    noise is not None,
                )
            )
            if mode == "prefill":
                scored_prefill = scored
        image_quality = None
        if engine.vision is not None:  # checked as the text rows are, against the same simulation (images.py)
            whole = None if simulation is None else functools.partial(simulation, index=None)
            found, image_quality = image_rows(
                engine, manifest.raw["source"], new_tokens, log, Row, checked, whole, noise is not None
            )
            rows += found
        greedy_allowed = (
            None if noise is None else math.ceil(NOISE_MARGIN * noise[3] * sum(row.greedy_total for row in rows) - 1e-9)
        )
        failed = not all(row.ok for row in rows) or (
            greedy_allowed is not None
            and sum(r.greedy_total - r.greedy_agree for r in rows if r.greedy_pooled) > greedy_allowed
        )
        by_layer = None
        if layers or failed:
            from llama4_deploy.quality.layers import layer_report

            log(f"[verify] layer by layer: the engine's hidden states against the reference's ({len(sequence)} tokens)")
            try:
                by_layer = layer_report(
                    engine,
                    reference_weights(manifest),  # drawn again: a recipe's random weights are read once, in order
                    sequence,
                    rel_tolerance,
                    simulation,
                    floor=0.0 if noise is None else NOISE_MARGIN * noise[0],
                    typical_floor=None if noise is None else NOISE_MARGIN * noise[1],
                )
            except ValueError as err:  # a TensorRT engine, a graph without the layer outputs: the verdict stands
                if layers:
                    raise
                log(f"[verify] no layer-by-layer comparison: {err}")
        steps, reruns = engine.steps, engine.overflow_reruns
    quality = None
    if simulation is not None:
        full = reference_sets[1][0]
        quality = measure(scored_prefill, full)
        generated = generation.tokens[longest]
        start = len(prompts[longest]) - 1
        quality["generated"] = len(generated)
        quality["generated_agree"] = int((full[start : start + len(generated)].argmax(-1) == np.array(generated)).sum())
    tuning = None
    if model.get("attn_temperature_tuning") and not all(model["rope_layers"]):
        tuning = int(model["floor_scale"]) - 1  # floor((p + 1) / floor_scale) >= 1
    return Report(
        rows,
        lengths,
        new_tokens,
        chunk,
        tuning,
        graphs,
        steps,
        reruns,
        "transformers fp32" if spec is None else f"fake-quant simulation ({spec.precision})",
        quality,
        rounding_noise=noise,
        greedy_allowed=greedy_allowed,
        evaluation=_perplexity(bundle, manifest, threads, log) if perplexity else None,
        layers=by_layer,
        image_quality=image_quality,
    )


def _int8_activations(manifest) -> bool:
    raw = manifest.engine.get("quantization") or {}
    return any(isinstance(r, dict) and r.get("activation") == "int8_block" for r in raw.get("rules") or ())


def _rounds_activations(spec) -> bool:
    return spec.activations or spec.int8_activations


def bundle_simulation(manifest):
    """(spec, simulation, tolerance): for a non-fp32 bundle, `simulation(model, index, jitter=0.0)` turns decoder
    layer `index` of the layer-by-layer reference into the fake-quant simulation of the bundle's spec
    (export/simulate.py, the whole-model simulation restricted to that layer; `index` None: a whole
    Llama4ForCausalLM, the image rows' reference; `jitter`: with its rounded activations perturbed, for the noise
    floor); (None, None, fp32 tolerance) otherwise."""
    raw = manifest.engine.get("quantization")
    if raw is None or raw["precision"] == "fp32":
        return None, None, REL_TOLERANCE
    spec = QuantSpec.model_validate(raw)
    amax = awq_scales = None
    calibration = manifest.raw.get("calibration") or {}
    if calibration.get("file"):
        ranges = json.loads((manifest.path / calibration["file"]).read_text())
        amax = ranges["activation_amax"]
    if calibration.get("awq_scales"):
        awq_scales = read_scales(manifest.path, calibration)

    def simulation(model, index, jitter: float = 0.0):
        simulate(model, spec, amax, awq_scales=awq_scales, layers=None if index is None else [index], jitter=jitter)

    tolerance = SIMULATION_TOLERANCE[spec.compute_dtype]
    if spec.int8_activations:
        tolerance = max(tolerance, INT8_ACTIVATION_TOLERANCE)
    return spec, simulation, tolerance


def _perplexity(bundle, manifest, threads, log):
    """Held-out perplexity of a bundle built from a trained checkpoint that ships a held-out sample."""
    try:
        text = default_text(manifest)
    except ValueError:
        return None  # random weights: perplexity says nothing
    log(f"[verify] perplexity on {text.name}")
    return evaluate(bundle, text, threads=threads)
