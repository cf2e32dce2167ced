#!/usr/bin/env python3
"""Markdown report of benches/e2e/watch.sh from its JSON directory.

    python3 benches/e2e/watch-report.py target/bench-watch/json > benches/e2e/watch-results.md
"""

import json
import os
import sys


def load(directory, name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def num(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, float) and value != value:  # NaN
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{int(round(value)):,}"
    return f"{value:,.{digits}f}"


def mb(kb):
    return "–" if kb is None else f"{kb / 1024:,.1f} MB"


def kb_value(kb):
    if kb is None:
        return "–"
    return f"{kb / 1024:,.1f} MB" if abs(kb) >= 10240 else f"{kb:,.1f} KB"


def per(value, count, scale=1.0, digits=1):
    if value is None or not count:
        return "–"
    return num(value * scale / count, digits)


def latency_cell(summary, key):
    return num(summary.get(key), 1) if summary else "–"


def fanout_section(d, machine):
    cells = []
    for transport in machine.get("transports", "http1").split(","):
        for enc in machine.get("encodings", "json").split(","):
            name = f"{enc}-h2" if transport == "http2" else enc
            for side in ("kache", "direct"):
                cell = load(d, f"fanout-{side}-{name}.json")
                if cell:
                    cell["name"] = f"{side} {enc}" + (" HTTP/2" if cell.get("http2Streams") else "")
                    cells.append(cell)
    if not cells:
        return []
    setup = load(d, "fanout-setup.json") or {}
    out = [
        "## 1. Fan-out: watchers of one namespace's pods",
        "",
        f"{cells[0]['objects']} pods (~4 KB each) in namespace `{setup.get('namespace', 'watch-bench')}`; "
        "each watcher its own HTTP/1.1 connection"
        + (f" (HTTP/2 cells: {machine.get('h2Streams')} watchers to a connection, as client-go multiplexes its watches)"
           if any(c.get("http2Streams") for c in cells) else "")
        + ", `watch=true&resourceVersion=<rv=0 LIST's>&allowWatchBookmarks=true`; "
        f"then {cells[0]['changes']} PATCHes (an annotation with the change id and send time) straight at the API server, "
        f"{num(cells[0]['rate'], 0)}/s open loop, round-robin over the pods. "
        "Latency: per event per watcher, receive time minus the PATCH response's arrival (one process, one clock); "
        "negative when the event arrived first.",
        "",
    ]
    header = ["", *[c["name"] for c in cells]]
    rows = []

    def row(label, f):
        rows.append([label, *[f(c) for c in cells]])

    row("watchers connected / asked", lambda c: f"{c['connected']:,} / {c['watchers']:,}")
    row("connect + register, s", lambda c: f"{num(c['connectSeconds'], 1)} + {num(c['registeredSeconds'], 1)}")
    row("changes written (achieved rate /s)", lambda c: f"{c['written']:,} ({num(c['achievedRate'], 1)})")
    row("PATCH latency p50 / p99, ms", lambda c: f"{num(c['writeLatency']['p50_ms'])} / {num(c['writeLatency']['p99_ms'])}")
    row("events delivered / expected", lambda c: f"{c['delivered']:,} / {c['expected']:,}")
    row("**missing / out of order / duplicates**", lambda c: f"**{c['missing']} / {c['outOfOrder']} / {c['duplicates']}**")
    row("watchers with every change", lambda c: f"{c['completeWatchers']:,}")
    row("watches ended early", lambda c: str(sum(c["watchesEnded"].values())) if c["watchesEnded"] else "0")
    row("delivery latency p50, ms", lambda c: latency_cell(c["latencyFromAnswer"], "p50_ms"))
    row("delivery latency p90, ms", lambda c: latency_cell(c["latencyFromAnswer"], "p90_ms"))
    row("**delivery latency p99, ms**", lambda c: f"**{latency_cell(c['latencyFromAnswer'], 'p99_ms')}**")
    row("delivery latency max, ms", lambda c: latency_cell(c["latencyFromAnswer"], "max_ms"))
    row("events before the PATCH answer", lambda c: f"{c['latencyFromAnswer'].get('negative', 0):,}")
    row("latency from send p50 / p99, ms", lambda c: f"{latency_cell(c['latencyFromSend'], 'p50_ms')} / {latency_cell(c['latencyFromSend'], 'p99_ms')}")
    row("time from first change to last delivery, s", lambda c: num(c["deliverySeconds"], 1))
    row("events delivered per second", lambda c: num(c["delivered"] / c["deliverySeconds"], 0) if c["deliverySeconds"] else "–")

    def cpu(name):
        return lambda c: num(c["cpuSeconds"].get(name), 2) if c["cpuSeconds"].get(name) is not None else "–"

    row("kache CPU, s", cpu("kache"))
    row("API server CPU, s", cpu("apiserver"))
    row("etcd CPU, s", cpu("etcd"))
    row("bench client CPU, s", cpu("client"))
    row("**serving CPU per delivered event, µs**",
        lambda c: "**" + per(c["cpuSeconds"].get("kache" if c["side"] == "kache" else "apiserver"), c["delivered"], 1e6) + "**")
    row("serving CPU per change, ms",
        lambda c: per(c["cpuSeconds"].get("kache" if c["side"] == "kache" else "apiserver"), c["written"], 1e3, 2))
    row("API server CPU per change, ms", lambda c: per(c["cpuSeconds"].get("apiserver"), c["written"], 1e3, 2))

    def total_cpu(c):
        parts = [c["cpuSeconds"].get(k) for k in ("kache", "apiserver", "etcd")]
        return sum(p for p in parts if p is not None)

    row("kache + API server + etcd CPU per change, ms", lambda c: per(total_cpu(c), c["written"], 1e3, 2))
    row("server RSS idle", lambda c: mb(c["rssIdleKb"]))
    row("server RSS, watchers connected", lambda c: mb(c["rssConnectedKb"]))
    row("**per idle watcher**",
        lambda c: "**" + (kb_value((c["rssConnectedKb"] - c["rssIdleKb"]) / c["connected"])
                          if c["rssConnectedKb"] and c["rssIdleKb"] and c["connected"] else "–") + "**")
    row("server RSS after the changes", lambda c: mb(c["rssAfterKb"]))
    row("API server RSS idle → connected → after",
        lambda c: f"{mb(c['apiserverRssIdleKb'])} → {mb(c['apiserverRssConnectedKb'])} → {mb(c['apiserverRssAfterKb'])}")

    def upstream(c):
        w = c["apiserverPodWatches"]
        if c["side"] == "kache":
            return f"**{num(w['connected'] - w['baseline'], 0)}**"
        return f"{num(w['connected'] - w['atStart'], 0)}"

    row("pod watches at the API server while connected (kache: its own, must be 1; direct: the watchers')", upstream)
    row("bytes received per watcher", lambda c: f"{c['bytesReceived'] / max(c['connected'], 1) / 1e6:,.1f} MB")
    row("load average (1 min) at the cell's start / end", lambda c: f"{num(c.get('loadavgStart'), 2)} / {num(c.get('loadavgEnd'), 2)}")
    out += [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    notes = []
    for c in cells:
        if c["connectErrors"]:
            notes.append(f"- {c['name']}: connect errors {c['connectErrors']}")
        if c["writeErrors"]:
            notes.append(f"- {c['name']}: write errors {c['writeErrors']}")
        if c["watchesEnded"]:
            notes.append(f"- {c['name']}: watches ended early {c['watchesEnded']}")
        if c["errorEvents"] or c["otherEvents"] or c["foreign"] or c["unexpected"]:
            notes.append(
                f"- {c['name']}: {c['errorEvents']} ERROR events, {c['otherEvents']} other events, "
                f"{c['foreign']} of another cell, {c['unexpected']} of failed writes")
        if c["achievedRate"] < 0.9 * c["rate"]:
            notes.append(
                f"- {c['name']}: the writer reached {num(c['achievedRate'], 1)} changes/s of the "
                f"{num(c['rate'], 0)} asked (PATCH p99 {num(c['writeLatency']['p99_ms'])} ms): the API server could not "
                "keep up, so its delivery latency is at a lower rate than kache's.")
        if not c["registered"]:
            notes.append(f"- {c['name']}: not every watcher showed as registered within 60 s")
    if machine.get("directWatchers") != machine.get("watchers"):
        notes.append(f"- The direct cells used {machine.get('directWatchers')} watchers (the API server's open-file limit "
                     f"is {machine.get('apiserverNofile')}).")
    if notes:
        out += ["Notes:", "", *notes, ""]
    return out


def sync_section(d):
    modes = [m for m in (load(d, "sync-classic.json"), load(d, "sync-stream.json")) if m]
    if not modes:
        return []
    first = modes[0]
    names = {"classic": "rv=0 LIST + WATCH", "stream": "streaming list (sendInitialEvents)"}
    out = [
        "## 2. Sync memory: LIST+WATCH vs streaming list",
        "",
        f"{first['syncers']} clients released together, each syncing `{first['path']}` ({first['items']:,} pods) "
        "through a freshly started kache whose pod store was filled first; kache's peak RSS reset "
        "(`/proc/PID/clear_refs`) before the clients and sampled every 50 ms.",
        "",
    ]
    header = ["", *[names[m["mode"]] for m in modes]]
    rows = []

    def row(label, f):
        rows.append([label, *[f(m) for m in modes]])

    def upstream(m):
        u = m.get("upstream")
        if not u:
            return "–"
        if "error" in u:
            return u["error"]
        if not u["byKind"]:
            return "0"
        return f"{u['total']}: " + ", ".join(f"{k} ×{v}" for k, v in sorted(u["byKind"].items()))

    row("clients synced with the API server's set", lambda m: f"**{m['matching']} / {m['syncers']}**")
    row("missing / extra items (all clients)", lambda m: f"{m['missing']} / {m['extra']}")
    row("errors", lambda m: str(sum(m["errors"].values())) if m["errors"] else "0")
    row("time to synced p50, s", lambda m: num((m["timeToSynced"].get("p50_ms") or 0) / 1e3, 2))
    row("**time to synced p99, s**", lambda m: "**" + num((m["timeToSynced"].get("p99_ms") or 0) / 1e3, 2) + "**")
    row("wall time for all, s", lambda m: num(m["wallSeconds"], 2))
    row("bytes received per client", lambda m: f"{(m['bytesPerClient']['max'] or 0) / 1e6:,.1f} MB")
    row("kache RSS before", lambda m: mb(m["rssBeforeKb"]))
    row("**kache peak RSS (sampled)**", lambda m: f"**{mb(m['rssPeakSampledKb'])}**")
    row("**kache RSS growth to the peak**",
        lambda m: "**" + (mb(m["rssPeakSampledKb"] - m["rssBeforeKb"]) if m["rssPeakSampledKb"] and m["rssBeforeKb"] else "–") + "**")
    row("per client", lambda m: (kb_value((m["rssPeakSampledKb"] - m["rssBeforeKb"]) / m["syncers"])
                                 if m["rssPeakSampledKb"] and m["rssBeforeKb"] else "–"))
    row("kache VmHWM once synced (reset before)", lambda m: mb(m["hwmSyncedKb"]) + ("" if m["hwmReset"] else " (not reset)"))
    row("kache RSS once synced (their watches still open)", lambda m: mb(m["rssSyncedKb"]))
    row("kache RSS 2 s after the clients left", lambda m: mb(m.get("rssReleasedKb")))
    row("kache CPU, s", lambda m: num(m["cpuSeconds"].get("kache"), 2))
    row("API server CPU, s", lambda m: num(m["cpuSeconds"].get("apiserver"), 2))
    row("requests kache sent upstream", upstream)
    row("load average (1 min) at the start / end", lambda m: f"{num(m.get('loadavgStart'), 2)} / {num(m.get('loadavgEnd'), 2)}")
    out += [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    for m in modes:
        if m["errors"]:
            out += [f"- {names[m['mode']]}: errors {m['errors']}"]
    return out


def main():
    d = sys.argv[1]
    machine = load(d, "machine.json") or {}
    out = [
        "# kache watch benchmark",
        "",
        f"Measured {machine.get('date', '?')} by `benches/e2e/watch.sh` on {machine.get('nproc', '?')} cores "
        f"({machine.get('cpu', '?')}), {machine.get('memTotalKb', 0) / 1048576:.0f} GB; load average at the start "
        f"{machine.get('loadavgStart', '?')}, at the end {machine.get('loadavg', '?')}. "
        f"API server {machine.get('apiserver', '?')} with etcd on loopback; kache: {machine.get('kache', '?')}. "
        f"{machine.get('wallSeconds', '?')} s in all. Every process shares the same cores, the bench's clients too.",
        "",
        "What each number means: the top comment of `benches/e2e/watch.sh`.",
        "",
    ]
    out += fanout_section(d, machine)
    out += sync_section(d)
    print("\n".join(out))


if __name__ == "__main__":
    main()
