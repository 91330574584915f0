#!/bin/bash
# usage: grpc_aio_vs_sync.sh CALLS PAYLOAD MESSAGES  (from the checkout: PY defaults to .venv/bin/python)
# e.g. 4000 32768 1, and 800 262144 8 (docs/performance.md, "The daemon on grpc's asyncio server")
PY=${PY:-.venv/bin/python}
for mode in sync aio sync aio; do
  P=$((30000 + RANDOM % 10000))
  coproc S { $PY "$(dirname "$0")"/grpc_aio_vs_sync.py $mode server $P $2 $3; }
  read -u ${S[0]} l
  $PY "$(dirname "$0")"/grpc_aio_vs_sync.py $1 client $P
  echo >&${S[1]}; read -u ${S[0]} c; echo "$mode server $c for $1 calls (payload $2 x $3)"
  wait
done
