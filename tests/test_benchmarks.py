"""The benchmark scripts: how they summarise rounds, write RESULTS.md, and account op time."""

import importlib.util
import json
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
gpu = _load("gpu")


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
        ("m/serial_blocks1_0_factoratt_crpe_qkv_1/BiasAdd", "_MklNativeFusedMatMul", "dense"),
        ("m/serial_blocks1_0_mlp_1/Gelu/mul_2", "_MklNativeFusedMatMul", "dense"),
        ("m/serial_blocks1_0_norm1_1/Mul_1", "Mul", "LayerNorm"),
        ("m/norm4_1/Mean", "Mean", "LayerNorm"),
        ("m/serial_blocks1_0_factoratt_crpe_1/Softmax", "_MklSoftmax", "attention"),
        ("m/crpe1_1/SplitV", "SplitV", "CRPE"),
        ("m/cpe1_1/concat", "ConcatV2", "CPE"),
        ("m/patch_embed2_1/norm/Mean", "Mean", "patch"),
        ("m/serial_blocks2_1_drop_path1_1/add", "AddV2", "residual"),
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


def test_gpu_configurations_come_largest_batch_and_bf16_first_per_model():
    configs = gpu.configurations(["a", "b"], inference_batches=[64, 256], training_batches=[128])
    keys = [(c["model"], c["task"], c["precision"], c["batch"]) for c in configs]
    assert keys[:6] == [
        ("a", "inference", "bf16", 256), ("a", "training", "bf16", 128),
        ("a", "inference", "fp32", 256), ("a", "training", "fp32", 128),
        ("a", "inference", "bf16", 64), ("a", "inference", "fp32", 64),
    ]
    assert keys[6:] == [("b",) + key[1:] for key in keys[:6]]


def _gpu_row(framework, rate=None, error=None, task="inference"):
    row = {"framework": framework, "model": "m", "task": task, "precision": "bf16", "batch": 8}
    if rate is not None:
        row.update(images_per_s=rate, first_call_s=30.0)
    if error is not None:
        row["error"] = error
    return row


def test_gpu_runs_merge_measured_over_unmeasured_and_table_shows_ratios_and_failures():
    skipped = "not measured: time budget spent"
    first = {"meta": {"date": "2026-11-28", "torch_device": "GPU X"}, "results": [
        _gpu_row("keras_jax", error=skipped), _gpu_row("timm_eager", 100.0),
        _gpu_row("timm_compile", error="BackendCompilerFailed: boom"),
        _gpu_row("keras_jax", error=skipped, task="training"),
    ]}
    second = {"meta": {"jax_device": "gpu: GPU X"}, "results": [
        _gpu_row("keras_jax", 250.0), _gpu_row("timm_eager", error=skipped),
    ]}
    merged = gpu.merge_runs([first, second])
    assert merged["meta"]["runs"] == 2 and merged["meta"]["torch_device"] == "GPU X"
    table = gpu.render(merged)
    # The second run's JAX figure fills the gap; its skipped eager row does not erase the first's.
    assert "| m | inference | bf16 | 8 | 250 | 100 | n/a | 2.50x | n/a | 30 / n/a |" in table
    assert "- Failed: timm_compile m inference bf16 batch 8: BackendCompilerFailed: boom" in table
    assert "| m | training |" not in table  # nothing measured there: no row of n/a
    assert "2 runs on the same machine" in " ".join(table.split())  # wrapped paragraph


def test_deploy_table_compares_the_fastest_keras_coat_path_with_the_fastest_timm_path():
    deploy = _load("deploy")
    args = types.SimpleNamespace(
        size=224, rounds=3, repeats=10, warmup=3, batch_sizes=[1],
        runtimes=["timm_eager", "timm_onnxruntime", "keras_tf", "keras_litert"],
    )

    def runs(*rates):
        return [{"images_per_s": {"1": rate}} for rate in rates]

    results = {"coat_lite_tiny": {
        "timm_eager": runs(10.0, 30.0, 11.0),  # median 11
        "timm_onnxruntime": runs(14.0, 15.0, 13.0),  # median 14: the best peer
        "keras_tf": runs(12.0, 12.0, 12.0),
        "keras_litert": runs(21.0, 20.0, 40.0),  # median 21: the best keras_coat path
    }}
    row = deploy._table(results, args).splitlines()[-1]
    assert row == (
        "| coat_lite_tiny | 1 | 11.00 | **14.00** | 12.00 | **21.00** | "
        "1.50x (keras_coat -> LiteRT / timm -> ONNX Runtime) |"
    )


input_pipeline = _load("input_pipeline")


