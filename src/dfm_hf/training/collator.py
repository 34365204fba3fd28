"""`DFMDataCollator`: turns clean token sequences ``x1`` into DFM training batches ``(x_t, t, labels)``.

Per row it draws a time ``t`` in ``[0, t_max]``, a conditioning mask (C-coupling: a clean prompt prefix, or clean
context around 1-3 infilling spans, or nothing), a source sample ``x0`` and ``x_t ~ p_t(. | x0, x1)`` of the mixture
path (all through :mod:`dfm_hf.paths`, the one place the kappa formulas live). Padding is never corrupted nor scored.
With ``fim_rate`` a share of the rows is first rewritten as fill-in-the-middle (:mod:`dfm_hf.data.fim`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .. import paths
from ..data.fim import FIM_TOKENS, NUM_FIM_TOKENS, fim_rewrite
from ..models.losses import IGNORE_INDEX
from ..paths import COUPLINGS, PREDICTION_TYPES

TIME_SAMPLINGS = ("uniform", "stratified")
MAX_INFILL_SPANS = 3

CouplingLike = Union[str, Mapping[str, float]]

_SCHEDULER_KEYS = ("source_distribution", "mask_token_id", "vocab_size", "kappa_schedule", "kappa_exponent")
_DEFAULTS: dict[str, Any] = {
    "source_distribution": "mask",
    "kappa_schedule": "polynomial",
    "kappa_exponent": 1.0,
    "prediction_type": "sample",
}


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DFMDataCollator:
    """Collate clean sequences into a DFM training batch.

    The path settings (``source_distribution``, ``mask_token_id``, ``vocab_size``, ``kappa_schedule``,
    ``kappa_exponent``, and ``prediction_type``) are given directly or read from ``scheduler.config`` (e.g. a
    ``DiscreteFlowScheduler``); a value given both ways must agree. ``kappa_schedule`` may also be a
    :class:`dfm_hf.paths.KappaSchedule` instance.

    Args:
        coupling: ``"unconditional"``, ``"prefix"`` (a clean prompt of 0..L-1 tokens), ``"infill"`` (1-3 spans to
            generate inside clean context) or a mix such as ``{"unconditional": 0.2, "prefix": 0.4, "infill": 0.4}``
            (drawn per row). An example that carries its own ``condition_mask`` keeps it.
        time_sampling: ``"uniform"`` (i.i.d. ``t ~ U[0, t_max)``) or ``"stratified"`` (one ``t`` in each of ``batch``
            equal strata of ``[0, t_max)``, rows in random order: lower-variance loss estimates).
        t_max: largest time (the generalized KL rate is infinite at ``t = 1``).
        prediction_type: ``"sample"`` (labels are ``x1``) or ``"epsilon"`` (labels are ``x0``).
        pad_token_id: id used to pad rows of different lengths (required then).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        generator: a ``torch.Generator`` for reproducible batches.
        complementary_masks: Fast-dLLM v2's complementary masking (mask source only): each drawn row is followed by
            its complement, the same clean row and conditioning with exactly the other corruptible positions masked,
            at the time ``t'`` with ``1 - kappa_{t'} = kappa_t`` (clipped to ``t_max``). Every corruptible position
            is scored in exactly one row of each pair, and the batch holds twice the rows given.
        return_clean_ids: also return ``clean_ids`` (``x1``, the clean rows, padded), which the block-diffusion
            objective feeds as the clean half of its input.
        fim_rate: the probability that a row (one without its own ``condition_mask``, of at least 4 real tokens) is
            rewritten as fill-in-the-middle before the corruption: a middle ``[a, b)`` drawn uniformly (two distinct
            cut points of its first ``n - 3`` real tokens) and the row laid out as ``<fim_prefix> <fim_suffix> suffix
            <fim_middle> prefix middle`` with its length kept (:func:`dfm_hf.data.fim.fim_rewrite`). The three
            control tokens are conditioning (never corrupted nor scored); the rest follows ``coupling``. 0 (default)
            draws nothing.
        fim_token_ids: ``{"prefix": id, "suffix": id, "middle": id}`` (e.g. ``config.fim_token_ids``); needed when
            ``fim_rate > 0``.

    Call it on a list of examples (mappings with ``input_ids`` and optional ``attention_mask`` / ``condition_mask``,
    or plain id sequences), on a batch mapping of such lists / tensors, or on a ``(batch, len)`` LongTensor (no
    padding). It returns ``input_ids`` (``x_t``), ``timesteps`` (float32 ``(batch,)``), ``labels`` (target at scored
    positions, -100 elsewhere: for the mask source the positions holding the mask token, for the uniform source all
    non-conditioning real positions), ``condition_mask`` (bool), ``attention_mask`` (0 at padding) and ``kappa_rate``
    (``kappa'_t / (1 - kappa_t)``, float32 ``(batch,)``, for the generalized KL loss).
    """

    scheduler: Any = None
    source_distribution: Optional[str] = None
    mask_token_id: Optional[int] = None
    vocab_size: Optional[int] = None
    kappa_schedule: Optional[Union[str, paths.KappaSchedule]] = None
    kappa_exponent: Optional[float] = None
    coupling: CouplingLike = "unconditional"
    time_sampling: str = "uniform"
    t_max: float = 1.0 - 1e-3
    prediction_type: Optional[str] = None
    pad_token_id: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None
    generator: Optional[torch.Generator] = None
    complementary_masks: bool = False
    return_clean_ids: bool = False
    fim_rate: float = 0.0
    fim_token_ids: Optional[Mapping[str, int]] = None
    _schedule: paths.KappaSchedule = field(init=False, repr=False)
    _coupling_names: tuple[str, ...] = field(init=False, repr=False)
    _coupling_probs: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        config = None
        if self.scheduler is not None:
            config = getattr(self.scheduler, "config", None)
            if config is None:
                raise ValueError("`scheduler` must have a `.config` mapping (e.g. a DiscreteFlowScheduler).")
        for key in (*_SCHEDULER_KEYS, "prediction_type"):
            value = getattr(self, key)
            from_config = _config_value(config, key) if config is not None else None
            if value is not None and from_config is not None and value != from_config:
                raise ValueError(
                    f"`{key}`={value!r} disagrees with `scheduler.config['{key}']`={from_config!r}; pass one of them."
                )
            if value is None:
                value = from_config if from_config is not None else _DEFAULTS.get(key)
            setattr(self, key, value)

        paths.validate_source(self.source_distribution, self.mask_token_id, self.vocab_size)
        if isinstance(self.kappa_schedule, paths.KappaSchedule):
            self._schedule = self.kappa_schedule
        else:
            self._schedule = paths.get_kappa_schedule(self.kappa_schedule, self.kappa_exponent)

        if isinstance(self.coupling, str):
            if self.coupling not in COUPLINGS:
                raise ValueError(
                    f"`coupling` must be one of {list(COUPLINGS)} or a dict of weights, got {self.coupling!r}."
                )
            weights = {self.coupling: 1.0}
        elif isinstance(self.coupling, Mapping):
            weights = dict(self.coupling)
            unknown = [k for k in weights if k not in COUPLINGS]
            bad = [v for v in weights.values() if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
            if unknown or bad or not weights or sum(weights.values()) <= 0:
                raise ValueError(
                    f"`coupling` as a dict must map names in {list(COUPLINGS)} to weights >= 0 with a positive sum, "
                    f"got {self.coupling!r}."
                )
        else:
            raise ValueError(
                f"`coupling` must be one of {list(COUPLINGS)} or a dict of weights, got {self.coupling!r}."
            )
        self._coupling_names = tuple(weights)
        self._coupling_probs = torch.tensor([float(w) for w in weights.values()], dtype=torch.float64)
        self._coupling_probs = self._coupling_probs / self._coupling_probs.sum()

        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"`time_sampling` must be one of {list(TIME_SAMPLINGS)}, got {self.time_sampling!r}.")
        if isinstance(self.t_max, bool) or not isinstance(self.t_max, (int, float)) or not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"`t_max` must be a number in (0, 1], got {self.t_max!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}."
            )
        if self.pad_token_id is not None and (
            not _is_int(self.pad_token_id)
            or self.pad_token_id < 0
            or (self.vocab_size is not None and self.pad_token_id >= self.vocab_size)
        ):
            raise ValueError(
                f"`pad_token_id` must be None or a token id in [0, vocab_size), got {self.pad_token_id!r}."
            )
        if self.pad_to_multiple_of is not None and (
            not _is_int(self.pad_to_multiple_of) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"`pad_to_multiple_of` must be None or a positive integer, got {self.pad_to_multiple_of!r}."
            )
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator or None, got {type(self.generator).__name__}.")
        for name in ("complementary_masks", "return_clean_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        self._check_fim()
        if self.complementary_masks and self.source_distribution != "mask":
            raise ValueError(
                "`complementary_masks` pairs each row with the complement of its masked positions: it needs the mask "
                f"source, got `source_distribution`={self.source_distribution!r}."
            )

    def _check_fim(self) -> None:
        rate = self.fim_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"`fim_rate` must be a number in [0, 1], got {rate!r}.")
        ids = self.fim_token_ids
        if ids is None:
            if rate > 0:
                raise ValueError("`fim_rate` > 0 needs `fim_token_ids` ({'prefix': id, 'suffix': id, 'middle': id}).")
            return
        if (
            not isinstance(ids, Mapping)
            or set(ids) != set(FIM_TOKENS)
            or not all(_is_int(v) and v >= 0 and (self.vocab_size is None or v < self.vocab_size) for v in ids.values())
        ):
            raise ValueError(
                f"`fim_token_ids` must map {sorted(FIM_TOKENS)} to token ids in [0, vocab_size), got {ids!r}."
            )

    @property
    def schedule(self) -> paths.KappaSchedule:
        """The kappa schedule used to draw ``x_t``."""
        return self._schedule

    # ------------------------------------------------------------------------------------------------------------
    # Collation
    # ------------------------------------------------------------------------------------------------------------

    def _pad(self, rows: list[torch.Tensor], fill: Union[int, bool], dtype: torch.dtype, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : row.numel()] = row
        return out

    def _collate(self, features: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> ``x1`` (long), ``real`` (bool), given condition mask (bool), rows that gave one (bool ``(batch,)``)."""
        if isinstance(features, torch.Tensor):
            if features.dim() != 2 or features.dtype.is_floating_point or features.dtype == torch.bool:
                raise ValueError(
                    f"`features` as a tensor must be an integer (batch, len) tensor, got {features.shape}."
                )
            x1 = features.long()
            real = torch.ones_like(x1, dtype=torch.bool)
            given = torch.zeros_like(real)
            return x1, real, given, torch.zeros(x1.shape[0], dtype=torch.bool)
        if isinstance(features, Mapping):
            if "input_ids" not in features:
                raise ValueError("`features` as a mapping must have an `input_ids` entry.")
            keys = [k for k in ("input_ids", "attention_mask", "condition_mask") if features.get(k) is not None]
            rows = len(features["input_ids"])
            features = [{k: features[k][i] for k in keys} for i in range(rows)]
        if not isinstance(features, Sequence) or len(features) == 0:
            raise ValueError(
                "`features` must be a non-empty list of examples, a batch mapping or a (batch, len) tensor."
            )

        ids, masks, conds = [], [], []
        for example in features:
            if isinstance(example, Mapping):
                if "input_ids" not in example:
                    raise ValueError("every example in `features` must have an `input_ids` entry.")
                row = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
                mask = example.get("attention_mask")
                cond = example.get("condition_mask")
            else:
                row, mask, cond = torch.as_tensor(example, dtype=torch.long).reshape(-1), None, None
            mask = torch.ones_like(row, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(-1) != 0
            for name, value in (("attention_mask", mask), ("condition_mask", cond)):
                if value is not None and torch.as_tensor(value).numel() != row.numel():
                    raise ValueError(f"an example's `{name}` must have the length of its `input_ids` ({row.numel()}).")
            ids.append(row)
            masks.append(mask)
            conds.append(None if cond is None else torch.as_tensor(cond).reshape(-1).to(torch.bool))

        lengths = [row.numel() for row in ids]
        length = max(lengths)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if length == 0:
            raise ValueError("`features` holds only empty sequences.")
        if any(n != length for n in lengths) and self.pad_token_id is None:
            raise ValueError("`pad_token_id` is required to pad examples of different lengths.")
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        x1 = self._pad(ids, pad, torch.long, length)
        real = self._pad(masks, False, torch.bool, length)
        given = self._pad(
            [c if c is not None else torch.zeros(0, dtype=torch.bool) for c in conds], False, torch.bool, length
        )
        has_given = torch.tensor([c is not None for c in conds], dtype=torch.bool)
        return x1, real, given & real, has_given

    def _rewrite_fim(
        self, x1: torch.Tensor, real: torch.Tensor, has_given: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x1`` with a ``fim_rate`` share of its rows rewritten as FIM (see ``fim_rate``; a copy) and the bool
        ``(batch, len)`` mask of their control tokens."""
        x1, controls = x1.clone(), torch.zeros_like(real)
        chosen = torch.rand(x1.shape[0], generator=self.generator, dtype=torch.float64) < self.fim_rate
        for i in chosen.nonzero().flatten().tolist():
            where = real[i].nonzero().flatten()
            n = where.numel() - NUM_FIM_TOKENS
            if bool(has_given[i]) or n < 1:
                continue
            start, end = sorted((torch.randperm(n + 1, generator=self.generator)[:2]).tolist())
            x1[i, where], at = fim_rewrite(x1[i, where], start, end, self.fim_token_ids)
            controls[i, where[at]] = True
        return x1, controls

    def _sample_times(self, batch: int) -> torch.Tensor:
        u = torch.rand(batch, generator=self.generator, dtype=torch.float32)
        if self.time_sampling == "stratified":
            strata = torch.randperm(batch, generator=self.generator).to(torch.float32)
            u = (strata + u) / batch
        return (u * self.t_max).clamp(0.0, self.t_max)

    def _infill_mask(self, n: int) -> torch.Tensor:
        """Conditioning mask over ``n`` real positions: clean context around 1-3 spans to generate."""
        cond = torch.ones(n, dtype=torch.bool)
        max_spans = min(MAX_INFILL_SPANS, (n - 1) // 2)
        if max_spans < 1:  # too short for context on both sides: generate everything
            return torch.zeros(n, dtype=torch.bool)
        spans = int(torch.randint(1, max_spans + 1, (1,), generator=self.generator))
        # 2 * spans distinct cut points in 1..n-1: spans are non-empty, disjoint, separated, with context at both ends
        cuts = (torch.randperm(n - 1, generator=self.generator)[: 2 * spans] + 1).sort().values.tolist()
        for start, end in zip(cuts[0::2], cuts[1::2]):
            cond[start:end] = False
        return cond

    def _condition_masks(self, real: torch.Tensor) -> torch.Tensor:
        batch, length = real.shape
        choice = torch.multinomial(self._coupling_probs, batch, replacement=True, generator=self.generator)
        n_real = real.sum(dim=1)
        rank = real.long().cumsum(dim=1) - 1  # index of each real position among the real positions of its row
        names = [self._coupling_names[int(c)] for c in choice]
        # prefix: a clean prompt of k ~ U{0, ..., n-1} tokens
        k = (torch.rand(batch, generator=self.generator, dtype=torch.float64) * n_real).floor().long()
        is_prefix = torch.tensor([name == "prefix" for name in names], dtype=torch.bool)
        cond = real & (rank < k[:, None]) & is_prefix[:, None]
        for i, name in enumerate(names):
            if name == "infill":
                cond[i, real[i]] = self._infill_mask(int(n_real[i]))
        return cond

    def __call__(self, features: Any) -> dict[str, torch.Tensor]:
        """Build ``{input_ids, timesteps, labels, condition_mask, attention_mask, kappa_rate}`` (and ``clean_ids``)
        from clean data."""
        x1, real, given, has_given = self._collate(features)
        if self.vocab_size is not None:
            low, high = int(x1[real].min()) if real.any() else 0, int(x1[real].max()) if real.any() else 0
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"`input_ids` must lie in [0, vocab_size={self.vocab_size}), got [{low}, {high}].")
        batch = x1.shape[0]
        fim_controls = None
        if self.fim_rate > 0:
            x1, fim_controls = self._rewrite_fim(x1, real, has_given)
        t = self._sample_times(batch)
        cond = self._condition_masks(real)
        cond = torch.where(has_given[:, None], given, cond)
        if fim_controls is not None:
            cond |= fim_controls

        x0 = paths.sample_source(x1, self.source_distribution, self.mask_token_id, self.vocab_size, self.generator)
        x0 = torch.where(real, x0, x1)  # padding is never corrupted
        x_t = paths.sample_path(x1, x0, t.double(), self._schedule, self.generator, condition_mask=cond | ~real)

        if self.complementary_masks:
            x1, x0, x_t, t, real, cond = self._with_complements(x1, x0, x_t, t, real, cond)
        scored = real & ~cond
        if self.source_distribution == "mask":
            scored &= x_t == self.mask_token_id
        target = x1 if self.prediction_type == "sample" else x0
        labels = torch.where(scored, target, torch.full_like(target, IGNORE_INDEX))
        out = {
            "input_ids": x_t,
            "timesteps": t,
            "labels": labels,
            "condition_mask": cond,
            "attention_mask": real.long(),
            "kappa_rate": self._schedule.rate(t.double()).to(torch.float32),
        }
        if self.return_clean_ids:
            out["clean_ids"] = x1
        return out

    def _with_complements(
        self,
        x1: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        real: torch.Tensor,
        cond: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Each row followed by its complement (see ``complementary_masks``): rows ``2i`` and ``2i + 1``."""
        corruptible = real & ~cond
        masked = corruptible & (x_t == self.mask_token_id)
        x_c = torch.where(corruptible & ~masked, torch.full_like(x1, self.mask_token_id), x1)
        t_c = inverse_kappa(self._schedule, 1.0 - self._schedule.kappa(t.double())).clamp(0.0, self.t_max)

        def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.stack([a, b], dim=1).flatten(0, 1)

        t_c = t_c.to(t.dtype)
        return pairs(x1, x1), pairs(x0, x0), pairs(x_t, x_c), pairs(t, t_c), pairs(real, real), pairs(cond, cond)


def inverse_kappa(schedule: paths.KappaSchedule, kappa: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The time ``t`` in ``[0, 1]`` with ``kappa_t = kappa``, for any increasing schedule: bisection in float64
    (``iterations`` halvings of ``[0, 1]``; 60 reach float64 resolution)."""
    target = torch.as_tensor(kappa, dtype=torch.float64)
    low, high = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        below = schedule.kappa(mid).to(torch.float64) < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return 0.5 * (low + high)


def annealing_visible_fraction(step: int, annealing_steps: int) -> float:
    """DiffuLLaMA's attention annealing: the probability ``min(1, step / annealing_steps)`` that a query sees a given
    future key at optimizer step ``step`` (0-based): 0 (causal) at step 0, 1 (bidirectional) from
    ``annealing_steps`` on; ``annealing_steps = 0`` is bidirectional at once."""
    if annealing_steps <= 0:
        return 1.0
    return min(1.0, max(step, 0) / annealing_steps)


def annealed_attention_mask(
    attention_mask: torch.Tensor, visible_fraction: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The 4-D additive float mask ``(batch, 1, len, len)`` of an annealing step, combined with padding.

    Query ``i`` always sees keys ``j <= i`` (the causal part) and sees each future key ``j > i`` independently with
    probability ``visible_fraction`` (drawn from ``generator``); padded keys (``attention_mask == 0``) are never seen.
    Entries are 0 (attend) or ``torch.finfo(torch.float32).min`` (blocked): the format ``DFMForMaskedGeneration``
    reads. ``visible_fraction`` 0 gives the causal mask, 1 the bidirectional one.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"`attention_mask` must be a (batch, len) padding mask, got {tuple(attention_mask.shape)}.")
    if not 0.0 <= visible_fraction <= 1.0:
        raise ValueError(f"`visible_fraction` must lie in [0, 1], got {visible_fraction!r}.")
    batch, length = attention_mask.shape
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    drawn = torch.rand(batch, 1, length, length, generator=generator) < visible_fraction
    allowed = (~future | drawn) & (attention_mask.to("cpu") != 0)[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)


__all__ = [
    "COUPLINGS",
    "TIME_SAMPLINGS",
    "DFMDataCollator",
    "annealed_attention_mask",
    "annealing_visible_fraction",
    "inverse_kappa",
]
