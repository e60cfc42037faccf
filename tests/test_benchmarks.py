"""The benchmark scripts: how they summarise rounds, write RESULTS.md, and account op time.

Speed itself is never tested: these check the arithmetic of the tables, and that the script runs
on a tiny model and writes tables that parse.
"""

import importlib.util
import json
import os
import re
import types

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load("compare")
gpu = _load("gpu")

SPEC = {"variant": "coat_lite_small", "size": 224}


def _args(**changes):
    args = dict(spec=SPEC, batches=[1, 8], repeats=10, max_seconds=8.0, warmup=3,
                train_batch=16, train_steps=3, train_warmup=1, input_batch=32, input_images=320,
                input_batches=12, input_warmup=4)  # fmt: skip
    args.update(changes)
    return types.SimpleNamespace(**args)


def _cold(seconds, rates, top1=3, peak=1000.0):
    phases = {p: {"seconds": s, "rss_mib": 500.0, "peak_mib": 600.0}
              for p, s in zip(compare.COLD_PHASES, seconds)}  # fmt: skip
    steady = {str(b): {"images_per_s": r} for b, r in zip((1, 8), rates)}
    return {"phases": phases, "steady": steady, "top1": top1, "peak_rss_mib": peak}


def _rows(table):
    return {row[0]: row[1:] for row in compare.parse_table(table)}


def test_inference_table_gives_medians_ratios_to_timm_and_the_rounds_range():
    timm = [_cold([4, 1, 1, 0, 1], [10.0, 20.0]), _cold([5, 1, 1, 0, 1], [12.0, 30.0]),
            _cold([6, 1, 1, 0, 1], [11.0, 10.0])]  # totals 7, 8, 9
    tf = [_cold([8, 2, 1, 1, 2], [30.0, 40.0]), _cold([4, 1, 1, 1, 1], [24.0, 90.0]),
          {"error": "boom"}]  # totals 14, 8; the failed round is left out and listed
    checks = {"native": {"onednn": ["Intel AVX2"], "mkl": "AVX2", "aten": "AVX2", "xla": "x"}}
    table = compare.inference_table({"native": {"timm": timm, "tensorflow": tf}}, _args(), checks)
    rows = _rows(table)
    assert rows["phase"] == ["timm", "keras_coat TensorFlow"]
    # Medians: timm 8 s, TF 11 s (1.38x); single rounds 14/7 = 2.00 and 8/8 = 1.00.
    assert rows["**total**"] == ["**8.00**", "**11.00 (1.38x, 1.00-2.00)**"]
    assert rows[compare.COLD_LABELS["import"]] == ["5.00", "6.00"]
    # Steady batch 8: timm median 20, TF median 65 (3.25x); rounds 40/20 = 2.00, 90/30 = 3.00.
    assert rows["8"] == ["20.00", "65.00 (3.25x, 2.00-3.00)"]
    assert "keras_coat TensorFlow, round 3: failed (boom)." in table
    assert "equal to timm's in 2 of 2 keras_coat processes" in table
    assert "oneDNN Intel AVX2; MKL AVX2; ATen AVX2" in table
    prose = [line for line in table.splitlines() if not line.startswith(("|", "**", "- "))]
    assert max(len(line) for line in prose) <= 100


def test_training_table_reports_speed_first_step_and_peak_memory_against_timm():
    def run(rate, first, peak):
        phases = {p: {"seconds": 1.0, "rss_mib": 100.0, "peak_mib": peak}
                  for p in compare.TRAIN_PHASES}  # fmt: skip
        return {"images_per_s": rate, "first_step_s": first, "peak_rss_mib": peak,
                "phases": phases}

    runs = {"timm": [run(4.0, 2.0, 4000.0), run(5.0, 2.0, 4100.0)],
            "jax": [run(6.0, 60.0, 3000.0), run(4.0, 50.0, 3200.0)]}  # fmt: skip
    rows = _rows(compare.training_table(runs, _args()))
    assert rows["images/s (higher is better)"] == ["4.50", "5.00 (1.11x, 0.80-1.50)"]
    assert rows["peak memory MiB (lower is better)"] == ["4050", "3100 (0.77x, 0.75-0.78)"]
    assert rows["first step s (trace / compile)"] == ["2.0", "55.0 (27.50x, 25.00-30.00)"]
    # The phase table shows the round of median speed (of two: the slower one).
    assert rows[compare.TRAIN_LABELS["steady"]] == ["100 (4000)", "100 (3200)"]


