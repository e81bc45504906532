"""Strict argument checks for the Python API (`load`, `generate`, `score`).

Each check returns the value in a plain Python type or raises TypeError (wrong kind of value)
or ValueError (right kind, wrong value) with one sentence. Integers may be Python or numpy
integers; bools are refused where a number is meant, floats where an integer is meant
(`1.7` is never truncated to a token id).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}..." if len(text) > 43 else text


def integer(value: Any, name: str, minimum: int | None = None) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {_describe(value)} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} is {int(value)}; it must be at least {minimum}")
    return int(value)


def threads(value: Any) -> int | None:
    return None if value is None else integer(value, "threads", 1)


def real(value: Any, name: str) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {_describe(value)} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be a finite number")
    return value


def temperature(value: Any) -> float:
    value = real(value, "temperature")
    if value < 0:
        raise ValueError(f"temperature is {value}; it must be 0 (greedy) or more")
    return value


def top_p(value: Any) -> float:
    if _is_real(value) and not 0.0 < float(value) <= 1.0:  # NaN fails this too
        raise ValueError(f"top_p is {value}; it must be in (0, 1]")
    return real(value, "top_p")


def seed(value: Any) -> int | None:
    return None if value is None else integer(value, "seed", 0)


def logit_bias(value: Any) -> dict[int, float]:
    """{token id: bias}; the ids may be given as strings of digits (OpenAI's JSON keys)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"logit_bias must be a dict of token id to bias, got {_describe(value)}")
    checked = {}
    for token, bias in value.items():
        if isinstance(token, str) and token.isdigit():
            token = int(token)
        checked[integer(token, "a logit_bias token id")] = real(bias, f"logit_bias of token {token}")
    return checked


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def token_ids(ids: Any, vocab_size: int, what: str) -> list[int]:
    """A sequence of integer token ids inside the vocabulary."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Iterable, np.ndarray)) or isinstance(ids, dict):
        raise TypeError(f"{what} must be a list of integer token ids, got {_describe(ids)}")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise TypeError(f"{what} must be a flat list of token ids, got an array of shape {list(ids.shape)}")
    checked = []
    for token in ids:
        if not _is_int(token):
            raise TypeError(
                f"{what} has token id {_describe(token)} of type {type(token).__name__}; token ids must be integers"
            )
        token = int(token)
        if not 0 <= token < vocab_size:
            raise ValueError(f"{what} has token id {token}, outside the vocabulary [0, {vocab_size})")
        checked.append(token)
    return checked


def prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, bytes, dict)) or not isinstance(prompts, (Iterable, np.ndarray)):
        raise TypeError(f"prompts must be a list of token-id lists, got {_describe(prompts)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass a list of token-id lists")
    for i, prompt in enumerate(prompts):
        if _is_int(prompt):
            raise TypeError(
                f"prompt {i} is the integer {int(prompt)}, not a list of token ids; pass [[1, 2, 3]] for one prompt"
            )
    return prompts


def stop_tokens(value: Any, vocab_size: int) -> set[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (Iterable, np.ndarray)):
        raise TypeError(f"stop_tokens must be a list of integer token ids, got {_describe(value)}")
    return set(token_ids(value, vocab_size, "stop_tokens"))
