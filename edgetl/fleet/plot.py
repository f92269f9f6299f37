"""`fleet simulate --plot`: test accuracy per round beside centralised `fit` on all the data,
one centralised point per `local-epochs` epochs (the same passes over the data as a round)."""
from __future__ import annotations

from pathlib import Path

from ..errors import EdgeTLError
from ..runtime.data import load_npz
from ..runtime.trainer import Trainer


def check_plot(path: str) -> Path:
    if Path(path).is_dir():
        raise EdgeTLError(f"--plot '{path}' is a directory; give a file name, e.g. '{Path(path) / 'fleet.png'}'")
    return Path(path)


def centralised_curve(bundle: str, data: str, rounds: int, local_epochs: int, lr: float | None, seed: int) -> list[float]:
    d = load_npz(data)
    t = Trainer.load(bundle)
    accs = []
    for r in range(rounds):
        t.fit(d["x_train"], d["y_train"], epochs=local_epochs, lr=lr, seed=seed + r + 1)
        accs.append(t.evaluate(d["x_test"], d["y_test"])["accuracy"])
    return accs


def plot_rounds(args, out: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_plot(args.plot)
    central = centralised_curve(args.bundle, args.data, args.rounds, args.local_epochs, args.lr, args.seed)
    rounds = list(range(1, args.rounds + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [100 * a for a in out["accuracy_per_round"]], "o-",
            label=f"fleet: {args.clients} clients, {args.partition}")
    ax.plot(rounds, [100 * a for a in central], "s--", label="centralised fit")
    ax.set_xlabel(f"round ({args.local_epochs} local epoch{'s' if args.local_epochs > 1 else ''})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{100 * out['bytes_fraction']:.2f}% of full-model bytes per client and round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
