"""DFMPipeline: determinism, save/load, infilling, batching, caching, scheduler swapping, presets, LoRA, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_pipeline

from dfm_hf.pipelines import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_same_seed_same_output_and_after_save_load(pipe, tmp_path):
    a = pipe("def f(x):", gen_length=12, num_inference_steps=8, generator=gen(0))
    b = pipe("def f(x):", gen_length=12, num_inference_steps=8, generator=gen(0))
    c = pipe("def f(x):", gen_length=12, num_inference_steps=8, generator=gen(1))
    assert a.texts == b.texts and torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert a.texts[0].startswith("def f(x):")
    pipe.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model" / "model.safetensors")
    assert os.path.isfile(tmp_path / "scheduler_presets" / "cubic-corrector" / "scheduler_config.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    loaded = DFMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    d = loaded("def f(x):", gen_length=12, num_inference_steps=8, generator=gen(0))
    assert torch.equal(a.sequences, d.sequences) and a.texts == d.texts
    assert sorted(loaded.scheduler_presets) == sorted(pipe.scheduler_presets)


def test_load_with_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    half = DFMPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 300, (1, 12), generator=gen(0))
    with torch.no_grad():
        exact, rounded = pipe.model(ids).logits, half.model(ids).logits
    assert rounded.dtype == torch.bfloat16
    assert torch.allclose(rounded.float(), exact, atol=0.1)  # the same weights, rounded to bfloat16
    out = half(gen_length=8, num_inference_steps=4, generator=gen(0), output_type="pt")
    assert out.sequences.shape == (1, 8) and not (out.sequences == half.mask_token_id).any()
    mapped = DFMPipeline.from_pretrained(tmp_path, device_map="cpu")
    assert mapped.model.device.type == "cpu" and mapped.hf_device_map == "cpu"


def test_model_index_names_public_dfm_hf_classes(pipe, tmp_path):
    """diffusers' ``from_pretrained`` imports the library named in model_index.json and looks each class up on it
    by name: the entries name the ``dfm_hf`` package, never a private module path."""
    import importlib

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DFMPipeline"
    assert index["model"] == ["dfm_hf", "DFMForMaskedGeneration"]
    assert index["scheduler"] == ["dfm_hf", "DiscreteFlowScheduler"]
    loaded = DFMPipeline.from_pretrained(tmp_path)
    for name in ("model", "scheduler", "tokenizer"):
        library, class_name = index[name]
        assert type(getattr(loaded, name)) is getattr(importlib.import_module(library), class_name)
    assert importlib.import_module("dfm_hf").DFMPipeline is DFMPipeline


def test_infilling_keeps_every_given_token(pipe):
    mask = pipe.tokenizer.mask_token
    prompt = f"def add(a, b):\n    return {mask * 5}\n\nprint(add(1, 2))"
    given = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = pipe(prompt, gen_length=0, num_inference_steps=5, generator=gen(0), output_type="pt")
    seq = out.sequences[0].tolist()
    assert len(seq) == len(given)
    for g, s in zip(given, seq):
        if g == pipe.tokenizer.mask_token_id:
            assert s != g
        else:
            assert s == g
    text = pipe(prompt, gen_length=0, num_inference_steps=5, generator=gen(0)).texts[0]
    assert text.startswith("def add(a, b):\n    return ") and text.endswith("\n\nprint(add(1, 2))")
    only = pipe(prompt, gen_length=0, num_inference_steps=5, generator=gen(0), return_full_text=False)
    assert only.sequences.shape == (1, 5)


def test_batch_invariance_with_per_row_generators(pipe):
    prompts = ["import os", "class A:\n    def __init__(self):", "x = 1"]
    batch = pipe(prompts, gen_length=10, num_inference_steps=10, generator=[gen(s) for s in (5, 6, 7)])
    for i, p in enumerate(prompts):
        alone = pipe(p, gen_length=10, num_inference_steps=10, generator=[gen(5 + i)])
        assert alone.texts[0] == batch.texts[i]
    two = pipe(prompts, gen_length=10, num_inference_steps=10, num_samples_per_prompt=2, generator=gen(0))
    assert len(two.texts) == 6


def test_cached_equals_uncached_with_fewer_nfe(pipe):
    kwargs = dict(gen_length=16, num_inference_steps=64, generator=None, output_type="pt")
    cached = pipe("def g():", **{**kwargs, "generator": gen(3)})
    full = pipe("def g():", skip_idle_steps=False, **{**kwargs, "generator": gen(3)})
    no_keep = pipe("def g():", use_logits_to_keep=False, **{**kwargs, "generator": gen(3)})
    assert torch.equal(cached.sequences, full.sequences) and torch.equal(cached.sequences, no_keep.sequences)
    assert full.nfe == 64
    assert cached.nfe <= 16 < full.nfe


def test_time_conditioned_model_is_also_exact_when_skipping():
    pipe = tiny_pipeline(time_conditioning=True)
    cached = pipe("a = ", gen_length=8, num_inference_steps=32, generator=gen(1), output_type="pt")
    full = pipe("a = ", gen_length=8, num_inference_steps=32, generator=gen(1), output_type="pt", skip_idle_steps=False)
    assert torch.equal(cached.sequences, full.sequences) and cached.nfe < full.nfe


def test_swap_scheduler_class_and_config_round_trip(pipe, tmp_path):
    p = tiny_pipeline()
    base = p("def f():", gen_length=12, num_inference_steps=12, generator=gen(0)).sequences
    p.scheduler = DiscreteFlowScheduler.from_config(p.scheduler.config, kappa_exponent=3.0)
    cubic = p("def f():", gen_length=12, num_inference_steps=12, generator=gen(0)).sequences
    assert not torch.equal(base, cubic)
    p.scheduler = ConfidenceUnmaskingScheduler.from_config(p.scheduler.config)
    conf = p("def f():", gen_length=12, num_inference_steps=12, generator=gen(0))
    assert conf.nfe == 12 and (conf.sequences != p.tokenizer.mask_token_id).all()
    p.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["dfm_hf", "ConfidenceUnmaskingScheduler"]
    loaded = DFMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, ConfidenceUnmaskingScheduler)
    again = loaded("def f():", gen_length=12, num_inference_steps=12, generator=gen(0))
    assert torch.equal(again.sequences, conf.sequences)


def test_presets_load_by_subfolder_and_helper(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    s = DiscreteFlowScheduler.from_pretrained(tmp_path, subfolder="scheduler_presets/cubic-corrector")
    assert s.config.kappa_exponent == 3.0 and s.config.corrector_alpha > 0
    p = DFMPipeline.from_pretrained(tmp_path)
    p.set_progress_bar_config(disable=True)
    sch = p.load_scheduler_preset("cubic-corrector")
    assert p.scheduler is sch and sch.config.corrector_alpha > 0
    out = p("x = [", gen_length=8, num_inference_steps=16, generator=gen(0), output_type="pt")
    assert (out.sequences != p.tokenizer.mask_token_id).all()
    assert isinstance(p.load_scheduler_preset("confidence"), ConfidenceUnmaskingScheduler)
    blocks = p.load_scheduler_preset("confidence-blocks")
    assert blocks.config.block_length == 32
    seen = []

    def record(pipe, i, t, kw):
        seen.append((kw["sample"][0, -40:] == pipe.tokenizer.mask_token_id).tolist())
        return {}

    kw = dict(gen_length=40, num_inference_steps=8, output_type="pt", return_full_text=False)
    fast = p(
        "x = [", generator=gen(0), callback_on_step_end=record, callback_on_step_end_tensor_inputs=["sample"], **kw
    )
    slow = p("x = [", generator=gen(0), skip_idle_steps=False, use_logits_to_keep=False, **kw)
    assert torch.equal(fast.sequences, slow.sequences) and (fast.sequences != p.tokenizer.mask_token_id).all()
    # 2 blocks x 4 steps: the first block (32 tokens) is done after step 4, the second is untouched until then
    assert not any(seen[3][:32]) and all(seen[3][32:]) and not any(seen[-1])
    with pytest.raises(ValueError, match="name"):
        p.load_scheduler_preset("nope")


def test_eos_truncates_text(pipe):
    eos = pipe.tokenizer.eos_token_id

    def put_eos(p, i, t, kw):  # the callback may replace the sample: plant an EOS in the completion
        sample = kw["sample"].clone()
        if i == 5:
            sample[0, 5] = eos
        return {"sample": sample}

    out = pipe(input_ids=[[40, 41, 42]], gen_length=6, num_inference_steps=6, generator=gen(0),
               callback_on_step_end=put_eos, callback_on_step_end_tensor_inputs=["sample"])  # fmt: skip
    seq = out.sequences[0].tolist()
    assert seq[5] == eos
    assert out.texts[0] == pipe.tokenizer.decode(seq[:5], skip_special_tokens=True)


def test_callback_and_progress_bar(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, float(t), int((kw["sample"] == p.tokenizer.mask_token_id).sum())))
        return {}

    import io

    bar = io.StringIO()
    pipe.set_progress_bar_config(file=bar, ascii=True)  # the module's pipe has its bar disabled: on, into `bar`
    try:
        pipe("a", gen_length=6, num_inference_steps=6, generator=gen(0), callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=["sample"])  # fmt: skip
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert [s[0] for s in seen] == list(range(6)) and seen[-1][2] == 0
    masks = [s[2] for s in seen]
    assert masks == sorted(masks, reverse=True)
    # the bar went from 0 to all 6 steps (tqdm may skip drawing states in between)
    states = [s.strip() for s in bar.getvalue().split("\r") if s.strip()]
    assert "0/6" in states[0] and "6/6" in states[-1] and "100%" in states[-1], states
    silent = io.StringIO()
    pipe.set_progress_bar_config(file=silent, disable=True)
    pipe("a", gen_length=6, num_inference_steps=6, generator=gen(0))
    assert silent.getvalue() == ""  # disable=True draws nothing


def _make_adapter(pipe, path, seed=0):
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(pipe.model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, prm in peft_model.named_parameters():
            if "lora_B" in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    peft_model.save_pretrained(path)


def test_lora_load_changes_and_unload_restores_exactly(tmp_path):
    p = tiny_pipeline(seed=1)
    _make_adapter(p, tmp_path / "lora")
    ids = torch.randint(3, 300, (1, 12), generator=gen(0))
    base_logits = p.model(ids).logits
    base = p("def f():", gen_length=10, num_inference_steps=10, generator=gen(0)).sequences
    p.load_lora_weights(tmp_path / "lora", adapter_name="py")
    assert type(p.model).__name__ == "DFMForMaskedGeneration"
    lora_logits = p.model(ids).logits
    assert not torch.allclose(lora_logits, base_logits)
    adapted = p("def f():", gen_length=10, num_inference_steps=10, generator=gen(0)).sequences
    assert not torch.equal(adapted, base)
    p.set_adapters(["py"], adapter_weights=0.0)
    assert torch.allclose(p.model(ids).logits, base_logits, atol=1e-6)
    p.set_adapters("py", 1.0)
    with pytest.raises(ValueError, match="unfused"):
        p.save_pretrained(tmp_path / "bad")
    p.fuse_lora()
    assert torch.allclose(p.model(ids).logits, lora_logits, atol=1e-5)
    p.save_pretrained(tmp_path / "fused")
    fused = DFMPipeline.from_pretrained(tmp_path / "fused")
    assert torch.allclose(fused.model(ids).logits, lora_logits, atol=1e-5)
    p.unfuse_lora()
    p.unload_lora_weights()
    assert torch.allclose(p.model(ids).logits, base_logits, atol=1e-5)
    q = tiny_pipeline(seed=1)
    q.load_lora_weights(tmp_path / "lora")
    q.unload_lora_weights()
    assert torch.equal(q.model(ids).logits, base_logits)
    assert torch.equal(q("def f():", gen_length=10, num_inference_steps=10, generator=gen(0)).sequences, base)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(gen_length=-1), "gen_length"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(gen_length=10_000), "max_position_embeddings"),
        (dict(gen_length=0), "gen_length"),
        (dict(output_type="np"), "output_type"),
        (dict(num_samples_per_prompt=0), "num_samples_per_prompt"),
        (dict(temperature=-1.0), "temperature"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generator"),
        (dict(input_ids=[[1, 99999]]), "input_ids"),
    ],
)
def test_bad_call_inputs_raise_before_model(kwargs, name):
    p = tiny_pipeline()
    calls = []
    p.model.register_forward_hook(lambda *a: calls.append(1))
    args = {"prompt": "x"} if "input_ids" not in kwargs else {}
    with pytest.raises(ValueError, match=name):
        p(**args, **{"gen_length": 4, "num_inference_steps": 4, **kwargs})
    assert not calls


def test_mismatched_components_raise():
    p = tiny_pipeline()
    p.scheduler = DiscreteFlowScheduler(mask_token_id=p.tokenizer.mask_token_id, vocab_size=999)
    with pytest.raises(ValueError, match="vocab_size"):
        p("x", gen_length=2, num_inference_steps=2)
    p = tiny_pipeline()
    p.scheduler = DiscreteFlowScheduler(mask_token_id=1, vocab_size=p.model.config.vocab_size)
    with pytest.raises(ValueError, match="mask_token_id"):
        p("x", gen_length=2, num_inference_steps=2)
    p = tiny_pipeline()
    p.tokenizer.mask_token = None
    with pytest.raises(ValueError, match="tokenizer"):
        p("x", gen_length=2, num_inference_steps=2)


def test_refuses_pickle_weights(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    os.remove(tmp_path / "model" / "model.safetensors")
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        DFMPipeline.from_pretrained(tmp_path)
