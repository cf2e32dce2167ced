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

def not_run(r):
    """Why a cell has no numbers ("skipped: …", "failed: …"), or None when it ran."""
    if r is None:
        return "not run"
    for key in ("skipped", "failed"):
        if key in r:
            return f"{key}: {r[key]}"
    return None


def lat(r):
    return f"{num(r['latency']['p50_ms'])} / {num(r['latency']['p99_ms'])} (n={r['requests']})"


def ups(r):
    if not r.get("upstream"):
        return "?"
    return r["upstream"].get("byKind", {}).get("list pods", 0)


def cpu(r):
    """Server CPU ms per request (every watched process but the load generator), client CPU ms."""
    c_ = r.get("cpuSeconds") or {}
    server = sum(v for k, v in c_.items() if k != "loadgen")
    n = max(r["requests"], 1)
    return server * 1e3 / n, c_.get("loadgen", 0) * 1e3 / n


def how(r):
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted((r.get("kacheAnswers") or {}).items(), key=lambda kv: -kv[1])) or "?"


def said(r):
    s_ = r["sample"]
    return (f"{s_.get('status')} `{s_.get('contentType', '').split(';')[0]}` {s_.get('kind')}, "
            f"{s_.get('items', '?')} items, {mb(s_.get('bytes', 0))}"
            + (f" ({s_['error']})" if s_.get("error") else ""))


def same_items(a, b):
    return bool(a and b and a["sample"].get("itemsHash") and a["sample"].get("itemsHash") == b["sample"].get("itemsHash"))


def errors(name, r):
    if r and not not_run(r) and r.get("errors"):
        notes.append(f"{name}: errors {r['errors']}")


def col(r, f, why_not=True):
    """A value of a cell that ran, else why it did not (or a dash)."""
    why = not_run(r)
    return f(r) if not why else (why if why_not else "–")


def verdict(x, target, at_least=True):
    if x is None:
        return ""
    return " ✅" if (x >= target if at_least else x <= target) else " ❌"


notes = []

def turns(name):
    """A side's turns (`name`, then `name-2`) as one cell: requests, time,
    bytes, CPU, upstream requests and kache's answers summed; RSS from the
    first start to the highest peak; the latency of each turn kept."""
    rs = [r for r in (load(name), load(name + "-2")) if r is not None]
    if not rs or any(not_run(r) for r in rs):
        return next((r for r in rs if not_run(r)), None)
    out = dict(rs[0])
    for key in ("requests", "seconds", "bytes"):
        out[key] = sum(r[key] for r in rs)
    out["rps"] = out["requests"] / out["seconds"] if out["seconds"] else 0
    out["mbps"] = out["bytes"] / 1e6 / out["seconds"] if out["seconds"] else 0
    out["cpuSeconds"] = {k: sum((r.get("cpuSeconds") or {}).get(k, 0) for r in rs) for k in rs[0].get("cpuSeconds") or {}}
    ups_ = [r.get("upstream") or {} for r in rs]
    out["upstream"] = {"byKind": {k: sum(u.get("byKind", {}).get(k, 0) for u in ups_)
                                  for k in set().union(*(u.get("byKind", {}) for u in ups_))}}
    out["kacheAnswers"] = {k: sum((r.get("kacheAnswers") or {}).get(k, 0) for r in rs)
                           for k in set().union(*((r.get("kacheAnswers") or {}) for r in rs))}
    out["rssKb"] = {k: {"start": v.get("start"), "peak": max((r.get("rssKb") or {}).get(k, {}).get("peak") or 0 for r in rs)}
                    for k, v in (rs[0].get("rssKb") or {}).items()}
    out["errors"] = {k: sum((r.get("errors") or {}).get(k, 0) for r in rs)
                     for k in set().union(*((r.get("errors") or {}) for r in rs))}
    out["turns"] = rs
    return out


def turn_latencies(r):
    return "; ".join(lat(t) for t in r.get("turns", [r]))



