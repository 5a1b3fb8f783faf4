"""The accelc spec format, version 1: a typed, versioned YAML description of what to accelerate.

A spec names *what* to do, never *how*; each section is served by one pass or runtime part::

    accelc: 1                                   # format version, required
    prefill:   {token_selection: {...}}         # FastKV token-selective propagation (passes/tsp.py)
    kv_cache:  {compression: {...}}             # SnapKV / PyramidKV (passes/kv_compress.py)
    attention: {sparse: [{method: ...}, ...]}   # streaming / block_sparse / quest (passes/sparse_attention.py)
    decode:    {temperature: ..., speculative: {draft: ...}}   # runtime/ and passes/early_exit.py
    checks:    [{metric: ..., min: ...}]        # read by `accelc check`

``accelc: 1`` alone is the identity spec.  Every section is validated here (pydantic v2, unknown keys
forbidden, no silent str->int coercion, bool is not an int) whether or not its pass exists yet.
Model-dependent limits (layer and head indices) are checked by :meth:`Spec.check_model` against a
transformers config, so ``accelc validate`` never needs weights (and this module never imports torch).

Every problem becomes an :class:`~accelc.errors.AccelcError` whose *where* is
``<file>:<line>: <key.path>`` (line found from the YAML node marks), whose *what* includes the bad
value and whose *hint* gives the allowed values or a did-you-mean.  When a spec has several problems
the first in document order is raised and the hint says how many more there are (all of them are
kept in :attr:`SpecError.more`).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from accelc.errors import AccelcError

__all__ = [
    "SUPPORTED_VERSIONS", "FEATURES", "LayerSet", "TokenSelection", "Prefill", "KVCompression", "KVCache",
    "Streaming", "BlockSparse", "Quest", "Attention", "EarlyExit", "PromptLookup", "TokenRecycling", "Decode",
    "Check", "Spec", "SpecError", "load_spec", "load_spec_text", "json_schema",
]

SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
FEATURES: tuple[str, ...] = ("token_selection", "kv_compression", "sparse_attention", "speculative")
SCHEMA_ID = "urn:accelc:spec:v1"

Path_ = tuple[Union[str, int], ...]  # a key path: mapping keys (str) and list indices (int)


class SpecError(AccelcError):
    """An invalid spec: the first problem in document order, with the others in :attr:`more`."""

    def __init__(self, where: str, what: str, hint: str | None = None, more: list[AccelcError] | None = None):
        self.more: list[AccelcError] = list(more or [])
        if self.more:
            n = len(self.more)
            extra = f"{n} more error{'s' if n > 1 else ''} in this spec after this one"
            hint = f"{hint}; {extra}" if hint else extra
        super().__init__(where, what, hint)


# --------------------------------------------------------------------------- value helpers


def _show(v: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML terms (``'max'``, ``true``, ``null``, ``[1, 2]``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        s = repr(v)
    elif isinstance(v, (list, dict)):
        s = json.dumps(v, default=str)
    else:
        s = str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _kind(v: Any) -> str:
    """The YAML kind of a value with its article: ``a string``, ``an integer``, ``a mapping``."""
    if v is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "a mapping"}
    for t, name in names.items():
        if type(v) is t:
            return name
    return f"a {type(v).__name__}"


def _got(v: Any) -> str:
    """``got an integer 5`` / ``got null``."""
    return f"got {_kind(v)}" if v is None else f"got {_kind(v)} {_show(v)}"


def _did_you_mean(word: Any, choices: list[str]) -> str | None:
    """``did you mean 'x'?`` for a close match among ``choices``, else None."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _fail(what: str, hint: str | None = None, field: str | None = None) -> NoReturn:
    """Raise a pydantic custom error that the translator turns into ``what (hint)`` at ``…[.field]``."""
    ctx: dict[str, Any] = {"what": what, "hint": hint or ""}
    if field is not None:
        ctx["field"] = field
    raise PydanticCustomError("accelc", "{what}", ctx)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- LayerSet

_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")
LAYERS_HINT = "'all', an inclusive range 'a-b', a layer index or a list of layer indices"


