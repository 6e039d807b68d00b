#!/usr/bin/env python3
"""etcd's CPU time per lock pair for different request shapes, on a running etcd.

    python3 bench/etcd-request-shapes.py PORT ETCD_PID [PAIRS_PER_THREAD [THREADS]]

THREADS threads (default 64), each on one kept-alive HTTP/1.1 connection to etcd's JSON
gateway, loop a pair of requests; etcd's utime+stime (from /proc/ETCD_PID/stat) over the run
is divided by the pairs. Shapes, two rounds each:
- lock: /v3/lock/lock + /v3/lock/unlock (etcd's own mutex);
- ours: the etcd backend's uncontended acquire txn (two create compares; put with a lease,
  range of the capacity key, count_only range of the queue) + deleterange;
- ours-nocap: the same txn without the capacity range;
- put+del: a plain put with a lease + deleterange (the floor for two writes);
- slots: the acquire txn since key names are reused slots (compares: key absent, the
  slot's tombstone at the mod revision last seen, the cap key's mod revision as cached;
  puts of the key and the tombstone; count_only range of the queue; a failure branch
  reading the key, the tombstone and the cap key) + deleterange;
- slots-nofail: the same without the failure branch (read by a second request instead),
  with protobuf's defaults left out of the compares: what the backend sends now;
- slots-noabsent: slots-nofail without the key-absent compare (implied by the tombstone's);
- slots-short: slots-nofail with a one-character key name and a value of weight and lease
  id only (what shorter names and a smaller record would save).
SHAPES (comma-separated names) picks some; THREADS=1 measures the 1-client cost.
"""
import http.client, json, base64, sys, time, threading
port=int(sys.argv[1]); pid=int(sys.argv[2])
N=int(sys.argv[3]) if len(sys.argv) > 3 else 25
T=int(sys.argv[4]) if len(sys.argv) > 4 else 64
b=lambda s: base64.b64encode(s.encode()).decode()
def conn(): return http.client.HTTPConnection("127.0.0.1",port)
def post(c,p,body):
    c.request("POST",p,json.dumps(body),{"Content-Type":"application/json"}); r=c.getresponse(); return json.loads(r.read())
def cpu():
    f=open(f"/proc/{pid}/stat").read().split(); return (int(f[13])+int(f[14]))*10
c0=conn(); lease=post(c0,"/v3/lease/grant",{"TTL":"120"})["ID"]
def re(pfx):
    e=bytearray(pfx.encode()); e[-1]+=1; return base64.b64encode(bytes(e)).decode()
rec=b(json.dumps({"w":1,"s":"0123456789abcdef","c":"host:12345","t":1764648000000}))
def ours(c,t,i,cap=True):
    q=f"exp/s/x{t}/q/"; capk=f"exp/s/x{t}/cap"; k=f"{q}{i:016x}"; tb=f"exp/s/x{t}/x/{i:016x}"
    succ=[{"request_put":{"key":b(k),"value":rec,"lease":lease}}]
    if cap: succ.append({"request_range":{"key":b(capk)}})
    succ.append({"request_range":{"key":b(q),"range_end":re(q),"count_only":True}})
    post(c,"/v3/kv/txn",{"compare":[{"target":"CREATE","key":b(k),"create_revision":"0","result":"EQUAL"},{"target":"CREATE","key":b(tb),"create_revision":"0","result":"EQUAL"}],"success":succ,"failure":[{"request_range":{"key":b(capk)}}]})
    post(c,"/v3/kv/deleterange",{"key":b(k)})
def plain(c,t,i):
    k=f"exp/s/x{t}/q/{i:016x}"
    post(c,"/v3/kv/put",{"key":b(k),"value":rec,"lease":lease}); post(c,"/v3/kv/deleterange",{"key":b(k)})
def lock(c,t,i):
    r=post(c,"/v3/lock/lock",{"name":b(f"exp-lock-{t}"),"lease":lease}); post(c,"/v3/lock/unlock",{"key":r["key"]})
def nocap(c,t,i): ours(c,t,i,False)
fences={}
capmod={}
def slots(c,t,i,fail=True,absent=True,short=False):
    d=f"exp/s/x{t}/"; q=d+"q/"; capk=d+"cap"
    name=f"{int(lease):x}.0" if not short else "0"
    k=q+name; tb=d+"x/"+name
    cmp=([{"key":b(k),"target":"CREATE"}] if absent else [])+[
         {"key":b(tb),"target":"MOD","mod_revision":str(fences.get(tb,0))},
         {"key":b(capk),"target":"MOD","mod_revision":capmod[t]}]
    v=rec if not short else b(json.dumps({"w":1,"l":i}))
    succ=[{"request_put":{"key":b(k),"value":v,"lease":lease}},
          {"request_put":{"key":b(tb),"value":b(json.dumps({"l":i})),"lease":lease}},
          {"request_range":{"key":b(q),"range_end":re(q),"count_only":True}}]
    body={"compare":cmp,"success":succ}
    if fail: body["failure"]=[{"request_range":{"key":b(k)}},{"request_range":{"key":b(tb)}},{"request_range":{"key":b(capk)}}]
    r=post(c,"/v3/kv/txn",body)
    assert r.get("succeeded"), r
    fences[tb]=int(r["header"]["revision"])
    post(c,"/v3/kv/deleterange",{"key":b(k)})
def slots_nofail(c,t,i): slots(c,t,i,False)
def slots_noabsent(c,t,i): slots(c,t,i,False,False)
def slots_short(c,t,i): slots(c,t,i,False,True,True)
for t in range(T):
    r=post(c0,"/v3/kv/put",{"key":b(f"exp/s/x{t}/cap"),"value":b('{"capacity":1,"closed":false}')})
    capmod[t]=r["header"]["revision"]
import os
ALL=[("lock",lock),("ours",ours),("ours-nocap",nocap),("put+del",plain),("slots",slots),("slots-nofail",slots_nofail),("slots-noabsent",slots_noabsent),("slots-short",slots_short)]
pick=os.environ.get("SHAPES")
for rnd in range(2):
  for name,f in [x for x in ALL if not pick or x[0] in pick.split(",")]:
    a=cpu(); t0=time.time()
    def work(t):
        c=conn()
        for i in range(N): f(c,t,i+rnd*N)
    th=[threading.Thread(target=work,args=(t,)) for t in range(T)]
    [x.start() for x in th]; [x.join() for x in th]
    n=N*T; print(f"{name:12} etcd cpu {(cpu()-a)/n:.3f} ms/pair  {n/(time.time()-t0):.0f} pairs/s")
