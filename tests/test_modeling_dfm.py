"""Tests of DFMConfig / DFMModel / DFMForMaskedGeneration (tiny configs, CPU)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dfm_hf.models import (
    DFM_PRESETS,
    DFMConfig,
    DFMForMaskedGeneration,
    DFMMaskedGenerationOutput,
    DFMModel,
    generalized_kl_loss,
    masked_cross_entropy_loss,
    register_auto_classes,
)
from dfm_hf.training import losses

VOCAB = 64
MASK = 63
PAD = 0
MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "src", "dfm_hf", "models")
#: The files of a checkpoint's remote code: the modeling file and the sibling modules it imports.
MODEL_FILES = (
    "cache.py",
    "configuration_dfm.py",
    "dit.py",
    "layers.py",
    "loading.py",
    "losses.py",
    "masking.py",
    "modeling_dfm.py",
    "modeling_outputs.py",
    "moe.py",
    "rope_parameters.py",
    "rotary.py",
    "validation.py",
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models on shared CPUs: one intra-op thread avoids oversubscription stalls (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> DFMConfig:
    kwargs = dict(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, max_position_embeddings=64)
    kwargs.update(overrides)
    return DFMConfig.from_preset("tiny", **kwargs)


def perturb_time_params(model: torch.nn.Module, std: float = 0.1) -> None:
    """The adaLN-Zero modulations start at zero (time-independent identity blocks); randomise them for tests."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modulation" in name:
                param.normal_(0.0, std)


