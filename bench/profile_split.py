"""Where a training loop's time goes, from a py-spy profile of a bench/peers.py worker.

    py-spy record -r 100 -f raw -o prof.txt --subprocesses -- \
        torchrun --standalone --nproc_per_node=2 bench/peers.py --worker qarac_dist --result-dir DIR -- OVERRIDES
    python bench/profile_split.py prof.txt

For the samples of each rank inside its training loop it prints the share in the DeepSpeed
engine's forward, backward and step, in fetching and collating batches, and in everything else
(the loop's own code: bookkeeping, logging, callbacks, stop checks).
"""

from __future__ import annotations

import collections
import sys

LOOPS = ("Trainer.advance", "Trainer._run_epoch", "_TrainingEpochLoop.run")  # per-step code only, no setup
PARTS = [  # the first of these met going from the root of a stack names its part
    ("forward", ("DeepSpeedEngine.forward",)),
    ("backward", ("DeepSpeedEngine.backward",)),
    ("optimizer step", ("DeepSpeedEngine.step", "DeepSpeedZeroOptimizer.step")),
    ("data: fetch and collate", ("Collator.__call__", "collate_rows", "Planned.__getitem__", "_next_data",
                                 "Dataset.__getitem__", "Dataset._getitem")),
]


def split(path: str) -> dict[str, collections.Counter]:
    ranks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if len(frames) < 3 or "--worker" not in stack.split(";")[1]:
            continue  # torchrun itself
        if not any(f.endswith(loop) or loop in f for f in frames for loop in LOOPS):
            continue
        process = stack.split(";")[1].split(":")[0]
        part = next((name for f in frames for name, marks in PARTS if any(f.endswith(m) for m in marks)),
                    "loop's own code")
        ranks[process][part] += int(count)
    return ranks


def main() -> None:
    for process, parts in sorted(split(sys.argv[1]).items()):
        total = sum(parts.values())
        shares = ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in parts.most_common())
        print(f"{process}: {total} samples in the loop: {shares}")


if __name__ == "__main__":
    main()