# 1 ------------------------------------------------------------------------
p(f"## 1. `GET /api/v1/pods?resourceVersion=0` throughput ({m['duration']} s per cell, closed loop, "
  "one HTTP/1.1 connection per client, no gzip)")
p("")
p(f"Three sides per cell: the API server directly, then kache and nginx ({m.get('nginx', '?')}) serving kache's "
  "own answer (the same bytes, captured once per encoding) from a tmpfs — the anchor: what a static file server "
  "does with these bytes on this machine. kache and nginx take turns (kache, nginx, nginx, kache), each half the "
  "time and requests, so that the machine's drift falls on both alike; their latencies are given per turn.")
p("")
p("| encoding | clients | direct req/s | kache req/s | nginx req/s | **kache / direct** (target ≥ 10×) "
  "| **kache / nginx** (target ≥ 0.9×) | direct / kache / nginx MB/s "
  "| direct p50 / p99 ms | kache p50 / p99 ms | nginx p50 / p99 ms | upstream LISTs direct / kache "
  "| how kache answered | server CPU ms/request direct / kache / nginx | client CPU ms/request direct / kache / nginx |")
p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
answers = []
for enc in ("json", "protobuf"):
    captured = load(f"nginx-body-{enc}")
    for c in (1, 8):
        dr, kr, nr = load(f"list-{enc}-c{c}-direct"), turns(f"list-{enc}-c{c}-kache"), turns(f"list-{enc}-c{c}-nginx")
        if dr is None and kr is None:
            continue
        ran = {side: r for side, r in (("direct", dr), ("kache", kr), ("nginx", nr)) if not not_run(r)}
        for side, r in ran.items():
            errors(f"{enc} c={c} {side}", r)
        d_, k_, n_ = ran.get("direct"), ran.get("kache"), ran.get("nginx")
        kd = k_["rps"] / d_["rps"] if k_ and d_ and d_["rps"] else None
        kn = k_["rps"] / n_["rps"] if k_ and n_ and n_["rps"] else None

        def three(f):
            return " / ".join(num(f(r)) if r else "–" for r in (d_, k_, n_))

        p(f"| {enc} | {c} | {col(dr, lambda r: num(r['rps'], 2))} | {col(kr, lambda r: num(r['rps'], 2))} "
          f"| {col(nr, lambda r: num(r['rps'], 2))} "
          f"| **{ratio(k_ and k_['rps'], d_ and d_['rps'])}**{verdict(kd, 10)} "
          f"| **{ratio(k_ and k_['rps'], n_ and n_['rps'], 2)}**{verdict(kn, 0.9)} "
          f"| {three(lambda r: r['mbps'])} | {col(dr, lat, False)} | {col(kr, turn_latencies, False)} "
          f"| {col(nr, turn_latencies, False)} "
          f"| {ups(d_) if d_ else '–'} / {ups(k_) if k_ else '–'} | {how(k_) if k_ else '–'} "
          f"| {' / '.join(num(cpu(r)[0], 0) if r else '–' for r in (d_, k_, n_))} "
          f"| {' / '.join(num(cpu(r)[1], 0) if r else '–' for r in (d_, k_, n_))} |")
        if d_ and k_ and not same_items(d_, k_):
            notes.append(f"{enc} c={c}: kache's items differ from the API server's "
                         f"({k_['sample'].get('items')} items, {k_['sample'].get('itemBytes')} B vs "
                         f"{d_['sample'].get('items')} items, {d_['sample'].get('itemBytes')} B)")
        if c == 1 and (d_ or k_):
            line = f"{enc}: " + "; ".join(f"{side} {said(r)}" for side, r in ran.items())
            if d_ and k_:
                line += "; kache's items and the API server's are " + ("byte-identical" if same_items(d_, k_) else "**different**")
            if n_ and captured:
                nginx_same = n_["sample"].get("bodyHash") == captured.get("bodyHash") and \
                    n_["sample"].get("contentType") == captured.get("contentType")
                kache_same = k_ and k_["sample"].get("bodyHash") == captured.get("bodyHash")
                line += ("; nginx sent the captured answer byte for byte with kache's Content-Type" if nginx_same
                         else "; **nginx's answer differs from the captured one**")
                line += (", and kache still answers those very bytes" if kache_same
                         else ("; **kache's answer changed since the capture**" if k_ else ""))
            answers.append(line)