def make_model(seed: int = 0, **overrides) -> DFMForMaskedGeneration:
    torch.manual_seed(seed)
    model = DFMForMaskedGeneration(tiny_config(**overrides))
    if model.config.time_conditioning:
        perturb_time_params(model)
    return model.eval()


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Random weights everywhere (biases and norm scales too: they start at 0 / 1), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g) * std
            param.copy_(1.0 + noise if name.endswith("layernorm.weight") or name.endswith("norm.weight") else noise)
    return model


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(hidden_size=66, num_attention_heads=4), "hidden_size"),
        (dict(hidden_size=60, num_attention_heads=4), "head dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(mask_token_id=VOCAB), "mask_token_id"),
        (dict(mask_token_id=-1), "mask_token_id"),
        (dict(time_conditioning="yes"), "time_conditioning"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(num_key_value_heads=2.0), "num_key_value_heads"),
        (dict(head_dim=15), "head_dim"),
        (dict(head_dim=0), "head_dim"),
        (dict(head_dim="16"), "head_dim"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(logits_shift="yes"), "logits_shift"),
        (dict(tie_word_embeddings=None), "tie_word_embeddings"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(" ", ".")):
        tiny_config(**kwargs)


def test_config_error_lists_accepted_values():
    with pytest.raises(ValueError, match="divisor of 4"):
        tiny_config(num_key_value_heads=3)


def test_config_drops_a_loss_type_key(tmp_path):
    """The training loss is not a model setting: a ``loss_type`` in config.json loads quietly and is not stored."""
    path = tmp_path / "config.json"
    tiny_config().save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    assert "loss_type" not in data
    path.write_text(json.dumps({**data, "loss_type": "generalized_kl"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DFMConfig.from_pretrained(tmp_path)
    assert "loss_type" not in loaded.to_dict() and not hasattr(loaded, "loss_type")
    assert "loss_type" not in tiny_config(loss_type="ce").to_dict()


def test_config_architecture_keys_defaults_and_head_dim():
    config = tiny_config()
    assert (config.num_key_value_heads, config.head_dim) == (4, 16)
    assert (config.attention_bias, config.logits_shift, config.tie_word_embeddings) == (False, False, True)
    # head_dim given: hidden_size need not be divisible by the heads
    odd = tiny_config(hidden_size=66, head_dim=12, num_key_value_heads=2)
    assert (odd.head_dim, odd.num_key_value_heads) == (12, 2)
    model = DFMForMaskedGeneration(odd)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 12, 66) and attn.o_proj.weight.shape == (66, 4 * 12)
    assert attn.k_proj.weight.shape == (2 * 12, 66) and attn.v_proj.weight.shape == (2 * 12, 66)
    assert attn.q_proj.bias is None and attn.o_proj.bias is None
    biased = DFMForMaskedGeneration(tiny_config(attention_bias=True))
    names = {n for n, _ in biased.named_parameters()}
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


class _FakeTokenizer:
    def __init__(self, mask_token_id=None):
        self.mask_token_id = mask_token_id
        self.pad_token_id = 1
        self.eos_token_id = 2
        self.bos_token_id = 3

    def __len__(self) -> int:
        return 100


def test_presets_and_tokenizer():
    assert set(DFM_PRESETS) == {"tiny", "small", "base"}
    for name, preset in DFM_PRESETS.items():
        config = DFMConfig.from_preset(name)
        assert config.hidden_size == preset["hidden_size"]
        assert config.head_dim % 2 == 0
    config = DFMConfig.from_preset("small", tokenizer=_FakeTokenizer(mask_token_id=99), time_conditioning=True)
    assert (config.vocab_size, config.mask_token_id, config.pad_token_id) == (100, 99, 1)
    assert (config.eos_token_id, config.bos_token_id, config.time_conditioning) == (2, 3, True)
    assert config.tie_word_embeddings is True
    with pytest.raises(ValueError, match="tokenizer"):
        DFMConfig.from_preset("tiny", tokenizer=_FakeTokenizer())
    with pytest.raises(ValueError, match="name"):
        DFMConfig.from_preset("huge")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(time_conditioning=True),
        dict(num_key_value_heads=2, attention_bias=True, head_dim=8, logits_shift=True, tie_word_embeddings=False),
    ],
)
def test_config_roundtrip(tmp_path, overrides):
    config = tiny_config(**overrides)
    config.save_pretrained(tmp_path)
    loaded = DFMConfig.from_pretrained(tmp_path)
    keys = ("vocab_size", "hidden_size", "mask_token_id", "time_conditioning", "rope_parameters")
    keys += ("num_key_value_heads", "attention_bias", "head_dim", "logits_shift", "tie_word_embeddings")
    for key in keys:
        assert getattr(loaded, key) == getattr(config, key), key
    for key, value in overrides.items():
        assert getattr(loaded, key) == value, key


# ------------------------------------------------------------------------------------------------------------------
# Model basics, Auto classes, save / load
# ------------------------------------------------------------------------------------------------------------------


def test_forward_shapes_tying_and_module_names():
    model = make_model()
    ids = random_ids()
    out = model(ids)
    assert isinstance(out, DFMMaskedGenerationOutput)
    assert out.logits.shape == (2, 12, VOCAB) and out.loss is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings() is model.lm_head
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert not any("time" in n or "modulation" in n for n, _ in model.named_parameters())
    tup = model(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[1], out.logits)
    model.config.return_dict = False  # return_dict=None follows the config
    assert isinstance(model(ids), tuple) and isinstance(model.model(ids), tuple)
    assert isinstance(model(ids, return_dict=True), DFMMaskedGenerationOutput)
    model.config.return_dict = True
    full = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    assert len(full.attentions) == model.config.num_hidden_layers
    assert full.attentions[0].shape == (2, model.config.num_attention_heads, 12, 12)
    torch.testing.assert_close(full.logits, out.logits, atol=1e-5, rtol=1e-5)


def test_auto_classes():
    register_auto_classes()
    register_auto_classes()  # idempotent
    config = AutoConfig.for_model("dfm", vocab_size=VOCAB, mask_token_id=MASK, hidden_size=32, num_attention_heads=2)
    assert isinstance(config, DFMConfig) and config.hidden_size == 32
    assert isinstance(AutoModel.from_config(config), DFMModel)
    assert isinstance(AutoModelForMaskedLM.from_config(config), DFMForMaskedGeneration)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_save_load_identical_logits(tmp_path, time_conditioning):
    model = make_model(time_conditioning=time_conditioning)
    ids = random_ids()
    t = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        expected = model(ids, timesteps=t).logits
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_dfm.py"} | set(MODEL_FILES) <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_dfm.DFMConfig"
    assert auto_map["AutoModelForMaskedLM"] == "modeling_dfm.DFMForMaskedGeneration"
    for loader in (DFMForMaskedGeneration, AutoModelForMaskedLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, DFMForMaskedGeneration)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.equal(loaded(ids, timesteps=t).logits, expected)
    eager = DFMForMaskedGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, timesteps=t).logits, expected, atol=1e-5, rtol=1e-5)


