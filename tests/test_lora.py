"""LoRA on a pipeline (``DFMLoraLoaderMixin``): a load succeeds or changes nothing; delete, disable/enable, active.

The mixin's methods are called through the class (``Mixin.method(pipe, ...)``) so that the tests hold whether or not
``DFMPipeline`` inherits it; every adapter is a real PEFT adapter saved by peft's own ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import save_lora_adapter, tiny_pipeline
from safetensors.torch import load_file, save_file

from dfm_hf.pipelines import lora
from dfm_hf.pipelines.lora import DFMLoraLoaderMixin as Lora

IDS = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a load may change: weights, module types, requires_grad flags, adapter configs, active adapters."""
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "configs": sorted(getattr(model, "peft_config", {}) or {}),
        "active": [
            (n, list(m.active_adapters), m.disable_adapters) for n, m in model.named_modules() if hasattr(m, "merge")
        ],
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["weights"].keys() == before["weights"].keys()
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    assert not changed, f"weights changed: {changed[:5]}"
    for key in ("requires_grad", "configs", "active"):
        assert after[key] == before[key], key


def logits(pipe: Any) -> torch.Tensor:
    with torch.no_grad():
        return pipe.model(IDS).logits


@pytest.fixture
def pipe():
    return tiny_pipeline(seed=1)


def test_missing_adapter_weights_raise_naming_them_and_change_nothing(pipe, tmp_path):
    adapter = save_lora_adapter(pipe, tmp_path / "qv")
    edit_config(adapter, target_modules=["q_proj", "k_proj", "v_proj"])  # no k_proj weights were saved
    before = state(pipe.model)
    with pytest.raises(ValueError, match=r"missing .*k_proj\.lora_A") as err:
        Lora.load_lora_weights(pipe, adapter, adapter_name="py")
    assert "q_proj" not in str(err.value)  # only what is missing is named
    assert_same_state(before, state(pipe.model))
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "ok"), adapter_name="py")  # the name is free again
    assert Lora.get_active_adapters(pipe) == ["py"]


def test_unexpected_keys_and_shape_mismatch_change_nothing(pipe, tmp_path):
    adapter = save_lora_adapter(pipe, tmp_path / "extra")
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.nowhere.lora_A.weight"] = torch.zeros(4, 4)
    save_file(weights, adapter / "adapter_model.safetensors")
    before = state(pipe.model)
    with pytest.raises(ValueError, match="nowhere"):
        Lora.load_lora_weights(pipe, adapter)
    assert_same_state(before, state(pipe.model))

    wrong_rank = save_lora_adapter(pipe, tmp_path / "rank")
    edit_config(wrong_rank, r=8)  # weights of rank 4 into rank-8 layers
    with pytest.raises(RuntimeError, match="size mismatch"):
        Lora.load_lora_weights(pipe, wrong_rank)
    assert_same_state(before, state(pipe.model))
    assert Lora.get_active_adapters(pipe) == []


def test_failed_load_keeps_the_adapters_already_loaded(pipe, tmp_path):
    bad = save_lora_adapter(pipe, tmp_path / "b", seed=1, targets=("q_proj", "v_proj"))
    edit_config(bad, target_modules=["q_proj", "v_proj", "up_proj"])
    Lora.load_lora_weights(
        pipe, save_lora_adapter(pipe, tmp_path / "a", targets=("q_proj", "o_proj")), adapter_name="a"
    )
    Lora.set_adapters(pipe, "a", 0.5)
    with_a = logits(pipe)
    before = state(pipe.model)
    with pytest.raises(ValueError, match="up_proj"):
        Lora.load_lora_weights(pipe, bad, adapter_name="b")
    assert_same_state(before, state(pipe.model))
    assert torch.equal(logits(pipe), with_a)  # adapter "a" still active, still at weight 0.5


