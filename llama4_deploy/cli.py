"""`llama4-deploy`: build, verify and run bundles. Flags map one-to-one onto the functions."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from llama4_deploy import targets
from llama4_deploy.build import BuildError
from llama4_deploy.build.options import choices
from llama4_deploy.build.recipe import RecipeError, available
from llama4_deploy.planning.deployment import PRECISION_PLANS
from llama4_deploy.planning.deployment import plan as make_plan

# Commands import their implementation (build, runtime, onnx, torch) inside themselves, as _user_errors its error
# types: start-up loads only click and the recipe schema, so `--help` and `compile`'s refusal answer at once


class UserError(click.ClickException):
    """One sentence on stderr, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _user_errors():
    from llama4_deploy.export.checkpoint import CheckpointError
    from llama4_deploy.runtime.bundle import BundleError

    # ValueError covers BundleError and the runtime's argument checks; OSError an unreadable path
    return (BuildError, CheckpointError, RecipeError, BundleError, ValueError, OSError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Compile Llama 4 checkpoints into static-shape engines, verify them, run them."""


# the build's overrides, one flag per build() keyword (build/options.py); a choice flag's values are the schema's
_BUILD_FLAGS = (
    ("moe_dispatch", "MoE lowering (default: the recipe's, auto)"),
    ("attention", "attention form (default: the recipe's, auto: gqa for ONNX Runtime)"),
    (
        "max_context",
        "longest prompt + generation per row (default: the recipe's; a bare checkpoint's "
        "max_position_embeddings, at most 32768)",
    ),
    ("max_batch", "most rows per engine step (default: the recipe's)"),
    ("prefill_tokens", "most new tokens per row in one prefill step (default: the recipe's)"),
    ("precision", "weights and compute dtype (default: the recipe's, fp32)"),
    ("compute_dtype", "dtype of activations (default: follows --precision; fp8/int4 compute in float32)"),
    ("block_size", "int4 block along the reduction axis (default: 32 for the ort form, 128 for qdq and tensorrt)"),
    ("quant_form", "quantized form: qdq (standard Q/DQ, TensorRT's), ort (ONNX Runtime's 4-bit kernels), auto"),
    ("quant_method", "int4 weight rounding: rtn (round to nearest, default) or awq (activation-aware scales)"),
    (
        "int4_compute",
        "int4 ort form: int8 activations (MatMulNBits, QMoE accuracy_level 4: the default, faster; float where a "
        "pinned --moe-dispatch is not native) or float",
    ),
    (
        "int4_zero_point",
        "int4 ort form: asymmetric blocks with a 4-bit zero point each (the default; symmetric where a pinned "
        "--moe-dispatch is not native) or symmetric",
    ),
    (
        "int8_weights",
        "int4 ort form: projections kept at 8 bits, comma-separated (q, k, v, o, shared, mlp) or none; default v, "
        "as llama.cpp's Q4_K_M keeps attention V at more bits",
    ),
    ("calibration", "fp8 activation / int4 awq calibration: text lines or a JSON list of token-id lists"),
    (
        "stages",
        "pipeline stages: split the layers into this many graphs, balanced by weight bytes (default: the recipe's, 1)",
    ),
    (
        "target",
        "backend the bundle is for (default: the recipe's); tensorrt: a TensorRT-form bundle for "
        "llama4-deploy compile (bf16 compute unless --precision/--compute-dtype)",
    ),
)


class _ChoiceList(click.ParamType):
    """A comma-separated list of choices, or `none` for the empty list."""

    name = "list"

    def __init__(self, allowed: list[str]):
        self.allowed = allowed

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if value.strip().lower() == "none":
            return ()
        items = tuple(item.strip() for item in value.split(","))
        bad = next((item for item in items if item not in self.allowed), None)
        if bad is not None:
            self.fail(f"{bad!r} is not one of {', '.join(self.allowed)} (or none)", param, ctx)
        return items


_FLAG_TYPES = {
    "max_context": int,
    "max_batch": int,
    "prefill_tokens": int,
    "stages": int,
    "calibration": click.Path(),
    "int8_weights": _ChoiceList(choices("int8_weights")),
}


def _build_flags(command):
    for argument, help_text in reversed(_BUILD_FLAGS):
        kind = _FLAG_TYPES.get(argument) or click.Choice(choices(argument))
        command = click.option(f"--{argument.replace('_', '-')}", type=kind, help=help_text)(command)
    return command


@main.command()
@click.option("--recipe", help=f"recipe name ({', '.join(available())}) or a YAML path; default tiny")
@click.option("--checkpoint", type=click.Path(), help="Hugging Face checkpoint directory")
@click.option("--out", type=click.Path(), help="bundle directory (default build/<recipe>)")
@click.option(
    "--force",
    is_flag=True,
    help="replace --out even if it is not a bundle this tool wrote; build a KV cache larger than this machine's memory",
)
@click.option(
    "--no-vision",
    is_flag=True,
    help="a multimodal checkpoint: build its text model only, without the vision engine (images then refused)",
)
@_build_flags
def build(recipe, checkpoint, out, force, block_size, no_vision, **overrides) -> None:
    """Build a bundle from a recipe and/or a checkpoint."""
    from llama4_deploy.build import build as run_build

    overrides["vision"] = False if no_vision else None
    try:
        block_size = None if block_size is None else int(block_size)
        result = run_build(
            recipe=recipe, checkpoint=checkpoint, out=out, force=force, block_size=block_size, **overrides
        )
    except _user_errors() as err:
        raise UserError(str(err)) from None
    except KeyboardInterrupt:  # Ctrl-C: no bundle; the finished steps stay in the build cache (build_cache.py)
        click.echo("interrupted: no bundle was written; rerun the same command to resume", err=True)
        sys.exit(130)
    from llama4_deploy.planning.costs import bundle_costs, cost_table

    m = result.manifest
    shape = m["model"]
    graphs = {role: graph["moe_dispatch"] for role, graph in m["engine"]["graphs"].items()}
    split = "".join(
        f", stage {i}: layers {s['layers'][0]}-{s['layers'][1] - 1}"
        for i, s in enumerate(m["engine"].get("stages", []))
    )
    click.echo(
        f"built {result.bundle}: {shape['num_layers']} layers{split}, {shape['num_experts']} experts, "
        f"{m['engine']['precision']} {m['engine']['backend']}, MoE dispatch {graphs}, passes {result.passes}, "
        f"{result.seconds:.1f}s, peak RSS {result.peak_rss_mb:.0f} MB"
    )
    click.echo(cost_table(bundle_costs(result.bundle)))
    from llama4_deploy.runtime.bundle import read_manifest
    from llama4_deploy.runtime.kv_cache import cache_memory

    click.echo(cache_memory(read_manifest(result.bundle)))


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads")
@click.option(
    "--files",
    "files_only",
    is_flag=True,
    help="only check every file's size and SHA-256 against the manifest (exit 2 naming a changed file)",
)
@click.option(
    "--plot",
    type=click.Path(),
    help="write a PNG of max |dlogit| and max |dhidden| per decoder layer against transformers' (layer by layer)",
)
def verify(bundle, threads, files_only, plot) -> None:
    """Compare a bundle with transformers; exit 1 on mismatch (naming the first layer that leaves the tolerance)."""
    if plot is not None:
        if files_only:
            raise UserError("--plot draws the layer-by-layer comparison, which --files does not run")
        _check_png_path(plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib (pip install 'llama4-deploy[eval]')") from None
    try:
        if files_only:
            from llama4_deploy.runtime import read_manifest
            from llama4_deploy.runtime.integrity import check_files

            count, size, seconds = check_files(read_manifest(bundle))
            click.echo(f"{count} files ({size / 1e6:.1f} MB): sizes and SHA-256 match the manifest ({seconds:.2f}s)")
            return
        from llama4_deploy.quality.verify import verify as run_verify  # loads torch, which --files does not need

        report = run_verify(bundle, threads=threads, log=lambda msg: click.echo(msg, err=True), layers=plot is not None)
    except _user_errors() as err:
        raise UserError(str(err)) from None
    click.echo(report.table())
    if plot is not None:
        from llama4_deploy.quality.layers import plot as draw

        written = _write_png(
            plot, lambda path: draw(report.layers, path, f"{Path(bundle).name}: engine vs transformers")
        )
        click.echo(f"wrote {written}")
    sys.exit(0 if report.ok else 1)


@main.command(name="compile")
@click.argument("bundle", type=click.Path())
@click.option(
    "--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="TensorRT builder optimization level"
)
def compile_(bundle, opt_level) -> None:
    """Build TensorRT plans for a TensorRT-form bundle (on the GPU machine, with TensorRT installed)."""
    from llama4_deploy.targets.tensorrt_compile import CompileError, compile_bundle, tensorrt_missing

    missing = tensorrt_missing()  # before anything is read or imported: fast, nothing written
    if missing:
        raise UserError(missing)
    try:
        result = compile_bundle(bundle, opt_level=opt_level, log=lambda msg: click.echo(msg, err=True))
    except (CompileError, *_user_errors()) as err:
        raise UserError(str(err)) from None
    click.echo(
        f"compiled {result.bundle}: {', '.join(result.plans.values())} for {result.record['gpu']} with "
        f"TensorRT {result.record['tensorrt_version']} in {result.seconds:.1f}s"
    )


@main.command()
@click.argument("bundle", type=click.Path())
def cost(bundle) -> None:
    """FLOPs and weight bytes per step, counted from the graphs, vs ideal and dense."""
    from llama4_deploy.planning.costs import bundle_costs, cost_table

    try:
        click.echo(cost_table(bundle_costs(bundle)))
    except _user_errors() as err:
        raise UserError(str(err)) from None


@main.command()
@click.argument("path", type=click.Path())
def lint(path) -> None:
    """Static-shape lint of a bundle's graphs or one ONNX file (plus TensorRT's parser rules for a TensorRT-form
    bundle); exit 1 on any problem."""
    import onnx_ir as ir

    from llama4_deploy.graphs.lint import lint_static
    from llama4_deploy.runtime.paths import kind

    if not path.strip():
        raise UserError("the path to lint is empty; give an ONNX file or a bundle directory")
    target = Path(path)
    found = kind(target)
    if found not in ("a file", "a directory", "missing"):
        raise UserError(f"{path} is {found}, neither an ONNX file nor a bundle directory")
    graphs = sorted(target.glob("*.onnx")) if found == "a directory" else [target]
    if not graphs or not all(g.is_file() for g in graphs):
        raise UserError(f"{path} is neither an ONNX file nor a bundle directory with .onnx graphs")
    bundle_lint = _target_lint(target)  # a bundle's graphs: its target's parser rules too
    failed = False
    for graph in graphs:
        if graph.stat().st_size == 0:  # protobuf reads no bytes as an empty model, which has nothing to flag
            raise UserError(f"{graph} is empty (0 bytes), not an ONNX model")
        try:
            model = ir.load(graph)
            problems = lint_static(model) + bundle_lint(model)
        except Exception as err:  # onnx's own parse errors
            reason = " ".join(str(err).split())[:300]
            raise UserError(f"{graph} cannot be read as ONNX ({reason or type(err).__name__})") from None
        if model.ir_version < 1 or not model.opset_imports or not model.graph.outputs:
            # a few stray bytes can parse as a protobuf message: a model declares its IR version, opsets and outputs
            raise UserError(f"{graph} is not an ONNX model (it declares no IR version, opset or graph output)")
        click.echo(f"{graph.name}: {'clean' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            click.echo(f"  {problem}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("target")
@click.option(
    "--context",
    type=int,
    help="reference context in tokens per row: fit check and stage balance "
    "(default: the recipe's max_context, else 32768)",
)
@click.option("--stages", type=int, help="pipeline stages of the suggested split (default: fewest H100s that fit)")
@click.option("--precision", type=click.Choice(PRECISION_PLANS), help="precision of the suggested split (default fp8)")
def plan(target, context, stages, precision) -> None:
    """Deployment plan from the config alone: parameters, bytes, GPUs, context, stage split."""
    try:
        click.echo(make_plan(target, context=context, stages=stages, precision=precision))
    except _user_errors() as err:
        raise UserError(str(err)) from None


def _target_lint(path):
    """For a bundle directory, its target's checks of a graph (TensorRT's parser rules for a TensorRT-form bundle);
    for anything else, none."""
    try:
        m = json.loads((path / "manifest.json").read_text())
        target = targets.get(m["engine"]["backend"])
        factor = max((g.get("capacity_factor", 1.25) for g in m["engine"]["graphs"].values()), default=1.25)
        profiles, facts = m["profiles"], m["model"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return lambda model: []  # not a (readable) bundle: the static-shape lint alone
    return lambda model: target.lint(model, profiles, facts, factor)


@main.command(name="eval")
@click.argument("bundle", type=click.Path())
@click.option("--text", type=click.Path(), help="text file (default: the checkpoint's held-out sample)")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads")
@click.option(
    "--errors",
    type=click.Choice(["strict", "replace"]),
    default="strict",
    show_default=True,
    help="a --text that is not valid UTF-8: refuse it, or read each undecodable byte as U+FFFD (and say how many)",
)
@click.option(
    "--tasks",
    help="lm-evaluation-harness tasks, comma-separated, run on the bundle instead of perplexity (the eval extra)",
)
@click.option("--include-path", type=click.Path(), help="a folder of lm-eval task YAML files of your own (--tasks)")
@click.option("--limit", type=int, help="at most this many documents per task (--tasks)")
@click.option(
    "--allow-downloads",
    is_flag=True,
    help="--tasks: let lm-eval fetch task data from the Hugging Face Hub (default: local files and the cache only)",
)
@click.option(
    "--needle",
    is_flag=True,
    help="passkey retrieval sweep: accuracy by prompt length x needle depth, a heatmap PNG and a JSON of every trial",
)
@click.option("--haystack", type=click.Path(), help="filler text for --needle (default: the held-out sample)")
@click.option("--compare", type=click.Path(), help="--needle on a second bundle too: both tables and the difference")
@click.option(
    "--lengths", help="--needle prompt lengths, comma-separated (default: 256 doubling to the context, and the chunk's)"
)
@click.option("--depth-steps", type=int, default=5, show_default=True, help="--needle depths from 0% to 100%")
@click.option("--trials", type=int, default=5, show_default=True, help="--needle trials per cell, each its own key")
@click.option("--out", type=click.Path(), help="--needle's folder for needle.png and needle.json (default needle-NAME)")
def eval_(
    bundle,
    text,
    threads,
    errors,
    tasks,
    include_path,
    limit,
    allow_downloads,
    needle,
    haystack,
    compare,
    lengths,
    depth_steps,
    trials,
    out,
) -> None:
    """Perplexity on held-out text through the prefill path, and tokens/s; with --tasks, lm-eval's tasks; with
    --needle, a long-context retrieval sweep."""
    needle_flags = (("--haystack", haystack), ("--compare", compare), ("--lengths", lengths), ("--out", out))
    if not needle:
        for flag, value in needle_flags:
            if value is not None:
                raise UserError(f"{flag} goes with --needle")
    else:
        if tasks is not None or text is not None:
            raise UserError("--needle runs alone: drop --tasks and --text")
        _needle(bundle, haystack, compare, lengths, depth_steps, trials, out, threads)
        return
    if tasks is None:
        for flag, value in (
            ("--include-path", include_path),
            ("--limit", limit),
            ("--allow-downloads", allow_downloads or None),
        ):
            if value is not None:
                raise UserError(f"{flag} goes with --tasks")
        from llama4_deploy.quality.evaluate import evaluate

        try:
            click.echo(evaluate(bundle, text, threads=threads, errors=errors).summary())
        except _user_errors() as err:
            raise UserError(str(err)) from None
        return
    if text is not None:
        raise UserError("--text is for perplexity; lm-eval's tasks bring their own documents (drop --text or --tasks)")
    # before lm-eval (and so datasets and huggingface_hub) is imported: they read the switch at import
    os.environ.update({} if allow_downloads else {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    try:
        from lm_eval.utils import make_table

        from llama4_deploy.quality.harness import run_tasks
    except ImportError as err:
        raise UserError(f"--tasks needs the eval extra (pip install 'llama4-deploy[eval]'): {err}") from None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    try:
        results = run_tasks(
            bundle, names, include_path=include_path, limit=limit, threads=threads, allow_downloads=allow_downloads
        )
    except _user_errors() as err:
        raise UserError(str(err)) from None
    click.echo(make_table(results))
    if "groups" in results:
        click.echo(make_table(results, "groups"))


def _needle(bundle, haystack, compare, lengths, depth_steps, trials, out, threads) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--needle needs matplotlib (pip install 'llama4-deploy[eval]')") from None
    from llama4_deploy.quality.needle import accuracy_table, sweep, write_outputs

    try:
        parsed = None if lengths is None else [int(n) for n in lengths.split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers, got {lengths!r}") from None
    folder = Path(out) if out is not None else Path(f"needle-{Path(bundle).name}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is not a directory")
    options = dict(lengths=parsed, depth_steps=depth_steps, trials=trials, threads=threads)
    try:
        sweeps = [sweep(bundle, haystack, **options)]
        if compare is not None:
            sweeps.append(sweep(compare, haystack, tokenizer_of=bundle, **options))
    except _user_errors() as err:
        raise UserError(str(err)) from None
    for result in sweeps:
        click.echo(result.table())
    if len(sweeps) == 2:
        first, second = sweeps
        click.echo(
            accuracy_table(
                second.accuracy() - first.accuracy(),
                first.lengths,
                first.depths,
                f"difference, {Path(second.bundle).name} - {Path(first.bundle).name} (percentage points)",
                signed=True,
            )
        )
    for path in write_outputs(sweeps, folder, _write_png):
        click.echo(f"wrote {path}")


def _check_png_path(path: str, flag: str) -> None:
    """Refuse, before any work, a PNG path whose folder is missing or that names a folder."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise UserError(f"{flag} {path} does not end in .png")
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory")
    if not target.parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {target.parent} does not exist")


