import json, sys
runs = sys.argv[1:]
data = {r: json.load(open(f"/var/tmp/wab/{r}.json"))["summary"] for r in runs}
rows = [("seq_read", "cold", "mb_s"), ("seq_read", "warm", "mb_s"), ("seq_cached", "cached", "mb_s"),
        ("find", "cold", "seconds"), ("find", "warm", "seconds"), ("stat_walk", "cold", "seconds"), ("stat_walk", "warm", "seconds"),
        ("tar", "cold", "seconds"), ("tar", "warm", "seconds"),
        ("random_read", "cold", "mb_s"), ("random_read", "cold", "p50_ms"), ("random_read", "cold", "p99_ms"),
        ("direct_read", "cold", "mb_s"), ("direct_read", "warm", "mb_s"), ("direct_read", "cold", "p50_ms"), ("direct_read", "cold", "p99_ms")]
print("| workload | mode | metric | target | " + " | ".join(runs) + " |")
print("|---|---|---|---|" + "---:|" * len(runs))
for t in ("squashfuse", "tvix-embedded", "tvix-grpc"):
    for w, m, k in rows:
        vals = []
        for r in runs:
            try: v = data[r][t][w][m][k]
            except KeyError: v = None
            vals.append("" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.2f}"))
        if any(vals): print(f"| {w} | {m} | {k} | {t} | " + " | ".join(vals) + " |")
