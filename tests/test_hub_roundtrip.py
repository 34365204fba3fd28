"""Sharing on the Hub, end to end: the real huggingface_hub / transformers / diffusers / peft clients against the
loopback Hub of tests/hub_server.py (no mocks). Each test pulls into an empty cache of its own (``cache_dir``)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from dfm_hf import DFMConfig, DFMForMaskedGeneration, DFMPipeline, DiscreteFlowScheduler
from dfm_hf.hub import (
    list_scheduler_presets,
    push_lora_adapter,
    push_pipeline_folder,
    push_scheduler_preset,
    render_lora_card,
    render_pipeline_card,
    write_training_card,
)
from dfm_hf.hub.cards import card_with_preset, rerender_card
from dfm_hf.schedulers.presets import PRESET_SPECS

try:
    from .helpers import save_lora_adapter, tiny_pipeline, tiny_tokenizer
    from .hub_server import LFS_THRESHOLD
except ImportError:
    from helpers import save_lora_adapter, tiny_pipeline, tiny_tokenizer
    from hub_server import LFS_THRESHOLD

PROMPT = "def parse(line):"
TRAINING = {"learning_rate": 0.001, "max_train_steps": 1234, "seq_len": 128, "_private": "hidden"}
METRICS = {"val_loss": 2.5, "ppl_bound": 12.25, "samples": ["x = 1"]}


def generate(pipe: DFMPipeline, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, gen_length=12, num_inference_steps=6, generator=generator, output_type="pt").sequences


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def public(config) -> dict:
    """A config without its private ``_*`` entries (class name, versions, which values were defaults)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def card_at(repo_id: str, revision: str, cache: Path) -> ModelCard:
    """The model card of a branch (``ModelCard.load`` reads the default branch only)."""
    return ModelCard.load(HfApi().hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache))


def snapshot_files(cache: Path) -> set[str]:
    """Paths (relative to their snapshot folder) of every file in the snapshots of a cache."""
    return {
        "/".join(p.parts[p.parts.index("snapshots") + 2 :])
        for p in cache.rglob("*")
        if "snapshots" in p.parts and (p.is_file() or p.is_symlink())
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> DFMPipeline:
    return tiny_pipeline(seed=0)


def test_cards_render_again_from_their_stored_values():
    sample = "if a --> b:\n    pass"  # "-->" in a value cannot close the comment the values are kept in
    card = str(
        render_pipeline_card("runs/dfm", TRAINING, {**METRICS, "samples": [sample]}, preset_names=["cubic-euler"])
    )
    assert 'DFMPipeline.from_pretrained("runs/dfm")' in card and "| `cubic-euler` |" in card
    moved = rerender_card(card, repo_id="org/dfm")
    assert 'DFMPipeline.from_pretrained("org/dfm")' in moved and '"runs/dfm"' not in moved.split("<!--")[0]
    assert sample in moved and '"max_train_steps": 1234' in moved and ModelCard(moved).data.eval_results
    with_preset = card_with_preset(moved, "fast", "Fast.")
    assert "| `cubic-euler` |" in with_preset and "| `fast` | Fast. |" in with_preset
    assert card_with_preset(with_preset, "fast", "Faster.").count("| `fast` |") == 1  # replaced, not added twice
    edited = card.replace("## Limitations\n", "## Limitations\n\nMy own note.\n")
    assert rerender_card(edited, repo_id="org/dfm") is None  # a card edited by hand is never rewritten
    assert card_with_preset(edited, "fast", "Fast.") is None
    assert rerender_card("# my card\n", repo_id="org/dfm") is None


def test_pipeline_round_trip_with_card(pipe, hub_repo_id, tmp_path):
    pipe.push_to_hub(hub_repo_id, training=TRAINING, metrics=METRICS, datasets=["dfm-test/stdlib-json"])
    cache = tmp_path / "cache"
    pulled = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache)
    assert_same_weights(pipe.model, pulled.model)
    assert torch.equal(generate(pulled), generate(pipe))
    assert public(pulled.scheduler.config) == public(pipe.scheduler.config)

    # the download took the tokenizer files and the presets, and no code
    files = snapshot_files(cache)
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "README.md"} <= files
    assert {f"scheduler_presets/{name}/scheduler_config.json" for name in PRESET_SPECS} <= files
    assert not [f for f in files if f.endswith(".py")]
    assert "model/modeling_dfm.py" in HfApi().list_repo_files(hub_repo_id)  # it is on the Hub, just not fetched
    assert sorted(pulled.scheduler_presets) == sorted(PRESET_SPECS)

    card = ModelCard.load(hub_repo_id)
    data = card.data
    assert data.library_name == "dfm_hf" and data.pipeline_tag == "text-generation"
    assert "discrete-flow-matching" in data.tags and data.license == "apache-2.0"
    assert data.datasets == ["dfm-test/stdlib-json"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"val_loss", "ppl_bound"} and results["val_loss"].metric_value == 2.5
    assert results["ppl_bound"].dataset_type == "dfm-test/stdlib-json"
    assert f'DFMPipeline.from_pretrained("{hub_repo_id}")' in card.text
    assert '"max_train_steps": 1234' in card.text and "_private" not in card.text  # the training config
    for name, (_, _, use) in PRESET_SPECS.items():
        assert f"| `{name}` | {use} |" in card.text
    assert "## Limitations" in card.text and "x = 1" in card.text


