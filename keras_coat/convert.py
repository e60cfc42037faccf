"""PyTorch (authors' and timm's) names and layouts -> Keras weights of a CoaT model.

Needs numpy only (no torch): `keras_coat.loader` uses it at run time and `conversion/` on the
command line. It maps names and layouts onto the layers of a model it is given (it knows the layer
classes, not the models), walking nested models: a classifier that holds its backbone as a layer
converts like one whose layers are the backbone's.

Keras layer names are the reference's module paths with every "." replaced by "_"
(`serial_blocks2_1_factoratt_crpe_qkv` is `serial_blocks2.1.factoratt_crpe.qkv`), because the
PyTorch backend refuses dots in parameter names. Module names have underscores of their own
(`patch_embed1`, `factoratt_crpe`), so `reference_module` puts the dots back from the structure
of a block's layer names, never by replacing every "_".

The accounting is strict. Every Keras weight is assigned exactly once; every source tensor is
used, or is one the reference keeps but never uses; anything else is an error that names the key.
The reference registers its shared modules under several names (the CPE of scale 2 is `cpe2.*`
and `serial_blocks2.<i>.cpe.*`; the parallel blocks' MLP is `mlp2`, `mlp3` and `mlp4`), and a
file may hold any non-empty subset of those aliases: they are reduced to one canonical name, and
when several are present they must hold the same values.
"""

import re

import numpy as np
from keras import layers

from keras_coat.layers import (
    MLP,
    ClassToken,
    ConvPositionEncoding,
    ConvRelativePositionEncoding,
    PatchEmbedding,
    QueryKeyValue,
    ScaleAggregation,
)
from keras_coat.presets import PresetError


