"""slmify: turn an LLM-powered agent into a team of small specialist models."""

import logging
import os
import warnings

# bitsandbytes warns on every CPU import that it could not fetch an optional kernel from
# the Hub; slmify never uses 4-bit on CPU and runs offline, so the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# slmify draws its own progress bars (per stage, per task); the Hugging Face libraries'
# tqdm bars (every dataset map, every weight load) would bury them. Set to 0 to see them.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# peft asks transformers for a renamed attribute on every adapter load (transformers 5).
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
