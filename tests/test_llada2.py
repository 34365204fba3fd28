"""LLaDA2.x (``model_type: "llada2_moe"``) loaded natively, and LLaDA2.1's token editing.

Tiny checkpoints are written in LLaDA2's exact format (its config keys, the fused ``query_key_value``, q/k layernorms,
a dense first layer, then routed experts with ``gate.expert_bias`` and a shared expert; sharded and not). The
references below are written from the published formulas (LLaDA2's modeling and its ``generate()``), independently
of our layers and samplers:

* the forward: RMSNorm, fused q/k/v split ``[heads, kv, kv] x head_dim``, RMSNorm of each q/k head, RoPE on the first
  ``partial_rotary_factor * head_dim`` dimensions, block-causal attention in blocks of 32 from position 0, and the MoE
  (sigmoid scores, group-limited top-k on the scores plus the expert bias, weights = normalised unbiased scores times
  ``routed_scaling_factor``, shared expert added), every expert evaluated densely;
* the sampler: per block of 32, the window ``[0, end of block]`` recomputed each step (no cache), ``k_s`` tokens a
  step (all masked positions above ``threshold`` if at least ``k_s``, else the top ``k_s``), committed non-prompt
  tokens replaced by a different arg-max above ``editing_threshold``, editing passes after the masks (at most
  ``max_post_steps``, ending at a pass without edits), stop after a block holding EOS.

The reference gives the mask token no mass (its logit set to -inf, as our samplers never draw it), which a trained
model does as well. diffusers' LLaDA2Pipeline (an independent implementation of the same sampler) is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch

from dfm_hf import DFMPipeline
from dfm_hf.conversion import llada2_config_to_dfm
from dfm_hf.models import DFMConfig, DFMForMaskedGeneration
from dfm_hf.models.layers import DFMMLP
from dfm_hf.models.moe import DFMSparseMoE
from dfm_hf.schedulers import ConfidenceUnmaskingScheduler

try:
    from . import conversion_helpers as ch
except ImportError:
    import conversion_helpers as ch

HIDDEN, LAYERS, HEADS, KV, HEAD_DIM = 32, 3, 4, 2, 16
EXPERTS, TOP_K, MOE_FFN, N_GROUP, TOPK_GROUP = 8, 2, 12, 4, 2
MASK, EOS, ROWS, BLOCK = ch.LLADA_MASK, 1, ch.ROWS, 32


def llada2_config(**overrides) -> dict:
    """A config.json with the keys of inclusionAI/LLaDA2.0-mini's, scaled down."""
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": 40,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "model_type": "llada2_moe",
        "moe_intermediate_size": MOE_FFN,
        "norm_topk_prob": True,
        "num_experts_per_tok": TOP_K,
        "norm_head": False,
        "num_attention_heads": HEADS,
        "num_experts": EXPERTS,
        "num_key_value_heads": KV,
        "rope_theta": 600000,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_bias": False,
        "use_rmsnorm": True,
        "rms_norm_eps": 1e-06,
        "head_dim": HEAD_DIM,
        "num_shared_experts": 1,
        "use_cache": False,
        "use_qkv_bias": False,
        "embedding_dropout": 0.0,
        "norm_softmax": False,
        "output_dropout": 0.0,
        "vocab_size": ROWS,
        "rotary_dim": HEAD_DIM // 2,
        "using_split_qkv_in_self_attention": False,
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "routed_scaling_factor": 2.5,
        "n_group": N_GROUP,
        "topk_group": TOPK_GROUP,
        "score_function": "sigmoid",
        "initializer_range": 0.02,
        "max_window_layers": 28,
        "output_router_logits": False,
        "pad_token_id": 0,
        "eos_token_id": EOS,
        "mask_token_id": MASK,
        "partial_rotary_factor": 0.5,
        "use_sliding_window": False,
    }
    config.update(overrides)
    return config