def _write_png(path: str, draw) -> Path:
    """draw(temporary path) then rename into place: a PNG appears whole or not at all."""
    target = Path(path)
    partial = target.with_name(f".{target.stem}.partial.png")
    try:
        draw(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--ids must be comma-separated integers, got {text!r}") from None


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", help="text, encoded with the bundle's tokenizer.json")
@click.option("--ids", help="comma-separated token ids")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int)
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads")
@click.option(
    "--verify-files/--no-verify-files",
    default=None,
    help="check every file's SHA-256 at load (default: yes, unless LLAMA4_DEPLOY_VERIFY_FILES=0)",
)
@click.option("--allow-non-finite", is_flag=True, help="let NaN/Inf logits through instead of stopping")
@click.option(
    "--devices",
    help="device of each pipeline stage, comma-separated: cpu or cuda:N (default: cpu "
    "on ONNX Runtime, stage s on cuda:s on TensorRT)",
)
@click.option(
    "--image",
    "image_files",
    multiple=True,
    type=click.Path(),
    help="an image file for the prompt's next <|image|> placeholder (repeatable, in order; a vision bundle)",
)
def run(
    bundle,
    prompt,
    ids,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    threads,
    verify_files,
    allow_non_finite,
    devices,
    image_files,
) -> None:
    """Generate from a prompt (text or token ids)."""
    from llama4_deploy.runtime import load
    from llama4_deploy.runtime.tokenizer import load_tokenizer

    if (prompt is None) == (ids is None):
        raise UserError("give exactly one of --prompt TEXT or --ids 1,2,3")
    try:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer takes
        (prompt or "").encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(
            f"--prompt is not valid Unicode text: character {err.start} is {prompt[err.start]!r}, a lone surrogate "
            f"(bytes that are not UTF-8)"
        ) from None
    try:
        with load(
            bundle, threads=threads, verify_files=verify_files, allow_non_finite=allow_non_finite, devices=devices
        ) as engine:
            tokenizer = None
            if prompt is not None:
                tokenizer = load_tokenizer(engine.manifest)
                prompt_ids = tokenizer.encode(prompt)
            else:
                prompt_ids = _parse_ids(ids)
            result = engine.generate(
                [prompt_ids],
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                images=[list(image_files)] if image_files else None,
            )
    except _user_errors() as err:
        raise UserError(str(err)) from None
    tokens = result.tokens[0]
    click.echo(tokenizer.decode(tokens) if tokenizer else ",".join(map(str, tokens)))


