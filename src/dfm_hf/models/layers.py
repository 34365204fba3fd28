"""The layers of the DFM denoiser: RMSNorm, the time embedding, the gated MLP, attention through transformers'
attention interface, and the pre-norm transformer block (with optional adaLN-Zero time conditioning).

Imports only ``torch``, ``transformers`` and sibling files: it travels with ``modeling_dfm.py`` as remote code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dfm import DFMConfig
from .masking import padding_positions, slice_visibility
from .moe import DFMSparseMoE, is_moe_layer
from .rotary import apply_rotary
from .validation import check_inputs, check_shift_sources, prepare_logits_to_keep, prepare_position_ids

#: The time ``t`` in ``[0, 1]`` is scaled by this before its sinusoidal embedding (DiT's convention for 1000 steps).
TIME_EMBEDDING_SCALE = 1000.0
#: Width of the sinusoidal time embedding fed to the time MLP.
TIME_FREQUENCY_SIZE = 256


class DFMRMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (statistics in float32): ``w * x / sqrt(mean(x^2) + eps)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DFMZeroLinear(nn.Linear):
    """A linear layer initialised to zero (adaLN-Zero modulation: the block starts as the identity)."""


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(batch, kv_heads, len, head_dim) -> (batch, kv_heads * n_rep, len, head_dim)``: key/value head ``h`` serves
    query heads ``h * n_rep .. (h + 1) * n_rep - 1`` (grouped-query attention)."""
    if n_rep == 1:
        return x
    batch, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim).reshape(batch, kv_heads * n_rep, length, -1)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = TIME_EMBEDDING_SCALE
) -> torch.Tensor:
    """Sinusoidal embedding ``(batch, dim)``, ``[cos(scale * t * f_j), sin(scale * t * f_j)]`` with
    ``f_j = max_period^(-j / (dim / 2))`` (default ``scale``: ``t`` in ``[0, 1]`` seen as 1000 steps), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = (timesteps.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DFMTimestepEmbedder(nn.Module):
    """``t -> MLP(sinusoid(1000 t))``: the conditioning vector of the adaLN modulations."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQUENCY_SIZE, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, TIME_FREQUENCY_SIZE).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class DFMMLP(nn.Module):
    """Gated SiLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, ``intermediate_size`` wide (default:
    ``config.intermediate_size``; an expert of the MoE layer has its own width)."""

    def __init__(self, config: DFMConfig, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scaling + mask) v`` written out: output ``(batch, len, heads, head_dim)`` and the attention
    probabilities ``(batch, heads, len, key_len)``; ``attention_mask`` is additive (or None)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_implementation(config: DFMConfig, output_attentions: bool) -> str:
    """The attention function a forward uses: ``config._attn_implementation``, or ``"eager"`` when the attention
    probabilities are asked for (the fused kernels do not return them)."""
    return "eager" if output_attentions else (config._attn_implementation or "sdpa")


class DFMAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings and grouped-query key/value heads.

    ``softmax(q k^T / sqrt(head_dim) + mask) v`` over all keys (bidirectional unless the mask says otherwise), run by
    the function of transformers' attention interface that ``config._attn_implementation`` names. Biases on
    ``q_proj`` / ``k_proj`` / ``v_proj`` with ``config.attention_bias``; never on ``o_proj``. With
    ``config.qk_norm``, ``q_norm`` / ``k_norm`` (RMS norms over ``head_dim``) act on each head before the rotary.
    """

    def __init__(self, config: DFMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = DFMRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = DFMRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[Any] = None,
        past_key_values: Optional[Cache] = None,
        cache_kwargs: Optional[dict[str, Any]] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output ``(batch, n, hidden)`` and, with ``output_attentions``, the probabilities.

        With ``past_key_values``: a full forward (``cache_kwargs`` None) stores this layer's keys and values (after
        rotary) when the layer holds none yet; a partial forward (``cache_kwargs={"position_ids": (batch, n)}``)
        writes them at those positions and attends over every cached entry.
        """
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_values is not None:
            if cache_kwargs is not None:
                key, value = past_key_values.update(key, value, self.layer_idx, cache_kwargs)
            elif past_key_values.get_seq_length(self.layer_idx) == 0:  # once: a checkpointed layer runs twice
                past_key_values.update(key, value, self.layer_idx)
        implementation = attention_implementation(self.config, output_attentions)
        interface: Callable = eager_attention_forward
        if implementation != "eager":
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        out = self.o_proj(out.reshape(batch, seq_len, -1))
        return out, (weights if output_attentions else None)


