"""Fixtures for runtime tests: the built-in tiny model, a stock reference copy, engine factories.

The engine under test uses the process-wide model from `models.loader` (as production does); reference
outputs come from a second, untouched copy through `model.generate()`, so a bug in the engine's handling
of the shared model cannot leak into its own reference. Everything is real torch + transformers on CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
import transformers

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import core
from fleetlm_runtime.models import builtin, loader

# One intra-op thread: the tiny model gains nothing from more, and results stay deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> loader.LoadedModel:
    return loader.load("builtin:tiny")


@pytest.fixture(scope="session")
def reference_model() -> transformers.PreTrainedModel:
    model, _ = builtin.build("tiny")
    return model


@pytest.fixture(scope="session")
def tokenizer(tiny: loader.LoadedModel) -> transformers.PreTrainedTokenizerBase:
    return tiny.tokenizer


def _generate_greedy(model: transformers.PreTrainedModel, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """`model.generate(do_sample=False)` on one prompt, alone: the reference for greedy equality."""
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        # An explicit mask: without it generate() would mask prompt tokens that equal the pad id.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens)
    return out[0, ids.shape[1] :].tolist()  # type: ignore[no-any-return]


def _random_prompts(num: int, *, vocab_size: int, seed: int, min_len: int = 1, max_len: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(num)]


@pytest.fixture(scope="session")
def generate_greedy() -> Callable[[transformers.PreTrainedModel, Sequence[int], int], list[int]]:
    return _generate_greedy


@pytest.fixture(scope="session")
def random_prompts() -> Callable[..., list[list[int]]]:
    return _random_prompts


@pytest.fixture
def make_core(tiny: loader.LoadedModel) -> Iterator[Callable[..., core.EngineCore]]:
    """EngineCore on the tiny model; keyword arguments go to EngineConfig."""
    made: list[core.EngineCore] = []

    def factory(**overrides: object) -> core.EngineCore:
        engine = core.EngineCore(config_mod.EngineConfig(**overrides), loaded=tiny)  # type: ignore[arg-type]
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.close()