def test_load_with_dtype(tmp_path):
    """``from_pretrained(dtype=...)`` gives weights and logits of that dtype, the same weights rounded."""
    model = randomize_(make_model(time_conditioning=True), seed=8)
    ids = random_ids()
    t = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        expected = model(ids, timesteps=t).logits
    model.save_pretrained(tmp_path)
    half = DFMForMaskedGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(half.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), atol=0.0, rtol=0.0)
    with torch.no_grad():
        rounded = half(ids, timesteps=t).logits
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - expected).abs().max() < 0.1 * expected.abs().max()


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class _BlockDfmHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dfm_hf" or name.startswith("dfm_hf."):
                raise ModuleNotFoundError(f"dfm_hf is blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, _BlockDfmHf())
    try:
        import dfm_hf  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("dfm_hf should not be importable here")

    import torch
    from transformers import AutoModelForMaskedLM

    checkpoint, inputs, output = sys.argv[1:4]
    model = AutoModelForMaskedLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(model).__name__ == "DFMForMaskedGeneration", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not [m for m in sys.modules if m == "dfm_hf" or m.startswith("dfm_hf.")]
    data = torch.load(inputs)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], timesteps=data["timesteps"]).logits
    torch.save(logits, output)
    """
)


@pytest.mark.parametrize("block_size", [None, 4], ids=["bidirectional", "block"])
def test_remote_code_loads_without_dfm_hf(tmp_path, block_size):
    model = make_model(
        block_size=block_size,
        time_conditioning=True,
        num_key_value_heads=2,
        attention_bias=True,
        head_dim=8,
        logits_shift=True,
        tie_word_embeddings=False,
    )
    randomize_(model, seed=4)
    ids = random_ids()
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        expected = model(ids, timesteps=t).logits
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    torch.save({"input_ids": ids, "timesteps": t}, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-s", str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0.0, rtol=0.0)


# ------------------------------------------------------------------------------------------------------------------
# Attention: sdpa vs eager, padding, logits_to_keep
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_sdpa_matches_eager(time_conditioning):
    model = make_model(time_conditioning=time_conditioning)
    assert model.config._attn_implementation == "sdpa"
    ids = random_ids(3, 16)
    t = torch.tensor([0.0, 0.5, 0.99])
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        sdpa = model(ids, timesteps=t, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager = model(ids, timesteps=t, attention_mask=mask).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_does_not_change_real_positions(attn_implementation):
    model = make_model(time_conditioning=True)
    model.set_attn_implementation(attn_implementation)
    ids = random_ids(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 9:] = 0
    other = ids.clone()
    other[0, 9:] = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        a = model(ids, timesteps=t, attention_mask=mask).logits
        b = model(other, timesteps=t, attention_mask=mask).logits
        alone = model(ids[:1, :9], timesteps=t[:1]).logits
        fully_padded = model(ids, timesteps=t, attention_mask=torch.zeros_like(mask)).logits
    torch.testing.assert_close(a[0, :9], b[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=0.0, rtol=0.0)
    torch.testing.assert_close(a[0, :9], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all() and torch.isfinite(fully_padded).all()


def test_logits_to_keep_bool_and_index():
    model = make_model(time_conditioning=True)
    ids = random_ids(3, 10)
    t = torch.tensor([0.2, 0.4, 0.8])
    seen: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        full = model(ids, timesteps=t).logits
        keep = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) < 0.3
        packed = model(ids, timesteps=t, logits_to_keep=keep).logits
        idx = torch.tensor([7, 0, 3])
        gathered = model(ids, timesteps=t, logits_to_keep=idx).logits
        negative = model(ids, timesteps=t, logits_to_keep=torch.tensor([-1])).logits
    handle.remove()
    assert packed.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(packed, full[keep], atol=1e-6, rtol=1e-6)
    assert gathered.shape == (3, 3, VOCAB)
    torch.testing.assert_close(gathered, full[:, idx], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(negative, full[:, -1:], atol=1e-6, rtol=1e-6)
    # the LM head only ran on the kept rows
    assert seen == [(3, 10, 64), (int(keep.sum()), 64), (3, 3, 64), (3, 1, 64)]


def test_logits_to_keep_with_labels_scores_kept_positions():
    model = make_model()
    ids = random_ids(2, 10)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    keep = labels != -100
    with torch.no_grad():
        full = model(ids, labels=labels)
        kept = model(ids, labels=labels, logits_to_keep=keep)
    torch.testing.assert_close(full.loss, kept.loss, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Training: gradient checkpointing, overfitting, LoRA
# ------------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_same_gradients():
    model = make_model(time_conditioning=True).train()
    ids = random_ids(2, 12)
    t = torch.tensor([0.3, 0.7])

    def grads():
        model.zero_grad()
        model(ids, timesteps=t, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    assert model.supports_gradient_checkpointing
    for kwargs in (None, {"use_reentrant": True}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated alias of activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        checkpointed = grads()
        assert reference.keys() == checkpointed.keys()
        for name in reference:
            torch.testing.assert_close(checkpointed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_disable()


def _masked_batch(batch: int = 4, length: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randint(1, MASK, (batch, length), generator=g)
    masked = torch.rand(batch, length, generator=g) < 0.5
    x_t = torch.where(masked, torch.full_like(x1, MASK), x1)
    labels = torch.where(masked, x1, torch.full_like(x1, -100))
    return x_t, labels


def test_overfit_single_batch():
    model = make_model().train()
    x_t, labels = _masked_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = model(x_t, labels=labels).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0
    assert loss.item() < 0.05


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft 0.21 calls a transformers API deprecated in 5.x
def test_peft_lora_trains_and_merges():
    import peft  # a core dependency of dfm_hf: never skipped

    model = make_model()
    x_t, labels = _masked_batch(seed=3)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses_seen = []
    for _ in range(40):
        loss = peft_model(input_ids=x_t, labels=labels).loss
        losses_seen.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses_seen[-1] < losses_seen[0] - 0.3
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=x_t).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, DFMForMaskedGeneration)
    with torch.no_grad():
        torch.testing.assert_close(merged(x_t).logits, adapted, atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids():
    model = randomize_(make_model(time_conditioning=True, logits_shift=True), seed=2)
    ids = random_ids()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = model(input_ids=ids, timesteps=t)
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids), timesteps=t, labels=ids)
        base = model.model(inputs_embeds=model.get_input_embeddings()(ids), timesteps=t).last_hidden_state
    assert torch.equal(embedded.logits, expected.logits) and embedded.loss is not None
    assert base.shape == (2, 12, model.config.hidden_size)
    for call in (dict(), dict(input_ids=ids, inputs_embeds=torch.zeros(2, 12, 64))):
        with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
            model(timesteps=t, **call)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 12, 5), timesteps=t)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft 0.21 calls a transformers API deprecated in 5.x
def test_peft_prompt_tuning_trains_virtual_tokens():
    """PEFT prompt tuning (``task_type="FEATURE_EXTRACTION"``: the prompt-learning wrapper that prepends the virtual
    tokens' embeddings through ``inputs_embeds`` and returns the model's output) trains only the virtual tokens."""
    import peft

    virtual = 8
    model = randomize_(make_model(), seed=5)
    x_t, labels = _masked_batch(seed=3)
    labels = torch.where(labels != -100, torch.full_like(labels, 7), labels)  # a task a prompt can steer
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=virtual)
    peft_model = peft.get_peft_model(model, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.default.embedding.weight"]
    prompt_before = next(iter(trainable.values())).detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(trainable.values(), lr=0.1)
    peft_model.train()
    seen = []
    for _ in range(20):
        out = peft_model(input_ids=x_t, attention_mask=torch.ones_like(x_t))
        assert out.logits.shape == (x_t.shape[0], virtual + x_t.shape[1], VOCAB)
        loss = masked_cross_entropy_loss(out.logits[:, virtual:], labels)
        seen.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert seen[-1] < seen[0] - 2.0
    assert (next(iter(trainable.values())) - prompt_before).abs().max() > 1e-2
    for name, param in model.named_parameters():
        assert torch.equal(param, frozen[name]), name


# ------------------------------------------------------------------------------------------------------------------
# Time conditioning
# ------------------------------------------------------------------------------------------------------------------


def test_time_conditioning_on_and_off():
    ids = random_ids(2, 10)
    # False: no time parameters, t ignored (and optional)
    plain = make_model(time_conditioning=False)
    with torch.no_grad():
        a = plain(ids).logits
        b = plain(ids, timesteps=torch.tensor([0.1, 0.9])).logits
        c = plain(ids, timesteps=0.5).logits
    assert torch.equal(a, b) and torch.equal(a, c)

    # True at initialisation: adaLN-Zero -> blocks are identities, output does not depend on t yet
    torch.manual_seed(0)
    fresh = DFMForMaskedGeneration(tiny_config(time_conditioning=True)).eval()
    assert any("time_embedding" in n for n, _ in fresh.named_parameters())
    for name, param in fresh.named_parameters():
        if "modulation" in name:
            assert torch.count_nonzero(param) == 0, name
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, timesteps=0.1).logits, fresh(ids, timesteps=0.9).logits)

    # True once trained (perturbed): depends on t; scalar forms equal the per-row form
    timed = make_model(time_conditioning=True)
    with torch.no_grad():
        low = timed(ids, timesteps=torch.tensor([0.1, 0.1])).logits
        high = timed(ids, timesteps=torch.tensor([0.9, 0.9])).logits
        scalar = timed(ids, timesteps=0.1).logits
        zero_d = timed(ids, timesteps=torch.tensor(0.1)).logits
    assert (low - high).abs().max() > 1e-3
    torch.testing.assert_close(scalar, low)
    torch.testing.assert_close(zero_d, low)
    timed.train()
    loss = timed(ids, timesteps=torch.rand(2), labels=ids).loss
    loss.backward()
    assert timed.model.time_embedding.linear_1.weight.grad is not None
    with pytest.raises(ValueError, match="timesteps"):
        timed(ids)


# ------------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------------


def test_ce_loss_matches_cross_entropy():
    model = make_model()
    x_t, labels = _masked_batch(2, 12, seed=7)
    with torch.no_grad():
        out = model(x_t, labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # Trainer gradient accumulation: the sum is divided by num_items_in_batch
    count = int((labels != -100).sum())
    with torch.no_grad():
        halved = model(x_t, labels=labels, num_items_in_batch=torch.tensor(2 * count)).loss
    torch.testing.assert_close(halved, out.loss / 2)
    torch.testing.assert_close(losses.dfm_loss(out.logits, labels), out.loss)
    # nothing scored -> 0, not NaN
    with torch.no_grad():
        assert model(x_t, labels=torch.full_like(labels, -100)).loss.item() == 0.0
    # the training loss is the caller's: the forward takes no training-only arguments (conditioning positions are
    # unscored through `labels`), and refuses them by name instead of ignoring them
    cond = torch.zeros_like(labels, dtype=torch.bool)
    for extra in (dict(condition_mask=cond), dict(kappa_rate=torch.ones(2))):
        with pytest.raises(TypeError, match=next(iter(extra))):
            model(x_t, labels=labels, **extra)


def generalized_kl_reference(
    probs: torch.Tensor, x_t: torch.Tensor, x1: torch.Tensor, rate: torch.Tensor, scored: torch.Tensor
) -> torch.Tensor:
    """The generalized KL of the DFM paper (Gat et al. 2024), written from its definition in float64: per scored
    position with current token ``z = x_t``, the Bregman divergence of ``f(u) = u log u`` between the off-diagonal
    jump rates of the conditional velocity, ``u(x) = rate * [x == x1]`` (zero when ``z == x1``), and of the model,
    ``v(x) = rate * p_{1|t}(x | x_t)``: ``sum_{x != z} u(x) log(u(x) / v(x)) - u(x) + v(x)`` (``0 log 0 = 0``),
    then averaged over the scored positions. No term of the implementation's closed form is reused."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b, i in scored.nonzero().tolist():
        z, target, r = int(x_t[b, i]), int(x1[b, i]), float(rate[b])
        for x in range(probs.shape[-1]):
            if x == z:
                continue
            u = r if (x == target and z != target) else 0.0
            v = r * probs[b, i, x]
            total = total + (u * torch.log(u / v) - u + v if u > 0 else v)
        count += 1
    return total / count


