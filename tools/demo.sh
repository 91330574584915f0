#!/usr/bin/env bash
# The README's main job: set the machine up, import a sample Nix-like closure
# into the embedded store (the default store, no server needed) and mount it
# in the foreground. Stop it with Ctrl-C, or `fusermount -u $MNT` elsewhere.
#
#   SAMPLE=dir  tree to import (default: a generated sample)
#   MNT=dir     mountpoint (default /mnt/tvixmount)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

SAMPLE=${SAMPLE:-/tmp/tvixmount-sample}
MNT=${MNT:-/mnt/tvixmount}
if [[ ! -d $SAMPLE ]]; then
    .venv/bin/python tools/gen_tree.py "$SAMPLE" --files 2000
fi
echo "== importing $SAMPLE/* into the embedded store" >&2
mapfile -t paths < <(.venv/bin/tvixstore import "$SAMPLE"/*)
printf '  %s\n' "${paths[@]}" >&2
first=$(basename "${paths[0]}")
.venv/bin/tvixstore ls "$first" | head -5 >&2

mkdir -p "$MNT"
cat >&2 <<HELP
== mounting at $MNT (Ctrl-C or 'fusermount -u $MNT' to stop). In another shell:
  ls $MNT                                   # every store path (--list-root)
  ls -l $MNT/$first
  find $MNT/$first -type f | head -3 | xargs cat | wc -c
  getfattr -d -m 'user.tvix' $MNT/$first/*  # blake3 digests as xattrs
  getfattr -n user.tvixmount.stats $MNT     # counters
HELP
exec .venv/bin/tvixmount "$MNT" --list-root