p("")
p("Answers (one full response per cell, decoded; items compared as a set, since v1.20 lists rv=0 in "
  "hash-map order and kache by namespace and name; whole bodies by a hash):")
p("")
for a in answers:
    p(f"- {a}")
p("")


def rss_of(r, name):
    """NAME's RSS at a cell's start → its peak (sampled every 100 ms), or None."""
    x = (r.get("rssKb") or {}).get(name) if r and not not_run(r) else None
    if not x or not x.get("start"):
        return None
    return f"{x['start'] / 1048576:,.2f} → {(x.get('peak') or 0) / 1048576:,.2f} GiB"


mem = []
for enc in ("json", "protobuf"):
    for c in (1, 8):
        d_ = rss_of(load(f"list-{enc}-c{c}-direct"), "apiserver")
        k_ = rss_of(turns(f"list-{enc}-c{c}-kache"), "kache")
        if d_ or k_:
            mem.append(f"{enc} c={c}: API server {d_ or '–'} (direct), kache {k_ or '–'}")
if mem:
    p("RSS of the serving process during its cells (start → peak, sampled every 100 ms): " + "; ".join(mem) + ".")
    p("")

# 1b -----------------------------------------------------------------------
pd, pk = turns("passthrough-direct"), turns("passthrough-kache")
if pd is not None or pk is not None:
    p(f"## 1b. Consistent `GET /api/v1/pods` (no resourceVersion: a quorum read from etcd, which kache forwards), "
      f"1 client, in turns (direct, kache, kache, direct), each {m['duration'] // 2} s or "
      f"{(m.get('passthroughMax', 0) + 1) // 2} requests")
    p("")
    p("| | req/s | MB/s | p50 / p99 ms, each turn | upstream pod LISTs | how kache answered | server CPU ms/request "
      "| client CPU ms/request | RSS start → peak: API server; kache | answer |")
    p("|---|---|---|---|---|---|---|---|---|---|")
    for side, r in (("direct", pd), ("through kache", pk)):
        why = not_run(r)
        if why:
            p(f"| {side} | {why} | | | | | | | | |")
            continue
        errors(f"consistent LIST {side}", r)
        p(f"| {side} | {num(r['rps'], 2)} | {num(r['mbps'])} | {turn_latencies(r)} | {ups(r)} "
          f"| {how(r) if side != 'direct' else ''} | {num(cpu(r)[0], 0)} | {num(cpu(r)[1], 0)} "
          f"| {rss_of(r, 'apiserver') or '–'}; {rss_of(r, 'kache') or '–'} | {said(r)} |")
    ok = not not_run(pd) and not not_run(pk)
    x = pk["rps"] / pd["rps"] if ok and pd["rps"] else None
    p(f"| **kache ÷ direct** (target ≥ 0.95×) | **{ratio(x, 1, 2) if x else '–'}**{verdict(x, 0.95)} "
      "| | | | | | | | |")
    p("")
    p("(The items of a consistent read are not compared: they are the same pods, listed by etcd in key order on "
      "both sides.)")
    p("")

# 1c -----------------------------------------------------------------------
sel_rows = []
for kind in ("label", "field"):
    size = load(f"selector-{kind}-size")
    for c in (1, 8):
        sd, sk = load(f"selector-{kind}-c{c}-direct"), load(f"selector-{kind}-c{c}-kache")
        if sd is not None or sk is not None:
            sel_rows.append((kind, size, c, sd, sk))
