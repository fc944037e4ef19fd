"""LongRoPE ("su") scaling chosen per sample, from the sample's own length.

Phi-3.5-vision rotates with short factors while a sequence fits `original_max_position_embeddings` and with
long factors past it. The original model, and transformers' Phi-3, decide once per forward from the largest
position of the whole batch, so a short sample batched with a long one is computed with the long factors:
its result would depend on its batch-mates. Here every token takes the factors its own sample would get
alone (the original model at batch 1):

- a sample is a run of consecutive positions (0, 1, 2, ...) within a row: a padded row (positions from the
  attention mask), or one of the samples of a packed row (positions restarting at 0);
- its length is its largest position + 1; during generation with a cache, the current token's position + 1
  (the row's own length as it grows), as at batch 1.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding


def position_runs(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) positions -> (B, L) index of the run each token belongs to, numbered across the batch. A run is a
    stretch of positions increasing by one (a sample); a new one starts at every row and wherever they do not."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return (starts.flatten().cumsum(0) - 1).view_as(position_ids)


def sample_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) positions -> (B, L) length of the sample each token belongs to: its run's last position + 1."""
    run = position_runs(position_ids).flatten()
    last = torch.zeros(int(run[-1]) + 1, dtype=position_ids.dtype, device=position_ids.device)
    last = last.scatter_reduce(0, run, position_ids.flatten(), reduce="amax", include_self=False)
    return (last[run] + 1).view_as(position_ids)


class PerSampleRotaryEmbedding(Phi3RotaryEmbedding):
    """transformers' Phi-3 rotary embedding, with the LongRoPE factor set chosen per sample instead of per batch.
    Other rope types are unchanged."""

    def __init__(self, config):
        super().__init__(config)
        if self.rope_type == "longrope":
            self.long_inv_freq = torch.nn.Buffer(self._long_factor_frequencies(), persistent=False)

    def _long_factor_frequencies(self) -> torch.Tensor:
        frequencies, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, None, seq_len=self.original_max_position + 1)
        return frequencies

    @torch.no_grad()
    def init_long_inv_freq(self) -> None:
        """Fill the long-factor buffer (after loading, which creates buffers uninitialised, as `inv_freq`)."""
        if self.rope_type == "longrope":
            self.long_inv_freq.copy_(self._long_factor_frequencies())

    @property
    def original_max_position(self) -> int:
        return self.config.rope_parameters["original_max_position_embeddings"]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.rope_type != "longrope":
            return super().forward(x, position_ids)
        long_context = (sample_lengths(position_ids) > self.original_max_position)[..., None]
        # original_inv_freq holds the short factors (the buffer the per-batch update overwrites stays untouched)
        inv_freq = torch.where(long_context, self.long_inv_freq.float(), self.original_inv_freq.float())
        freqs = position_ids[..., None].float() * inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
