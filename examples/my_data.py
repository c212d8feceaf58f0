"""Make "your own" model folders and data files from the packaged ones, for README's section
"Your own model and data":

    python examples/my_data.py my_data

writes
- ``my_data/smollm2`` and ``my_data/minilm``: links to the packaged model folders (SmolLM2-135M
  is converted from GGUF to safetensors once, into ``$SHIRAKIT_CACHE``), i.e. ordinary Hugging Face
  model folders, as a model of your own would be;
- ``my_data/hamlet.jsonl``: Hamlet, one speech per line, ``{"text": ...}`` (for ``--task causal-lm``);
- ``my_data/tweets.csv``: 3,000 tweets with columns ``tweet`` and ``mood`` (for ``--task classification``).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

from shirakit import data


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, folder in (("smollm2", data.smollm2_dir()), ("minilm", data.minilm_dir())):
        link = out / name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
        print(f"{link} -> {folder}")

    play = (data.package_dir("shksprdata") / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    speeches = [p.strip() for p in play.split("\n\n") if len(p.split()) >= 8]
    with open(out / "hamlet.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": s}) + "\n" for s in speeches)
    print(f"{out / 'hamlet.jsonl'}: {len(speeches)} speeches")

    tweets = data.tweet_sentiment(test_size=0)
    rows = random.Random(0).sample(tweets.train, 3000)
    with open(out / "tweets.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tweet", "mood"])
        writer.writerows((text, tweets.labels[label]) for text, label in rows)
    print(f"{out / 'tweets.csv'}: {len(rows)} tweets, moods {tweets.labels}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "my_data"))
