"""Discrete Flow Matching denoiser: a bidirectional transformer that predicts ``p_{1|t}(x1 | x_t)``.

Llama-style layering (config / attention / MLP / layer / model / head): pre-norm, RMSNorm, rotary position
embeddings, gated SiLU MLP, bidirectional attention (no causal mask), an LM head tied to the input embeddings, and
optional adaLN-Zero time conditioning (DiT).

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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
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
class DFMMaskedGenerationOutput(ModelOutput):
    """Output of :class:`DFMForMaskedGeneration`.

    Args:
        loss: the training loss when ``labels`` were given.
        logits: ``(batch, len, vocab)``; ``(K, vocab)`` for a boolean ``logits_to_keep``; ``(batch, len(idx), vocab)``
            for an index ``logits_to_keep``. They parametrise ``p_{1|t}`` (or ``p_{0|t}`` for an epsilon model).
        hidden_states: with ``output_hidden_states=True``, the embeddings and the output of every layer (the last
            one after the final norm).
        attentions: with ``output_attentions=True``, the attention probabilities of every layer.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


class DFMRMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (statistics in float32)."""

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


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``(cos, sin)`` of shape ``(seq_len, head_dim)`` for positions ``0..seq_len-1``.

    Computed on the fly (cheap) rather than stored, so nothing depends on buffer initialisation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(batch, heads, len, head_dim)`` by the ``(len, head_dim)`` tables."""
    return x * cos + rotate_half(x) * sin


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
    """Bidirectional multi-head self-attention with rotary embeddings (SDPA, or eager matmul + softmax)."""

    def __init__(self, config: DFMConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_bias: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, seq_len, _ = hidden_states.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
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
        return self.o_proj(out), (weights if output_attentions else None)


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
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.adaln_modulation is not None:
            if time_condition is None:
                raise ValueError("`timesteps` are required by a model with `time_conditioning=True`.")
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln_modulation(time_condition).chunk(6, dim=-1)
            attn_out, weights = self.self_attn(
                _modulate(self.input_layernorm(hidden_states), shift_a, scale_a),
                position_embeddings,
                attention_bias,
                output_attentions,
            )
            hidden_states = hidden_states + gate_a.unsqueeze(1) * self.dropout(attn_out)
            mlp_out = self.mlp(_modulate(self.post_attention_layernorm(hidden_states), shift_m, scale_m))
            hidden_states = hidden_states + gate_m.unsqueeze(1) * self.dropout(mlp_out)
        else:
            attn_out, weights = self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings, attention_bias, output_attentions
            )
            hidden_states = hidden_states + self.dropout(attn_out)
            hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, weights


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
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _validate_input_ids(self, input_ids: Any) -> None:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
        ):
            raise ValueError(f"`input_ids` must be an integer tensor of shape (batch, len), got {type(input_ids)}.")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"`input_ids` must have shape (batch, len) with len >= 1, got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has length {input_ids.shape[1]} > max_position_embeddings "
                f"({self.config.max_position_embeddings})."
            )
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"`input_ids` must lie in [0, vocab_size={self.config.vocab_size}), got values in [{low}, {high}]."
            )

    def forward(
        self,
        input_ids: torch.LongTensor,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[BaseModelOutput, tuple]:
        """Hidden states ``(batch, len, hidden)`` of ``x_t = input_ids`` at times ``timesteps``.

        ``attention_mask`` is ``(batch, len)`` with 1 for real tokens and 0 for padding: padded keys are masked out.
        """
        self._validate_input_ids(input_ids)
        batch, seq_len = input_ids.shape
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        t = _prepare_timesteps(timesteps, batch, input_ids.device)
        if self.config.time_conditioning and t is None:
            raise ValueError("`timesteps` are required by a model with `time_conditioning=True` (one per row).")

        hidden_states = self.embed_tokens(input_ids)
        dtype = hidden_states.dtype

        attention_bias = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shape = (
                    tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
                )
                raise ValueError(
                    f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}."
                )
            keep = attention_mask.to(device=input_ids.device) != 0
            if not bool(keep.all()):
                # Additive bias (finite minimum, never -inf: a fully padded row then stays finite, not NaN).
                attention_bias = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
                attention_bias = attention_bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]

        time_condition = None
        if self.time_embedding is not None:
            time_condition = F.silu(self.time_embedding(t))

        position_embeddings = rotary_cos_sin(
            seq_len, self.config.head_dim, self.config.rope_theta, hidden_states.device, dtype
        )

        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                time_condition,
                position_embeddings=position_embeddings,
                attention_bias=attention_bias,
                output_attentions=bool(output_attentions),
            )
            if output_attentions:
                all_attn.append(weights)

        hidden_states = self.norm(hidden_states)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(time_condition).chunk(2, dim=-1)
            hidden_states = _modulate(hidden_states, shift, scale)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        output = BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class DFMForMaskedGeneration(DFMPreTrainedModel):
    """DFM denoiser: :class:`DFMModel` + an LM head (tied to the embeddings) giving the logits of ``p_{1|t}``.

    ``forward(input_ids=x_t, timesteps=t, ...)`` returns a :class:`DFMMaskedGenerationOutput`. With ``labels``
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
    def _check_logits_to_keep(logits_to_keep: Any, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
        if not isinstance(logits_to_keep, torch.Tensor):
            raise ValueError(
                "`logits_to_keep` must be None, a bool tensor of shape (batch, len) or a 1-D long tensor of positions, "
                f"got {type(logits_to_keep).__name__}."
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
        if keep.numel() > 0:
            low, high = (int(v) for v in torch.aminmax(keep))
            if low < -seq_len or high >= seq_len:
                raise ValueError(
                    f"`logits_to_keep` positions must lie in [-{seq_len}, {seq_len}), got [{low}, {high}]."
                )
        return keep.long()

    def forward(
        self,
        input_ids: torch.LongTensor,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        condition_mask: Optional[torch.Tensor] = None,
        logits_to_keep: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = True,
        kappa_rate: Optional[Union[float, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> Union[DFMMaskedGenerationOutput, tuple]:
        """Logits of ``p_{1|t}(. | x_t)`` for ``x_t = input_ids`` at times ``timesteps``.

        Args:
            input_ids: ``(batch, len)`` token ids ``x_t`` in ``[0, vocab_size)``.
            timesteps: ``t`` per row, shape ``(batch,)``, or a scalar; required with ``time_conditioning=True``,
                ignored otherwise.
            attention_mask: ``(batch, len)``, 1 = real token, 0 = padding (padded keys are masked out).
            labels: ``(batch, len)``: the target id where scored, -100 elsewhere; gives ``loss``.
            condition_mask: ``(batch, len)`` bool, True at conditioning (never corrupted) positions; they are never
                scored.
            logits_to_keep: ``None`` (all positions), a bool ``(batch, len)`` mask (logits ``(K, vocab)`` packed in
                row-major order) or a 1-D long tensor of positions (logits ``(batch, len(idx), vocab)``). The LM head
                runs only there; the loss then scores only the kept positions.
            return_dict: return a :class:`DFMMaskedGenerationOutput` (default) or a tuple.
            kappa_rate: ``kappa'_t / (1 - kappa_t)`` per row ``(batch,)``; required for ``loss_type="generalized_kl"``.
            kwargs: ``output_hidden_states``, ``output_attentions``, ``num_items_in_batch`` (Trainer).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids,
            timesteps=timesteps,
            attention_mask=attention_mask,
            output_hidden_states=kwargs.pop("output_hidden_states", None),
            output_attentions=kwargs.pop("output_attentions", None),
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        batch, seq_len = input_ids.shape

        keep = None
        if logits_to_keep is not None:
            keep = self._check_logits_to_keep(logits_to_keep, batch, seq_len, hidden_states.device)
            hidden_states = hidden_states[keep] if keep.dtype == torch.bool else hidden_states[:, keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, input_ids, condition_mask, kappa_rate, keep, num_items_in_batch)

        output = DFMMaskedGenerationOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict or return_dict is None else output.to_tuple()

    def _loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        input_ids: torch.Tensor,
        condition_mask: Optional[torch.Tensor],
        kappa_rate: Optional[Union[float, torch.Tensor]],
        keep: Optional[torch.Tensor],
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
            if keep.dtype == torch.bool:
                labels, x_t = labels[keep], x_t[keep]
                rate = rate[keep] if rate is not None else None
            else:
                labels, x_t = labels[:, keep], x_t[:, keep]
                rate = rate[:, keep] if rate is not None else None
        return compute_dfm_loss(
            logits, labels, loss_type, input_ids=x_t, kappa_rate=rate, num_items_in_batch=num_items_in_batch
        )


__all__ = [
    "DFMMaskedGenerationOutput",
    "DFMModel",
    "DFMForMaskedGeneration",
    "DFMPreTrainedModel",
    "compute_dfm_loss",
    "generalized_kl_loss",
    "masked_cross_entropy_loss",
]