class LayerSet:
    """A set of decoder layers: ``"all"``, ``"a-b"`` (inclusive), one index or a list of indices.

    Validated without a model (no negatives, no reversed range, no duplicates); :meth:`resolve`
    turns it into sorted indices for a model with ``n_layers`` layers.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: str | int | list[int] | tuple[int, ...] = "all"):
        self.raw: str | int | tuple[int, ...] = self._parse(raw)

    @staticmethod
    def _parse(raw: Any) -> str | int | tuple[int, ...]:
        """Canonical form: ``"all"``, ``"a-b"``, an int, or a tuple of ints; raises a custom error."""
        if isinstance(raw, LayerSet):
            return raw.raw
        if _is_int(raw):
            if raw < 0:
                _fail(f"negative layer index {raw}", f"layers are counted from 0; use {LAYERS_HINT}")
            return raw
        if isinstance(raw, str):
            return LayerSet._parse_str(raw)
        if isinstance(raw, (list, tuple)):
            return LayerSet._parse_list(raw)
        _fail(f"expected layers, {_got(raw)}", f"use {LAYERS_HINT}")

    @staticmethod
    def _parse_str(raw: str) -> str:
        if raw.strip() == "all":
            return "all"
        m = _RANGE.match(raw)
        if m is None:
            tip = f"write {raw.strip()} without quotes" if raw.strip().isdigit() else f"use {LAYERS_HINT}, e.g. '20-29'"
            _fail(f"invalid layer set {raw!r}", tip)
        a, b = int(m.group(1)), int(m.group(2))
        if a < 0 or b < 0:
            _fail(f"negative layer index in range {raw!r}", "layers are counted from 0")
        if a > b:
            _fail(f"reversed range {raw!r}: {a} > {b}", f"write '{b}-{a}'")
        return f"{a}-{b}"

    @staticmethod
    def _parse_list(raw: list | tuple) -> tuple[int, ...]:
        if not raw:
            _fail("empty layer list", f"use {LAYERS_HINT}")
        bad = [x for x in raw if not _is_int(x)]
        if bad:
            _fail(f"layer list must hold integers, {_got(bad[0])}", f"use {LAYERS_HINT}")
        if any(x < 0 for x in raw):
            _fail(f"negative layer index {min(raw)} in {_show(list(raw))}", "layers are counted from 0")
        dups = sorted({x for x in raw if raw.count(x) > 1})
        if dups:
            _fail(f"duplicate layer{'s' if len(dups) > 1 else ''} {', '.join(map(str, dups))} in {_show(list(raw))}",
                  "list each layer once")
        return tuple(raw)

    def bounds(self) -> tuple[int, int] | None:
        """Smallest and largest index named (None for ``all``)."""
        if self.raw == "all":
            return None
        if isinstance(self.raw, str):
            a, b = map(int, self.raw.split("-"))
            return a, b
        if isinstance(self.raw, int):
            return self.raw, self.raw
        return min(self.raw), max(self.raw)

    def problem(self, n_layers: int) -> str | None:
        """Why this set does not fit a model with ``n_layers`` layers, or None if it fits."""
        bounds = self.bounds()
        if bounds is not None and bounds[1] >= n_layers:
            return f"layer {bounds[1]} is out of range: the model has {n_layers} layers, 0-{n_layers - 1}"
        return None

    def resolve(self, n_layers: int, where: str = "layers") -> list[int]:
        """Sorted layer indices for a model with ``n_layers`` layers; AccelcError if out of range."""
        problem = self.problem(n_layers)
        if problem is not None:
            raise AccelcError(where, problem, f"use indices 0-{n_layers - 1} or 'all'")
        bounds = self.bounds()
        if bounds is None:
            return list(range(n_layers))
        if isinstance(self.raw, tuple):
            return sorted(self.raw)
        return list(range(bounds[0], bounds[1] + 1))

    def to_raw(self) -> str | int | list[int]:
        """The YAML value (``"all"``, ``"a-b"``, int or list)."""
        return list(self.raw) if isinstance(self.raw, tuple) else self.raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSet) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"LayerSet({self.to_raw()!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls, serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.to_raw()))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"anyOf": [{"const": "all"}, {"type": "string", "pattern": r"^\d+-\d+$"},
                          {"type": "integer", "minimum": 0},
                          {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                           "uniqueItems": True}],
                "description": LAYERS_HINT}


# --------------------------------------------------------------------------- value types

KEEP_HINT = "a float in (0, 1] keeps that fraction of the tokens, an int >= 1 keeps that many tokens"


def _keep(v: Any) -> int | float:
    """``keep``: a fraction (float in (0, 1]) or a token budget (int >= 1)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        _fail(f"expected a fraction or a token budget, {_got(v)}", KEEP_HINT)
    if _is_int(v):
        if v < 1:
            _fail(f"{v} is neither a fraction in (0, 1] nor a token budget >= 1", KEEP_HINT)
        return v
    if not math.isfinite(v) or v <= 0:
        _fail(f"{v} is not a fraction in (0, 1]", KEEP_HINT)
    if v > 1:
        budget = (f"write {int(v)}, an int, for a token budget" if v.is_integer()
                  else "an int like 256 is a token budget")
        _fail(f"{v} is a float above 1; a fraction must be in (0, 1]", f"{budget}; {KEEP_HINT}")
    return v


def _odd(v: int) -> int:
    if v % 2 == 0:
        _fail(f"kernel must be odd (a centred pooling window), got {v}", f"use {max(v - 1, 1)} or {v + 1}")
    return v


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        lo = 1 << (v.bit_length() - 1)
        _fail(f"{v} is not a power of two", f"use {lo} or {lo * 2}")
    return v


def _choice_or_int(names: tuple[str, ...], minimum: int, what: str) -> Any:
    """A validator for ``int >= minimum | one of names`` (strict: no bool, no numeric strings)."""
    allowed = f"an int >= {minimum} or " + " or ".join(repr(n) for n in names)

    def check(v: Any) -> int | str:
        if _is_int(v):
            if v < minimum:
                _fail(f"{what} must be >= {minimum}, got {v}", allowed)
            return v
        if isinstance(v, str) and v in names:
            return v
        if isinstance(v, str):
            mean = _did_you_mean(v, list(names))
            _fail(f"unknown {what} {v!r}", f"{mean + ' ' if mean else ''}allowed: {allowed}")
        _fail(f"expected {allowed}, {_got(v)}", f"{what}: {allowed}")

    return check


