"""The Treasure Island DataModule and the text/token helpers behind it."""

from datamodules.treasure_island import TreasureIslandDataModule

__all__ = ["TreasureIslandDataModule"]
