"""`DFMGenerationConfig` (validation, generation_config.json), the streamers (transformers' TextDiffusionStreamer
protocol: one draft per model call, the final text), `dfm-hf generate --stream`, and `model.generate()` against
`DFMPipeline` (same tokens, same nfe). Tiny random CPU models and the small shipped model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import tiny_pipeline, tiny_tokenizer
from test_block_sampling import block_pipe

from dfm_hf import DFMGenerationConfig
from dfm_hf.bundles.shipped import small_model_path
from dfm_hf.cli import main
from dfm_hf.generation.streamers import MASK_PLACEHOLDER, DraftFeed, TerminalStreamer
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler, DiscreteFlowScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """A streamer that keeps every call (the protocol's consumer side)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor | None]] = []

    def put(self, value: torch.Tensor) -> None:
        self.calls.append(("put", value.clone()))

    def put_draft(self, value: torch.Tensor) -> None:
        self.calls.append(("draft", value.clone()))

    def end(self) -> None:
        self.calls.append(("end", None))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]

    def values(self, kind: str) -> list[torch.Tensor]:
        return [value for k, value in self.calls if k == kind]


# ---------------------------------------------------------------------------------------------------------------------
# DFMGenerationConfig
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip_through_generation_config_json(tmp_path):
    config = DFMGenerationConfig()
    assert (config.max_new_tokens, config.num_inference_steps, config.sampler, config.guidance_scale) == (
        64,
        64,
        None,
        1.0,
    )
    config = DFMGenerationConfig(
        max_new_tokens=32, num_inference_steps=16, block_length=8, temperature=0.5, top_k=10, top_p=0.9,
        confidence_threshold=0.8, sampler="confidence-blocks", eos_token_id=[1, 3],
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sampler"] == "confidence-blocks" and saved["num_inference_steps"] == 16 and saved["block_length"] == 8
    loaded = DFMGenerationConfig.from_pretrained(tmp_path)
    assert type(loaded) is DFMGenerationConfig and loaded == config
    assert (loaded.top_k, loaded.top_p, loaded.eos_token_id, loaded.confidence_threshold) == (10, 0.9, [1, 3], 0.8)


def test_config_stores_a_scheduler_as_its_config_and_rebuilds_it(tmp_path):
    scheduler = ConfidenceUnmaskingScheduler(mask_token_id=2, vocab_size=50, block_length=4, temperature=0.7)
    config = DFMGenerationConfig(sampler=scheduler)
    assert config.sampler["_class_name"] == "ConfidenceUnmaskingScheduler" and config.sampler["block_length"] == 4
    config.save_pretrained(tmp_path)
    rebuilt = DFMGenerationConfig.from_pretrained(tmp_path).build_scheduler(mask_token_id=2, vocab_size=50)
    assert type(rebuilt) is ConfidenceUnmaskingScheduler
    assert {k: v for k, v in rebuilt.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }


def test_config_builds_presets_with_the_model_ids_and_applies_overrides():
    default = DFMGenerationConfig().build_scheduler(mask_token_id=2, vocab_size=50)
    assert type(default) is DiscreteFlowScheduler and default.config.kappa_exponent == 1.0
    assert (default.config.mask_token_id, default.config.vocab_size) == (2, 50)
    config = DFMGenerationConfig(
        sampler="confidence", block_length=8, confidence_threshold=0.9, temperature=0.3, top_p=0.5
    )
    scheduler = config.build_scheduler(mask_token_id=2, vocab_size=50)
    assert type(scheduler) is ConfidenceUnmaskingScheduler
    cfg = scheduler.config
    assert (cfg.block_length, cfg.confidence_threshold, cfg.temperature, cfg.top_p, cfg.remasking) == (
        8, 0.9, 0.3, 0.5, "low_confidence",
    )  # fmt: skip
    cubic = DFMGenerationConfig(sampler="cubic-euler").build_scheduler(mask_token_id=2, vocab_size=50)
    assert cubic.config.kappa_exponent == 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "`max_new_tokens` must be an integer >= 0"),
        (dict(max_new_tokens=2.5), "`max_new_tokens` must be an integer >= 0"),
        (dict(num_inference_steps=0), "`num_inference_steps` must lie in"),
        (dict(block_length=0), "`block_length` must be None or an integer"),
        (dict(temperature=-0.5), "`temperature` must be >= 0"),
        (dict(top_k=0), "`top_k` must be None or an integer >= 1"),
        (dict(top_p=1.5), "`top_p` must be None or a number in (0, 1]"),
        (dict(confidence_threshold="high"), "`confidence_threshold` must be None or a finite number"),
        (dict(guidance_scale=float("nan")), "`guidance_scale` must be a finite number"),
        (dict(eos_token_id=[]), "`eos_token_id` must be None or a token id or a non-empty list"),
        (dict(pad_token_id=-1), "`pad_token_id` must be None or a token id >= 0"),
        (dict(sampler="fastest"), "`sampler` must be None, a preset in ['confidence', 'confidence-blocks'"),
        (dict(sampler={"remasking": "random"}), "`sampler['_class_name']` must be one of"),
        (dict(sampler={"_class_name": "DiscreteFlowScheduler", "remasking": "random"}), "keys ['remasking'] that"),
        (dict(sampler=3), "`sampler` must be None, a preset name, a scheduler config dict or a dfm_hf scheduler"),
        (dict(do_sample=True, num_beams=4), "unknown keys ['do_sample', 'num_beams']; it accepts ['block_length'"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        DFMGenerationConfig(**kwargs)
    assert message in str(err.value)


def test_config_refuses_a_sampler_that_disagrees_with_the_model():
    with pytest.raises(ValueError, match="`confidence_threshold` does not apply to a DiscreteFlowScheduler"):
        DFMGenerationConfig(confidence_threshold=0.9).build_scheduler(mask_token_id=2, vocab_size=50)
    config = DFMGenerationConfig(sampler=DiscreteFlowScheduler(mask_token_id=3, vocab_size=50))
    with pytest.raises(ValueError, match="`sampler` mask_token_id=3 disagrees with the model's 2"):
        config.build_scheduler(mask_token_id=2, vocab_size=50)
    with pytest.raises(ValueError, match="`sampler` vocab_size=50 disagrees with the model's 60"):
        config.build_scheduler(mask_token_id=3, vocab_size=60)


def test_config_from_model_config_takes_the_special_tokens():
    pipe = tiny_pipeline()
    config = DFMGenerationConfig.from_model_config(pipe.model.config)
    assert (config.pad_token_id, config.eos_token_id) == (
        pipe.model.config.pad_token_id,
        pipe.model.config.eos_token_id,
    )
    assert config.max_new_tokens == 64 and config.sampler is None
    config = DFMGenerationConfig.from_model_config({"pad_token_id": -1, "eos_token_id": [1, 2], "bos_token_id": None})
    assert (config.pad_token_id, config.eos_token_id) == (None, [1, 2])  # -1 is no token id: left unset


# ---------------------------------------------------------------------------------------------------------------------
# Streamers
# ---------------------------------------------------------------------------------------------------------------------


def test_draft_feed_sends_a_draft_only_after_a_model_call_and_pads_stopped_rows():
    recorder = Recorder()
    feed = DraftFeed(recorder, pad_token_id=0)
    canvas = torch.tensor([[5, 6], [7, 8]])
    feed.put(canvas[:, :1])
    feed.draft(canvas, nfe=0)  # no model call yet: nothing
    feed.draft(canvas, nfe=1)
    feed.draft(canvas, nfe=1)  # the same call: nothing
    feed.draft(canvas, nfe=3, rows=torch.tensor([True, False]))
    feed.put(canvas, rows=torch.tensor([False, True]))
    feed.end()
    assert recorder.kinds() == ["put", "draft", "draft", "put", "end"]
    assert recorder.values("draft")[1].tolist() == [[5, 6], [0, 0]]
    assert recorder.values("put")[1].tolist() == [[0, 0], [7, 8]]
    DraftFeed(None, pad_token_id=0).draft(canvas, nfe=1)  # no streamer: a no-op

    class PutOnly:  # a streamer without put_draft (transformers' TextStreamer) gets put and end only
        def __init__(self) -> None:
            self.calls = 0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1

        def end(self) -> None:
            self.calls += 1

    plain = PutOnly()
    feed = DraftFeed(plain, pad_token_id=0)
    feed.put(canvas)
    feed.draft(canvas, nfe=1)
    feed.end()
    assert plain.calls == 2


def test_terminal_streamer_draws_one_frame_per_draft_with_masks_as_placeholders():
    tok = tiny_tokenizer()
    mask = tok.mask_token_id
    prompt = tok("def add(a, b):", add_special_tokens=False)["input_ids"]
    final = tok("\n    return a + b", add_special_tokens=False)["input_ids"]
    drafts = [[mask] * len(final), final[:2] + [mask] * (len(final) - 2), final]  # a fake denoising run
    out = io.StringIO()
    streamer = TerminalStreamer(tok, file=out)
    streamer.put(torch.tensor([prompt]))
    for draft in drafts:
        streamer.put_draft(torch.tensor([draft]))
    assert streamer.drafts_drawn == 3
    assert streamer.text() == "def add(a, b):" + tok.decode(final)
    streamer.put(torch.tensor([final]))
    streamer.end()
    expected = [
        "def add(a, b):",  # the prompt
        "def add(a, b):" + MASK_PLACEHOLDER * len(final),  # every position masked
        tok.decode(prompt + final[:2]) + MASK_PLACEHOLDER * (len(final) - 2),
        tok.decode(prompt + final),
        tok.decode(prompt + final),  # confirmed
    ]
    assert out.getvalue() == "\n".join(expected) + "\n"
    assert streamer.confirmed == [] and streamer.draft == []  # reset for the next call


def test_terminal_streamer_redraws_in_place_on_a_terminal_and_clears_at_the_end():
    tok = tiny_tokenizer()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    streamer = TerminalStreamer(tok, file=out, placeholder="[.]", skip_prompt=True)
    streamer.put(torch.tensor([[5, 6]]))
    streamer.put_draft(torch.tensor([[tok.mask_token_id, 40]]))
    streamer.put_draft(torch.tensor([[41, 40]]))
    streamer.end()
    text = out.getvalue()
    assert text.startswith("[.]" + tok.decode([40]))  # the prompt skipped, the mask drawn as the placeholder
    assert text.count("\r\033[J") == 2  # the first draft erased before the second, the second at the end
    with pytest.raises(ValueError, match="`placeholder` must be a non-empty string"):
        TerminalStreamer(tok, placeholder="")
    with pytest.raises(ValueError, match="started with 1 rows, got a value with 2"):
        streamer.put(torch.tensor([[1]]))
        streamer.put_draft(torch.tensor([[1], [2]]))


# ---------------------------------------------------------------------------------------------------------------------
# DFMPipeline(..., streamer=...)
# ---------------------------------------------------------------------------------------------------------------------


def _call(pipe, streamer=None, **kwargs):
    kwargs = {"generator": torch.Generator().manual_seed(0), "output_type": "pt", **kwargs}
    return pipe(streamer=streamer, **kwargs)


def test_pipeline_streams_the_prompt_one_draft_per_model_call_and_the_result():
    pipe = tiny_pipeline()
    prompt = pipe.tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    recorder = Recorder()
    out = _call(pipe, recorder, input_ids=[prompt], gen_length=12, num_inference_steps=10)
    assert out.nfe < 10  # some steps ran no model (nothing could move): they send no draft
    assert recorder.kinds() == ["put"] + ["draft"] * out.nfe + ["put", "end"]
    first, final = recorder.values("put")
    assert first.tolist() == [prompt]
    assert torch.equal(torch.cat([first, final], 1), out.sequences)
    drafts = recorder.values("draft")
    mask = pipe.mask_token_id
    counts = [int((d == mask).sum()) for d in drafts]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and counts[0] < 12  # masks only go
    assert torch.equal(drafts[-1], final)
    assert torch.equal(_call(pipe, input_ids=[prompt], gen_length=12, num_inference_steps=10).sequences, out.sequences)


def test_pipeline_streams_block_models_block_by_block():
    pipe = block_pipe()
    recorder = Recorder()
    prompt = pipe.tokenizer("def f(x):", add_special_tokens=False)["input_ids"]
    out = _call(pipe, recorder, input_ids=[prompt], gen_length=10, num_inference_steps=6, return_full_text=True)
    assert recorder.kinds().count("draft") == out.nfe
    assert recorder.kinds()[0] == "put" and recorder.kinds()[-1] == "end"
    puts = recorder.values("put")
    block = pipe.model.config.block_size
    assert all(p.shape == (1, block) for p in puts[1:])  # each finished block, confirmed whole
    streamed = torch.cat(puts, 1)[0].tolist()
    assert streamed[: len(prompt)] == prompt
    assert streamed[: out.sequences.shape[1]] == out.sequences[0].tolist()
    # every draft is the open block, and a block's last draft is what it confirms
    kinds, values = recorder.kinds(), [v for _, v in recorder.calls]
    for i, kind in enumerate(kinds[1:-1], start=1):
        if kind == "put":
            assert kinds[i - 1] == "draft" and torch.equal(values[i - 1], values[i])
    assert torch.equal(_call(pipe, input_ids=[prompt], gen_length=10, num_inference_steps=6).sequences, out.sequences)


def test_pipeline_streams_a_batch_row_by_row():
    pipe = block_pipe()
    recorder = Recorder()
    out = _call(pipe, recorder, prompt=["def f(x):", "x = 1"], gen_length=10, num_inference_steps=6)
    assert all(v.shape[0] == 2 for _, v in recorder.calls if v is not None)
    assert recorder.kinds().count("draft") == out.nfe


def test_transformers_text_diffusion_streamer_plugs_in(capsys):
    from transformers import TextDiffusionStreamer

    pipe = tiny_pipeline()
    out = _call(pipe, TextDiffusionStreamer(pipe.tokenizer), prompt="def f(x):", gen_length=8, num_inference_steps=8)
    printed = capsys.readouterr().out
    assert printed.count("\033[33m") == out.nfe  # one yellow draft per model call
    assert printed.startswith("def ")


# ---------------------------------------------------------------------------------------------------------------------
# dfm-hf generate --stream
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_stream_draws_the_canvas_on_stderr_and_prints_the_same_result(capsys):
    argv = ["generate", "def add(a, b):", "--model", small_model_path(), "--gen-length", "6"]
    argv += ["--num-inference-steps", "6"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == plain.out  # the result on stdout, unchanged
    canvas = streamed.err[streamed.err.index("def add(a, b):\n") :]  # after the loading messages: the prompt
    frames = canvas.split("def add(a, b):")[2:]  # each draft frame starts with the prompt
    assert any(MASK_PLACEHOLDER in frame for frame in frames)  # masks drawn while it denoises
    assert MASK_PLACEHOLDER * 6 not in canvas  # a frame only after a model call, which commits a token
    assert frames[-1] == plain.out[len("def add(a, b):") : -1] + "\n"  # the last frame: the result
    assert "/6 [" not in streamed.err  # no progress bar over the canvas


# ---------------------------------------------------------------------------------------------------------------------
# model.generate(): the pipeline's loop
# ---------------------------------------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("preset", ["linear-euler", "cubic-corrector", "confidence", "confidence-blocks"])
def test_generate_gives_the_pipeline_tokens_and_nfe(preset):
    pipe = tiny_pipeline()
    pipe.load_scheduler_preset(preset)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, temperature=0.9)  # sampled
    rows = [pipe.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("def f(x):", "import os, sys")]
    expected = pipe(input_ids=rows, gen_length=12, num_inference_steps=8, output_type="pt", generator=_gen())
    ids, mask = _left_padded(rows, pipe.model.config.pad_token_id)
    recorder = Recorder()
    out = pipe.model.generate(
        ids, attention_mask=mask, max_new_tokens=12, num_inference_steps=8, sampler=preset, temperature=0.9,
        generator=_gen(), streamer=recorder,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    assert recorder.kinds().count("draft") == out.nfe and recorder.kinds()[-1] == "end"
    other = pipe.model.generate(ids, attention_mask=mask, max_new_tokens=12, num_inference_steps=8, sampler=preset,
                                temperature=0.9, generator=_gen(1))  # fmt: skip
    assert not torch.equal(other.sequences, out.sequences)  # the generator is read


@pytest.mark.parametrize("kind", ["greedy", "flow"])
def test_generate_on_a_block_model_gives_the_pipeline_tokens(kind):
    pipe = block_pipe()
    scheduler = ConfidenceUnmaskingScheduler if kind == "greedy" else DiscreteFlowScheduler
    pipe.scheduler = scheduler(mask_token_id=pipe.mask_token_id, vocab_size=pipe.model.config.vocab_size)
    rows = [pipe.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("def f(x):", "x = 1")]
    gens = [_gen(0), _gen(1)]
    expected = pipe(input_ids=rows, gen_length=10, num_inference_steps=6, output_type="pt", generator=gens)
    ids, mask = _left_padded(rows, pipe.model.config.pad_token_id)
    recorder = Recorder()
    out = pipe.model.generate(
        ids, attention_mask=mask, max_new_tokens=10, num_inference_steps=6, sampler=pipe.scheduler,
        generator=[_gen(0), _gen(1)], streamer=recorder,
    )  # fmt: skip
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    assert recorder.kinds().count("draft") == out.nfe


def test_generate_infills_and_reads_the_saved_generation_config(tmp_path):
    pipe = tiny_pipeline()
    model, tok = pipe.model, pipe.tokenizer
    model.generation_config = DFMGenerationConfig(max_new_tokens=5, num_inference_steps=5, sampler="confidence")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["sampler"] == "confidence"
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.generation_config == model.generation_config
    ids = torch.tensor([tok("def f(x):", add_special_tokens=False)["input_ids"]])
    out = loaded.generate(ids)  # the saved settings: 5 tokens, greedy confidence unmasking
    assert out.sequences.shape == (1, ids.shape[1] + 5) and torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(loaded.generate(ids).sequences, out.sequences)  # greedy: deterministic
    holes = ids.clone()
    holes[0, 2:4] = tok.mask_token_id
    filled = loaded.generate(holes, max_new_tokens=0).sequences
    assert filled.shape == holes.shape and not (filled == tok.mask_token_id).any()
    keep = holes != tok.mask_token_id
    assert torch.equal(filled[keep], holes[keep])  # the given tokens never change


def test_generate_refuses_bad_arguments_by_name():
    model = tiny_pipeline().model
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['do_sample'\]"):
        model.generate(ids, do_sample=True)
    with pytest.raises(ValueError, match="`max_new_tokens` must be an integer >= 0"):
        model.generate(ids, max_new_tokens=-2)
    with pytest.raises(ValueError, match="`input_ids` must be a \\(rows, length\\) integer tensor"):
        model.generate(ids.float())
    with pytest.raises(ValueError, match="`attention_mask` must hold only 0"):
        model.generate(ids, attention_mask=torch.full_like(ids, 2))
    with pytest.raises(
        ValueError, match="`max_new_tokens` \\(600\\) = 603 exceeds the model's max_position_embeddings"
    ):
        model.generate(ids, max_new_tokens=600)
    with pytest.raises(TypeError, match="`generation_config` must be a DFMGenerationConfig"):
        model.generate(ids, generation_config={"max_new_tokens": 3})
    assert model.generation_config.max_new_tokens == 64  # a call's keyword arguments leave the model's config alone


def test_generate_on_a_block_model_refuses_infilling():
    pipe = block_pipe()
    ids = torch.tensor([[5, pipe.mask_token_id, 7]])
    with pytest.raises(ValueError, match="Infilling \\(mask tokens inside the prompt\\) is not supported"):
        pipe.model.generate(ids, max_new_tokens=4)