def shift_sources(
    input_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    attention_mask: Optional[Any],
    block_size: Optional[int],
    logits_to_keep: Any,
    config: DFMConfig,
) -> Optional[torch.Tensor]:
    """Under ``logits_shift``, the slice entry each query's token is predicted from: the one at position
    ``max(p - 1, 0)``, as a long ``(batch, len)`` index, or None for the plain shift by one along ``len``.

    Full attention without ``position_ids``: the positions are the sequence indices (None). With ``position_ids``
    ``(batch, len)`` (a cached partial forward) or a ``block_size`` (default positions: the row's, from a 2-D
    ``attention_mask``), the source is found by a position lookup among the slice's own entries: the first entry at
    ``p - 1``; for a block model, among the entries the query attends to (so a left-padded row reads a real token,
    and a block-diffusion training row ``[x_t | x_0]`` predicts the first token of a noisy block from the clean half,
    as generation does). A source missing there (e.g. the previous block's last position of a block model, held in
    the cache as keys and values only) cannot be read: a query that ``logits_to_keep`` selects without it raises
    ``ValueError`` (:func:`~.validation.check_shift_sources`, one host sync), before the forward runs; any other
    query falls back to the slice's first entry (its logits are not ``p_{1|t}``: with the default ``logits_to_keep``,
    every position, nothing is checked).
    """
    batch, seq_len = check_inputs(input_ids, inputs_embeds, config.hidden_size, config.max_position_embeddings)
    device = (input_ids if input_ids is not None else inputs_embeds).device
    if position_ids is not None:
        position_ids = prepare_position_ids(position_ids, batch, seq_len, device)
    visible = None
    if block_size is not None:
        if position_ids is None:
            position_ids = padding_positions(attention_mask, seq_len)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=device).expand(batch, -1)
        visible = slice_visibility(attention_mask, position_ids, block_size)
    if position_ids is None:
        return None
    target = (position_ids - 1).clamp_min(0)
    match = position_ids[:, None, :] == target[:, :, None]  # [b, j, k]: slice entry k holds query j's source
    if visible is not None:
        match = match & visible
    keep = prepare_logits_to_keep(logits_to_keep, batch, seq_len, position_ids.device)
    if keep is not None:
        check_shift_sources(match.any(-1), keep, position_ids, visible is not None)
    return match.to(torch.uint8).argmax(dim=-1)


def shift_hidden_states(hidden_states: torch.Tensor, sources: Optional[torch.Tensor]) -> torch.Tensor:
    """The hidden states read by the head under ``logits_shift``: at the :func:`shift_sources` entries, or (None)
    shifted by one along ``len`` (position 0 reads itself)."""
    if sources is None:
        return torch.cat([hidden_states[:, :1], hidden_states[:, :-1]], dim=1)
    index = sources.to(hidden_states.device)[..., None].expand(-1, -1, hidden_states.shape[-1])
    return hidden_states.gather(1, index)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (``shift``, ``scale``: one row per batch row)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DFMTransformerLayer(GradientCheckpointingLayer):
    """Pre-norm block ``x + attn(norm(x))``, ``x + mlp(norm(x))``; with time conditioning, adaLN-Zero (DiT):
    ``x + gate * sublayer(norm(x) * (1 + scale) + shift)`` with ``(shift, scale, gate)`` from ``t``."""

    def __init__(self, config: DFMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DFMAttention(config, layer_idx)
        self.mlp = DFMSparseMoE(config, DFMMLP) if is_moe_layer(config, layer_idx) else DFMMLP(config)
        self.input_layernorm = DFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.adaln_modulation = (
            DFMZeroLinear(config.hidden_size, 6 * config.hidden_size) if config.time_conditioning else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        time_condition: Optional[torch.Tensor] = None,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[Any] = None,
        past_key_values: Optional[Cache] = None,
        cache_kwargs: Optional[dict[str, Any]] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(hidden_states, attention probabilities or None)``; see :meth:`DFMAttention.forward`."""
        attention = dict(
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_kwargs=cache_kwargs,
            output_attentions=output_attentions,
        )
        if self.adaln_modulation is None:
            attn_out, weights = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, **attention)
            hidden_states = hidden_states + self.dropout(attn_out)
            hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
            return hidden_states, weights
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln_modulation(time_condition).chunk(6, dim=-1)
        normed = modulate(self.input_layernorm(hidden_states), shift_a, scale_a)
        attn_out, weights = self.self_attn(normed, position_embeddings, **attention)
        hidden_states = hidden_states + gate_a.unsqueeze(1) * self.dropout(attn_out)
        mlp_out = self.mlp(modulate(self.post_attention_layernorm(hidden_states), shift_m, scale_m))
        hidden_states = hidden_states + gate_m.unsqueeze(1) * self.dropout(mlp_out)
        return hidden_states, weights