def _heads(v: Any) -> str | list[int]:
    """Streaming heads: ``all`` | ``auto`` (calibrated) | a list of query-head indices."""
    allowed = "'all', 'auto' or a list of attention-head indices"
    if v in ("all", "auto") and isinstance(v, str):
        return v
    if not isinstance(v, list) or not v or not all(_is_int(x) for x in v):
        mean = _did_you_mean(v, ["all", "auto"])
        _fail(f"invalid heads {_show(v)}", f"{mean + ' ' if mean else ''}use {allowed}")
    if min(v) < 0:
        _fail(f"negative head index {min(v)}", "heads are counted from 0")
    if len(set(v)) != len(v):
        _fail(f"duplicate head indices in {_show(v)}", "list each head once")
    return v


Keep = Annotated[
    Union[int, float], PlainValidator(_keep),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                              {"type": "integer", "minimum": 1}]}),
    Field(description=KEEP_HINT),
]
Kernel = Annotated[int, Field(ge=1, description="pooling kernel size along the sequence: an odd int >= 1"),
                   AfterValidator(_odd)]
Window = Annotated[int, Field(ge=1, description="number of last query tokens that score the others: an int >= 1")]
Pooling = Annotated[Literal["max", "avg"], Field(description="pooling of the scores along the sequence: max or avg")]
Layers = Annotated[LayerSet, Field(description=LAYERS_HINT)]
Heads = Annotated[
    Union[Literal["all", "auto"], list[int]], PlainValidator(_heads),
    WithJsonSchema({"anyOf": [{"enum": ["all", "auto"]},
                              {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}),
    Field(description="'all', 'auto' to calibrate, or a list of attention-head indices"),
]
ExitLayer = Annotated[
    Union[int, Literal["adaptive"]], PlainValidator(_choice_or_int(("adaptive",), 1, "exit_layer")),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "adaptive"}]}),
    Field(description="layer whose output drafts: an int >= 1, or 'adaptive' to choose it online"),
]
Gamma = Annotated[
    Union[int, Literal["heuristic", "adaptive"]],
    PlainValidator(_choice_or_int(("heuristic", "adaptive"), 1, "gamma")),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"enum": ["heuristic", "adaptive"]}]}),
    Field(description="draft length: an int >= 1, 'heuristic' or 'adaptive'"),
]


def _version(v: Any) -> int:
    supported = ", ".join(map(str, SUPPORTED_VERSIONS))
    if not _is_int(v):
        _fail(f"the format version must be an integer, {_got(v)}",
              f"supported versions: {supported}; write `accelc: 1`")
    if v not in SUPPORTED_VERSIONS:
        _fail(f"unsupported spec version {v}", f"supported versions: {supported}")
    return v


