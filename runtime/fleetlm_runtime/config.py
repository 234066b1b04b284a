"""The runtime's configuration: one validated `RuntimeConfig`, loadable from YAML with `schemaVersion`.

Keys may be written camelCase (as the operator's ConfigMap does) or snake_case; unknown keys are refused,
and every error names the offending field (`batching.maxBatchTokens: ...`). The operator validates the
ConfigMap it renders through this same model, so it imports only `contract` and pydantic and must never
import the engine, torch or aiohttp.
"""

from __future__ import annotations

import pathlib
import re
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import alias_generators

from fleetlm_runtime import contract

# Class names become Prometheus label values and config_info entries: keep them short and plain.
_CLASS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_]{0,30}[a-z0-9])?$")

_M = TypeVar("_M", bound=pydantic.BaseModel)

PositiveInt = Annotated[int, pydantic.Field(ge=1)]


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad field (`field` is the first, camelCase)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=alias_generators.to_camel,
        strict=False,
    )


class ModelSource(_Model):
    """Which weights to serve and how."""

    source: str = pydantic.Field(
        default="builtin:tiny",
        min_length=1,
        description="A local or PVC-mounted directory, a hub id, or `builtin:tiny` (seeded, no download).",
    )
    revision: str | None = pydantic.Field(default=None, description="Hub revision (commit, tag or branch).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = pydantic.Field(
        default="auto", description="`auto`: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    max_model_len: PositiveInt | None = pydantic.Field(
        default=None, description="Context length; defaults to the model's own."
    )
    served_model_name: str | None = pydantic.Field(
        default=None, min_length=1, description="The `model` id clients send and /v1/models lists."
    )


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8000, ge=0, le=65535, description="0 picks a free port.")
    max_request_body_bytes: PositiveInt = pydantic.Field(
        default=1 << 20, description="Larger request bodies are refused with 413 before they are parsed."
    )
    drain_grace_period_s: float = pydantic.Field(
        default=30.0, ge=0, le=3600, description="After SIGTERM, how long in-flight requests may take."
    )
    admin_token_file: str | None = pydantic.Field(
        default=None, description="File holding the admin bearer token; without it the admin API is closed."
    )
    log_format: Literal["text", "json"] = "text"
    retry_after_s: PositiveInt = pydantic.Field(default=1, description="`Retry-After` sent with 429 answers.")
    stream_interval_tokens: PositiveInt = pydantic.Field(
        default=1,
        le=64,
        description="Send a stream chunk every N tokens (the first at once), as SGLang's --stream-interval: "
        "fewer writes per token when the engine is fast and streams are many, at the cost of burstier deltas.",
    )
    engine_process: bool = pydantic.Field(
        default=True,
        description="Run the engine core (scheduler and model) in its own process, as vLLM v1 does, so HTTP "
        "work never competes with the model for Python's GIL. Off: a thread of the server process (starts "
        "faster; throughput drops at high token rates).",
    )


class BatchingLimits(_Model):
    """Engine limits; `max_batch_size` and `max_batch_tokens` may be changed live (PUT /admin/config)."""

    max_batch_size: PositiveInt = pydantic.Field(default=32, description="Sequences running at once.")
    max_batch_tokens: PositiveInt = pydantic.Field(
        default=2048, description="Tokens per engine step (prefill chunks and decodes together)."
    )
    max_kv_tokens: PositiveInt | None = pydantic.Field(
        default=None, description="KV-cache capacity in tokens; default: what the device memory allows."
    )
    max_queue_len: PositiveInt = pydantic.Field(
        default=256, description="Waiting requests (all classes) before new ones get 429."
    )

    @pydantic.model_validator(mode="after")
    def _tokens_cover_batch(self) -> BatchingLimits:
        # Every running sequence must be able to decode in every step (vLLM enforces the same rule).
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"maxBatchTokens ({self.max_batch_tokens}) must be >= maxBatchSize ({self.max_batch_size})"
            )
        return self