class ConversionError(PresetError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


# Aliases of shared modules -> the canonical (top-level) name.
_ALIASES = (
    (re.compile(r"^serial_blocks(\d)\.\d+\.cpe\.(.+)$"), r"cpe\1.\2"),
    (re.compile(r"^serial_blocks(\d)\.\d+\.factoratt_crpe\.crpe\.(.+)$"), r"crpe\1.\2"),
    (re.compile(r"^parallel_blocks\.\d+\.factoratt_crpe(\d)\.crpe\.(.+)$"), r"crpe\1.\2"),
    (re.compile(r"^(parallel_blocks\.\d+)\.mlp[234]\.(.+)$"), r"\1.mlp.\2"),
)
# Modules of the reference that hold weights but never take part in the forward pass.
_ALWAYS_UNUSED = re.compile(r"^norm1\.")
# Head modules: unused when the Keras model has no such layer (CoaT-Lite has no norm2/norm3 and
# no aggregate; include_top=False drops the head).
_HEAD_MODULES = ("norm2", "norm3", "norm4", "aggregate", "head")


# The layers of a serial block (`serial_blocks<stage>_<i>_...`) and of a parallel block
# (`parallel_blocks_<i>_...`, one norm and attention per scale 2-4) that hold weights.
_BLOCK_LAYER = re.compile(
    r"^(?:serial_blocks(?P<stage>[1-4])_(?P<block>\d+)_"
    r"(?P<serial>norm[12]|mlp|factoratt_crpe_(?:qkv|proj))"
    r"|parallel_blocks_(?P<parallel_block>\d+)_"
    r"(?P<parallel>norm[12][234]|mlp|factoratt_crpe[234]_(?:qkv|proj)))$"
)
_BLOCK_PREFIX = re.compile(r"^(?:serial|parallel)_blocks")
_ATTENTION_SUBMODULE = re.compile(r"^(factoratt_crpe\d?)_")


def reference_module(layer_name):
    """The reference's module path of the Keras layer named `layer_name`.

    `serial_blocks2_1_factoratt_crpe_qkv` -> `serial_blocks2.1.factoratt_crpe.qkv`,
    `parallel_blocks_0_norm12` -> `parallel_blocks.0.norm12`; the top-level modules
    (`patch_embed1`, `cls_token1`, `cpe2`, `crpe2`, `norm4`, `aggregate`, `head`) keep their name.
    Raises `ConversionError` for a block layer name of no reference module.
    """
    match = _BLOCK_LAYER.match(layer_name)
    if match is None:
        if _BLOCK_PREFIX.match(layer_name):
            raise ConversionError(
                f"The layer name {layer_name!r} looks like a CoaT block's but names no module of "
                "the reference (expected e.g. 'serial_blocks2_1_factoratt_crpe_qkv' or "
                "'parallel_blocks_0_norm12')."
            )
        return layer_name
    if match["serial"]:
        block, module = f"serial_blocks{match['stage']}.{match['block']}", match["serial"]
    else:
        block, module = f"parallel_blocks.{match['parallel_block']}", match["parallel"]
    # `factoratt_crpe3_qkv` is the `qkv` Linear inside the module `factoratt_crpe3`.
    module = _ATTENTION_SUBMODULE.sub(r"\1.", module)
    return f"{block}.{module}"


def canonical_name(key):
    """Maps a source key to the name of the tensor it aliases (itself if it is no alias)."""
    for pattern, replacement in _ALIASES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _linear(w):
    return np.transpose(w)


def _conv2d(w):  # [out, in, kh, kw] -> [kh, kw, in, out]
    return np.transpose(w, (2, 3, 1, 0))


def _depthwise(w):  # [channels, 1, kh, kw] -> [kh, kw, channels, 1]
    return np.transpose(w, (2, 3, 0, 1))


def _identity(w):
    return w


def _aggregate_kernel(w):  # Conv1d(3, 1, 1): [1, 3, 1] -> [3]
    return np.reshape(w, (-1,))


def _weight_and_bias(prefix, weight, bias, transform):
    """The reference's `<prefix>.weight` (in `transform`ed layout) and `<prefix>.bias`."""
    return [(weight, f"{prefix}.weight", transform), (bias, f"{prefix}.bias", _identity)]


def _layer_targets(layer):
    """(keras variable, source key, transform) for every weight of one CoaT layer."""
    if not layer.weights:
        return []
    prefix = reference_module(layer.name)
    if isinstance(layer, ClassToken):
        return [(layer.cls_token, prefix, _identity)]
    if isinstance(layer, PatchEmbedding):
        return _weight_and_bias(
            f"{prefix}.proj", layer.proj.kernel, layer.proj.bias, _conv2d
        ) + _weight_and_bias(f"{prefix}.norm", layer.norm.gamma, layer.norm.beta, _identity)
    if isinstance(layer, ConvPositionEncoding):
        return _weight_and_bias(f"{prefix}.proj", layer.proj.kernel, layer.proj.bias, _depthwise)
    if isinstance(layer, ConvRelativePositionEncoding):
        targets = []
        for i, conv in enumerate(layer.convs):
            targets += _weight_and_bias(
                f"{prefix}.conv_list.{i}", conv.kernel, conv.bias, _depthwise
            )
        return targets
    if isinstance(layer, MLP):
        return _weight_and_bias(
            f"{prefix}.fc1", layer.fc1.kernel, layer.fc1.bias, _linear
        ) + _weight_and_bias(f"{prefix}.fc2", layer.fc2.kernel, layer.fc2.bias, _linear)
    if isinstance(layer, (QueryKeyValue, layers.Dense)):
        return _weight_and_bias(prefix, layer.kernel, layer.bias, _linear)
    if isinstance(layer, ScaleAggregation):
        return _weight_and_bias(prefix, layer.kernel, layer.bias, _aggregate_kernel)
    if isinstance(layer, layers.LayerNormalization):
        return _weight_and_bias(prefix, layer.gamma, layer.beta, _identity)
    raise ConversionError(
        f"Layer {layer.name!r} ({type(layer).__name__}) has weights the converter does not "
        "know how to fill from a PyTorch checkpoint."
    )


def _top_level_layers(model):
    """The layers of `model`, those of a nested model (a classifier's backbone) in its place."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _top_level_layers(layer)
        else:
            yield layer


def conversion_plan(model):
    """Lists `(variable, canonical source key, transform)` for every weight of `model`.

    Walks nested models, so a classifier holding its backbone as a layer is planned whole.
    """
    plan, seen = [], {}
    for layer in _top_level_layers(model):
        for variable, key, transform in _layer_targets(layer):
            if id(variable) in seen:
                raise ConversionError(
                    f"Keras weight {variable.path!r} would be assigned twice (from {key!r} and "
                    f"{seen[id(variable)]!r})."
                )
            seen[id(variable)] = key
            plan.append((variable, key, transform))
    planned = {id(v) for v, _, _ in plan}
    unplanned = [w.path for w in model.weights if id(w) not in planned]
    if unplanned:
        raise ConversionError(f"No source tensor is mapped to the Keras weights {unplanned}.")
    return plan


def canonical_tensors(state_dict):
    """Groups aliases under their canonical name, checking that aliases agree.

    Returns `({canonical name: array}, {canonical name: the source key it came from})`.
    """
    tensors, origin = {}, {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        name = canonical_name(key)
        if name in tensors:
            if tensors[name].shape != value.shape or not np.array_equal(tensors[name], value):
                raise ConversionError(
                    f"{key!r} and {origin[name]!r} name the same shared tensor ({name!r}) but "
                    "hold different values; the checkpoint is inconsistent."
                )
            continue
        tensors[name] = value
        origin[name] = key
    return tensors, origin


def assign_state_dict(model, state_dict):
    """Assigns a PyTorch CoaT state dict (numpy arrays) to a Keras CoaT model, strictly.

    `state_dict` maps the reference's names to arrays, in the authors' layout (their unused keys
    included) or timm's; aliases of shared tensors may appear any number of times (at least
    once). Raises `ConversionError` naming the key (and both shapes) on any mismatch. Nothing is
    assigned unless the whole checkpoint fits.
    """
    if not state_dict:
        raise ConversionError("The checkpoint holds no tensors.")
    plan = conversion_plan(model)
    tensors, origin = canonical_tensors(state_dict)
    layer_names = {layer.name for layer in _top_level_layers(model)}

    expected = {key for _, key, _ in plan}
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ConversionError(
            f"The checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}. "
            "Is it a checkpoint of this variant?"
        )
    unexpected = []
    for name in sorted(tensors.keys() - expected):
        module = name.split(".")[0]
        if _ALWAYS_UNUSED.match(name) or (module in _HEAD_MODULES and module not in layer_names):
            continue
        unexpected.append(origin[name])
    if unexpected:
        raise ConversionError(
            f"The checkpoint holds {len(unexpected)} tensor(s) this model has no place for, e.g. "
            f"{unexpected[:5]}. Is it a checkpoint of another variant?"
        )

    values = []
    for variable, key, transform in plan:
        value = transform(tensors[key])
        if tuple(value.shape) != tuple(variable.shape):
            raise ConversionError(
                f"Shape mismatch for {origin[key]!r}: the checkpoint has "
                f"{tuple(tensors[key].shape)} (→ {tuple(value.shape)} in Keras layout), the model's "
                f"{variable.path!r} needs {tuple(variable.shape)}. Is it a checkpoint of another "
                "variant, or a head with another number of classes?"
            )
        values.append(value)
    for (variable, _, _), value in zip(plan, values):
        variable.assign(value.astype(variable.dtype))
