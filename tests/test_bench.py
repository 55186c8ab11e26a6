"""The benchmark runs end to end (tiny shapes, CPU) and writes its CSV and markdown tables."""

import csv

from bench.__main__ import main


def test_benchmark_writes_tables(tmp_path, capsys):
    main([
        "--preset", "demo", "--shape", "48,16,300", "--repeats", "1", "--out", str(tmp_path),
        "--ops", "linear_logprobs", "logprobs_from_logits", "--modes", "fwd+bwd",
    ])  # fmt: skip
    with open(tmp_path / "core_ops-demo.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("linear_logprobs", "eager"),
        ("linear_logprobs", "fastalign-torch"),
        ("logprobs_from_logits", "eager"),
        ("logprobs_from_logits", "fastalign-torch"),
    }
    for row in rows:
        assert not row["error"], row["error"]
        assert float(row["time_ms"]) > 0 and float(row["peak_extra_mib"]) >= 0 and float(row["vs_eager"]) > 0
    markdown = (tmp_path / "core_ops-demo.md").read_text()
    assert "## linear_logprobs" in markdown and "## logprobs_from_logits" in markdown
    assert "- torch: " in markdown and "overrode them with --shape" in markdown
    assert "fastalign-torch" in capsys.readouterr().out
