"""diffusers' discrete schedulers and pipelines interchange with ours: their schedulers drive DFMPipeline (same greedy
tokens as LLaDA2Pipeline on the same weights), ours drive LLaDA2Pipeline and DiffusionGemmaPipeline unmodified (same
greedy tokens as DFMPipeline; deterministic with a seed), and what cannot apply is refused. Tiny random CPU models."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    BlockRefinementScheduler,
    DDPMScheduler,
    DiscreteDDIMScheduler,
    EntropyBoundScheduler,
    LLaDA2Pipeline,
)
from helpers import tiny_tokenizer

from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler, DiscreteSchedulerOutput

K = 4  # the block model's block size
MASK = 2  # tiny_tokenizer's mask id


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def dfm_pipe(block_size=None, scheduler=None, seed: int = 0, tokenizer: bool = False) -> DFMPipeline:
    """A tiny random DFM pipeline (no EOS: neither pipeline stops early) with peaked logits (init 0.3)."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = DFMConfig.from_preset("tiny", tokenizer=tok, block_size=block_size, eos_token_id=None, initializer_range=0.3)
    model = DFMForMaskedGeneration(cfg).eval()
    if scheduler is None:
        scheduler = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=cfg.vocab_size)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok if tokenizer else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def llada2(pipe: DFMPipeline, scheduler) -> LLaDA2Pipeline:
    out = LLaDA2Pipeline(model=pipe.model, scheduler=scheduler, tokenizer=None)
    out.set_progress_bar_config(disable=True)
    return out


def prompt_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


def ours(pipe: DFMPipeline, ids: torch.Tensor, gen_length: int, steps: int, **kwargs) -> torch.Tensor:
    kwargs.setdefault("return_full_text", False)
    return pipe(input_ids=ids, gen_length=gen_length, num_inference_steps=steps, output_type="pt", **kwargs).sequences


def theirs(pipe: LLaDA2Pipeline, ids: torch.Tensor, gen_length: int, steps: int, block: int, **kwargs) -> torch.Tensor:
    kwargs.setdefault("editing_threshold", None)
    out = pipe(
        input_ids=ids,
        gen_length=gen_length,
        block_length=block,
        num_inference_steps=steps,
        mask_token_id=MASK,
        output_type="seq",
        **kwargs,
    )
    return out.sequences


# ---------------------------------------------------------------- their schedulers in DFMPipeline
@pytest.mark.parametrize("threshold", [0.95, 0.02])
@pytest.mark.parametrize("kv_cache", ["auto", None])
def test_block_refinement_in_dfm_pipeline_matches_llada2_on_a_block_model(threshold, kv_cache):
    """Greedy, same weights: DFMPipeline with BlockRefinementScheduler gives LLaDA2Pipeline's tokens (prompt of 6, the
    prompt's block finished first, 14 tokens in 4 blocks of N = 3 steps; two rows)."""
    pipe = dfm_pipe(block_size=K)
    scheduler = BlockRefinementScheduler(block_length=K, threshold=threshold)
    pipe.scheduler = scheduler
    ids = prompt_ids(2, 6)
    expected = theirs(llada2(pipe, scheduler), ids, 14, 3, K, threshold=threshold)
    got = ours(pipe, ids, 14, 3 * 4, kv_cache=kv_cache)
    assert torch.equal(got, expected)
    assert not (got == MASK).any()


def test_block_refinement_in_dfm_pipeline_matches_llada2_on_a_full_attention_model():
    """A full-attention model, one block of 8 after a prompt of 8 (LLaDA2Pipeline feeds the sequence up to the open
    block's end: the whole sequence here)."""
    pipe = dfm_pipe()
    scheduler = BlockRefinementScheduler(block_length=8, threshold=0.95)
    pipe.scheduler = scheduler
    ids = prompt_ids(2, 8, seed=1)
    expected = theirs(llada2(pipe, scheduler), ids, 8, 4, 8, threshold=0.95)
    assert torch.equal(ours(pipe, ids, 8, 4), expected)


