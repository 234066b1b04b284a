"""The per-step token mask of a batch's constrained rows: one bitmask tensor for the batch, one row per
sequence, filled by each row's matcher and applied in place to the logits of those rows only (xgrammar's
kernel: C++ on the CPU, Triton on a GPU). Unconstrained rows are never read or written."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar

from fleetlm_runtime.structured import grammar


class BatchMask:
    """A reusable bitmask buffer (CPU, int32), grown to the largest batch seen."""

    def __init__(self) -> None:
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[grammar.Matcher]) -> None:
        """Set to -inf the logits of every token the row's grammar does not allow next, for `rows` of
        `logits` [batch, vocab] (`matchers` aligned with `rows`)."""
        batch, vocab = logits.shape
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < batch or bitmask.shape[1] * 32 < vocab:
            bitmask = self._bitmask = xgrammar.allocate_token_bitmask(max(batch, 8), vocab)
        for row, matcher in zip(rows, matchers, strict=True):
            matcher.fill(bitmask, row)
        bitmask = bitmask[:batch]
        indices = list(rows)
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=indices)
            return
        if logits.device.type == "cpu":  # xgrammar's CPU kernel takes float32 only
            index = torch.tensor(indices)
            part = logits[index].float()
            xgrammar.apply_token_bitmask_inplace(part, bitmask[index], vocab_size=vocab)
            logits[index] = part.to(logits.dtype)
            return
        xgrammar.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab, indices=indices
        )
