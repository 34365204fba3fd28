"""DFMPipeline call API: generator rules, callbacks, return types, removed names, chat messages, uniform source."""

from __future__ import annotations

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from helpers import tiny_pipeline

from dfm_hf import rng
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PROMPTS = ["import os", "class Stack:\n    def push(self, x):", "x = 1"]  # three different lengths

SCHEDULERS = {
    "mask-corrector": lambda tok, v: DiscreteFlowScheduler(
        mask_token_id=tok.mask_token_id, vocab_size=v, kappa_exponent=2.0, corrector_alpha=3.0
    ),
    "uniform-corrector": lambda tok, v: DiscreteFlowScheduler(
        source_distribution="uniform", mask_token_id=tok.mask_token_id, vocab_size=v, corrector_alpha=3.0
    ),
    "confidence": lambda tok, v: ConfidenceUnmaskingScheduler(
        mask_token_id=tok.mask_token_id, vocab_size=v, temperature=1.0
    ),
    "confidence-blocks": lambda tok, v: ConfidenceUnmaskingScheduler(
        mask_token_id=tok.mask_token_id, vocab_size=v, temperature=1.0, block_length=4
    ),
    "confidence-random": lambda tok, v: ConfidenceUnmaskingScheduler(
        mask_token_id=tok.mask_token_id, vocab_size=v, temperature=0.7, remasking="random"
    ),
}


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline(seed=4)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_single_generator_is_a_list_of_one_and_batches_reproduce_solo_calls(base, name):
    base.scheduler = SCHEDULERS[name](base.tokenizer, base.model.config.vocab_size)
    kw = dict(gen_length=12, num_inference_steps=6, output_type="pt")
    single = base(PROMPTS[1], generator=gen(0), **kw).sequences
    listed = base(PROMPTS[1], generator=[gen(0)], **kw).sequences
    assert torch.equal(single, listed)
    solos = [base(p, generator=gen(10 + i), **kw).sequences[0] for i, p in enumerate(PROMPTS)]
    batch = base(PROMPTS, generator=[gen(10 + i) for i in range(3)], **kw).sequences
    for i, solo in enumerate(solos):
        assert torch.equal(batch[i, : solo.shape[0]], solo), f"row {i} differs from its solo call"
    # and the draws matter: another seed gives other tokens
    assert not torch.equal(base(PROMPTS[1], generator=gen(1), **kw).sequences, single)


def test_uniform_source_starts_from_uniform_tokens_not_masks(base):
    mask = base.tokenizer.mask_token_id
    base.scheduler = SCHEDULERS["uniform-corrector"](base.tokenizer, base.model.config.vocab_size)
    seen = []
    hook = base.model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        out = base("def f():", gen_length=10, num_inference_steps=4, generator=gen(0), output_type="pt")
    finally:
        hook.remove()
    assert seen and not (seen[0] == mask).any()  # the model never sees the mask token of another source
    assert not (out.sequences == mask).any()


def test_rng_draws_on_the_generators_device_and_moves_the_result():
    g = gen(3)
    expected = torch.rand(5, generator=gen(3), dtype=torch.float64)
    drawn = rng.rand((5,), g, device="meta")  # a CPU generator, a result on another device
    assert drawn.device.type == "meta"
    assert torch.equal(rng.rand((5,), gen(3), device="cpu"), expected)
    ints = rng.randint(7, (4,), gen(1), device="meta")
    assert ints.device.type == "meta" and ints.dtype == torch.long
    positions = torch.tensor([[True, False, True], [False, True, True]])
    per_row = rng.rand_at(positions, [gen(5), gen(6)])
    assert torch.equal(per_row[0, [0, 2], 0], torch.rand(2, generator=gen(5), dtype=torch.float64))
    assert torch.equal(per_row[1, [1, 2], 0], torch.rand(2, generator=gen(6), dtype=torch.float64))
    assert per_row[0, 1, 0] == 0 and per_row[1, 0, 0] == 0
    one = rng.rand_at(positions, gen(5))  # one generator: the rows in turn, row-major
    assert torch.equal(one[positions][:, 0], torch.rand(4, generator=gen(5), dtype=torch.float64))
    tokens = rng.uniform_tokens_at([3, 2], 5, 2, [gen(0), gen(1)], "cpu")
    assert tokens.shape == (5,) and not (tokens == 2).any() and int(tokens.max()) < 5


