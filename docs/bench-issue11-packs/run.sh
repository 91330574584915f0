#!/bin/bash
# Interleaved A/B: main (/work/main) vs packs (/work/wt/packs). Logs in /var/tmp/packs-bench.
set -u
out=/var/tmp/packs-bench
bench() {  # tree label round
  local tree=$1 label=$2 round=$3
  echo "== bench $label round $round start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd $tree && timeout 2400 tools/bench --workdir /var/tmp/packs-bench-$label --files 10000 --big 2 --big-size 32M \
     --repeat 3 --mount-workers 2 --targets squashfuse,passthrough,tvix-embedded --workloads tar \
     --json $out/$label-$round.json --markdown $out/$label-$round.md > $out/$label-$round.log 2>&1)
  echo "   rc $? end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
}
imp() {  # tree label round
  local tree=$1 label=$2 round=$3 store=/var/tmp/packs-bench/import-store
  rm -rf $store; sync; echo 3 > /proc/sys/vm/drop_caches
  local t0=$(date +%s.%N)
  (cd $tree && .venv/bin/python -c "import sys; from tvixmount.admin.cli import main; sys.exit(main())" \
     --store-dir $store --quiet import /var/tmp/packs-bench-packs/tree/* > /dev/null 2>$out/import-$label-$round.err)
  local rc=$?
  local t1=$(date +%s.%N)
  echo "import $label round $round rc $rc seconds $(echo "$t1 - $t0" | bc) load $(cut -d' ' -f1-3 /proc/loadavg) files_in_blobs $(find $store/blobs -type f | wc -l) packs $(ls $store/packs 2>/dev/null | wc -l)"
}
bench /work/main main 1
bench /work/wt/packs packs 1
for r in 1 2 3; do imp /work/main main $r; imp /work/wt/packs packs $r; done
bench /work/main main 2
bench /work/wt/packs packs 2
echo "done $(date -u +%T)"
