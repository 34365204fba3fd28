"""Discrete Flow Matching denoiser: a bidirectional transformer that predicts ``p_{1|t}(x1 | x_t)``.

Llama-style layering (config / attention / MLP / layer / model / head): pre-norm, RMSNorm, rotary position
embeddings, gated SiLU MLP, bidirectional attention (no causal mask unless one is passed as a 4-D mask), grouped-query
key/value heads, optional q/k/v biases, an LM head (tied to the input embeddings or not), an optional logit shift
(position ``i - 1`` predicts token ``i``), and optional adaLN-Zero time conditioning (DiT). That covers LLaDA,
Dream / DiffuCoder (Qwen2) and Llama / Mistral / Qwen2 causal LMs adapted to diffusion. An approximate key/value cache
(Fast-dLLM style prefix / dual caching) is supported through ``past_key_values`` + ``position_ids``.

This file is self-contained (it imports only ``torch``, ``transformers`` and the sibling configuration file): it is
copied next to the weights by ``save_pretrained`` and loaded as remote code with ``trust_remote_code=True``. The
generic DFM losses (given the jump rates) live here for the same reason; ``dfm_hf.training.losses`` computes the rates
from a kappa schedule and calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_dfm import DFMConfig

IGNORE_INDEX = -100
TIME_EMBEDDING_SCALE = 1000.0
TIME_FREQUENCY_SIZE = 256


# ---------------------------------------------------------------------------------------------------------------------
# Losses (shared with dfm_hf.training.losses)
# ---------------------------------------------------------------------------------------------------------------------


def _normalise(total: torch.Tensor, count: int, num_items_in_batch: Optional[Any]) -> torch.Tensor:
    if num_items_in_batch is not None:
        denom = num_items_in_batch
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return total / denom
    return total / max(count, 1)


def masked_cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Cross-entropy on the posterior, averaged over the scored tokens (computed in float32).

    ``loss = mean_{i: labels_i != ignore_index} -log p_{1|t}(labels_i | x_t)``, with ``p_{1|t} = softmax(logits)``.
    ``logits`` is ``(..., vocab)`` and ``labels`` is ``(...)``. With ``num_items_in_batch`` (Trainer gradient
    accumulation) the sum is divided by it instead of by the local count. No scored token gives 0.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).to(flat.device)
    scored = labels != ignore_index
    # Only the scored rows are upcast to float32 (the full float32 logits can be large).
    total = F.cross_entropy(flat[scored].float(), labels[scored], reduction="sum")
    return _normalise(total, labels[scored].numel(), num_items_in_batch)


def generalized_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    kappa_rate: Union[float, torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Mixture-path generalized KL (Meta's ``MixturePathGeneralizedKL``), averaged over the scored tokens.

    Per scored token ``i`` (``labels_i != ignore_index``), with ``x1 = labels``, ``x_t = input_ids``,
    ``delta = [x_t^i == x1^i]`` and ``rate = kappa'_t / (1 - kappa_t)`` (``kappa_rate``)::

        loss_i = -rate * ( p_{1|t}(x_t^i) - delta + (1 - delta) * log p_{1|t}(x1^i) )

    computed in float32. ``logits`` is ``(..., vocab)``; ``labels`` and ``input_ids`` are ``(...)``; ``kappa_rate``
    is a scalar, one rate per row (``(batch,)`` for ``(batch, len)`` labels) or anything broadcasting against
    ``labels``. Its time integral is an ELBO on ``-log p(x1)``; it is singular at ``t -> 1`` (train on
    ``t <= 1 - eps``). With ``num_items_in_batch`` the sum is divided by it instead of by the local count.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.to(flat.device)
    rate = torch.as_tensor(kappa_rate, dtype=torch.float32, device=flat.device)
    if rate.dim() == 1 and labels.dim() > 1 and rate.shape[0] == labels.shape[0]:
        rate = rate.view(-1, *([1] * (labels.dim() - 1)))
    rate = torch.broadcast_to(rate, labels.shape).reshape(-1)
    labels = labels.reshape(-1)
    scored = labels != ignore_index
    x1 = labels[scored]
    x_t = input_ids.reshape(-1).to(flat.device)[scored]
    log_probs = torch.log_softmax(flat[scored].float(), dim=-1)
    log_p_x1 = log_probs.gather(-1, x1.unsqueeze(-1)).squeeze(-1)
    p_xt = log_probs.gather(-1, x_t.unsqueeze(-1)).squeeze(-1).exp()
    delta = (x_t == x1).float()
    total = (-rate[scored] * (p_xt - delta + (1.0 - delta) * log_p_x1)).sum()
    return _normalise(total, x1.numel(), num_items_in_batch)


def compute_dfm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "ce",
    input_ids: Optional[torch.Tensor] = None,
    kappa_rate: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """The DFM loss of ``loss_type``: :func:`masked_cross_entropy_loss` (``"ce"``) or :func:`generalized_kl_loss`
    (``"generalized_kl"``, which needs ``input_ids`` = ``x_t`` and ``kappa_rate``)."""
    if loss_type == "ce":
        return masked_cross_entropy_loss(logits, labels, ignore_index, num_items_in_batch)
    if loss_type == "generalized_kl":
        if kappa_rate is None:
            raise ValueError(
                "`kappa_rate` (kappa'_t / (1 - kappa_t), one per row) is required when `loss_type` is "
                "'generalized_kl'; the DFM data collator returns it."
            )
        if input_ids is None:
            raise ValueError("`input_ids` (x_t) is required when `loss_type` is 'generalized_kl'.")
        return generalized_kl_loss(logits, labels, input_ids, kappa_rate, ignore_index, num_items_in_batch)
    raise ValueError(f"`loss_type` must be one of ['ce', 'generalized_kl'], got {loss_type!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DFMModelOutput(ModelOutput):
    """Output of :class:`DFMModel`.

    Args:
        last_hidden_state: ``(batch, len, hidden)`` after the final norm (``len`` = the query positions given).
        cache: with ``use_cache=True``, a :class:`transformers.DynamicCache` holding every layer's keys and values
            (after rotary), ``(batch, num_key_value_heads, cache_len, head_dim)`` each. Also readable as
            ``output.past_key_values`` (transformers 5.x names the output field ``cache`` and renames a
            ``past_key_values`` field, so the field itself cannot carry the older name).
        hidden_states: with ``output_hidden_states=True``, the embeddings and the output of every layer (the last
            one after the final norm).
        attentions: with ``output_attentions=True``, the attention probabilities of every layer,
            ``(batch, heads, len, key_len)``.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None

    @property
    def past_key_values(self) -> Optional[Cache]:
        """The key/value cache (the ``cache`` field)."""
        return self.cache


