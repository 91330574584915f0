#!/bin/bash
# ad hoc: cold sequential read of the big files over a gRPC mount, the daemon's per-call debug log
T=${1:-/work/main}; W=${2:-8}; PORT=$((20000 + RANDOM % 10000)); MNT=/var/tmp/s29/m
sync; echo 3 > /proc/sys/vm/drop_caches
(cd $T; PYTHONPATH=$T exec .venv/bin/python -m tvixmount.server --listen-address 127.0.0.1:$PORT --store-dir /var/tmp/bench-final3/store --read-only --stats-interval 0 --log-level debug > /var/tmp/s29/daemon.log 2>&1) &
DP=$!; sleep 2
U=grpc+http://127.0.0.1:$PORT
(cd $T; PYTHONPATH=$T exec .venv/bin/python -m tvixmount.cli $MNT --workers $W --log-level WARNING --blob-service-addr $U --directory-service-addr $U --path-info-service-addr $U > /var/tmp/s29/mount.log 2>&1) &
MP=$!
for i in $(seq 100); do mountpoint -q $MNT && break; sleep 0.1; done
B=$(python3 -c 'import json; print(json.load(open("/var/tmp/bench-final3/dataset.json"))["store_names"]["bigdata-1.0"])')
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(date +%s.%N); find $MNT/$B -type f | sort | while read f; do dd if="$f" of=/dev/null bs=1M status=none; done; e=$(date +%s.%N); echo "seq $(echo "$e - $s" | bc) s"
getfattr -n user.tvixmount.stats --only-values $MNT | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("segment_cache"))'
fusermount -u $MNT; wait $MP; kill -INT $DP; wait $DP
