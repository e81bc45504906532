"""`make quant-report`: one table of quality, size and speed per recipe x precision x form.

Every figure comes from the code that owns it, run on a bundle built for the row:
- quality against transformers fp32 (min cosine of logits, max and mean next-token KL, greedy agreement over the
  generated tokens) and parity against the PyTorch fake-quant simulation of the bundle's spec (max |dlogit|, its
  tolerance, PASS/FAIL): `llama4_deploy.verify.verify`, as `llama4-deploy verify` prints them;
- size: every file of the bundle, against the fp32 bundle of the same recipe;
- speed: decode at batch 1 against the fp32 engine timed alternately in the same run, bytes per step at the
  stored precision and the roofline fraction: `llama4_deploy.bench.decode_speed`, as `make bench` prints them.

Recipes are the repository's random and shipped ones, plus `tiny-std0.02` (STD002): tiny's config at
transformers' own initialization (std 0.02, no peaked gains, seed 3), the checkpoint the issue's public quality
floors are defined on (tests/test_quantize_parity.py builds the same one); its fp8/int4 rows carry the floor check.
bf16 builds and is sized, but ONNX Runtime's CPU has no bf16 kernels: its other cells say so.

    python -m tools.quant_report [--recipes ...] [--precisions ...] [--quick] [--threads 2]

Bundles are written into a temporary directory the report creates and removes. Progress goes to stderr, the
table to stdout (a markdown table). Bad input: one sentence on stderr, exit 2, before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STD002 = "tiny-std0.02"
STD002_SEED = 3
DEFAULT_RECIPES = ("tiny", "tiny-trained", "scout-mini", "maverick-mini", STD002)
# what each row builds: build() keywords through bench.precision_build_options
CHOICES = ("fp16", "fp8-qdq", "int4-qdq", "int4-ort", "int4-ort-int8", "bf16")
# the public floors on the std-0.02 checkpoint: (min cosine >=, max KL <=)
FLOORS = {"fp8": (0.98, 0.005), "int4": (0.90, 0.03)}
QUICK_NEW_TOKENS = 4
NOT_RUN = "not run on CPU"


class ReportError(ValueError):
    """Bad input to the report, in one sentence."""


def write_std002_checkpoint(directory: Path) -> Path:
    """tiny's config at transformers' initialization (std 0.02), no peaked gains, saved by transformers."""
    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.reference import random_model

    config = dict(load_recipe("tiny").random.config)
    random_model(config, STD002_SEED, logit_gain=1.0, router_gain=1.0).save_pretrained(directory)
    return directory


@dataclasses.dataclass
class Row:
    recipe: str
    choice: str  # fp32, or one of CHOICES
    bundle: Path
    bytes: int
    fp32_bytes: int
    report: object | None = None  # verify.Report; None when not run
    speed: object | None = None  # bench.DecodeSpeed; None in --quick mode or when not run
    not_run: str | None = None  # why the bundle was not run (bf16 on the CPU)
    block: int = 128  # int4 block size (int8_block_size)

    @property
    def precision(self) -> str:
        return self.choice.partition("-")[0]

    @property
    def form(self) -> str:
        return (self.choice.partition("-")[2] or "-") + ("" if self.block == 128 else f" (block {self.block})")

    @property
    def size_ratio(self) -> float:
        return self.bytes / self.fp32_bytes

    @property
    def floor(self) -> bool | None:
        """The public floor check, on the std-0.02 checkpoint's fp8 and int4 rows only."""
        if self.recipe != STD002 or self.precision not in FLOORS or self.report is None:
            return None
        min_cosine, max_kl = FLOORS[self.precision]
        q = self.report.quality
        return q["min_cosine"] >= min_cosine and q["max_kl"] <= max_kl

    def worst(self):
        """verify's row with the largest max |dlogit|: (value, its tolerance)."""
        row = max(self.report.rows, key=lambda r: r.comparison.value)
        return row.comparison.value, row.comparison.tolerance


def int8_block_size(name: str) -> int:
    """The int4 block of a recipe's int8-activation row: 128, the block of the report's other int4 rows, where it
    divides the hidden and expert intermediate sizes, else the largest block that does (int8 expert activations are
    QMoE's, which needs both to be multiples of the block; tiny's 64 and 32 take 32, tiny-trained's 192 and 384 take
    64), so every recipe has the row; the table's form cell names a block other than 128. (A build's own default for
    int8 activations is block 32: targets/base.py.)"""
    import json

    from llama4_deploy.build.recipe import load_recipe
    from llama4_deploy.export.shape import ModelShape

    recipe = load_recipe("tiny" if name == STD002 else name)
    if recipe.random is not None:
        shape = recipe.random.shape()
    else:
        shape = ModelShape.from_config(json.loads((recipe.checkpoint_path / "config.json").read_text()))
    return next(b for b in (128, 64, 32) if not shape.hidden_size % b and not shape.intermediate_size % b)


