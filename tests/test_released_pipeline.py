"""DFMPipeline straight from a released model folder (no model_index.json), and the pipeline loader's errors.

Tiny checkpoints in LLaDA's and Dream's exact formats (tests/conversion_helpers.py) stand in for the 7B/8B weights.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import tiny_pipeline

from dfm_hf import DFMPipeline
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("llada"))
    ch.write_checkpoint(folder, ch.llada_tensors(ch.llama_source()), ch.llada_config(), shards=2)
    ch.save_tokenizer(ch.llada_tokenizer(), folder, drop_mask=True)
    return folder


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("dream"))
    ch.write_checkpoint(folder, ch.dream_tensors(ch.qwen2_source()), ch.dream_config())
    tok = ch.tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    ch.save_tokenizer(tok, folder, custom_class="DreamTokenizer")
    return folder


def test_llada_folder_loads_as_a_pipeline_with_its_family_defaults(llada_dir, tmp_path):
    pipe = DFMPipeline.from_pretrained(llada_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, ConfidenceUnmaskingScheduler) and pipe.scheduler.config.block_length == 32
    assert {"llada-blocks-32", "llada-low-confidence", "confidence", "cubic-euler"} <= set(pipe.scheduler_presets)
    assert pipe.tokenizer.mask_token_id == ch.LLADA_MASK == pipe.model.config.mask_token_id
    prompt = [[5, 6, 7, 8], [9, 10]]
    out = pipe(input_ids=prompt, gen_length=8, num_inference_steps=8, output_type="pt")
    assert not (out.sequences[:, :6] == ch.LLADA_MASK).any()
    guided = pipe(input_ids=prompt, gen_length=8, num_inference_steps=8, output_type="pt", guidance_scale=2.0)
    assert not torch.equal(guided.sequences, out.sequences)
    pipe.load_scheduler_preset("cubic-euler")  # any sampler of ours on the converted model
    flow = pipe(input_ids=prompt, gen_length=8, num_inference_steps=8, generator=torch.Generator().manual_seed(0))
    assert len(flow.texts) == 2
    pipe.load_scheduler_preset("llada-blocks-32")
    pipe.save_pretrained(tmp_path / "ours")
    again = DFMPipeline.from_pretrained(tmp_path / "ours")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.scheduler, ConfidenceUnmaskingScheduler)
    same = again(input_ids=prompt, gen_length=8, num_inference_steps=8, output_type="pt")
    assert torch.equal(same.sequences, out.sequences)  # save, reload, same tokens


def test_dream_folder_chat_and_cache_with_shifted_logits(dream_dir):
    pipe = DFMPipeline.from_pretrained(dream_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.config.logits_shift and pipe.scheduler.config.confidence == "entropy"
    conv = [{"role": "user", "content": "def add(a, b):"}]
    chat = pipe(messages=conv, gen_length=6, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    text = pipe.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>") and chat.texts[0].startswith(text)  # the template, then the reply
    blocks = ConfidenceUnmaskingScheduler.from_config(pipe.scheduler.config, block_length=4, temperature=0.0)
    pipe.scheduler = blocks
    kw = dict(gen_length=8, num_inference_steps=8, output_type="pt")
    exact = pipe(messages=[conv, [{"role": "user", "content": "x"}]], **kw)
    for mode in ("prefix", "dual"):
        cached = pipe(
            messages=[conv, [{"role": "user", "content": "x"}]], kv_cache=mode, kv_cache_refresh_steps=1, **kw
        )
        assert torch.equal(cached.sequences, exact.sequences)


def test_loading_errors_name_the_path_the_file_or_the_folder(tmp_path):
    with pytest.raises(OSError, match="neither an existing folder"):
        DFMPipeline.from_pretrained(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(OSError, match="neither an existing folder"):
        DFMPipeline.from_pretrained("./not/a/folder")
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="allow_pickle"):
        DFMPipeline.from_pretrained(tmp_path / "p", use_safetensors=False)
    DFMPipeline.from_pretrained(tmp_path / "p", use_safetensors=True)  # the user's value is kept, not overwritten
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tmp_path / "p", broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(OSError, match=r"tokenizer.*missing"):
        DFMPipeline.from_pretrained(broken)
    half = tmp_path / "half-tokenizer"
    shutil.copytree(tmp_path / "p", half)
    os.remove(half / "tokenizer" / "tokenizer.json")
    with pytest.raises(OSError, match="no vocabulary file"):
        DFMPipeline.from_pretrained(half)
    with pytest.raises(ValueError, match="proxies"):
        DFMPipeline.from_pretrained("org/some-repo", proxies={"https": "http://proxy"})


def test_download_arguments_reach_the_hub_client(tmp_path, hub_repo_id):
    pipe = tiny_pipeline()
    pipe.push_to_hub(hub_repo_id)
    target = tmp_path / "local"
    loaded = DFMPipeline.from_pretrained(hub_repo_id, local_dir=str(target), etag_timeout=5)
    assert (target / "model_index.json").is_file() and (target / "model" / "model.safetensors").is_file()
    loaded.set_progress_bar_config(disable=True)
    kw = dict(gen_length=6, num_inference_steps=3, output_type="pt")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded("x", generator=g(), **kw).sequences, pipe("x", generator=g(), **kw).sequences)
    from dfm_hf.hub.download import download_snapshot

    with pytest.raises(TypeError, match="unexpected keyword"):
        download_snapshot(hub_repo_id, ["*.json"], local_dirr=str(target))
