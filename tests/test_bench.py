"""The benchmark runs end to end (toy sizes, CPU) and writes its CSV and markdown tables."""

import csv

from bench.__main__ import main


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_benchmark_writes_tables_for_every_op(tmp_path, capsys):
    main(["--preset", "tiny", "--out", str(tmp_path), "--modes", "fwd+bwd"])
    rows = read_rows(tmp_path / "core_ops-tiny.csv")
    expected_ops = {"linear_logprobs", "linear_cross_entropy", "logprobs_from_logits", "linear_dpo", "linear_grpo",
                    "policy_loss"}  # fmt: skip
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in expected_ops
                                                   for impl in ("eager", "fastalign-torch")}  # fmt: skip
    for row in rows:
        assert not row["error"], row["error"]
        assert float(row["time_ms"]) > 0 and float(row["peak_extra_mib"]) >= 0 and float(row["vs_eager"]) > 0
    markdown = (tmp_path / "core_ops-tiny.md").read_text()
    for op in expected_ops:
        assert f"## {op}" in markdown
    assert "- torch: " in markdown and "## targets" in markdown
    assert "fastalign-torch" in capsys.readouterr().out


def test_shape_override_is_recorded(tmp_path):
    main(["--preset", "demo", "--shape", "48,16,300", "--repeats", "1", "--out", str(tmp_path),
          "--ops", "linear_logprobs", "--modes", "fwd"])  # fmt: skip
    rows = read_rows(tmp_path / "core_ops-demo.csv")
    assert [(r["n"], r["d"], r["v"]) for r in rows] == [("48", "16", "300")] * 2
    assert "overrode them with --shape" in (tmp_path / "core_ops-demo.md").read_text()
