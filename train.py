"""Train a language model: `python train.py [group=option ...] [key=value ...]`. See conf/train.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from lmkit.errors import exit_on_user_error
    from lmkit.train import run

    with exit_on_user_error():
        metrics, _ = run(cfg)
    # A sweeper (e.g. Optuna) optimises the value main returns.
    return metrics.get(cfg.get("optimized_metric") or "val_loss")


if __name__ == "__main__":
    main()
