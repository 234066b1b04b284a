"""Built-in models made in code at start: seeded random weights and a small trained tokenizer.

`builtin:tiny` (about 0.2M parameters) is the default for demos and tests; `builtin:small` (about 48M
parameters, same recipe) is what the engine benchmark uses to show behaviour on a model where compute,
not Python, dominates. Both are Llama-architecture models, so they exercise the same code path as real
checkpoints. Nothing is downloaded: the tokenizer is a byte-level BPE trained on the corpus below, which
takes a few tens of milliseconds, and training is deterministic, so every process gets the same ids.

The weights are random, so the text is gibberish; what matters is that it is *deterministic* and that
greedy decoding is numerically robust, because the engine's greedy output is tested token for token
against `model.generate()`, and a batched forward differs from an unbatched one by about 1e-7 (relative,
fp32). Scaling the output head would not help (the final RMSNorm makes argmax scale-invariant); what
matters is the gap between the two top logits relative to their spread. Over thousands of greedy steps
its minimum is about 1e-4 here, three orders of magnitude above that noise, and the larger init of the
tiny model keeps it from hitting EOS early, so equality tests cover long sequences. Use fp32 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|endoftext|>"  # GPT-2 convention: one token for bos, eos and padding in plain completion
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A few paragraphs of plain English (written for this project) so that BPE learns ordinary words and the
# tokenizer round-trips typical prompts in few tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving runtime turns prompts into tokens and tokens into text.
Large language models predict the next token from the tokens before it. Each step of decoding adds one token.
Continuous batching lets new requests join a running batch at every step instead of waiting for it to drain.
A request has a prompt, sampling parameters and a stream of generated tokens that ends with a finish reason.
The scheduler decides which requests run in each step. The runner executes the model. The sampler picks tokens.
Latency targets are written as time to first token and time per output token, measured at a percentile.
When the queue grows and the latency target slips, the operator adds replicas or lowers the batch limits.
Kubernetes runs the pods. The operator watches the metrics and writes the status of each service.
Hello world! How are you today? I am fine, thank you. What is the weather like? It is sunny and warm.
Once upon a time there was a small model that lived on a computer with two cores and no graphics card.
It answered questions about cats, dogs, birds, trees, rivers, mountains, numbers and the colours of the sky.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday.
Python is a programming language. def main(): print("hello") return 0. import torch. x = [1, 2, 3].
The user asked a question and the assistant wrote an answer. The system message sets the rules of the chat.
Please summarise the following text in one sentence. Translate this sentence into French. Explain why.
Memory, compute and bandwidth limit how fast a model runs. Caches keep keys and values for every layer.
A good engineer measures before optimising, writes tests that can fail, and keeps the hot loop small.
"""

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True, slots=True)
class BuiltinSpec:
    name: str
    vocab_size: int  # target size of the trained tokenizer (the model uses the exact trained size)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    seed: int
    initializer_range: float  # std of the seeded normal init


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        name="tiny",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        seed=1234,
        initializer_range=0.3,
    ),
    "small": BuiltinSpec(
        name="small",
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=15,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        seed=4321,
        initializer_range=0.02,
    ),
}


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def build_tokenizer(vocab_size: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (any text round-trips) trained on CORPUS, with a ChatML chat template."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_id(tokenizer: transformers.PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):  # one token in, one id out; the list form is for a list of tokens
        raise TypeError(f"the tokenizer mapped {token!r} to {token_id!r}, not one id")
    return token_id


def build(
    name: str, *, dtype: torch.dtype = torch.float32
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    """Build `builtin:<name>` (seeded, so every call returns identical weights)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {BUILTIN_PREFIX}{name}; choose one of {sorted(BUILTINS)}")
    spec = BUILTINS[name]
    tokenizer = build_tokenizer(spec.vocab_size)
    eos_ids = [_token_id(tokenizer, t) for t in (BOS_TOKEN, IM_END)]
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=eos_ids[0],
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
        # transformers' dataclass_transform signature omits the **kwargs its __init__ accepts.
        attn_implementation="sdpa",  # type: ignore[call-arg]
    )
    # Seed, build, then restore the global RNG: identical weights whatever ran before, no side effects.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=eos_ids[0], eos_token_id=eos_ids, pad_token_id=eos_ids[0]
    )
    model.config.name_or_path = f"{BUILTIN_PREFIX}{name}"
    # transformers wraps `to` in functools.wraps(nn.Module.to), whose typed signature keeps the unbound self.
    model.to(dtype=dtype).eval()  # type: ignore[call-arg]
    return model, tokenizer