def test_block_refinement_batches_padding_and_generators_row_for_row():
    """Sampled (temperature 1) with one generator per row, padded prompts of different lengths: each row of the batch
    is the solo call with its generator (rows stepped apart, windows gathered per row)."""
    pipe = dfm_pipe()
    pipe.scheduler = BlockRefinementScheduler(block_length=4, threshold=0.95)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batch = pipe(
        input_ids=prompts, gen_length=8, num_inference_steps=4, temperature=1.0, generator=gens, output_type="pt"
    )
    for b, ids in enumerate(prompts):
        solo = pipe(
            input_ids=[ids],
            gen_length=8,
            num_inference_steps=4,
            temperature=1.0,
            generator=torch.Generator().manual_seed(3 + b),
            output_type="pt",
        )
        assert torch.equal(batch.sequences[b, : solo.sequences.shape[1]], solo.sequences[0])
    greedy = pipe(input_ids=prompts, gen_length=8, num_inference_steps=4, output_type="pt").sequences
    assert not torch.equal(greedy, batch.sequences)
    full = pipe(input_ids=prompts, gen_length=8, num_inference_steps=4, output_type="pt", skip_idle_steps=False)
    assert torch.equal(full.sequences, greedy)  # full logits instead of the packed rows: the same step


def test_block_refinement_with_guidance_infilling_callbacks_and_the_dual_cache():
    pipe = dfm_pipe()
    pipe.scheduler = BlockRefinementScheduler(block_length=4, threshold=0.95)
    ids = [[5, 6, MASK, MASK, 7, 8]]
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), int((kwargs["sample"] == MASK).sum())))
        return {}

    out = pipe(
        input_ids=ids,
        gen_length=8,
        num_inference_steps=4,
        guidance_scale=2.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["sample"],
        output_type="pt",
    )
    assert out.sequences.shape == (1, 14) and not (out.sequences == MASK).any()
    assert out.sequences[0, :2].tolist() == [5, 6] and out.sequences[0, 4:6].tolist() == [7, 8]
    assert [s[0] for s in seen] == [0, 1, 2, 3] and [s[1] for s in seen] == [0, 1, 2, 3]
    assert [s[2] for s in seen] == sorted((s[2] for s in seen), reverse=True) and seen[-1][2] == 0
    plain = pipe(input_ids=ids, gen_length=8, num_inference_steps=4, output_type="pt").sequences
    cached = pipe(
        input_ids=ids, gen_length=8, num_inference_steps=4, output_type="pt", kv_cache="dual", kv_cache_refresh_steps=1
    )
    assert torch.equal(cached.sequences, plain)


@pytest.mark.parametrize(
    "scheduler, kwargs",
    [(DiscreteDDIMScheduler(), dict(temperature=1.0)), (EntropyBoundScheduler(entropy_bound=0.5), {})],
    ids=["ddim", "entropy-bound"],
)
def test_uniform_source_schedulers_in_dfm_pipeline(scheduler, kwargs):
    """DiscreteDDIM / EntropyBound on a full-attention model: seeded calls repeat, batch rows are solo rows."""
    pipe = dfm_pipe(scheduler=scheduler)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    first = pipe(input_ids=prompts, gen_length=6, num_inference_steps=4, generator=gens(), output_type="pt", **kwargs)
    again = pipe(input_ids=prompts, gen_length=6, num_inference_steps=4, generator=gens(), output_type="pt", **kwargs)
    assert torch.equal(first.sequences, again.sequences) and first.nfe == 4
    solo = pipe(
        input_ids=prompts[1:],
        gen_length=6,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
        **kwargs,
    )
    assert torch.equal(first.sequences[1], solo.sequences[0])
    assert first.sequences[0, :3].tolist() == [5, 6, 7]


def test_foreign_schedulers_load_save_and_travel_as_presets(tmp_path):
    pipe = dfm_pipe(tokenizer=True)
    scheduler = BlockRefinementScheduler(block_length=4, threshold=0.9)
    pipe.scheduler_presets["refine"] = scheduler
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DFMPipeline.from_pretrained(tmp_path / "pipe", scheduler=scheduler)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler is scheduler
    ids = prompt_ids(1, 5)
    expected = ours(loaded, ids, 8, 4)
    preset = loaded.load_scheduler_preset("refine")
    assert isinstance(preset, BlockRefinementScheduler) and preset.config.threshold == 0.9
    assert torch.equal(ours(loaded, ids, 8, 4), expected)
    loaded.save_pretrained(tmp_path / "again")
    reloaded = DFMPipeline.from_pretrained(tmp_path / "again")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, BlockRefinementScheduler)
    assert torch.equal(ours(reloaded, ids, 8, 4), expected)
    reloaded.scheduler = DiscreteFlowScheduler.from_config(reloaded.scheduler.config, mask_token_id=MASK)
    assert not (ours(reloaded, ids, 8, 4) == MASK).any()
    reloaded.scheduler = BlockRefinementScheduler.from_config(reloaded.scheduler.config, block_length=4, threshold=0.9)
    assert torch.equal(ours(reloaded, ids, 8, 4), expected)