def test_training_card_is_kept_and_checkpoints_stay_local(pipe, hub_repo_id, tmp_path):
    out = tmp_path / "dfm-run"
    pipe.save_pretrained(out)
    write_training_card(str(out), TRAINING, METRICS)  # what training writes: a card for the folder's name
    (out / "checkpoint-500").mkdir()
    (out / "checkpoint-500" / "training_state.json").write_text("{}")
    push_pipeline_folder(pipe, str(out), repo_id=hub_repo_id)
    files = HfApi().list_repo_files(hub_repo_id)
    assert "model/model.safetensors" in files and not [f for f in files if f.startswith("checkpoint-")]
    card = ModelCard.load(hub_repo_id)
    assert card.data.eval_results and '"max_train_steps": 1234' in card.text  # the training card, kept...
    assert f'DFMPipeline.from_pretrained("{hub_repo_id}")' in card.text  # ...with its snippet pointed at the repo
    assert not (out / "README.md").read_text().count(hub_repo_id)  # the local card is untouched

    # push_to_hub of a pipeline loaded from that folder keeps the card too; without metrics the card has none
    DFMPipeline.from_pretrained(out).push_to_hub(hub_repo_id, revision="from-folder")
    assert '"max_train_steps": 1234' in card_at(hub_repo_id, "from-folder", tmp_path).text
    tiny_pipeline().save_pretrained(tmp_path / "fresh", push_to_hub=True, repo_id=hub_repo_id, revision="fresh")
    fresh = card_at(hub_repo_id, "fresh", tmp_path)
    assert fresh.data.library_name == "dfm_hf" and not fresh.data.eval_results and "Not recorded." in fresh.text


def test_scheduler_presets_on_the_hub(pipe, hub_repo_id, tmp_path):
    pipe.push_to_hub(hub_repo_id)
    cfg = pipe.scheduler.config
    preset = DiscreteFlowScheduler(
        mask_token_id=cfg.mask_token_id, vocab_size=cfg.vocab_size, kappa_exponent=2.0, corrector_alpha=0.0
    )
    push_scheduler_preset(preset, hub_repo_id, "quadratic-euler", description="Euler, quadratic kappa.")
    assert list_scheduler_presets(hub_repo_id) == sorted([*PRESET_SPECS, "quadratic-euler"])
    assert "| `quadratic-euler` | Euler, quadratic kappa. |" in ModelCard.load(hub_repo_id).text

    cache = tmp_path / "cache"
    loaded = DiscreteFlowScheduler.from_pretrained(
        hub_repo_id, subfolder="scheduler_presets/quadratic-euler", cache_dir=cache
    )
    assert public(loaded.config) == public(preset.config)

    pulled = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache)
    assert public(pulled.load_scheduler_preset("quadratic-euler").config) == public(preset.config)
    local = copy.deepcopy(pipe)
    local.scheduler = preset
    assert torch.equal(generate(pulled), generate(local))

    with pytest.raises(ValueError, match="plain folder name"):
        push_scheduler_preset(preset, hub_repo_id, "../evil")
    with pytest.raises(ValueError, match="DiscreteFlowScheduler"):
        push_scheduler_preset(torch.nn.Linear(1, 1), hub_repo_id, "not-a-scheduler")


