"""The grammar library's tokenizer tables are built at engine start in the background when asked
(`EngineConfig.prepare_grammars`, which the server's engine process sets), so the step that admits the first
constrained request compiles only its schema; without it an engine that never sees a schema pays nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.structured import spec as structured_spec


def _constrained() -> request_mod.SamplingParams:
    return request_mod.SamplingParams(
        max_tokens=40, temperature=0.0, constraint=structured_spec.Constraint(kind="json_object")
    )


def test_tables_are_built_before_the_first_schema_when_asked(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(prepare_grammars=True)
    grammars = engine.runner._grammars
    assert grammars is not None
    assert grammars.compiler_ready  # the engine returned only once they were built
    assert not [t for t in threading.enumerate() if t.name == "grammar-prepare"]
    assert grammars.num_compiles == 0  # nothing compiled yet: only the tables were built
    engine.add_request(engine.make_request(req_id="j", prompt_token_ids=[3, 4, 5], sampling_params=_constrained()))
    finished = []
    while engine.has_unfinished_requests():
        outs, _ = engine.step()
        finished += [o for o in outs if o.finished]
    assert [o.error for o in finished] == [None]
    assert grammars.num_compiles == 1


def test_nothing_is_built_when_not_asked(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    assert engine.runner._grammars is None
