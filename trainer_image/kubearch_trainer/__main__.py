"""``python -m kubearch_trainer`` is ``kubearch-train`` (what torchrun launches in every pod)."""

from kubearch_trainer.cli import train_main

if __name__ == "__main__":
    train_main()
