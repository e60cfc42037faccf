"""The benchmark scripts: how they summarise rounds, write RESULTS.md, and account op time."""

import importlib.util
import os
import types

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")
op_profile = _load("op_profile")


def _run(rate, rss=1000.0):
    return {"images_per_s": rate, "peak_rss_mib": rss}


def test_throughput_table_reports_medians_over_rounds_and_the_ratio_range():
    args = types.SimpleNamespace(
        keras_backend="tensorflow", size=224, rounds=3, repeats=10, warmup=3
    )
    keras_runs = [_run(16.0), _run(12.0, 1100.0), _run(15.0)]
    timm_runs = [_run(8.0), _run(10.0), _run(9.0)]
    table = throughput._table([("coat_lite_small", 8, keras_runs, timm_runs)], args)
    row = table.splitlines()[-1]
    # Medians 15.0 and 9.0; ratio 1.67; single rounds range from 1.20 to 2.00; largest RSS.
    assert row == "| coat_lite_small | 8 | 15.00 | 9.00 | 1.67x (1.20-2.00) | 1100 | 1000 |"


def test_results_sections_are_replaced_in_place(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\nkept\n")
    monkeypatch.setattr(throughput, "RESULTS", str(results))
    throughput.write_results_section("<!-- a:begin -->", "<!-- a:end -->", "A", "new a")
    throughput.write_results_section("<!-- b:begin -->", "<!-- b:end -->", "B", "new b")
    text = results.read_text()
    assert "old a" not in text and "## A\n\nnew a" in text and "## B\n\nnew b" in text
    assert text.index("kept") < text.index("## B")  # appended after what was there
    assert os.listdir(tmp_path) == ["RESULTS.md"]  # no temporary file left behind


@pytest.mark.parametrize(
    "node, op_type, group",
    [
        ("m/serial_blocks1.0.factoratt_crpe.qkv_1/BiasAdd", "_MklNativeFusedMatMul", "dense"),
        ("m/serial_blocks1.0.mlp_1/Gelu/mul_2", "_MklNativeFusedMatMul", "dense"),
        ("m/serial_blocks1.0.norm1_1/Mul_1", "Mul", "LayerNorm"),
        ("m/norm4_1/Mean", "Mean", "LayerNorm"),
        ("m/serial_blocks1.0.factoratt_crpe_1/Softmax", "_MklSoftmax", "attention"),
        ("m/crpe1_1/SplitV", "SplitV", "CRPE"),
        ("m/cpe1_1/concat", "ConcatV2", "CPE"),
        ("m/patch_embed2_1/norm/Mean", "Mean", "patch"),
        ("m/serial_blocks2.1.drop_path1_1/add", "AddV2", "residual"),
    ],
)
def test_op_profile_groups_runtime_ops_by_coat_part(node, op_type, group):
    assert op_profile._group(node, op_type).startswith(group)


@pytest.mark.slow
def test_op_profile_counts_the_dense_flops_of_the_model():
    result = op_profile.profile("coat_lite_tiny", batch=1, size=64)
    # Independent count from the configuration: per block Q, K, V and the output projection
    # (4 C^2) and the MLP (2 C * hidden) on every token, class token included; then the head.
    dims, depths, ratios = (64, 128, 256, 320), (2, 2, 2, 2), (8, 8, 4, 4)
    flops = 0
    for stage, (dim, depth, ratio) in enumerate(zip(dims, depths, ratios)):
        tokens = (64 // 4 // 2**stage) ** 2 + 1
        flops += depth * 2 * tokens * (4 * dim * dim + 2 * dim * ratio * dim)
    flops += 2 * dims[-1] * 1000
    assert result["dense_gflop"] == pytest.approx(flops / 1e9, rel=1e-9)
    groups = result["groups"]
    # Both dense groups were found: the MLP first layers (with GELU) and the other dense layers.
    assert groups[op_profile._DENSE_GELU] > 0 and groups[op_profile._DENSE_PLAIN] > 0
    assert result["peak_gflops"] > 0
