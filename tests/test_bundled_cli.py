"""The bundled model and the `dfm-hf` command line: offline, deterministic, infilling, CLI contract.

The fast tests call ``dfm_hf.cli.main`` in-process on the small model shipped whole in the package; the slow ones run
the default model (the adapted SmolLM2 bundle, materialised once under ``$DFM_HF_CACHE``) and the CLI as a process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.bundles import bundled_model_path
from dfm_hf.bundles.shipped import small_model_path
from dfm_hf.cli import main


def _run(*args: str, offline: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing can be fetched
    return subprocess.run([sys.executable, "-m", "dfm_hf.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# In-process, on the small shipped model
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_usage_and_unknown_command(capsys):
    for argv in ([], ["serve"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: dfm-hf {generate,train,evaluate,lm-eval}"), err


def test_cli_generate_completes_and_infills_with_a_given_model(capsys, one_thread):
    small = small_model_path()
    argv = ["generate", "def add(a, b):", "--model", small, "--gen-length", "6", "--num-inference-steps", "6"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("def add(a, b):") and first.out.endswith("\n")
    assert "/6 [" in first.err and "/6 [" not in first.out  # the sampling progress bar goes to stderr
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out  # seeded
    infill = ["generate", "x = <|fill|> + 1\\n", "--infill", "--fill-length", "2", "--num-inference-steps", "4"]
    assert main([*infill, "--model", small]) == 0
    text = capsys.readouterr().out
    assert text.startswith("x = ") and text.endswith(" + 1\n\n") and "<|" not in text, text  # context kept, filled


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "./does/not/exist"], "`--model` './does/not/exist' could not be loaded as a DFM pipeline"),
        (["--num-inference-steps", "0"], "`--num-inference-steps` must be >= 1, got 0."),
        (["--fill-length", "0", "--infill"], "`--fill-length` must be >= 1, got 0."),
        (["--infill"], "`--infill` needs a <|fill|> marker or the mask token in the prompt."),
        (["--scheduler-preset", "nope"], "`--scheduler-preset` 'nope': `name` must be one of the presets"),
    ],
)
def test_cli_generate_bad_input_exits_2_naming_the_flag(argv, message, capsys):
    model = [] if "--model" in argv else ["--model", small_model_path()]
    assert main(["generate", "x", *model, *argv]) == 2
    out = capsys.readouterr()
    assert out.out == "" and f"dfm-hf generate: error: {message}" in out.err, out.err


def test_cli_train_runs_the_training_script_and_checks_its_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--stdlib", "--train_file", "x.py", "--output_dir", str(out)]) == 2
    assert "dfm-hf train: error: pass exactly one of `--train_file` and `--stdlib`." in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The default model, and the CLI as a process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    pipe = DFMPipeline.from_pretrained(bundled_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_bundled_pipeline_is_time_agnostic_mask_source_and_deterministic(bundled):
    assert bundled.model.config.time_conditioning is False
    assert bundled.scheduler.config.source_distribution == "mask"
    assert {"linear-euler", "cubic-euler", "cubic-corrector", "confidence"} <= set(bundled.scheduler_presets)
    a = bundled("def fibonacci(n):", gen_length=24, num_inference_steps=24, generator=torch.Generator().manual_seed(0))
    b = bundled("def fibonacci(n):", gen_length=24, num_inference_steps=24, generator=torch.Generator().manual_seed(0))
    assert a.texts == b.texts and a.texts[0].startswith("def fibonacci(n):")
    assert len(a.texts[0]) > len("def fibonacci(n):")


@pytest.mark.slow
def test_bundled_infilling_keeps_context(bundled):
    mask = bundled.tokenizer.mask_token
    prefix, suffix = "def area(width, height):\n    return ", "\n\n\nprint(area(2, 3))\n"
    out = bundled(prefix + mask * 5 + suffix, gen_length=0, num_inference_steps=16,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert out.texts[0].startswith(prefix) and out.texts[0].endswith(suffix)


@pytest.mark.slow
def test_cli_generate_offline_stdout_stderr_split():
    first = _run("generate", "import os", "--gen-length", "12", "--num-inference-steps", "12", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("import os")
    # progress bars go to stderr: loading the pipeline, then the 12 sampling steps
    assert "Loading pipeline components" in first.stderr and "/12 [" in first.stderr
    assert "Loading" not in first.stdout and "/12 [" not in first.stdout
    again = _run("generate", "import os", "--gen-length", "12", "--num-inference-steps", "12", "--seed", "3")
    assert again.stdout == first.stdout
    prefix, suffix = "def f(x):\n    return ", "\n\nprint(f(2))\n"
    infill = _run("generate", "--infill", "def f(x):\\n    return <|fill|>\\n\\nprint(f(2))\\n", "--fill-length", "3",
                  "--num-inference-steps", "8", "--scheduler-preset", "cubic-corrector")  # fmt: skip
    assert infill.returncode == 0, infill.stderr
    # the whole text (context kept, hole filled) and the newline the CLI ends its output with
    assert infill.stdout.startswith(prefix) and infill.stdout.endswith(suffix + "\n"), infill.stdout
    filled = infill.stdout[len(prefix) : -len(suffix) - 1]
    assert filled.strip() and "<|" not in filled, filled  # 3 real tokens, no marker or mask token left


@pytest.mark.slow
def test_cli_malformed_model_path_is_a_clear_error(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    for bad in ("./does/not/exist", str(tmp_path / "not-a-pipeline"), "a/b/c/d"):
        res = _run("generate", "x", "--model", bad)
        assert res.returncode == 2
        assert f"dfm-hf generate: error: `--model` {bad!r}" in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""
    res = _run("generate", "x", "--scheduler-preset", "nope", "--gen-length", "2", "--num-inference-steps", "2")
    assert res.returncode == 2 and "`--scheduler-preset` 'nope': `name` must be one of the presets" in res.stderr
    assert "'linear-euler'" in res.stderr  # the accepted presets are listed
