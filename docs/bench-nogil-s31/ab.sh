#!/bin/bash
# A/B: the arena copy with the GIL released (new) against tobytes() (old), interleaved
for r in 1 2 3 4 5 6 7 8 9; do  # run as 1-3, then 4-9
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for t in $order; do
    cd /var/tmp/s31/$t
    echo "== round $r $t $(date +%T)"
    timeout 1200 .venv/bin/python tools/bench.py --workdir /var/tmp/bench-final3 --repeat 1 \
      --targets squashfuse,passthrough,tvix-embedded --workloads seq_read,seq_cached,direct_read \
      --direct-duration 10 --readers 8 --mount-workers 8 --json /var/tmp/s31/ab-$t-$r.json > /var/tmp/s31/ab-$t-$r.out 2>&1
    echo "   rc $?"
  done
done
echo "== end $(date +%T)"