def test_input_table_reports_per_core_medians_and_the_ratio_range():
    runs = {"keras_coat": [{"images_per_cpu_s": r} for r in (300.0, 330.0, 310.0)],
            "timm": [{"images_per_cpu_s": r} for r in (200.0, 250.0, 220.0)]}
    rows = _rows(compare.input_table(runs, _args()))
    assert rows["keras_coat / timm (rounds' range)"] == ["1.41x (1.32-1.50)"]
    assert rows["timm `create_transform` + `Mixup`, 1 DataLoader worker"] == ["220.0"]


def test_results_sections_are_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\nkept\n")
    compare.write_results_section("<!-- a:begin -->", "<!-- a:end -->", "A", "new a", results)
    compare.write_results_section("<!-- b:begin -->", "<!-- b:end -->", "B", "new b", results)
    text = results.read_text()
    assert "old a" not in text and "## A\n\nnew a" in text and "## B\n\nnew b" in text
    assert text.index("kept") < text.index("## B")  # appended after what was there
    assert os.listdir(tmp_path) == ["RESULTS.md"]  # no temporary file left behind


def test_the_isa_emulation_caps_every_library_at_avx2(monkeypatch):
    for name in (*compare.ISAS["avx2"], "KERAS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    env = compare._environment("avx2", "jax")
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2" and env["KERAS_BACKEND"] == "jax"
    # The user's own XLA flags are kept.
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2"
    native = compare._environment("native", "timm")
    assert "ONEDNN_MAX_CPU_ISA" not in native and "KERAS_BACKEND" not in native


def test_threads_size_every_runtime_pool_and_keep_the_isa_cap(monkeypatch):
    for name in (*compare.ISAS["avx2"], "OMP_NUM_THREADS", "COMPARE_THREADS"):
        monkeypatch.delenv(name, raising=False)
    env = compare._environment("avx2", "jax", threads=1)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["TF_NUM_INTRAOP_THREADS"] == env["COMPARE_THREADS"] == "1"
    assert env["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX2 --xla_cpu_multi_thread_eigen=false"
    assert "COMPARE_THREADS" not in compare._environment("native", "jax")


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
def test_the_tensorflow_profile_groups_runtime_ops_by_coat_part(node, op_type, group):
    assert compare.group_op(node, op_type).startswith(group)


@pytest.mark.slow
def test_the_script_runs_every_section_on_a_tiny_model_and_writes_tables_that_parse(tmp_path):
    results = tmp_path / "RESULTS.md"
    argv = ["--quick", "--isa", "native", "--runners", "tensorflow", "--train-runners",
            "tensorflow", "--threads", "1", "--results", str(results),
            "--json", str(tmp_path / "all.json")]  # fmt: skip
    assert compare.main(argv) == 0
    text = results.read_text()
    for section in compare.SECTIONS:
        begin, end = compare.MARKERS[section]
        assert begin in text and end in text
    rows = _rows(text)
    total = rows["**total**"]
    assert float(total[0].strip("*")) > 0 and re.match(r"\*\*[\d.]+ \([\d.]+x\)\*\*", total[1])
    for batch in ("1", "8"):
        assert re.match(r"[\d.]+ \([\d.]+x\)", rows[batch][1])
    assert re.match(r"[\d.]+ \([\d.]+x\)", rows["images/s (higher is better)"][1])
    assert re.match(r"[\d.]+x", rows["keras_coat / timm (rounds' range)"][0])
    assert "failed" not in text
    record = json.loads((tmp_path / "all.json").read_text())
    assert set(record["inference"]["native"]) == {"timm", "tensorflow"}


def test_a_failed_or_stuck_worker_is_reported_not_raised(tmp_path):
    args = _args(timeout=120, folder=str(tmp_path), spec={"variant": "no_such_model", "size": 64})
    failed = compare.run_worker("inference", "timm", args, batches=[1], warmup=0, repeats=1,
                                max_seconds=1)  # fmt: skip
    assert "no_such_model" in failed["error"]
    args.timeout = 0.01
    assert compare.run_worker("inference", "timm", args) == {"error": "timed out after 0.01 s"}

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
