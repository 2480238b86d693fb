"""Shared fixtures: the book on disk, an isolated cache, and a tiny random Mistral on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the command runner and the README's commands
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
def user_folder(tmp_path_factory: pytest.TempPathFactory, isolated_environment) -> Path:
    """Where the user-path runs happen: a folder laid out like the repository's root (``configs/`` beside it),
    in which the README's commands run as written."""
    if BOOK is None:
        pytest.skip("Treasure Island text not found: set TREASURE_ISLAND_PATH to pg120.txt")
    from command_runs import make_user_folder

    return make_user_folder(tmp_path_factory.mktemp("user"))


def _timing_log(folder: Path):
    """Each user-path run's exit status and duration, appended to ``timings.txt`` in the user folder."""

    def log(line: str) -> None:
        with (folder / "timings.txt").open("a") as handle:
            handle.write(line + "\n")

    return log


@pytest.fixture(scope="session")
def user_runs(user_folder: Path):
    """The README's commands and every fine-tuning recipe, run and chained as a user runs them, two at a time
    (tests/user_paths.py lists them; tests/test_user_paths.py checks them)."""
    from command_runs import run_jobs
    from user_paths import user_jobs

    return run_jobs(user_jobs(user_folder), parallel=2, threads=1, log=_timing_log(user_folder))


@pytest.fixture(scope="session")
def trained_tiny(user_runs, user_folder: Path) -> Path:
    """The README's main job, ``smarter fit -c configs/tiny.yaml``, run as written; its run folder."""
    user_runs["tiny"].check()
    return user_folder / "runs" / "tiny" / "version_0"