Version = Annotated[int, PlainValidator(_version),
                    WithJsonSchema({"enum": list(SUPPORTED_VERSIONS), "description": "spec format version"})]


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    """Base of every spec section: unknown keys are errors, types are strict, values immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class TokenSelection(_Section):
    """FastKV token-selective propagation (Jo et al. 2025, "FastKV"): after ``layer``, keep ``keep`` tokens."""

    layer: int = Field(ge=0, description="decoder layer after which tokens are selected: an int >= 0")
    keep: Keep
    window: Window = 8
    kernel: Kernel = 7
    pooling: Pooling = "max"
    min_keep: int = Field(0, ge=0, description="with a fractional keep: the fewest top tokens that propagate "
                          "(a floor for short prompts; the window comes on top): an int >= 0")

    @model_validator(mode="after")
    def _min_keep_needs_a_fraction(self) -> "TokenSelection":
        if self.min_keep and _is_int(self.keep):
            _fail(f"min_keep {self.min_keep} only applies to a fractional keep, but keep is the budget {self.keep}",
                  "drop min_keep, or give keep as a fraction such as 0.2", field="min_keep")
        return self


class Prefill(_Section):
    """Prefill-time rewrites."""

    token_selection: Optional[TokenSelection] = None


class KVCompression(_Section):
    """Prefill KV-cache compression: SnapKV (Li et al. 2024) or PyramidKV (Cai et al. 2024) budgets."""

    method: Literal["snapkv", "pyramidkv"] = Field(
        description="snapkv: one budget for every layer; pyramidkv: budgets that shrink with depth")
    keep: Keep
    window: Window = 8
    kernel: Kernel = 7
    pooling: Pooling = "max"
    layers: Layers = LayerSet("all")
    min_keep: int = Field(0, ge=0, description="with a fractional keep: the fewest top entries a layer keeps per KV head "
                          "(a floor for short prompts; the window comes on top): an int >= 0")

    @model_validator(mode="after")
    def _min_keep_needs_a_fraction(self) -> "KVCompression":
        if self.min_keep and _is_int(self.keep):
            _fail(f"min_keep {self.min_keep} only applies to a fractional keep, but keep is the budget {self.keep}",
                  "drop min_keep, or give keep as a fraction such as 0.1", field="min_keep")
        return self


class KVCache(_Section):
    """KV-cache rewrites."""

    compression: Optional[KVCompression] = None


class _Tagged(_Section):
    """A member of a union discriminated by the key ``TAG_KEY`` (``method`` or ``draft``)."""

    TAG_KEY: ClassVar[str]

    @classmethod
    def tag(cls) -> str:
        return get_args(cls.model_fields[cls.TAG_KEY].annotation)[0]


class _SparseEntry(_Tagged):
    TAG_KEY: ClassVar[str] = "method"


class Streaming(_SparseEntry):
    """Streaming heads (Xiao et al. 2024 "StreamingLLM"; DuoAttention): attend to ``sink`` + ``local`` tokens."""

    method: Literal["streaming"]
    sink: int = Field(4, ge=0, description="attention-sink tokens kept at the start: an int >= 0")
    local: int = Field(256, ge=1, description="most recent tokens kept: an int >= 1")
    layers: Layers = LayerSet("all")
    heads: Heads = "all"


class BlockSparse(_SparseEntry):
    """Block-sparse prefill (MInference, Jiang et al. 2024; LServe): top key blocks per query block."""

    method: Literal["block_sparse"]
    block: Annotated[int, Field(ge=16, description="block size in tokens: a power of two >= 16"),
                     AfterValidator(_power_of_two)] = 64
    top_blocks: int = Field(ge=1, description="key blocks attended per query block: an int >= 1")
    sink_blocks: int = Field(1, ge=0, description="leading blocks always attended: an int >= 0")
    local_blocks: int = Field(1, ge=1, description="diagonal/recent blocks always attended: an int >= 1")
    layers: Layers = LayerSet("all")


class Quest(_SparseEntry):
    """Quest decode page selection (Tang et al. 2024): attend to the top pages by key min/max bounds."""

    method: Literal["quest"]
    page: Annotated[int, Field(ge=1, description="page size in tokens: a power of two >= 1"),
                    AfterValidator(_power_of_two)] = 16
    top_pages: int = Field(ge=1, description="pages attended per head at each decode step: an int >= 1")
    layers: Layers = LayerSet("all")


SparseEntry = Annotated[Union[Streaming, BlockSparse, Quest], Field(discriminator="method")]


class Attention(_Section):
    """Attention rewrites."""

    sparse: list[SparseEntry] = Field(default_factory=list,
                                      description="a list of sparse-attention entries, each with a method")


class _Draft(_Tagged):
    """Options shared by every speculative-decoding draft (gamma policy, verification)."""

    TAG_KEY: ClassVar[str] = "draft"
    draft: str  # narrowed to a Literal by each draft; declared here so it comes first
    gamma: Gamma = "heuristic"
    gamma_max: int = Field(8, ge=1, description="largest draft length: an int >= 1")
    verify: Literal["token", "block"] = Field(
        "token", description="token: token-wise rejection sampling, Leviathan et al. 2023; block: Sun et al. 2024")

    @model_validator(mode="after")
    def _gamma_le_max(self) -> "_Draft":
        if _is_int(self.gamma) and self.gamma > self.gamma_max:
            _fail(f"gamma {self.gamma} exceeds gamma_max {self.gamma_max}",
                  f"use gamma <= {self.gamma_max} or raise gamma_max", field="gamma")
        return self


class EarlyExit(_Draft):
    """Self-speculative drafts from the first ``exit_layer`` layers (LayerSkip; DEL for ``adaptive``)."""

    draft: Literal["early_exit"]
    exit_layer: ExitLayer
    exit_head: Literal["plain", "calibrated"] = Field(
        "plain", description="plain: final norm + lm_head; calibrated: plus a least-squares adapter")
    draft_vocab: Optional[int] = Field(
        None, ge=1, description="score drafts over the draft_vocab lowest token ids (BPE merge order: the most "
                                "frequent) plus the tokens of the context instead of the whole vocabulary: an int >= 1 or null")


class PromptLookup(_Draft):
    """Prompt-lookup drafts (Saxena 2023): continue the latest matching n-gram of the context."""

    draft: Literal["prompt_lookup"]
    ngram_max: int = Field(3, ge=1, description="longest n-gram matched: an int >= 1")
    ngram_min: int = Field(1, ge=1, description="shortest n-gram matched: an int >= 1 and <= ngram_max")
    tree_nodes: int = Field(
        0, ge=0, description="0: verify one chain (the latest match); N > 0: at T = 0 verify a tree of up to N candidate "
                             "tokens from every earlier match in one forward: an int >= 0")

    @model_validator(mode="after")
    def _min_le_max(self) -> "PromptLookup":
        if self.ngram_min > self.ngram_max:
            _fail(f"ngram_min {self.ngram_min} exceeds ngram_max {self.ngram_max}",
                  "ngram_min must be <= ngram_max", field="ngram_min")
        return self


class TokenRecycling(_Draft):
    """Token Recycling (Luo et al. 2024): adjacency matrix of top successors, tree of candidates."""

    draft: Literal["token_recycling"]
    successors: int = Field(8, ge=1, description="successors stored per token: an int >= 1")
    tree_width: int = Field(8, ge=1, description="number of tree branches: an int >= 1")


Speculative = Annotated[Union[EarlyExit, PromptLookup, TokenRecycling], Field(discriminator="draft")]


class Decode(_Section):
    """Decoding: sampling parameters and optional speculative decoding."""

    temperature: float = Field(0.0, ge=0, description="sampling temperature: a number >= 0, 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus probability in (0, 1]")
    top_k: int = Field(0, ge=0, description="top-k sampling: an int >= 0, 0 is off")
    seed: Optional[int] = Field(None, ge=0, description="random seed: an int >= 0 or null")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated at most: an int >= 1")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="stop strings: a list of non-empty strings")
    speculative: Optional[Speculative] = None


METRICS = ("prefill_speedup", "decode_speedup", "spec_speedup", "accepted_length", "passkey_accuracy",
           "ppl_increase", "kv_memory_ratio", "identical_tokens")
_BOUNDS = ("min", "max", "min_vs_baseline")


class Check(_Section):
    """One CI gate read by ``accelc check``: ``metric`` within the given bounds."""

    metric: Literal[METRICS] = Field(description="the measured quantity")  # type: ignore[valid-type]
    min: Optional[float] = Field(None, description="lower bound on the value")
    max: Optional[float] = Field(None, description="upper bound on the value")
    min_vs_baseline: Optional[float] = Field(None, description="lower bound on value / baseline value")
    seq_len: Optional[int] = Field(None, ge=1, description="sequence length the metric is measured at")

    @model_validator(mode="after")
    def _bounds(self) -> "Check":
        given = [b for b in _BOUNDS if getattr(self, b) is not None]
        if self.metric == "identical_tokens":
            if given:
                _fail(f"identical_tokens takes no bound, got {given[0]}: {getattr(self, given[0])}",
                      "write `{metric: identical_tokens}`: the tokens must equal the baseline's", field=given[0])
        elif not given:
            _fail(f"check of {self.metric} has no bound", "give min, max or min_vs_baseline", field="metric")
        if self.min is not None and self.max is not None and self.min > self.max:
            _fail(f"min {self.min} exceeds max {self.max}", "min must be <= max", field="min")
        return self


class Spec(_Section):
    """A whole accelc spec (format v1).  Build with :func:`load_spec`; ``Spec.identity()`` is the baseline."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False, title="accelc spec v1")

    accelc: Version = Field(description="every spec starts with `accelc: 1`, the format version; supported versions: "
                            + ", ".join(map(str, SUPPORTED_VERSIONS)))
    name: Optional[str] = Field(None, description="short name of the spec")
    description: Optional[str] = Field(None, description="what the spec does")
    prefill: Optional[Prefill] = None
    kv_cache: Optional[KVCache] = None
    attention: Optional[Attention] = None
    decode: Optional[Decode] = None
    checks: list[Check] = Field(default_factory=list, description="a list of CI gates read by `accelc check`")

    _source: str = PrivateAttr("<dict>")
    _marks: dict = PrivateAttr(default_factory=dict)  # key path -> (line, column), 1-based

    @property
    def source(self) -> str:
        """Where the spec came from: a file path, ``<string>``, ``<dict>`` or ``<identity>``."""
        return self._source

    def __eq__(self, other: object) -> bool:
        """Specs are equal when their values are, wherever they came from."""
        return isinstance(other, Spec) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # lists inside: not hashable

    @classmethod
    def identity(cls) -> "Spec":
        """The identity (baseline) spec, ``accelc: 1``: no rewrite at all."""
        spec = cls(accelc=SUPPORTED_VERSIONS[-1])
        spec._source = "<identity>"
        return spec

    def to_dict(self, *, defaults: bool = False) -> dict[str, Any]:
        """Plain YAML/JSON-able dict (``load_spec(spec.to_dict()) == spec``); defaults omitted unless asked."""
        return self.model_dump(mode="json", exclude_defaults=not defaults)

    def features(self) -> list[str]:
        """Requested graph/runtime features, in :data:`FEATURES` order."""
        present = {
            "token_selection": bool(self.prefill and self.prefill.token_selection),
            "kv_compression": bool(self.kv_cache and self.kv_cache.compression),
            "sparse_attention": bool(self.attention and self.attention.sparse),
            "speculative": bool(self.decode and self.decode.speculative),
        }
        return [f for f in FEATURES if present[f]]

    @property
    def is_identity(self) -> bool:
        """True when no feature is requested (sampling settings alone do not rewrite anything)."""
        return not self.features()

    def check_model(self, config: Any, source: str | None = None) -> None:
        """Check model-dependent values against a transformers config (layer/head counts only).

        ``config`` needs ``num_hidden_layers`` and ``num_attention_heads``; raises :class:`SpecError`.
        """
        n, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
        problems = list(_model_problems(self, n, heads))
        if problems:
            _raise(sorted((_Issue(p, _mark(self._marks, p), w, h) for p, w, h in problems), key=_Issue.order),
                   source or self._source)