def test_lora_adapter_repo_and_revision(pipe, hub_repo_id, tmp_path):
    base_repo, lora_repo = hub_repo_id, hub_repo_id + "-lora"
    pipe.push_to_hub(base_repo)
    adapter_a, adapter_b = (
        save_lora_adapter(pipe, tmp_path / "a", seed=1),
        save_lora_adapter(pipe, tmp_path / "b", seed=2),
    )
    # a card written by LoRA fine-tuning (for a local name) is kept; b has peft's template card, which is replaced
    render_lora_card("a", base_repo, training={"lora_marker": 42}).save(adapter_a / "README.md")
    assert (adapter_b / "README.md").is_file()
    push_lora_adapter(str(adapter_a), lora_repo, base_model=base_repo, adapter_name="py")
    push_lora_adapter(str(adapter_b), lora_repo, base_model=base_repo, revision="v2")

    cache = tmp_path / "cache"
    base_out = generate(DFMPipeline.from_pretrained(base_repo, cache_dir=cache))
    outputs = {}
    for source, kwargs in [
        ("hub-main", dict(pretrained_model_name_or_path=lora_repo, cache_dir=str(cache))),
        ("local-a", dict(pretrained_model_name_or_path=adapter_a)),
        ("hub-v2", dict(pretrained_model_name_or_path=lora_repo, revision="v2", cache_dir=str(cache))),
        ("local-b", dict(pretrained_model_name_or_path=adapter_b)),
    ]:
        pulled = DFMPipeline.from_pretrained(base_repo, cache_dir=cache)
        pulled.load_lora_weights(**kwargs)
        outputs[source] = generate(pulled)
    assert torch.equal(outputs["hub-main"], outputs["local-a"]) and torch.equal(outputs["hub-v2"], outputs["local-b"])
    assert not torch.equal(outputs["local-a"], base_out) and not torch.equal(outputs["local-a"], outputs["local-b"])

    card = ModelCard.load(lora_repo)
    assert card.data.base_model == base_repo and "lora" in card.data.tags
    assert f'DFMPipeline.from_pretrained("{base_repo}")' in card.text and '"lora_marker": 42' in card.text
    assert f'load_lora_weights("{lora_repo}"' in card.text
    card_b = card_at(lora_repo, "v2", tmp_path / "cards")
    assert card_b.data.base_model == base_repo and '"r": 4' in card_b.text and 'adapter_name="default"' in card_b.text
    with open(HfApi().hf_hub_download(lora_repo, "adapter_config.json", cache_dir=tmp_path / "c2")) as f:
        assert json.load(f)["base_model_name_or_path"] == base_repo

    bare = DFMPipeline.from_pretrained(base_repo, cache_dir=cache)
    with pytest.raises(OSError, match="revision 'v3'"):
        bare.load_lora_weights(lora_repo, revision="v3", cache_dir=str(cache))
    with pytest.raises(OSError, match="adapter_model.safetensors"):
        bare.load_lora_weights(base_repo, cache_dir=str(cache))  # a pipeline repo is no adapter repo


def test_revisions_pull_exactly_what_was_pushed(pipe, hub_repo_id, tmp_path):
    first = pipe.push_to_hub(hub_repo_id)
    second_pipe = tiny_pipeline(seed=1)
    second = second_pipe.push_to_hub(hub_repo_id, revision="v2")
    assert first.oid != second.oid and HfApi().model_info(hub_repo_id).sha == first.oid  # main did not move

    cache = tmp_path / "cache"
    for revision, expected in [(None, pipe), ("main", pipe), (first.oid, pipe), ("v2", second_pipe)]:
        pulled = DFMPipeline.from_pretrained(hub_repo_id, revision=revision, cache_dir=cache)
        assert_same_weights(pulled.model, expected.model)
        assert torch.equal(generate(pulled), generate(expected))
    assert not torch.equal(generate(pipe), generate(second_pipe))
    assert card_at(hub_repo_id, "v2", tmp_path / "cards").data.library_name == "dfm_hf"
    with pytest.raises(OSError, match=f"{hub_repo_id}.*revision 'v3'"):
        DFMPipeline.from_pretrained(hub_repo_id, revision="v3", cache_dir=cache)


