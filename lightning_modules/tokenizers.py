"""Text tokenizers behind one small interface: Mistral's SentencePiece file or a model's own.

Real checkpoints bring their own tokenizer (loaded with ``AutoTokenizer``); random-weight
presets use the Mistral-7B v0.1/v0.2 SentencePiece model that ships inside ``mistral-common``,
so everything works offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from foundation import ConfigError

MISTRAL_V1_TOKENIZER = "mistral-v1"


class TextTokenizer(Protocol):
    """What the framework needs from a tokenizer."""

    name: str
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens dropped."""

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for (0 for control tokens)."""

    def save(self, folder: Path) -> None:
        """Write files that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads as this tokenizer."""


def mistral_v1_tokenizer_path() -> Path:
    """Path of the Mistral-7B v0.1/v0.2 SentencePiece model shipped in ``mistral-common``."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall 'mistral-common' (pip install -U mistral-common).")
    return path


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file used directly.

    Args:
        model_file: Path of the SentencePiece model.
    """

    model_file: Path
    name: str = field(init=False)
    bos_id: int = field(init=False)
    eos_id: int = field(init=False)
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.vocab_size = self._sp.get_piece_size()
        self.name = f"sentencepiece-{_file_digest(Path(self.model_file))}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def save(self, folder: Path) -> None:
        import shutil
        import tempfile

        from transformers import LlamaTokenizerFast

        with tempfile.TemporaryDirectory() as scratch:
            shutil.copy(self.model_file, Path(scratch) / "tokenizer.model")
            converted = LlamaTokenizerFast.from_pretrained(scratch)
        converted.save_pretrained(folder)
        shutil.copy(self.model_file, Path(folder) / "tokenizer.model")

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def token_byte_lengths(self) -> list[int]:
        lengths = []
        for token_id in range(self.vocab_size):
            if self._sp.is_byte(token_id):
                lengths.append(1)
            elif self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
                lengths.append(0)
            else:
                piece = self._sp.id_to_piece(token_id)
                lengths.append(len(piece.replace("▁", " ").encode("utf-8")))
        return lengths


@dataclass
class HuggingFaceTokenizer:
    """A model's own tokenizer from a hub id or a local folder (``AutoTokenizer``).

    Args:
        source: Hub id or folder holding the tokenizer files.
    """

    source: str
    name: str = field(init=False)
    bos_id: int = field(init=False)
    eos_id: int = field(init=False)
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
        if self._tok.bos_token_id is None or self._tok.eos_token_id is None:
            raise ConfigError(
                f"The tokenizer of {self.source!r} has no BOS or EOS token; "
                "point model.source at a causal-LM checkpoint whose tokenizer defines both."
            )
        self.bos_id = int(self._tok.bos_token_id)
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        vocab_digest = hashlib.sha256(repr(sorted(self._tok.get_vocab().items())).encode()).hexdigest()[:16]
        self.name = f"hf-{vocab_digest}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def save(self, folder: Path) -> None:
        self._tok.save_pretrained(folder)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_byte_lengths(self) -> list[int]:
        """Bytes each token adds to text, measured after an anchor token so that no decoder strips a
        leading space (SentencePiece decoders drop the first token's ``▁``)."""
        special = set(self._tok.all_special_ids)
        anchor = self._tok.convert_ids_to_tokens(self.encode("a"))
        anchor_bytes = len(self._tok.convert_tokens_to_string(anchor).encode("utf-8"))
        lengths = []
        for token_id in range(self.vocab_size):
            if token_id in special:
                lengths.append(0)
                continue
            piece = self._tok.convert_ids_to_tokens(token_id)
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                lengths.append(1)  # SentencePiece byte fallback
            else:
                text = self._tok.convert_tokens_to_string([*anchor, piece])
                lengths.append(len(text.encode("utf-8")) - anchor_bytes)
        return lengths


@lru_cache(maxsize=8)
def load_tokenizer(source: str = MISTRAL_V1_TOKENIZER) -> TextTokenizer:
    """Load a tokenizer by name.

    Args:
        source: ``"mistral-v1"`` for the SentencePiece model shipped in ``mistral-common``,
            a path to a SentencePiece ``.model`` file, or a hub id / folder for ``AutoTokenizer``.
    """
    if source == MISTRAL_V1_TOKENIZER:
        return SentencePieceTokenizer(mistral_v1_tokenizer_path())
    if source.endswith(".model") and Path(source).is_file():
        return SentencePieceTokenizer(Path(source))
    try:
        return HuggingFaceTokenizer(source)
    except (OSError, ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"No tokenizer could be loaded from {source!r} ({type(error).__name__}); give a folder or hub id "
            "holding the model's tokenizer, a SentencePiece .model file, or 'mistral-v1'."
        ) from None
