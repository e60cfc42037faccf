"""training.train's recipe options are generated from the Recipe dataclass, typed and checked."""

import dataclasses
import math

import pytest

from training import recipes, train

REQUIRED = ["--output-dir", "unused"]


def _argv_for(recipe):
    """Command-line options that set every field of `recipe` (but those set by --recipe/--model)."""
    argv = []
    for field in dataclasses.fields(recipes.Recipe):
        if "set_by" in field.metadata:
            continue
        option, value = recipes.flag(field), getattr(recipe, field.name)
        if isinstance(value, bool):
            argv.append(option if value else "--no-" + option[2:])
        elif isinstance(value, tuple):
            argv += [option, *map(repr, value)]
        else:
            argv += [option, "none" if value is None else str(value)]
    return argv


def test_every_recipe_field_has_an_option():
    # The demo recipe's values differ from the ImageNet recipe's in most fields; set them all.
    demo = recipes.get_recipe("demo")
    args = train.parse_args(["--recipe", "imagenet", *REQUIRED, *_argv_for(demo)])
    assert train.resolve_recipe(args) == dataclasses.replace(demo, name="imagenet")
    changed = [
        f.name
        for f in dataclasses.fields(recipes.Recipe)
        if getattr(demo, f.name) != getattr(recipes.IMAGENET, f.name)
    ]
    assert len(changed) > 20  # the round trip exercised the options, not the defaults


def test_set_by_fields_name_existing_options():
    options = {"--recipe", "--model"}
    assert {f.metadata["set_by"] for f in dataclasses.fields(recipes.Recipe)
            if "set_by" in f.metadata} == options
    args = train.parse_args(["--recipe", "demo", "--model", "coat_mini", *REQUIRED])
    assert (train.resolve_recipe(args).name, train.resolve_recipe(args).model) == (
        "demo", "coat_mini"
    )


def test_options_not_given_keep_the_recipe_and_the_variant_overrides():
    args = train.parse_args(["--model", "coat_small", *REQUIRED, "--lr", "1e-3"])
    expected = recipes.override(recipes.get_recipe("imagenet", "coat_small"), {"lr": 1e-3})
    assert train.resolve_recipe(args) == expected


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--ema", "0"], "ema_momentum", None),
        (["--ema", "none"], "ema_momentum", None),
        (["--ema", "0.999"], "ema_momentum", 0.999),
        (["--clip-norm", "0"], "clip_norm", None),
        (["--clip-norm", "1"], "clip_norm", 1.0),
        (["--rand-augment", "-1"], "rand_augment_magnitude", None),
        (["--rand-augment", "None"], "rand_augment_magnitude", None),
        (["--color-jitter", "0"], "color_jitter", None),
        (["--init-weights", "none"], "init_weights", None),
        (["--init-weights", "imagenet"], "init_weights", "imagenet"),
        (["--backup-every", "500"], "backup_every", 500),
        (["--backup-every", "epoch"], "backup_every", "epoch"),
        (["--no-horizontal-flip"], "horizontal_flip", False),
        (["--crop-scale", "0.5", "1"], "crop_scale", (0.5, 1.0)),
        (["--mixed-precision", "none"], "mixed_precision", "none"),
    ],
)
def test_options_parse_to_the_field_type(argv, field, value):
    recipe = train.resolve_recipe(train.parse_args([*REQUIRED, *argv]))
    assert getattr(recipe, field) == value and type(getattr(recipe, field)) is type(value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
        (["--lr", "fast"], "argument --lr: expected a finite number, got 'fast'"),
        (["--lr", "none"], "argument --lr: expected a finite number, got 'none'"),
        (["--epochs", "3.5"], "argument --epochs: expected an integer, got '3.5'"),
        (["--ema=-inf"], "argument --ema: expected a finite number or none, got '-inf'"),
        (["--crop-scale", "0.5"], "argument --crop-scale: expected 2 arguments"),
        (["--crop-ratio", "1", "nan"], "argument --crop-ratio: expected a finite number"),
        (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
        (["--horizontal-flip", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_badly_typed_options_exit_2_naming_option_and_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*REQUIRED, *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_recipes_refuse_non_finite_numbers_from_python_too():
    for change in ({"lr": math.nan}, {"warmup_epochs": math.inf}, {"crop_ratio": (0.5, math.nan)}):
        with pytest.raises(ValueError, match=f"{next(iter(change))} must be finite"):
            recipes.override(recipes.get_recipe("demo"), change)