def _model_problems(spec: Spec, n: int, heads: int):
    """Yield ``(path, what, hint)`` for every value of ``spec`` that does not fit the model."""
    layers_txt = f"the model has {n} layers, 0-{n - 1}"
    ts = spec.prefill.token_selection if spec.prefill else None
    if ts is not None and ts.layer > n - 2:
        yield (("prefill", "token_selection", "layer"), f"layer {ts.layer} is out of range: {layers_txt}",
               f"token selection needs at least one layer after it: use 0-{n - 2}")
    kc = spec.kv_cache.compression if spec.kv_cache else None
    if kc is not None and kc.layers.problem(n):
        yield ("kv_cache", "compression", "layers"), kc.layers.problem(n), f"use indices 0-{n - 1} or 'all'"
    for i, entry in enumerate(spec.attention.sparse if spec.attention else []):
        if entry.layers.problem(n):
            yield ("attention", "sparse", i, "layers"), entry.layers.problem(n), f"use indices 0-{n - 1} or 'all'"
        if isinstance(entry, Streaming) and isinstance(entry.heads, list) and max(entry.heads) >= heads:
            yield (("attention", "sparse", i, "heads"),
                   f"head {max(entry.heads)} is out of range: the model has {heads} attention heads, 0-{heads - 1}",
                   f"use head indices 0-{heads - 1}, 'all' or 'auto'")
    sp = spec.decode.speculative if spec.decode else None
    if isinstance(sp, EarlyExit) and _is_int(sp.exit_layer) and sp.exit_layer > n - 1:
        yield (("decode", "speculative", "exit_layer"), f"exit_layer {sp.exit_layer} is out of range: {layers_txt}",
               f"drafts come from the first exit_layer layers: use 1-{n - 1} or 'adaptive'")


