"""Scheduled training job: trains an encoder exactly as ``hashindex train`` does, with its arguments.

    python jobs/train.py --method dpfah --bits 32 --source fashion-mnist --sample 5000 --out dpfah.encoder
    python jobs/train.py --method ucsh --bits 64 --source photos/ --mode finetune --out ucsh.encoder
"""
import sys

from hashindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
