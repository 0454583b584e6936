"""Meta-train a GHN, resumably, in one process or several:

    python -m train_ghn --config CFG --out DIR [--max-steps N]
    accelerate launch [--multi_gpu --num_processes R ...] -m train_ghn --config CFG --out DIR
"""

from __future__ import annotations

import argparse
import logging

from .trainer import TrainConfig, Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train_ghn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. train_ghn/configs/cifar10-gpu.yaml")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, log.png, final/ GHN")
    parser.add_argument("--max-steps", type=int, help="override the config's max_steps (and so its lr schedule)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop (and save) after this step; the lr schedule still runs to max_steps")
    parser.add_argument("--time-limit", type=float, help="stop (and save) after this many minutes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; one process only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    if args.time_limit is not None:
        config.time_limit_min = args.time_limit
    trainer = Trainer(config, args.out, device=args.device)
    if not trainer.accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    final = trainer.run(max_steps=args.stop_after)
    if trainer.accelerator.is_main_process:
        logging.getLogger("train_ghn").info("final GHN written to %s", final)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
