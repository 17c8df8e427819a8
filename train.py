"""Train a language model: `python train.py [group=option ...] [key=value ...]`. See conf/train.yaml.

The same entry point as `lmkit train`: lmkit.train.main, one @hydra.main over conf/.
"""

from lmkit.train import main

if __name__ == "__main__":
    main()