@dataclass
class DFMMaskedGenerationOutput(ModelOutput):
    """Output of :class:`DFMForMaskedGeneration`.

    Args:
        loss: the training loss when ``labels`` were given.
        logits: ``(batch, len, vocab)``; ``(K, vocab)`` for a boolean ``logits_to_keep``; ``(batch, len(idx), vocab)``
            for an index ``logits_to_keep``; ``(batch, N, vocab)`` for an int ``N > 0``. ``logits[..., i, :]``
            parametrises ``p_{1|t}(x^i | x_t)`` (or ``p_{0|t}`` for an epsilon model), with or without
            ``config.logits_shift``.
        cache: with ``use_cache=True``, the key/value cache (see :class:`DFMModelOutput`); also readable as
            ``output.past_key_values``.
        hidden_states: with ``output_hidden_states=True``, the embeddings and the output of every layer (the last
            one after the final norm).
        attentions: with ``output_attentions=True``, the attention probabilities of every layer.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None

    @property
    def past_key_values(self) -> Optional[Cache]:
        """The key/value cache (the ``cache`` field)."""
        return self.cache


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


def rotary_inverse_frequencies(head_dim: int, theta: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """``inv_freq_j = theta^(-2j / head_dim)`` for ``j = 0..head_dim/2 - 1`` (float32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``(cos, sin)`` of shape ``(seq_len, head_dim)`` for positions ``p = 0..seq_len-1``.

    Row ``p`` is ``cos / sin`` of ``[p * inv_freq, p * inv_freq]`` (see :func:`rotary_inverse_frequencies`), computed
    in float32 and cast to ``dtype``.
    """
    inv_freq = rotary_inverse_frequencies(head_dim, theta, device)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DFMRotaryEmbedding(nn.Module):
    """Rotary tables of :func:`rotary_cos_sin`, cached per device and dtype and grown as needed.

    The tables are plain attributes (no parameters or buffers: nothing is saved, nothing depends on buffer
    initialisation); rows are selected by position ids. Under ``torch.compile`` the rows are computed from the
    positions instead (same formula), so a compiled graph never mutates the cache.
    """

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = float(config.rope_theta)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self, position_ids: Optional[torch.Tensor], length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``: ``(length, head_dim)`` rows ``0..length-1`` when ``position_ids`` is None, else
        ``(batch, n, head_dim)`` rows ``position_ids`` (which must lie in ``[0, length)``: not checked)."""
        if torch.compiler.is_compiling():
            if position_ids is None:
                return rotary_cos_sin(length, self.head_dim, self.theta, device, dtype)
            freqs = position_ids[..., None].float() * rotary_inverse_frequencies(self.head_dim, self.theta, device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)
        key = f"{device}|{dtype}"
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < length:
            table = rotary_cos_sin(length, self.head_dim, self.theta, device, dtype)
            self._tables[key] = table
        cos, sin = table
        if position_ids is None:
            return cos[:length], sin[:length]
        return cos[position_ids], sin[position_ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, len, head_dim)``: ``x * cos + rotate_half(x) * sin``, with tables of shape
    ``(len, head_dim)`` (shared by the rows) or ``(batch, len, head_dim)`` (per-row positions)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(batch, kv_heads, len, head_dim) -> (batch, kv_heads * n_rep, len, head_dim)``: key/value head ``h`` serves
    query heads ``h * n_rep .. (h + 1) * n_rep - 1`` (grouped-query attention)."""
    if n_rep == 1:
        return x
    batch, kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim).reshape(batch, kv_heads * n_rep, length, -1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(batch, dim)`` of ``TIME_EMBEDDING_SCALE * t`` (``t`` in ``[0, 1]``), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = (timesteps.float() * TIME_EMBEDDING_SCALE)[:, None] * freqs[None]
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
    """Gated SiLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFMAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings and grouped-query key/value heads (SDPA, or eager).

    ``softmax(q k^T / sqrt(head_dim) + bias) v`` over all keys (bidirectional unless ``bias`` says otherwise). Biases
    on ``q_proj`` / ``k_proj`` / ``v_proj`` with ``config.attention_bias``; never on ``o_proj``.
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        past_key_value: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache_index: Optional[torch.Tensor] = None,
        cache_in_place: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Attention output ``(batch, n, hidden)``, the probabilities (with ``output_attentions``) and the keys and
        values attended over, ``(batch, kv_heads, key_len, head_dim)`` each (after rotary).

        With ``past_key_value = (keys, values)`` of length ``L`` and ``cache_index`` ``(batch, n)``, the fresh keys and
        values of the ``n`` queries replace the cached ones at ``cache_index`` (in a copy, or with ``cache_in_place``
        in the cached tensors themselves when their dtype matches) and the queries attend over all ``L`` keys.
        """
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_value is not None:
            index = cache_index[:, None, :, None].expand(batch, self.num_key_value_heads, seq_len, self.head_dim)
            cached_key, cached_value = past_key_value
            if cache_in_place and cached_key.dtype == key.dtype and cached_value.dtype == value.dtype:
                key, value = cached_key.scatter_(2, index, key), cached_value.scatter_(2, index, value)
            else:
                key = cached_key.to(key.dtype).scatter(2, index, key)
                value = cached_value.to(value.dtype).scatter(2, index, value)
        present = (key, value)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0

        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
            if attention_bias is not None:
                scores = scores + attention_bias
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            out = torch.matmul(weights, value)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_bias, dropout_p=dropout, is_causal=False, scale=self.scaling
            )
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(out), (weights if output_attentions else None), present


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DFMTransformerLayer(GradientCheckpointingLayer):
    """Pre-norm block ``x + attn(norm(x))``, ``x + mlp(norm(x))``; with time conditioning, adaLN-Zero (DiT):
    ``x + gate * sublayer(norm(x) * (1 + scale) + shift)`` with ``(shift, scale, gate)`` from ``t``."""

    def __init__(self, config: DFMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DFMAttention(config, layer_idx)
        self.mlp = DFMMLP(config)
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
        attention_bias: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        past_key_value: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache_index: Optional[torch.Tensor] = None,
        cache_in_place: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``(hidden_states, attention probabilities or None, (keys, values))``; see :meth:`DFMAttention.forward`."""
        if self.adaln_modulation is not None:
            if time_condition is None:
                raise ValueError("`timesteps` are required by a model with `time_conditioning=True`.")
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln_modulation(time_condition).chunk(6, dim=-1)
            attn_out, weights, present = self.self_attn(
                _modulate(self.input_layernorm(hidden_states), shift_a, scale_a),
                position_embeddings,
                attention_bias,
                output_attentions,
                past_key_value,
                cache_index,
                cache_in_place,
            )
            hidden_states = hidden_states + gate_a.unsqueeze(1) * self.dropout(attn_out)
            mlp_out = self.mlp(_modulate(self.post_attention_layernorm(hidden_states), shift_m, scale_m))
            hidden_states = hidden_states + gate_m.unsqueeze(1) * self.dropout(mlp_out)
        else:
            attn_out, weights, present = self.self_attn(
                self.input_layernorm(hidden_states),
                position_embeddings,
                attention_bias,
                output_attentions,
                past_key_value,
                cache_index,
                cache_in_place,
            )
            hidden_states = hidden_states + self.dropout(attn_out)
            hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, weights, present


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class DFMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by the DFM models."""

    config_class = DFMConfig
    config: DFMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DFMTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # The attention reads `config._attn_implementation` on every call ("eager" or SDPA), so switching it with
        # `set_attn_implementation` is safe (transformers' source heuristic would otherwise refuse).
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, DFMZeroLinear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DFMRMSNorm):
            nn.init.ones_(module.weight)


def _prepare_timesteps(
    timesteps: Optional[Union[float, torch.Tensor]], batch: int, device: torch.device
) -> Optional[torch.Tensor]:
    if timesteps is None:
        return None
    expected = f"a float, a 0-d tensor or a tensor of shape ({batch},)"
    if isinstance(timesteps, (str, bytes, bool)):
        raise ValueError(f"`timesteps` must be {expected}, got {timesteps!r}.")
    try:
        t = torch.as_tensor(timesteps, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`timesteps` must be {expected}, got {type(timesteps).__name__}.") from err
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"`timesteps` must be real numbers, got dtype {t.dtype}.")
    t = t.to(torch.float32)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"`timesteps` must be {expected} (one time per row), got shape {tuple(t.shape)}.")
    return t


def _is_integer_tensor(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and not x.is_complex() and x.dtype != torch.bool
    )


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _cache_pairs(past_key_values: Any) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The ``(keys, values)`` of every layer of a transformers ``Cache`` (or a sequence of pairs); None when empty."""
    if past_key_values is None:
        return None
    if isinstance(past_key_values, Cache):
        layers = getattr(past_key_values, "layers", None)
        if layers is not None:
            pairs = [(layer.keys, layer.values) for layer in layers]
        else:  # transformers 4.x before the layered caches
            pairs = list(zip(past_key_values.key_cache, past_key_values.value_cache))
    elif isinstance(past_key_values, (list, tuple)):
        pairs = []
        for item in past_key_values:
            if not isinstance(item, (list, tuple)) or len(item) < 2:
                raise ValueError(
                    "`past_key_values` must be a transformers `Cache` or a sequence of (keys, values) pairs, got an "
                    f"item of type {type(item).__name__}."
                )
            pairs.append((item[0], item[1]))
    else:
        raise ValueError(
            "`past_key_values` must be None, a transformers `Cache` (e.g. the one returned by `use_cache=True`) or a "
            f"sequence of (keys, values) pairs, got {type(past_key_values).__name__}."
        )
    if not pairs or any(k is None or v is None or k.numel() == 0 for k, v in pairs):
        return None
    return pairs


class DFMModel(DFMPreTrainedModel):
    """The DFM backbone: token embeddings -> transformer layers -> final norm; returns the hidden states."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.time_embedding = DFMTimestepEmbedder(config) if config.time_conditioning else None
        self.layers = nn.ModuleList([DFMTransformerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.final_modulation = (
            DFMZeroLinear(config.hidden_size, 2 * config.hidden_size) if config.time_conditioning else None
        )
        self.rotary_emb = DFMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _validate_input_ids(self, input_ids: Any) -> None:
        # Shape and dtype only: a value check (ids in [0, vocab_size)) would synchronise with the device.
        if not _is_integer_tensor(input_ids):
            raise ValueError(f"`input_ids` must be an integer tensor of shape (batch, len), got {type(input_ids)}.")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"`input_ids` must have shape (batch, len) with len >= 1, got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has length {input_ids.shape[1]} > max_position_embeddings "
                f"({self.config.max_position_embeddings})."
            )

    def _validate_cache(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> int:
        config = self.config
        if len(pairs) != config.num_hidden_layers:
            raise ValueError(
                f"`past_key_values` must hold num_hidden_layers={config.num_hidden_layers} layers, got {len(pairs)}."
            )
        keys = pairs[0][0]
        expected = (batch, config.num_key_value_heads, keys.shape[-2] if keys.dim() == 4 else -1, config.head_dim)
        for k, v in pairs:
            if k.dim() != 4 or tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise ValueError(
                    "`past_key_values` layers must hold keys and values of shape (batch, num_key_value_heads, len, "
                    f"head_dim) = {expected}, got {_shape(k)} and {_shape(v)}."
                )
        cache_len = expected[2]
        if cache_len > config.max_position_embeddings:
            raise ValueError(
                f"`past_key_values` has length {cache_len} > max_position_embeddings "
                f"({config.max_position_embeddings})."
            )
        return cache_len

    @staticmethod
    def _position_ids(position_ids: Any, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if not _is_integer_tensor(position_ids) or position_ids.dim() not in (1, 2):
            raise ValueError(
                f"`position_ids` must be an integer tensor of shape (batch, len) = {(batch, seq_len)} (or (len,)), "
                f"got {_shape(position_ids)}."
            )
        pos = position_ids.to(device=device, dtype=torch.long)
        if pos.dim() == 1:
            pos = pos[None]
        if pos.shape[1] != seq_len or pos.shape[0] not in (1, batch):
            raise ValueError(
                f"`position_ids` must have shape (batch, len) = {(batch, seq_len)} (or (len,)), "
                f"got {_shape(position_ids)}."
            )
        return pos.expand(batch, seq_len)

    def _attention_bias(
        self, attention_mask: Any, batch: int, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
    ) -> Optional[torch.Tensor]:
        """The additive attention bias ``(batch or 1, 1 or heads, q_len or 1, k_len)`` of ``attention_mask``."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
            raise ValueError(
                f"`attention_mask` must be a (batch, len) = {(batch, k_len)} padding mask or a 4-D additive float mask "
                f"(batch, 1, {q_len}, {k_len}), got {_shape(attention_mask)} (`attention_mask` is the second "
                "positional argument; pass `timesteps=` by keyword)."
            )
        minimum = torch.finfo(dtype).min
        if attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (batch, k_len):
                what = "the shape of `input_ids`" if q_len == k_len else "shape (batch, cache length)"
                raise ValueError(
                    f"`attention_mask` must have {what} {(batch, k_len)}, got {tuple(attention_mask.shape)}."
                )
            keep = attention_mask.to(device=device) != 0
            # Finite minimum, never -inf: a fully padded row then stays finite, not NaN.
            bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, minimum)
            return bias[:, None, None, :]
        shape = tuple(attention_mask.shape)
        if (
            shape[0] not in (1, batch)
            or shape[1] not in (1, self.config.num_attention_heads)
            or shape[2] != q_len
            or shape[3] != k_len
        ):
            raise ValueError(
                f"A 4-D `attention_mask` must have shape (batch, 1, q_len, k_len) = {(batch, 1, q_len, k_len)} "
                f"(batch and heads may also be 1 / num_attention_heads), got {shape}."
            )
        mask = attention_mask.to(device=device)
        if mask.dtype == torch.bool:
            return torch.zeros(shape, dtype=dtype, device=device).masked_fill(~mask, minimum)
        if not mask.dtype.is_floating_point:
            raise ValueError(
                "A 4-D `attention_mask` must be additive floats (0 = attend, finfo(dtype).min = blocked) or bool "
                f"(True = attend), got dtype {mask.dtype}."
            )
        if mask.dtype != dtype:
            mask = mask.clamp(min=minimum).to(dtype)
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[Cache, tuple]] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache_in_place: bool = False,
        **kwargs: Any,
    ) -> Union[DFMModelOutput, tuple]:
        """Hidden states ``(batch, len, hidden)`` of ``x_t = input_ids`` at times ``timesteps``.

        See :meth:`DFMForMaskedGeneration.forward` for the arguments (masks, positions, the key/value cache). Token
        ids are not range-checked here (that would synchronise with the device).
        """
        if past_key_values is None and kwargs.get("cache") is not None:  # the transformers 5.x name
            past_key_values = kwargs.pop("cache")
        self._validate_input_ids(input_ids)
        batch, seq_len = input_ids.shape
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        return_dict = return_dict if return_dict is not None else config.return_dict
        device = input_ids.device

        pairs = _cache_pairs(past_key_values)
        if pairs is not None:
            key_len = self._validate_cache(pairs, batch)
            if position_ids is None:
                raise ValueError(
                    "`position_ids` (batch, len): the absolute positions of the `input_ids` slice, are required with "
                    "`past_key_values`."
                )
        else:
            key_len = seq_len
        if position_ids is not None:
            position_ids = self._position_ids(position_ids, batch, seq_len, device)

        hidden_states = self.embed_tokens(input_ids)
        dtype = hidden_states.dtype
        attention_bias = self._attention_bias(attention_mask, batch, seq_len, key_len, dtype, device)
        t = _prepare_timesteps(timesteps, batch, device)
        if config.time_conditioning and t is None:
            raise ValueError("`timesteps` are required by a model with `time_conditioning=True` (one per row).")

        time_condition = None
        if self.time_embedding is not None:
            time_condition = F.silu(self.time_embedding(t))

        if position_ids is None:
            table_len = seq_len
        else:
            table_len = key_len if pairs is not None else config.max_position_embeddings
        position_embeddings = self.rotary_emb(position_ids, table_len, device, dtype)

        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights, present = layer(
                hidden_states,
                time_condition,
                position_embeddings=position_embeddings,
                attention_bias=attention_bias,
                output_attentions=bool(output_attentions),
                past_key_value=pairs[i] if pairs is not None else None,
                cache_index=position_ids if pairs is not None else None,
                cache_in_place=cache_in_place,
            )
            if output_attentions:
                all_attn.append(weights)
            if use_cache:
                presents.append(present)

        hidden_states = self.norm(hidden_states)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(time_condition).chunk(2, dim=-1)
            hidden_states = _modulate(hidden_states, shift, scale)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        cache = None
        if use_cache:
            # A new cache (the one passed in is never modified), except that an empty Cache passed in is filled.
            empty = isinstance(past_key_values, Cache) and pairs is None
            cache = past_key_values if empty else DynamicCache()
            for i, (key, value) in enumerate(presents):
                cache.update(key, value, i)

        output = DFMModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class DFMForMaskedGeneration(DFMPreTrainedModel):
    """DFM denoiser: :class:`DFMModel` + an LM head giving the logits of ``p_{1|t}``.

    The head is tied to the input embeddings unless ``config.tie_word_embeddings=False``. With
    ``config.logits_shift`` it reads the hidden state of position ``i - 1`` for token ``i`` (Dream / adapted causal
    LMs). ``forward(input_ids=x_t, timesteps=t, ...)`` returns a :class:`DFMMaskedGenerationOutput`. With ``labels``
    (masked-LM convention: the clean id where scored, -100 elsewhere) it also returns the loss selected by
    ``config.loss_type`` (see :func:`masked_cross_entropy_loss` and :func:`generalized_kl_loss`).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DFMConfig) -> None:
        super().__init__(config)
        self.model = DFMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @staticmethod
    def _check_logits_to_keep(
        logits_to_keep: Any, batch: int, seq_len: int, device: torch.device
    ) -> Optional[Union[torch.Tensor, slice]]:
        """The selection along ``(batch, len)``: None (all), a bool mask, a long index tensor or a slice (int N)."""
        if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
            if logits_to_keep < 0:
                raise ValueError(f"An int `logits_to_keep` must be >= 0 (0 = all positions), got {logits_to_keep}.")
            return None if logits_to_keep == 0 else slice(-logits_to_keep, None)
        if not isinstance(logits_to_keep, torch.Tensor):
            raise ValueError(
                "`logits_to_keep` must be None, an int N >= 0 (the last N positions; 0 = all), a bool tensor of shape "
                f"(batch, len) or a 1-D long tensor of positions, got {type(logits_to_keep).__name__}."
            )
        keep = logits_to_keep.to(device)
        if keep.dtype == torch.bool:
            if keep.shape != (batch, seq_len):
                raise ValueError(
                    f"A boolean `logits_to_keep` must have shape (batch, len) = {(batch, seq_len)}, "
                    f"got {tuple(keep.shape)}."
                )
            return keep
        if keep.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"`logits_to_keep` must be a bool or long tensor, got dtype {keep.dtype}.")
        if keep.dim() != 1:
            raise ValueError(f"An index `logits_to_keep` must be 1-D (positions), got shape {tuple(keep.shape)}.")
        return keep.long()

    @staticmethod
    def _select(x: torch.Tensor, keep: Optional[Union[torch.Tensor, slice]]) -> torch.Tensor:
        if keep is None:
            return x
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
            return x[keep]
        return x[:, keep]

    @staticmethod
    def _shifted(hidden_states: torch.Tensor, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden state read for each query's token under ``logits_shift``: the one at position ``max(p - 1, 0)``.

        Without ``position_ids`` the positions are the sequence indices (a shift by one along ``len``). With them (a
        cached partial forward), the source is found by a position lookup among the slice's own positions (the
        first match; no host sync). A position ``p - 1`` missing from the slice is not detected (the caller includes
        it): the lookup then falls back to the slice's first entry.
        """
        if position_ids is None:
            return torch.cat([hidden_states[:, :1], hidden_states[:, :-1]], dim=1)
        target = (position_ids - 1).clamp_min(0)
        match = position_ids[:, None, :] == target[:, :, None]  # [b, j, k]: slice entry k holds query j's source
        source = match.to(torch.uint8).argmax(dim=-1)
        return hidden_states.gather(1, source[..., None].expand(-1, -1, hidden_states.shape[-1]))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[Cache, tuple]] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        condition_mask: Optional[torch.Tensor] = None,
        logits_to_keep: Optional[Union[int, torch.Tensor]] = None,
        return_dict: Optional[bool] = True,
        kappa_rate: Optional[Union[float, torch.Tensor]] = None,
        cache_in_place: bool = False,
        **kwargs: Any,
    ) -> Union[DFMMaskedGenerationOutput, tuple]:
        """Logits of ``p_{1|t}(. | x_t)`` for ``x_t = input_ids`` at times ``timesteps``.

        Args:
            input_ids: ``(batch, len)`` token ids ``x_t``, in ``[0, vocab_size)``. They are NOT range-checked here
                (that would synchronise with the device on every call; the pipeline checks them once per call).
            attention_mask: ``(batch, key_len)``, 1 = real token, 0 = padding (padded keys are masked out); or a
                4-D additive float mask ``(batch, 1, len, key_len)`` (0 = attend, ``torch.finfo(dtype).min`` =
                blocked) used as given, e.g. a causal mask or a DiffuLLaMA-style annealed mask; or a 4-D bool mask
                with True = attend (converted to the additive form). ``key_len = len`` without a cache.
            timesteps: ``t`` per row, shape ``(batch,)``, or a scalar; required with ``time_conditioning=True``,
                ignored otherwise.
            position_ids: ``(batch, len)`` absolute positions (rows of the rotary table; default ``0..len-1``); they
                must lie in ``[0, max_position_embeddings)`` (not checked). Required with ``past_key_values``.
            past_key_values: the cache of an earlier ``use_cache=True`` call over all ``L`` positions of the rows.
                Then ``input_ids`` is a slice ``(batch, n)`` of the rows at ``position_ids`` (e.g. ``full_ids.gather(1,
                pos)``): the ``n`` queries compute fresh keys and values, which replace the cached ones at their
                positions (in a copy: the cache passed in is not modified, unless ``cache_in_place``), and attend over
                all ``L`` keys. Repeated positions (to pad rows to a common ``n``) are harmless when they carry the same
                token. This is exact when the cache was computed from the same tokens as the current rows, and an
                approximation (Fast-dLLM's prefix / dual cache) when the non-query positions changed since.
            cache_in_place: with ``past_key_values``, write the fresh keys and values into the cache passed in (its
                tensors then hold them at ``position_ids``) instead of a copy of it: one copy of every layer's cache
                less per call. The attention output is the same; use it when nothing else reads the cache's entries at
                ``position_ids`` (the pipeline's block cache: the query positions are recomputed at every step).
            use_cache: return ``past_key_values`` (the output's ``cache`` field): a new ``transformers.DynamicCache``
                with every layer's keys and values (after rotary), ``(batch, num_key_value_heads, L, head_dim)``;
                after a partial forward it holds the cached entries with the fresh ones written at ``position_ids``.
                An empty ``Cache`` passed as ``past_key_values`` to a full forward is filled and returned.
            labels: ``(batch, len)``: the target id where scored, -100 elsewhere; gives ``loss``.
            condition_mask: ``(batch, len)`` bool, True at conditioning (never corrupted) positions; they are never
                scored.
            logits_to_keep: which positions of ``input_ids`` get logits: ``None`` or ``0`` (all); an int ``N``
                (the last ``N``, logits ``(batch, N, vocab)``); a bool ``(batch, len)`` mask (logits ``(K, vocab)``
                packed in row-major order); a 1-D long tensor of positions (logits ``(batch, len(idx), vocab)``;
                not range-checked). The LM head runs only there; the loss then scores only the kept positions.
                With ``config.logits_shift`` the kept positions are still those whose TOKEN is predicted; the hidden
                state read is the one at ``max(p - 1, 0)``. In a cached partial forward that position must be in the
                slice (include ``p - 1`` in ``position_ids``; not checked).
            return_dict: return a :class:`DFMMaskedGenerationOutput` (default) or a tuple.
            kappa_rate: ``kappa'_t / (1 - kappa_t)`` per row ``(batch,)``; required for ``loss_type="generalized_kl"``.
            kwargs: ``output_hidden_states``, ``output_attentions``, ``num_items_in_batch`` (Trainer); ``cache`` is
                accepted as another name of ``past_key_values`` (transformers 5.x naming).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if past_key_values is None and kwargs.get("cache") is not None:
            past_key_values = kwargs.pop("cache")
        partial = _cache_pairs(past_key_values) is not None  # before the call: an empty Cache passed in gets filled
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            timesteps=timesteps,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=kwargs.pop("output_hidden_states", None),
            output_attentions=kwargs.pop("output_attentions", None),
            return_dict=True,
            cache_in_place=cache_in_place,
        )
        hidden_states = outputs.last_hidden_state
        batch, seq_len = input_ids.shape

        if self.config.logits_shift:
            shift_positions = None
            if partial:  # a partial forward: look the sources up by position
                shift_positions = self.model._position_ids(position_ids, batch, seq_len, hidden_states.device)
            hidden_states = self._shifted(hidden_states, shift_positions)

        keep = None
        if logits_to_keep is not None:
            keep = self._check_logits_to_keep(logits_to_keep, batch, seq_len, hidden_states.device)
            hidden_states = self._select(hidden_states, keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, input_ids, condition_mask, kappa_rate, keep, num_items_in_batch)

        output = DFMMaskedGenerationOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict or return_dict is None else output.to_tuple()

    def _loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        input_ids: torch.Tensor,
        condition_mask: Optional[torch.Tensor],
        kappa_rate: Optional[Union[float, torch.Tensor]],
        keep: Optional[Union[torch.Tensor, slice]],
        num_items_in_batch: Optional[Union[int, torch.Tensor]],
    ) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
            raise ValueError(f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}.")
        labels = labels.to(logits.device)
        if condition_mask is not None:
            if not isinstance(condition_mask, torch.Tensor) or condition_mask.shape != input_ids.shape:
                shape = (
                    tuple(condition_mask.shape) if isinstance(condition_mask, torch.Tensor) else type(condition_mask)
                )
                raise ValueError(
                    f"`condition_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}."
                )
            labels = labels.masked_fill(condition_mask.to(device=labels.device, dtype=torch.bool), IGNORE_INDEX)

        rate = None
        loss_type = self.config.loss_type
        if loss_type == "generalized_kl":
            if kappa_rate is None:
                raise ValueError(
                    "`kappa_rate` (kappa'_t / (1 - kappa_t), shape (batch,)) is required when `loss_type` is "
                    "'generalized_kl'; the DFM data collator returns it."
                )
            rate = torch.as_tensor(kappa_rate, dtype=torch.float32, device=logits.device)
            if rate.dim() == 0 or (rate.dim() == 1 and rate.shape[0] == 1):
                rate = rate.reshape(1).expand(input_ids.shape[0])
            if rate.dim() != 1 or rate.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"`kappa_rate` must be a scalar or have shape ({input_ids.shape[0]},), got {tuple(rate.shape)}."
                )
            rate = rate[:, None].expand(input_ids.shape)

        x_t = input_ids.to(logits.device)
        if keep is not None:
            labels, x_t = self._select(labels, keep), self._select(x_t, keep)
            rate = self._select(rate, keep) if rate is not None else None
        return compute_dfm_loss(
            logits, labels, loss_type, input_ids=x_t, kappa_rate=rate, num_items_in_batch=num_items_in_batch
        )

    # --------------------------------------------------------------------------------------------------------------
    # Loading: our checkpoints strictly, released LLaDA / Dream ones converted (region owned by the conversion work)
    # --------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint (a folder or a Hub repo id), strictly.

        Our own checkpoints (``model_type: "dfm"``) load through ``PreTrainedModel.from_pretrained``; a missing or
        unexpected weight raises ``ValueError`` naming it (pass ``output_loading_info=True`` to get the report
        instead), and a broken (e.g. truncated) weights file raises ``OSError`` naming the file and its folder.
        Released LLaDA (``model_type: "llada"``) and Dream / DiffuCoder (``"Dream"``) checkpoints are converted on
        load by ``dfm_hf.models.conversion.load_released_model`` (``dtype=``, ``device_map=``, ``revision=``... work;
        no remote code runs); ``save_pretrained`` then writes our format.
        """
        import importlib
        import json
        import os

        from transformers import PretrainedConfig
        from transformers.utils import cached_file

        name = pretrained_model_name_or_path
        hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
        hub = {k: kwargs[k] for k in hub_keys if kwargs.get(k) is not None}
        model_type = None
        if name is not None and not isinstance(kwargs.get("config"), PretrainedConfig) and not kwargs.get("gguf_file"):
            try:
                path = cached_file(
                    str(name),
                    "config.json",
                    _raise_exceptions_for_missing_entries=False,
                    _raise_exceptions_for_connection_errors=False,
                    **hub,
                )
                if path:
                    with open(path, encoding="utf-8") as f:
                        model_type = json.load(f).get("model_type")
            except Exception:  # no readable config.json: transformers reports it below
                model_type = None
        if model_type is not None and model_type != cls.config_class.model_type:
            # imported by name: transformers' remote-code import check must not require dfm_hf for our own files
            try:
                conversion = importlib.import_module("dfm_hf.models.conversion")
            except ImportError as err:
                raise ImportError(
                    f"{str(name)!r} is a {model_type!r} checkpoint: converting it needs the `dfm_hf` package."
                ) from err
            if model_args:
                raise TypeError("from_pretrained() takes no positional model arguments for a released checkpoint.")
            return conversion.load_released_model(cls, name, **kwargs)

        report = bool(kwargs.pop("output_loading_info", False))
        lenient = report or bool(kwargs.get("ignore_mismatched_sizes"))
        try:
            model, info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
        except Exception as err:
            from safetensors import safe_open

            sub = kwargs.get("subfolder") or ""
            candidates = []
            if name is not None and os.path.isdir(os.path.join(str(name), sub)):
                folder = os.path.join(str(name), sub)
                candidates = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
            elif name is not None:
                offline = {**hub, "local_files_only": True}
                for filename in ("model.safetensors", "model.safetensors.index.json"):
                    try:
                        found = cached_file(str(name), filename, _raise_exceptions_for_missing_entries=False, **offline)
                    except Exception:
                        found = None
                    if found and filename.endswith(".json"):
                        with open(found, encoding="utf-8") as f:
                            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
                        candidates += [os.path.join(os.path.dirname(found), s) for s in shards]
                    elif found:
                        candidates.append(found)
            for path in candidates:
                try:
                    with safe_open(path, framework="pt") as f:
                        f.keys()
                except Exception as broken:
                    raise OSError(
                        f"{os.path.basename(path)} in {os.path.dirname(path)} (checkpoint {str(name)!r}) is not a "
                        f"valid safetensors file ({broken}); it may be truncated or corrupted (an interrupted download "
                        "or save): download or save it again."
                    ) from err
            raise
        if report:
            return model, info
        if lenient:
            return model
        problems = {
            "missing": sorted(info.get("missing_keys") or []),
            "unexpected": sorted(info.get("unexpected_keys") or []),
            "mismatched": sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []),
        }
        if any(problems.values()):
            details = "; ".join(f"{kind} weights: {', '.join(keys)}" for kind, keys in problems.items() if keys)
            raise ValueError(
                f"The checkpoint {str(name)!r} does not match its config.json ({details}); nothing is initialised at "
                "random. Pass `output_loading_info=True` to load it anyway and inspect the report."
            )
        return model

    @classmethod
    def from_causal_lm(
        cls,
        pretrained_model_name_or_path_or_model: Any,
        mask_token: str = "<|mask|>",
        mask_token_id: Optional[int] = None,
        **load_kwargs: Any,
    ) -> Any:
        """A DFM model from a Llama / Mistral / Qwen2 causal LM (SmolLM2, TinyLlama, Qwen2.5, Qwen2.5-Coder...).

        ``pretrained_model_name_or_path_or_model``: a path or Hub repo id (loaded with
        ``AutoModelForCausalLM.from_pretrained(..., **load_kwargs)``: ``gguf_file=``, ``revision=``, ``dtype=`` reach
        transformers; a GGUF is dequantized) or a loaded causal LM. The result has ``logits_shift=True``, bidirectional
        attention, the causal LM's vocabulary and special ids, and a mask token: ``mask_token_id`` reuses that existing
        id; otherwise a new id ``len(tokenizer)`` (the tokenizer stored with the model; the number of embedding rows
        for a model instance) whose embedding row (and head row, when untied) is the mean of the real tokens' rows.
        Add ``mask_token`` to the tokenizer (``tokenizer.add_special_tokens({"mask_token": mask_token})``) and it gets
        that id; ``DFMPipeline.from_causal_lm`` does it for you. Tied embeddings stay tied. Other architectures raise
        ``ValueError``. A loaded model's weights are shared with the result, not copied (except a grown embedding /
        head): convert a ``copy.deepcopy`` of it if the source must stay unchanged while the result trains. See
        ``dfm_hf.models.conversion.causal_lm_to_dfm``.
        """
        import importlib

        conversion = importlib.import_module("dfm_hf.models.conversion")  # by name: see from_pretrained
        source = pretrained_model_name_or_path_or_model
        return conversion.causal_lm_to_dfm(
            cls, source, mask_token=mask_token, mask_token_id=mask_token_id, **load_kwargs
        )


__all__ = [
    "DFMMaskedGenerationOutput",
    "DFMModel",
    "DFMModelOutput",
    "DFMForMaskedGeneration",
    "DFMPreTrainedModel",
    "DFMRotaryEmbedding",
    "compute_dfm_loss",
    "generalized_kl_loss",
    "masked_cross_entropy_loss",
]