def test_generalized_kl_matches_the_definition():
    model = make_model(time_conditioning=True)
    g = torch.Generator().manual_seed(11)
    x1 = torch.randint(0, MASK, (3, 9), generator=g)
    x_t = torch.where(torch.rand(3, 9, generator=g) < 0.5, torch.randint(0, MASK, (3, 9), generator=g), x1)
    x_t[:, 1] = MASK  # mask-source positions
    labels = x1.clone()
    labels[:, 0] = -100
    t = torch.tensor([0.1, 0.5, 0.8])
    rate = losses.kappa_rate(t, "polynomial", 2.0)
    torch.testing.assert_close(rate, 2 * t / (1 - t**2))
    with torch.no_grad():
        logits = model(x_t, timesteps=t).logits
    scored = labels != -100
    assert (x_t == x1)[scored].any() and (x_t != x1)[scored].any()  # both branches of the divergence exercised
    expected = generalized_kl_reference(torch.softmax(logits.double(), -1), x_t, x1, rate.double(), scored)
    assert expected > 0.1  # a divergence well away from 0: the comparison below has a margin
    loss = generalized_kl_loss(logits, labels, x_t, rate)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    # the training helper (rates from the schedule) gives the same number
    helper = losses.dfm_loss(
        logits, labels, x_t, t, loss_type="generalized_kl", schedule="polynomial", kappa_exponent=2.0
    )
    torch.testing.assert_close(helper.double(), expected, atol=1e-5, rtol=1e-5)
    # packed logits_to_keep (the training path) gives the same loss; num_items_in_batch replaces the count
    with torch.no_grad():
        packed = model(x_t, timesteps=t, logits_to_keep=scored).logits
    per_row = rate[:, None].expand(scored.shape)[scored]
    torch.testing.assert_close(
        generalized_kl_loss(packed, x1[scored], x_t[scored], per_row), loss, atol=1e-6, rtol=1e-6
    )
    summed = generalized_kl_loss(logits, labels, x_t, rate, num_items_in_batch=1)
    torch.testing.assert_close(summed.double(), expected * int(scored.sum()), atol=1e-4, rtol=1e-5)


