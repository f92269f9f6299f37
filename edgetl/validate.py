"""`edgetl validate`: run a bundle's training step in torch on a desktop device (CUDA, or CPU)
and check it against the on-device runtime.

    edgetl validate BUNDLE --data FILE.npz --device cuda [--epochs N] [--steps K] --json

The bundle's manifest names the model, recipe, classes, input, frozen dtype and optimizer; the
same model is prepared again on the host and the bundle's own initial state (its state file) is loaded
into the torch lean step (`LeanStep`), so both sides start from identical numbers. Then:

1. training: `epochs` passes over x_train in the runtime's order (`fit`'s shuffling,
   `np.random.default_rng(seed + epoch).permutation`, full batches, constant lr), timed per
   epoch, then train and test accuracy;
2. parity: the first `steps` steps in torch on the device and in the runtime on CPU
   (`edgetl.runtime.Trainer`, the bundle's own program) with identical batches: after each step
   taken from the same state, every trainable tensor must agree within `tolerance` (max abs
   difference relative to the tensor's largest magnitude). The drift of a free-running torch run
   over the K steps is reported too (see `_parity`).

TF32 is switched off while validating, so CUDA convolutions and matmuls run in true fp32.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import EdgeTLError

TOLERANCE = 1e-4
_OPT_FIELDS = ("name", "lr", "momentum", "weight_decay", "beta1", "beta2", "eps")


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (b the reference), with a floor so all-zero tensors compare absolutely."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def resolve_device(device: str) -> tuple[torch.device, str | None]:
    """The torch device to run on, and a note when CUDA was asked for but is not available."""
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise EdgeTLError(f"--device must be cuda, cuda:N or cpu, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu"), "CUDA is not available on this machine (torch " + torch.__version__ + \
            "); validated on CPU instead"
    return torch.device(device), None


def _optimizer(manifest: dict):
    from .optim import OptimizerConfig

    o = manifest["optimizer"]
    return OptimizerConfig(**{k: o[k] for k in _OPT_FIELDS if k in o})


def _load_data(data, shape) -> dict[str, np.ndarray]:
    """An .npz as `edgetl data` writes it, or a built-in dataset's name (prepared for the bundle's input)."""
    from .datasets import available_datasets, load_dataset
    from .runtime.data import load_npz

    if not Path(data).is_file() and str(data) in available_datasets():
        ds = load_dataset(str(data), input_size=shape[1], channels=shape[0])
        return {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}
    return load_npz(data)


def _accuracy(evaluator, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], chunk: int = 256) -> float:
    with torch.no_grad():
        correct = sum(int((evaluator(x[i : i + chunk], *params).argmax(1) == y[i : i + chunk]).sum())
                      for i in range(0, len(x), chunk))
    return correct / len(x)


def _parity(b, step, images, ys, x_dev, y_dev, steps, seed, lr, params0, state0, dev, tolerance) -> dict:
    """Run the first `steps` batches of a fit with `seed` through the runtime (on CPU, given the
    `images` in [0, 1]) and through the torch step (on `dev`, given them normalised).

    Checked, step by step: torch's update from the runtime's state before each step must give the
    runtime's state after it, within `tolerance`. Reported too: the drift of a free-running torch
    run over all the steps. The drift is not checked: on real data (e.g. digits' black background)
    a ReLU or max-pool decision can flip on a last-bit difference of its input between two
    convolution implementations, and SGD with momentum carries such a flip forward."""
    from .runtime import Trainer

    trainer = Trainer.load(b.root)
    batches, epoch = [], 0
    while len(batches) < steps:
        batches += trainer.batches(len(images), seed, epoch)
        epoch += 1
    batches = batches[:steps]
    state_in_runtime = set(b.state_names)
    free_p, free_s = dict(params0), dict(state0)
    per_step, rt_losses, free_losses, sync_losses, rt_ms = [], [], [], [], []
    worst = (0.0, b.trainable[0], 0)
    with torch.no_grad():
        for k, idx in enumerate(batches):
            before = trainer.get_state()
            sync_p = {t: torch.from_numpy(before[t]).to(dev) for t in b.trainable}
            # optimizer state from the runtime where it exposes it (not ort-training's), else torch's own
            sync_s = {n: torch.from_numpy(np.array(before[n])).to(dev) if n in state_in_runtime else v
                      for n, v in free_s.items()}
            ti = torch.from_numpy(idx).to(dev)
            x, y = x_dev[ti], y_dev[ti]
            loss, _, new_p, _, _ = step.run(x, y, lr, sync_p, sync_s)
            sync_losses.append(float(loss))
            loss, _, free_p, free_s, _ = step.run(x, y, lr, free_p, free_s)
            free_losses.append(float(loss))
            rt_loss, ms = trainer.train_step(images[idx], ys[idx], lr=lr)
            rt_losses.append(rt_loss)
            rt_ms.append(ms)
            after = trainer.get_state()
            errs = {t: _rel_err(new_p[t].cpu().numpy(), after[t]) for t in b.trainable}
            t_worst = max(errs, key=errs.get)
            per_step.append(errs[t_worst])
            if errs[t_worst] >= worst[0]:
                worst = (errs[t_worst], t_worst, k + 1)
    final = trainer.get_state()
    drift = {t: _rel_err(free_p[t].cpu().numpy(), final[t]) for t in b.trainable}
    drift_t = max(drift, key=drift.get)
    return {
        "steps": len(batches), "tolerance": tolerance,
        "metric": "max |torch - runtime| / max |runtime| over each trainable tensor, after one step from the "
                  "same state (worst over the steps)",
        "max_rel_err": worst[0], "worst_tensor": worst[1], "worst_step": worst[2], "per_step_rel_err": per_step,
        "loss_max_abs_diff": max(abs(a - r) for a, r in zip(sync_losses, rt_losses)),
        "drift_rel_err": drift[drift_t], "drift_tensor": drift_t,
        "drift_note": "free-running torch vs runtime after all the steps (not checked; flips of ReLU/max-pool "
                      "decisions on last-bit differences compound)",
        "torch_losses": free_losses, "runtime_losses": rt_losses,
        "runtime": f"{b.target} target, {type(trainer.backend).__name__} on CPU",
        "runtime_step_ms_median": float(np.median(rt_ms)),
        "ok": bool(worst[0] <= tolerance),
    }


def _validate(bundle: str | Path, data: str | Path, device: str = "cuda", epochs: int = 1, steps: int = 5,
             seed: int = 0, lr: float | None = None, model: str | None = None, init_seed: int | None = None,
             tolerance: float = TOLERANCE, warn=None) -> dict:
    """Validate `bundle` on `device` with `data` (an .npz of x_train, y_train, x_test, y_test in [0, 1],
    or a built-in dataset's name);
    see the module docstring. `seed` is the shuffling seed (as `fit --seed`); `init_seed` the seed the
    bundle was prepared with (default: the manifest's "seed", else 0), used only to check that the
    host re-prepares the same initial parameters. Returns a JSON-able report; report["ok"] is the
    parity verdict."""
    from .prepared import prepare
    from .runtime import Trainer, load_bundle
    from .runtime.data import check_images, check_labels, normalize
    from .runtime.trainer import epoch_order
    from .step import LeanEval

    if not isinstance(epochs, int) or epochs < 0:
        raise EdgeTLError(f"--epochs must be an integer ≥ 0, got {epochs!r}")
    if not isinstance(steps, int) or steps < 1:
        raise EdgeTLError(f"--steps must be an integer ≥ 1, got {steps!r}")
    if not isinstance(seed, int) or seed < 0:
        raise EdgeTLError(f"--seed must be an integer ≥ 0, got {seed!r}")
    if lr is not None and not lr > 0:
        raise EdgeTLError(f"--lr must be positive, got {lr!r}")
    if not tolerance > 0:
        raise EdgeTLError(f"--tolerance must be positive, got {tolerance!r}")
    dev, note = resolve_device(device)
    if note and warn is not None:
        warn(note)

    b = load_bundle(bundle)
    m = b.manifest
    for key in ("model", "recipe", "frozen_dtype"):
        if key not in m:
            raise EdgeTLError(f"the bundle's manifest lacks '{key}'; re-export it with this edgetl")
    init_seed = int(m.get("seed", 0) if init_seed is None else init_seed)
    opt = _optimizer(m)
    lr = float(opt.lr if lr is None else lr)

    # ---- the same prepared model on the host, started from the bundle's own initial state ----
    pm = prepare(model or m["model"], m["recipe"], b.num_classes, None, m["frozen_dtype"], init_seed,
                 input_shape=tuple(b.input_shape), head=m.get("head") or None)
    if pm.trainable != b.trainable:
        raise EdgeTLError(f"re-preparing {m['model']} with recipe {m['recipe']} gives other trainable tensors than "
                          f"the bundle has; was it exported from another model (pass --model)?")
    if pm.input_shape != tuple(b.input_shape):
        raise EdgeTLError(f"re-prepared input {'×'.join(map(str, pm.input_shape))} does not match the bundle's "
                          f"{'×'.join(map(str, b.input_shape))}")
    init = b.initial_state()
    host0 = pm.initial_params()
    init_diff = max(float(np.abs(host0[t].numpy() - init[t]).max()) for t in b.trainable)
    step = pm.step_module(opt).to(dev)
    params0 = {t: torch.from_numpy(np.array(init[t])).to(dev) for t in b.trainable}
    state0 = {k: v.to(dev) for k, v in step.init_state(params0).items()}
    for k in b.state_names:  # the bundle's optimizer state, where the bundle carries it
        state0[k] = torch.from_numpy(np.array(init[k])).to(dev)

    # ---- data, normalised exactly as the runtime does it ----
    arrays = _load_data(data, b.input_shape)
    xs = normalize(check_images(arrays["x_train"], b.input_shape, "x_train"), m)
    ys = check_labels(arrays["y_train"], len(xs), b.num_classes, "y_train")
    xt = normalize(check_images(arrays["x_test"], b.input_shape, "x_test"), m)
    yt = check_labels(arrays["y_test"], len(xt), b.num_classes, "y_test")
    bs = b.batch_size
    if len(xs) < bs:
        raise EdgeTLError(f"the bundle trains on batches of {bs}, but x_train has only {len(xs)} samples")
    per_epoch = len(xs) // bs
    x_dev, y_dev = torch.from_numpy(xs).to(dev), torch.from_numpy(ys).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ---- parity: the first `steps` steps, torch on the device vs the runtime on CPU ----
    parity = _parity(b, step, arrays["x_train"], ys, x_dev, y_dev, steps, seed, lr, params0, state0, dev, tolerance)

    # ---- training on the device: `epochs` passes in fit's order ----
    p, s = dict(params0), dict(state0)
    epoch_s, losses = [], []
    sync()
    with torch.no_grad():
        for epoch in range(epochs):
            order = torch.from_numpy(epoch_order(len(xs), seed, epoch)).to(dev)
            t0 = time.perf_counter()
            for i in range(per_epoch):
                idx = order[i * bs : (i + 1) * bs]
                loss, _, p, s, _ = step.run(x_dev[idx], y_dev[idx], lr, p, s)
            sync()
            epoch_s.append(time.perf_counter() - t0)
            losses.append(float(loss))
            if not np.isfinite(losses[-1]):
                raise EdgeTLError(f"training diverged in epoch {epoch + 1} (loss {losses[-1]}); try a lower --lr")
    evaluator = LeanEval(pm).to(dev)
    flat = [p[t] for t in b.trainable]
    report = {
        "bundle": str(b.root), "model": m["model"], "recipe": m["recipe"], "target": b.target,
        "device": str(dev), "device_requested": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cuda_available": torch.cuda.is_available(), "note": note,
        "seed": seed, "init_seed": init_seed, "init_matches_prepare": init_diff == 0.0, "init_max_abs_diff": init_diff,
        "batch_size": bs, "lr": lr, "optimizer": opt.name, "epochs": epochs, "steps_per_epoch": per_epoch,
        "epoch_s": epoch_s, "epoch_s_mean": float(np.mean(epoch_s)) if epoch_s else None,
        "step_ms": 1000 * float(np.mean(epoch_s)) / per_epoch if epoch_s else None,
        "final_loss": losses[-1] if losses else None,
        "train_accuracy": _accuracy(evaluator, x_dev, y_dev, flat),
        "test_accuracy": _accuracy(evaluator, torch.from_numpy(xt).to(dev), torch.from_numpy(yt).to(dev), flat),
        "parity": parity, "ok": parity["ok"],
    }
    return report


def validate(*args, **kwargs) -> dict:
    cuda_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _validate(*args, **kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda_tf32, cudnn_tf32


validate.__doc__ = _validate.__doc__


def format_report(r: dict) -> str:
    p = r["parity"]
    lines = [f"{r['model']} · {r['recipe']} · {r['target']} bundle · validated on {r['device']} "
             f"({r['device_name']})"]
    if r["note"]:
        lines.append(f"  note: {r['note']}")
    if not r["init_matches_prepare"]:
        lines.append(f"  note: prepare(seed={r['init_seed']}) gives other initial parameters than the bundle "
                     f"(max diff {r['init_max_abs_diff']:.3g}); the bundle's own initial state was used")
    if r["epochs"]:
        lines.append(f"  trained {r['epochs']} epoch(s) × {r['steps_per_epoch']} steps, batch {r['batch_size']}, "
                     f"lr {r['lr']:g}: {r['epoch_s_mean']:.2f} s/epoch ({r['step_ms']:.1f} ms/step), "
                     f"final loss {r['final_loss']:.3g}")
    lines.append(f"  accuracy: train {100 * r['train_accuracy']:.1f}%  test {100 * r['test_accuracy']:.1f}%")
    lines.append(f"  parity over {p['steps']} steps vs {p['runtime']}: max rel err {p['max_rel_err']:.2e} "
                 f"({p['worst_tensor']}, step {p['worst_step']}), loss diff {p['loss_max_abs_diff']:.2e}, "
                 f"tolerance {p['tolerance']:g}: {'OK' if p['ok'] else 'FAILED'}")
    lines.append(f"  free-running drift after {p['steps']} steps: {p['drift_rel_err']:.2e} ({p['drift_tensor']}; "
                 f"not checked)")
    return "\n".join(lines)


def main_validate(args) -> int:
    """The `edgetl validate` command (see cli.py); exit 0 if parity holds, 1 if not."""
    import json

    def warn(msg: str) -> None:
        print(f"edgetl validate: warning: {msg}", file=sys.stderr)

    r = validate(args.bundle, args.data, args.device, args.epochs, args.steps, args.seed, args.lr, args.model,
                 args.init_seed, args.tolerance, warn)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["ok"] else 1