def check_arguments(recipes: list[str], choices: list[str], threads: int) -> None:
    from llama4_deploy.build.recipe import RecipeError, available, load_recipe

    if not recipes:
        raise ReportError("--recipes is empty; give at least one of " + ", ".join(DEFAULT_RECIPES))
    for name in recipes:
        if name == STD002:
            continue
        if name not in available():
            raise ReportError(f"unknown recipe {name!r}; choose from {', '.join(available() + [STD002])}")
        try:
            recipe = load_recipe(name)
        except RecipeError as err:
            raise ReportError(str(err)) from None
        if recipe.random is None and recipe.checkpoint is None:
            raise ReportError(
                f"recipe {name} needs a checkpoint of your own, and the report builds only recipes "
                f"that carry their weights ({', '.join(DEFAULT_RECIPES)})"
            )
    for choice in choices:
        if choice not in CHOICES:
            raise ReportError(
                f"unknown precision {choice!r}; choose from {', '.join(CHOICES)} (fp32 is always the first row)"
            )
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ReportError(f"--threads {threads!r} is not a thread count; give an integer of at least 1")


def build_rows(
    recipes: list[str],
    choices: list[str],
    scratch: Path,
    quick: bool = False,
    threads: int = 2,
    progress: Callable[[str], None] = print,
) -> list[Row]:
    """Build, verify, size and (unless quick) time each recipe's fp32 bundle and one bundle per choice, under
    `scratch` (the caller's directory; nothing outside it is written, nothing is removed)."""
    from llama4_deploy.build import build
    from llama4_deploy.quality.verify import verify
    from llama4_deploy.runtime import BundleError, load, read_manifest
    from llama4_deploy.runtime.backends import check_onnxruntime_dtype
    from tools.bench import FULL, bundle_bytes, decode_speed, precision_build_options

    check_arguments(recipes, choices, threads)
    start = time.time()

    def say(message: str) -> None:
        progress(f"[quant-report {time.time() - start:6.0f}s] {message}")

    rows: list[Row] = []
    for name in recipes:
        if name == STD002:
            say(f"{name}: writing the checkpoint (tiny's config, std 0.02, seed {STD002_SEED})")
            source = {"checkpoint": write_std002_checkpoint(scratch / f"{name}-checkpoint")}
        else:
            source = {"recipe": name}
        fp32_bytes = 0
        with contextlib.ExitStack() as keep:  # the fp32 engine stays loaded while the recipe's rows are timed
            base = None
            for choice in ["fp32"] + list(choices):
                options = precision_build_options(choice) if choice != "fp32" else {}
                if options.get("int4_compute") == "int8":
                    options["block_size"] = int8_block_size(name)
                say(f"{name} {choice}: building")
                bundle = build(**source, out=scratch / f"{name}-{choice}", log=lambda _: None, **options).bundle
                size = bundle_bytes(bundle)
                fp32_bytes = fp32_bytes or size
                row = Row(name, choice, bundle, size, fp32_bytes, block=options.get("block_size", 128))
                rows.append(row)
                try:
                    check_onnxruntime_dtype(read_manifest(bundle))
                except BundleError:
                    row.not_run = NOT_RUN
                    say(f"{name} {choice}: {size / 1e6:.1f} MB; {NOT_RUN} (ONNX Runtime has no bf16 CPU kernels)")
                    continue
                say(f"{name} {choice}: {size / 1e6:.1f} MB ({row.size_ratio:.3f}x fp32); verify")
                row.report = verify(
                    str(bundle),
                    threads=threads,
                    new_tokens=QUICK_NEW_TOKENS if quick else None,
                    perplexity=False,
                    log=lambda message, where=f"{name} {choice}": say(f"{where}: {message}"),
                )
                if quick:
                    continue
                if base is None:  # the fp32 row: its engine is the base every other row is timed against
                    say(f"{name} {choice}: timing decode b1")
                    base = keep.enter_context(load(bundle, threads=threads))
                    row.speed = decode_speed(base, bundle, None, threads, FULL)
                else:
                    say(f"{name} {choice}: timing decode b1 against fp32, alternately")
                    with load(bundle, threads=threads) as engine:
                        row.speed = decode_speed(engine, bundle, base, threads, FULL)
                say(f"{name} {choice}: decode b1 {row.speed.step_ms:.3f} ms ({row.speed.x_fp32:.2f}x fp32)")
    return rows


