#!/bin/bash
# $1: kill|stop, $2 how many, $3 seconds apart; WORKERS=N (default 2) for the mount's --workers
M=/var/tmp/chaos/mnt
extra=""; [ "$1" = stop ] && extra="--request-timeout 4"
/work/main/.venv/bin/python -m tvixmount.cli $M --workers ${WORKERS:-2} --list-root --store-dir /var/tmp/bench-final3/store $extra --log-level WARNING > /var/tmp/chaos/mount-$1.log 2>&1 &
MP=$!
for i in $(seq 50); do grep -q " $M " /proc/mounts && break; sleep 0.2; done
(for i in $(seq ${2:-12}); do sleep ${3:-3}; w=$(pgrep -P $(pgrep -P $MP | head -1) | shuf -n1); if [ "$1" = kill ]; then kill -9 $w; else kill -STOP $w; fi; done) &
CH=$!
/work/main/.venv/bin/python tools/loadtest.py $M --readers 32 --duration 40s --pattern random --verify
wait $CH
python3 -c "import json,os; d=json.loads(os.getxattr('$M','user.tvixmount.stats')); f=d['fetcher']; print({k:f[k] for k in ('requests','errors','timeouts','lost','resent','restarts','killed','lane_replies','lanes_given_up','lanes','ring_replies')})"
kill -TERM $MP; wait $MP
grep -c "is gone" /var/tmp/chaos/mount-$1.log; grep -E "ERROR|did not end" /var/tmp/chaos/mount-$1.log | head -5
