"""Recipes: every shipped one loads, typos and bad combinations fail naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from slmify.recipes import (
    DEFAULT_RECIPE,
    Recipe,
    RecipeError,
    load_recipe,
    save_resolved,
    shipped_recipes,
)


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU recipes ask for QLoRA, which is refused without CUDA: validate them as a GPU
    # machine would see them (the refusal itself is tested below).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    assert recipe.lora is not None and recipe.eval.min_test_calls >= 1


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_recipe_documents_itself(path: Path) -> None:
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    assert header.startswith("# ") and "For:" in header and "Needs:" in header
    assert f"slmify train --recipe {path.stem}" in header
    assert "--set " in header
    # One trade-off comment per setting: every `key: value` line carries a `#` comment.
    in_block = False
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if re.match(r"^\s+\S.*: \|-?$", line):  # a block scalar (the Gemma template)
            in_block = True
            continue
        if in_block and line.startswith("    "):
            continue
        in_block = False
        if re.match(r"^\s+[a-z_0-9]+:\s*\S", line):
            assert "#" in line, f"{path.name}: no comment on {line.strip()!r}"


def test_default_recipe_is_the_embedded_cpu_one() -> None:
    recipe = load_recipe(DEFAULT_RECIPE)
    assert recipe.model.base == "smollm2-135m"
    assert not recipe.quantization.load_in_4bit
    assert recipe.train.dtype == "auto" and 0 < (recipe.train.max_minutes or 0) <= 2


def test_misspelled_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: smollm2-135m}\nlora: {rr: 8}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(bad))
    assert str(err.value) == f"{bad}: lora.rr: unknown key (misspelled? see the recipe's comments)"


def test_set_overrides_apply_and_validate() -> None:
    recipe = load_recipe(
        DEFAULT_RECIPE, ["lora.r=32", "train.max_steps=3", "lora.target_modules=[q_proj]"]
    )
    assert (recipe.lora.r, recipe.train.max_steps) == (32, 3)
    assert recipe.lora.target_modules == ["q_proj"]
    with pytest.raises(RecipeError, match=r"lora\.rank: unknown key"):
        load_recipe(DEFAULT_RECIPE, ["lora.rank=8"])
    with pytest.raises(RecipeError, match=r"expected KEY\.SUB=VALUE"):
        load_recipe(DEFAULT_RECIPE, ["lora.r"])
    with pytest.raises(RecipeError, match=r"train\.max_steps: Input should be greater"):
        load_recipe(DEFAULT_RECIPE, ["train.max_steps=0"])


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_four_bit_without_cuda_is_refused() -> None:
    with pytest.raises(RecipeError, match="needs a CUDA GPU and none is available"):
        load_recipe("gpu-qwen2.5-0.5b-qlora")
    with pytest.raises(RecipeError, match="needs CUDA but train.device is cpu"):
        load_recipe(DEFAULT_RECIPE, ["quantization.load_in_4bit=true", "train.device=cpu"])


def test_cross_field_rules_say_what_to_change() -> None:
    with pytest.raises(RecipeError, match="trains LoRA adapters"):
        load_recipe(DEFAULT_RECIPE, ["lora=null"])
    with pytest.raises(RecipeError, match="at least 10% of the sessions"):
        load_recipe(
            DEFAULT_RECIPE, ["dataset.test_fraction=0.5", "dataset.validation_fraction=0.45"]
        )
    with pytest.raises(RecipeError, match="needs lora.target_modules as a list"):
        load_recipe(DEFAULT_RECIPE, ["lora.target_modules=.*proj"])


def test_unknown_recipe_lists_the_shipped_ones() -> None:
    with pytest.raises(RecipeError, match="shipped recipes: .*cpu-smollm2-135m"):
        load_recipe("no-such-recipe")


def test_resolved_recipe_reloads_identically(tmp_path: Path) -> None:
    recipe = load_recipe(DEFAULT_RECIPE, ["lora.r=8"])
    save_resolved(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(str(tmp_path / "recipe.yaml"))
    assert again == recipe
    assert isinstance(again, Recipe)