class QoSClass(_Model):
    name: str = pydantic.Field(description="Lowercase letters, digits, '-' and '_'; at most 32 characters.")
    priority: int = pydantic.Field(default=0, ge=-1000, le=1000, description="Lower runs sooner (vLLM semantics).")
    weight: float = pydantic.Field(default=1.0, gt=0, le=1000, description="Fair-share weight.")
    queue_limit: PositiveInt | None = pydantic.Field(
        default=None, description="Waiting requests of this class before new ones get 429."
    )
    sheddable: bool = pydantic.Field(default=False, description="May be refused first when SLOs are at risk.")
    ttft_target_s: float | None = pydantic.Field(default=None, gt=0, description="Time-to-first-token SLO.")
    tpot_target_s: float | None = pydantic.Field(default=None, gt=0, description="Time-per-output-token SLO.")

    @pydantic.field_validator("name")
    @classmethod
    def _label_safe(cls, value: str) -> str:
        if not _CLASS_NAME.match(value):
            raise ValueError(f"{value!r} is not a valid class name (lowercase letters, digits, '-', '_'; <= 32)")
        return value


class SheddingSettings(_Model):
    """When the runtime refuses (429) new requests of sheddable classes before higher classes miss their SLO.

    A sheddable request is refused while any protected class (not sheddable, with a TTFT target) is under
    pressure: its oldest waiting request has waited, or its recent TTFT p90 has reached, `ttftFraction`
    of its target; or while the whole queue holds `queueFraction` of `batching.maxQueueLen`.
    """

    enabled: bool = pydantic.Field(default=True, description="Shed sheddable classes under SLO pressure.")
    ttft_fraction: float = pydantic.Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of a protected class's TTFT target at which sheddable requests are refused: "
        "early, because a shed only helps once the running requests it would have joined have finished.",
    )
    queue_fraction: float = pydantic.Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction of batching.maxQueueLen from which sheddable requests are refused.",
    )
    window_s: float = pydantic.Field(
        default=5.0,
        gt=0,
        le=600,
        description="How far back the recent TTFT of each class is taken (a slow first token keeps sheddable "
        "classes out this long).",
    )


class QoSSettings(_Model):
    classes: list[QoSClass] = pydantic.Field(
        default_factory=lambda: [QoSClass(name="default")],
        min_length=1,
        description="Traffic classes, each with a priority, weight, queue limit and SLO targets.",
    )
    default_class: str = "default"
    allow_class_header: bool = pydantic.Field(
        default=False,
        description=f"Let clients pick their class with `{contract.HEADER_QOS_CLASS}` or the "
        f"`{contract.FIELD_QOS_CLASS}` body field. Off: the class comes from the API key only.",
    )
    api_keys_file: str | None = pydantic.Field(
        default=None, description="YAML mapping `api key -> class name` (a mounted Secret in production)."
    )
    require_api_key: bool = pydantic.Field(
        default=False, description="Refuse (401) requests whose key is not in the api keys file."
    )
    policy: Literal["priority", "fifo"] = pydantic.Field(
        default=contract.QOS_POLICY_PRIORITY,
        description="`priority`: classes ordered by priority, queue limits per class, sheddable classes shed "
        "under SLO pressure. `fifo`: the plain batcher, for comparison: arrival order, the global queue bound only.",
    )
    priority_aging_s: float | None = pydantic.Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A waiting request gains one priority level per this many seconds of waiting, so a lower "
        "class is never starved (null: strict priority). Long beside the TTFT targets on purpose: a backlog of "
        "a lower class that outlives a scale-out would otherwise take the turns of fresh requests of the class "
        "above it (at 5 s, critical's p90 reached 3 to 7 s behind aged standard requests while new replicas "
        "started). Read at start (the engine's scheduler).",
    )
    shedding: SheddingSettings = SheddingSettings()
    shed_classes: list[str] = pydantic.Field(
        default_factory=list,
        description="Sheddable classes refused outright (429), as the operator pushes them at max replicas; "
        "may be changed live (PUT /admin/config).",
    )

    @pydantic.model_validator(mode="after")
    def _classes_consistent(self) -> QoSSettings:
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate class names: {', '.join(duplicates)}")
        if self.default_class not in names:
            raise ValueError(f"defaultClass {self.default_class!r} is not one of the classes ({', '.join(names)})")
        if self.require_api_key and not self.api_keys_file:
            raise ValueError("requireApiKey needs apiKeysFile")
        problem = shed_classes_problem(self.shed_classes, self.classes)
        if problem:
            raise ValueError(f"shedClasses: {problem}")
        return self

    def by_name(self) -> dict[str, QoSClass]:
        return {c.name: c for c in self.classes}


