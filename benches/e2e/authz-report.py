#!/usr/bin/env python3
"""Renders the JSON results of benches/e2e/authz.sh as a markdown report."""

import glob
import json
import math
import os
import re
import sys

d = sys.argv[1]
m = json.load(open(os.path.join(d, "machine.json")))
setup = json.load(open(os.path.join(d, "setup.json")))
SIDES = [
    ("direct", "API server directly (HTTPS, each user's token)"),
    ("local-http", "kache local mode, HTTP, no authentication"),
    ("local-https", "kache local mode, HTTPS, no authentication"),
    ("shared-rbac", "kache shared mode, `--authorization rbac`"),
    ("shared-sar", "kache shared mode, `--authorization sar`"),
]
REQUESTS = [
    ("get", f"rv=0 GET of one configmap"),
    ("list", f"rv=0 LIST of {setup['configmaps']} configmaps"),
]


def rounds(req, side):
    out = []
    for path in sorted(glob.glob(os.path.join(d, f"{req}-{side}-r*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def num(x, digits=2):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def spread(xs, digits=2):
    """The mean of the rounds, with their range when there are several."""
    mu = mean(xs)
    if mu is None:
        return "–"
    if len(xs) < 2:
        return num(mu, digits)
    return f"{num(mu, digits)} ({num(min(xs), digits)}–{num(max(xs), digits)})"


def pct(a, b):
    if a is None or not b:
        return "–"
    return f"{(a / b - 1) * 100:+.0f} %"


def metric(runs, pattern):
    """The sum over rounds of kache's metric series matching `pattern` (a regex)."""
    total = 0.0
    for r in runs:
        for series, v in (r.get("kacheMetrics") or {}).items():
            if re.fullmatch(pattern, series):
                total += v
    return total


def per(numerator, denominator, scale=1e6):
    return numerator / denominator * scale if denominator else None


out = []
p = out.append
p("# kache authorization-overhead benchmark")
p("")
p(f"- Date: {m['date']}; machine: {m['nproc']} CPUs ({m['cpu']}), {m['memTotalKb'] / 1048576:.0f} GiB RAM, "
  f"load average at the start {m['loadavgStart']}, at the end {m['loadavg']}")
p(f"- API server: kube-apiserver {m['apiserver']} + etcd on 127.0.0.1 (audit log on, blocking); kache: {m['kache']}")
p(f"- {m['users']} users: service accounts `reader-00`… in `{m['namespace']}`, each bound by its own RoleBinding "
  f"to a Role that may get/list/watch configmaps, each with a token freshly issued (TokenRequest) for every cell; "
  f"{setup['configmaps']} configmaps of ~{setup['configmapBytes']} B of data")
p(f"- Each cell: one closed-loop client per user (HTTP/1.1, its own keep-alive connection, JSON, no gzip) "
  f"for {m['duration']} s; {m['rounds']} round(s), the second in the opposite order of configurations; "
  f"values are the mean of the rounds (range in parentheses). Everything shares the machine's cores.")
p(f"- kache preloads configmaps (`cache.preload: [v1/configmaps]`), upstream as the admin client certificate; "
  f"shared mode: `--tls`, `--forward impersonate`, token cache {m['tokenTtl']} s, "
  f"authorization cache {m['authzTtl']} s")
p("")

p("## Latency and throughput")
p("")
p("| request | configuration | req/s | p50 ms | p99 ms | p50 vs local HTTP | p50 vs local HTTPS | kache CPU µs/request |")
p("|---|---|---:|---:|---:|---:|---:|---:|")
for req, req_name in REQUESTS:
    base = {}
    for side in ("local-http", "local-https"):
        base[side] = mean([r["latency"]["p50_ms"] for r in rounds(req, side)])
    for side, side_name in SIDES:
        runs = rounds(req, side)
        if not runs:
            continue
        p50s = [r["latency"]["p50_ms"] for r in runs]
        p50 = mean(p50s)
        kache_cpu = per(sum(r["cpuSeconds"].get("kache", 0) for r in runs), sum(r["requests"] for r in runs)) \
            if side != "direct" else None
        rel_http = pct(p50, base["local-http"]) if side not in ("direct", "local-http") else ""
        rel_https = pct(p50, base["local-https"]) if side.startswith("shared") else ""
        p(f"| {req_name} | {side_name} | {spread([r['rps'] for r in runs], 0)} | {spread(p50s, 3)} "
          f"| {spread([r['latency']['p99_ms'] for r in runs], 2)} | {rel_http} | {rel_https} | {num(kache_cpu, 1)} |")
p("")
p("*p50/p99*: time from sending a request to the last byte of its body, nearest rank over the cell's "
  "requests. *kache CPU µs/request*: user + system CPU of the kache process during the timed loop ÷ requests. "
  "Local mode over HTTPS is there to separate the cost of TLS from that of authentication and authorization.")
p("")

p("## Upstream reviews")
p("")
p("| request | configuration | client requests | TokenReviews | SubjectAccessReviews | reviews per 1,000 requests | other upstream requests |")
p("|---|---|---:|---:|---:|---:|---|")
for req, req_name in REQUESTS:
    for side, side_name in SIDES:
        runs = rounds(req, side)
        if not runs:
            continue
        client = sum(r["requests"] + r["firstRequests"] for r in runs)
        tr = sum(r["tokenReviews"] for r in runs)
        sar = sum(r["subjectAccessReviews"] for r in runs)
        other = {}
        for r in runs:
            for kind, n in r["upstream"].items():
                if not kind.endswith("reviews"):
                    other[kind] = other.get(kind, 0) + n
        other_text = ", ".join(f"{k}: {n:,}" for k, n in sorted(other.items())) or "0"
        if side.startswith("shared"):
            tr_bound = sum(r["users"] * math.ceil(r["windowSeconds"] / m["tokenTtl"]) for r in runs)
            sar_bound = sum(r["users"] * math.ceil(r["windowSeconds"] / m["authzTtl"]) for r in runs)
            tr_text, sar_text = f"{tr} (≤ {tr_bound})", f"{sar} (≤ {sar_bound})"
        else:
            tr_text, sar_text = str(tr), str(sar)
        p(f"| {req_name} | {side_name} | {client:,} | {tr_text} | {sar_text} "
          f"| {num(per(tr + sar, client, 1e3), 3)} | {other_text} |")
p("")
p("Counted in the API server's audit log (`ResponseComplete` lines) between two sentinel requests, one "
  "sent before each user's first request of the cell and one after the last answer, each waited for in the "
  "log. *client requests* include each user's first request (untimed, cold token). The bound is one review "
  "per user per TTL of the window (users × ⌈window ÷ TTL⌉, summed over rounds). Going directly, the API "
  "server authenticates and authorizes in-process: no review requests, but every request is one upstream "
  "request.")
p("")

p("## Where kache's time goes")
p("")
p("| request | configuration | handler µs/request | authentication µs (cached token) | authorization µs (from memory) "
  "| TokenReview ms | SubjectAccessReview ms | kache CPU µs/request | load generator CPU µs/request |")
p("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for req, req_name in REQUESTS:
    for side, side_name in SIDES:
        if side == "direct":
            continue
        runs = rounds(req, side)
        if not runs:
            continue
        n = sum(r["requests"] for r in runs)
        handler = per(metric(runs, r"kache_http_request_duration_seconds_sum\{.*"),
                      metric(runs, r"kache_http_request_duration_seconds_count\{.*"))
        authn = per(metric(runs, r'kache_authentication_duration_seconds_sum\{source="cache"\}'),
                    metric(runs, r'kache_authentication_duration_seconds_count\{source="cache"\}'))
        authz = per(metric(runs, r'kache_authorization_duration_seconds_sum\{source="(rbac|cache)"\}'),
                    metric(runs, r'kache_authorization_duration_seconds_count\{source="(rbac|cache)"\}'))
        tr = per(metric(runs, r'kache_authentication_duration_seconds_sum\{source="tokenreview"\}'),
                 metric(runs, r'kache_authentication_duration_seconds_count\{source="tokenreview"\}'), 1e3)
        sar = per(metric(runs, r'kache_authorization_duration_seconds_sum\{source="sar"\}'),
                  metric(runs, r'kache_authorization_duration_seconds_count\{source="sar"\}'), 1e3)
        kache_cpu = per(sum(r["cpuSeconds"].get("kache", 0) for r in runs), n)
        gen_cpu = per(sum(r["cpuSeconds"].get("loadgen", 0) for r in runs), n)
        p(f"| {req_name} | {side_name} | {num(handler, 1)} | {num(authn, 1)} | {num(authz, 1)} | {num(tr, 1)} "
          f"| {num(sar, 1)} | {num(kache_cpu, 1)} | {num(gen_cpu, 1)} |")
p("")
p("From kache's `/metrics` (sum ÷ count of `kache_http_request_duration_seconds` — the handler, from the "
  "request's head to the response's head, body not included — and of `kache_authentication_duration_seconds` / "
  "`kache_authorization_duration_seconds` by source) over the cells' windows.")

errors = {}
for path in glob.glob(os.path.join(d, "*-r*.json")):
    with open(path) as f:
        r = json.load(f)
    for k, v in r.get("errors", {}).items():
        errors[f"{os.path.basename(path)[:-5]}: {k}"] = v
if errors:
    p("")
    p("Errors: " + "; ".join(f"{k} ×{v}" for k, v in sorted(errors.items())))
print("\n".join(out))
