"""Discrete Flow Matching denoiser: a bidirectional transformer that predicts ``p_{1|t}(x1 | x_t)``.

Llama-style layering (config / attention / MLP / layer / model / head): pre-norm, RMSNorm, rotary position embeddings,
gated SiLU MLP, bidirectional attention through transformers' attention interface (eager, SDPA, flex or flash attention;
no causal mask unless one is passed as a 4-D mask) or block-causal attention (``config.block_size``: block diffusion),
grouped-query key/value heads, optional q/k/v biases, an LM head (tied to the input embeddings or not), an optional
logit shift (position ``i - 1`` predicts token ``i``), and optional adaLN-Zero time conditioning (DiT). That covers
LLaDA, Dream / DiffuCoder (Qwen2) and Llama / Mistral / Qwen2 causal LMs adapted to diffusion. A partial forward against
a key/value cache (Fast-dLLM style prefix / dual caching) runs through ``past_key_values`` + ``position_ids`` (see
:mod:`.cache`); a block-diffusion model appends to a ``DynamicCache`` instead (exact).

This file imports only ``torch``, ``transformers`` and its sibling files (configuration, rotary, masking, cache,
losses, validation, outputs, ...): ``save_pretrained`` copies them next to the weights, and the checkpoint loads as
remote code with ``trust_remote_code=True``. ``generate()`` comes from ``dfm_hf.generation`` where ``dfm_hf`` is
installed; a remote-code copy loaded without it runs ``forward`` only.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from .cache import check_cache, prepare_cache
from .configuration_dfm import DFMConfig
from .dit import dit_body, dit_sigma, subs_logits
from .layers import (
    DFMRMSNorm,
    DFMTimestepEmbedder,
    DFMTransformerLayer,
    DFMZeroLinear,
    attention_implementation,
    modulate,
    shift_hidden_states,
    shift_sources,
)
from .loading import (
    broken_weights_error,
    check_loading_info,
    check_quantization_config,
    checkpoint_model_type,
    record_quantized_mismatches,
)
from .losses import masked_cross_entropy_loss
from .masking import create_attention_mask, pattern_positions
from .modeling_outputs import DFMMaskedGenerationOutput, DFMModelOutput
from .rotary import DFMRotaryEmbedding
from .validation import (
    check_inputs,
    check_labels,
    check_no_kwargs,
    prepare_block_size,
    prepare_logits_to_keep,
    prepare_position_ids,
    prepare_timesteps,
)

try:  # generate() and generation_config.json (a layer of dfm_hf below this module)
    from dfm_hf.generation import DFMGenerationMixin
except ImportError:
    if __package__ == "dfm_hf.models":  # the library itself: a real error
        raise
    DFMGenerationMixin = type("DFMForwardOnly", (), {})  # a remote-code copy where dfm_hf is not installed


class DFMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hugging Face plumbing shared by the DFM models."""

    config_class = DFMConfig
    config: DFMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DFMTransformerLayer", "DiTLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, DFMZeroLinear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DFMRMSNorm):
            nn.init.ones_(module.weight)


