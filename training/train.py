"""Training: logits + cross-entropy, Adam, early stopping on a validation split (never on test),
a progress bar, the GPU when present, and DistributedDataParallel when launched by torchrun.

The result is a checkpoint holding everything export needs: weights, architecture, the input
standardisation fitted on the training split, names, metrics and how it was trained.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training.datasets import Dataset, Standardizer
from training.models import ModelConfig, RecurrentClassifier, build_model

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 15  # epochs without validation improvement before stopping
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    grad_clip: float = 5.0


@dataclass
class TrainResult:
    model: RecurrentClassifier
    standardizer: Standardizer
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Distributed:
    """torchrun's environment, or a single process when not launched that way."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _tensors(ds: Dataset, std: Standardizer) -> TensorDataset:
    return TensorDataset(torch.from_numpy(std.apply(ds.X)), torch.from_numpy(ds.y))


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, data: TensorDataset, device: torch.device, batch: int = 256) -> dict[str, float]:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct, n = 0.0, 0, 0
    for xb, yb in DataLoader(data, batch_size=batch):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        total += loss_fn(logits, yb).item()
        correct += (logits.argmax(1) == yb).sum().item()
        n += len(yb)
    return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}


def train(
    model_config: ModelConfig,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrainConfig | None = None,
    test_ds: Dataset | None = None,
    description: str = "training",
) -> TrainResult:
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ddp = Distributed(pick_device(cfg.device))
    device = ddp.device
    start = time.perf_counter()

    standardizer = Standardizer.fit(train_ds.X)
    train_data, val_data = _tensors(train_ds, standardizer), _tensors(val_ds, standardizer)
    model = build_model(model_config).to(device)
    net: nn.Module = model
    sampler = None
    if ddp.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = DistributedSampler(train_data, shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator
    )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()

    best_state, best_key, best_epoch, stale = copy.deepcopy(model.state_dict()), None, 0, 0
    history: list[dict[str, float]] = []
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, disable=not (cfg.progress and ddp.main)) as progress:
        task = progress.add_task(description, total=cfg.epochs, stats="")
        for epoch in range(1, cfg.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            seen, loss_sum, correct = 0, 0.0, 0
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                logits = net(xb)
                loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                opt.step()
                seen += len(yb)
                loss_sum += loss.item() * len(yb)
                correct += (logits.argmax(1) == yb).sum().item()
            val = evaluate_loss_acc(model, val_data, device)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
            }
            history.append(row)
            # Select on validation accuracy, ties broken by validation loss.
            key = (val["accuracy"], -val["loss"])
            if best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            progress.update(
                task,
                advance=1,
                stats=f"loss {row['train_loss']:.3f} acc {row['train_accuracy']:.3f} "
                f"val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.3f} best@{best_epoch}",
            )
            if cfg.progress and ddp.main and not progress.console.is_terminal:
                # No live bar in logs and CI: one line per epoch instead.
                progress.console.print(f"{description} epoch {epoch}/{cfg.epochs}: " + progress.tasks[task].fields["stats"])
            if stale >= cfg.patience:
                break

    model.load_state_dict(best_state)
    model = model.cpu().eval()
    cpu = torch.device("cpu")
    metrics = {
        "train": evaluate_loss_acc(model, train_data, cpu),
        "validation": evaluate_loss_acc(model, val_data, cpu),
    }
    if test_ds is not None:
        metrics["test"] = evaluate_loss_acc(model, _tensors(test_ds, standardizer), cpu)
    ddp.close()
    return TrainResult(model, standardizer, metrics, history, best_epoch, time.perf_counter() - start)


def save_checkpoint(
    path: str | Path,
    result: TrainResult,
    class_names: list[str],
    feature_names: list[str],
    train_length: int,
    training_info: dict[str, Any],
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": result.model.config.to_dict(),
            "state_dict": result.model.state_dict(),
            "normalization": {"mean": result.standardizer.mean.tolist(), "std": result.standardizer.std.tolist()},
            "class_names": class_names,
            "feature_names": feature_names,
            "train_length": train_length,
            "metrics": result.metrics,
            "training": {**training_info, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2),
                         "epochs_run": len(result.history)},
        },
        path,
    )
    return path


def load_checkpoint(path: str | Path) -> tuple[RecurrentClassifier, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an icaserve checkpoint (format {CHECKPOINT_FORMAT})")
    model = build_model(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def train_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
