"""`make bench` end to end at smoke sizes on tiny, so a change that breaks the benchmark fails CI.
The figures are timings of a 2-core VM and are not asserted beyond being measured."""

from __future__ import annotations

import math
import re

from tools import bench


def test_bench_quick_run_prints_every_figure(capsys):
    assert bench.main(["--recipes", "tiny", "--dispatch", "native,capacity", "--precisions", "", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "== tiny: transformers eager" in out
    header = next(line for line in out.splitlines() if line.startswith("dispatch"))
    assert header.split() == [
        "dispatch",
        "decode",
        "b1",
        "ms",
        "eager",
        "b1",
        "x",
        "eager",
        "decode",
        "b2",
        "ms",
        "x",
        "eager",
        "prefill16",
        "t/s",
        "x",
        "eager",
        "prefill32",
        "t/s",
        "x",
        "eager",
        "roofline",
        "b1",
        "reruns",
    ]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("native", "capacity"))}
    assert set(rows) == {"native", "capacity"}
    for label, cells in rows.items():
        assert len(cells) == 11, (label, cells)
        numbers = [float(c.rstrip("x%")) for c in cells[:-1]]
        assert all(math.isfinite(n) and n > 0 for n in numbers), (label, cells)
        steps = re.fullmatch(r"(\d+)/(\d+)", cells[-1])
        assert steps and int(steps[2]) > 0 and int(steps[1]) <= int(steps[2])
    assert rows["native"][-1].startswith("0/")  # an exact dispatch never reruns


def test_context_bench_quick_run_prints_the_sweep(capsys, tmp_path):
    from tools import bench_context

    assert bench_context.main(["--quick", "--plot", str(tmp_path / "decode.png")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("context"))
    assert header.split() == [
        "context",
        "before",
        "ms",
        "c64",
        "ms",
        "c8",
        "ms",
        "c64/c8",
        "before/now",
        "KV",
        "MB",
        "before",
        "KV",
        "MB",
        "c64",
        "KV",
        "MB",
        "c8",
    ]
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line) and len(line.split()) > 2]
    assert [int(row[0]) for row in rows] == list(bench_context.QUICK.contexts)
    for row in rows:
        numbers = [float(cell.rstrip("x")) for cell in row[1:6]]
        assert all(math.isfinite(n) and n > 0 for n in numbers), row
    # what the engine is handed: at 40 tokens the c64 ring holds 64 slots (bucket 64), the c8 ring 8
    # slots, and the previous layout always fed 64-slot rings and copied the global bucket
    assert float(rows[1][-2]) >= float(rows[1][-1])
    assert re.search(r"prefill 32 tokens, tok/s: before \d+, c64 \d+, c8 \d+", out)
    # decode ms/step per precision (the real-chunk bundle at int4), and the plot of every line
    precision = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+[\d.]+$", line)]
    assert [int(row[0]) for row in precision] == list(bench_context.QUICK.contexts)
    assert all(float(row[1]) > 0 for row in precision)
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.png"]


def test_bench_precision_rows(capsys):
    """Precision rows: one int4 ort row against fp32, every figure measured and positive."""
    assert bench.main(["--recipes", "tiny", "--dispatch", "native", "--precisions", "int4-ort", "--quick"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("int4-ort")).split()
    assert len(row) == 8, row
    numbers = [float(c.rstrip("x%")) for c in row[2:]]
    assert all(math.isfinite(n) and n >= 0 for n in numbers) and min(numbers[:4]) > 0, row  # roofline may round to 0
    assert float(row[-1].rstrip("x")) < 1.0  # smaller than fp32 (tiny: embeddings and lm_head stay fp32)
