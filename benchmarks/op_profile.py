"""Where keras_coat's CPU inference time goes, op by op, and what the dense layers alone cost.

    python benchmarks/op_profile.py                  # CoaT-Lite Small, batch 8, 224x224
    python benchmarks/op_profile.py --model coat_tiny --batch 1 --no-write

Runs the model's TensorFlow graph (the same graph `tf.function` runs, with the weights frozen to
constants so that the trace sees what TensorFlow's remapper fused) with one op at a time
(`inter_op_parallelism_threads=1`, each op still using every core), so that the op times add up
to the step time. The best of three traced steps is grouped into what CoaT is made of:

- dense layers: Q/K/V, output projections, MLPs and the head, with their fused bias and GELU
  (the MLPs' first layers, which carry the GELU, apart);
- everything else: LayerNorm, the CPE/CRPE depthwise convolutions, the attention context
  matmuls and softmax, the patch embeddings, residual adds and layout ops (slice, concat, pad).

It also times a 2048x2048x2048 matmul in the same process: that rate bounds what any dense
layer can reach on this machine, so `dense FLOPs / that rate` is the least time the dense layers
can take, whatever the rest of the graph does. The table is printed and written between markers
into benchmarks/RESULTS.md.
"""

import argparse
import collections
import datetime
import os
import sys

# The sibling script's timing loop and RESULTS.md writer (benchmarks/ is not a package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import _time, write_results_section  # noqa: E402

BEGIN, END = "<!-- op-profile:begin -->", "<!-- op-profile:end -->"

# Runtime op types (after TensorFlow's oneDNN rewrites) of the dense layers.
_DENSE_OPS = {"MatMul", "_MklMatMul", "_MklNativeFusedMatMul", "_FusedMatMul"}
_DENSE_GELU = "dense: MLP first layers (fused bias + exact GELU)"
_DENSE_PLAIN = "dense: Q/K/V, output projections, MLP second layers, head (fused bias)"
_LAYOUT_OPS = {"StridedSlice", "ConcatV2", "SplitV", "Split", "Pad", "Transpose", "_MklTranspose",
               "Reshape", "Squeeze", "ExpandDims"}


def _group(node_name, op_type):
    """Which part of CoaT a runtime op belongs to, from its layer name and op type."""
    parts = node_name.split("/")
    # The classifier holds its backbone, so a layer's ops sit under `<model>/<backbone>/<layer>/`:
    # the layer is the first path part below the models.
    inner = [p for p in parts[1:-1] if "_backbone" not in p] or parts[1:] or parts
    layer = inner[0]
    if op_type in _DENSE_OPS:
        if "_mlp" in layer and ("Gelu" in node_name or "fc1" in node_name):
            return _DENSE_GELU
        return _DENSE_PLAIN
    if "patch_embed" in layer:
        return "patch embeddings (strided conv + LayerNorm)"
    if "_norm" in layer or layer.startswith("norm"):
        return "LayerNorm"
    if "crpe" in layer and "factoratt" not in layer:
        return "CRPE (depthwise convs, split/concat, product with Q)"
    if "cpe" in layer:
        return "CPE (depthwise conv, class-token slice/concat)"
    if "factoratt" in layer:
        return "attention context (softmax, K^T V, Q context)"
    if "drop_path" in layer or "coscale" in layer or "interpolate" in layer:
        return "residual adds and co-scale sums"
    if op_type in _LAYOUT_OPS:
        return "other layout ops"
    return "other"


def _dense_flops(graph):
    """2 * M * K * N over the graph's MatMul ops (static shapes)."""
    flops = 0
    for op in graph.get_operations():
        if op.type == "MatMul":
            a, b = (tensor.shape.as_list() for tensor in op.inputs[:2])
            m = a[1] if op.get_attr("transpose_a") else a[0]
            k = a[0] if op.get_attr("transpose_a") else a[1]
            n = b[0] if op.get_attr("transpose_b") else b[1]
            flops += 2 * m * k * n
    return flops


