"""The sparse mixture-of-experts feed-forward layer of the DFM denoiser (``config.num_experts``; LLaDA2.x's MoE).

For a token ``x`` (the normed residual stream) and ``E`` routed experts in ``G = n_group`` groups:

* scores ``s = sigmoid(W_g x)`` (float32), one per expert;
* selection on the biased scores ``b = s + expert_bias``: each group is scored by the sum of its two largest ``b``,
  the ``topk_group`` best groups are kept, and the ``k = num_experts_per_tok`` largest ``b`` among their experts are
  chosen (every group is kept when ``topk_group = n_group``);
* weights ``w_i = s_i / (sum_j s_j + 1e-20)`` over the chosen experts (``norm_topk_prob``; the raw ``s_i``
  otherwise), times ``routed_scaling_factor``: the bias steers the choice, never the weights;
* output ``sum_i w_i * expert_i(x) + shared(x)``, each expert a gated SiLU MLP of width ``moe_intermediate_size``
  and ``shared`` one of width ``num_shared_experts * moe_intermediate_size`` (absent when 0); the weighted sum is
  accumulated in float32.

The first ``first_k_dense_replace`` layers keep the dense MLP (:func:`is_moe_layer`). Tokens are gathered per expert
(one matrix product per expert that received tokens), not looped over.

Imports only ``torch`` and the sibling configuration: it travels with ``modeling_dfm.py`` as remote code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .configuration_dfm import DFMConfig

#: Added to the sum of the chosen scores before normalising them (LLaDA2's epsilon).
ROUTER_EPSILON = 1e-20


def is_moe_layer(config: DFMConfig, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` has the MoE feed-forward: ``num_experts`` is set and ``layer_idx >=
    first_k_dense_replace``."""
    return config.num_experts is not None and layer_idx >= config.first_k_dense_replace


class DFMRouter(nn.Module):
    """The router: ``weight`` ``(num_experts, hidden)`` (no bias; initialised ``N(0, initializer_range)``) and the
    selection-only buffer ``expert_bias`` ``(num_experts,)`` (saved with the weights, never trained by gradient).
    Returns the chosen experts and their weights (module docstring). It is not an ``nn.Linear``, so that weight
    quantizers, which replace or quantize linear layers, leave the routing in full precision."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, mean=0.0, std=config.initializer_range)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(experts, weights)``, both ``(tokens, k)``, for ``hidden_states`` ``(tokens, hidden)``; the weights in
        float32."""
        logits = hidden_states.float() @ self.weight.float().t()
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias.float()
        if self.topk_group < self.n_group:
            grouped = biased.view(biased.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            kept = torch.zeros_like(group_scores, dtype=torch.bool)
            kept.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            biased = biased.masked_fill(~kept.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        experts = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + ROUTER_EPSILON)
        return experts, weights * self.routed_scaling_factor


class DFMSparseMoE(nn.Module):
    """The MoE feed-forward (module docstring): ``gate`` (:class:`DFMRouter`), ``experts`` (a list of gated MLPs) and
    ``shared_experts`` (one gated MLP, or None). ``expert_class(config, intermediate_size)`` builds each MLP."""

    def __init__(self, config: DFMConfig, expert_class: Callable[[DFMConfig, int], nn.Module]) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = DFMRouter(config)
        self.experts = nn.ModuleList(
            [expert_class(config, config.moe_intermediate_size) for _ in range(config.num_experts)]
        )
        shared = config.num_shared_experts * config.moe_intermediate_size
        self.shared_experts = expert_class(config, shared) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(..., hidden) -> (..., hidden)``."""
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        experts, weights = self.gate(flat)
        top_k = experts.shape[1]
        expert_of = experts.reshape(-1)
        token_of = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(top_k)
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            chosen = order[start : start + count]
            start += count
            tokens = token_of[chosen]
            contribution = self.experts[expert](flat[tokens]).float() * weights.reshape(-1)[chosen, None]
            out.index_add_(0, tokens, contribution)
        out = out.to(hidden_states.dtype).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


__all__ = ["DFMRouter", "DFMSparseMoE", "ROUTER_EPSILON", "is_moe_layer"]
