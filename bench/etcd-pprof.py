#!/usr/bin/env python3
"""Where etcd spends its CPU: reads a Go CPU profile (pprof's gzipped protobuf, as etcd
serves it with `--enable-pprof` at /debug/pprof/profile?seconds=N) without Go's tools, and
prints each function's share of the samples (cumulative and flat), optionally only the
functions whose names contain one of PATTERNS.

    etcd --enable-pprof ... &   # then, under load:
    curl -s "http://127.0.0.1:PORT/debug/pprof/profile?seconds=8" -o etcd.pb.gz
    python3 bench/etcd-pprof.py etcd.pb.gz jsonpb applyEntryNormal 'WAL).Save'

(BENCHMARKS.md, "etcd backend vs etcd's own lock", used it to find the JSON gateway's
request decoding as the acquire's extra cost.)
"""
import gzip, sys, collections
def varint(b, i):
    x = s = 0
    while True:
        c = b[i]; i += 1; x |= (c & 0x7f) << s; s += 7
        if c < 0x80: return x, i
def fields(b):
    i = 0
    while i < len(b):
        k, i = varint(b, i); f, t = k >> 3, k & 7
        if t == 0: v, i = varint(b, i)
        elif t == 2:
            n, i = varint(b, i); v = b[i:i+n]; i += n
        elif t == 1: v = b[i:i+8]; i += 8
        elif t == 5: v = b[i:i+4]; i += 4
        yield f, t, v
def packed(v, t):
    if t == 0: return [v]
    out = []; i = 0
    while i < len(v):
        x, i = varint(v, i); out.append(x)
    return out
data = open(sys.argv[1], 'rb').read()
try: data = gzip.decompress(data)
except Exception: pass
samples = []; locs = {}; funcs = {}; strs = []
for f, t, v in fields(data):
    if f == 2:
        lids = []; vals = []
        for g, tt, vv in fields(v):
            if g == 1: lids += packed(vv, tt)
            if g == 2: vals += packed(vv, tt)
        samples.append((lids, vals))
    elif f == 4:
        lid = 0; fl = []
        for g, tt, vv in fields(v):
            if g == 1: lid = vv
            if g == 4:
                for h, t3, v3 in fields(vv):
                    if h == 1: fl.append(v3)
        locs[lid] = fl
    elif f == 5:
        fid = 0; name = 0
        for g, tt, vv in fields(v):
            if g == 1: fid = vv
            if g == 2: name = vv
        funcs[fid] = name
    elif f == 6:
        strs.append(v.decode('utf-8', 'replace'))
fn = lambda fid: strs[funcs.get(fid, 0)]
total = sum(v[-1] for _, v in samples)
flat = collections.Counter(); cum = collections.Counter()
for lids, vals in samples:
    w = vals[-1]
    names = [fn(f) for l in lids for f in locs.get(l, [])]
    if names: flat[names[0]] += w
    for n in set(names): cum[n] += w
pat = sys.argv[2:] or []
print("total", total)
for n, w in cum.most_common(400):
    if not pat or any(p in n for p in pat):
        print(f"{100*w/total:6.1f}% cum {100*flat[n]/total:5.1f}% flat  {n}")
