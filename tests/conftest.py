"""Shared fixtures: the book on disk, an isolated cache, and a tiny random Mistral on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# huggingface_hub reads this once, when first imported (test modules import transformers while collected)
os.environ["HF_HUB_OFFLINE"] = "1"
# Triton kernels run in Triton's interpreter where there is no GPU; it must be set before Triton's own
# library functions are built, at its first import
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _find_book() -> Path | None:
    candidates = [
        os.environ.get("TREASURE_ISLAND_PATH"),
        REPO_ROOT.parent / "shared/data/treasure_island.txt",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


BOOK = _find_book()
needs_book = pytest.mark.skipif(
    BOOK is None, reason="Treasure Island text not found: set TREASURE_ISLAND_PATH to pg120.txt"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    """One cache folder per test session (preset weights are written once), no network."""
    cache = tmp_path_factory.mktemp("smarter-cache")
    saved = {key: os.environ.get(key) for key in ("SMARTER_CACHE_DIR", "TREASURE_ISLAND_PATH", "HF_HUB_OFFLINE")}
    os.environ["SMARTER_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if BOOK is not None:
        os.environ["TREASURE_ISLAND_PATH"] = str(BOOK)
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def book_path() -> Path:
    if BOOK is None:
        pytest.skip("Treasure Island text not found: set TREASURE_ISLAND_PATH to pg120.txt")
    return BOOK


@pytest.fixture(scope="session")
def tiny_spec_kwargs() -> dict:
    """The DESIGN's test model: 2 layers, hidden 128, 4 heads, 2 KV heads, fp32, CPU."""
    return {"source": "tiny", "dtype": "float32"}


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main job, run once for the session: ``smarter fit -c configs/tiny.yaml``; its run folder."""
    if BOOK is None:
        pytest.skip("Treasure Island text not found: set TREASURE_ISLAND_PATH to pg120.txt")
    from smarter.cli import main

    folder = tmp_path_factory.mktemp("quick-start")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(["fit", "-c", str(REPO_ROOT / "configs/tiny.yaml"), "--trainer.enable_progress_bar", "false"])
    return folder / "runs" / "tiny" / "version_0"