def _cells(row: Row) -> list[str]:
    cells = [row.recipe, row.precision, row.form]
    if row.report is None:
        quality = [NOT_RUN, "-", "-", "-"]
        parity = ["-", "-", "-"]
    else:
        q = row.report.quality
        if q is None:  # fp32: verify's reference is transformers fp32 itself
            quality = ["-", "-", "-", "-"]
        else:
            quality = [
                f"{q['min_cosine']:.4f}",
                f"{q['max_kl']:.3g}",
                f"{q['mean_kl']:.3g}",
                f"{q['generated_agree']}/{q['generated']}",
            ]
        value, tolerance = row.worst()
        parity = [f"{value:.2e}", f"{tolerance:.2e}", "PASS" if row.report.ok else "FAIL"]
    floor = {None: "-", True: "pass", False: "FAIL"}[row.floor]
    size = [f"{row.bytes:,}", f"{row.size_ratio:.3f}x"]
    if row.speed is None:
        speed = [NOT_RUN if row.not_run else "-", "-", "-", "-", "-"]
    else:
        s = row.speed
        speed = [
            f"{s.step_ms:.3f}",
            f"{s.fp32_ms:.3f}",
            f"{s.x_fp32:.2f}x",
            f"{s.stored_bytes / 1e6:.2f}",
            f"{100 * s.roofline:.0f}%",
        ]
    return cells + quality + parity + [floor] + size + speed


HEADER = [
    "recipe",
    "precision",
    "form",
    "min cos",
    "max KL",
    "mean KL",
    "greedy",
    "max \\|dlogit\\| vs sim",
    "tolerance",
    "vs sim",
    "floor",
    "bytes",
    "x fp32",
    "decode b1 ms",
    "fp32 b1 ms",
    "x fp32",
    "MB/step",
    "roofline",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def legend(quick: bool, threads: int) -> str:
    from tools.bench import FULL

    timing = (
        "--quick: no timing"
        if quick
        else f"decode b1 after {FULL.context} cached tokens, median of {FULL.decode_repeats} steps, 3 rounds "
        f"alternating with the fp32 engine (medians); {threads} ONNX Runtime threads"
    )
    return "\n".join(
        [
            "quality: llama4-deploy verify's figures against transformers fp32 (cosine and next-token KL over the "
            "longest prompt and its generated tokens; greedy: generated tokens transformers' fp32 argmax agrees "
            "with)",
            "vs sim: verify's largest max |dlogit| over its rows against the fake-quant simulation of the bundle's "
            "spec (fp32 rows: against transformers fp32), that row's tolerance, and verify's PASS/FAIL (greedy "
            "identical too)",
            f"floor: {STD002} only; fp8 min cos >= {FLOORS['fp8'][0]} and max KL <= {FLOORS['fp8'][1]}, "
            f"int4 min cos >= "
            f"{FLOORS['int4'][0]} and max KL <= {FLOORS['int4'][1]}",
            "bytes: every file of the bundle; MB/step: weight bytes one decode step reads at the stored precision; "
            "roofline: one MatMul streaming those bytes / the step",
            timing,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    parser.add_argument("--precisions", default=",".join(CHOICES), help="rows after fp32: " + ", ".join(CHOICES))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_NEW_TOKENS} new tokens per verify prompt and no timing (the test mode)",
    )
    parser.add_argument("--threads", default="2", help="ONNX Runtime intra-op threads (2)")

    def refuse(message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = refuse  # argparse's own complaints become one sentence and exit 2 as well
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    choices = [c for c in args.precisions.split(",") if c]
    threads = int(args.threads) if args.threads.isdigit() else args.threads
    try:
        check_arguments(recipes, choices, threads)
    except ReportError as err:
        refuse(str(err))
    progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="llama4-quant-report-") as scratch:
        rows = build_rows(recipes, choices, Path(scratch), args.quick, threads, progress)
    print(table(rows))
    print(legend(args.quick, threads))
    ran = [row for row in rows if row.report is not None]
    floors = [row for row in rows if row.floor is not None]
    print(
        f"verify PASS {sum(row.report.ok for row in ran)}/{len(ran)}; floors pass "
        f"{sum(bool(row.floor) for row in floors)}/{len(floors)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