@pytest.mark.slow  # a fresh interpreter imports the whole stack
def test_offline_from_a_warm_cache(pipe, hub_repo_id, tmp_path):
    pipe.push_to_hub(hub_repo_id)
    cache = tmp_path / "cache"
    DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache)  # warm both caches: cache_dir=...
    DFMPipeline.from_pretrained(hub_repo_id)  # ...and the default one under HF_HOME
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from dfm_hf import DFMPipeline
        out = {{}}
        for key, kwargs in [("cache_dir", dict(cache_dir={str(cache)!r})), ("hf_home", {{}})]:
            pipe = DFMPipeline.from_pretrained({hub_repo_id!r}, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            g = torch.Generator().manual_seed(0)
            out[key] = pipe({PROMPT!r}, gen_length=12, num_inference_steps=6, generator=g, output_type="pt")
            out[key] = out[key].sequences.tolist()
        try:
            DFMPipeline.from_pretrained({hub_repo_id + "-never-pulled"!r})
        except OSError as error:
            out["error"] = str(error)
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = generate(pipe).tolist()
    assert out["cache_dir"] == expected and out["hf_home"] == expected
    assert hub_repo_id + "-never-pulled" in out["error"] and "HF_HUB_OFFLINE" in out["error"]


def test_file_over_10mb_goes_through_lfs(hub_server, hub_repo_id, tmp_path):
    tok = tiny_tokenizer()
    config = DFMConfig(
        vocab_size=8192,
        hidden_size=384,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        mask_token_id=tok.mask_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    big = DFMPipeline(
        model=DFMForMaskedGeneration(config).eval(),
        scheduler=DiscreteFlowScheduler(mask_token_id=tok.mask_token_id, vocab_size=8192),
        tokenizer=tok,
    )
    big.set_progress_bar_config(disable=True)
    start = len(hub_server.requests)
    big.push_to_hub(hub_repo_id)
    pushed = [(r.method, r.path.split("?")[0], r.status) for r in hub_server.requests[start:]]
    assert ("POST", f"/{hub_repo_id}.git/info/lfs/objects/batch", 200) in pushed
    assert [r for r in pushed if r[0] == "PUT" and r[1].startswith(f"/__lfs__/upload/models/{hub_repo_id}/")]
    (info,) = HfApi().get_paths_info(hub_repo_id, ["model/model.safetensors"])
    assert info.lfs is not None and info.size > LFS_THRESHOLD

    pulled = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=tmp_path / "cache")
    assert_same_weights(pulled.model, big.model)
    assert torch.equal(generate(pulled), generate(big))


@pytest.mark.parametrize(
    "damage, path",
    [("corrupt_file", "model/model.safetensors"), ("delete_file", "scheduler/scheduler_config.json")],
)
def test_broken_file_gives_a_clear_error_and_a_clean_cache(pipe, hub_server, hub_repo_id, tmp_path, damage, path):
    pipe.push_to_hub(hub_repo_id)
    getattr(hub_server, damage)(hub_repo_id, path)
    cache = tmp_path / "cache"
    with pytest.raises(OSError) as error:
        DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache)
    assert hub_repo_id in str(error.value) and repr(path) in str(error.value)
    assert not list(cache.rglob("*.incomplete"))
    files = snapshot_files(cache)
    assert "model_index.json" in files and path not in files  # the good files are cached, not the broken one
    # offline, the partial snapshot is refused, naming what is missing
    with pytest.raises(OSError, match=path):
        DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache, local_files_only=True)


def test_pickle_only_repo_needs_allow_pickle(pipe, hub_repo_id, tmp_path):
    folder = tmp_path / "pickled"
    pipe.save_pretrained(folder)
    (folder / "model" / "model.safetensors").unlink()
    torch.save(pipe.model.state_dict(), folder / "model" / "pytorch_model.bin")
    api = HfApi()
    api.create_repo(hub_repo_id)
    api.upload_folder(repo_id=hub_repo_id, folder_path=folder)

    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"model/pytorch_model\.bin is a pickle.*allow_pickle=True"):
        DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache)
    assert not list(cache.rglob("*.bin"))  # the pickle was not even downloaded
    pulled = DFMPipeline.from_pretrained(hub_repo_id, cache_dir=cache, allow_pickle=True)
    assert_same_weights(pulled.model, pipe.model)
    assert torch.equal(generate(pulled), generate(pipe))
    # allow_pickle=True still loads a safetensors repo (safetensors first)
    pipe.push_to_hub(hub_repo_id + "-safe")
    assert_same_weights(
        DFMPipeline.from_pretrained(hub_repo_id + "-safe", cache_dir=cache, allow_pickle=True).model, pipe.model
    )