def _peak_matmul_gflops(tf, repeats=10):
    import numpy as np

    a = tf.constant(np.random.RandomState(0).rand(2048, 2048).astype("float32"))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    _, best_seconds = _time(lambda: matmul(a).numpy(), warmup=3, repeats=repeats)
    return 2 * 2048**3 / best_seconds / 1e9


def profile(model_name, batch, size):
    import numpy as np
    import tensorflow as tf

    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    import keras_coat

    model = keras_coat.create_model(
        model_name, input_shape=(size, size, 3), include_preprocessing=False
    )
    # Non-zero biases: a zero bias constant would be folded away and change what gets fused.
    rng = np.random.RandomState(0)
    for variable in model.weights:
        if variable.path.endswith("bias"):
            variable.assign(rng.randn(*variable.shape).astype("float32") * 0.01)
    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(tf.TensorSpec((batch, size, size, 3), tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    flops = _dense_flops(frozen.graph)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(frozen.graph.as_graph_def(), name="")
    images = rng.rand(batch, size, size, 3).astype("float32")
    feed, fetch = {frozen.inputs[0].name: images}, frozen.outputs[0].name
    traces = []
    # One op at a time, so that the op times add up to the step; each op keeps all cores.
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1)
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        step_seconds, _ = _time(lambda: session.run(fetch, feed), warmup=3, repeats=5)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(3):
            metadata = tf.compat.v1.RunMetadata()
            session.run(fetch, feed, options=options, run_metadata=metadata)
            groups, mlp_second_ms = collections.Counter(), 0.0
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label
                    op_type = label.split(" = ")[1].split("(")[0] if " = " in label else ""
                    milliseconds = node.all_end_rel_micros / 1e3
                    groups[_group(node.node_name, op_type)] += milliseconds
                    if op_type in _DENSE_OPS and "_mlp" in node.node_name and (
                        "fc2" in node.node_name
                    ):
                        mlp_second_ms += milliseconds
            traces.append((groups, mlp_second_ms))
    best, mlp_second_ms = min(traces, key=lambda trace: sum(trace[0].values()))
    return {
        "groups": best,
        "gelu_ms": best[_DENSE_GELU] - mlp_second_ms,
        "step_ms": 1e3 * step_seconds,
        "dense_gflop": flops / 1e9,
        "peak_gflops": _peak_matmul_gflops(tf),
    }


def _table(result, args):
    groups = result["groups"]
    total = sum(groups.values())
    dense_ms = groups[_DENSE_GELU] + groups[_DENSE_PLAIN]
    floor_ms = result["dense_gflop"] / result["peak_gflops"] * 1e3
    lines = [
        f"Measured {datetime.date.today().isoformat()}: {args.model}, batch {args.batch}, "
        f"{args.size}x{args.size}, fp32, TensorFlow graph with one op at a time (each op on "
        f"all {os.cpu_count()} cores), best of 3 traced steps. Untraced step: "
        f"{result['step_ms']:.0f} ms ({args.batch / result['step_ms'] * 1e3:.2f} img/s).",
        "",
        "| part of the graph | op time ms | share |",
        "|---|---|---|",
    ]
    for key, value in groups.most_common():
        lines.append(f"| {key} | {value:.1f} | {value / total:.0%} |")
    lines += [
        f"| **total** | **{total:.1f}** | |",
        "",
        f"- Dense layers: {result['dense_gflop']:.1f} GFLOP per batch in {dense_ms:.0f} ms, "
        f"{result['dense_gflop'] / dense_ms * 1e3:.0f} GFLOP/s (GELU included). Each MLP's two "
        f"layers have the same FLOPs, so its GELU costs about {result['gelu_ms']:.0f} ms "
        "(first layers minus second layers).",
        f"- A 2048x2048x2048 matmul in the same process: {result['peak_gflops']:.0f} GFLOP/s. "
        f"At that rate the dense layers alone need {floor_ms:.0f} ms per batch "
        f"({args.batch / floor_ms * 1e3:.1f} img/s if nothing else took any time).",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coat_lite_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    table = _table(profile(args.model, args.batch, args.size), args)
    print(table)
    if not args.no_write:
        write_results_section(BEGIN, END, "Where the CPU time goes (op profile)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
