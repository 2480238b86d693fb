"""The data modules: Treasure Island (the default and the demo), your own text corpus, and instruction or chat
data, on one base (``TokenDataModule``) that a new source subclasses."""

from datamodules.instructions import InstructionDataModule
from datamodules.text_corpus import TextCorpusDataModule
from datamodules.token_data import TokenDataModule
from datamodules.treasure_island import TreasureIslandDataModule

__all__ = ["InstructionDataModule", "TextCorpusDataModule", "TokenDataModule", "TreasureIslandDataModule"]
