"""The bundled model and the `dfm-hf generate` main job: offline, deterministic, infilling, CLI contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.cli import bundled_model_path


def _run(*args: str, offline: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing can be fetched
    return subprocess.run([sys.executable, "-m", "dfm_hf.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def bundled():
    pipe = DFMPipeline.from_pretrained(bundled_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_pipeline_is_time_agnostic_mask_source_and_deterministic(bundled):
    assert bundled.model.config.time_conditioning is False
    assert bundled.scheduler.config.source_distribution == "mask"
    assert {"linear-euler", "cubic-euler", "cubic-corrector", "confidence"} <= set(bundled.scheduler_presets)
    a = bundled("def fibonacci(n):", gen_length=24, num_inference_steps=24, generator=torch.Generator().manual_seed(0))
    b = bundled("def fibonacci(n):", gen_length=24, num_inference_steps=24, generator=torch.Generator().manual_seed(0))
    assert a.texts == b.texts and a.texts[0].startswith("def fibonacci(n):")
    assert len(a.texts[0]) > len("def fibonacci(n):")


def test_bundled_infilling_keeps_context(bundled):
    mask = bundled.tokenizer.mask_token
    prefix, suffix = "def area(width, height):\n    return ", "\n\n\nprint(area(2, 3))\n"
    out = bundled(prefix + mask * 5 + suffix, gen_length=0, num_inference_steps=16,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert out.texts[0].startswith(prefix) and out.texts[0].endswith(suffix)


def test_cli_generate_offline_stdout_stderr_split():
    first = _run("generate", "import os", "--gen-length", "12", "--num-inference-steps", "12", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("import os")
    assert "Loading" in first.stderr or "%" in first.stderr  # progress bars go to stderr
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


def test_cli_malformed_model_path_is_a_clear_error(tmp_path):
    (tmp_path / "not-a-pipeline").mkdir()
    for bad in ("./does/not/exist", str(tmp_path / "not-a-pipeline"), "a/b/c/d"):
        res = _run("generate", "x", "--model", bad)
        assert res.returncode == 2
        assert "--model" in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""
    res = _run("generate", "x", "--scheduler-preset", "nope", "--gen-length", "2", "--num-inference-steps", "2")
    assert res.returncode == 2 and "name" in res.stderr