def shed_classes_problem(names: list[str], classes: list[QoSClass]) -> str | None:
    """Why `names` cannot be shed (unknown, not sheddable or repeated), or None when they can."""
    by_name = {c.name: c for c in classes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        return f"unknown classes {', '.join(repr(n)[:40] for n in unknown[:8])}; one of: {', '.join(by_name)}"
    protected = [n for n in names if not by_name[n].sheddable]
    if protected:
        return f"{', '.join(protected)} not sheddable: only sheddable classes may be shed"
    if len(set(names)) != len(names):
        return "a class is named twice"
    return None


class PrefixCacheSettings(_Model):
    """KV of shared prompt prefixes (full 16-token blocks) reused across requests; `--no-prefix-cache` turns
    it off. Greedy output is identical with and without it."""

    enabled: bool = True
    max_tokens: PositiveInt | None = pydantic.Field(default=None, description="Bound on cached prefix tokens.")


class ResponseCacheSettings(_Model):
    """Exact repeats of deterministic requests (temperature 0 or a seed) served from memory; may be
    changed live (PUT /admin/config), which empties the cache."""

    enabled: bool = pydantic.Field(default=True, description="Off: every request is computed.")
    max_entries: PositiveInt = pydantic.Field(default=1024, description="Responses kept, least recently used out.")
    max_bytes: PositiveInt = pydantic.Field(default=64 << 20, description="Bound on the cached text, in bytes.")
    ttl_s: float = pydantic.Field(default=300.0, gt=0, description="How long a cached response may be served.")


class CachingSettings(_Model):
    prefix_cache: PrefixCacheSettings = PrefixCacheSettings()
    response_cache: ResponseCacheSettings = ResponseCacheSettings()


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}


def parse_bytes(value: int | str) -> int:
    """Bytes from an integer or a Kubernetes quantity string (`512Mi`, `2Gi`, `1.5G`)."""
    if isinstance(value, bool):
        raise ValueError(f"expected bytes (an integer or a quantity such as 512Mi), got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _QUANTITY.match(value.strip())
        if match is None:
            raise ValueError(
                f"{value!r} is not a byte quantity (an integer, or a number with Ki, Mi, Gi, Ti, K, M, G, T)"
            )
        number = int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)])
    if number < 1:
        raise ValueError(f"must be at least 1 byte, got {value!r}")
    return number


