#!/bin/bash
# Stop 30's A/B of the FUSE thread count (docs/performance.md, "Two FUSE threads or four, again").
# bN-I.json/md: THREADS=N for tvixmount and for the hop passthrough, rounds in the order below,
# 07:21-07:34 UTC. The runs were made with a one-line change giving the hop passthrough the
# count; b0b1103 landed it (tools/bench gives the hop floors tvixmount's THREADS), so on that
# tree this script is the same measurement. tN-rR.json: round R with THREADS=N for tvixmount
# only (the hop at its 4), 07:05-07:20 UTC, rounds 4 2 3 then 3 4 2. cN-I.json: the loop below
# with 3 4 4 3 3 4, --targets squashfuse,tvix-embedded, 07:57-08:05 UTC.
cd "$(dirname "$0")/../.." || exit 1
i=0
for T in 2 4 4 2 2 4; do
  i=$((i+1))
  THREADS=$T tools/bench --workdir /var/tmp/bench-final3 --repeat 1 --direct-duration 10 --readers 8 \
    --targets squashfuse,passthrough-hop,tvix-embedded --workloads seq_read,seq_cached,direct_read,random_read,tar \
    --mount-workers 8 --json "b$T-$i.json" --markdown "b$T-$i.md" --plot "b$T-$i.png"
done
