"""The private Lightning and torch APIs this framework still uses, each where no public one does the job: these
tests fail when their behaviour changes under a new release, before a run does."""

from __future__ import annotations

import inspect

import lightning as L
import torch


def test_a_schedulers_last_rate_set_by_hand_is_what_get_last_lr_returns():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    scheduler._last_lr = [0.25]
    assert scheduler.get_last_lr() == [0.25]


def test_lightnings_logger_connector_still_flushes_a_steps_metrics():
    connector = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)._logger_connector
    for name in ("on_batch_end", "update_train_step_metrics"):
        method = getattr(connector, name)
        assert callable(method) and not [
            p for p in inspect.signature(method).parameters.values() if p.default is inspect.Parameter.empty
        ], name


def test_the_foreach_operations_keep_their_meaning():
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    assert [float(n) for n in norms] == [5.0, 10.0]
    targets = [torch.zeros(2), torch.zeros(2)]
    torch._foreach_copy_(targets, tensors)
    assert all(torch.equal(a, b) for a, b in zip(targets, tensors, strict=True))


def test_dynamos_ddp_optimizer_switch_is_still_there():
    import torch._dynamo

    assert isinstance(torch._dynamo.config.optimize_ddp, bool | str)


def test_the_fused_adamw_still_skips_a_step_where_found_inf_is_set():
    """The deferred divergence check hands the fused AdamW a ``found_inf`` tensor, as torch's GradScaler does:
    nonzero leaves weights, moments and step counts as they were; zero updates as the unfused AdamW does."""
    torch.manual_seed(0)
    fused = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    optimizers = torch.optim.AdamW(fused, lr=0.1, fused=True), torch.optim.AdamW(plain, lr=0.1)
    for _ in range(2):
        gradients = [torch.randn(4, 3) for _ in fused]
        for a, b, g in zip(fused, plain, gradients, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        optimizers[0].found_inf = torch.zeros(())
        for optimizer in optimizers:
            optimizer.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fused, plain, strict=True))
    weights = [p.detach().clone() for p in fused]
    moments = [optimizers[0].state[p]["exp_avg"].clone() for p in fused]
    for p in fused:
        p.grad = torch.full_like(p, float("nan"))
    optimizers[0].found_inf = torch.ones(())
    optimizers[0].step()
    assert all(torch.equal(p, w) for p, w in zip(fused, weights, strict=True))
    assert all(torch.equal(optimizers[0].state[p]["exp_avg"], m) for p, m in zip(fused, moments, strict=True))
    assert all(float(optimizers[0].state[p]["step"]) == 2.0 for p in fused)
