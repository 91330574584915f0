#!/bin/bash
# interleaved: O_DIRECT 8 readers and seq, three targets, N rounds
cd /work/main
out=docs/bench-hop/$1; mkdir -p $out
for r in $(seq 1 ${ROUNDS:-3}); do
  for load in direct seq; do
    for t in tvix-embedded passthrough-hop passthrough-verify; do
      .venv/bin/python tools/readpath_profile.py --workdir /var/tmp/bench-final3 --target $t --load $load \
        --readers 8 --duration 6 --json $out/$load-$t-$r.json > /dev/null 2>$out/$load-$t-$r.err
    done
  done
done
