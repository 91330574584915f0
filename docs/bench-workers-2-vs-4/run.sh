#!/bin/bash
# A/B of tvixmount --workers 2 against 4 (FUSE threads follow: workers + 2), alternating, one run each
cd /work/main
for r in 1 2; do
  for w in 2 4; do
    tools/bench --workdir /var/tmp/bench-final3 --files 20000 --big 4 --big-size 256M --repeat 1 \
      --direct-duration 5 --readers 8 --random-reads 2048 --latency-duration 3 --mount-workers $w \
      --targets squashfuse,tvix-embedded,tvix-grpc \
      --workloads seq_read,seq_cached,find,stat_walk,tar,random_read,direct_read \
      --json docs/bench-workers-2-vs-4/w$w-r$r.json --markdown docs/bench-workers-2-vs-4/w$w-r$r.md > docs/bench-workers-2-vs-4/w$w-r$r.log 2>&1
  done
done
echo done > docs/bench-workers-2-vs-4/done
