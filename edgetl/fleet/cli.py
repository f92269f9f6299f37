"""The `edgetl fleet` subcommands."""
from __future__ import annotations

import argparse
import json


def cmd_simulate(args) -> int:
    from .partition import parse_partition
    from .plot import check_plot, plot_rounds
    from .privacy import Privacy, parse_number
    from .simulate import simulate

    parse_partition(args.partition)  # a bad flag is reported before Ray starts
    privacy = Privacy(secagg=args.secagg, shares=parse_number(args.secagg_shares, "--secagg-shares"),
                      threshold=parse_number(args.secagg_threshold, "--secagg-threshold"), clip=args.secagg_clip,
                      dp_noise=args.dp_noise, dp_clip=args.dp_clip).check()
    if args.plot:
        check_plot(args.plot)
    out = simulate(args.bundle, args.data, args.clients, args.rounds, args.partition, args.fraction,
                   args.local_epochs, args.lr, args.seed, checkpoint=args.checkpoint, progress=not args.json,
                   min_reply_fraction=args.min_reply_fraction, verbose=args.verbose, privacy=privacy)
    if args.plot:
        out["plot"] = str(plot_rounds(args, out))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.clients} clients, {args.rounds} rounds, {args.partition}: test accuracy "
          f"{100 * out['test_accuracy']:.1f}% (per round: {', '.join(f'{100 * a:.1f}' for a in out['accuracy_per_round'])})")
    print(f"each client sends {out['bytes_up_per_client_round']:,} B per round, "
          f"{100 * out['bytes_fraction']:.2f}% of full-model FedAvg's {out['full_model_bytes']:,} B")
    print(f"on the wire (Flower's messages) each client sends {out['wire_bytes_up_per_client_round']:,} B and "
          f"receives {out['wire_bytes_down_per_client_round']:,} B per round")
    if out["dropped"]:
        print(f"dropped {len(out['dropped'])} updates; skipped rounds: {out['skipped_rounds'] or 'none'}")
    return 0


def add_parser(sub) -> None:
    f = sub.add_parser("fleet", help="federated training of a bundle's tiny parts with Flower")
    fs = f.add_subparsers(dest="fleet_command", required=True)
    s = fs.add_parser("simulate", help="N simulated devices in Flower's Simulation Runtime")
    s.add_argument("bundle")
    s.add_argument("--data", required=True, help=".npz with x_train, y_train (split over the clients), x_test, y_test")
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA (label skew; smaller is more skewed)")
    s.add_argument("--fraction", type=float, default=1.0, help="fraction of the clients sampled each round")
    s.add_argument("--local-epochs", type=int, default=1)
    s.add_argument("--lr", type=float, default=None, help="clients' learning rate (default: the bundle's)")
    s.add_argument("--seed", type=int, required=True, help="partition, sampling and shuffling seed")
    s.add_argument("--min-reply-fraction", type=float, default=0.5,
                   help="a round counts when this fraction of its sampled clients send a usable update")
    s.add_argument("--checkpoint", default=None, help="save the global tiny parts here each round; resume from it")
    s.add_argument("--secagg", action="store_true",
                   help="secure aggregation (Flower's SecAgg+): the server sees only the sum of the updates")
    s.add_argument("--secagg-shares", default="0.5",
                   help="SecAgg+ key shares per client: an integer ≥ 3, or a fraction of the sampled clients")
    s.add_argument("--secagg-threshold", default="0.667",
                   help="shares that rebuild a dropped client's key: an integer, or a fraction of the shares")
    s.add_argument("--secagg-clip", type=float, default=8.0,
                   help="SecAgg+ quantizes each weighted tensor value within ±this (22-bit levels)")
    s.add_argument("--dp-noise", type=float, default=None,
                   help="central differential privacy (Flower's fixed clipping): Gaussian noise multiplier")
    s.add_argument("--dp-clip", type=float, default=None, help="L2 norm each client's update is clipped to")
    s.add_argument("--plot", default=None, help="draw accuracy per round beside centralised fit (.png/.svg)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--verbose", action="store_true", help="Flower's own log")
    s.set_defaults(func=cmd_simulate)
