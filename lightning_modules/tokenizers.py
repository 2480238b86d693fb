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
        """Write ``tokenizer.json`` (a fast tokenizer that gives this model's ids, checked on the whole book by
        the tests), its config and the ``.model`` file itself."""
        import shutil
        import tempfile

        from transformers import LlamaTokenizerFast

        with tempfile.TemporaryDirectory() as scratch:
            shutil.copy(self.model_file, Path(scratch) / "tokenizer.model")
            converted = LlamaTokenizerFast.from_pretrained(scratch)
        converted.save_pretrained(folder)
        shutil.copy(self.model_file, Path(folder) / "tokenizer.model")
        self._match_sentencepiece(Path(folder))

    def _match_sentencepiece(self, folder: Path) -> None:
        """Make the saved fast tokenizer split text as SentencePiece does. transformers' conversion differs
        in three ways that change ids (runs of spaces and text that starts with a space):

        - it ranks the merges that build whitespace-only pieces (``▁▁``, ``▁▁▁``...) first, where
          SentencePiece, whose scores for them are the lowest, applies them last;
        - its ``Metaspace`` adds the leading ``▁`` only when the text does not start with a space, where
          SentencePiece always adds it;
        - ``LlamaTokenizer`` rebuilds that pre-tokenizer when it loads, so the folder names the generic
          fast tokenizer class, which takes ``tokenizer.json`` as written.

        It also adds BOS in front of encoded text, as the model was trained and as Mistral's own files do.
        """
        import json

        tokenizer_file = folder / "tokenizer.json"
        spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        score = {self._sp.id_to_piece(i): self._sp.get_score(i) for i in range(self.vocab_size)}
        merges = spec["model"]["merges"]
        pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in merges]
        order = sorted(range(len(pairs)), key=lambda i: (-score.get("".join(pairs[i]), float("-inf")), i))
        spec["model"]["merges"] = [merges[i] for i in order]
        spec["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        spec["pre_tokenizer"] = None
        bos = self._sp.id_to_piece(self.bos_id)
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
        }
        tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

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
