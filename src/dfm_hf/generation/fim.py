"""Fill-in-the-middle infilling for block-diffusion models: a prompt's run of mask tokens filled through the model's
FIM tokens (shared by :class:`~dfm_hf.DFMPipeline` and ``generate()``).

A block-diffusion model attends only to its own and earlier blocks, so it cannot see text after a hole. A model
trained on FIM data (``--fim_rate``; layout in :mod:`dfm_hf.data.fim`) and declaring its control tokens in
``config.fim_token_ids`` (:func:`dfm_hf.pipelines.fim.add_fim_tokens`) infills anyway: a prompt
``prefix <mask> x n suffix`` is rewritten as the FIM prompt ``<fim_prefix> <fim_suffix> suffix <fim_middle> prefix``,
the ``n`` middle tokens are generated block by block after it
(:func:`~dfm_hf.generation.block_diffusion.generate_blocks`), and put back in place of the masks; a run at the end of
the prompt (no suffix) is a plain completion of the text before it. Every prompt of the call must hold exactly one
contiguous run of mask tokens; the length to append (``gen_length``, ``max_new_tokens``) is not used (nothing is
appended after the suffix). Rows whose holes are shorter than the call's longest generate that many tokens and keep
the first ``n``; a row that stopped at EOS before ``n`` tokens has the rest filled with EOS. A step callback and a
streamer see the FIM rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..data.fim import fim_layout
from .block_diffusion import check_block_prompts, generate_blocks
from .call import SamplingCall, SamplingResult

__all__ = ["FimInfill", "fim_infill_plan", "generate_fim_blocks"]


@dataclass
class FimInfill:
    """The FIM rewrite of a call's prompts: the original rows, each row's hole ``(start, count)`` and the prompt it
    is generated after (its FIM prompt, or the text before the hole when the hole ends the row)."""

    prompts: list[list[int]]
    holes: list[tuple[int, int]]
    fim_prompts: list[list[int]]


def fim_infill_plan(prompts: list[list[int]], mask_token_id: int, config: Any) -> Optional[FimInfill]:
    """None when no prompt holds the mask token; the FIM rewrite of every prompt when the block model declares
    ``config.fim_token_ids`` and each prompt holds one contiguous run of masks; ``ValueError`` otherwise."""
    if not any(mask_token_id in ids for ids in prompts):
        return None
    fim_ids = getattr(config, "fim_token_ids", None)
    if fim_ids is None:
        check_block_prompts(prompts, mask_token_id, config.block_size)
    holes, fim_prompts = [], []
    for r, ids in enumerate(prompts):
        at = [i for i, token in enumerate(ids) if token == mask_token_id]
        if not at or at[-1] - at[0] + 1 != len(at):
            raise ValueError(
                f"A block-diffusion model infills through its FIM tokens exactly one contiguous run of mask tokens per "
                f"prompt; prompt row {r} holds {len(at)} mask tokens in "
                f"{sum(1 for i in at if i - 1 not in at)} runs. Give every prompt of the call one run of masks."
            )
        start, count = at[0], len(at)
        holes.append((start, count))
        suffix = ids[start + count :]
        fim_prompts.append(fim_layout(ids[:start], suffix, fim_ids)[0] if suffix else list(ids[:start]))
    return FimInfill([list(ids) for ids in prompts], holes, fim_prompts)


def generate_fim_blocks(
    call: SamplingCall, infill: FimInfill, prompts: Any, gen_length: int, return_full_text: bool, **kwargs: Any
) -> SamplingResult:
    """Infill ``infill``'s holes (module docstring): :func:`generate_blocks` on the FIM prompts, then each middle
    put back in place. ``prompts`` and ``gen_length`` are the call's (replaced by the FIM prompts and the holes);
    the other arguments are :func:`generate_blocks`'s. The result's ``sample`` holds the original rows with their
    holes filled (right-padded), ``generated`` the holes."""
    counts = [count for _, count in infill.holes]
    result = generate_blocks(call, prompts=infill.fim_prompts, gen_length=max(counts), return_full_text=False, **kwargs)
    eos = call.eos_token_ids
    filler = int(eos[0]) if eos is not None else call.pad_token_id
    rows = []
    for r, (start, count) in enumerate(infill.holes):
        middle = result.sample[r][result.generated[r]].tolist()[:count]
        middle += [filler] * (count - len(middle))
        ids = infill.prompts[r]
        rows.append(ids[:start] + middle + ids[start + count :])
    width = max(len(row) for row in rows)
    sample = torch.full((len(rows), width), call.pad_token_id, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    generated = torch.zeros_like(real)
    for r, row in enumerate(rows):
        sample[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        real[r, : len(row)] = True
        start, count = infill.holes[r]
        generated[r, start : start + count] = True
    return SamplingResult(sample, real if return_full_text else generated, generated, result.nfe)
