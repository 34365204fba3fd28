"""Tokens per second: our ``DFMPipeline`` vs diffusers' ``LLaDA2Pipeline`` running the SAME
``DFMForMaskedGeneration`` weights on the same prompt, generation length and total number of steps.

``LLaDA2Pipeline`` calls ``model(x, attention_mask=(batch, len) 0/1, position_ids=arange).logits`` on the window
``[prompt | blocks so far]`` and reads full ``(batch, len, vocab)`` logits; :class:`LLaDA2Adapter` passes that call
to our model (``position_ids`` must be ``0..len-1``: our model's rotary positions; the mask has the same meaning;
the mask token's logit is made the lowest, as our schedulers exclude it too).
It generates block by block (``block_length`` 32), ``num_inference_steps`` refinement steps per block: we give it
``steps / blocks`` per block, so both pipelines take the same number of steps in total. Its other settings are the
pipeline's and ``BlockRefinementScheduler``'s defaults (greedy, threshold 0.7, editing threshold 0.5); no EOS id, so
no early stop. Ours, ``skip_idle_steps=True`` and ``use_logits_to_keep=True`` (the defaults):
``confidence-blocks`` (greedy low-confidence unmasking in blocks of ``block_length``, ``steps / blocks`` steps each:
LLaDA's algorithm, the like-for-like comparison), the DFM ``cubic-euler`` preset (target lines), and ``confidence``
(global ranking over every masked position, a different algorithm: an INFO line).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    emit,
    fmt_s,
    generator,
    print_header,
    random_pipeline,
    setup,
    time_alternating,
)


class LLaDA2Adapter(torch.nn.Module):
    """Our model behind LLaDA2Pipeline's call convention ``model(x, attention_mask=..., position_ids=...)``.

    It runs the wrapped ``DFMForMaskedGeneration`` itself (same weights, full logits) and counts the calls. The mask
    token's logit is set to the lowest float: ``BlockRefinementScheduler`` does not exclude the mask id from its
    draws (a trained LLaDA2 never predicts it), while our schedulers do; a random model would otherwise "commit" the
    mask token and leave the sequence masked.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mask_token_id = model.config.mask_token_id
        self.config = model.config
        self.calls = 0

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model (diffusers reads ``component.device``)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the wrapped model."""
        return self.model.dtype

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """Check ``position_ids`` are ``0..len-1`` for every row (what our rotary embedding uses), then run."""
        if position_ids is not None:
            expected = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            if not torch.equal(position_ids, expected):
                raise ValueError("LLaDA2Adapter: the DFM model uses positions 0..len-1; got other position_ids.")
        self.calls += 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        out.logits[..., self.mask_token_id] = torch.finfo(out.logits.dtype).min
        return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64, help="total steps (theirs: steps / blocks per block)")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="rows: distinct random prompts of equal length")
    args = parser.parse_args()
    setup(args)
    if args.quick:
        args.vocab, args.hidden, args.layers, args.intermediate = 4096, 64, 2, 176
        args.prompt_length, args.gen_length, args.steps, args.block_length = 16, 32, 8, 16
    rounds = args.repeats or (2 if args.quick else 5)
    if args.gen_length % args.block_length:
        raise SystemExit("--gen-length must be a multiple of --block-length")
    blocks = args.gen_length // args.block_length
    if args.steps % blocks:
        raise SystemExit(f"--steps must be a multiple of the number of blocks ({blocks})")
    per_block = args.steps // blocks

    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

    model_cfg = dict(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate
    )
    total_len = -(-(args.prompt_length + args.gen_length) // args.block_length) * args.block_length
    pipe = random_pipeline(**model_cfg, max_positions=total_len, device=args.device, seed=args.seed)
    mask_id = pipe.mask_token_id
    conf = pipe.scheduler_presets["confidence"].config
    presets = {
        "confidence-blocks": ConfidenceUnmaskingScheduler.from_config(conf, block_length=args.block_length),
        "cubic-euler": pipe.scheduler_presets["cubic-euler"],
        "confidence": ConfidenceUnmaskingScheduler.from_config(conf),
    }
    targeted = ("confidence-blocks", "cubic-euler")
    adapter = LLaDA2Adapter(pipe.model)
    theirs_pipe = LLaDA2Pipeline(model=adapter, scheduler=BlockRefinementScheduler(block_length=args.block_length))
    theirs_pipe.set_progress_bar_config(disable=True)
    prompt = torch.randint(1, args.vocab - 1, (args.batch, args.prompt_length), generator=generator("cpu", args.seed))

    print_header(
        "tokens/s: DFMPipeline vs diffusers LLaDA2Pipeline, same DFMForMaskedGeneration weights",
        args.device,
        {
            **model_cfg,
            "batch": args.batch,
            "prompt": args.prompt_length,
            "gen_length": args.gen_length,
            "rounds": rounds,
        },
    )
    print(
        f"# theirs: LLaDA2Pipeline, BlockRefinementScheduler(block_length={args.block_length}) defaults, "
        f"num_inference_steps={per_block} per block x {blocks} blocks = {args.steps} steps, temperature=0.0, "
        "threshold=0.7, editing_threshold=0.5, sampling_method='multinomial' (greedy at temperature 0), "
        "eos_token_id=None"
    )
    for name, sched in presets.items():
        cfg = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        print(f"# ours {name}: {type(sched).__name__} {cfg}, num_inference_steps={args.steps}, skip_idle_steps=True")
    sys.stdout.flush()

    outs: dict[str, Any] = {}

    def ours(name: str) -> None:
        pipe.scheduler = presets[name]
        outs[name] = pipe(
            input_ids=prompt,
            gen_length=args.gen_length,
            num_inference_steps=args.steps,
            generator=generator(args.device, args.seed),
            output_type="pt",
            return_full_text=False,
        )

    def theirs() -> None:
        adapter.calls = 0
        outs["llada2"] = theirs_pipe(
            input_ids=prompt.to(args.device),
            gen_length=args.gen_length,
            block_length=args.block_length,
            num_inference_steps=per_block,
            mask_token_id=mask_id,
            eos_token_id=None,
            generator=generator(args.device, args.seed),
            output_type="seq",
        )
        outs["llada2_calls"] = adapter.calls

    fns: dict[str, Any] = {name: (lambda name=name: ours(name)) for name in presets}
    fns["llada2"] = theirs
    timing = time_alternating(fns, args.device, rounds, reference="llada2")
    tokens = args.gen_length * args.batch
    theirs_tps = tokens / timing.times["llada2"]
    theirs_seq = outs["llada2"].sequences
    if bool((theirs_seq == mask_id).any()):
        raise SystemExit("LLaDA2Pipeline left mask tokens: the comparison would not be like for like")
    for name in presets:
        seq = outs[name].sequences
        assert seq.shape == (args.batch, args.gen_length) and not bool((seq == mask_id).any())
        ours_tps = tokens / timing.times[name]
        emit(
            f"tokens/s ours ({name}, nfe {outs[name].nfe}) vs LLaDA2Pipeline (model calls {outs['llada2_calls']}), "
            f"gen {args.gen_length}, {args.steps} steps",
            f"{ours_tps:.1f} tok/s ({fmt_s(timing.times[name])})",
            f"{theirs_tps:.1f} tok/s ({fmt_s(timing.times['llada2'])})",
            timing.ratios[name],  # per-round theirs_time / ours_time = ours tok/s / theirs tok/s
            ">=" if name in targeted else None,
            1.3,
        )


if __name__ == "__main__":
    main()
