#!/usr/bin/env python3
"""Renders the JSON results of benches/e2e/restarts.sh as a markdown report."""

import json
import os
import re
import statistics
import sys

d = sys.argv[1]


def load(name):
    path = os.path.join(d, name + ".json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def load_lines(name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def num(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:
        return "–"
    if isinstance(x, int) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def mb(n):
    return "–" if n is None else f"{n / 1e6:,.1f} MB"


def counts(m):
    """A {kind: n} map as `kind n, kind n`, biggest first."""
    if not m:
        return "0"
    return ", ".join(f"{k} {v:,}" for k, v in sorted(m.items(), key=lambda kv: (-kv[1], kv[0])))


def kache_watch_answers(first):
    """How each kache process of the chaos run answered the informers' WATCH
    requests, from its access log (`=== … start N ===` marks each process)."""
    if len(sys.argv) < 3 or not os.path.exists(sys.argv[2]):
        return None
    start, out = 0, {}
    with open(sys.argv[2], errors="replace") as f:
        for line in f:
            mark = re.match(r"=== \S+ start (\d+) ===", line)
            if mark:
                start = int(mark.group(1))
                continue
            if (start < first or 'verb="watch"' not in line or "kache-e2e/informer" not in line
                    or "outcome=" not in line):
                continue
            outcome = re.search(r'outcome="([a-z_]+)"', line).group(1)
            reason = re.search(r' cache="([a-z_]+)"', line)
            code = re.search(r"status=(\d+)", line)
            key = outcome + (f" ({reason.group(1)})" if reason and outcome != "cache" else "")
            if code and code.group(1) != "200":
                key += f" {code.group(1)}"
            n = out.setdefault(str(start - first + 1), {})
            n[key] = n.get(key, 0) + 1
    return out


m = load("machine")
raw = load("rawsize")
out = []
p = out.append

p("# kache restarts and outages benchmark")
p("")
p(f"- Date: {m['date']}; machine: {m['nproc']} CPUs ({m['cpu']}), {m['memTotalKb'] / 1048576:.0f} GiB RAM, "
  f"load average at the start {m['loadavgStart']}, at the end {m['loadavg']}; the whole run took "
  f"{m['wallSeconds'] // 60} min {m['wallSeconds'] % 60} s (build and cluster start included)")
p(f"- API server: kube-apiserver {m['apiserver']} + etcd on 127.0.0.1 (its own cluster: this benchmark restarts "
  f"the API server and compacts etcd); kache: {m['kache']}, local mode on 127.0.0.1 (plain HTTP), default "
  f"settings but `cache.snapshotIntervalSeconds: {m['snapshotInterval']}`")
if raw:
    p(f"- Data: {raw['items']:,} pods ({m['pods']:,} in `bench-00`…`bench-09` plus sentinel and chaos pods), "
      f"{mb(raw['bodyBytes'])} as one JSON list")
p("- Everything runs on the same machine (clients, kache, API server, etcd); other users' builds may have been "
  "running too: see the load average.")
p("")

# 1 ------------------------------------------------------------------------
starts = {kind: [] for kind in ("cold", "warm", "warm-eager", "warm-store")}
start_labels = {
    "cold": "cold: empty state directory",
    "warm": "warm: the snapshot of the run before (stopped by SIGTERM)",
    "warm-eager": "warm, first LIST as soon as kache accepts connections",
    "warm-store": "warm, first LIST held back until `/debug/cache` lists the restored pod store",
}
for kind in starts:
    for rep in range(1, m["reps"] + 1):
        r, up, proc = load(f"start-{kind}-{rep}"), load(f"start-{kind}-{rep}-upstream"), load(f"start-{kind}-{rep}-process")
        if r and up and proc:
            starts[kind].append((r, up, proc))


def kache_requests(up):
    """kache's own upstream requests (user admin), by kind."""
    return up["byUser"].get("admin", {})


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"**{med(values):.{digits}f}** ({', '.join(f'{v:.{digits}f}' for v in values)})"


if any(starts.values()):
    p(f"## 1. Cold vs warm start ({m['reps']} repetitions each, median and the runs)")
    p("")
    p("| start | time to the first cached rv=0 LIST of all pods, s | of which that LIST, s | upstream LIST pods "
      "| upstream WATCH pods | other upstream requests | kache peak RSS (VmHWM) | RSS after the LIST |")
    p("|---|---|---|---|---|---|---|---|")
    for kind, runs in starts.items():
        if not runs:
            continue
        label = start_labels[kind]
        lists = [kache_requests(up).get("list pods", 0) for _, up, _ in runs]
        watches = [kache_requests(up).get("watch pods", 0) for _, up, _ in runs]
        others = [sum(v for k, v in kache_requests(up).items() if k not in ("list pods", "watch pods"))
                  for _, up, _ in runs]
        p(f"| {label} | {spread([r['seconds'] for r, _, _ in runs])} "
          f"| {med([r['listSeconds'] for r, _, _ in runs]):.2f} "
          f"| {med(lists):g} ({', '.join(map(str, lists))}) | {med(watches):g} ({', '.join(map(str, watches))}) "
          f"| {med(others):g} | {med([pr['hwmKb'] for _, _, pr in runs]) / 1024:,.0f} MB "
          f"| {med([pr['rssKb'] for _, _, pr in runs]) / 1024:,.0f} MB |")
    p("")
    cold_other = {}
    for _, up, _ in starts["cold"][:1]:
        cold_other = {k: v for k, v in kache_requests(up).items() if k not in ("list pods", "watch pods")}
    warm_other = {}
    for _, up, _ in starts["warm"][:1]:
        warm_other = {k: v for k, v in kache_requests(up).items() if k not in ("list pods", "watch pods")}
    snap = [pr.get("snapshotBytes") for _, _, pr in starts["cold"]]
    forwarded_starts = sum(r["forwarded"] for runs in starts.values() for r, _, _ in runs)
    p("*time*: from just before `kache serve` was started to the last byte of the first `GET /api/v1/pods?"
      "resourceVersion=0` that kache answered from memory (`kache_http_requests_total{outcome=\"cache\"}` grew, "
      f"and it held all {m['totalPods']:,} pods). The first LIST is sent once kache's `/readyz` answers, except "
      "in the *as soon as* row (every 20 ms until kache listens) and the *held back* row; a forwarded answer "
      f"is retried at once ({forwarded_starts} were, over all runs). *upstream*: kache's requests (user `admin`) in the "
      "API server's audit log from its start until it was stopped with SIGTERM, up to a sentinel request's line "
      "(after the API server had no open pod watch left, so that the WATCH's line, written when it ends, is in). "
      f"Other requests of the first run — cold: {counts(cold_other)}; warm: {counts(warm_other)}. "
      f"Snapshot on disk after SIGTERM: {mb(med(snap))}.")
    p("")

# 2 ------------------------------------------------------------------------
watch_runs = [(event, side, load(f"watch-{event}-{side}"), load(f"watch-{event}-{side}-upstream"),
               load(f"watch-{event}-{side}-records"))
              for event in ("restart", "outage") for side in ("direct", "kache")]
watch_runs = [w for w in watch_runs if w[2] and w[3]]
if watch_runs:
    first = watch_runs[0][2]
    p(f"## 2. API server restart under {first['watchers']} informer-style watchers")
    p("")
    p("Watchers: " + "; ".join(f"`{s}`" for s in first["specs"]) + ", round robin. "
      f"*restart*: `tests/cluster/restart-apiserver.sh` (stop, start, wait for `/readyz`); *outage*: the API server "
      f"stopped, etcd compacted at its current revision, {m['outage']} s more down, then started again.")
    p("")
    p("| event | clients connect to | upstream LISTs of pods | upstream WATCHes of pods | other upstream requests "
      "| API server pod bytes sent after its restart (LIST + watch events) | client watch ends | client relists "
      "| clients that relisted | sentinel change seen after p50 / max, s |")
    p("|---|---|---|---|---|---|---|---|---|---|")
    for event, side, r, up, records in watch_runs:
        users = up["byUser"]
        total = {}
        for by_kind in users.values():
            for k, v in by_kind.items():
                total[k] = total.get(k, 0) + v
        lists = sum(v for k, v in total.items() if k.startswith("list pods"))
        watches = sum(v for k, v in total.items() if k.startswith("watch pods"))
        other = {k: v for k, v in total.items() if not (k.startswith("list pods") or k.startswith("watch pods"))}
        by_rv = {}
        for rec in records or []:
            if rec["kind"].startswith("list pods"):
                rv = rec.get("rv")
                key = "rv=0" if rv == "0" else ("consistent" if not rv else "rv=N")
                by_rv[key] = by_rv.get(key, 0) + 1
        ab = r.get("apiserverSinceRestart", {})
        sent = (ab.get("listBytes") or 0) + (ab.get("watchEventBytes") or 0) if "error" not in ab else None
        caused = r["caused"]
        ends = sum(caused["watchEnds"].values())
        relists = sum(caused["relists"].values())
        seen = r["sentinelSeenAfterWrite"]
        missing = f" ({r['sentinelMissing']} never)" if r["sentinelMissing"] else ""
        p(f"| {event} | {'API server directly' if side == 'direct' else 'kache'} "
          f"| **{lists:,}** ({counts(by_rv) if by_rv else '–'}) | {watches:,} | {counts(other)} | {mb(sent)} "
          f"| {ends:,} ({counts(caused['watchEnds'])}) | {relists:,} | {r['clientsThatRelisted']} "
          f"| {num(seen['p50'], 2)} / {num(seen['max'], 2)}{missing} |")
    p("")
    p("*upstream*: every request the API server logged (audit log, `ResponseComplete`) that was received from the "
      "moment the disruption started until the sentinel request's line — after the clients had stopped and, "
      "through kache, kache had been stopped too, so that every WATCH (logged when it ends) is counted; errors "
      f"show their status, e.g. `list pods (503)`. Directly these are the {first['watchers']} clients' requests; "
      "through kache, kache's. *bytes*: `apiserver_response_sizes_sum` (LIST) + `apiserver_watch_events_sizes_sum` "
      "for pods from the restarted API server's `/metrics` when every client had seen the sentinel (so since its "
      "start); every row includes one protobuf LIST of every pod (~32 MB) by the API server's own loopback client, "
      "which the audit policy leaves out. "
      "*watch ends*, *relists*: seen by the clients (a relist is client-go's `ListAndWatch` run again; the "
      "reason is in the raw JSON). *sentinel*: once the API server was ready again, an annotation was set on a pod "
      "of each watched namespace, directly; the time from sending that PATCH until each client's view held it (a "
      "watch event, or a relist).")
    p("")

# 3 ------------------------------------------------------------------------
chaos = load("chaos")
status = load("chaos-status")
timeline = load_lines("chaos-timeline.jsonl")
if chaos or status:
    p("## 3. Chaos")
    p("")
    if not chaos:
        p(f"The chaos clients failed (exit {status['rc'] if status else '?'}): no results; see "
          "`target/bench-restarts/chaos.log`.")
    else:
        t0 = chaos["loopsStartedAt"]
        loops = chaos["loops"]
        p(f"{chaos['clients']} clients through kache for {m['chaosDuration']} s: {chaos['informers']} informer-style "
          f"watchers ({'; '.join(f'`{s}`' for s in chaos['specs'])}), {loops['rv=0 list']} rv=0 LIST loops (a "
          f"`chaos-N` namespace through `team=team-K`), {loops['rv=0 get']} rv=0 GET loops (`bench-NN` pods), "
          f"{loops['consistent list']} consistent LIST loops, {loops['write']} writers (each creates, relabels — "
          "`team` among team-0…3, so objects enter and leave selectors — and deletes 20 pods of its own in a "
          "`chaos-N` namespace). Loops pause 125–375 ms between requests (consistent LISTs 0.5–1.5 s, writers "
          "0.25–0.75 s).")
        p("")
        p("| t, s | disruption | took, s |")
        p("|---:|---|---:|")
        for e in timeline:
            p(f"| {e['start'] - t0:.1f} | {e['event']} | {e['end'] - e['start']:.1f} |")
        p("")

        # kache restarting: from the signal until /readyz answered again, +2 s
        # for clients to reconnect. API server away: from the start of its
        # restart or outage until it was ready again, +10 s for kache to
        # resync its stores (a relist of every pod).
        down = [(e["start"] - 0.5, e["end"] + 2.0) for e in timeline
                if e["event"].startswith("kache-") and not e["event"].startswith("kache-crashed")]
        away = [(e["start"] - 0.5, e["end"] + 10.0) for e in timeline
                if "apiserver" in e["event"] and not e["event"].startswith("skipped")]

        def kache_down(t):
            return any(a <= t <= b for a, b in down)

        def phase(t):
            if kache_down(t):
                return "kache"
            if any(a <= t <= b for a, b in away):
                return "apiserver"
            return "quiet"

        incidents = load_lines("chaos-incidents.jsonl")
        p("### Requests by outcome")
        p("")
        p("| client | ok | expected 404/409 | error status | transport error | failures while kache restarted "
          "/ while the API server was away / otherwise |")
        p("|---|---:|---:|---|---|---|")
        for kind, outcomes in sorted(chaos["outcomes"].items()):
            ok = outcomes.get("ok", 0)
            expected = sum(v for k, v in outcomes.items() if k.startswith("expected"))
            status_errors = {k: v for k, v in outcomes.items() if k[:1].isdigit()}
            transport = {k.split(": ", 1)[1]: v for k, v in outcomes.items() if k.startswith("transport")}
            by_phase = {"kache": 0, "apiserver": 0, "quiet": {}}
            for i in incidents:
                if i["what"] != kind:
                    continue
                ph = phase(i["t"])
                if ph == "quiet":
                    by_phase["quiet"][i["detail"]] = by_phase["quiet"].get(i["detail"], 0) + 1
                else:
                    by_phase[ph] += 1
            quiet = by_phase["quiet"]
            p(f"| {kind} | {ok:,} | {expected:,} | {counts(status_errors)} | {counts(transport)} "
              f"| {by_phase['kache']:,} / {by_phase['apiserver']:,} / **{sum(quiet.values()):,}**"
              f"{' (' + counts(quiet) + ')' if quiet else ''} |")
        st = chaos["informerStats"]
        informer_fail_list = sum(st["listFailures"].values())
        informer_fail_watch = sum(st["watchFailures"].values())
        p(f"| informers: LIST | {sum(st['lists'].values()) - informer_fail_list:,} | | "
          f"{counts({k: v for k, v in st['listFailures'].items() if k[:1].isdigit()})} "
          f"| {counts({k.split(': ', 1)[1]: v for k, v in st['listFailures'].items() if k.startswith('transport')})} | |")
        p(f"| informers: WATCH | {st['watches']:,} | | "
          f"{counts({k: v for k, v in st['watchFailures'].items() if k[:1].isdigit()})} "
          f"| {counts({k.split(': ', 1)[1]: v for k, v in st['watchFailures'].items() if k.startswith('transport')})} | |")
        p("")
        p("*error status*: kache's answers other than 2xx (503 while the API server is unreachable: serve-stale is "
          "off by default, and reads a store cannot answer while it resyncs are forwarded); *transport error*: "
          "`refused` while no kache listened. *while kache restarted*: from its SIGTERM/SIGKILL until its "
          "`/readyz` answered again, plus 2 s; *while the API server was away*: from the start of its restart or "
          "outage until it was ready again, plus 10 s for kache to resync (a relist of every pod).")
        p("")

        p("### Client watches")
        p("")
        ends = {"kache": {}, "apiserver": {}, "quiet": {}}
        relists = {"kache": {}, "apiserver": {}, "quiet": {}}
        for i in incidents:
            if i["what"] in ("watch ended", "relist"):
                target = (ends if i["what"] == "watch ended" else relists)[phase(i["t"])]
                target[i["detail"]] = target.get(i["detail"], 0) + 1
        p("| | while kache restarted | while the API server was away (kache up) | otherwise |")
        p("|---|---|---|---|")
        for label, m_ in (("watch ends", ends), ("relists (by cause)", relists)):
            p(f"| {label} | {sum(m_['kache'].values()):,} ({counts(m_['kache'])}) "
              f"| **{sum(m_['apiserver'].values()):,}** ({counts(m_['apiserver'])}) "
              f"| **{sum(m_['quiet'].values()):,}** ({counts(m_['quiet'])}) |")
        p("")
        forwarded = kache_watch_answers(status["firstKacheStart"]) if status else None
        p(f"Over the run the informers made {counts(st['lists'])} LIST requests and {st['watches']:,} WATCH requests, "
          f"and received {st['events']:,} events. A watch kache ended at SIGTERM (kache ends every watch cleanly "
          "when it stops) or lost at SIGKILL must be resumed: those are counted on the left. A watch kache serves "
          "from memory should not end while kache is up — not at an API server restart, a compaction or kache's "
          "own relist: those are the other two columns (*broken*: the connection failed; *expired*: an ERROR "
          "event, 410; *closed*: the server ended it cleanly). A relist is client-go's `ListAndWatch` run again: "
          "after a 410, a very short watch, or a failed WATCH or LIST request.")
        if forwarded:
            p("")
            p("How kache answered the informers' WATCH requests, per kache process (from its access log): "
              + "; ".join(f"start {k}: {counts(v)}" for k, v in sorted(forwarded.items(), key=lambda kv: int(kv[0])))
              + ". A WATCH that arrives while the store is not synced (`cache=\"not_synced\"`, after waiting "
              "`cache.syncTimeoutSeconds`) or from a version older than the store's event window is forwarded: it "
              "then stays a plain proxied watch of the API server, and ends when the API server restarts.")
        p("")

        p("### Upstream requests per disruption")
        p("")
        records = load("chaos-upstream-records") or []
        events = [e for e in timeline if not e["event"].startswith("skipped")]
        windows = [("before the first disruption", chaos.get("startedAt", t0), events[0]["start"] if events else 1e18)]
        for i, e in enumerate(events):
            windows.append((f"{e['event']} (t={e['start'] - t0:.0f} s)", e["start"],
                            events[i + 1]["start"] if i + 1 < len(events) else 1e18))
        p("| window | kache's LISTs of pods | kache's WATCHes of pods | forwarded client LISTs of pods "
          "| forwarded client WATCHes | forwarded writes | other |")
        p("|---|---|---:|---:|---:|---:|---|")
        for label, a, b in windows:
            rs = [r for r in records if a <= r["t"] < b]
            # kache names itself `kache/<version>` (older builds sent no User-Agent).
            own = [r for r in rs if not r["agent"] or r["agent"].startswith("kache/")]
            fwd = [r for r in rs if r["agent"].startswith("kache-e2e/")]
            own_lists = {}
            for r in own:
                if r["kind"].startswith("list pods"):
                    key = "rv=0" if r.get("rv") == "0" else ("consistent" if not r.get("rv") else "rv=N")
                    if r["code"] >= 400:
                        key += f" ({r['code']})"
                    own_lists[key] = own_lists.get(key, 0) + 1
            own_watches = sum(1 for r in own if r["kind"].startswith("watch pods"))
            fwd_lists = sum(1 for r in fwd if r["kind"].startswith("list pods"))
            fwd_watches = sum(1 for r in fwd if r["kind"].startswith("watch pods"))
            fwd_writes = sum(1 for r in fwd if r["kind"].split(" ")[0] in ("create", "patch", "delete", "update"))
            other = {}
            for r in own:
                if not (r["kind"].startswith("list pods") or r["kind"].startswith("watch pods")):
                    other[r["kind"]] = other.get(r["kind"], 0) + 1
            p(f"| {label} | **{sum(own_lists.values())}** ({counts(own_lists) if own_lists else '–'}) "
              f"| {own_watches} | {fwd_lists:,} | {fwd_watches:,} | {fwd_writes:,} | {counts(other)} |")
        p("")
        p("From the API server's audit log, by the time each request was received, until the next disruption. "
          "*kache's*: requests without a User-Agent (kache's reflectors and discovery); *forwarded*: requests "
          "carrying the clients' User-Agent (consistent LISTs, writes, and reads kache could not answer from "
          "memory at that moment).")
        p("")

        p("### Convergence")
        p("")
        seen = chaos["sentinelSeenAfterWrite"]
        if chaos["converged"]:
            p(f"✅ After the load stopped, a sentinel annotation was set directly on a pod of each watched namespace; "
              f"all {chaos['informers']} informers saw it (after p50 {num(seen['p50'], 2)} s, max "
              f"{num(seen['max'], 2)} s), and then each one's view (namespace, name, resourceVersion of every pod) "
              "equalled a consistent LIST of the same namespace and selector from the API server.")
        else:
            p(f"❌ {len(chaos['failures'])} informer(s) did not converge to the API server's view:")
            p("")
            p("| informer | watches | saw the sentinel | objects / expected | missing | extra | stale |")
            p("|---|---|---|---|---|---|---|")
            for f in chaos["failures"]:
                p(f"| {f['informer']} | `{f['spec']}` | {f['sawSentinel']} | {f['objects']} / {f['expected']} "
                  f"| {f['missingCount']} {f['missing']} | {f['extraCount']} {f['extra']} "
                  f"| {f['staleCount']} {f['stale']} |")
        p("")
    if status:
        crashes = status["kacheCrashes"]
        p(f"kache exited on its own {crashes} time(s); `panicked` lines in its log: {status['panics']}.")
        p("")

print("\n".join(out))
