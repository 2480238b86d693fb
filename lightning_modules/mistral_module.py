"""The LightningModule: a configurable Mistral with next-token loss, exact perplexity and AdamW.

Building the model lives in ``model_building``; this class owns the loss, the metrics, the
optimizer and the hooks. Subclass it to change any of them (see the README).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from foundation import IGNORE_INDEX, ConfigError
from lightning_modules.generation import GenerationSettings, generate_timed
from lightning_modules.metrics import TokenNLLMetric
from lightning_modules.model_building import (
    InputRequirements,
    LoraSettings,
    ModelSpec,
    load_causal_lm,
    validate_model_spec,
)
from lightning_modules.schedules import WarmupConstant, WarmupCosine
from lightning_modules.tokenizers import TextTokenizer, load_tokenizer

# Checkpoints hold these (hyperparameters, scheduler state); resuming loads with weights_only=True.
torch.serialization.add_safe_globals([LoraSettings, GenerationSettings, WarmupCosine, WarmupConstant])

Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw-8bit"]
Schedule = Literal["cosine", "constant"]


class MistralModule(L.LightningModule):
    """A Mistral causal LM (preset or checkpoint; quantized or not; eager or SDPA; LoRA or not).

    Which model is built is a ``ModelSpec``: its fields (``source``, ``quantization``, ``attention``,
    ``dtype``, ``lora``...) are this module's arguments too, declared once, on ``ModelSpec``.

    Args:
        optimizer: ``adamw`` (torch), or bitsandbytes ``adamw-8bit`` / ``paged-adamw-8bit``.
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps.
        schedule: After warm-up: ``cosine`` decay to ``min_lr_ratio`` or ``constant``.
        min_lr_ratio: Final learning rate over peak, for the cosine schedule.
        generation: How ``predict`` decodes (new tokens, greedy or sampled, warm-up).
        **model_spec: The ``ModelSpec`` fields.
    """

    def __init__(
        self,
        optimizer: Optimizer = "adamw",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        generation: GenerationSettings | None = None,
        **model_spec,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate must be > 0, got {learning_rate}.")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps must be >= 0, got {warmup_steps}.")
        if optimizer not in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
            raise ConfigError(
                f"model.optimizer={optimizer!r} is not supported; choose adamw, adamw-8bit or paged-adamw-8bit."
            )
        unknown = sorted(set(model_spec) - {f.name for f in dataclasses.fields(ModelSpec)})
        if unknown:
            raise ConfigError(f"MistralModule got unknown arguments {unknown}; see `smarter fit --model.help`.")
        self.spec = ModelSpec(**model_spec)
        # Every check that needs no weights happens here, before anything loads.
        self.model_config = validate_model_spec(self.spec)
        self.generation = generation or GenerationSettings()
        self.model: torch.nn.Module | None = None
        self._tokenizer: TextTokenizer | None = None
        self.val_metric = TokenNLLMetric()
        self.test_metric = TokenNLLMetric()
        # With adapters, checkpoints hold only what trains: the frozen base is rebuilt from spec.
        self.strict_loading = self.spec.lora is None

    # ---- building ------------------------------------------------------------------------
    @property
    def tokenizer_source(self) -> str:
        """The tokenizer matching the weights: the checkpoint's own, or Mistral v1 for presets."""
        return self.spec.tokenizer_source

    @property
    def max_positions(self) -> int:
        return int(self.model_config.max_position_embeddings)

    @property
    def input_requirements(self) -> InputRequirements:
        """What the data must agree with; the CLI passes it to the DataModule."""
        return InputRequirements(
            tokenizer=self.tokenizer_source,
            max_positions=self.max_positions,
            vocab_size=int(self.model_config.vocab_size),
        )

    def setup(self, stage: str) -> None:
        """Refuse a run that cannot train before any weights load."""
        if stage == "fit" and self.spec.quantization != "none" and self.spec.lora is None:
            raise ConfigError(
                f"model.quantization={self.spec.quantization} freezes the base weights, so fit "
                "would train nothing; set model.lora (QLoRA) or model.quantization: none."
            )

    def configure_model(self) -> None:
        """Load the model once, straight onto the strategy's device."""
        if self.model is not None:
            return
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        self.model = self.build_model(device)
        self.model.train()  # from_pretrained returns eval mode; Lightning's loops switch for eval

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The Hugging Face model for ``self.spec`` on ``device``. Override to change the model itself."""
        return load_causal_lm(self.spec, device)

    # ---- loss ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(batch, seq, vocab)``."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (nats, fp32) of the scored targets of ``batch`` and their number."""
        logits = self(batch["input_ids"])  # (batch, seq, vocab)
        labels = batch["labels"]  # (batch, seq), already shifted; -100 = not scored
        nll_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll_sum, (labels != IGNORE_INDEX).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, tokens = self.token_nll(batch)
        loss = nll_sum / tokens.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: TokenNLLMetric) -> None:
        nll_sum, tokens = self.token_nll(batch)
        scored_bytes = batch.get("scored_bytes", torch.zeros(1, dtype=torch.long)).sum()
        metric.update(nll_sum, tokens, scored_bytes)

    def _log_split(self, split: str, metric: TokenNLLMetric) -> None:
        values = metric.compute()
        metric.reset()
        self.log_dict(
            {f"{split}/{name}": value.float() for name, value in values.items()},
            prog_bar=split == "val",
            # the metric already summed across processes, so every rank holds the same value;
            # averaging identical values is exact and keeps Lightning's distributed checks quiet
            sync_dist=True,
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val", self.val_metric)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric)

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_metric)

    # ---- predict ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer matching the weights (decodes what ``predict`` generates)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    def on_predict_start(self) -> None:
        """Untimed warm-up generations, so the first prompt's timings are not cold-start ones."""
        warm_prompt = torch.tensor([[self.tokenizer.bos_id, *self.tokenizer.encode("[INST] Hello [/INST]")]])
        warm_settings = GenerationSettings(max_new_tokens=min(8, self.generation.max_new_tokens))
        for _ in range(self.generation.warmup):
            generate_timed(self.model, warm_prompt.to(self.device), warm_settings)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate a completion for one prompt and report its timings."""
        input_ids = batch["input_ids"]  # (1, prompt_len)
        result = generate_timed(
            self.model,
            input_ids,
            self.generation,
            eos_id=self.tokenizer.eos_id,
            sample_seed=self.generation.seed + batch_idx,
        )
        return {
            "prompt": batch["prompt"],
            "completion": self.tokenizer.decode(result.new_tokens),
            "prompt_tokens": int(input_ids.shape[1]),
            "new_tokens": len(result.new_tokens),
            "ttft_ms": 1000 * result.ttft_s,
            "decode_tokens_per_s": result.decode_tokens_per_s,
            "total_latency_ms": 1000 * result.total_s,
            # read by the throughput callback
            "generated_tokens": len(result.new_tokens),
            "samples": 1,
            "seq_len": int(input_ids.shape[1]) + len(result.new_tokens),
        }

    # ---- optimization --------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if not params:
            raise ConfigError("No parameter requires grad: set model.lora or model.quantization: none.")
        hp = self.hparams
        kwargs = {"lr": hp.learning_rate, "weight_decay": hp.weight_decay, "betas": tuple(hp.betas)}
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, **kwargs)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if hp.optimizer == "adamw-8bit" else bnb.optim.PagedAdamW8bit
            optimizer = cls(params, **kwargs)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        if hp.schedule == "cosine":
            multiplier = WarmupCosine(hp.warmup_steps, total_steps, hp.min_lr_ratio)
        else:
            multiplier = WarmupConstant(hp.warmup_steps)
        scheduler = LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With adapters, keep only trainable weights; the frozen base rebuilds from the spec."""
        if self.spec.lora is None:
            return
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in trainable}