def test_delete_adapters_keeps_the_others_and_the_last_restores_the_base(pipe, tmp_path):
    base, base_state = logits(pipe), state(pipe.model)
    a, b = (
        save_lora_adapter(pipe, tmp_path / "a", targets=("q_proj", "o_proj")),
        save_lora_adapter(pipe, tmp_path / "b", 1),
    )
    Lora.load_lora_weights(pipe, a, adapter_name="a")
    only_a = logits(pipe)
    Lora.load_lora_weights(pipe, b, adapter_name="b")
    assert Lora.get_active_adapters(pipe) == ["a", "b"]
    assert not torch.allclose(logits(pipe), only_a)
    with pytest.raises(ValueError, match="adapter_names"):
        Lora.delete_adapters(pipe, "nope")
    Lora.delete_adapters(pipe, "b")
    assert Lora.get_active_adapters(pipe) == ["a"] and sorted(pipe.model.peft_config) == ["a"]
    assert torch.equal(logits(pipe), only_a)
    assert not any(".b." in k for k in pipe.model.state_dict())  # v_proj (only b's) is a plain Linear again
    Lora.delete_adapters(pipe, ["a"])
    assert Lora.get_active_adapters(pipe) == []
    assert_same_state(base_state, state(pipe.model))  # requires_grad flags included
    assert torch.equal(logits(pipe), base)


def test_disable_and_enable_lora(pipe, tmp_path):
    base = logits(pipe)
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "a"), adapter_name="a")
    adapted = logits(pipe)
    Lora.disable_lora(pipe)
    assert torch.equal(logits(pipe), base)
    assert Lora.get_active_adapters(pipe) == ["a"]  # still loaded and selected, only switched off
    with pytest.raises(ValueError, match="enable_lora"):
        Lora.fuse_lora(pipe)
    Lora.enable_lora(pipe)
    assert torch.equal(logits(pipe), adapted)
    Lora.fuse_lora(pipe)
    with pytest.raises(ValueError, match="unfuse_lora"):
        Lora.disable_lora(pipe)
    with pytest.raises(ValueError, match="unfuse_lora"):
        Lora.delete_adapters(pipe, ["a"])
    assert torch.allclose(logits(pipe), adapted, atol=1e-5)
    Lora.unfuse_lora(pipe)
    Lora.delete_adapters(pipe, "a")
    assert torch.allclose(logits(pipe), base, atol=1e-5)  # unmerging subtracts the update again (not bit-exact)


def test_unload_restores_the_base_model_exactly(pipe, tmp_path):
    before = state(pipe.model)
    assert Lora.get_active_adapters(pipe) == []
    with pytest.raises(ValueError, match="load_lora_weights"):
        Lora.disable_lora(pipe)
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "a"))
    assert Lora.get_active_adapters(pipe) == ["adapter_0"]
    assert not state(pipe.model)["requires_grad"]["model.embed_tokens.weight"]  # peft froze the base weights
    Lora.unload_lora_weights(pipe)
    assert_same_state(before, state(pipe.model))


def test_the_pipeline_keeps_the_base_flags_and_the_model_only_peft_state(pipe, tmp_path):
    model = pipe.model
    with torch.no_grad():
        model.model.norm.weight.requires_grad_(False)  # a flag of the user's own, given back exactly
    before, attributes = state(model), set(vars(model))
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "a"), adapter_name="a")
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "b", 1), adapter_name="b")
    assert set(vars(model)) - attributes == {"peft_config"}  # peft's own record, nothing of ours
    Lora.delete_adapters(pipe, ["a", "b"])
    assert set(vars(model)) == attributes
    assert_same_state(before, state(model))  # requires_grad flags included, the user's frozen norm too

    # flags kept for one model are never applied to another one put in its place
    Lora.load_lora_weights(pipe, save_lora_adapter(pipe, tmp_path / "c"), adapter_name="c")
    other = tiny_pipeline(seed=1).model
    lora.load_lora_weights(other, str(tmp_path / "c"), adapter_name="c")  # peft freezes its base weights
    pipe.model = other
    Lora.unload_lora_weights(pipe)
    assert not lora.adapter_names(other)
    assert not other.model.embed_tokens.weight.requires_grad  # `model`'s flags (True there) are not its own
