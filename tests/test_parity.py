"""keras_coat against the reference (timm's CoaT) with random, perturbed weights.

Logits must agree to float32 rounding (largest absolute difference <= 1e-4) on a non-square
input, the multi-scale features must equal the reference's intermediate outputs, and the
converter must map, refuse and name the reference's keys, on every Keras backend. The logits of
every variant at its published resolution are the harness's (`check_published_variant`,
tests/test_harness.py).
"""

import re

import keras
import numpy as np
import pytest

import keras_coat
from keras_coat.convert import (
    ConversionError,
    assign_state_dict,
    canonical_name,
    conversion_plan,
    reference_module,
)
from tests.conftest import to_numpy
from tests.reference import (
    keras_twin,
    random_images,
    state_dict_numpy,
    timm_model,
    torch_forward,
)

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")
TOLERANCE = 1e-4


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_non_square_input_equals_the_reference(name):
    reference = timm_model(name, img_size=(256, 320))
    model = keras_twin(name, reference, input_shape=(256, 320, 3))
    images = random_images(1, 256, 320, seed=1)
    logits = to_numpy(model.predict(images, verbose=0))
    difference = np.abs(logits - torch_forward(reference, images))
    assert difference.max() <= TOLERANCE


@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_pyramid_features_equal_the_reference_intermediate_outputs(name):
    levels = {"x1_nocls": "P2", "x2_nocls": "P3", "x3_nocls": "P4", "x4_nocls": "P5"}
    reference = timm_model(name, img_size=(224, 256))
    weights = state_dict_numpy(reference)
    import timm

    features_reference = timm.create_model(
        name, pretrained=False, img_size=(224, 256), return_interm_layers=True,
        out_features=list(levels),
    ).eval()
    features_reference.load_state_dict(
        {k: reference.state_dict()[k] for k in features_reference.state_dict()}, strict=True
    )
    model = keras_coat.create_model(name, input_shape=(224, 256, 3), include_preprocessing=False)
    assign_state_dict(model, weights)
    extractor = keras.Model(model.input, model.pyramid_outputs)
    images = random_images(1, 224, 256, seed=2)
    expected = torch_forward(features_reference, images)
    features = extractor.predict(images, verbose=0)
    for torch_name, level in levels.items():
        assert features[level].shape == expected[torch_name].shape
        # The residual stream grows large through random blocks (|x| ~ 1e3 here), so allow
        # float32 rounding relative to the features' scale.
        scale = max(1.0, np.abs(expected[torch_name]).max())
        difference = np.abs(features[level] - expected[torch_name]).max()
        assert difference <= TOLERANCE * scale / 10, f"{level}: max |diff| = {difference}"


@pytest.fixture(scope="module")
def lite_tiny_reference():
    reference = timm_model("coat_lite_tiny", img_size=64)
    return reference, state_dict_numpy(reference)


def _lite_tiny(**kwargs):
    kwargs.setdefault("include_preprocessing", False)
    return keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), classifier_activation=None, **kwargs)


def test_any_non_empty_subset_of_aliases_converts(lite_tiny_reference):
    """A safetensors file keeps one name per shared tensor; the authors' file keeps all."""
    reference, weights = lite_tiny_reference
    assert "serial_blocks2.1.cpe.proj.weight" in weights  # torch lists every alias
    groups = {}
    for key in weights:
        groups.setdefault(canonical_name(key), []).append(key)
    assert any(len(keys) > 1 for keys in groups.values())
    rng = np.random.RandomState(0)
    subset = {}
    for keys in groups.values():
        chosen = rng.choice(len(keys), size=rng.randint(1, len(keys) + 1), replace=False)
        subset.update({keys[i]: weights[keys[i]] for i in chosen})
    assert len(subset) < len(weights)
    model = _lite_tiny()
    assign_state_dict(model, subset)
    images = random_images(2, 64, 64)
    assert np.abs(to_numpy(model(images)) - torch_forward(reference, images)).max() <= TOLERANCE


def test_authors_unused_keys_are_accepted_and_aliases_must_agree(lite_tiny_reference):
    _, weights = lite_tiny_reference
    authors = dict(weights)
    # The authors' code also holds an unused norm1 (and norm2/norm3 in CoaT-Lite).
    for unused in ("norm1", "norm2", "norm3"):
        authors[f"{unused}.weight"] = np.ones(64, "float32")
        authors[f"{unused}.bias"] = np.zeros(64, "float32")
    assign_state_dict(_lite_tiny(), authors)

    inconsistent = dict(weights)
    inconsistent["serial_blocks2.1.cpe.proj.bias"] = weights["cpe2.proj.bias"] + 1
    with pytest.raises(ConversionError, match="serial_blocks2.1.cpe.proj.bias"):
        assign_state_dict(_lite_tiny(), inconsistent)


