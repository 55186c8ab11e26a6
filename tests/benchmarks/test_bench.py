"""The benchmark runs end to end (toy sizes, CPU) and writes its CSV and markdown tables."""

import csv

import pytest

from bench.__main__ import main


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_benchmark_writes_tables_for_every_op(tmp_path, capsys):
    main(["--preset", "tiny", "--out", str(tmp_path), "--modes", "fwd+bwd"])
    rows = read_rows(tmp_path / "core_ops-tiny.csv")
    core_ops = {"linear_logprobs", "linear_cross_entropy", "logprobs_from_logits"}
    expected_ops = core_ops | {"linear_dpo", "linear_grpo", "policy_loss", "dpo_loss", "linear_distill"}
    # The CPU set: eager and the torch backend everywhere; TRL's chunked log-probs and distillation loss and
    # liger's distillation loss beside them (both are dev dependencies, their CPU paths plain torch).
    peers = {("linear_distill", "trl-chunked"), ("linear_distill", "liger-kernel")}
    peers |= {("linear_logprobs", "trl-chunked"), ("linear_cross_entropy", "trl-chunked")}
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in expected_ops for impl in ("eager", "fastalign-torch")
    } | peers
    for row in rows:
        assert not row["error"], row["error"]
        assert float(row["time_ms"]) > 0 and float(row["peak_extra_mib"]) >= 0 and float(row["vs_eager"]) > 0
    markdown = (tmp_path / "core_ops-tiny.md").read_text()
    for op in expected_ops:
        assert f"## {op}" in markdown
    assert "- torch: " in markdown and "## targets" in markdown
    assert "fastalign-torch" in capsys.readouterr().out


