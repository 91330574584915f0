#!/bin/bash
# A/B: base (1f4294e) vs lanes (working tree), interleaved, readpath_profile
out=${OUT:-/var/tmp/lanes-ab}/$1; mkdir -p $out
for r in $(seq 1 ${ROUNDS:-2}); do
  for load in ${LOADS:-direct}; do
    for side in base main; do
      if [ $side = base ]; then dir=/var/tmp/base; else dir=/work/main; fi
      (cd $dir && /work/main/.venv/bin/python tools/readpath_profile.py --workdir /var/tmp/bench-final3 --target tvix-embedded --load $load \
        --readers 8 --duration 6 --json $out/$load-$side-$r.json > $out/$load-$side-$r.out 2>$out/$load-$side-$r.err)
    done
  done
done
