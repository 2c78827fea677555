"""Training recipes: YAML files checked by pydantic, with `key.sub=value` overrides.

A recipe (recipes/*.yaml) says which base model to fine-tune, how to build each task's
dataset, the LoRA and quantization settings, the trainer's knobs and the quality gate
(`eval:`). Every section forbids unknown keys, so a misspelled key fails with a message
naming it. Cross-field rules (4-bit needs CUDA and LoRA; split fractions leave room for
training) are validators with a message that says what to change.

`load_recipe(name_or_path, overrides)` reads a shipped recipe by name (recipes/NAME.yaml)
or any YAML path, applies `--set lora.r=32` overrides to the raw mapping, then
validates, so an override of a key that does not exist is refused like a typo.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmify.errors import EXIT_BAD_CONFIG, SlmifyError
from slmify.gate import EvalConfig
from slmify.schema import ContextPolicy


def shipped_recipes_dir() -> Path:
    """The shipped recipes: package data in an installed wheel (pyproject maps the repo's
    top-level recipes/ to slmify/recipe_files), else the checkout's recipes/ (an editable
    install maps only the slmify folder, so the package data is not there)."""
    # files() is a real folder for every pip install (wheels are unpacked, never zipped).
    packaged = Path(str(importlib.resources.files("slmify") / "recipe_files"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


RECIPES_DIR = shipped_recipes_dir()
DEFAULT_RECIPE = "cpu-smollm2-135m"


class RecipeError(SlmifyError, ValueError):
    """A recipe that cannot be used; the message names the file and the key."""

    exit_code = EXIT_BAD_CONFIG


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    base: str = Field(
        description="An embedded model (smollm2-135m, gemma3-270m), a HF model id found in "
        "the local HF cache, or a local folder with config.json and safetensors."
    )
    license: str | None = Field(
        None, description="The weights' license when the model folder does not state one."
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template for a base model whose tokenizer has none "
        "(pretrained-only checkpoints); it replaces the tokenizer's own when set.",
    )


class ScreenConfig(_Section):
    licenses: list[str] = Field(
        default_factory=lambda: ["apache-2.0", "mit"],
        description="Licenses accepted for a model that will be deployed.",
    )
    memory_fraction: float = Field(0.8, gt=0, le=1)


class PruneConfig(_Section):
    system: Literal["keep", "drop"] = "drop"
    tools: Literal["keep", "compact", "drop"] = "compact"


class DatasetConfig(_Section):
    min_calls: int = Field(30, ge=1)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    calibration_fraction: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Sessions held out, frozen like test, for calibrating the confidence a "
        "specialist defers at; never trained on.",
    )
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    max_length: int = Field(1024, ge=32)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    context: ContextPolicy = Field(
        default_factory=lambda: ContextPolicy(max_tokens=512, tool_result_chars=1000),
        description="What a specialist reads of a long conversation (see ContextPolicy).",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> DatasetConfig:
        held_out = self.validation_fraction + self.test_fraction + self.calibration_fraction
        if held_out >= 0.9:
            raise ValueError(
                "dataset.validation_fraction + dataset.test_fraction + "
                "dataset.calibration_fraction must stay below 0.9 so that at least 10% of "
                "the sessions are left for training"
            )
        return self


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    last_layers: int | None = Field(
        None,
        ge=1,
        description="Adapt only the last N decoder layers: backward stops below them, so a "
        "step is much cheaper on CPU, at some loss of capacity. None: all layers.",
    )

    @model_validator(mode="after")
    def _last_layers_need_names(self) -> LoraConfig:
        if self.last_layers and isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ValueError(
                    "lora.last_layers needs lora.target_modules as a list of module names "
                    "(e.g. [q_proj, v_proj]) or all-linear, not a pattern"
                )
        return self


class QuantizationConfig(_Section):
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"


class TrainConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 where the device computes it natively (a CUDA GPU with "
        "bf16, a CPU with avx512_bf16 or AMX), else float32. bfloat16 asked of a device "
        "without it trains in float32 and says so.",
    )
    epochs: float = Field(
        3.0, gt=0, description="Passes over the task's train split, within the caps below."
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget per task for the training loop, its validation passes "
        "included: the steps that fit are planned from the machine's measured speed, and "
        "training stops when the time is up. None: no budget.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optional cap on optimizer steps.")
    eval_steps: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Validation loss and a checkpoint every N steps (the best one is the "
        "adapter kept); auto: about 6 validation passes over the planned steps.",
    )
    patience: int | None = Field(
        3,
        ge=1,
        description="Stop after this many validation passes without a lower loss; None: never.",
    )
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Examples per step; auto plans it from the machine."
    )
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    seed: int = 0


class LabelConfig(_Section):
    specialist: Literal["head", "lora"] = Field(
        "head",
        description="A task answered from a closed label set: a classification head on "
        "sentence embeddings (seconds to train, milliseconds to answer, a probability per "
        "label) or a LoRA adapter that generates the label.",
    )


class StructuredConfig(_Section):
    specialist: Literal["head", "lora"] = Field(
        "head",
        description="A task answered with one tool call or one JSON value: a field head "
        "(each field a closed choice or a value copied from the request; seconds to train, "
        "a probability per field) where every field qualifies, else a LoRA adapter; lora: "
        "always the adapter.",
    )
    min_cv_accuracy: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A field head whose fields' cross-validated accuracies multiply to less "
        "than this is not kept: the task trains a LoRA adapter instead. Low on purpose: "
        "calibrated deferral serves the answers a head is sure of, and a LoRA trained for "
        "minutes on a CPU rarely beats half.",
    )


class GenerateConfig(_Section):
    constrained: bool = Field(
        True,
        description="LoRA specialists generate tool calls under a grammar of the offered "
        "tools' JSON schemas and JSON answers under a grammar of JSON (xgrammar), in eval "
        "and serve alike: every answer parses, for a few percent more time per token. A "
        "schema the grammar cannot express is generated unconstrained, with the reason "
        "logged. false: free generation, as trained.",
    )


class AgentConfig(_Section):
    specialist: Literal["auto", "off"] = Field(
        "auto",
        description="auto: for each agent whose calls the cluster stage split into two "
        "tasks or more (one prompt deciding its next action), also train one LoRA on all "
        "its calls that chooses the action itself (slmify.agent); eval keeps it where it "
        "serves more calibration calls than router + task specialists. off: never.",
    )

    @field_validator("specialist", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class Recipe(_Section):
    name: str = ""
    model: ModelConfig
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    lora: LoraConfig | None = Field(
        default_factory=LoraConfig, description="Required: slmify trains LoRA adapters."
    )
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    structured: StructuredConfig = Field(default_factory=StructuredConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)

    @model_validator(mode="after")
    def _four_bit_needs_cuda_and_lora(self) -> Recipe:
        if self.lora is None:
            raise ValueError(
                "lora: is empty; slmify trains LoRA adapters, give at least `lora: {r: 16}`"
            )
        if not self.quantization.load_in_4bit:
            return self
        if self.train.device == "cpu":
            raise ValueError(
                "quantization.load_in_4bit needs CUDA but train.device is cpu; "
                "use --set quantization.load_in_4bit=false or a CPU recipe"
            )
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "quantization.load_in_4bit (QLoRA) needs a CUDA GPU and none is available; "
                "use --set quantization.load_in_4bit=false or a CPU recipe "
                "(e.g. --recipe cpu-smollm2-135m)"
            )
        return self


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe by name (recipes/NAME.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return RECIPES_DIR / f"{name_or_path}.yaml"


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; RecipeError names the file and the key."""
    path = recipe_path(name_or_path)
    if not path.is_file():
        names = ", ".join(p.stem for p in shipped_recipes())
        raise RecipeError(f"no recipe {name_or_path!r} (not a file; shipped recipes: {names})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, train:, ...)")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path}: {describe_errors(e)}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `key.sub=value` (value parsed as YAML: 32, true, [a, b]) to a raw recipe."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. lora.r=32")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def describe_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (misspelled? see the recipe's comments)")
        else:
            lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


def save_resolved(recipe: Recipe, path: Path) -> None:
    """The recipe as it ran (defaults and overrides filled in), beside its output."""
    header = f"# Resolved recipe {recipe.name!r}: defaults and --set overrides applied.\n"
    path.write_text(header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def read_recipe_sections(recipe_file: Path) -> tuple[EvalConfig, DatasetConfig]:
    """The `eval:` and `dataset:` sections of the recipe the specialist was trained with.

    Only those sections are validated: the whole recipe's checks (4-bit needs CUDA) are
    about training and would refuse evaluating a GPU-trained adapter on a CPU.
    """
    try:
        raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        sections = {name: raw.get(name) or {} for name in ("eval", "dataset")}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise RecipeError(f"{recipe_file}: cannot read the recipe: {e}") from None
    try:
        cfg = EvalConfig.model_validate(sections["eval"])
    except ValidationError as e:
        raise RecipeError(f"{recipe_file}: eval: {describe_errors(e)}") from None
    try:
        return cfg, DatasetConfig.model_validate(sections["dataset"])
    except ValidationError as e:
        raise RecipeError(f"{recipe_file}: dataset: {describe_errors(e)}") from None


def read_generate_config(recipe_file: Path) -> GenerateConfig:
    """The `generate:` section of the recipe a specialist was trained with (alone, as
    `read_recipe_sections` reads its sections)."""
    try:
        raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        section = raw.get("generate") or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise RecipeError(f"{recipe_file}: cannot read the recipe: {e}") from None
    try:
        return GenerateConfig.model_validate(section)
    except ValidationError as e:
        raise RecipeError(f"{recipe_file}: generate: {describe_errors(e)}") from None