# --------------------------------------------------------------------------- errors


@dataclass
class _Issue:
    """One problem found in a spec, before it is formatted."""

    path: Path_
    mark: tuple[int, int] | None
    what: str
    hint: str | None

    def order(self) -> tuple[int, int]:
        """Sort key: document order (issues without a line keep their relative order)."""
        return self.mark or (0, 0)


def _fmt_path(path: Path_) -> str:
    """``attention.sparse[1].top_pages``; odd keys are quoted."""
    out = ""
    for c in path:
        if isinstance(c, int):
            out += f"[{c}]"
        else:
            out += ("." if out else "") + (c if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c) else repr(c))
    return out


def _where(source: str, path: Path_, mark: tuple[int, int] | None) -> str:
    """``<file>:<line>: <key.path>`` (line and path when known)."""
    loc = f"{source}:{mark[0]}" if mark else source
    return f"{loc}: {_fmt_path(path)}" if path else loc


def _raise(issues: list[_Issue], source: str) -> NoReturn:
    """Raise a :class:`SpecError` for the first issue (issues are already in document order)."""
    errs = [AccelcError(_where(source, i.path, i.mark), i.what, i.hint or None) for i in issues]
    first = issues[0]
    raise SpecError(errs[0].where, first.what, first.hint or None, more=errs[1:])


def _mark(marks: dict, path: Path_) -> tuple[int, int] | None:
    """The mark of ``path`` or of its nearest ancestor that has one."""
    for k in range(len(path), -1, -1):
        if path[:k] in marks:
            return marks[path[:k]]
    return None


def _unwrap(ann: Any) -> Any:
    """A shape for walking error locations: a model class, ``('list', item)``, ``('union', members)`` or a leaf."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _unwrap(get_args(ann)[0])
    if origin is list:
        return ("list", _unwrap(get_args(ann)[0]))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
        if all(isinstance(a, type) and issubclass(a, _Tagged) for a in args):
            return ("union", {a.tag(): a for a in args})
    return ann


@dataclass
class _Site:
    """Where a pydantic error location lands: key path, owning model, field, enclosing tagged union."""

    path: Path_
    owner: Any = None
    field: Any = None
    union: dict | None = None
    shape: Any = None


def _walk(loc: tuple) -> _Site:
    """Map a pydantic error ``loc`` onto the user's key path (dropping union tags)."""
    site = _Site(path=(), shape=Spec)
    for comp in loc:
        shape = site.shape
        if isinstance(shape, tuple) and shape[0] == "union" and comp in shape[1]:
            site.union, site.shape = shape[1], shape[1][comp]
            continue
        site.path += (comp,)
        if isinstance(shape, type) and issubclass(shape, BaseModel):
            site.owner, site.field = shape, shape.model_fields.get(comp)
            site.shape = _unwrap(site.field.annotation) if site.field else None
        elif isinstance(shape, tuple) and shape[0] == "list":
            site.shape = shape[1]
        else:
            site.shape = None
    return site


def _field_hint(site: _Site) -> str | None:
    return site.field.description if site.field is not None else None


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false",
               "list_type": "a list", "model_type": "a mapping", "model_attributes_type": "a mapping",
               "dict_type": "a mapping"}
_BOUND_WORDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
                "less_than": ("<", "lt")}