def test_what_cannot_apply_is_refused():
    block = dfm_pipe(block_size=K)
    full = dfm_pipe()
    cases = [
        (full, BlockRefinementScheduler(editing_threshold=0.5), {}, "editing_threshold"),
        (full, DiscreteDDIMScheduler(corrector_steps=1), {}, "corrector_steps"),
        (full, EntropyBoundScheduler(), dict(temperature=0.5), "temperature"),
        (full, DiscreteDDIMScheduler(), dict(top_k=5), "top_k"),
        (block, DiscreteDDIMScheduler(), {}, "uniform-source"),
        (full, DDPMScheduler(), {}, "`scheduler` must be"),
    ]
    for pipe, scheduler, kwargs, message in cases:
        pipe.scheduler = scheduler
        with pytest.raises(ValueError, match=message):
            pipe(input_ids=[[5, 6]], gen_length=4, num_inference_steps=2, output_type="pt", **kwargs)


# ---------------------------------------------------------------- our schedulers in their pipelines
@pytest.mark.parametrize("threshold", [None, 0.02])
def test_confidence_scheduler_in_llada2_matches_dfm_pipeline(threshold):
    """LLaDA2Pipeline(model=ours, scheduler=ours) runs unmodified and gives DFMPipeline's greedy tokens on our block
    model (LLaDA2Pipeline's ``threshold`` is the scheduler's ``confidence_threshold``; 2.0 never commits extra)."""
    scheduler = ConfidenceUnmaskingScheduler(mask_token_id=MASK, block_length=K, confidence_threshold=threshold)
    pipe = dfm_pipe(block_size=K, scheduler=scheduler)
    ids = prompt_ids(2, 6, seed=2)
    expected = ours(pipe, ids, 14, 2 * 4)
    got = theirs(llada2(pipe, scheduler), ids, 14, 2, K, threshold=2.0 if threshold is None else threshold)
    assert torch.equal(got, expected)
    assert not (got == MASK).any()


@pytest.mark.parametrize("threshold, editing", [(0.3, 0.3), (None, 0.2)])
def test_token_editing_in_llada2_matches_dfm_pipeline(threshold, editing):
    """LLaDA2.1's editing: LLaDA2Pipeline's ``editing_threshold`` / ``max_post_steps`` loop with our confidence
    scheduler gives DFMPipeline's tokens with ``ConfidenceUnmaskingScheduler(editing_threshold=, max_post_steps=)``
    (and editing changes them)."""
    settings = dict(mask_token_id=MASK, block_length=K, confidence_threshold=threshold)
    scheduler = ConfidenceUnmaskingScheduler(**settings, editing_threshold=editing, max_post_steps=2)
    pipe = dfm_pipe(block_size=K, scheduler=scheduler)
    ids = prompt_ids(2, 6, seed=2)
    expected = ours(pipe, ids, 14, 3 * 4)
    limit = 2.0 if threshold is None else threshold
    got = theirs(llada2(pipe, scheduler), ids, 14, 3, K, threshold=limit, editing_threshold=editing, max_post_steps=2)
    assert torch.equal(got, expected)
    unedited = ours(dfm_pipe(block_size=K, scheduler=ConfidenceUnmaskingScheduler(**settings)), ids, 14, 3 * 4)
    assert not torch.equal(expected, unedited)


