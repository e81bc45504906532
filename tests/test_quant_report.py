"""`make quant-report` at smoke size: its table shows what verify reports for the same bundle and the bundle's
own bytes; bad input is one sentence and exit 2 before any work."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from llama4_deploy.quality.verify import verify
from tools import quant_report


def _cells(line: str) -> list[str]:
    """A markdown table row's cells; an escaped pipe (\\|) stays inside its cell."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def _files(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def test_quick_report_on_tiny_shows_what_verify_reports(tmp_path):
    rows = quant_report.build_rows(["tiny"], ["fp16", "int4-ort"], tmp_path, quick=True, progress=lambda _: None)
    assert [(r.recipe, r.choice) for r in rows] == [("tiny", "fp32"), ("tiny", "fp16"), ("tiny", "int4-ort")]
    lines = quant_report.table(rows).splitlines()
    header = _cells(lines[0])
    assert len(lines) == 2 + len(rows) and len(header) == 18
    assert all(len(_cells(line)) == len(header) for line in lines[2:])
    fp32_bytes = _files(rows[0].bundle)
    for row, line in zip(rows, lines[2:]):
        cell = dict(zip(header[:11], _cells(line)[:11]))
        size, ratio = _cells(line)[11:13]
        assert cell["recipe"] == "tiny" and row.speed is None and _cells(line)[13:] == ["-"] * 5  # --quick: no timing
        # size: the bundle's files, against the fp32 bundle's files
        assert int(size.replace(",", "")) == _files(row.bundle)
        assert ratio == f"{_files(row.bundle) / fp32_bytes:.3f}x"
        # quality and parity: a second verify of the same bundle, at the same settings, gives the same figures
        again = verify(str(row.bundle), new_tokens=quant_report.QUICK_NEW_TOKENS, perplexity=False, log=lambda _: None)
        assert row.report.quality == again.quality
        worst = max(again.rows, key=lambda r: r.comparison.value).comparison
        assert worst.value == again.max_abs_diff
        assert (cell["max \\|dlogit\\| vs sim"], cell["tolerance"]) == (f"{worst.value:.2e}", f"{worst.tolerance:.2e}")
        assert cell["vs sim"] == ("PASS" if again.ok else "FAIL") == "PASS"
        assert cell["floor"] == "-"  # floors are checked on the std-0.02 checkpoint only
        if row.choice == "fp32":
            assert again.quality is None and again.reference == "transformers fp32"
            assert [cell[k] for k in ("min cos", "max KL", "mean KL", "greedy")] == ["-"] * 4
        else:
            q = again.quality
            assert again.reference.startswith("fake-quant simulation")
            assert q["generated"] == quant_report.QUICK_NEW_TOKENS
            assert [cell[k] for k in ("min cos", "max KL", "mean KL", "greedy")] == [
                f"{q['min_cosine']:.4f}",
                f"{q['max_kl']:.3g}",
                f"{q['mean_kl']:.3g}",
                f"{q['generated_agree']}/{q['generated']}",
            ]
    assert rows[1].precision == "fp16" and rows[2].form == "ort"
    assert rows[2].bytes < rows[0].bytes and rows[1].bytes < rows[0].bytes


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--recipes", "tiny,nope"], "unknown recipe 'nope'"),
        (["--precisions", "int4-ort,fp9"], "unknown precision 'fp9'"),
        (["--recipes", "scout"], "needs a checkpoint"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(argv, says, capsys):
    before = set(Path(tempfile.gettempdir()).glob("llama4-quant-report-*"))
    with pytest.raises(SystemExit) as exit_info:
        quant_report.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert set(Path(tempfile.gettempdir()).glob("llama4-quant-report-*")) == before  # refused before any work