def llada2_tensors(seed: int = 0, head_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random tensors under LLaDA2's names (norm scales and expert biases too, so a wrong mapping shows)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    def norm(n):
        return 1 + rand(n, std=0.3)

    t = {"model.word_embeddings.weight": rand(ROWS, HIDDEN, std=1.0), "model.norm.weight": norm(HIDDEN)}
    t["lm_head.weight"] = rand(ROWS, HIDDEN) * head_scale
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "attention.query_key_value.weight"] = rand((HEADS + 2 * KV) * HEAD_DIM, HIDDEN)
        t[p + "attention.dense.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        t[p + "attention.query_layernorm.weight"] = norm(HEAD_DIM)
        t[p + "attention.key_layernorm.weight"] = norm(HEAD_DIM)
        t[p + "input_layernorm.weight"] = norm(HIDDEN)
        t[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        mlps = {"mlp.": 40}
        if i >= 1:
            t[p + "mlp.gate.weight"] = rand(EXPERTS, HIDDEN, std=0.5)
            t[p + "mlp.gate.expert_bias"] = rand(EXPERTS, std=0.3)
            mlps = {f"mlp.experts.{e}.": MOE_FFN for e in range(EXPERTS)}
            mlps["mlp.shared_experts."] = MOE_FFN
        for name, width in mlps.items():
            t[p + name + "gate_proj.weight"] = rand(width, HIDDEN)
            t[p + name + "up_proj.weight"] = rand(width, HIDDEN)
            t[p + name + "down_proj.weight"] = rand(HIDDEN, width)
    return t


# --- the reference forward, from LLaDA2's published modeling -------------------------------------------------------


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swiglu(x, t, p):
    return (torch.nn.functional.silu(x @ t[p + "gate_proj.weight"].T) * (x @ t[p + "up_proj.weight"].T)) @ t[
        p + "down_proj.weight"
    ].T


def route(x, t, p, top_k=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP, scale=2.5):
    """(tokens, experts) dense routing weights: zero except at the chosen experts."""
    scores = torch.sigmoid(x @ t[p + "mlp.gate.weight"].T)
    biased = scores + t[p + "mlp.gate.expert_bias"]
    per_group = EXPERTS // n_group
    weights = torch.zeros_like(scores)
    for row in range(x.shape[0]):
        groups = biased[row].view(n_group, per_group).sort(descending=True).values[:, :2].sum(-1)
        keep = groups.sort(descending=True).indices[:topk_group]
        allowed = torch.full((EXPERTS,), -math.inf)
        for g in keep.tolist():
            allowed[g * per_group : (g + 1) * per_group] = 0
        chosen = (biased[row] + allowed).sort(descending=True).indices[:top_k]
        w = scores[row, chosen] / scores[row, chosen].sum()
        weights[row, chosen] = w * scale
    return weights


def rope(x, positions, theta=600000.0):
    rd = HEAD_DIM // 2
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    ang = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rot, rest = x[..., :rd], x[..., rd:]
    half = torch.cat([-rot[..., rd // 2 :], rot[..., : rd // 2]], -1)
    return torch.cat([rot * cos + half * sin, rest], -1)


def reference_logits(t: dict, ids: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """LLaDA2's forward for one row ``ids`` (length n) under its block-causal mask; (n, vocab) float32 logits with the
    mask token's logit at -inf."""
    n = ids.shape[0]
    pos = torch.arange(n)
    visible = (pos[None, :] // block) <= (pos[:, None] // block)
    h = t["model.word_embeddings.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        qkv = (x @ t[p + "attention.query_key_value.weight"].T).view(n, HEADS + 2 * KV, HEAD_DIM)
        q, k, v = qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV], qkv[:, HEADS + KV :]
        q = rope(rms(q, t[p + "attention.query_layernorm.weight"]).transpose(0, 1), pos)
        k = rope(rms(k, t[p + "attention.key_layernorm.weight"]).transpose(0, 1), pos)
        k, v = k.repeat_interleave(HEADS // KV, 0), v.transpose(0, 1).repeat_interleave(HEADS // KV, 0)
        att = (q @ k.transpose(1, 2)) / math.sqrt(HEAD_DIM)
        att = att.masked_fill(~visible, -math.inf).softmax(-1)
        h = h + (att @ v).transpose(0, 1).reshape(n, -1) @ t[p + "attention.dense.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        if i == 0:
            h = h + swiglu(x, t, p + "mlp.")
        else:
            weights = route(x, t, p)
            experts = torch.stack([swiglu(x, t, p + f"mlp.experts.{e}.") for e in range(EXPERTS)], 1)
            h = h + (weights[..., None] * experts).sum(1) + swiglu(x, t, p + "mlp.shared_experts.")
    logits = rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T
    logits[:, MASK] = -math.inf
    return logits


def reference_generate(
    t: dict,
    prompt: list[int],
    gen_length: int,
    threshold: float,
    editing_threshold=None,
    max_post_steps: int = 0,
    steps: int = BLOCK,
) -> tuple[list[int], int]:
    """LLaDA2.x's greedy generate(): blocks of 32 from position 0, no cache, EOS stop after a block. Returns the
    ``gen_length`` tokens and the number of forward passes."""
    P = len(prompt)
    num_blocks = -(-(P + gen_length) // BLOCK)
    x = torch.full((num_blocks * BLOCK,), MASK)
    x[:P] = torch.tensor(prompt)
    schedule = [BLOCK // steps + (s < BLOCK % steps) for s in range(steps)]
    calls = 0
    for b in range(P // BLOCK, num_blocks):
        start, end = b * BLOCK, (b + 1) * BLOCK
        given = torch.arange(start, end) < P
        step, post = 0, 0
        while True:
            active = x[start:end] == MASK
            if not active.any():
                if editing_threshold is None:
                    break
                post += 1
                if post > max_post_steps:
                    break
            probs = reference_logits(t, x[:end])[start:end].softmax(-1)
            calls += 1
            conf, tok = probs.max(-1)
            transfer = torch.zeros(BLOCK, dtype=torch.bool)
            if active.any():
                k = schedule[min(step, steps - 1)]
                c = torch.where(active, conf, torch.tensor(-math.inf))
                if int((c > threshold).sum()) >= k:
                    transfer = c > threshold
                else:
                    transfer[c.topk(min(k, int(active.sum()))).indices] = True
                step += 1
            edit = torch.zeros(BLOCK, dtype=torch.bool)
            if editing_threshold is not None:
                edit = ~active & ~given & (tok != x[start:end]) & (conf > editing_threshold)
            block = x[start:end].clone()
            block[transfer | edit] = tok[transfer | edit]
            x[start:end] = block
            if not active.any() and not edit.any():
                break
        if (x[P:end] == EOS).any():
            break
    return x[P : P + gen_length].tolist(), calls


# --- fixtures ---------------------------------------------------------------------------------------------------


def write_llada2(folder, tensors=None, shards: int = 1, with_tokenizer: bool = False, **config_overrides):
    tensors = llada2_tensors() if tensors is None else tensors
    ch.write_checkpoint(str(folder), tensors, llada2_config(**config_overrides), shards=shards)
    if with_tokenizer:
        ch.save_tokenizer(ch.llada_tokenizer(), str(folder))
    return str(folder)


def test_config_conversion():
    kwargs = llada2_config_to_dfm(llada2_config())
    assert kwargs["rope_parameters"] == {"rope_type": "default", "rope_theta": 600000, "partial_rotary_factor": 0.5}
    assert (kwargs["qk_norm"], kwargs["logits_shift"], kwargs["block_size"]) == (True, False, 32)
    assert (kwargs["num_experts"], kwargs["num_experts_per_tok"], kwargs["first_k_dense_replace"]) == (8, 2, 1)
    assert (kwargs["n_group"], kwargs["topk_group"], kwargs["routed_scaling_factor"]) == (4, 2, 2.5)
    assert (kwargs["mask_token_id"], kwargs["eos_token_id"], kwargs["pad_token_id"]) == (MASK, EOS, 0)
    defaults = llada2_config_to_dfm({k: v for k, v in llada2_config().items() if "token_id" not in k})
    assert (defaults["mask_token_id"], defaults["eos_token_id"]) == (156895, 156892)


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_bias", True),
        ("use_qkv_bias", True),
        ("hidden_act", "gelu"),
        ("score_function", "softmax"),
        ("num_nextn_predict_layers", 1),
        ("use_sliding_window", True),
        ("partial_rotary_factor", 1.5),
    ],
)
def test_unsupported_config_is_refused(tmp_path, key, value):
    folder = write_llada2(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=key):
        DFMForMaskedGeneration.from_pretrained(folder)


def test_use_bias_defaults_to_llada2s_true():
    config = llada2_config()
    del config["use_bias"]
    with pytest.raises(ValueError, match="use_bias"):
        llada2_config_to_dfm(config)


@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_the_published_formulas(tmp_path, shards):
    tensors = llada2_tensors()
    model = DFMForMaskedGeneration.from_pretrained(write_llada2(tmp_path, tensors, shards=shards))
    assert model.config.block_size == BLOCK and model.config.num_experts == EXPERTS
    assert isinstance(model.model.layers[1].mlp, DFMSparseMoE) and isinstance(model.model.layers[0].mlp, DFMMLP)
    ids = torch.randint(3, MASK, (2, 45), generator=torch.Generator().manual_seed(3))  # two blocks, the second partial
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    for row in range(2):
        theirs = reference_logits(tensors, ids[row])
        keep = torch.arange(ROWS) != MASK
        torch.testing.assert_close(ours[row][:, keep], theirs[:, keep], atol=2e-4, rtol=0)


def test_strict_loading_names_missing_and_unexpected(tmp_path):
    tensors = llada2_tensors()
    del tensors["model.layers.2.mlp.gate.expert_bias"]
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(EXPERTS, HIDDEN)
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.2\.mlp\.gate\.expert_bias.*unexpected"):
        DFMForMaskedGeneration.from_pretrained(write_llada2(tmp_path, tensors))
    tensors = llada2_tensors()
    tensors["model.layers.1.attention.query_key_value.weight"] = torch.zeros(HEADS * HEAD_DIM, HIDDEN)
    with pytest.raises(ValueError, match="query_key_value"):
        DFMForMaskedGeneration.from_pretrained(write_llada2(tmp_path / "b", tensors))


def test_fused_qkv_split_and_dtype(tmp_path):
    tensors = llada2_tensors()
    model = DFMForMaskedGeneration.from_pretrained(
        write_llada2(tmp_path, tensors), dtype=torch.bfloat16, device_map="cpu"
    )
    attention = model.model.layers[2].self_attn
    fused = tensors["model.layers.2.attention.query_key_value.weight"].to(torch.bfloat16)
    q, k, v = fused.split([HEADS * HEAD_DIM, KV * HEAD_DIM, KV * HEAD_DIM])
    assert torch.equal(attention.q_proj.weight, q) and torch.equal(attention.k_proj.weight, k)
    assert torch.equal(attention.v_proj.weight, v) and attention.q_proj.weight.dtype == torch.bfloat16
    bias = model.model.layers[2].mlp.gate.expert_bias
    assert torch.equal(bias, tensors["model.layers.2.mlp.gate.expert_bias"].to(bias.dtype))


def test_router_bias_steers_the_choice_not_the_weights():
    config = DFMConfig(
        vocab_size=10,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=8,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_FFN,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        routed_scaling_factor=2.5,
    )
    moe = DFMSparseMoE(config, DFMMLP)
    torch.manual_seed(0)
    for parameter in moe.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    x = torch.randn(7, HIDDEN)
    t = {"x.mlp.gate.weight": moe.gate.weight.detach(), "x.mlp.gate.expert_bias": torch.zeros(EXPERTS)}
    for bias in (torch.zeros(EXPERTS), torch.linspace(1.0, -1.0, EXPERTS)):
        moe.gate.expert_bias.copy_(bias)
        t["x.mlp.gate.expert_bias"] = bias
        weights = route(x, t, "x.")
        experts, w = moe.gate(x)
        dense = torch.zeros(7, EXPERTS).scatter(1, experts, w)
        torch.testing.assert_close(dense, weights, atol=1e-6, rtol=0)
        sums = weights.sum(-1)
        torch.testing.assert_close(sums, torch.full_like(sums, 2.5))  # normalised unbiased scores times 2.5
        expected = torch.stack(
            [sum(weights[r, e] * moe.experts[e](x[r]) for e in range(EXPERTS)) for r in range(7)]
        ).detach()
        torch.testing.assert_close(moe(x).detach(), expected, atol=1e-5, rtol=0)
    assert not torch.equal(route(x, {**t, "x.mlp.gate.expert_bias": torch.zeros(EXPERTS)}, "x.") > 0, weights > 0)


def test_moe_keys_are_validated():
    base = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_experts=8, moe_intermediate_size=4)
    for key, value in [
        ("num_experts_per_tok", 0),
        ("n_group", 3),
        ("topk_group", 5),
        ("routed_scaling_factor", -1.0),
        ("first_k_dense_replace", 99),
    ]:
        with pytest.raises(ValueError, match=key):
            DFMConfig(**{**base, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, key: value})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        DFMConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, moe_intermediate_size=4)


# --- generation -------------------------------------------------------------------------------------------------

PROMPT = [5, 17, 200, 31, 99, 150, 7, 64, 250, 12]  # 10 tokens: the first block holds the prompt's tail


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny LLaDA2 folder with a tokenizer whose head is scaled up (peaked predictions: thresholds and editing
    matter), and its tensors."""
    tensors = llada2_tensors(seed=3, head_scale=4.0)
    folder = write_llada2(tmp_path_factory.mktemp("llada2"), tensors, with_tokenizer=True)
    return folder, tensors


def pipe_tokens(folder, preset, gen_length, **call):
    pipe = DFMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    default = pipe.scheduler.config  # the family default: LLaDA2.0's sampler
    assert (default.confidence_threshold, default.editing_threshold, default.temperature) == (0.95, None, 0.0)
    assert {"llada2-threshold-0.95", "llada2-threshold-0.7", "llada21-editing"} <= set(pipe.scheduler_presets)
    pipe.scheduler = pipe.scheduler_presets[preset]
    blocks = -(-(len(PROMPT) % BLOCK + gen_length) // BLOCK)
    out = pipe(
        input_ids=[PROMPT],
        gen_length=gen_length,
        num_inference_steps=BLOCK * blocks,
        output_type="pt",
        return_full_text=False,
        **call,
    )
    return out, pipe


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, threshold, editing",
    [("llada2-threshold-0.95", 0.95, None), ("llada2-threshold-0.7", 0.7, None), ("llada21-editing", 0.7, 0.5)],
)
def test_greedy_generation_matches_the_reference_sampler(peaked, preset, threshold, editing):
    folder, tensors = peaked
    out, pipe = pipe_tokens(folder, preset, gen_length=54)
    ours = out.sequences[0].tolist()
    theirs, calls = reference_generate(tensors, PROMPT, 54, threshold, editing, 16 if editing else 0)
    assert EOS not in theirs and len(set(theirs)) > 8  # two whole blocks, varied tokens
    assert ours == theirs
    assert out.nfe == calls  # one forward a step (the cache serves the finished block), editing passes included


@pytest.mark.slow
def test_editing_changes_committed_tokens(peaked):
    """On the peaked model editing rewrites tokens: with it the output differs from the same sampler without it."""
    folder, tensors = peaked
    plain, plain_calls = reference_generate(tensors, PROMPT, 54, 0.7)
    strict, strict_calls = reference_generate(tensors, PROMPT, 54, 0.95)
    edited, edited_calls = reference_generate(tensors, PROMPT, 54, 0.7, 0.5, 16)
    assert plain != edited and plain != strict  # the threshold and the editing both act on this model
    assert plain_calls < strict_calls < 2 * BLOCK and edited_calls > plain_calls


class _MaskFreeLogits(torch.nn.Module):
    """Our model as diffusers' LLaDA2Pipeline calls it, the mask token's logit at -inf (it is never drawn)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        out.logits[..., MASK] = -math.inf
        return out


@pytest.mark.slow
@pytest.mark.parametrize("editing", [None, 0.5])
def test_diffusers_llada2_pipeline_agrees(peaked, editing):
    """diffusers' LLaDA2Pipeline + BlockRefinementScheduler (greedy, no EOS stop) generates the same tokens on our
    converted model. It runs one editing pass more than LLaDA2's generate() for the same ``max_post_steps`` (it
    checks the count after the pass), so it is given one fewer."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    folder, tensors = peaked
    model = DFMForMaskedGeneration.from_pretrained(folder)
    theirs = LLaDA2Pipeline(model=_MaskFreeLogits(model), scheduler=BlockRefinementScheduler(), tokenizer=None)
    theirs.set_progress_bar_config(disable=True)
    out = theirs(
        input_ids=torch.tensor([PROMPT]),
        gen_length=54,
        block_length=BLOCK,
        num_inference_steps=BLOCK,
        sampling_method="greedy",
        threshold=0.7,
        editing_threshold=editing,
        max_post_steps=15,
        eos_early_stop=False,
        mask_token_id=MASK,
        output_type="seq",
    )
    reference, _ = reference_generate(tensors, PROMPT, 54, 0.7, editing, 16 if editing else 0)
    assert out.sequences[0].tolist() == reference


def test_editing_options_are_validated():
    base = dict(mask_token_id=MASK, vocab_size=ROWS)
    for kwargs, match in [
        (dict(editing_threshold=1.5), "editing_threshold"),
        (dict(editing_threshold=0.0), "editing_threshold"),
        (dict(max_post_steps=-1), "max_post_steps"),
        (dict(editing_threshold=0.5, confidence="margin"), "editing_threshold"),
        (dict(editing_threshold=0.5, remasking="random"), "editing_threshold"),
    ]:
        with pytest.raises(ValueError, match=match):
            ConfidenceUnmaskingScheduler(**base, **kwargs)


@pytest.mark.slow
def test_editing_on_a_full_attention_model(peaked, tmp_path):
    """Token editing is a sampler option for any model: on a full-attention model (semi-autoregressive windows of
    32) it rewrites committed tokens, never the prompt, and an editing threshold no probability reaches changes
    nothing."""
    folder, _ = peaked
    model = DFMForMaskedGeneration.from_pretrained(folder)
    model.config.block_size = None
    model.save_pretrained(tmp_path / "full")
    full = DFMForMaskedGeneration.from_pretrained(tmp_path / "full")
    assert full.config.block_size is None
    pipe = DFMPipeline(model=full, scheduler=ConfidenceUnmaskingScheduler(mask_token_id=MASK, vocab_size=ROWS))
    pipe.set_progress_bar_config(disable=True)

    def run(**options):
        pipe.scheduler = ConfidenceUnmaskingScheduler(
            mask_token_id=MASK, vocab_size=ROWS, block_length=32, confidence_threshold=0.7, **options
        )
        return pipe(input_ids=[PROMPT], gen_length=64, num_inference_steps=64, output_type="pt").sequences[0]

    plain = run()
    edited = run(editing_threshold=0.5, max_post_steps=16)
    never = run(editing_threshold=1 - 1e-12, max_post_steps=16)
    assert edited[: len(PROMPT)].tolist() == PROMPT and MASK not in edited.tolist()
    assert not torch.equal(plain, edited) and torch.equal(plain, never)


def test_converted_model_saves_and_reloads_in_our_format(tmp_path):
    model = DFMForMaskedGeneration.from_pretrained(write_llada2(tmp_path / "llada2"))
    model.save_pretrained(tmp_path / "ours")
    again = DFMForMaskedGeneration.from_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "moe.py").is_file()  # the remote-code copy holds the MoE layer
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert torch.equal(again.model.layers[1].mlp.gate.expert_bias, model.model.layers[1].mlp.gate.expert_bias)
