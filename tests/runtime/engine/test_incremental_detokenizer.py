"""Incremental detokenization: streamed deltas add up to a full decode; stop strings are held back."""

from __future__ import annotations

import transformers

from fleetlm_runtime.engine import detokenizer


def stream(tok: transformers.PreTrainedTokenizerBase, ids: list[int], **kwargs: object) -> tuple[list[str], str | None]:
    detok = detokenizer.IncrementalDetokenizer(tok, prompt_token_ids=[], **kwargs)  # type: ignore[arg-type]
    deltas: list[str] = []
    for i, token in enumerate(ids):
        delta, stop = detok.step(token, finished=i == len(ids) - 1)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    return deltas, None


def test_deltas_add_up_to_the_full_decode_across_multibyte_characters(
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    text = "Hello wörld! 🙂 naïve café — über 日本"
    ids = tokenizer(text).input_ids
    deltas, stop = stream(tokenizer, ids)
    assert stop is None
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert "" in deltas  # some tokens end mid-character and produce nothing until the next one


def test_special_tokens_are_skipped(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    ids = tokenizer("<|im_start|>hi<|im_end|>", add_special_tokens=False).input_ids
    assert "".join(stream(tokenizer, ids)[0]) == "hi"


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    ids = tokenizer("The scheduler decides which requests run.").input_ids
    deltas, stop = stream(tokenizer, ids, stop=("requests", "zzz"))
    assert stop == "requests"
    assert "".join(deltas) == "The scheduler decides which "


def test_no_character_of_a_matching_stop_string_is_ever_streamed(
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    ids = tokenizer("one two three four").input_ids
    deltas, stop = stream(tokenizer, ids, stop=("three",))
    assert stop == "three"
    shown = ""
    for delta in deltas:
        shown += delta
        assert "one two ".startswith(shown)  # a prefix of the final text at every step: nothing retracted
    assert shown == "one two "


def test_without_a_match_held_back_text_is_flushed_at_the_end(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    ids = tokenizer("one two three four").input_ids
    deltas, stop = stream(tokenizer, ids, stop=("three fix",))
    assert stop is None
    assert deltas[-1] != "" and "".join(deltas) == "one two three four"


def test_the_earliest_stop_string_wins_and_can_be_kept(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    ids = tokenizer("alpha beta gamma").input_ids
    deltas, stop = stream(tokenizer, ids, stop=("gamma", "beta"), include_stop_str_in_output=True)
    assert (stop, "".join(deltas)) == ("beta", "alpha beta")
