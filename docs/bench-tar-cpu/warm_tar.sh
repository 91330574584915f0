#!/bin/bash
# A cold then a warm tar of the bench closure on one fresh mount of TREE (stop 28, "The readahead
# does not fetch what was read"); prints both times and the readahead's counters.
# usage: warm_tar.sh TREE [WORKDIR]   (WORKDIR: a tools/bench data set, default /var/tmp/bench-final3)
# GRPC=1 mounts through a daemon of TREE on loopback instead of the embedded store.
set -eu
T=$1; W=${2:-/var/tmp/bench-final3}; MNT=$(mktemp -d); PORT=$((20000 + RANDOM % 10000))
PY=$T/.venv/bin/python
if [ -n "${GRPC:-}" ]; then
  (cd "$T"; PYTHONPATH=$T exec "$PY" -m tvixmount.server --listen-address 127.0.0.1:$PORT \
     --store-dir "$W/store" --read-only --stats-interval 0) & DP=$!; sleep 2
  U=grpc+http://127.0.0.1:$PORT; SA="--blob-service-addr $U --directory-service-addr $U --path-info-service-addr $U"
else
  SA="--store-dir $W/store"
fi
(cd "$T"; PYTHONPATH=$T exec "$PY" -m tvixmount.cli "$MNT" --workers 8 --log-level WARNING $SA) & MP=$!
for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
sync; echo 3 > /proc/sys/vm/drop_caches
PKGS=$(python3 -c 'import json,sys; print(" ".join(v for k, v in json.load(open(sys.argv[1]))["store_names"].items() if "bigdata" not in k))' "$W/dataset.json")
cd "$MNT"
for run in cold warm; do
  s=$(date +%s.%N); tar cf - -- $PKGS | wc -c >/dev/null; e=$(date +%s.%N)
  echo "$run tar $(echo "$e - $s" | bc) s"
done
cd /
getfattr --absolute-names -n user.tvixmount.stats --only-values "$MNT" | python3 -c 'import json,sys; print("readahead", json.load(sys.stdin)["readahead"])'
fusermount -u "$MNT"; wait $MP; rmdir "$MNT"
if [ -n "${GRPC:-}" ]; then kill -INT $DP; wait $DP || true; fi
