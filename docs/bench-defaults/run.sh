# A = base worktree (bf136a6 defaults: 64M arena, 10 threads); B = working tree with THREADS=4 (arena default 1536M)
while pgrep -f "ab/B1.json" >/dev/null; do sleep 5; done
for round in 2 3; do
for cfg in A B; do
  if [ $cfg = B ]; then dir=/work/main; export THREADS=4; else dir=/var/tmp/base; unset THREADS; fi
  unset TVIXMOUNT_SEGMENT_CACHE
  (cd $dir && /work/main/.venv/bin/python tools/bench.py --workdir /var/tmp/bench-final3 --targets squashfuse,tvix-embedded --workloads direct_read,seq_read,seq_cached,tar --mount-workers 8 --repeat 2 --direct-duration 10 \
    --json /var/tmp/ab/$cfg$round.json --markdown /var/tmp/ab/$cfg$round.md --plot /var/tmp/ab/$cfg$round.png > /var/tmp/ab/$cfg$round.log 2>&1)
  echo "$cfg$round rc=$?" >> /var/tmp/ab/done
done; done