def test_missing_extra_and_mis_shaped_keys_are_named(lite_tiny_reference):
    _, weights = lite_tiny_reference
    missing = {k: v for k, v in weights.items() if not k.startswith("serial_blocks3.1.mlp.fc2")}
    with pytest.raises(ConversionError, match=r"serial_blocks3\.1\.mlp\.fc2"):
        assign_state_dict(_lite_tiny(), missing)

    extra = dict(weights, **{"parallel_blocks.0.norm12.weight": np.ones(128, "float32")})
    with pytest.raises(ConversionError, match=r"parallel_blocks\.0\.norm12\.weight"):
        assign_state_dict(_lite_tiny(), extra)

    with pytest.raises(ConversionError, match="no tensors"):
        assign_state_dict(_lite_tiny(), {})

    # Lite-Tiny weights into a Lite-Mini model: stage 3 is 256 wide there, 320 here.
    model = keras_coat.CoaTLiteMini(input_shape=(64, 64, 3))
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ConversionError, match=r"Shape mismatch for 'patch_embed3\.proj\.weight'.*"
                                              r"\(256, 128, 2, 2\).*\(2, 2, 128, 320\)"):
        assign_state_dict(model, weights)
    # Nothing was half-assigned.
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def test_lite_small_rejects_lite_tiny_weights(lite_tiny_reference):
    _, weights = lite_tiny_reference
    with pytest.raises(ConversionError, match="lacks .* tensor"):
        assign_state_dict(keras_coat.CoaTLiteSmall(input_shape=(64, 64, 3)), weights)


def test_headless_model_takes_a_full_checkpoint(lite_tiny_reference):
    reference, weights = lite_tiny_reference
    model = keras_coat.CoaTLiteTiny(
        input_shape=(64, 64, 3), include_top=False, pooling="token", include_preprocessing=False
    )
    assign_state_dict(model, weights)  # head.* is known-unused without a head
    images = random_images(2, 64, 64)
    import torch

    with torch.no_grad():
        expected = reference.forward_head(
            reference.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))),
            pre_logits=True,
        ).numpy()
    assert np.abs(to_numpy(model(images)) - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "layer_name, module",
    [
        ("patch_embed1", "patch_embed1"),
        ("cls_token4", "cls_token4"),
        ("cpe2", "cpe2"),
        ("crpe3", "crpe3"),
        ("serial_blocks2_1_norm1", "serial_blocks2.1.norm1"),
        ("serial_blocks1_12_factoratt_crpe_qkv", "serial_blocks1.12.factoratt_crpe.qkv"),
        ("serial_blocks4_0_factoratt_crpe_proj", "serial_blocks4.0.factoratt_crpe.proj"),
        ("serial_blocks3_5_mlp", "serial_blocks3.5.mlp"),
        ("parallel_blocks_0_norm12", "parallel_blocks.0.norm12"),
        ("parallel_blocks_5_norm24", "parallel_blocks.5.norm24"),
        ("parallel_blocks_3_factoratt_crpe3_qkv", "parallel_blocks.3.factoratt_crpe3.qkv"),
        ("parallel_blocks_0_mlp", "parallel_blocks.0.mlp"),
        ("norm2", "norm2"),
        ("aggregate", "aggregate"),
        ("head", "head"),
    ],
)
def test_keras_layer_names_map_back_onto_the_reference_modules(layer_name, module):
    assert reference_module(layer_name) == module


@pytest.mark.parametrize(
    "layer_name",
    ["serial_blocks2_1_norm3", "serial_blocks2_1_factoratt_crpe3_qkv", "parallel_blocks_0_norm1",
     "parallel_blocks_0_factoratt_crpe_qkv", "serial_blocks2.1.norm1", "serial_blocks2_norm1"],
)
def test_block_layer_names_of_no_reference_module_are_refused(layer_name):
    with pytest.raises(ConversionError, match=re.escape(repr(layer_name))):
        reference_module(layer_name)


def test_every_planned_key_of_coat_tiny_is_a_reference_key():
    """The whole name map of a parallel variant, checked against timm's own key list."""
    reference = timm_model("coat_tiny", img_size=64)
    model = keras_coat.CoaTTiny(input_shape=(64, 64, 3))
    planned = {key for _, key, _ in conversion_plan(model)}
    canonical = {canonical_name(k) for k in reference.state_dict()}
    assert planned == canonical - {k for k in canonical if k.startswith("norm1.")}


def test_a_nested_functional_model_converts(lite_tiny_reference):
    """A classifier that holds its backbone as a layer (KerasHub's layout), nested twice."""
    reference, weights = lite_tiny_reference
    images = keras.Input((64, 64, 3))
    backbone = keras_coat.CoaTLiteTiny(
        input_shape=(64, 64, 3), include_top=False, pooling="token", include_preprocessing=False
    )
    inner = keras.Model(images, keras.layers.Dense(1000, name="head")(backbone(images)))
    outer = keras.Model(images, inner(images))
    assert len(outer.layers) == 2 and isinstance(outer.layers[1], keras.Model)
    assign_state_dict(outer, weights)
    x = random_images(2, 64, 64)
    assert np.abs(to_numpy(outer(x)) - torch_forward(reference, x)).max() <= TOLERANCE