class _RecordMasks(PipelineCallback):
    tensor_inputs = ["sample"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        pipeline._seen.append((type(self).__name__, int((callback_kwargs["sample"] == pipeline.mask_token_id).sum())))
        return callback_kwargs


class _PlantToken(PipelineCallback):
    tensor_inputs = ["sample", "condition_mask"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        sample = callback_kwargs["sample"].clone()
        assert callback_kwargs["condition_mask"].shape == sample.shape
        if step_index == 0:
            sample[0, -1] = 7  # the last generated position: nothing is left to draw there
        callback_kwargs["sample"] = sample
        return callback_kwargs


def test_diffusers_pipeline_callbacks_use_their_tensor_inputs(base):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    base.scheduler = DiscreteFlowScheduler.from_config(base.scheduler.config, corrector_alpha=0.0)
    base._seen = []
    out = base("a = ", gen_length=5, num_inference_steps=5, generator=gen(0), output_type="pt",
               callback_on_step_end=MultiPipelineCallbacks([_PlantToken(), _RecordMasks()]))  # fmt: skip
    assert [name for name, _ in base._seen] == ["_RecordMasks"] * 5
    assert base._seen[-1][1] == 0 and out.sequences[0, -1] == 7
    base._seen = []
    base("a = ", gen_length=5, num_inference_steps=5, generator=gen(0), callback_on_step_end=_RecordMasks())
    assert len(base._seen) == 5 and base.num_timesteps == 5


def test_return_dict_false_gives_the_same_cpu_tensors(base):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    out = base("x = [", gen_length=6, num_inference_steps=3, generator=gen(2))
    sequences, texts, nfe = base("x = [", gen_length=6, num_inference_steps=3, generator=gen(2), return_dict=False)
    assert sequences.device.type == "cpu" and out.sequences.device.type == "cpu"
    assert torch.equal(sequences, out.sequences) and texts == out.texts and nfe == out.nfe


@pytest.mark.parametrize("name", ["return_full_text", "return_dict", "skip_idle_steps", "use_logits_to_keep"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_boolean_arguments_must_be_booleans(base, name, value):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    with pytest.raises(TypeError, match=f"^`{name}` must be True or False, got {value!r}.$"):
        base("a", gen_length=4, num_inference_steps=2, **{name: value})


@pytest.mark.parametrize(
    "returned, message",
    [
        (3, "`callback_on_step_end` must return a dict of callback tensors (e.g. {'sample': ...}) or None, got int."),
        ({"sample": 1.5}, "the 'sample' returned by `callback_on_step_end` must be an integer tensor of shape (1, 5)"),
        ({"sample": torch.zeros(1, 2, dtype=torch.long)}, "must be an integer tensor of shape (1, 5), got (1, 2)."),
    ],
)
def test_a_callback_returning_something_else_than_a_dict_is_refused(base, returned, message):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    prompt = base.tokenizer("a = ")["input_ids"]
    with pytest.raises(TypeError) as err:
        base(input_ids=[prompt], gen_length=5 - len(prompt), num_inference_steps=2,
             callback_on_step_end=lambda pipe, i, t, kwargs: returned)  # fmt: skip
    assert message in str(err.value)


def test_use_cache_is_not_an_argument(base):
    """``skip_idle_steps`` has no ``use_cache`` alias (transformers users read ``use_cache`` as a KV cache)."""
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_cache'"):
        base("a", gen_length=6, num_inference_steps=4, use_cache=False)


def test_chat_messages_apply_the_template_with_the_generation_prompt(base):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    tok = base.tokenizer
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" + (
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        conv = [{"role": "user", "content": "def add(a, b):"}]
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<assistant>")
        chat = base(messages=conv, gen_length=6, num_inference_steps=3, generator=gen(0))
        raw = base(text, gen_length=6, num_inference_steps=3, generator=gen(0))
        assert chat.texts == raw.texts and chat.texts[0].startswith(text)
        two = base(messages=[conv, [{"role": "user", "content": "x"}]], gen_length=4, num_inference_steps=2)
        assert len(two.texts) == 2
        with pytest.raises(ValueError, match="messages"):
            base(messages=conv, prompt="x")
        with pytest.raises(ValueError, match="messages"):
            base(messages=[{"content": "no role"}])
    finally:
        tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        base(messages=conv)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale="2"), "guidance_scale"),
        (dict(kv_cache="both"), "kv_cache"),
        (dict(kv_cache="dual"), "block_length"),
        (dict(kv_cache_refresh_steps=2), "kv_cache_refresh_steps"),
    ],
)
def test_bad_new_arguments_are_named(base, kwargs, name):
    base.scheduler = SCHEDULERS["mask-corrector"](base.tokenizer, base.model.config.vocab_size)
    with pytest.raises(ValueError, match=name):
        base("x", gen_length=4, num_inference_steps=2, **kwargs)
