#!/usr/bin/env python3
"""Renders the JSON results of benches/e2e/run.sh as a markdown report."""

import json
import os
import sys

d = sys.argv[1]


def load(name):
    path = os.path.join(d, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def num(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:  # NaN
        return "–"
    if isinstance(x, (int,)) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(a, b, digits=1):
    if not a or not b:
        return "–"
    return f"{a / b:,.{digits}f}×"


def mb(n):
    return f"{n / 1e6:,.1f} MB"


m = load("machine")
BURST = m["burst"]
KUBECTL_BURST = m["kubectlBurst"]
raw = load("rawsize")
create = load("create")
cache = load("debug-cache")
out = []
p = out.append

p("# kache end-to-end benchmark")
p("")
p(f"- Date: {m['date']}; machine: {m['nproc']} CPUs ({m['cpu']}), {m['memTotalKb'] / 1048576:.0f} GiB RAM, "
  f"load average at the start {m.get('loadavgStart', '?')}, at the end {m['loadavg']}")
p(f"- API server: kube-apiserver {m['apiserver']} + etcd on 127.0.0.1 (HTTPS, bearer token); "
  f"kache: {m['kache']}, in local mode on 127.0.0.1 (plain HTTP), upstream with the admin client certificate")
p(f"- kubectl: {m['kubectl']} ({m['kubectlPath']})")
p(f"- Data: {raw['items']:,} pods in 10 namespaces, {mb(raw['bodyBytes'])} as one JSON list "
  f"(items {raw['itemBytes'] / max(raw['items'], 1):,.0f} B on average)"
  + (f"; created in {create['seconds']:.0f} s ({create.get('createsPerSecond', 0):.0f}/s, 16 concurrent POSTs)"
     if create.get("created") else "; already present"))
p("- Everything runs on the same machine (load generator, kache, API server, etcd); "
  "other users' builds may have been running too: see the load average.")
p("")

# 1 ------------------------------------------------------------------------
p(f"## 1. `GET /api/v1/pods?resourceVersion=0` throughput ({m['duration']} s per cell, closed loop, "
  "one HTTP/1.1 connection per client, no gzip)")
p("")
p("| encoding | clients | direct req/s | kache req/s | **ratio** (target ≥ 10×) | direct MB/s | kache MB/s "
  "| direct p50 / p99 ms | kache p50 / p99 ms | upstream LISTs direct / kache | how kache answered "
  "| server CPU ms/request direct / kache | client CPU ms/request direct / kache |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
notes = []
answers = []
for enc in ("json", "protobuf"):
    for c in (1, 8):
        dr, kr = load(f"list-{enc}-c{c}-direct"), load(f"list-{enc}-c{c}-kache")
        if not dr or not kr:
            continue

        def lat(r):
            return f"{num(r['latency']['p50_ms'])} / {num(r['latency']['p99_ms'])} (n={r['requests']})"

        def ups(r):
            if not r.get("upstream"):
                return "?"
            return r["upstream"].get("byKind", {}).get("list pods", 0)

        def cpu(r):
            c_ = r.get("cpuSeconds") or {}
            server = sum(c_.get(k, 0) for k in ("apiserver", "etcd", "kache"))
            n = max(r["requests"], 1)
            return server * 1e3 / n, c_.get("loadgen", 0) * 1e3 / n

        how = ", ".join(f"{k} {v:.0f}" for k, v in sorted((kr.get("kacheAnswers") or {}).items(), key=lambda kv: -kv[1]))
        r = kr["rps"] / dr["rps"] if dr["rps"] else None
        verdict = "" if r is None else (" ✅" if r >= 10 else " ❌")
        p(f"| {enc} | {c} | {num(dr['rps'], 2)} | {num(kr['rps'], 2)} | **{ratio(kr['rps'], dr['rps'])}**{verdict} "
          f"| {num(dr['mbps'])} | {num(kr['mbps'])} | {lat(dr)} | {lat(kr)} | {ups(dr)} / {ups(kr)} | {how or '?'} "
          f"| {num(cpu(dr)[0], 0)} / {num(cpu(kr)[0], 0)} | {num(cpu(dr)[1], 0)} / {num(cpu(kr)[1], 0)} |")
        same = dr["sample"].get("itemsHash") and dr["sample"].get("itemsHash") == kr["sample"].get("itemsHash")
        if not same:
            notes.append(f"{enc} c={c}: kache's items differ from the API server's "
                         f"({kr['sample'].get('items')} items, {kr['sample'].get('itemBytes')} B vs "
                         f"{dr['sample'].get('items')} items, {dr['sample'].get('itemBytes')} B)")
        if c == 1:
            def said(r):
                s_ = r["sample"]
                return (f"{s_.get('status')} `{s_.get('contentType', '').split(';')[0]}` {s_.get('kind')}, "
                        f"{s_.get('items', '?')} items, {mb(s_.get('bytes', 0))}"
                        + (f" ({s_['error']})" if s_.get("error") else ""))
            answers.append(f"{enc}: direct {said(dr)}; kache {said(kr)}; "
                           + ("the items are byte-identical" if same else "**the items differ**"))
p("")
p("Answers (one full response per cell, decoded; items compared as a set, since v1.20 lists rv=0 in "
  "hash-map order and kache by namespace and name):")
p("")
for a in answers:
    p(f"- {a}")
p("")
for n in notes:
    p(f"- ⚠ {n}")
if notes:
    p("")

# 2 ------------------------------------------------------------------------
stores = {}
for r in (cache or {}).get("resources", []):
    if r.get("resource") == "pods" and r.get("group") == "":
        stores[r.get("encoding", "json")] = r
raw_pb = load("rawsize-protobuf")
p("## 2. Cache memory")
p("")
p("| store | raw size of the pods (sum of list items, direct) | kache `/debug/cache` bytes | **ratio** (target ≤ 1.5×) "
  "| objects | fill time |")
p("|---|---|---|---|---|---|")
for enc, rawr in (("json", raw), ("protobuf", raw_pb)):
    st = stores.get(enc)
    if not st or not rawr:
        p(f"| {enc} | {mb(rawr['itemBytes']) if rawr else '–'} | not cached | | | |")
        continue
    r = st["bytes"] / rawr["itemBytes"]
    fill = m.get("fillSecondsJson" if enc == "json" else "fillSecondsProtobuf")
    p(f"| pods, {enc} | {mb(rawr['itemBytes'])} | {mb(st['bytes'])} | **{r:.2f}×**{' ✅' if r <= 1.5 else ' ❌'} "
      f"| {st['objects']:,} | {fill} s |")
if len(stores) > 1:
    total = sum(st["bytes"] for st in stores.values())
    p(f"| both stores vs raw JSON | {mb(raw['itemBytes'])} | {mb(total)} | {total / raw['itemBytes']:.2f}× | | |")
p("")
mib = lambda kb: f"{kb / 1024:,.0f} MiB"
growth_json = (m["rssJsonKb"] - m["rssIdleKb"]) * 1024
growth_all = (m["rssFilledKb"] - m["rssIdleKb"]) * 1024
p("| kache RSS (`VmRSS`) | idle | JSON pods cached | + protobuf pods cached | after scenario 1 | at the end |")
p("|---|---|---|---|---|---|")
p(f"| current (peak `VmHWM`) | {mib(m['rssIdleKb'])} | {mib(m['rssJsonKb'])} | {mib(m['rssFilledKb'])} "
  f"| {mib(m['rssAfterLoadKb'])} ({mib(m['hwmAfterLoadKb'])}) | {mib(m['rssEndKb'])} ({mib(m['hwmEndKb'])}) |")
p(f"| growth ÷ raw JSON | | **{growth_json / raw['itemBytes']:.2f}×** | {growth_all / raw['itemBytes']:.2f}× | | |")
p("")

# 3 ------------------------------------------------------------------------
def upstream(r):
    u = r.get("upstream") or {}
    return u.get("total"), u.get("byKind", {})


def kinds(by):
    return ", ".join(f"{k}: {v}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))


dd, dk = load("discovery-direct"), load("discovery-kache")
if dd and dk:
    p(f"## 3. Discovery: {dd['n']} consecutive `kubectl get pods`, each with an empty `--cache-dir`")
    p("")
    p("| | total wall time | per run p50 / p99 | upstream requests (audit log) | of which |")
    p("|---|---|---|---|---|")
    for side, r in (("direct", dd), ("through kache", dk)):
        t, by = upstream(r)
        fail = f" ({r['n'] - r['ok']} failed: {r['failures'][:1]})" if r["ok"] != r["n"] else ""
        p(f"| {side} | {r['wallSeconds']:.2f} s{fail} | {num(r['latency']['p50_ms'], 0)} / "
          f"{num(r['latency']['p99_ms'], 0)} ms | {t} | {kinds(by)} |")
    p(f"| **kache / direct** | **{ratio(dk['wallSeconds'], dd['wallSeconds'], 2)}** | | "
      f"**{ratio(upstream(dk)[0], upstream(dd)[0], 2)}** | |")
    p("")

# 4 ------------------------------------------------------------------------
bd, bk = load("burst-direct"), load("burst-kache")
if bd and bk:
    p(f"## 4a. Burst: {BURST} concurrent identical `GET {m['burstPath']}` (consistent read, no resourceVersion) "
      "from one program, released together after every connection is up")
    p("")
    p("| | ok | upstream pod LISTs | all upstream requests | p50 / p99 latency | burst wall time | body size |")
    p("|---|---|---|---|---|---|---|")
    for side, r in (("direct", bd), ("through kache", bk)):
        if "skipped" in r:
            p(f"| {side} | skipped: {r['skipped']} | | | | | |")
            continue
        t, by = upstream(r)
        err = f" (errors: {r['errors']})" if r["errors"] else ""
        p(f"| {side} | {r['ok']}/{r['n']}{err} | {by.get('list pods', 0)} | {t} | "
          f"{num(r['latency']['p50_ms'], 0)} / {num(r['latency']['p99_ms'], 0)} ms | {r['wallSeconds']:.1f} s "
          f"| {mb(r['bodyBytesMin'] or 0)} |")
    p("")
kd, kk = load("kubectl-burst-direct"), load("kubectl-burst-kache")
if kd and kk:
    p(f"## 4b. Burst: {KUBECTL_BURST} concurrent `kubectl {m['kubectlBurstArgs']}` processes "
      "(started together, arrivals spread by process start-up; one shared warm discovery cache)")
    p("")
    p("| | ok | upstream pod LISTs | all upstream requests | per process p50 / p99 | wall time | output |")
    p("|---|---|---|---|---|---|---|")
    for side, r in (("direct", kd), ("through kache", kk)):
        if "skipped" in r:
            p(f"| {side} | skipped: {r['skipped']} | | | | | |")
            continue
        t, by = upstream(r)
        fail = f" (failures: {r['failures'][:1]})" if r["ok"] != r["n"] else ""
        p(f"| {side} | {r['ok']}/{r['n']}{fail} | {by.get('list pods', 0)} | {t} | "
          f"{num(r['latency']['p50_ms'] / 1e3, 2)} / {num(r['latency']['p99_ms'] / 1e3, 2)} s | "
          f"{r['wallSeconds']:.1f} s | {r['stdoutBytesMin'] or 0:,} B |")
    p("")

print("\n".join(out))
