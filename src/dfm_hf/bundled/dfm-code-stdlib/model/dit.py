"""The diffusion-transformer body of BD3-LM and MDLM (``DFMConfig.body = "dit"``) and the SUBS output.

Per layer, with ``c = silu(embed(sigma))`` (``cond_dim`` wide) and ``(shift, scale, gate) x 2 = adaLN(c)``::

    x = x + gate_a * attn(LN(x) * (1 + scale_a) + shift_a)
    x = x + gate_m * mlp(LN(x) * (1 + scale_m) + shift_m)

``LN`` is a LayerNorm without bias (statistics in float32, epsilon 1e-5), ``attn`` is :class:`~.layers.DFMAttention`
without biases (BD3-LM / MDLM's fused ``attn_qkv`` rows ``[q | k | v]`` are ``q_proj``, ``k_proj``, ``v_proj``; RoPE
on queries and keys), and ``mlp`` is ``fc2(gelu_tanh(fc1(x)))`` with biases. The output is
``head(LN(x) * (1 + scale) + shift)``, the head biased and untied. The layer's forward, the attention (masks, caches,
attention backends) and the adaLN arithmetic are those of :mod:`.layers`; this module supplies the DiT's pieces.

Imports only ``torch``, ``transformers`` and sibling files: it travels with ``modeling_dfm.py`` as remote code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_dfm import DFMConfig
from .layers import TIME_FREQUENCY_SIZE, DFMAttention, DFMTransformerLayer, DFMZeroLinear, timestep_embedding

#: Epsilon of the DiT's LayerNorms (PyTorch's default, which BD3-LM and MDLM use).
DIT_LAYER_NORM_EPS = 1e-5
#: ``sigma = -log(max(t, DIT_SIGMA_EPS))``: BD3-LM / MDLM's log-linear noise clips sigma at ``-log(1e-3)``.
DIT_SIGMA_EPS = 1e-3


class DiTLayerNorm(nn.Module):
    """LayerNorm with a learned scale and no bias: ``w * (x - mean) / sqrt(var + 1e-5)``, statistics in float32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(hidden_states.float(), hidden_states.shape[-1:], eps=DIT_LAYER_NORM_EPS)
        return self.weight * normed.to(hidden_states.dtype)


class DiTSigmaEmbedder(nn.Module):
    """``sigma -> linear_2(silu(linear_1(sinusoid(sigma))))``, ``cond_dim`` wide (the sinusoid of sigma itself,
    256 wide, not rescaled)."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FREQUENCY_SIZE, config.cond_dim)
        self.linear_2 = nn.Linear(config.cond_dim, config.cond_dim)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(sigma, TIME_FREQUENCY_SIZE, scale=1.0).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class DiTMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``, both linears biased, ``intermediate_size`` wide."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTLayer(DFMTransformerLayer):
    """A DiT block: :class:`~.layers.DFMTransformerLayer`'s adaLN forward over the DiT's norms, attention and GELU
    MLP, modulated from the ``cond_dim``-wide conditioning vector."""

    def __init__(self, config: DFMConfig, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        self.self_attn = DFMAttention(config, layer_idx)
        self.mlp = DiTMLP(config)
        self.input_layernorm = DiTLayerNorm(config.hidden_size)
        self.post_attention_layernorm = DiTLayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.adaln_modulation = DFMZeroLinear(config.cond_dim, 6 * config.hidden_size)


def dit_body(config: DFMConfig) -> tuple[DiTSigmaEmbedder, nn.ModuleList, DiTLayerNorm, DFMZeroLinear]:
    """``(time_embedding, layers, norm, final_modulation)`` of a DiT :class:`~.modeling_dfm.DFMModel`."""
    layers = nn.ModuleList([DiTLayer(config, i) for i in range(config.num_hidden_layers)])
    final = DFMZeroLinear(config.cond_dim, 2 * config.hidden_size)
    return DiTSigmaEmbedder(config), layers, DiTLayerNorm(config.hidden_size), final


def dit_sigma(timesteps: Optional[torch.Tensor], config: DFMConfig, batch: int, device: torch.device) -> torch.Tensor:
    """The noise level ``(batch,)`` the DiT's embedder sees: ``-log(max(t, 1e-3))`` with ``time_conditioning``
    (``t`` = our time, the clean fraction under a linear kappa), ``0`` without (``t`` ignored)."""
    if not config.time_conditioning:
        return torch.zeros(batch, device=device, dtype=torch.float32)
    return -torch.log(timesteps.float().clamp_min(DIT_SIGMA_EPS))


def subs_logits(logits: torch.Tensor, input_ids: Optional[torch.Tensor], mask_token_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation of ``logits (..., vocab)``: the mask logit is ``-inf``; where ``input_ids``
    (same leading shape; None: no copying) is not the mask, the logits are ``0`` at the input token and ``-inf``
    elsewhere (the input is copied). Softmax-equivalent to MDLM's log-probabilities."""
    logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    if input_ids is None:
        return logits
    ids = input_ids.to(logits.device).unsqueeze(-1)
    copied = torch.full_like(logits, float("-inf")).scatter_(-1, ids, 0.0)
    return torch.where(ids != mask_token_id, copied, logits)


__all__ = [
    "DIT_LAYER_NORM_EPS",
    "DIT_SIGMA_EPS",
    "DiTLayer",
    "DiTLayerNorm",
    "DiTMLP",
    "DiTSigmaEmbedder",
    "dit_body",
    "dit_sigma",
    "subs_logits",
]