def test_discrete_flow_scheduler_in_llada2_is_seeded():
    scheduler = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=384, corrector_alpha=1.0, kappa_exponent=2.0)
    pipe = dfm_pipe(block_size=K, scheduler=scheduler)
    runs = [
        theirs(
            llada2(pipe, scheduler),
            prompt_ids(1, 5),
            11,
            3,
            K,
            temperature=1.0,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not (runs[0] == MASK).any()


def test_diffusers_form_step_output_and_checks():
    sched = ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=16)
    sched.set_timesteps(2, block_length=4)
    logits = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    sample = torch.tensor([[7, MASK, MASK, MASK], [8, MASK, MASK, MASK]])
    prompt = torch.tensor([True, False, False, False])
    out = sched.step(logits, 0, sample, mask_token_id=MASK, temperature=0.0, prompt_mask=prompt, threshold=2.0)
    assert isinstance(out, DiscreteSchedulerOutput) and out.pred_logits is logits
    assert out.transfer_index.sum(1).tolist() == [2, 2] and not out.editing_transfer_index.any()  # ceil(4 / 2)
    assert torch.equal(out.prev_sample[out.transfer_index], out.sampled_tokens[out.transfer_index])
    assert out.prev_sample[:, 0].tolist() == [7, 8]
    expected = torch.softmax(logits, -1).gather(-1, out.sampled_tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.sampled_probs, expected)
    last = sched.step(logits, 1, out.prev_sample, mask_token_id=MASK, prompt_mask=prompt)
    assert not (last.prev_sample == MASK).any()
    with pytest.raises(TypeError, match="unexpected keyword"):
        sched.step(logits, 0, sample, bogus=1)
    with pytest.raises(ValueError, match="mask_token_id"):
        sched.step(logits, 0, sample, mask_token_id=3)
    flow = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=16)
    flow.set_timesteps(2, block_length=4)
    with pytest.raises(ValueError, match="editing_threshold"):
        flow.step(logits, 0, sample, editing_threshold=0.5)
    with pytest.raises(ValueError, match="one block of 4"):
        sched.step(torch.zeros(2, 5, 16), 0, torch.full((2, 5), MASK))
    finished = torch.zeros(2, dtype=torch.bool)
    x = torch.tensor([[9, 9, 1, 5, 6, 7], [9, 9, MASK, 1, 6, 7]])  # eos 1; the block is the last 4 columns
    done = sched.check_eos_finished(x, x, torch.ones_like(x, dtype=torch.bool), finished, 1, MASK, 2)
    assert done.tolist() == [True, False]
    assert sched.check_block_should_continue(1, True, False, None, 0, 0, finished)
    assert not sched.check_block_should_continue(1, False, False, None, 0, 0, finished)
    assert not sched.check_block_should_continue(2, True, False, None, 0, 0, finished)


def test_diffusers_form_int_step_is_our_step():
    """Without ``block_length`` an int step index runs our step on the whole sample (same tokens, richer output)."""
    sched = DiscreteFlowScheduler(mask_token_id=MASK, vocab_size=16)
    sched.set_timesteps(4)
    logits = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    sample = torch.full((3, 6), MASK)
    a = sched.step(logits, 1, sample, generator=torch.Generator().manual_seed(5))
    b = sched.step(logits, sched.timesteps[1], sample, generator=torch.Generator().manual_seed(5))
    assert isinstance(a, DiscreteSchedulerOutput) and torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.transfer_index, a.prev_sample != MASK)


@pytest.mark.slow
def test_uniform_flow_drives_diffusion_gemma_pipeline():
    """A uniform-source DiscreteFlowScheduler drives transformers' tiny random DiffusionGemma in diffusers'
    DiffusionGemmaPipeline: the same generator seed gives the same tokens."""
    from diffusers import DiffusionGemmaPipeline
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        max_position_embeddings=256,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=32,
    )
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, canvas_length=8)).eval()
    decoder = model.model.decoder
    build = type(decoder).create_diffusion_decoder_attention_mask
    # diffusers 0.42's pipeline passes `past_key_values=`, transformers 5.24's mask builder names it `cache=`
    decoder.create_diffusion_decoder_attention_mask = lambda *, past_key_values, **kw: build(
        cache=past_key_values, **kw
    )
    scheduler = DiscreteFlowScheduler(source_distribution="uniform", vocab_size=len(tok), temperature=1.0)
    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=tok)
    pipe.set_progress_bar_config(disable=True)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            prompt="def f(x):",
            gen_length=16,
            num_inference_steps=4,
            temperature=1.0,
            confidence_threshold=None,
            generator=generator,
            output_type="seq",
        ).sequences

    first = run(0)
    assert first.shape == (1, 16) and torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
