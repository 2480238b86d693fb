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

from foundation import IGNORE_INDEX, ConfigError, TrainingDiverged, notify
from lightning_modules.checkpoints import (
    capture_rng_state,
    read_checkpoint,
    record_unfinished_epoch,
    refusal_message,
    restore_rng_state,
    setting_differences,
)
from lightning_modules.execution_plan import ExecutionPlan, Platform, resolve_plan
from lightning_modules.fast_paths import (
    LossPath,
    adapter_autocast,
    chunked_nll_sum,
    fused_nll_sum,
    keep_adapter_inputs_uncast,
    store_adapters_in,
)
from lightning_modules.generation import GenerationSettings, StaticCacheDecoder, check_generation_fits, generate_timed
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
torch.serialization.add_safe_globals(
    [LoraSettings, GenerationSettings, InputRequirements, WarmupCosine, WarmupConstant]
)

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
        loss: How the summed next-token NLL is computed: ``auto`` (on a CUDA GPU ``fused`` with Liger,
            else ``chunked``; on a CPU ``logits``), ``fused`` (Liger's fused linear cross-entropy),
            ``chunked`` (logits a chunk of positions at a time, recomputed in backward), or ``logits``
            (the whole batch's logits, the plain way). All give the same sum; ``fused`` and ``chunked``
            never hold the batch's fp32 logits.
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
        loss: LossPath = "auto",
        generation: GenerationSettings | None = None,
        **model_spec,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not learning_rate > 0:  # NaN too
            raise ConfigError(f"model.learning_rate must be > 0, got {learning_rate}.")
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps must be >= 0, got {warmup_steps}.")
        if not weight_decay >= 0:
            raise ConfigError(f"model.weight_decay must be >= 0, got {weight_decay}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"model.min_lr_ratio must be between 0 and 1, got {min_lr_ratio}.")
        if loss not in ("auto", "fused", "chunked", "logits"):
            raise ConfigError(f"model.loss={loss!r} is not supported; choose auto, fused, chunked or logits.")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"model.betas must be two numbers in [0, 1), got {list(betas)}.")
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
        if isinstance(generation, dict):  # as a checkpoint of a CLI-built module holds it
            generation = GenerationSettings(**generation)
        self.generation = generation or GenerationSettings()
        self.model: torch.nn.Module | None = None
        self._tokenizer: TextTokenizer | None = None
        self.val_metric = TokenNLLMetric()
        self.test_metric = TokenNLLMetric()
        # With adapters, checkpoints hold only what trains: the frozen base is rebuilt from spec.
        self.strict_loading = self.spec.lora is None
        self.static_decoder: StaticCacheDecoder | None = None  # set in on_predict_start
        # what runs (kernels, loss, compiled layers, adapters' dtype, decoder): resolved once, before the model
        # is built (by the CLI's pre-flight checks, or by configure_model), and never changed by the module
        self.plan: ExecutionPlan | None = None
        self._resumed = False  # set by on_load_checkpoint
        self._rng_to_restore: dict[str, Any] | None = None
        self._losses_finite: torch.Tensor | None = None  # on the device, until the optimizer step reads it
        # under the deferred divergence check: the last step's verdict (loss finite, norm finite, norm) on its
        # way to the host, the event after its copy, and the step it belongs to
        self._pending_verdict: tuple[torch.Tensor, torch.cuda.Event | None, str] | None = None

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
            fixed_batch_shape=self.spec.compile != "off",
        )

    def setup(self, stage: str) -> None:
        """Refuse a run that cannot train before any weights load."""
        if stage == "fit":
            self.check_can_fit()

    def check_can_fit(self) -> None:
        """Refuse a configuration that ``fit`` could not train."""
        adapter = self.spec.adapter
        if adapter is not None and self.spec.lora is None:
            raise ConfigError(
                f"model.source {adapter.folder} is a LoRA adapter, which fit trains further only with model.lora "
                f"set to its shape (r {adapter.r}, alpha {adapter.alpha}, target_modules "
                f"{list(adapter.target_modules)}); `-c configs/finetune/lora.yaml` or qlora.yaml does."
            )
        if self.spec.quantization != "none" and self.spec.lora is None:
            raise ConfigError(
                f"model.quantization={self.spec.quantization} freezes the base weights, so fit "
                "would train nothing; set model.lora (QLoRA) or model.quantization: none."
            )

    def resolve_plan(self, stage: str, where: Any) -> ExecutionPlan:
        """Resolve and keep this run's ``ExecutionPlan`` for ``stage`` on ``where`` (a Lightning strategy or a
        device); raises the ``ConfigError`` of a combination that cannot run there."""
        self.plan = self._plan_for(stage, where)
        return self.plan

    def _plan_for(self, stage: str, where: Any) -> ExecutionPlan:
        platform = where if isinstance(where, Platform) else Platform.detect(where)
        generation = self.generation
        hp = self.hparams
        return resolve_plan(
            self.spec,
            stage,
            platform,
            loss=hp.loss,
            decoder=generation.decoder,
            matvec=generation.matvec,
            optimizer=hp.optimizer,
        )

    @property
    def adapter_dtype(self) -> torch.dtype | None:
        """The 16-bit dtype adapters multiply in under autocast, or None (float32 adapters, none, or no plan)."""
        return self.plan.adapter_dtype if self.plan is not None else None

    def configure_model(self) -> None:
        """Load the model once, straight onto the strategy's device, as this run's plan says."""
        if self.model is not None:
            return
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else self.device
        stage = str(getattr(trainer.state.fn, "value", trainer.state.fn)) if trainer is not None else "validate"
        if self.plan is None or self.plan.stage != stage:
            self.resolve_plan(stage, trainer.strategy if trainer is not None else device)
        self.model = self.build_model(device)
        self.model.train()  # from_pretrained returns eval mode; Lightning's loops switch for eval
        if self.adapter_dtype is not None:
            keep_adapter_inputs_uncast(self.model)
        if self.plan.adapters_stored_in is not None:  # decoding runs without autocast: the dtype autocast gives
            store_adapters_in(self.model, getattr(torch, self.plan.adapters_stored_in))

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """The Hugging Face model for ``self.spec`` on ``device``, built as ``self.plan`` says (resolved for
        evaluation on ``device`` when unset). Override to change the model itself."""
        if self.plan is None:
            self.resolve_plan("validate", device)
        return load_causal_lm(self.spec, device, self.plan)

    # ---- loss ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(batch, seq, vocab)``. ``position_ids`` that restart at 0 mark where a packed
        document starts: attention then stays inside each document."""
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def _loss_path(self) -> str:
        return self.plan.loss if self.plan is not None else "logits"

    def _causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL (nats, fp32) of the scored targets of ``batch`` and their number."""
        with adapter_autocast(self.device, self.adapter_dtype):
            nll_sum = self._nll_sum(batch["input_ids"], batch["labels"], batch.get("position_ids"))
        return nll_sum, (batch["labels"] != IGNORE_INDEX).sum()

    def _nll_sum(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed NLL of ``labels`` (``(batch, seq)``, already shifted) by the configured loss path."""
        path = self._loss_path()
        if path == "logits":
            logits = self(input_ids, position_ids)  # (batch, seq, vocab)
            return F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        causal_lm = self._causal_lm()
        hidden = causal_lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        weight = causal_lm.lm_head.weight  # (vocab, hidden)
        rows = hidden.flatten(0, 1)  # (b*s, h)
        if path == "fused" and torch.is_grad_enabled():  # it computes gradients as it goes: training only
            return fused_nll_sum(rows, weight, labels.flatten())
        return chunked_nll_sum(rows, weight, labels.flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, tokens = self.token_nll(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # DDP averages gradients over processes: scaling by world / (every process's tokens) makes the
            # step the mean NLL over all tokens of the global batch, however they split across processes.
            # One all-reduce carries the token count and the logged loss, queued on the device's stream
            # (Lightning's reduce and sync_dist each add a barrier that blocks the host).
            totals = torch.stack([tokens.float(), nll_sum.detach().float()])  # (2,)
            torch.distributed.all_reduce(totals)
            all_tokens = totals[0].clamp_min(1)
            loss = nll_sum * world / all_tokens
            logged = totals[1] / all_tokens  # the global batch's mean NLL per token
        else:
            loss = nll_sum / tokens.clamp_min(1)
            logged = loss.detach()
        # read once at the optimizer step (one host sync a step): a non-finite loss stops the run there,
        # before the weights change and before any checkpoint of this step
        finite = torch.isfinite(loss.detach())
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        self.log("train/loss", logged, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _gradients_are_sharded(self) -> bool:
        """Under FSDP each process holds a shard of every gradient, so norms need a sum over processes."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm of what trains, and stop the run before a non-finite loss or gradient
        norm reaches the weights: by reading the step's verdict before the update (one host sync for both), or,
        under the plan's deferred check, by having the fused AdamW skip the step on the GPU and reading the
        verdict at the next step, before a checkpoint, or at the end of training."""
        losses_finite, self._losses_finite = self._losses_finite, None
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        sharded = self._gradients_are_sharded()
        norm = None
        if grads or sharded:
            # under FSDP a process may hold no shard of any gradient; it still takes part in the sum
            if grads:  # one launch for every tensor's norm, in fp32 whatever the gradients' dtype (private: the
                # public torch.nn.utils.get_total_norm takes no dtype; tests/test_private_apis.py checks this one)
                squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
            else:
                squares = torch.zeros((), device=self.device)
            if sharded:
                squares = self.trainer.strategy.reduce(squares, reduce_op="sum")
            norm = squares.sqrt()
        fine = torch.ones((), dtype=torch.bool, device=self.device)  # for a check with nothing to look at
        checks = [fine if losses_finite is None else losses_finite, fine if norm is None else torch.isfinite(norm)]
        step = f"at step {self.global_step + 1} (epoch {self.current_epoch})"
        shown_norm = torch.zeros((), device=self.device) if norm is None else norm.detach().float()
        verdict = torch.stack([checks[0].float(), checks[1].float(), shown_norm])
        if self.plan is not None and self.plan.divergence_check == "deferred":
            # the previous step's verdict has long been computed: reading it now does not wait for the GPU
            self.raise_if_diverged()
            # private-ish: the fused AdamW skips its update where ``found_inf`` is nonzero (torch's GradScaler
            # hands it over the same way; there is no public argument). tests/test_private_apis.py checks it.
            optimizer.found_inf = 1.0 - verdict[0] * verdict[1]
            on_host = torch.empty(3, pin_memory=self.device.type == "cuda")
            on_host.copy_(verdict, non_blocking=True)
            copied = None
            if self.device.type == "cuda":
                copied = torch.cuda.Event()
                copied.record()
            self._pending_verdict = (on_host, copied, step)
        else:
            self._raise_on_verdict(verdict.tolist(), step)  # one host sync a step
        if norm is not None:
            self.log("train/grad_norm", norm, batch_size=1)

    def _raise_on_verdict(self, verdict: list[float], step: str) -> None:
        loss_ok, norm_ok, norm = verdict
        advice = "Lower model.learning_rate or set trainer.gradient_clip_val, then resume from the last checkpoint."
        if not loss_ok:
            raise TrainingDiverged(
                f"training diverged: train/loss is not finite {step}; the weights were not updated with it and "
                f"no checkpoint was written from it. {advice}"
            )
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None and not norm_ok:  # with a grad scaler, an inf step is skipped, not fatal
            raise TrainingDiverged(
                f"training diverged: the gradient norm is {norm} {step}; the weights were not updated with it. {advice}"
            )

    def raise_if_diverged(self) -> None:
        """Under the deferred divergence check: stop the run if the last optimizer step's loss or gradient norm
        was not finite (that step's update was skipped on the GPU). Waits for that step's verdict only."""
        if self._pending_verdict is None:
            return
        on_host, copied, step = self._pending_verdict
        self._pending_verdict = None
        if copied is not None:
            copied.synchronize()
        self._raise_on_verdict(on_host.tolist(), step)

    def on_train_end(self) -> None:
        self.raise_if_diverged()  # the last step's verdict, before fit returns and the run exports

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as configured; by norm under FSDP, with FSDP's own clipping over every process's shards
        (Lightning's FSDP precision plugin refuses to clip by norm)."""
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and self._gradients_are_sharded():
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
        """Pick the decoder and warm it up untimed on the real shapes (the longest prompt, the configured
        number of new tokens), so the first prompt is timed like the rest."""
        loaders = self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        # the prompts themselves (iterating the loader here would consume the loop's own pass over it)
        prompts = [item["input_ids"] for loader in loaders for item in loader.dataset]
        longest = max(prompts, key=len)[None].to(self.device)  # (1, prompt_len)
        plan = self.plan
        if plan is None or plan.stage != "predict":  # built for another stage in this process: decode as predict
            plan = self._plan_for("predict", self.device)
        self.static_decoder = None
        if plan.decoder != "dynamic":
            cache_len = -(-(longest.shape[1] + self.generation.max_new_tokens) // 128) * 128
            cache_len = min(cache_len, self.max_positions)
            self.static_decoder = StaticCacheDecoder(
                self.model,
                cache_len,
                compiled=plan.decoder == "static-compiled",
                triton_matvec=plan.matvec == "triton",
            )
        for _ in range(self.generation.warmup):
            generate_timed(self.model, longest, self.generation, static_decoder=self.static_decoder)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generate a completion for one prompt and report its timings."""
        input_ids = batch["input_ids"]  # (1, prompt_len)
        check_generation_fits(input_ids.shape[1], self.generation.max_new_tokens, self.max_positions)
        result = generate_timed(
            self.model,
            input_ids,
            self.generation,
            eos_id=self.tokenizer.eos_id,
            sample_seed=self.generation.seed + batch_idx,
            static_decoder=self.static_decoder,
        )
        return {
            "index": int(batch.get("index", batch_idx)),
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
            **({"reference": batch["reference"]} if "reference" in batch else {}),
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
            if self.plan is not None and self.plan.optimizer_kernel == "fused":
                kwargs["fused"] = True
            optimizer = torch.optim.AdamW(params, **kwargs)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if hp.optimizer == "adamw-8bit" else bnb.optim.PagedAdamW8bit
            optimizer = cls(params, **kwargs)
        # The run's length is set in on_train_start: asking Lightning for it here would build the train
        # loader before a checkpoint's loader state is registered, and a mid-epoch resume would then
        # restart the epoch (Lightning 2.6).
        if hp.schedule == "cosine":
            multiplier = WarmupCosine(hp.warmup_steps, total_steps=1, min_ratio=hp.min_lr_ratio)
        else:
            multiplier = WarmupConstant(hp.warmup_steps)
        scheduler = LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints and resuming --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what a resume needs: the weights that train (with adapters, only those; the frozen base
        rebuilds from the spec) and the random generators. Never writes non-finite weights, nor a checkpoint
        after a step that diverged."""
        self.raise_if_diverged()
        if self.spec.lora is not None:
            trainable = {f"model.{plain_name(n)}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if plain_name(k) in trainable}
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingDiverged(
                f"refusing to write a checkpoint with non-finite weights ({bad[0]} and {len(bad) - 1} more) "
                f"at step {self.global_step}; the last checkpoint on disk is the last good one."
            )
        checkpoint["rng_states"] = capture_rng_state()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            record_unfinished_epoch(checkpoint, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume this run as configured: refuse a checkpoint of another model, say which settings differ
        (the configured ones are used), keep this run's own schedule length, and restore the random
        generators just before the first resumed batch."""
        refusals, notes = setting_differences(dict(self.hparams), checkpoint.get("hyper_parameters") or {})
        if refusals:
            raise ConfigError(refusal_message("being loaded", refusals))
        for note in notes:
            notify(f"{note}; using the configured value.")
        for scheduler_state in checkpoint.get("lr_schedulers", []):
            if "lr_lambdas" in scheduler_state:  # the schedule's length comes from this run, not the checkpoint
                scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
        self._rng_to_restore = checkpoint.get("rng_states")
        self._resumed = True

    def _gradients_from_cuda_graphs(self) -> bool:
        """Whether the adapters' gradients come out of replayed CUDA graphs: the plan keeps them, zeroed in place."""
        return self.plan is not None and self.plan.gradients_zeroed_in_place

    def on_validation_model_zero_grad(self) -> None:
        """Lightning drops every gradient before a validation inside ``fit``; gradients that come out of CUDA
        graphs are zeroed in place instead, so that after the validation each weight still holds its own
        gradient tensor (see ``on_train_start``). Dropped, the next backward made the graph's output tensor
        the gradient, and the layer's next replay overwrote it: ``qlora-fast`` failed at the first step
        after its mid-epoch validation with "accessing tensor output of CUDAGraphs that has been
        overwritten"."""
        if self._gradients_from_cuda_graphs():
            for parameter in self.trainable_parameters():
                if parameter.grad is not None:
                    parameter.grad.zero_()
            return
        super().on_validation_model_zero_grad()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are zeroed in place, not dropped, when they come out of CUDA graphs (see
        ``on_train_start``)."""
        optimizer.zero_grad(set_to_none=not self._gradients_from_cuda_graphs())

    def on_train_start(self) -> None:
        """Size the schedule to this run's length; after a resume, the configured optimizer settings
        (not the checkpoint's) apply from the next step on.

        With CUDA-graph layers every trainable weight gets its gradient tensor here, zeroed in place
        after each optimizer step: a weight without one would take the graph's output tensor itself as
        its gradient (autograd keeps the first gradient it is given), which the layer's next replay
        overwrites, so a second batch before the optimizer step (gradient accumulation) failed with
        "accessing tensor output of CUDAGraphs that has been overwritten"."""
        if self._gradients_from_cuda_graphs():
            for parameter in self.trainable_parameters():
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        if not self.trainer.optimizers:
            return
        hp = self.hparams
        optimizer = self.trainer.optimizers[0]
        if self.plan is not None and self.plan.optimizer_kernel == "fused" and isinstance(optimizer, torch.optim.AdamW):
            # a checkpoint of a run with another AdamW kernel brings its groups' settings and CPU step counts
            for group in optimizer.param_groups:
                group.update(fused=True, foreach=None)
                for parameter in group["params"]:
                    state = optimizer.state.get(parameter, {})
                    if "step" in state:
                        state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=parameter.device)
        resumed = self._resumed
        if resumed:
            for group in optimizer.param_groups:
                group.update(initial_lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                for multiplier in scheduler.lr_lambdas:
                    if hasattr(multiplier, "total_steps"):
                        multiplier.total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
                if resumed:
                    scheduler.base_lrs = [hp.learning_rate] * len(optimizer.param_groups)
                for group, multiplier, base in zip(
                    optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
                ):
                    group["lr"] = base * multiplier(scheduler.last_epoch)
                # private: LRScheduler has no public setter for what get_last_lr() returns after the rates are
                # set by hand (tests/test_private_apis.py fails if that changes)
                scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing put in its path."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def load_trained(path: str, device: torch.device | str = "cpu", what: str = "ckpt_path") -> MistralModule:
    """The module a checkpoint was trained as (its class and settings), with its trained weights, on ``device``.

    Raises:
        ConfigError: when the file is not a readable checkpoint of this framework, or its weights do
            not fit the model its settings describe.
    """
    import importlib

    checkpoint = read_checkpoint(path, what)
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.pop("_class_path", "lightning_modules.MistralModule")
    hparams.pop("_instantiator", None)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{path} was trained with {class_path}, which cannot be imported here.") from None
    if not (isinstance(cls, type) and issubclass(cls, MistralModule)):
        raise ConfigError(f"{path} was trained with {class_path}, which is not a MistralModule.")
    module = cls(**hparams)
    module.model = module.build_model(torch.device(device))
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = sorted(trainable & set(result.missing_keys)) if module.spec.lora else sorted(result.missing_keys)
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{path} does not hold the weights its settings describe (missing {missing[:2]}, unexpected "
            f"{result.unexpected_keys[:2]}); the file was altered or written by another model."
        )
    module.model.eval()
    return module
