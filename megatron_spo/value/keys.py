"""Stable 64-bit prompt keys: the identity of a prompt in the value store and the offline file.

A prompt is identified by `blake2b(text.strip(), digest_size=8)` read as a little-endian signed
int64. The key depends only on the prompt text (not on Python's per-process string hashing), so
every rank, every restart and the offline pipeline agree on it. Surrounding whitespace is not part
of the identity: the offline file stores prompts stripped (as the authors' merge script does) and
the trainer looks prompts up with whatever whitespace its dataset has.

Which text: the raw dataset prompt, i.e. the user message as the dataset stores it, before any
chat template and before any answer-format suffix the trainer appends at rollout time.
`megatron-spo values merge` recovers that text from the chat-templated inputs it reads (see
`megatron_spo.value.offline.extract_user_prompt`).

Collisions: with n prompts the chance that any two share a key is about n^2 / 2^65
(~3e-6 at 10 million prompts); building a store with colliding keys raises an error.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

KEY_DTYPE = np.dtype("<i8")
_DIGEST_BYTES = 8


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=_DIGEST_BYTES).digest()


def prompt_key(text: str) -> int:
    """The int64 key of one prompt text."""
    return int.from_bytes(_digest(text), "little", signed=True)


def prompt_keys(texts: Iterable[str]) -> np.ndarray:
    """int64 keys of many prompt texts, shape (len(texts),); same values as `prompt_key`."""
    # one bytes join + one frombuffer instead of a Python int per prompt
    joined = b"".join(map(_digest, texts))
    return np.frombuffer(joined, dtype=KEY_DTYPE).astype(np.int64)