def _translate(err: dict) -> tuple[Path_, str, str | None]:
    """One pydantic error -> ``(key path, what, hint)`` in the user's terms."""
    site = _walk(tuple(err["loc"]))
    kind, v, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "accelc":
        return site.path + ((ctx["field"],) if "field" in ctx else ()), ctx["what"], ctx["hint"] or None
    if kind == "extra_forbidden":
        return site.path, *_unknown_key(site)
    if kind == "missing":
        return site.path, f"missing required key {site.path[-1]!r}", _field_hint(site)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _bad_tag(site, kind, v)
    if kind == "literal_error":
        allowed = [a for a in get_args(_literal(site.field)) if isinstance(a, str)]
        mean = _did_you_mean(v, allowed)
        listed = ", ".join(allowed)
        return site.path, f"{_show(v)} is not one of {listed}", f"{mean + ' ' if mean else ''}allowed: {listed}"
    if kind in _TYPE_NAMES:
        return site.path, f"expected {_TYPE_NAMES[kind]}, {_got(v)}", _type_hint(v, _field_hint(site))
    if kind in _BOUND_WORDS:
        op, key = _BOUND_WORDS[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return site.path, f"must be {op} {bound}, got {_show(v)}", _field_hint(site)
    if kind == "string_too_short":
        return site.path, "must not be empty", _field_hint(site)
    if kind == "finite_number":
        return site.path, f"must be a finite number, got {_show(v)}", _field_hint(site)
    return site.path, f"{err['msg']}, {_got(v)}", _field_hint(site)


def _literal(field: Any) -> Any:
    """The Literal annotation of a field (through Optional/Annotated)."""
    ann = _unwrap(field.annotation) if field is not None else None
    return ann if get_origin(ann) is Literal else Literal[()]  # type: ignore[valid-type]


def _type_hint(v: Any, hint: str | None) -> str | None:
    """Add a fix for the usual YAML slips (quoted numbers, 8.0 for 8) to a field's hint."""
    tip = None
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+(\.\d*)?([eE][-+]?\d+)?\s*", v):
        tip = "remove the quotes"
    elif isinstance(v, float) and v.is_integer():
        tip = f"write {int(v)} without the decimal point"
    return "; ".join(t for t in (tip, hint) if t) or None


def _unknown_key(site: _Site) -> tuple[str, str]:
    """``unknown key 'x'`` with a did-you-mean; for a tagged member, the sibling the key belongs to."""
    key, owner = site.path[-1], site.owner
    allowed = sorted(owner.model_fields, key=lambda k: k != getattr(owner, "TAG_KEY", None)) if owner else []
    listed = f"allowed keys: {', '.join(allowed)}"
    if site.union and owner is not None and issubclass(owner, _Tagged):
        homes = [tag for tag, m in site.union.items() if m is not owner and key in m.model_fields]
        if homes:
            tk = owner.TAG_KEY
            return (f"{key!r} belongs to {tk} {' / '.join(homes)}, not {tk} {owner.tag()}",
                    f"{tk}: {owner.tag()} takes {', '.join(allowed)}")
    mean = _did_you_mean(key, allowed)
    return f"unknown key {_show(key)}", f"{mean + ' ' if mean else ''}{listed}"


def _bad_tag(site: _Site, kind: str, v: Any) -> tuple[Path_, str, str]:
    """A missing or unknown ``method:``/``draft:`` in a tagged entry."""
    members = site.shape[1] if isinstance(site.shape, tuple) and site.shape[0] == "union" else {}
    tag_key = next(iter(members.values())).TAG_KEY if members else "type"
    tags = list(members)
    if kind == "union_tag_not_found" or not isinstance(v, Mapping) or tag_key not in v:
        return site.path, f"missing key {tag_key!r}", f"say which {tag_key}: one of {', '.join(tags)}"
    tag = v[tag_key]
    mean = _did_you_mean(tag, tags)
    return (site.path + (tag_key,), f"unknown {tag_key} {_show(tag)}",
            f"{mean + ' ' if mean else ''}allowed: {', '.join(tags)}")


# --------------------------------------------------------------------------- YAML reading

_STR_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans (not yes/no/on/off), 1e-3 is a float."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _index_nodes(node: yaml.Node, path: Path_, marks: dict, issues: list[_Issue], seen: set[int]) -> None:
    """Record the (line, column) of every key path and flag duplicate keys (YAML would keep the last)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key, mark = key_node.value, (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in first:
                issues.append(_Issue(path + (key,), mark, f"duplicate key {key!r}",
                                     f"first given at line {first[key]}; keep only one"))
            first.setdefault(key, mark[0])
            marks[path + (key,)] = mark
            _index_nodes(value_node, path + (key,), marks, issues, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[path + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _index_nodes(item, path + (i,), marks, issues, seen)


def _yaml_error(e: yaml.YAMLError, source: str, text: str) -> AccelcError:
    """A YAML syntax error with its line and column."""
    mark = getattr(e, "problem_mark", None)
    if mark is None and getattr(e, "position", None) is not None:  # ReaderError: a forbidden character
        line = text.count("\n", 0, e.position) + 1
        return AccelcError(f"{source}:{line}", f"invalid YAML: control character U+{e.character:04X} is not allowed",
                           "remove it; YAML allows only printable characters")
    problem = getattr(e, "problem", None) or str(e)
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx:  # PyYAML: "<context> at <context_mark>, <problem> at <problem_mark>"
        ctx += f" at line {ctx_mark.line + 1}" if ctx_mark is not None else ""
        problem = f"{ctx}, {problem}"
    what = f"invalid YAML: {problem}"
    if "'\\t'" in problem:
        hint = "YAML indents with spaces, not tabs"
    else:
        hint = "check the indentation, colons and quotes around this line"
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    return AccelcError(where, what, hint)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict, list[_Issue]]:
    """YAML text -> (data, key-path marks, duplicate-key issues); raises AccelcError on syntax errors."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            raise AccelcError(source, "empty spec (no YAML content)", "the identity spec is `accelc: 1`")
        marks: dict = {(): (node.start_mark.line + 1, node.start_mark.column + 1)}
        issues: list[_Issue] = []
        _index_nodes(node, (), marks, issues, set())
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source, text) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, marks, issues


