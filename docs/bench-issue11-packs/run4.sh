#!/bin/bash
out=/var/tmp/packs-bench
imp() {
  local tree=$1 label=$2 round=$3 store=/var/tmp/packs-bench/import-store
  rm -rf $store; sync; echo 3 > /proc/sys/vm/drop_caches
  local t0=$(date +%s.%N)
  (cd $tree && .venv/bin/python -c "import sys; from tvixmount.admin.cli import main; sys.exit(main())" \
     --store-dir $store --quiet import /var/tmp/packs-bench-packs/tree/* > /dev/null 2>$out/import-$label-$round.err)
  local rc=$?
  local t1=$(date +%s.%N)
  echo "import $label round $round rc $rc seconds $(echo "$t1 - $t0" | bc) load $(cut -d' ' -f1-3 /proc/loadavg)"
}
for r in 4 5 6; do imp /work/main main $r; imp /work/wt/packs packs $r; done
