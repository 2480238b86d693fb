"""``smarter predict``: prompts, the timed decode loop, and the JSONL it writes."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.prompts import instruction_text, read_prompts_file
from foundation import ConfigError
from helpers import THROUGHPUT, TINY, scalars
from lightning_modules import ModelSpec, load_causal_lm, load_tokenizer
from lightning_modules.generation import GenerationSettings, generate_timed
from smarter.cli import main

TIMING_FIELDS = {
    "prompt",
    "completion",
    "prompt_tokens",
    "new_tokens",
    "ttft_ms",
    "decode_tokens_per_s",
    "total_latency_ms",
}


def test_greedy_decode_loop_matches_transformers_generate(tiny_spec_kwargs):
    model = load_causal_lm(ModelSpec(**tiny_spec_kwargs)).eval()
    prompt = torch.randint(3, 32000, (1, 12))
    ours = generate_timed(model, prompt, GenerationSettings(max_new_tokens=20))
    reference = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=20,
        min_new_tokens=20,
        pad_token_id=2,
    )
    assert ours.new_tokens == reference[0, 12:].tolist()
    assert 0 < ours.ttft_s < ours.total_s


def test_sampling_is_seeded(tiny_spec_kwargs):
    model = load_causal_lm(ModelSpec(**tiny_spec_kwargs)).eval()
    prompt = torch.randint(3, 32000, (1, 8))
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    first = generate_timed(model, prompt, settings, sample_seed=7).new_tokens
    assert first == generate_timed(model, prompt, settings, sample_seed=7).new_tokens
    assert first != generate_timed(model, prompt, settings, sample_seed=8).new_tokens


def test_predict_writes_jsonl_with_timings_and_perf_scalars(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who is Ben Gunn?\n\nWhere is the treasure?\nWho keeps the map?\n")
    trace = tmp_path / "trace.yaml"
    trace.write_text(
        "trainer:\n  callbacks+:\n    - class_path: callbacks.KernelTraceCallback\n"
        "      init_args: {wait: 0, warmup: 0, active: 1, stages: [predict]}\n"
    )
    args = f"predict -c {TINY} -c {THROUGHPUT} -c {trace} --data.prompts_file {prompts}"
    main([*args.split(), "--model.generation.max_new_tokens", "8", "--trainer.enable_progress_bar", "false"])
    run = next((tmp_path / "runs" / "tiny" / "predict").glob("version_*"))
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Who is Ben Gunn?", "Where is the treasure?", "Who keeps the map?"]
    for record in records:
        assert set(record) >= TIMING_FIELDS
        assert record["new_tokens"] == 8 and record["total_latency_ms"] > record["ttft_ms"] > 0
        assert isinstance(record["completion"], str)
    assert (run / "kernel_trace" / "predict-cycle1.kernel_summary.json").is_file()
    assert "perf/predict/tokens_per_s" in scalars(run)


def test_predict_refuses_to_overwrite_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "out.jsonl"
    existing.write_text('{"keep": "me"}\n')
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                "-c",
                TINY,
                "--trainer.callbacks+=callbacks.JsonlPredictionWriter",
                "--trainer.callbacks.output_path",
                str(existing),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    assert existing.read_text() == '{"keep": "me"}\n'


def test_a_subclass_that_changes_attention_runs_through_predict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "predict",
            "-c",
            TINY,
            "--model",
            "lightning_modules.attention_variants.PinnedSdpaModule",
            "--model.sdpa_backend",
            "math",
            "--model.generation.max_new_tokens",
            "4",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (predictions,) = (tmp_path / "runs").rglob("predictions.jsonl")
    assert len(predictions.read_text().splitlines()) == 4


def test_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_prompts_file(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 is not a JSON object with a 'prompt' field"):
        read_prompts_file(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Hello"}\n{"prompt": "Ahoy"}\n')
    assert read_prompts_file(str(good)) == ["Hello", "Ahoy"]
    with pytest.raises(ConfigError, match="is not a file"):
        read_prompts_file(str(tmp_path / "missing.txt"))
    assert instruction_text("  Hi ") == "[INST] Hi [/INST]"


def test_bad_generation_settings_are_refused():
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p must be in"):
        GenerationSettings(top_p=0)


@pytest.mark.slow
def test_the_static_cache_decoder_gives_the_eager_loops_greedy_tokens_on_the_trained_model(trained_tiny):
    from lightning_modules.generation import StaticCacheDecoder

    model = load_causal_lm(ModelSpec(source=str(trained_tiny / "export" / "model"), dtype="float32")).eval()
    tokenizer = load_tokenizer(str(trained_tiny / "export" / "model"))
    decoder = StaticCacheDecoder(model, max_cache_len=128, compiled=False)
    greedy, sampled = GenerationSettings(max_new_tokens=24), GenerationSettings(max_new_tokens=24, do_sample=True)
    for text in ("Who is Long John Silver?", "The captain sat by the fire and"):
        prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(instruction_text(text))]])
        for settings in (greedy, sampled):
            eager = generate_timed(model, prompt, settings, sample_seed=3).new_tokens
            assert generate_timed(model, prompt, settings, sample_seed=3, static_decoder=decoder).new_tokens == eager
        assert len(set(eager)) > 3  # sampled text varies: the caches agree beyond a repeated token


@pytest.mark.slow
def test_a_prompt_padded_for_the_prefill_graph_decodes_as_the_unpadded_one():
    """The compiled decoder reads a prompt padded to its graph's length (the GPU captures that read): the
    padding's cache entries, after the prompt, must change neither the first token nor the ones after
    (random weights: no trained habit hides a shifted position)."""
    from lightning_modules.generation import StaticCacheDecoder

    torch.manual_seed(0)
    model = load_causal_lm(ModelSpec(source="tiny", dtype="float32"), torch.device("cpu")).eval()
    decoder = StaticCacheDecoder(model, max_cache_len=96, compiled=False)
    prompt = torch.randint(3, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    length = prompt.shape[1]
    bucket = -(-length // decoder.PREFILL_BUCKET) * decoder.PREFILL_BUCKET
    assert bucket > length  # the case where padding is there at all
    settings = GenerationSettings(max_new_tokens=12)
    expected = generate_timed(model, prompt, settings, static_decoder=decoder).new_tokens

    def padded_prefill(input_ids):
        decoder.cache.reset()
        padded = torch.cat([input_ids, torch.full((1, bucket - length), 7)], dim=1)
        return decoder._padded_forward(padded, torch.arange(bucket), torch.tensor([length - 1]))

    decoder.prefill = padded_prefill
    assert generate_timed(model, prompt, settings, static_decoder=decoder).new_tokens == expected
    assert len(set(expected)) > 3


def test_a_model_built_to_decode_leaves_out_liger_and_compiled_layers(monkeypatch):
    """Liger's RMSNorm splits a compiled decode step's CUDA graph at every norm (31-35 tok/s on an H200
    against 186 without): under `kernels: auto`, a model built to decode with it leaves Liger out."""
    from types import SimpleNamespace

    from lightning_modules import MistralModule
    from lightning_modules.execution_plan import Platform, resolve_plan
    from lightning_modules.generation import GenerationSettings

    gpu = Platform(device="cuda", capability=(9, 0), liger=True, triton=True)

    def kernels(configured: str, decoder: str) -> str:
        spec = ModelSpec(source="tiny", kernels=configured)
        return resolve_plan(spec, "predict", gpu, decoder=decoder).kernels

    assert kernels("auto", "static-compiled") == "off"
    assert kernels("auto", "dynamic") == "liger"  # the eager loop keeps the fused kernels
    assert kernels("liger", "static-compiled") == "liger"  # asked for by name: kept

    built = []
    monkeypatch.setattr(Platform, "detect", classmethod(lambda cls, where="cpu": gpu))

    def stand_in_build(self, device):
        built.append((self.plan.kernels, self.plan.compile))
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(MistralModule, "build_model", stand_in_build)
    # and the layers are not compiled for predict (a new shape every token), only for fit
    for fn, expected in (("predict", ("off", "off")), ("fit", ("off", "layers-cudagraphs"))):
        module = MistralModule(
            source="tiny",
            kernels="auto",
            compile="layers-cudagraphs",
            generation=GenerationSettings(decoder="static-compiled"),
        )
        module._trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), strategy=SimpleNamespace(root_device="cpu"))
        module.configure_model()
        assert built.pop() == expected
        assert module.spec.kernels == "auto" and module.spec.compile == "layers-cudagraphs"  # the spec as saved


def test_grouped_decode_attention_gives_transformers_sdpa_output_without_copying_the_cache(monkeypatch):
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lightning_modules.generation import grouped_sdpa_attention
    from lightning_modules.matvec_kernels import DecodeRouting

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 8, 1, 16, generator=generator)
    key, value = torch.randn(2, 1, 2, 24, 16, generator=generator)
    mask = torch.arange(24).view(1, 1, 1, 24) <= 13  # a static cache filled up to position 13
    routing = DecodeRouting()
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False, _smarter_decode_routing=routing)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    shapes = []
    library_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return library_sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with routing.switched_on():
        got, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (1, 1, 8, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert shapes == [((1, 2, 4, 16), (1, 2, 24, 16))]  # four queries per key/value head, the cache as it is
    import transformers.integrations.sdpa_attention as library

    calls = []
    monkeypatch.setattr(library, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(args) or ("lib", None))
    assert grouped_sdpa_attention(module, query, key, value, mask, scaling=0.25)[0] == "lib"  # outside: transformers'
    with routing.switched_on():  # two query tokens (a prompt): transformers' too
        assert grouped_sdpa_attention(module, query.expand(1, 8, 2, 16), key, value, None)[0] == "lib"
    assert len(calls) == 2