def test_shape_override_is_recorded(tmp_path):
    args = ["--preset", "demo", "--shape", "48,16,300", "--repeats", "1", "--ops", "linear_logprobs", "--modes", "fwd"]
    main([*args, "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "core_ops-demo.csv")
    assert [(r["n"], r["d"], r["v"]) for r in rows] == [("48", "16", "300")] * 3  # eager, torch, TRL
    assert "overrode them with --shape" in (tmp_path / "core_ops-demo.md").read_text()


def test_cuda_targets_hold_kernels_to_the_measured_bandwidth():
    from bench.report import check_targets

    def row(op, mode, gbps, vs_eager=1.0):
        return {"op": op, "mode": mode, "impl": "fastalign-cuda", "gbps": gbps, "vs_eager": vs_eager}

    rows = [
        row("logprobs_from_logits", "fwd", 2500.0),
        row("logprobs_from_logits", "fwd+bwd", 2300.0, 3.5),
        row("policy_loss", "fwd+bwd", 900.0),
    ]
    results = {text.split(":")[0]: met for met, text in check_targets(rows, "gpu", copy_gbps=3000.0)}
    assert results["logprobs_from_logits cuda fwd >= 80% of DRAM bandwidth"]  # 83%
    assert not results["logprobs_from_logits cuda fwd+bwd >= 80% of DRAM bandwidth"]  # 77%
    assert results["logprobs_from_logits cuda fwd+bwd >= 3x faster than eager"]
    assert not results["policy_loss cuda fwd+bwd >= 80% of DRAM bandwidth"]  # 30%
    assert not results["dpo_loss cuda fwd+bwd >= 80% of DRAM bandwidth"]  # not measured


def test_fastest_backend_per_dispatch_key():
    from bench.report import fastest_backends

    rows = [
        {"op": "logprobs_from_logits", "mode": "fwd+bwd", "impl": impl, "time_ms": time_ms}
        for impl, time_ms in (("eager", 1.0), ("fastalign-triton", 3.0), ("fastalign-cuda", 2.0))
    ] + [{"op": "policy_loss", "mode": "fwd", "impl": "fastalign-cuda", "time_ms": 0.1}]
    choice = fastest_backends(rows)
    assert set(choice) == {"logits_stats"}  # eager is not a backend; policy_loss has no fwd+bwd row
    assert choice["logits_stats"][0] == "cuda" and "triton 3 ms" in choice["logits_stats"][1]


def test_gpu_core_rehearsal_times_each_case_against_eager_and_the_floor(tmp_path):
    """The GPU check's core benchmark on the CPU (`--rehearse`): the preset's (op, mode) pairs, the floor, TRL's
    chunked kernel, each output checked against eager's before timing, spread around the median."""
    ops = ["--ops", "logprobs_from_logits", "linear_logprobs"]
    impls = ["--impls", "eager", "fastalign-triton", "fastalign-tiles", "lm-head-matmuls", "trl-chunked"]
    main(["--preset", "gpu-core", "--rehearse", *ops, *impls, "--out", str(tmp_path)])
    rows = read_rows(tmp_path / "core_ops-gpu-core-rehearsal.csv")
    assert [(r["op"], r["mode"], r["impl"]) for r in rows] == [
        ("logprobs_from_logits", "fwd", "eager"),
        ("logprobs_from_logits", "fwd", "fastalign-triton"),
        ("logprobs_from_logits", "fwd+bwd", "eager"),
        ("logprobs_from_logits", "fwd+bwd", "fastalign-triton"),
        ("linear_logprobs", "fwd+bwd", "eager"),
        ("linear_logprobs", "fwd+bwd", "fastalign-triton"),
        ("linear_logprobs", "fwd+bwd", "fastalign-tiles"),
        ("linear_logprobs", "fwd+bwd", "lm-head-matmuls"),
        ("linear_logprobs", "fwd+bwd", "trl-chunked"),
    ]
    for row in rows:
        assert not row["error"], row["error"]
        assert float(row["time_p10_ms"]) <= float(row["time_ms"]) <= float(row["time_p90_ms"])
        if row["impl"] not in ("eager", "lm-head-matmuls"):
            assert float(row["out_rel_err"]) < 3e-2, row
    floor = [r for r in rows if r["impl"] == "lm-head-matmuls"]
    assert float(floor[0]["vs_matmuls"]) == 1.0 and floor[0]["out_rel_err"] == ""
    assert "informational" in (tmp_path / "core_ops-gpu-core-rehearsal.md").read_text()


def test_derived_columns_hold_rows_to_the_floor_and_the_copy_rate():
    from bench.report import add_derived, render

    def row(op, mode, impl, time_ms, flops=0.0, nbytes=0.0):
        return {
            "op": op,
            "mode": mode,
            "impl": impl,
            "time_ms": time_ms,
            "peak_extra_mib": 1.0,
            "flops": flops,
            "bytes": nbytes,
            "device": "cuda",
        }

    rows = [
        row("linear_logprobs", "fwd+bwd", impl, t, flops=6e12)
        for impl, t in (("eager", 4.0), ("lm-head-matmuls", 1.0), ("fastalign-triton", 2.0))
    ]
    rows += [
        row("logprobs_from_logits", "fwd", impl, t, nbytes=3e9) for impl, t in (("eager", 3.0), ("fastalign-cuda", 1.0))
    ]
    add_derived(rows, copy_gbps=4000.0)
    assert (rows[2]["vs_eager"], rows[2]["vs_matmuls"], rows[2]["tflops"]) == (2.0, 0.5, 3000.0)
    assert (rows[4]["gbps"], rows[4]["vs_copy"]) == (3000.0, 0.75) and "vs_matmuls" not in rows[4]
    markdown = render(rows, {"dram_copy_gbps": "4000"}, "gpu-core", "core", "python -m bench --preset gpu-core")
    targets = markdown.split("## targets")[1].strip().splitlines()
    assert targets and all(
        line.split("] ")[1].split()[0] in ("linear_logprobs", "logprobs_from_logits") for line in targets
    )
    assert "logprobs_from_logits cuda fwd >= 80% of DRAM bandwidth: 3000 of 4000 GB/s = 75%" in markdown


def test_the_tiles_implementation_sets_the_tile_backward_around_its_forward(monkeypatch):
    """``fastalign-tiles`` runs the Triton backend with the exact, atomic tile backward chosen while its forward
    runs (where the design is read), and hands the choice back afterwards, also when the forward raises."""
    from bench import cases
    from fastalign.ops.dispatch import tile_backward
    from fastalign.ops.stats import TileBackward

    monkeypatch.delenv("FASTALIGN_LINEAR_BACKWARD", raising=False)
    seen = []

    def plain(op, backend):
        def run(*inputs):
            seen.append((op, backend, tile_backward()))
            if inputs[0] == "raise":
                raise RuntimeError("forward failed")
            return "out"

        return run

    monkeypatch.setattr(cases, "_fastalign", plain)
    run = cases._candidates("linear_cross_entropy")["fastalign-tiles"]()
    assert run(1, 2, 3) == "out" and tile_backward() is None
    with pytest.raises(RuntimeError, match="forward failed"):
        run("raise")
    assert tile_backward() is None
    assert seen == [("linear_cross_entropy", "triton", TileBackward(0.0, False))] * 2