if sel_rows:
    p(f"## 1c. `GET /api/v1/pods?resourceVersion=0` with a selector ({m['duration']} s per cell, as in 1)")
    p("")
    p("| selector | clients | answer | direct req/s | kache req/s | **kache / direct** | direct p50 / p99 ms "
      "| kache p50 / p99 ms | upstream LISTs direct / kache | how kache answered "
      "| server CPU ms/request direct / kache | same items |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, size, c, sd, sk in sel_rows:
        sel = m.get("labelSelector" if kind == "label" else "fieldSelector", "?")
        d_ = sd if not not_run(sd) else None
        k_ = sk if not not_run(sk) else None
        for side, r in (("direct", d_), ("kache", k_)):
            errors(f"{kind} selector c={c} {side}", r)
        answer = f"{size['items']:,} pods, {mb(size['bodyBytes'])}" if size else "?"
        same = "yes" if same_items(d_, k_) else ("**no**" if d_ and k_ else "–")
        p(f"| {kind} `{sel}` | {c} | {answer} | {col(sd, lambda r: num(r['rps'], 2))} "
          f"| {col(sk, lambda r: num(r['rps'], 2))} | **{ratio(k_ and k_['rps'], d_ and d_['rps'])}** "
          f"| {col(sd, lat, False)} | {col(sk, lat, False)} | {ups(d_) if d_ else '–'} / {ups(k_) if k_ else '–'} "
          f"| {how(k_) if k_ else '–'} | {num(cpu(d_)[0], 0) if d_ else '–'} / {num(cpu(k_)[0], 0) if k_ else '–'} "
          f"| {same} |")
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
if m.get("hwmJsonKb"):
    peak_ratio = m["hwmJsonKb"] / m["rssJsonKb"]
    growth_ratio = growth_json / raw["itemBytes"]
    p(f"Filling the JSON pod store ({raw['items']:,} pods, {mb(raw['itemBytes'])} of items; kache's first "
      "list selected no pod, so the peak is the sync's own):")
    p("")
    p("| fill time | RSS before | peak (`VmHWM`) right after the fill | RSS after | **peak during sync ÷ RSS after** "
      "(target ≤ 1.5×) | **RSS growth ÷ raw bytes of the items held** (target ≤ 1.3×) |")
    p("|---|---|---|---|---|---|")
    p(f"| {m.get('fillSecondsJson')} s | {mib(m['rssIdleKb'])} | {mib(m['hwmJsonKb'])} | {mib(m['rssJsonKb'])} "
      f"| **{peak_ratio:.2f}×**{verdict(peak_ratio, 1.5, False)} "
      f"| **{growth_ratio:.2f}×**{verdict(growth_ratio, 1.3, False)} |")
    p("")
p("| kache RSS (`VmRSS`) | idle | JSON pods cached | + protobuf pods cached | after scenario 1 | at the end |")
p("|---|---|---|---|---|---|")
p(f"| current (peak `VmHWM`) | {mib(m['rssIdleKb'])} | {mib(m['rssJsonKb'])} | {mib(m['rssFilledKb'])} "
  f"| {mib(m['rssAfterLoadKb'])} ({mib(m['hwmAfterLoadKb'])}) | {mib(m['rssEndKb'])} ({mib(m['hwmEndKb'])}) |")
p(f"| growth ÷ raw JSON | | **{growth_json / raw['itemBytes']:.2f}×** | {growth_all / raw['itemBytes']:.2f}× | | |")
p("")
if m.get("filesAfterLoadKb") is not None:
    p(f"Besides its RSS, after scenario 1 kache held {mib(m['filesAfterLoadKb'])} of list files: the unfiltered "
      "lists, copied once per version into sealed memory files that plain HTTP/1 answers are sent from with "
      "`sendfile` (shared memory, counted in the memory budget with the store; let go of after 30 s unused).")
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