def _within(minimum: float, maximum: float | None = None, must: str | None = None):
    """A click callback refusing, in one `error:` sentence before the command runs, a number outside
    [minimum, maximum] or not finite (click's own float type takes nan and inf)."""

    def check(ctx, param, value):
        if value is None:
            return value
        if not (math.isfinite(value) and minimum <= value and (maximum is None or value <= maximum)):
            bounds = must or (f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]")
            raise UserError(f"--{param.name.replace('_', '-')} is {value}; it must be {bounds}")
        return value

    return check


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=int,
    callback=_within(0, 65535, "a TCP port in [0, 65535] (0: any free port)"),
    help="TCP port (0: any free port)",
)
@click.option(
    "--max-batch", type=int, callback=_within(1), help="rows of the running batch (default: the bundle's max_batch)"
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=int,
    callback=_within(0),
    help="requests that may wait for a row; beyond it the server answers 429",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=float,
    callback=_within(0, must="a finite number of seconds, 0 or more"),
    help="seconds SIGTERM waits for in-flight requests",
)
@click.option("--threads", type=int, callback=_within(1), help="ONNX Runtime intra-op threads")
@click.option(
    "--admission-wait-ms",
    default=5.0,
    show_default=True,
    type=float,
    callback=_within(0, 1000),
    help="on an idle server, wait until requests stop arriving for this long (at most 4x) so a burst prefills "
    "together; 0: prefill the first request at once",
)
@click.option(
    "--trace-steps",
    type=click.Path(dir_okay=False),
    help="a new file to write one JSON line per engine step to (kind, seconds, rows, tokens, start time)",
)
@click.option(
    "--max-request-bytes",
    default=32 * 2**20,
    show_default=True,
    type=int,
    callback=_within(1),
    help="largest request body; a larger one is answered 413",
)
@click.option(
    "--api-key",
    envvar="LLAMA4_DEPLOY_API_KEY",
    help="require 'Authorization: Bearer KEY' on the OpenAI routes (default: $LLAMA4_DEPLOY_API_KEY; none: open)",
)
@click.option("--served-model-name", help="the model name clients send and see (default: the bundle's name)")
@click.option("--chat-template", help="a Jinja chat template file used instead of the checkpoint's")
@click.option(
    "--allowed-origins",
    multiple=True,
    help="an origin browsers may call from (CORS; repeat the option for several, '*' for any)",
)
@click.option(
    "--tool-call-parser",
    type=click.Choice(["llama4_json", "llama4_pythonic"]),
    default="llama4_json",
    show_default=True,
    help="how the model writes tool calls (as the chat template teaches it; vLLM's parser names)",
)
@click.option("--log-requests", is_flag=True, help="an access log line per request on stderr (never the prompt)")
@click.option(
    "--ignore-unknown-fields",
    is_flag=True,
    help="ignore request fields the server does not know instead of answering 400 (for clients that send extras)",
)
@click.option(
    "--devices",
    help="device of each pipeline stage, comma-separated: cpu or cuda:N (default: cpu "
    "on ONNX Runtime, stage s on cuda:s on TensorRT)",
)
@click.option(
    "--allowed-local-media-path",
    type=click.Path(),
    help="a directory whose files image_url parts may name (file:// URLs or paths); default: data: URLs only",
)
def serve(bundle, **options) -> None:
    """Serve a bundle over HTTP with OpenAI's API (needs the `serve` extra)."""
    media = options.get("allowed_local_media_path")
    if media is not None and not Path(media).is_dir():
        raise UserError(f"--allowed-local-media-path {media!r} is not a directory")
    try:
        from llama4_deploy.serving.server import serve as run_serve
    except ImportError as err:
        raise UserError(f"serve needs the serve extra (pip install 'llama4-deploy[serve]'): {err}") from None
    try:
        run_serve(bundle, echo=lambda msg: click.echo(msg, err=True), **options)
    except _user_errors() as err:
        raise UserError(str(err)) from None


if __name__ == "__main__":
    main()