class KVCacheSettings(_Model):
    """The KV memory pool: allocated once at start, in fixed-size blocks, and never grown.

    Its size is `memory` when given (bytes on any device), else on a GPU `gpuMemoryUtilization` of the
    device's memory less the weights and a reserve for activations (vLLM's rule); on the CPU without
    `memory`, `batching.maxKvTokens` tokens when set, else a default budget.
    """

    memory: int | str | None = pydantic.Field(
        default=None,
        description="Pool size: bytes, or a quantity such as `512Mi` or `4Gi`. Unset: see gpuMemoryUtilization.",
    )
    gpu_memory_utilization: float = pydantic.Field(
        default=0.9,
        gt=0,
        le=1,
        description="On a GPU without `memory`: the fraction of device memory this process may use for weights, "
        "activations and the KV pool together.",
    )
    block_size: PositiveInt = pydantic.Field(
        default=16, le=256, description="Tokens per KV block (the unit of allocation and of prefix sharing)."
    )

    @pydantic.field_validator("memory")
    @classmethod
    def _bytes(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_bytes(self.memory)


class RuntimeConfig(_Model):
    schema_version: Literal["v1"] = pydantic.Field(default=contract.CONFIG_SCHEMA_VERSION)
    model: ModelSource = ModelSource()
    server: ServerSettings = ServerSettings()
    batching: BatchingLimits = BatchingLimits()
    qos: QoSSettings = QoSSettings()
    caching: CachingSettings = CachingSettings()
    kv_cache: KVCacheSettings = KVCacheSettings()

    @property
    def served_model_name(self) -> str:
        return self.model.served_model_name or _default_model_name(self.model.source)

    def with_limits(self, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None) -> RuntimeConfig:
        """A copy with new batch limits, validated as a whole (so the pair stays consistent)."""
        batching = self.batching.model_dump()
        if max_batch_size is not None:
            batching["max_batch_size"] = max_batch_size
        if max_batch_tokens is not None:
            batching["max_batch_tokens"] = max_batch_tokens
        return self.model_copy(update={"batching": _validate(BatchingLimits, batching, prefix="batching")})


def _default_model_name(source: str) -> str:
    if source.startswith("builtin:"):
        return source.split(":", 1)[1] or source
    return source.rstrip("/").rsplit("/", 1)[-1] if "/" in source and pathlib.Path(source).is_absolute() else source


def format_validation_error(error: pydantic.ValidationError, *, prefix: str = "") -> str:
    """`field.path: message` lines, camelCase, as a user wrote them."""
    return "; ".join(f"{_where(item, prefix)}: {item['msg']}" for item in error.errors())


def _where(item: Any, prefix: str) -> str:
    loc = ".".join(_camel(str(part)) for part in item["loc"])
    return ".".join(p for p in (prefix, loc) if p) or "config"


def _camel(part: str) -> str:
    return alias_generators.to_camel(part) if "_" in part else part


def _validate(model: type[_M], data: Any, *, prefix: str = "") -> _M:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        first = _where(error.errors()[0], prefix) if error.errors() else None
        raise ConfigError(format_validation_error(error, prefix=prefix), field=first) from None


def parse_config(data: Any) -> RuntimeConfig:
    """Validate a mapping (e.g. parsed YAML). A missing `schemaVersion` means the current one."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    version = data.get(contract.CONFIG_SCHEMA_VERSION_KEY, data.get("schema_version", contract.CONFIG_SCHEMA_VERSION))
    if version != contract.CONFIG_SCHEMA_VERSION:
        raise ConfigError(
            f"{contract.CONFIG_SCHEMA_VERSION_KEY}: unsupported version {version!r}; "
            f"this runtime reads {contract.CONFIG_SCHEMA_VERSION!r}"
        )
    return _validate(RuntimeConfig, data)


def load_config(path: str | pathlib.Path) -> RuntimeConfig:
    """Read and validate a YAML (or JSON) file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data)


def dump_config(config: RuntimeConfig) -> dict[str, Any]:
    """camelCase mapping with `schemaVersion`, as written to a ConfigMap; round-trips through parse_config."""
    return config.model_dump(mode="json", by_alias=True)


def load_api_keys(path: str | pathlib.Path, *, classes: set[str]) -> dict[str, str]:
    """Read a YAML mapping `key -> class`; every class must exist. Keys are secrets: never log them."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"qos.apiKeysFile: cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"qos.apiKeysFile: {path} must be a mapping of API key -> class name")
    unknown = sorted({v for v in data.values() if v not in classes})
    if unknown:
        raise ConfigError(f"qos.apiKeysFile: unknown classes {', '.join(unknown)}")
    return dict(data)