class DFMModel(DFMPreTrainedModel):
    """The DFM backbone: token embeddings -> transformer layers -> final norm; returns the hidden states."""

    def __init__(self, config: DFMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.body == "dit":  # BD3-LM / MDLM's DiT (models/dit.py)
            self.time_embedding, self.layers, self.norm, self.final_modulation = dit_body(config)
        else:
            self.time_embedding = DFMTimestepEmbedder(config) if config.time_conditioning else None
            self.layers = nn.ModuleList([DFMTransformerLayer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = DFMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.final_modulation = (
                DFMZeroLinear(config.hidden_size, 2 * config.hidden_size) if config.time_conditioning else None
            )
        self.rotary_emb = DFMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[Cache, list, tuple]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        block_size: Optional[int] = None,
        **kwargs: Any,
    ) -> Union[DFMModelOutput, tuple]:
        """Hidden states ``(batch, len, hidden)`` of ``x_t`` (``input_ids`` or ``inputs_embeds``) at ``timesteps``.

        See :meth:`DFMForMaskedGeneration.forward` for the arguments (``cache=`` is another name of
        ``past_key_values``). Token ids are not range-checked here (that would synchronise with the device).
        """
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        check_no_kwargs(kwargs, "DFMModel.forward()")
        config = self.config
        batch, seq_len = check_inputs(input_ids, inputs_embeds, config.hidden_size, config.max_position_embeddings)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = bool(output_attentions if output_attentions is not None else config.output_attentions)
        return_dict = return_dict if return_dict is not None else config.return_dict
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        device, dtype = hidden_states.device, hidden_states.dtype

        block_size = prepare_block_size(block_size, config.block_size)
        cache, partial = prepare_cache(past_key_values, block_size)
        appended = 0 if block_size is None else seq_len  # a block model appends to its cache; others write inside it
        key_len = check_cache(cache, config, batch, position_ids, appended) + appended if partial else seq_len
        if position_ids is not None:
            position_ids = prepare_position_ids(position_ids, batch, seq_len, device)
        # the length the positions belong to: the input, the cached sequence, or unknown (explicit positions)
        rope_len = seq_len if position_ids is None else key_len if partial else None
        position_ids, key_positions = pattern_positions(attention_mask, position_ids, key_len, partial, block_size)
        if use_cache and cache is None:
            cache = DynamicCache()
        mask = create_attention_mask(
            attention_mask,
            attn_implementation=attention_implementation(config, output_attentions),
            batch=batch,
            query_length=seq_len,
            key_length=key_len,
            num_heads=config.num_attention_heads,
            dtype=dtype,
            device=device,
            query_positions=position_ids,
            key_positions=key_positions,
            block_size=block_size,
        )
        t = prepare_timesteps(timesteps, batch, device)
        if config.time_conditioning and t is None:
            raise ValueError("`timesteps` are required by a model with `time_conditioning=True` (one per row).")
        if config.body == "dit":
            t = dit_sigma(t, config, batch, device)
        time_condition = None if self.time_embedding is None else F.silu(self.time_embedding(t))
        position_embeddings = self.rotary_emb(position_ids, rope_len, device, dtype)

        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights = layer(
                hidden_states,
                time_condition,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                past_key_values=cache,
                cache_kwargs={"position_ids": position_ids} if partial else None,
                output_attentions=output_attentions,
            )
            if output_attentions:
                all_attn.append(weights)

        hidden_states = self.norm(hidden_states)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(time_condition).chunk(2, dim=-1)
            hidden_states = modulate(hidden_states, shift, scale)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = DFMModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class DFMForMaskedGeneration(DFMGenerationMixin, DFMPreTrainedModel):
    """DFM denoiser: :class:`DFMModel` + an LM head giving the logits of ``p_{1|t}``; ``generate()`` from
    :class:`~dfm_hf.generation.utils.DFMGenerationMixin` (settings: ``generation_config``).

    The head is tied to the input embeddings unless ``config.tie_word_embeddings=False``. With
    ``config.logits_shift`` it reads the hidden state of position ``i - 1`` for token ``i`` (Dream / adapted causal
    LMs). ``forward(input_ids=x_t, timesteps=t, ...)`` returns a :class:`DFMMaskedGenerationOutput`. With ``labels``
    (masked-LM convention: the clean id where scored, -100 elsewhere) it also returns the masked cross-entropy
    (:func:`~.losses.masked_cross_entropy_loss`); other training losses are computed from the logits by the caller.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DFMConfig) -> None:
        super().__init__(config)
        self.model = DFMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.body == "dit")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @staticmethod
    def _select(x: torch.Tensor, keep: Optional[Union[torch.Tensor, slice]]) -> torch.Tensor:
        if keep is None:
            return x
        if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
            return x[keep]
        return x[:, keep]

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Union[Cache, list, tuple]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        timesteps: Optional[Union[float, torch.Tensor]] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Optional[Union[int, torch.Tensor]] = 0,
        block_size: Optional[int] = None,
        **kwargs: Any,
    ) -> Union[DFMMaskedGenerationOutput, tuple]:
        """Logits of ``p_{1|t}(. | x_t)`` for ``x_t = input_ids`` at times ``timesteps``.

        Args:
            input_ids: ``(batch, len)`` token ids ``x_t``, in ``[0, vocab_size)`` (NOT range-checked here: that would
                synchronise with the device on every call; the pipeline checks them once per call).
            attention_mask: ``(batch, key_len)``, 1 = real token, 0 = padding (padded keys are masked out); or a
                4-D additive float mask ``(batch, 1, len, key_len)`` (0 = attend, ``torch.finfo(dtype).min`` =
                blocked), e.g. a causal or a DiffuLLaMA-style annealed mask; or a 4-D bool mask, True = attend.
                ``key_len = len`` without a cache.
            position_ids: ``(batch, len)`` absolute positions (default ``0..len-1``; for a block model the row's
                positions ``cumsum(attention_mask) - 1``, so padding does not count), in
                ``[0, max_position_embeddings)`` (not checked). Required with a cache that holds entries.
            past_key_values: a ``Cache`` (or a sequence of ``(keys, values)`` pairs). Empty, a full forward fills it.
                Holding the ``L`` positions of the rows (a cache from ``use_cache=True``, or a filled
                :class:`~.cache.DFMBlockCache`), ``input_ids`` is a slice ``(batch, n)`` of the rows at
                ``position_ids``: the ``n`` queries compute fresh keys and values, written at their positions (in
                place in a ``DFMBlockCache``; in a copy for any other cache, which stays unmodified), and attend over
                all ``L`` entries. Repeated positions are harmless when they carry the same token. Exact when the
                cache was computed from the current rows; an approximation (Fast-dLLM's prefix / dual cache) when the
                other positions changed since. ``cache=`` is another name of this argument. A block model
                (``config.block_size``) takes a ``DynamicCache`` (never a ``DFMBlockCache``) and APPENDS the
                queries' keys and values to it (transformers' semantics; drop entries with
                :func:`~.cache.crop_cache`): ``attention_mask`` then covers the cache and the queries, and each query
                attends to the keys of its own and earlier blocks (key positions ``cumsum(attention_mask) - 1``).
            inputs_embeds: ``(batch, len, hidden_size)`` input embeddings instead of ``input_ids`` (soft prompts,
                PEFT prompt tuning); exactly one of the two.
            timesteps: ``t`` per row, shape ``(batch,)``, or a scalar; required with ``time_conditioning=True``,
                ignored otherwise.
            labels: ``(batch, len)``: the target id where scored, -100 elsewhere; gives ``loss``, the masked
                cross-entropy over the kept positions. ``num_items_in_batch=`` (Trainer) divides the sum instead.
            use_cache: return a new ``DynamicCache`` with every layer's keys and values (after rotary) when no cache
                is passed; the output's ``past_key_values`` is the cache the forward used.
            output_attentions, output_hidden_states: return the attention probabilities (the eager function runs)
                / the hidden states of every layer.
            return_dict: a :class:`DFMMaskedGenerationOutput` or a tuple; None follows ``config.return_dict``.
            logits_to_keep: which positions get logits: ``None`` or ``0`` (all); an int ``N`` (the last ``N``); a
                bool ``(batch, len)`` mask (logits ``(K, vocab)`` packed in row-major order); a 1-D long tensor of
                positions (logits ``(batch, len(idx), vocab)``; not range-checked). The LM head runs only there.
                With ``config.logits_shift`` the kept positions are those whose TOKEN is predicted; the hidden
                state read is the one at ``max(p - 1, 0)``, which a cached partial forward must include in
                ``position_ids`` (a block model: among those the query attends to), else a kept position raises.
            block_size: a block model's block length for this call, a multiple of ``config.block_size`` (default):
                a model may decode with larger blocks than it was trained with (SDAR does).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        check_no_kwargs(kwargs, "DFMForMaskedGeneration.forward()")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        block_size = prepare_block_size(block_size, self.config.block_size)
        cache, partial = prepare_cache(past_key_values, block_size)
        if self.config.logits_shift:  # the entry each query reads, checked against logits_to_keep before the layers
            pos = position_ids if partial or block_size is not None else None
            src = shift_sources(input_ids, inputs_embeds, pos, attention_mask, block_size, logits_to_keep, self.config)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            timesteps=timesteps,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            block_size=block_size,
        )
        hidden_states = outputs.last_hidden_state
        batch, seq_len = hidden_states.shape[:2]
        if self.config.logits_shift:
            hidden_states = shift_hidden_states(hidden_states, src)
        keep = prepare_logits_to_keep(logits_to_keep, batch, seq_len, hidden_states.device)
        logits = self.lm_head(self._select(hidden_states, keep))
        if self.config.subs_parameterization:
            ids = None if input_ids is None else self._select(input_ids, keep)
            logits = subs_logits(logits, ids, self.config.mask_token_id)

        loss = None
        if labels is not None:
            check_labels(labels, batch, seq_len)
            labels = self._select(labels.to(logits.device), keep)
            loss = masked_cross_entropy_loss(logits, labels, num_items_in_batch=num_items_in_batch)
        output = DFMMaskedGenerationOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    # --------------------------------------------------------------------------------------------------------------
    # Loading: our checkpoints strictly, released LLaDA / Dream ones converted (region owned by the conversion work)
    # --------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint (a folder or a Hub repo id), strictly.

        Our own checkpoints (``model_type: "dfm"``) load through ``PreTrainedModel.from_pretrained``; a missing,
        unexpected or mismatched (shape in config.json != in the weights) weight raises ``ValueError`` naming it and
        the files (``output_loading_info=True`` returns the report instead), a broken weights file ``OSError`` naming
        it. Released LLaDA (``model_type: "llada"``) and Dream / DiffuCoder (``"Dream"``) checkpoints are converted on
        load by ``dfm_hf.conversion.load_released_model`` (``dtype=``, ``device_map=``, ``revision=``... work; no
        remote code runs); ``save_pretrained`` then writes our format. ``quantization_config=`` (a ``TorchAoConfig`` or
        ``BitsAndBytesConfig``: ``dfm_hf.models.loading.check_quantization_config``) quantizes either while loading.
        """
        name = pretrained_model_name_or_path
        kwargs["quantization_config"] = check_quantization_config(kwargs.get("quantization_config"))
        model_type = checkpoint_model_type(name, kwargs)
        if model_type is not None and model_type != cls.config_class.model_type:
            # imported by name: transformers' remote-code import check must not require dfm_hf for our own files
            try:
                conversion = importlib.import_module("dfm_hf.conversion")
            except ImportError as err:
                raise ImportError(
                    f"{str(name)!r} is a {model_type!r} checkpoint: converting it needs the `dfm_hf` package."
                ) from err
            if model_args:
                raise TypeError("from_pretrained() takes no positional model arguments for a released checkpoint.")
            return conversion.load_released_model(cls, name, **kwargs)

        report = bool(kwargs.pop("output_loading_info", False))
        lenient = report or bool(kwargs.get("ignore_mismatched_sizes"))
        kwargs["ignore_mismatched_sizes"] = True  # mismatched shapes come back in the report: refused below by name
        try:
            model, info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
        except Exception as err:
            broken = broken_weights_error(name, kwargs)
            if broken is not None:
                raise broken from err
            raise
        record_quantized_mismatches(model, info)
        if report:
            return model, info
        if not lenient:
            check_loading_info(name, info, kwargs)
        return model

    @classmethod
    def from_causal_lm(
        cls,
        pretrained_model_name_or_path_or_model: Any,
        mask_token: str = "<|mask|>",
        mask_token_id: Optional[int] = None,
        block_size: Optional[int] = None,
        **load_kwargs: Any,
    ) -> Any:
        """A DFM model from a Llama / Mistral / Qwen2 causal LM (SmolLM2, TinyLlama, Qwen2.5, Qwen2.5-Coder...).

        ``pretrained_model_name_or_path_or_model``: a path or Hub repo id (loaded with
        ``AutoModelForCausalLM.from_pretrained(..., **load_kwargs)``: ``gguf_file=``, ``revision=``, ``dtype=`` reach
        transformers; a GGUF is dequantized) or a loaded causal LM. The result has ``logits_shift=True``, bidirectional
        attention (``block_size=K``: block diffusion, see :class:`DFMConfig`), the causal LM's vocabulary and special
        ids, and a mask token: ``mask_token_id`` reuses that existing id; otherwise a new id ``len(tokenizer)`` (the
        tokenizer stored with the model; the number of embedding rows for a model instance) whose embedding row (and
        head row, when untied) is the mean of the real tokens' rows; ``quantization_config=`` (``TorchAoConfig``,
        ``BitsAndBytesConfig``) quantizes the converted model. Add ``mask_token`` to the tokenizer
        (``tokenizer.add_special_tokens({"mask_token": mask_token})``) and it gets that id;
        ``DFMPipeline.from_causal_lm`` does it for you. Tied embeddings stay tied. Other architectures raise
        ``ValueError``. A loaded model's weights are shared with the result, not copied (except a grown embedding /
        head): convert a ``copy.deepcopy`` of it if the source must stay unchanged while the result trains. See
        ``dfm_hf.conversion.causal_lm_to_dfm``.
        """
        conversion = importlib.import_module("dfm_hf.conversion")  # by name: see from_pretrained
        source = pretrained_model_name_or_path_or_model
        load_kwargs["quantization_config"] = check_quantization_config(load_kwargs.get("quantization_config"), True)
        return conversion.causal_lm_to_dfm(
            cls, source, mask_token=mask_token, mask_token_id=mask_token_id, block_size=block_size, **load_kwargs
        )


def register_auto_classes() -> None:
    """Register ``model_type="dfm"`` with the transformers Auto classes (idempotent; run when this module is imported).

    After this, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` resolve DFM checkpoints in-process, and
    ``save_pretrained`` writes ``auto_map`` and copies this file, the configuration file and the sibling modules this
    file imports next to the weights, so the checkpoint loads with ``trust_remote_code=True`` where ``dfm_hf`` is not
    installed. (A remote-code copy of this file registers its own classes, as transformers does for the model classes
    it loads.)
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register(DFMConfig.model_type, DFMConfig, exist_ok=True)
    AutoModel.register(DFMConfig, DFMModel, exist_ok=True)
    AutoModelForMaskedLM.register(DFMConfig, DFMForMaskedGeneration, exist_ok=True)
    DFMConfig.register_for_auto_class("AutoConfig")
    DFMModel.register_for_auto_class("AutoModel")
    DFMForMaskedGeneration.register_for_auto_class("AutoModelForMaskedLM")


if __package__ == "dfm_hf.models":  # the library, not a remote-code copy (which must not replace our registration)
    register_auto_classes()

__all__ = [
    "DFMMaskedGenerationOutput",
    "DFMModel",
    "DFMModelOutput",
    "DFMForMaskedGeneration",
    "DFMPreTrainedModel",
    "register_auto_classes",
]