def test_input_pipeline_images_are_an_image_folder_of_varied_jpegs(tmp_path):
    from PIL import Image

    input_pipeline.make_images(tmp_path, 12)
    train = sorted(tmp_path.glob("train/*/*.jpg"))
    assert len(train) == 12 and len(list(tmp_path.glob("val/*/*.jpg"))) == 20
    assert len({p.parent.name for p in train}) == input_pipeline.CLASSES
    sizes = {Image.open(p).size for p in train}
    assert sizes == set(input_pipeline.SIZES)
    assert all(p.stat().st_size > 20_000 for p in train)  # detailed, not flat colour


def test_input_pipeline_table_reports_per_core_medians_and_the_node_estimate():
    args = types.SimpleNamespace(images=320, batch=32, rounds=3, batches=16, warmup=4)
    keras_runs = [{"images_per_cpu_s": r, "images_per_s": r / 3} for r in (300.0, 330.0, 310.0)]
    timm_runs = [{"images_per_cpu_s": r, "images_per_s": r / 3} for r in (200.0, 250.0, 220.0)]
    profile = {"stages": [{"stage": "decode", "ms_per_image": 2.0, "added_ms": 2.0}]}
    table, keras_rate, timm_rate = input_pipeline._table(keras_runs, timm_runs, args, profile)
    assert (keras_rate, timm_rate) == (310.0, 220.0)
    assert "| ratio | 1.41x (1.32-1.50) | |" in table  # rounds: 1.50, 1.32, 1.41
    node = input_pipeline.ACCELERATORS * input_pipeline.IMAGES_PER_ACCELERATOR
    assert f"{node / 310.0:.0f} cores" in table and "| decode | 2.00 | +2.00 |" in table
    prose = [line for line in table.splitlines() if not line.startswith("|")]
    assert max(len(line) for line in prose) <= 100


train_memory = _load("train_memory")
TINY_COAT = {"embed_dims": [16, 32, 32, 32], "serial_depths": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2]}


def _fit_run(rate, peak, first_step_peak):
    phases = {phase: {"rss_mib": 500.0, "peak_mib": 600.0, "seconds": 1.0} for phase in
              train_memory.PHASES}  # fmt: skip
    phases["first_step"]["peak_mib"] = first_step_peak
    return {"images_per_s": rate, "median_s": 64 / rate, "peak_rss_mib": peak, "phases": phases,
            "step_seconds": [64 / rate] * 8}


def test_train_memory_table_reports_medians_ratios_and_the_median_rounds_phases():
    args = types.SimpleNamespace(warmup=2, model_config=None)
    runs = {
        "keras_jax": [_fit_run(r, 2000.0, 1900.0 + r) for r in (30.0, 20.0, 40.0)],
        "keras_tensorflow": [_fit_run(r, p, 1000.0 + r) for r, p in
                             ((60.0, 1500.0), (50.0, 1600.0), (90.0, 1400.0))],  # fmt: skip
        "timm": [_fit_run(r, 1000.0, 800.0 + r) for r in (25.0, 20.0, 30.0)],
    }
    table = train_memory._table({"demo": runs}, args)
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    # Medians: JAX 30, TF 60, timm 25; single-round ratios JAX 1.20, 1.00, 1.33; TF 2.40, 2.50,
    # 3.00; peaks: the largest of the rounds.
    assert rows["| " + train_memory.LABELS["keras_jax"]] == (
        "| keras_coat `fit`, JAX (XLA) | 30.00 | 1.20x (1.00-1.33) | 2000 | 2.00x |"
    )
    assert rows["| " + train_memory.LABELS["keras_tensorflow"]].endswith(
        "| 60.00 | 2.40x (2.40-3.00) | 1600 | 1.60x |"
    )
    assert rows["| " + train_memory.LABELS["timm"]].endswith("| 25.00 | 1.00x | 1000 | 1.00x |")
    # The phase table shows the round of median speed: first-step peaks 1930, 1060 and 825.
    first = rows["| " + train_memory.PHASE_LABELS["first_step"]]
    assert first == "| first step (trace / XLA compile) | 500 (1930), 1.0 s | 500 (1060), 1.0 s " \
        "| 500 (825), 1.0 s |"
    assert "**demo**: coat_lite_tiny, 32x32, batch 64, 10 classes; 3 round(s) of 8 timed" in table


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 267 s on a busy machine (pyproject: 300 s)
def test_train_memory_runs_fit_on_jax_and_tensorflow_and_timm_on_a_tiny_model(capsys):
    args = ["--configs", "demo", "--rounds", "1", "--warmup", "1", "--steps", "1", "--no-write",
            "--model-config", json.dumps(TINY_COAT)]  # fmt: skip
    assert train_memory.main(args) == 0
    out = capsys.readouterr().out
    measured = out.split("demo round 1: ")[1].splitlines()[0]
    for framework in train_memory.FRAMEWORKS:
        assert framework in measured
    for phase in train_memory.PHASES:
        assert f"| {train_memory.PHASE_LABELS[phase]} | " in out
