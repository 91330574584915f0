#!/bin/bash
# A/B of the stream table: A = the tree before it (a `git worktree` of c3726d6 in /var/tmp/base),
# B = this tree; squashfuse beside each; rounds interleaved. Output in $OUT (default /var/tmp/streams).
OUT=${OUT:-/var/tmp/streams}; ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-direct_read,seq_read,seq_cached,tar}; TARGETS=${TARGETS:-squashfuse,tvix-embedded}
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for cfg in A B; do
    if [ $cfg = B ]; then dir=/work/main; else dir=/var/tmp/base; fi
    (cd $dir && /work/main/.venv/bin/python tools/bench.py --workdir /var/tmp/bench-final3 --targets "$TARGETS" \
      --workloads "$WORKLOADS" --mount-workers 8 --repeat 2 --direct-duration 10 \
      --json "$OUT/$cfg$round.json" --markdown "$OUT/$cfg$round.md" > "$OUT/$cfg$round.log" 2>&1)
    echo "$cfg$round rc=$? $(date +%H:%M:%S)" >> "$OUT/done"
  done
done