def _read_file(path: Path, source: str) -> str:
    """The text of a spec file; AccelcError for a missing file, a directory, unreadable or non-UTF-8 bytes."""
    if not path.exists():
        raise AccelcError(source, "no such file", _missing_hint(path))
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        hint = f"spec files in it: {', '.join(found)}" if found else "give a .yaml spec file"
        raise AccelcError(source, "is a directory, not a spec file", hint)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AccelcError(source, f"cannot read the file: {e.strerror}", "check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise AccelcError(f"{source}:{line}", f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}",
                          "save the spec as UTF-8") from None


def _missing_hint(path: Path) -> str:
    """Did-you-mean among the .yaml files next to a missing path."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        names = sorted(p.name for p in parent.iterdir() if p.suffix in (".yaml", ".yml"))
        stems = {Path(n).stem: n for n in names}
        close = difflib.get_close_matches(path.stem, list(stems), n=1, cutoff=0.6)
        if close:
            return f"did you mean {str(parent / stems[close[0]])!r}?"
        if names:
            return f"specs in {str(parent)!r}: {', '.join(names)}"
    if "\n" in str(path):
        return "a str is a file path; parse YAML text with accelc.spec.load_spec_text"
    return "check the path; ready specs are in specs/"


def _string_keys(data: Any, path: Path_, marks: dict, issues: list[_Issue], stack: set[int]) -> Any:
    """A copy of ``data`` without non-string keys (each one becomes an issue); rejects self-referencing aliases."""
    if isinstance(data, (dict, list)):
        if id(data) in stack:
            issues.append(_Issue(path, _mark(marks, path), "a YAML alias refers to itself", "remove the recursion"))
            return None
        stack = stack | {id(data)}
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if not isinstance(k, str):
                issues.append(_Issue(path + (str(k),), _mark(marks, path + (str(k),)),
                                     f"key {_show(k)} is {_kind(k)}, not a name", "keys are names; quote it"))
                continue
            out[k] = _string_keys(v, path + (k,), marks, issues, stack)
        return out
    if isinstance(data, list):
        return [_string_keys(v, path + (i,), marks, issues, stack) for i, v in enumerate(data)]
    return data


# --------------------------------------------------------------------------- public API


def _validate(data: Any, source: str, marks: dict, issues: list[_Issue]) -> Spec:
    """Validate parsed data; raise one :class:`SpecError` listing every issue in document order."""
    if not isinstance(data, Mapping):
        raise AccelcError(_where(source, (), _mark(marks, ())),
                          f"the top level is {_kind(data)}, not a mapping",
                          "a spec is a mapping that starts with `accelc: 1`")
    issues = list(issues)
    clean = _string_keys(dict(data), (), marks, issues, set())
    try:
        spec = Spec.model_validate(clean)
    except ValidationError as e:
        for err in e.errors():
            path, what, hint = _translate(err)
            if path[:1] == ("accelc",):  # without a known version nothing else can be judged
                issues = [_Issue(path, _mark(marks, path), what, hint)]
                break
            issues.append(_Issue(path, _mark(marks, path), what, hint))
        spec = None
    if issues:
        _raise(sorted(issues, key=_Issue.order), source)
    assert spec is not None
    spec._source, spec._marks = source, marks
    return spec


def load_spec_text(text: str, source: str = "<string>") -> Spec:
    """Parse and validate spec YAML ``text``; ``source`` names it in error messages."""
    data, marks, issues = _parse_yaml(text, source)
    return _validate(data, source, marks, issues)


def load_spec(source: Union[str, os.PathLike, Mapping, Spec]) -> Spec:
    """Load a spec from a file path (str or PathLike), a dict (``<dict>``) or return a :class:`Spec` as is."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, Mapping):
        return _validate(source, "<dict>", {}, [])
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return load_spec_text(_read_file(Path(name), name), name)
    raise AccelcError("load_spec", f"expected a file path, a dict or a Spec, got {type(source).__name__}",
                      "YAML text goes to accelc.spec.load_spec_text")


def json_schema() -> dict[str, Any]:
    """JSON schema of spec v1 (draft 2020-12) for editors, e.g. yaml-language-server."""
    schema = Spec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}
