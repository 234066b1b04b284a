"""An evaluation client no one here wrote: EleutherAI's `lm-eval` scores the server as it scores the model.

A multiple-choice task whose data the test writes locally (no hub) is run twice by `lm-eval`: once with its
`hf` model on the checkpoint directly, once with its `local-completions` model against a real
`fleetlm-runtime` process serving the same checkpoint (prompts sent as token ids in OpenAI's batch form, four
per request, two requests at a time, scored by echo + prompt logprobs). Accuracy is equal and every choice's
log-likelihood agrees, so anyone's harness gives the numbers the model would give.

lm-eval runs in an overlay venv (see fleetlm_dev.lm_eval_env for why it cannot share the project's).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
import yaml

from fleetlm_dev import checkpoints, lm_eval_env
from fleetlm_dev.testing import free_port, stop_process, wait_for

pytestmark = pytest.mark.slow

TASK = "fleetlm_facts"
# (question, choices, index of the right one): facts a 135M instruct model mostly knows, some it may not.
FACTS = [
    ("The capital of France is", [" Paris", " London", " Berlin", " Madrid"], 0),
    ("The largest planet in the solar system is", [" Mars", " Jupiter", " Venus", " Mercury"], 1),
    ("Water freezes at", [" 100 degrees Celsius", " 50 degrees Celsius", " 0 degrees Celsius"], 2),
    ("The chemical symbol for gold is", [" Ag", " Au", " Fe", " Pb"], 1),
    ("The first president of the United States was", [" Abraham Lincoln", " George Washington", " John Adams"], 1),
    ("The opposite of hot is", [" cold", " warm", " loud", " fast"], 0),
    ("A week has", [" five days", " seven days", " ten days"], 1),
    ("The capital of Japan is", [" Beijing", " Seoul", " Tokyo", " Bangkok"], 2),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The sun rises in the", [" west", " north", " east", " south"], 2),
    ("The author of Romeo and Juliet is", [" Charles Dickens", " William Shakespeare", " Mark Twain"], 1),
    ("Two plus two equals", [" three", " four", " five", " six"], 1),
    ("The capital of Italy is", [" Rome", " Vienna", " Athens", " Lisbon"], 0),
    ("Plants take in carbon dioxide and release", [" oxygen", " helium", " neon", " argon"], 0),
    ("The longest river in Africa is the", [" Amazon", " Nile", " Danube", " Thames"], 1),
    ("The planet known as the Red Planet is", [" Venus", " Saturn", " Mars", " Neptune"], 2),
    ("Ice is the solid form of", [" water", " iron", " salt", " sand"], 0),
    ("The capital of Germany is", [" Munich", " Hamburg", " Berlin", " Frankfurt"], 2),
    ("A triangle has", [" three sides", " four sides", " six sides"], 0),
    ("The currency of the United Kingdom is the", [" euro", " pound", " yen", " dollar"], 1),
]


def _write_task(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "facts.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in FACTS))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    (directory / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    return directory


def _lm_eval(python: pathlib.Path, task_dir: pathlib.Path, out: pathlib.Path, *args: str) -> dict[str, Any]:
    """Run the lm-eval CLI; return {"acc": ..., "logliks": {doc_id: [per-choice log-likelihood]}}."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf-home"),  # nothing written to the user's cache, nothing fetched
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [str(python), "-m", "lm_eval", "--tasks", TASK, "--include_path", str(task_dir),
               "--output_path", str(out), "--log_samples", *args]  # fmt: skip
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"lm-eval failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return {
        "acc": results["results"][TASK]["acc,none"],
        "logliks": {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples},
    }


def _ready(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=1.0) as resp:
            return resp.status == 200 or None
    except OSError:
        return None


def test_lm_eval_scores_the_server_as_it_scores_the_hf_model(
    real_checkpoint: checkpoints.Checkpoint, tmp_path: pathlib.Path
) -> None:
    python = lm_eval_env.ensure()
    task_dir = _write_task(tmp_path / "task")
    model_dir = str(real_checkpoint.single)
    direct = _lm_eval(python, task_dir, tmp_path / "hf", "--model", "hf", "--device", "cpu",
                      "--model_args", f"pretrained={model_dir},dtype=float32")  # fmt: skip

    config = {
        "schemaVersion": "v1",
        "model": {"source": model_dir, "dtype": "float32", "maxModelLen": 1024, "servedModelName": "smollm2"},
        "batching": {"maxBatchSize": 8, "maxBatchTokens": 512},
        "server": {"engineProcess": True},
    }
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "runtime.log").open("wb")
    server = subprocess.Popen(
        [str(pathlib.Path(sys.executable).with_name("fleetlm-runtime")), "--config", str(tmp_path / "runtime.yaml"),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        wait_for("the runtime to be ready", lambda: _ready(url), timeout_s=180)
        served = _lm_eval(python, task_dir, tmp_path / "served", "--model", "local-completions", "--batch_size", "4",
                          "--model_args", f"model=smollm2,base_url={url}/v1/completions,tokenizer={model_dir},"
                                          "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1")  # fmt: skip
    finally:
        stop_process(server)
        log.close()

    print(f"lm-eval acc: hf {direct['acc']:.3f}, server {served['acc']:.3f} over {len(FACTS)} questions")
    assert direct["acc"] >= 0.5, direct  # the task means something: the model knows most of these facts
    assert served["acc"] == direct["acc"]
    assert served["logliks"].keys() == direct["logliks"].keys() == set(range(len(FACTS)))
    worst = max(
        abs(a - b) for d in direct["logliks"] for a, b in zip(direct["logliks"][d], served["logliks"][d], strict=True)
    )
    print(f"largest per-choice log-likelihood difference: {worst:.2e}")
    assert worst < 1e-3
