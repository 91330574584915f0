#!/bin/bash
set -u
source <(sed -n '/^out=/,/^}$/p' /var/tmp/packs-bench/run.sh | sed -n '1,/^}$/p')
out=/var/tmp/packs-bench
bench() {
  local tree=$1 label=$2 round=$3
  echo "== bench $label round $round start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd $tree && timeout 2400 tools/bench --workdir /var/tmp/packs-bench-$label --files 10000 --big 2 --big-size 32M \
     --repeat 3 --mount-workers 2 --targets squashfuse,passthrough,tvix-embedded --workloads tar \
     --json $out/$label-$round.json --markdown $out/$label-$round.md > $out/$label-$round.log 2>&1)
  echo "   rc $? end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
}
rm_() { :; }
readmany() {  # tree label round
  sync; echo 3 > /proc/sys/vm/drop_caches
  (cd $1 && strace -f -c -o $out/strace-$2-$3.txt -e trace=openat,close,pread64,fadvise64 \
     .venv/bin/python $out/readmany.py /var/tmp/packs-bench-$2/store > $out/readmany-$2-$3.txt 2>&1)
  echo "readmany $2 $3: $(cat $out/readmany-$2-$3.txt) load $(cut -d' ' -f1-3 /proc/loadavg)"
}
bench /work/main main 3
bench /work/wt/packs packs 3
for r in 1 2; do readmany /work/main main $r; readmany /work/wt/packs packs $r; done
echo "done $(date -u +%T)"
