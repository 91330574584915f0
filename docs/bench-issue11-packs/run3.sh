#!/bin/bash
out=/var/tmp/packs-bench
for r in 1 2; do
for t in main packs; do
  tree=/work/main; [ $t = packs ] && tree=/work/wt/packs
  echo "== substitute $t round $r start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd $tree && timeout 900 .venv/bin/python tools/bench_substitute.py --workdir /var/tmp/packs-bench-subst --compressions zstd --runs 2 \
      --json $out/subst-$t-$r.json > $out/subst-$t-$r.log 2>&1)
  echo "   rc $? end $(date -u +%T)"
done
done
