"""`fleetlm-dev bench load`: load time and peak host memory, FleetLM's loader against plain `from_pretrained`.

Each load runs in a fresh Python process so its numbers are its own. The child first imports torch,
transformers and the checkpoint's config and model classes (code, the same for both loaders), then loads
the tokenizer once (the tokenizers library's one-time cost, about 55 MB, is code like the
rest; `--cold-tokenizer` leaves it in the measured peak), resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`), loads model and tokenizer, reads every weight once (a memory-mapped model is
not resident until it is touched, and would page in at the first request), and reports the load time,
the time until the weights are resident ("ready") and the peak resident set above the baseline (VmHWM -
VmRSS before). The two loaders alternate (A B A B ...) so that noise from a shared machine falls on
both; the report gives the median of each and the ratios, with peak RSS also as a multiple of the loaded
weight bytes. Linux only (procfs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

LOADERS = ("fleetlm", "from_pretrained")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} is not in /proc/self/status")


def _child(which: str, model: str, dtype_name: str, device: str, *, warm_tokenizer: bool) -> dict[str, float]:
    """Runs in the measured process: warm the code, reset the peak, load, report."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from fleetlm_runtime.models import loader  # noqa: PLC0415

    dtype = loader.resolve_dtype(dtype_name, torch.device(device))
    config = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling code
    del model_class
    if warm_tokenizer:
        # The tokenizers library's one-time cost (its Rust code and tables paged in, the tokenizer classes
        # imported: about 55 MB on SmolLM2) is code, not weights, and the same for both loaders: paid here,
        # before the baseline. The measured load still builds its own tokenizer, whose data counts.
        transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
        gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is the load's own
    baseline = _status_bytes("VmRSS")
    started = time.perf_counter()
    if which == "fleetlm":
        loaded = loader.load(model, dtype=dtype, device=device)
        net: torch.nn.Module = loaded.model
    else:
        # As a Module: PreTrainedModel.to is typed through functools.wraps(Module.to), which mypy cannot bind.
        hf: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
        )
        net = hf.to(device)
        transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    # Read every weight once: a memory-mapped model that was never touched is not resident yet and would
    # page in (and count) at the first request. The peak below is the model ready to serve.
    with torch.no_grad():
        for p in net.parameters():
            p.sum()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ready = time.perf_counter() - started
    weight_bytes = sum(
        {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in net.parameters()}.values()
    )
    return {
        "seconds": seconds,
        "ready_seconds": ready,
        "peak_rss_bytes": _status_bytes("VmHWM") - baseline,
        "end_rss_bytes": _status_bytes("VmRSS") - baseline,
        "weight_bytes": weight_bytes,
    }


def _same_code_env() -> dict[str, str]:
    """The child imports the same fleetlm packages as this process (a worktree on PYTHONPATH, or the install)."""
    import fleetlm_dev  # noqa: PLC0415
    import fleetlm_runtime  # noqa: PLC0415

    roots = [str(pathlib.Path(next(iter(m.__path__))).resolve().parent) for m in (fleetlm_runtime, fleetlm_dev)]
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*roots, *([existing] if existing else [])])}


def measure(
    which: str, model: pathlib.Path, *, dtype: str = "float32", device: str = "cpu", warm_tokenizer: bool = True
) -> dict[str, float]:
    """One load by `which` in a fresh process."""
    command = [
        sys.executable,
        "-m",
        "fleetlm_dev.bench_load",
        "--child",
        which,
        "--model",
        str(model),
        "--dtype",
        dtype,
        "--device",
        device,
        *([] if warm_tokenizer else ["--cold-tokenizer"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, env=_same_code_env())
    if done.returncode != 0:
        raise RuntimeError(f"{which} load failed ({done.returncode}): {done.stderr[-3000:]}")
    measured: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


def compare(
    model: pathlib.Path, *, dtype: str, device: str, repeats: int, warm_tokenizer: bool = True
) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in LOADERS}
    for _ in range(repeats):
        for name in LOADERS:  # interleaved: both see the same machine load
            runs[name].append(measure(name, model, dtype=dtype, device=device, warm_tokenizer=warm_tokenizer))
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("seconds", "ready_seconds", "peak_rss_bytes", "end_rss_bytes", "weight_bytes")
        }
        summary[name]["peak_over_weights"] = summary[name]["peak_rss_bytes"] / summary[name]["weight_bytes"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetlm-dev bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the converted SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader, interleaved")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--cold-tokenizer",
        action="store_true",
        help="count the tokenizers library's one-time cost in the peak (default: paid before the baseline)",
    )
    parser.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(
            json.dumps(_child(args.child, args.model, args.dtype, args.device, warm_tokenizer=not args.cold_tokenizer))
        )
        return 0
    if args.model is None:
        from fleetlm_dev import checkpoints  # noqa: PLC0415

        args.model = str(checkpoints.ensure().single)
    summary = compare(
        pathlib.Path(args.model),
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        warm_tokenizer=not args.cold_tokenizer,
    )
    if args.json:
        print(json.dumps(summary))
        return 0
    ours, theirs = summary["fleetlm"], summary["from_pretrained"]
    print(
        f"model {args.model}  dtype {args.dtype}  device {args.device}  (median of {args.repeats}, interleaved;"
        " model + tokenizer, imports excluded; tokenizers library's one-time cost "
        f"{'included' if args.cold_tokenizer else 'excluded'})"
    )
    print(f"{'loader':<16} {'load s':>7} {'ready s':>8} {'peak RSS MB':>12} {'peak/weights':>13} {'weights MB':>11}")
    for name, row in summary.items():
        print(
            f"{name:<16} {row['seconds']:>7.2f} {row['ready_seconds']:>8.2f} {row['peak_rss_bytes'] / 1e6:>12.1f} "
            f"{row['peak_over_weights']:>12.2f}x {row['weight_bytes'] / 1e6:>11.1f}"
        )
    print(
        f"fleetlm / from_pretrained: load {ours['seconds'] / theirs['seconds']:.2f}x, "
        f"ready {ours['ready_seconds'] / theirs['ready_seconds']:.2f}x, "
        f"peak RSS {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
