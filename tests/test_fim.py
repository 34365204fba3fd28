"""Fill-in-the-middle (issue 28): the SPM layout and the rewrite of a training row (length kept, every token kept,
the control tokens in place), the collator's ``fim_rate`` (rate respected, deterministic, control tokens never
corrupted nor scored, nothing drawn at 0), the FIM tokens declared on a pipeline, and infilling with a block model
through them (length and placement exact, prompt tokens unchanged, the middle that the FIM prompt generates);
``--fim_rate`` trains a converted causal LM with LoRA and its adapter rebuilds the model. Tiny and single-threaded."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest
import torch
from helpers import STDLIB, tiny_tokenizer

from dfm_hf.data.fim import FIM_TOKENS, fim_layout, fim_rewrite, fim_token_ids_of
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.models.losses import IGNORE_INDEX
from dfm_hf.pipelines import DFMPipeline
from dfm_hf.pipelines.fim import add_fim_tokens
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler
from dfm_hf.training.adapters import ADAPTER_SUBFOLDER, BASE_RECIPE_FILE, load_adapted_pipeline
from dfm_hf.training.arguments import build_parser, validate_args, validate_common_args
from dfm_hf.training.collator import DFMDataCollator
from dfm_hf.training.train import main

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, MASK_ID = 64, 63
FIM = {"prefix": 60, "suffix": 61, "middle": 62}


# ---------------------------------------------------------------------------------------------------------------------
# The layout and the rewrite of a row
# ---------------------------------------------------------------------------------------------------------------------


def test_layout_is_suffix_prefix_middle_and_the_prompt_is_it_without_middle():
    ids, controls = fim_layout([1, 2], [7, 8, 9], FIM, middle=[3, 4])
    assert ids == [60, 61, 7, 8, 9, 62, 1, 2, 3, 4]
    assert controls == [0, 1, 5]
    assert fim_layout([1, 2], [7, 8, 9], FIM)[0] == [60, 61, 7, 8, 9, 62, 1, 2]


def test_rewrite_keeps_the_length_and_every_token_of_the_row_but_the_last_three():
    row = torch.arange(10, 30)  # 20 tokens: 17 kept
    for start, end in [(0, 17), (3, 9), (16, 17), (0, 1)]:
        out, controls = fim_rewrite(row, start, end, FIM)
        assert out.shape == row.shape and out.dtype == row.dtype
        assert out[controls].tolist() == [60, 61, 62]
        body = [v for i, v in enumerate(out.tolist()) if i not in controls]
        assert sorted(body) == row[:17].tolist()
        suffix_end = controls[2]
        assert out[2:suffix_end].tolist() == row[end:17].tolist()
        assert out[suffix_end + 1 :].tolist() == row[:start].tolist() + row[start:end].tolist()
    for start, end in [(5, 5), (-1, 3), (3, 18)]:
        with pytest.raises(ValueError, match="non-empty span"):
            fim_rewrite(row, start, end, FIM)


# ---------------------------------------------------------------------------------------------------------------------
# The collator
# ---------------------------------------------------------------------------------------------------------------------


def collator(seed: int = 0, **kwargs) -> DFMDataCollator:
    kwargs.setdefault("fim_token_ids", FIM)
    return DFMDataCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, generator=torch.Generator().manual_seed(seed),
                           **kwargs)  # fmt: skip


def rows(n: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def fim_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["clean_ids"] == FIM["middle"]).any(1)


def test_the_rate_is_respected_and_the_draws_are_deterministic():
    x = rows(3000)
    batch = collator(fim_rate=0.3, return_clean_ids=True)(x)
    share = float(fim_rows(batch).float().mean())
    assert abs(share - 0.3) < 0.03, share  # 3000 rows: the standard deviation of the share is 0.008
    again = collator(fim_rate=0.3, return_clean_ids=True)(x)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    other = collator(seed=1, fim_rate=0.3, return_clean_ids=True)(x)
    assert not torch.equal(batch["clean_ids"], other["clean_ids"])
    assert torch.equal(x, rows(3000))  # the caller's rows are not rewritten in place
    assert float(fim_rows(collator(fim_rate=1.0, return_clean_ids=True)(x[:50])).float().mean()) == 1.0


def test_rate_zero_draws_nothing_and_gives_the_plain_collator_batches():
    x = rows(16)
    kw = dict(coupling={"unconditional": 1, "prefix": 1, "infill": 1}, time_sampling="stratified")
    plain = DFMDataCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, generator=torch.Generator().manual_seed(0), **kw)(
        x
    )
    zero = collator(fim_rate=0.0, **kw)(x)
    for key in plain:
        assert torch.equal(plain[key], zero[key]), key


@pytest.mark.parametrize("complementary", [False, True])
def test_control_tokens_are_conditioning_never_masked_nor_scored(complementary):
    x = rows(400, length=20)
    kw = dict(coupling={"unconditional": 1, "prefix": 1, "infill": 1}, complementary_masks=complementary)
    batch = collator(fim_rate=1.0, return_clean_ids=True, t_max=0.999, **kw)(x)
    controls = torch.isin(batch["clean_ids"], torch.tensor(list(FIM.values())))
    assert int(controls.sum()) == 3 * batch["clean_ids"].shape[0]
    assert batch["condition_mask"][controls].all()
    assert torch.equal(batch["input_ids"][controls], batch["clean_ids"][controls])
    assert (batch["labels"][controls] == IGNORE_INDEX).all()
    assert (batch["input_ids"] == MASK_ID).any()  # the rest is corrupted as usual
    # a row that brings its own condition mask is never rewritten; nor is a row too short for a middle
    given = [{"input_ids": x[0].tolist(), "condition_mask": [True] * 5 + [False] * 15}, {"input_ids": [1, 2, 3]}]
    kept = collator(fim_rate=1.0, return_clean_ids=True, pad_token_id=0)(given)
    assert kept["clean_ids"][0].tolist() == x[0].tolist() and kept["clean_ids"][1, :3].tolist() == [1, 2, 3]


def test_bad_fim_settings_are_named():
    for kwargs, message in [
        (dict(fim_rate=1.5), "fim_rate"),
        (dict(fim_rate=True), "fim_rate"),
        (dict(fim_rate=0.5, fim_token_ids=None), "needs `fim_token_ids`"),
        (dict(fim_rate=0.5, fim_token_ids={"prefix": 1, "middle": 2}), "fim_token_ids"),
        (dict(fim_rate=0.5, fim_token_ids={"prefix": 1, "suffix": 2, "middle": 64}), "fim_token_ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            collator(**kwargs)


def test_the_flag_is_checked_before_anything_is_written():
    def parsed(*argv: str):
        args = build_parser().parse_args(["--stdlib", "--output_dir", "never-written", *argv])
        validate_args(args)
        return args

    assert parsed("--fim_rate", "0.3").fim_rate == 0.3
    with pytest.raises(ValueError, match="--fim_rate.*\\[0, 1\\]"):
        parsed("--fim_rate", "1.2")
    sft = build_parser().parse_args(["--train_file", "x.jsonl", "--sft", "--output_dir", "n", "--fim_rate", "0.1"])
    with pytest.raises(ValueError, match="--fim_rate.*--sft"):
        validate_common_args(sft)


# ---------------------------------------------------------------------------------------------------------------------
# The FIM tokens of a pipeline, and infilling with a block model
# ---------------------------------------------------------------------------------------------------------------------


def block_pipe(fim: bool = True, seed: int = 0) -> DFMPipeline:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = DFMConfig.from_preset("tiny", tokenizer=tok, block_size=4, logits_shift=True)
    model = DFMForMaskedGeneration(cfg).eval()
    scheduler = ConfidenceUnmaskingScheduler(mask_token_id=tok.mask_token_id, vocab_size=cfg.vocab_size)
    pipe = DFMPipeline(model=model, scheduler=scheduler, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    if fim:
        add_fim_tokens(pipe)
    return pipe


def test_adding_fim_tokens_grows_the_tables_with_mean_rows_and_declares_them():
    pipe = block_pipe(fim=False)
    vocab, mask = pipe.model.config.vocab_size, pipe.mask_token_id
    embed = pipe.model.get_input_embeddings().weight.detach().clone()
    new = add_fim_tokens(pipe)
    assert new == [vocab, vocab + 1, vocab + 2]
    config = pipe.model.config
    assert config.fim_token_ids == {"prefix": vocab, "suffix": vocab + 1, "middle": vocab + 2}
    assert config.vocab_size == vocab + 3 == len(pipe.tokenizer)
    grown = pipe.model.get_input_embeddings().weight
    assert torch.equal(grown[:vocab], embed)
    others = [i for i in range(vocab) if i != mask]
    torch.testing.assert_close(grown[vocab:], embed[others].mean(0).expand(3, -1))
    assert pipe.scheduler.config.vocab_size == vocab + 3
    assert all(s.config.get("vocab_size") in (None, vocab + 3) for s in pipe.scheduler_presets.values())
    pipe.check_components()
    assert pipe.tokenizer.convert_ids_to_tokens(new) == list(FIM_TOKENS.values())
    assert add_fim_tokens(pipe) == []  # declared already
    tok = tiny_tokenizer()
    tok.add_tokens(list(FIM_TOKENS.values()), special_tokens=True)
    before = len(tok)
    assert sorted(fim_token_ids_of(tok).values()) == [before - 3, before - 2, before - 1] and len(tok) == before


def test_a_block_model_with_fim_tokens_infills_one_run_of_masks_in_place():
    pipe = block_pipe()
    mask = pipe.tokenizer.mask_token
    prompt = f"a = {mask}{mask}\nb = 2"
    ids = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = ids.index(pipe.mask_token_id)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = pipe(prompt, num_inference_steps=4, generator=g(), output_type="pt")
    row = out.sequences[0].tolist()
    assert len(row) == len(ids)
    assert row[:start] == ids[:start] and row[start + 2 :] == ids[start + 2 :]
    assert pipe.mask_token_id not in row
    # the middle is what the block model writes after the FIM prompt
    fim_prompt = fim_layout(ids[:start], ids[start + 2 :], pipe.model.config.fim_token_ids)[0]
    direct = pipe(input_ids=[fim_prompt], gen_length=2, num_inference_steps=4, generator=g(), return_full_text=False,
                  output_type="pt")  # fmt: skip
    assert row[start : start + 2] == direct.sequences[0].tolist()
    assert out.nfe == direct.nfe
    # texts, return_full_text=False, and the exact uncached path
    text = pipe(prompt, num_inference_steps=4, generator=g())
    assert text.texts[0].startswith("a = ") and text.texts[0].endswith("\nb = 2")
    only = pipe(prompt, num_inference_steps=4, generator=g(), return_full_text=False, output_type="pt")
    assert only.sequences[0].tolist() == row[start : start + 2]
    plain = pipe(prompt, num_inference_steps=4, generator=g(), kv_cache=None, output_type="pt")
    assert plain.sequences[0].tolist() == row


def test_generate_infills_through_the_fim_tokens_like_the_pipeline():
    pipe = block_pipe()
    pipe.scheduler = DiscreteFlowScheduler(mask_token_id=pipe.mask_token_id, vocab_size=pipe.model.config.vocab_size)
    ids = pipe.tokenizer("x = 1\ny = ", add_special_tokens=False)["input_ids"]
    row = ids + [pipe.mask_token_id] * 3 + pipe.tokenizer("\nz = 3", add_special_tokens=False)["input_ids"]
    out = pipe.model.generate(torch.tensor([row]), num_inference_steps=3, generator=torch.Generator().manual_seed(2))
    via_pipe = pipe(
        input_ids=[row], num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="pt"
    )
    assert out.sequences.tolist() == via_pipe.sequences.tolist() and out.nfe == via_pipe.nfe
    filled = out.sequences[0].tolist()
    assert len(filled) == len(row) and filled[: len(ids)] == ids and filled[len(ids) + 3 :] == row[len(ids) + 3 :]
    assert pipe.mask_token_id not in filled


def test_a_run_of_masks_at_the_end_is_a_plain_completion_of_the_text_before_it():
    pipe = block_pipe()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    ids = pipe.tokenizer("def f(x):\n    return", add_special_tokens=False)["input_ids"]
    out = pipe(input_ids=[ids + [pipe.mask_token_id] * 5], num_inference_steps=5, generator=g(), output_type="pt")
    plain = pipe(input_ids=[ids], gen_length=5, num_inference_steps=5, generator=g(), output_type="pt")
    assert out.sequences.tolist() == plain.sequences.tolist() and out.nfe == plain.nfe


def test_holes_of_different_lengths_in_one_batch_are_filled_exactly():
    pipe = block_pipe()
    mask = pipe.tokenizer.mask_token
    prompts = [f"def f(x):\n    return {mask * 3}\n", f"{mask}import os", f"x = 1\n{mask * 6}"]
    out = pipe(prompts, num_inference_steps=6, generator=[torch.Generator().manual_seed(i) for i in range(3)],
               output_type="pt")  # fmt: skip
    for r, prompt in enumerate(prompts):
        ids = pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        row = out.sequences[r].tolist()[: len(ids)]
        holes = [i for i, v in enumerate(ids) if v == pipe.mask_token_id]
        assert [v for i, v in enumerate(row) if i not in holes] == [v for v in ids if v != pipe.mask_token_id]
        assert all(row[i] != pipe.mask_token_id for i in holes)
        assert all(v == pipe._pad_id() for v in out.sequences[r].tolist()[len(ids) :])


def test_other_mask_layouts_keep_a_clear_refusal():
    mask = "<|mask|>"
    pipe = block_pipe()
    with pytest.raises(ValueError, match="one contiguous run.*2 runs"):
        pipe(f"a {mask} b {mask} c", num_inference_steps=2)
    with pytest.raises(ValueError, match="one contiguous run.*0 mask tokens"):
        pipe([f"a {mask} b", "c = 1"], num_inference_steps=2)
    with pytest.raises(ValueError, match="Infilling.*fim_token_ids"):
        block_pipe(fim=False)(f"a {mask} b", num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# --fim_rate in a LoRA run on a converted causal LM
# ---------------------------------------------------------------------------------------------------------------------


def test_lora_training_with_fim_ships_the_fim_rows_and_the_adapter_rebuilds_the_model(tmp_path):
    causal = tmp_path / "llama"
    ch.llama_source(tied=True, seed=11).save_pretrained(causal)
    ch.tiny_tokenizer().save_pretrained(causal)
    train = tmp_path / "train"
    train.mkdir()
    for f in glob.glob(os.path.join(STDLIB, "json", "*.py")):
        shutil.copy(f, train / os.path.basename(f))
    out = str(tmp_path / "out")
    main([
        "--init_from_causal_lm", str(causal), "--mask_token", "<|dfm_mask|>", "--train_file", str(train),
        "--seq_len", "32", "--train_batch_size", "4", "--max_train_steps", "2", "--warmup_steps", "1",
        "--eval_steps", "1000", "--num_samples", "0", "--no_progress", "--block_size", "4", "--lora_r", "4",
        "--complementary_masks", "--loss_weighting", "inverse_t", "--fim_rate", "0.5", "--output_dir", out,
    ])  # fmt: skip
    merged = DFMPipeline.from_pretrained(out)
    fim = merged.model.config.fim_token_ids
    vocab = len(ch.tiny_tokenizer())
    assert fim == {"prefix": vocab + 1, "suffix": vocab + 2, "middle": vocab + 3}  # after the mask token
    adapter = os.path.join(out, ADAPTER_SUBFOLDER)
    with open(os.path.join(adapter, BASE_RECIPE_FILE), encoding="utf-8") as f:
        assert json.load(f)["fim_tokens"] is True
    shipped = load_adapted_pipeline(adapter)
    assert shipped.model.config.fim_token_ids == fim
    ids = torch.tensor([[5, 6, vocab, vocab + 1, 9, vocab + 3, 12, vocab + 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(shipped.model(ids).logits, merged.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert isinstance(merged.scheduler, DiscreteFlowScheduler)
    assert merged.scheduler.config.vocab_size == merged.model.config.vocab_size


@pytest.mark.parametrize("lora_r", ["32", "0"])
def test_the_block_recipe_script_passes_flags_that_validate(tmp_path, lora_r):
    """examples/train_block_default_model.sh with `python` replaced by a printer: its flags parse and validate."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "train_block_default_model.sh")  # fmt: skip
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    env = {**os.environ, "GGUF_DIR": str(gguf), "LORA_R": lora_r}
    printer = 'python() { printf "%s\\n" "$@"; }; export -f python; bash "$0" "$1" --eval_batches 1'
    out = subprocess.run(["bash", "-c", printer, script, str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    assert out[0] == "examples/train_dfm.py"
    args = build_parser().parse_args(out[1:])
    validate_args(args)
    assert (args.block_size, args.fim_rate, args.complementary_masks, args.attention_annealing_steps) == (
        4,
        0.3,
        True,
        0,
    )
    assert args.loss_weighting == "inverse_t" and args.resume_from_checkpoint == "latest"
    assert args.checkpointing_steps == 100 and args.eval_batches == 1 and args.lora_r == int(lora_r)
    assert args.learning_rate == (1e-3 if lora_r != "0" else 1e-4)