def test_generalized_kl_integrates_to_the_elbo_per_corruptible_token():
    """Summed over the masked tokens and divided by the corruptible ones (``num_items_in_batch=N``), the generalized KL
    integrated over ``t`` (exact Gauss-Legendre quadrature of a polynomial in ``t``) with the masks of the mixture path
    (each of ``N`` tokens masked with probability ``1 - kappa_t``, enumerated) is the negative ELBO per token, written
    from its subset form ``sum_S L(S) / (|S| C(N, |S|)) / N`` in float64. The model gives the mask token no
    probability (as the samplers draw) and does not read the time; kappa_t = t^2."""
    model = make_model(seed=3)
    context, x1 = [5, 9], random_ids(1, 4, seed=8)[0].clamp(max=MASK - 1).tolist()
    n = len(x1)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    x_t = torch.tensor([context + x1] * len(subsets))
    labels = torch.full_like(x_t, -100)
    for r, subset in enumerate(subsets):
        for i in subset:
            x_t[r, len(context) + i], labels[r, len(context) + i] = MASK, x1[i]
    with torch.no_grad():
        logits = model(x_t).logits
    logits[..., MASK] = -torch.inf
    log_p = torch.log_softmax(logits.double(), -1)
    nll = [-sum(float(log_p[r, len(context) + i, x1[i]]) for i in subset) for r, subset in enumerate(subsets)]
    nelbo = sum(value / (len(subset) * math.comb(n, len(subset))) for value, subset in zip(nll, subsets))
    nodes, weights = np.polynomial.legendre.leggauss(2 * n)
    integral = 0.0
    for node, weight in zip(nodes, weights):
        t = torch.tensor(float(node + 1) / 2, dtype=torch.float64)
        kappa = t**2
        chance = torch.tensor([(1 - kappa) ** len(s) * kappa ** (n - len(s)) for s in subsets])  # P_t(masks = S)
        rate = losses.kappa_rate(t.float(), "polynomial", 2.0) * chance.float()  # the expectation over S, per row
        integral += float(weight) / 2 * float(generalized_kl_loss(logits, labels, x_t, rate, num_items_in_batch=n))
    assert nelbo / n > 0.5  # a bound well away from 0: the comparison has a margin
    assert integral == pytest.approx(nelbo / n, rel=1e-5)
    # the default, the mean over the K masked tokens of each sequence, weights t by a further N / K: another number
    default = 0.0
    for node, weight in zip(nodes, weights):
        t = torch.tensor(float(node + 1) / 2)
        rate = losses.kappa_rate(t, "polynomial", 2.0)
        for r, subset in enumerate(subsets):
            chance = float((1 - t**2) ** len(subset) * t ** (2 * (n - len(subset))))
            mean = generalized_kl_loss(logits[r : r + 1], labels[r : r + 1], x_t[r : r + 1], rate)
            default += float(weight) / 2 * chance * float(mean)
    assert abs(default - nelbo / n) > 0.1 * nelbo / n


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.zeros(1, 4)), "input_ids"),
        (dict(timesteps=torch.rand(3)), "timesteps"),
        (dict(timesteps=torch.rand(2, 1)), "timesteps"),
        (dict(timesteps="0.5"), "timesteps"),
        (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long)), "labels"),
        (dict(logits_to_keep=torch.ones(2, 3, dtype=torch.bool)), "logits_to_keep"),
        (dict(logits_to_keep=torch.zeros(2, 2, dtype=torch.long)), "logits_to_keep"),
        (dict(logits_to_keep=torch.tensor([0.5])), "logits_to_keep"),
        (dict(logits_to_keep=-1), "logits_to_keep"),
        (dict(logits_to_keep=True), "logits_to_keep"),
        (dict(logits_to_keep=2.0), "logits_to_keep"),
        (dict(attention_mask=torch.ones(2, 1, 6, 5)), "attention_mask"),
        (dict(attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long)), "attention_mask"),
        (dict(attention_mask=torch.ones(2, 6, 6)), "attention_mask"),
        (dict(attention_mask=0.5), "attention_mask"),
        (dict(position_ids=torch.arange(5)), "position_ids"),
        (dict(position_ids=torch.zeros(3, 6, dtype=torch.long)), "position_ids"),
        (dict(position_ids=torch.zeros(2, 6)), "position_ids"),
        (dict(past_key_values="cache"), "past_key_values"),
        (dict(past_key_values=[(torch.zeros(2, 4, 6, 16), torch.zeros(2, 4, 6, 16))]), "past_key_values"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(kwargs, name):
    model = make_model(time_conditioning=True)
    call = dict(input_ids=torch.zeros(2, 6, dtype=torch.long), timesteps=torch.rand(2))
    call.update(kwargs)
    if name == "input_ids" and call["input_ids"].dim() == 2:
        call["timesteps"] = torch.rand(call["input_ids"].shape[0])
    with pytest.raises(ValueError, match=name):
        model(**call)


def test_positional_timesteps_are_refused():
    """`attention_mask` is the second positional argument (transformers' order): a time there is refused."""
    model = make_model(time_conditioning=True)
    ids = random_ids()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.tensor([0.2, 0.4]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# Architecture against transformers' own Llama / Qwen2 (same weights copied in)
# ------------------------------------------------------------------------------------------------------------------

BUNDLED = os.path.join(os.path.dirname(__file__), os.pardir, "src", "dfm_hf", "bundled", "dfm-code-stdlib", "model")


def reference_lm(model: DFMForMaskedGeneration, kind: str) -> torch.nn.Module:
    """transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` holding ``model``'s weights (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = model.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act="silu",
    )
    if kind == "llama":
        assert not c.attention_bias  # Llama's attention_bias also puts a bias on o_proj
        config, cls = LlamaConfig(head_dim=c.head_dim, **common), LlamaForCausalLM
    else:
        assert c.attention_bias and c.head_dim == c.hidden_size // c.num_attention_heads
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    config._attn_implementation = "eager"
    reference = cls(config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, q, k)`` additive float mask: 0 where ``allowed``, ``finfo(float32).min`` elsewhere."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def right_padded(batch: int, length: int, lengths: list[int], seed: int = 2, vocab: int = VOCAB):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def test_bundled_checkpoint_matches_llama_with_bidirectional_mask():
    """Regression guard for the defaults: the bundled checkpoint (saved before GQA / bias / head_dim / shift existed)
    is a Llama with bidirectional attention; transformers' LlamaModel given a bidirectional additive mask and the same
    weights is the independent reference."""
    model = DFMForMaskedGeneration.from_pretrained(BUNDLED).eval()
    c = model.config
    assert (c.num_key_value_heads, c.head_dim, c.attention_bias, c.logits_shift) == (4, 64, False, False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = reference_lm(model, "llama")
    ids, mask = right_padded(3, 40, [40, 30, 11], vocab=c.vocab_size)
    allowed = mask.bool()[:, None, None, :].expand(3, 1, 40, 40)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ours_plain = model(ids).logits
        theirs = reference(ids, attention_mask=additive_mask(allowed)).logits
        theirs_plain = reference(ids, attention_mask=additive_mask(torch.ones(3, 1, 40, 40, dtype=torch.bool))).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4
    assert (ours_plain - theirs_plain).abs().max() < 1e-4
    assert (ours_plain[1, :30] - ours[1, :30]).abs().max() > 1e-3  # the padding mask matters


ARCHITECTURES = {
    # Dream / DiffuCoder / Qwen2: GQA, q/k/v biases, shifted logits, untied head
    "qwen2": dict(num_key_value_heads=2, attention_bias=True, logits_shift=True, tie_word_embeddings=False),
    # Llama / Mistral: GQA, head_dim != hidden / heads, shifted logits, untied head
    "llama": dict(
        hidden_size=48,
        num_key_value_heads=1,
        head_dim=16,
        logits_shift=True,
        tie_word_embeddings=False,
        rope_theta=500.0,
    ),
}


def adapted_model(kind: str, seed: int = 0) -> DFMForMaskedGeneration:
    return randomize_(make_model(seed, **ARCHITECTURES[kind]), seed=seed)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_adapted_architecture_matches_transformers_bidirectional(kind):
    model = adapted_model(kind)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    reference = reference_lm(model, kind)
    ids, mask = right_padded(3, 14, [14, 9, 5])
    allowed = mask.bool()[:, None, None, :].expand(3, 1, 14, 14)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=additive_mask(allowed)).logits
    # logits_shift: our position i reads their position i - 1 (position 0 its own)
    shifted = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1)
    real = mask.bool()
    assert (ours[real] - shifted[real]).abs().max() < 1e-4
    assert (ours[real] - theirs[real]).abs().max() > 1e-2  # the shift is real
    with torch.no_grad():
        # a bool 4-D mask (True = attend) and the additive float one are the same mask
        as_bool = model(ids, attention_mask=allowed).logits
        as_float = model(ids, attention_mask=additive_mask(allowed)).logits
    torch.testing.assert_close(as_bool, ours, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(as_float, ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_causal_mask_reproduces_next_token_logits(kind, attn_implementation):
    """With a 4-D causal additive mask, a ``logits_shift`` model is the causal LM: our position i = their i - 1."""
    model = adapted_model(kind, seed=1)
    model.set_attn_implementation(attn_implementation)
    reference = reference_lm(model, kind)
    ids, mask = right_padded(2, 12, [12, 7], seed=5)
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    with torch.no_grad():
        ours = model(ids, attention_mask=additive_mask(causal)).logits
        theirs = reference(ids, attention_mask=mask).logits  # their own causal + padding mask
    for row, length in enumerate([12, 7]):
        assert (ours[row, 1:length] - theirs[row, : length - 1]).abs().max() < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads_save_and_load(tmp_path, tie):
    from safetensors import safe_open

    model = randomize_(make_model(tie_word_embeddings=tie), seed=3)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert "model.embed_tokens.weight" in saved
    if not tie:
        assert "lm_head.weight" in saved
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    loaded = DFMForMaskedGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is tie
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0.0, rtol=0.0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_logits_to_keep_int_and_with_logits_shift():
    for overrides in (dict(), dict(logits_shift=True)):
        model = randomize_(make_model(**overrides), seed=6)
        ids = random_ids(2, 10)
        labels = torch.where(torch.arange(10)[None] >= 6, ids, torch.full_like(ids, -100))
        with torch.no_grad():
            full = model(ids, labels=labels)
            last = model(ids, logits_to_keep=3).logits
            zero = model(ids, logits_to_keep=0).logits
            keep = torch.zeros(2, 10, dtype=torch.bool)
            keep[0, [0, 4]] = True
            keep[1, 9] = True
            packed = model(ids, logits_to_keep=keep).logits
            index = model(ids, logits_to_keep=torch.tensor([0, 5])).logits
            kept_loss = model(ids, labels=labels, logits_to_keep=4).loss
        assert last.shape == (2, 3, VOCAB)
        torch.testing.assert_close(last, full.logits[:, -3:], atol=1e-6, rtol=1e-6)
        assert torch.equal(zero, full.logits)
        torch.testing.assert_close(packed, full.logits[keep], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(index, full.logits[:, [0, 5]], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(kept_loss, full.loss, atol=1e-6, rtol=1e-6)  # labels only in the last 4


def test_position_ids_select_rotary_rows():
    model = randomize_(make_model(num_key_value_heads=2), seed=7)
    ids = random_ids(2, 12)
    arange = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        default = model(ids).logits
        explicit = model(ids, position_ids=arange).logits
        one_d = model(ids, position_ids=torch.arange(12)).logits
        # bidirectional attention with rotary embeddings only sees relative positions: an offset changes nothing
        offset = model(ids, position_ids=arange + 17).logits
        # and it is permutation-equivariant when the positions travel with the tokens
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
        permuted = model(ids[:, perm], position_ids=arange[:, perm]).logits
        stretched = model(ids, position_ids=arange * 2).logits
    torch.testing.assert_close(explicit, default, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one_d, default, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(offset, default, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(permuted, default[:, perm], atol=1e-5, rtol=1e-5)
    assert (stretched - default).abs().max() > 1e-3


def test_rotary_tables_are_cached_not_rebuilt():
    model = make_model()
    ids = random_ids(2, 12)
    with torch.no_grad():
        model(ids)
    tables = dict(model.model.rotary_emb._tables)
    assert len(tables) == 1
    ((cos, _),) = tables.values()
    with torch.no_grad():
        model(random_ids(2, 8))
    ((again, _),) = model.model.rotary_emb._tables.values()
    assert again is cos  # shorter sequences reuse the table
    assert not any("rotary" in key for key in model.state_dict())


def test_bundled_remote_code_matches_the_library():
    """The bundled checkpoint's remote-code files are copies of the library's model files (they must not drift), and
    they are every module of the models package (the package adds only ``__init__.py``)."""
    package = {name for name in os.listdir(MODELS) if name.endswith(".py")} - {"__init__.py"}
    assert package == set(MODEL_FILES)
    assert {name for name in os.listdir(BUNDLED) if name.endswith(".py")} == set(MODEL_FILES)
    for name in MODEL_FILES:
        with (
            open(os.path.join(MODELS, name), encoding="utf-8") as a,
            open(os.path.join(BUNDLED, name), encoding="utf-8") as b,
        ):
            assert a.read() == b.read(), f"{name}: copy src/dfm_hf/models/{name} into the bundled model folder"
