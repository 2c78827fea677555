"""slmify: turn an LLM-powered agent into a team of small specialist models."""

import logging

# bitsandbytes warns on every CPU import that it could not fetch an optional kernel from
# the Hub; slmify never uses 4-bit on CPU and runs offline, so the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
