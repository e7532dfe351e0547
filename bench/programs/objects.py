"""A server-like object churn in Python: records with text, tags and
payloads of 256 B to 64 KiB (log-uniform: CPython's own allocator takes
blocks up to 512 B, malloc the rest), replaced at random, round-tripped
through JSON, sorted and indexed.  Argument: the number of records kept.
Verifies what it reads back and exits 0, or raises."""
import json
import random
import sys

n = int(sys.argv[1])
rng = random.Random(42)


def payload():
    return rng.randbytes(int(2 ** rng.uniform(8, 16)))


def record(i):
    return {"id": i, "name": "user-%08d" % i,
            "tags": [rng.choice("abcdefgh") * rng.randint(1, 40) for _ in range(rng.randint(0, 6))],
            "payload": payload()}


live = {i: record(i) for i in range(n)}
for step in range(4 * n):
    i = rng.randrange(n)
    if step % 3 == 0:
        live[i] = record(i)
    else:
        live[i]["payload"] = payload()
        live[i]["tags"].append("t%d" % step)
        del live[i]["tags"][:-8]
for rnd in range(3):
    text = json.dumps([{k: (v.hex() if k == "payload" else v) for k, v in r.items()}
                       for r in live.values() if r["id"] % 3 == rnd])
    back = json.loads(text)
    for r in back:
        assert bytes.fromhex(r["payload"]) == live[r["id"]]["payload"]
    by_name = sorted(back, key=lambda r: (len(r["payload"]), r["name"]))
    index = {}
    for r in by_name:
        for t in r["tags"]:
            index.setdefault(t, []).append(r["id"])
    assert sum(map(len, index.values())) == sum(len(r["tags"]) for r in back)
print(len(live), sum(len(r["payload"]) for r in live.values()))
