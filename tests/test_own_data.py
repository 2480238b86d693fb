"""Your own data: text corpora and instruction sets give the same exact scoring as the book.

Small fixture corpora are written here: the token stream round-trips, packed rows score each document or
sample as if it were alone, the masks score exactly the answers (this file's own rendering and perplexity
loop agree with the logged one), and runs through ``smarter`` resume exactly and give the same perplexity on
one process or two.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from datamodules import InstructionDataModule, TextCorpusDataModule
from foundation import IGNORE_INDEX
from helpers import QUIET, TINY, cpu_trainer, run_smarter, scalars
from lightning_modules import MistralModule

WORDS = [
    *("the", "sea", "ship", "captain", "island", "gold", "map", "parrot", "rum", "sail", "wind", "storm"),
    *("harbour", "crew", "mast", "deck", "anchor", "Silver", "Hawkins", "doctor", "squire", "chest", "coins"),
    *("cutlass", "stockade", "fort", "boat", "oars", "tide", "reef"),
]
CORPUS_YAML = str(REPO_ROOT / "configs/data/corpus.yaml")
QA_YAML = str(REPO_ROOT / "configs/data/instructions.yaml")


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Twelve documents of a few paragraphs each: ten ``.txt`` / ``.md`` files and two JSON Lines rows."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for index in range(10):
        text = "\n\n".join(_sentence(rng, 8, 40) for _ in range(rng.randint(1, 4)))
        (folder / f"doc{index:02d}.{'md' if index % 3 == 0 else 'txt'}").write_text(f"Log {index}: {text}")
    rows = [{"text": f"Entry {i} — “{_sentence(rng, 5, 20)}”"} for i in range(2)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


def _qa_rows(rng: random.Random, count: int) -> list[dict]:
    rows = []
    for index in range(count):
        if index % 4 == 3:  # a conversation: a system message and two turns
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "Answer as a sailor."},
                        {"role": "user", "content": f"Who holds the {rng.choice(WORDS)}?"},
                        {"role": "assistant", "content": _sentence(rng, 1, 4)},
                        {"role": "user", "content": "And then?"},
                        {"role": "assistant", "content": _sentence(rng, 2, 8)},
                    ]
                }
            )
        else:
            rows.append({"prompt": f"What of the {rng.choice(WORDS)}?", "response": _sentence(rng, 1, 10)})
    return rows


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> dict[str, Path]:
    """An instruction set (prompt/response rows and chat conversations) and a held-out file of its own."""
    folder = tmp_path_factory.mktemp("qa")
    rng = random.Random(1)
    files = {}
    for name, count in (("train", 60), ("held_out", 12)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(rng, count)))
    return files


# ---- the token stream -------------------------------------------------------------------------------------


@pytest.mark.parametrize("within", [False, True], ids=["across-documents", "within-documents"])
def test_the_corpus_token_stream_round_trips(corpus, within):
    data = TextCorpusDataModule(
        path=str(corpus), block_size=32, eval_stride=16, batch_size=2, attend_within_documents=within
    )
    data.setup("fit")
    splits, tok = data.load_source(), data.tokenizer
    assert sum(len(docs) for docs in splits.values()) == 12 and all(splits.values())
    texts = sorted(doc.text for docs in splits.values() for doc in docs)
    expected = sorted(p.read_text() for p in corpus.glob("*.[tm][xd]*") if p.suffix in (".txt", ".md"))
    expected += sorted(json.loads(line)["text"] for line in (corpus / "rows.jsonl").read_text().splitlines())
    assert texts == sorted(expected)  # every document once, in exactly one split
    # training blocks: the documents, each <s> text </s>, one after another, and nothing else
    train = data.datasets["train"].tensors
    stream = [i for doc in splits["train"] for i in [tok.bos_id, *tok.encode(doc.text), tok.eos_id]]
    flat = train["input_ids"].flatten().tolist()
    assert flat[: len(stream) - 1] == stream[:-1]
    starts = [j for j, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
    decoded = [tok.decode(flat[a + 1 : b - 1]) for a, b in itertools.pairwise(starts)]  # between <s> and </s>
    assert decoded == [doc.text for doc in splits["train"]]
    labels = train["labels"].flatten().tolist()
    assert labels[: len(stream) - 1] == [IGNORE_INDEX if t == tok.bos_id else t for t in stream[1:]]
    if within:  # positions restart where each document starts
        positions = train["position_ids"].flatten().tolist()
        assert all(positions[j] == 0 for j in starts[:-1])
    # held-out splits: every token of every document scored exactly once (a new document's BOS is given)
    for name in ("val", "test"):
        rows = data.datasets[name].tensors
        scored = rows["labels"][rows["labels"] != IGNORE_INDEX].tolist()
        wanted = [t for doc in splits[name] for t in [*tok.encode(doc.text), tok.eos_id]]
        assert Counter(scored) == Counter(wanted) and len(scored) == len(wanted)
        text_bytes = sum(len(doc.text.encode()) for doc in splits[name])
        assert int(rows["scored_bytes"].sum()) == text_bytes  # bits per byte over the documents' own bytes


def test_a_corpus_of_one_document_is_split_inside_it_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    rng = random.Random(2)
    (tmp_path / "one.md").write_text("\n\n".join(_sentence(rng, 20, 40) for _ in range(30)))
    data = TextCorpusDataModule(path=str(tmp_path / "one.md"), block_size=32)
    data.setup("fit")
    splits = data.load_source()
    assert [len(splits[name]) for name in ("train", "val", "test")] == [1, 1, 1]
    whole = (tmp_path / "one.md").read_text()
    assert whole.startswith(splits["train"][0].text) and whole.endswith(splits["test"][0].text)
    assert "too few to split by document" in caplog.text


# ---- packed rows score as if each document or sample were alone --------------------------------------------


def _nll(module, rows: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        nll, _ = module.token_nll({key: rows[key] for key in ("input_ids", "labels", "position_ids") if key in rows})
    return float(nll)


@pytest.fixture(scope="module")
def tiny_modules() -> dict[str, MistralModule]:
    modules = {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        module = MistralModule(source="tiny", dtype="float32", attention=attention)
        module.configure_model()
        modules[attention] = module.eval()
    return modules


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_documents_score_as_if_each_were_alone(corpus, tiny_modules, attention):
    module = tiny_modules[attention]
    within = TextCorpusDataModule(path=str(corpus), block_size=256, attend_within_documents=True, val_fraction=0.3)
    within.setup("validate")
    tok = within.tokenizer
    rows = within.datasets["val"].tensors
    assert rows["input_ids"].shape[0] < len(within.load_source()["val"]) >= 3  # packed: several documents a row
    alone = 0.0
    for document in within.load_source()["val"]:
        ids = [tok.bos_id, *tok.encode(document.text), tok.eos_id]
        assert len(ids) <= 257, "the fixture's documents fit one window each"
        tensor = torch.tensor([ids[:-1]])
        alone += _nll(module, {"input_ids": tensor, "labels": torch.tensor([ids[1:]])})
    packed = _nll(module, rows)
    assert packed == pytest.approx(alone, rel=1e-5)
    across = TextCorpusDataModule(path=str(corpus), block_size=256, attend_within_documents=False, val_fraction=0.3)
    across.setup("validate")
    assert _nll(module, across.datasets["val"].tensors) != pytest.approx(alone, rel=1e-4)  # the mask matters


def _hand_rendering(tok, row: dict) -> tuple[list[int], list[bool]]:
    """This test's own reading of the Mistral format: ids, and which of them are the assistant's."""
    if "messages" in row:
        turns = [(m["role"], m["content"]) for m in row["messages"]]
    else:
        turns = [("user", row["prompt"]), ("assistant", row["response"])]
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    ids, answer = [tok.bos_id], [False]
    for (_, user), (_, reply) in zip(turns[0::2], turns[1::2], strict=True):
        asked = tok.encode(f"[INST] {system}\n\n{user} [/INST]" if system else f"[INST] {user} [/INST]")
        system = None
        reply_ids = [*tok.encode(reply), tok.eos_id]
        ids += asked + reply_ids
        answer += [False] * len(asked) + [True] * len(reply_ids)
    return ids, answer


def test_the_masks_score_exactly_the_answers_and_the_logged_perplexity_is_theirs(qa, tiny_modules):
    data = InstructionDataModule(
        path=str(qa["train"]), val_path=str(qa["held_out"]), block_size=96, batch_size=4, eval_batch_size=3
    )
    data.setup("fit")
    tok = data.tokenizer
    rows = data.datasets["val"].tensors
    held_out = [json.loads(line) for line in qa["held_out"].read_text().splitlines()]
    hand = [_hand_rendering(tok, row) for row in held_out]
    # each packed segment (positions restart at 0) is one held-out sample, its labels exactly its answers
    seen, mask = [], torch.zeros_like(rows["labels"], dtype=torch.bool)
    for r in range(rows["input_ids"].shape[0]):
        starts = [*(rows["position_ids"][r] == 0).nonzero().flatten().tolist(), rows["input_ids"].shape[1]]
        for a, b in itertools.pairwise(starts):
            segment = rows["input_ids"][r, a:b].tolist()
            matches = [k for k, (ids, _) in enumerate(hand) if segment[: len(ids) - 1] == ids[:-1]]
            if not matches:
                assert all(t == tok.eos_id for t in segment) and (rows["labels"][r, a:b] == IGNORE_INDEX).all()
                continue  # the row's padding
            ids, answer = hand[matches[0]]
            n = len(ids) - 1
            expected = [t if scored else IGNORE_INDEX for t, scored in zip(ids[1:], answer[1:], strict=True)]
            assert rows["labels"][r, a : a + n].tolist() == expected
            assert (rows["labels"][r, a + n : b] == IGNORE_INDEX).all()
            mask[r, a : a + n] = torch.tensor(answer[1:])
            seen.append(matches[0])
    assert sorted(seen) == list(range(len(held_out)))  # every held-out sample once
    # the perplexity of those answer tokens, by this test's own loop, is the one validation logs
    module = tiny_modules["sdpa"]
    with torch.no_grad():
        logits = module(rows["input_ids"], rows["position_ids"]).double()
    targets = torch.roll(rows["input_ids"], -1, dims=1)
    targets[:, -1] = 0
    picked = torch.where(mask, rows["labels"], targets).clamp(min=0)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, picked[..., None])[..., 0]
    hand_ppl = math.exp(float(-(log_probs[mask]).sum()) / int(mask.sum()))
    (logged,) = cpu_trainer().validate(module, datamodule=data, verbose=False)
    assert logged["val/ppl"] == pytest.approx(hand_ppl, rel=1e-6)
    # and each answer scored alone gives the same sum: packing changes nothing
    alone = sum(
        _nll(module, {"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([expected_labels(ids, answer)])})
        for ids, answer in hand
    )
    assert float(-(log_probs[mask]).sum()) == pytest.approx(alone, rel=1e-5)


def expected_labels(ids: list[int], answer: list[bool]) -> list[int]:
    return [t if scored else IGNORE_INDEX for t, scored in zip(ids[1:], answer[1:], strict=True)]


def test_training_on_everything_scores_all_but_the_first_token_and_padding_keeps_the_masks(qa):
    everything = InstructionDataModule(path=str(qa["train"]), block_size=96, train_on="everything", split_seed=3)
    everything.setup("fit")
    train = everything.datasets["train"].tensors
    every_target = sum(len(everything.render(sample).ids) - 1 for sample in everything.load_source()["train"])
    assert int((train["labels"] != IGNORE_INDEX).sum()) == every_target  # each sample's every token after BOS
    answers_only = InstructionDataModule(path=str(qa["train"]), block_size=96, split_seed=3)
    answers_only.setup("fit")
    assert (train["labels"] != IGNORE_INDEX).sum() > 2 * (
        answers_only.datasets["train"].tensors["labels"] != -100
    ).sum()
    # held-out scoring stays on the answers, whatever is trained on
    assert torch.equal(everything.datasets["val"].tensors["labels"], answers_only.datasets["val"].tensors["labels"])
    # one sample a row, padded per batch: the same targets as the packed rows, none lost
    padded = InstructionDataModule(path=str(qa["train"]), block_size=96, packing=False, split_seed=3, batch_size=4)
    padded.setup("fit")
    batches = list(padded.train_dataloader())
    scored = sorted(t for batch in batches for t in batch["labels"][batch["labels"] != IGNORE_INDEX].tolist())
    packed = answers_only.datasets["train"].tensors["labels"]
    assert scored == sorted(packed[packed != IGNORE_INDEX].tolist())
    assert all(batch["input_ids"].shape[1] <= 96 for batch in batches)


def test_samples_over_the_block_are_truncated_or_dropped_and_counted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    rows = [{"prompt": "Short?", "response": "Aye."} for _ in range(20)]
    rows += [{"prompt": "Long? " + "arr " * 40, "response": "Aye."}, {"prompt": "Q?", "response": "word " * 60}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    counts = {}
    for overlong in ("truncate", "drop"):
        data = InstructionDataModule(
            path=str(tmp_path / "mixed.jsonl"),
            val_path=str(tmp_path / "held.jsonl"),
            test_path=str(tmp_path / "held.jsonl"),
            block_size=32,
            overlong=overlong,
        )
        data.setup("fit")
        counts[overlong] = {name: dict(counter) for name, counter in data.sample_counts.items()}
        total = sum(
            c.get("kept", 0) + sum(v for k, v in c.items() if k.startswith("dropped"))
            for c in counts[overlong].values()
        )
        assert total == len(rows) + 6  # every sample accounted for
    truncated = sum(c.get("truncated", 0) for c in counts["truncate"].values())
    dropped = sum(v for c in counts["drop"].values() for k, v in c.items() if k.startswith("dropped"))
    assert (
        truncated + sum(v for c in counts["truncate"].values() for k, v in c.items() if k.startswith("dropped")) == 2
        and dropped == 2
    )
    # printed: an answer cut at the block is kept, truncated; a prompt that fills the block leaves no answer
    assert "train: 21 kept (1 truncated), 1 dropped (no answer within the block)" in caplog.text
    assert "train: 20 kept, 2 dropped" in caplog.text


# ---- through smarter: resume, two processes, the kernel trace ------------------------------------------------

SHAPE = [
    *["--data.block_size", "64", "--data.batch_size", "4", "--trainer.limit_val_batches", "0"],
    *["--trainer.log_every_n_steps", "1", "--trainer.max_epochs", "100"],
]


@pytest.mark.parametrize("packing", ["true", "false"], ids=["packed", "padded-per-batch"])
def test_an_instruction_run_resumes_mid_epoch_exactly(qa, tmp_path, packing):
    every_3 = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "3"]
    every_3 += ["--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "at{step}"]
    fit = ["fit", "-c", TINY, "-c", QA_YAML, "--data.path", str(qa["train"]), "--data.packing", packing, *SHAPE, *QUIET]
    first = run_smarter(
        *fit,
        "--trainer.max_steps",
        "8",
        *every_3,
        "-c",
        str(REPO_ROOT / "configs/callbacks/kernel_trace.yaml"),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "tiny").glob("version_*")
    epoch = len(list((run / "checkpoints").glob("at*.ckpt")))
    assert epoch >= 2
    checkpoint = next((run / "checkpoints").glob("at*3.ckpt"))
    resumed = run_smarter(*fit, "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (again,) = [r for r in (tmp_path / "runs" / "tiny").glob("version_*") if r != run]
    before, after = dict(scalars(run)["train/loss"]), dict(scalars(again)["train/loss"])
    assert sorted(after) == [3, 4, 5, 6, 7]
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], rel=1e-6), step
    assert list((run / "kernel_trace").glob("*.pt.trace.json*"))  # the trace works on this data as on the book
    assert scalars(run)["data/train_samples_kept"][0][1] > 0


def test_two_processes_score_the_one_process_perplexity_on_held_out_answers(qa, tmp_path):
    args = ["validate", "-c", TINY, "-c", QA_YAML, "--data.path", str(qa["train"]), "--data.val_path"]
    args += [str(qa["held_out"]), "--data.block_size", "64", "--data.eval_batch_size", "1", *QUIET]
    ppl = {}
    for name, extra in (("one", []), ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        (tmp_path / name).mkdir()
        ran = run_smarter(*args, "--trainer.accelerator", "cpu", *extra, cwd=tmp_path / name, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]
        (ppl[name],) = [value for _, value in scalars(tmp_path / name / "runs")["val/ppl"]]
    assert ppl["two"] == pytest.approx(ppl["one"], rel=1e-6)


# ---- Hugging Face datasets on disk ---------------------------------------------------------------------------


def test_a_saved_dataset_and_parquet_files_are_read_with_the_configs_column_mapping(qa, tmp_path):
    datasets = pytest.importorskip("datasets")
    import yaml

    rows = [row for row in map(json.loads, qa["train"].read_text().splitlines()) if "prompt" in row]
    table = {"question": [r["prompt"] for r in rows], "answer": [r["response"] for r in rows]}
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(saved))
    datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / "qa.parquet"))
    settings = yaml.safe_load((REPO_ROOT / "configs/data/hf-dataset.yaml").read_text())["data"]["init_args"]
    assert settings["columns"] == {"prompt": "question", "response": "answer"}
    counts = {}
    for source in (saved, tmp_path / "qa.parquet"):
        data = InstructionDataModule(**{**settings, "path": str(source)}, block_size=64)
        data.setup("fit")
        splits = data.load_source()
        assert sorted(s.response for name in splits for s in splits[name]) == sorted(table["answer"])
        counts[source.name] = {name: int((data.datasets[name].tensors["labels"] != -100).sum()) for name in splits}
    assert counts["saved"] == counts["qa.parquet"]  # the same rows, whichever way they were stored
    corpus = datasets.Dataset.from_dict({"body": [r["response"] * 3 for r in rows]})
    corpus.to_parquet(str(tmp_path / "corpus.parquet"))
    text = TextCorpusDataModule(path=str(tmp_path / "corpus.parquet"), columns={"text": "body"}, block_size=32)
    text.setup("fit")
    assert sum(len(docs) for docs in text.load_source().values()) == len(rows)


# ---- compiled layers: every training batch of one shape ------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded-per-batch"])
def test_compiled_layers_get_full_training_batches_of_one_shape_with_nothing_scored_twice(qa, packing):
    from lightning_modules import InputRequirements

    requirements = MistralModule(source="tiny", compile="layers").input_requirements
    assert requirements.fixed_batch_shape and not MistralModule(source="tiny").input_requirements.fixed_batch_shape
    settings = {"path": str(qa["train"]), "block_size": 96, "batch_size": 5, "packing": packing}
    fixed = InstructionDataModule(**settings, model_requirements=requirements)
    plain = InstructionDataModule(
        **settings, model_requirements=InputRequirements(requirements.tokenizer, 2048, requirements.vocab_size)
    )
    scored = {}
    for name, data in (("fixed", fixed), ("plain", plain)):
        data.setup("fit")
        batches = list(data.train_dataloader())
        labels = [t for b in batches for t in b["labels"][b["labels"] != IGNORE_INDEX].tolist()]
        scored[name] = sorted(labels)
        if name == "fixed":
            assert {tuple(b["input_ids"].shape) for b in batches} == {(5, 96)}
        else:
            assert len(data.datasets["train"]) % 5 == 0 or batches[-1]["input_ids"].shape[0] < 5
    assert scored["fixed"] == scored["plain"]  # the filling rows score nothing
