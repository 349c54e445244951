"""Nightly re-encoding job: brings an index up to date with its source, as ``hashindex update`` does.

New images are encoded and appended, changed ones re-encoded, removed ones tombstoned; a new
encoder re-encodes everything. The new version is published atomically while queries keep reading
the old one, and the newest --keep versions stay. Rerun after a crash: it resumes.

    python jobs/update.py --encoder itq.encoder --source /data/photos --out /data/photos.index --keep 3
"""
import sys

from hashindex.cli import main

if __name__ == "__main__":
    sys.exit(main(["update", *sys.argv[1:]]))
