#!/bin/bash
# A/B/C: base (a git worktree at /var/tmp/base) vs the working tree vs the hop passthrough,
# interleaved, readpath_profile on tools/bench's data set in /var/tmp/bench-final3.
#   OUT=DIR ROUNDS=N LOADS="direct seq" WORKERS=N docs/bench-leaner/run.sh NAME
# WORKERS defaults to 8, the card's command line; the runs of 7a61c4a-86120be (docs/performance.md
# "Fewer steps per read") used readpath_profile's default of 2.
out=${OUT:-/var/tmp/leaner-ab}/$1; mkdir -p "$out"
for r in $(seq 1 "${ROUNDS:-3}"); do
  for load in ${LOADS:-direct}; do
    for side in base main hop; do
      dir=/work/main; target=tvix-embedded
      [ $side = base ] && dir=/var/tmp/base
      [ $side = hop ] && target=passthrough-hop
      (cd $dir && /work/main/.venv/bin/python tools/readpath_profile.py --workdir /var/tmp/bench-final3 \
        --target $target --load "$load" --readers 8 --workers "${WORKERS:-8}" --duration 6 --json "$out/$load-$side-$r.json" \
        > "$out/$load-$side-$r.out" 2> "$out/$load-$side-$r.err")
    done
  done
done
python3 "$(dirname "$0")/../bench-lanes/sum.py" "$out"
