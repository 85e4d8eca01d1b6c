#!/usr/bin/env python3
"""Turns one bench/run.sh run into a Markdown report and an SVG bar chart.

    python3 bench/report.py RESULTS_DIR

Reads RESULTS_DIR/peers.tsv (bench/peers.sh's results.tsv: peer, mode, "req/s p50 p99 bad",
cpu% gen/proxy/backend, note), RESULTS_DIR/scale.json (bench/scale.sh) and RESULTS_DIR/meta.json
(machine and knobs), any of which may be missing; writes RESULTS_DIR/results.md and
RESULTS_DIR/chart.svg, and prints the Markdown. Standard library only.
"""

import json
import math
import os
import sys
from html import escape

TARGET_SANDBOXES = 100_000
TARGET_WEBSOCKETS = 10_000


def load_peers(path):
    rows = {}
    order = []
    if not os.path.exists(path):
        return rows, order
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 4:
            continue
        peer, mode, res, cpu = parts[:4]
        note = parts[4] if len(parts) > 4 else ""
        f = res.split()
        num = lambda x: None if x in ("-", "ERR") else float(x)
        try:
            rps, p50, p99, bad = num(f[0]), num(f[1]), num(f[2]), f[3]
        except (IndexError, ValueError):
            rps = p50 = p99 = None
            bad = res
        rows[(peer, mode)] = {"rps": rps, "p50": p50, "p99": p99, "bad": bad, "cpu": cpu, "note": note}
        order.append((peer, mode))
    return rows, order


def fmt(x, digits=0, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


class Targets:
    def __init__(self):
        self.rows = []

    def add(self, name, measured, goal, ok, detail=""):
        status = "n/a" if ok is None else ("**met**" if ok else "**not met**")
        self.rows.append((name, measured, goal, status, detail))

    def markdown(self):
        out = ["| target | measured | goal | status | detail |", "|---|---|---|---|---|"]
        out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in self.rows]
        return "\n".join(out)


def ratio_target(t, rows, name, mode, ours, peer, goal):
    a, b = rows.get((ours, mode)), rows.get((peer, mode))
    if not a or not b or not a["rps"] or not b["rps"]:
        t.add(name, "–", f"≥ {goal:g}×", None, f"no {mode} rows for {ours} and {peer}")
        return
    r = a["rps"] / b["rps"]
    t.add(name, f"{r:.2f}×", f"≥ {goal:g}×", r >= goal,
          f"{fmt(a['rps'])} vs {fmt(b['rps'])} req/s (cpu% gen/px/be {a['cpu']} vs {b['cpu']})")


def main(d):
    rows, order = load_peers(os.path.join(d, "peers.tsv"))
    scale = json.load(open(os.path.join(d, "scale.json"))) if os.path.exists(os.path.join(d, "scale.json")) else {}
    meta = json.load(open(os.path.join(d, "meta.json"))) if os.path.exists(os.path.join(d, "meta.json")) else {}

    t = Targets()
    ratio_target(t, rows, "h1 keep-alive: ours / haproxy-tls", "h1", "ours", "haproxy-tls", 1.0)
    ratio_target(t, rows, "h1 keep-alive: ours / haproxy-es256", "h1", "ours", "haproxy-es256", 3.0)
    ratio_target(t, rows, "h2: ours / haproxy-tls", "h2", "ours", "haproxy-tls", 1.0)
    ratio_target(t, rows, "h1 new connection: ours / nginx", "h1new", "ours", "nginx", 1.0)

    fo, fb, fh = rows.get(("ours", "fixed")), rows.get(("backend", "fixed")), rows.get(("haproxy-tls", "fixed"))
    if fo and fb and fo["p99"] is not None and fb["p99"] is not None:
        delta = fo["p99"] - fb["p99"]
        extra = f"; haproxy-tls p99 {fmt(fh['p99'], 2)} ms" if fh else ""
        t.add(f"fixed rate ({meta.get('fixed_rate', '?')} req/s, h1 keep-alive): sandgate p99 − backend p99",
              f"{delta:.2f} ms", "≤ 1 ms", delta <= 1.0,
              f"p99 {fmt(fo['p99'], 2)} vs {fmt(fb['p99'], 2)} ms, p50 {fmt(fo['p50'], 2)} vs {fmt(fb['p50'], 2)} ms{extra} "
              f"(requests due after the first {meta.get('fixed_skip', 1)} s; sandgate {fo['note']})")
    else:
        t.add("fixed rate: sandgate p99 − backend p99", "–", "≤ 1 ms", None, "no fixed-mode rows (needs oha)")

    for mode in ("h1", "h2"):
        a, b = rows.get(("ours", mode)), rows.get(("haproxy-tls", mode))
        if a and b and a["p99"] is not None and b["p99"] is not None:
            t.add(f"saturated {mode} p99: ours ≤ haproxy-tls", f"{a['p99']:.2f} ms", f"≤ {b['p99']:.2f} ms",
                  a["p99"] <= b["p99"], f"p50 {fmt(a['p50'], 2)} vs {fmt(b['p50'], 2)} ms")
        else:
            t.add(f"saturated {mode} p99: ours ≤ haproxy-tls", "–", "", None, "no rows")

    routes = scale.get("routes")
    if routes:
        n = routes["sandboxes"]
        at = "" if n >= TARGET_SANDBOXES else f" (run at {n:,}; the goal is for {TARGET_SANDBOXES:,})"
        rss = max(routes["rss_after_kib"], routes.get("rss_after_wrk_kib", 0)) / 1024
        t.add(f"RSS with {n:,} sandboxes", f"{rss:.0f} MiB", "≤ 200 MiB", rss <= 200,
              f"{routes['rss_before_kib'] / 1024:.0f} MiB before registering{at}")
        b, a = routes["before"]["rps"], routes["after"]["rps"]
        r = a / b if b else 0
        # Requests per second of gateway CPU: steadier than req/s when something else on the
        # machine takes CPU during one of the two runs.
        eff = lambda w: w["rps"] / (w["cpu"]["gateway_pct"] / 100) if w["cpu"]["gateway_pct"] else None
        eb, ea = eff(routes["before"]), eff(routes["after"])
        effs = f"; per gateway core: {fmt(ea)} vs {fmt(eb)} req/s ({ea / eb:.3f}×)" if ea and eb else ""
        t.add(f"h1 through 1 of {n:,} sandboxes vs a single sandbox", f"{r:.3f}×", "≥ 0.95×", r >= 0.95,
              f"{fmt(a)} vs {fmt(b)} req/s{effs}{at}")
    else:
        t.add("RSS with 100k sandboxes", "–", "≤ 200 MiB", None, "skipped")
        t.add("h1 with 100k sandboxes vs one", "–", "≥ 0.95×", None, "skipped")

    ws = scale.get("ws")
    if ws:
        n = ws["opened"]
        at = "" if n >= TARGET_WEBSOCKETS else f" (run at {n:,}; the goal is for {TARGET_WEBSOCKETS:,})"
        t.add(f"{n:,} WebSockets: gateway RSS per connection", f"{ws['per_conn_kib']:.1f} KiB", "≤ 64 KiB",
              ws["per_conn_kib"] <= 64 and ws["open_failed"] == 0,
              f"{ws['rss_before_kib'] / 1024:.0f} → {ws['rss_after_kib'] / 1024:.0f} MiB; {ws['open_failed']} failed to open{at}")
        t.add(f"{n:,} WebSockets: echo RTT p99 at {ws['rate']}/s", f"{ws['rtt_p99_ms']:.2f} ms", "< 5 ms",
              ws["rtt_p99_ms"] < 5 and ws["errors"] == 0,
              f"p50 {ws['rtt_p50_ms']:.2f} ms, max {ws['rtt_max_ms']:.2f} ms, {ws['messages']:,} echoes, {ws['errors']} errors")
    else:
        t.add("10k WebSockets: RSS per connection", "–", "≤ 64 KiB", None, "skipped")
        t.add("10k WebSockets: RTT p99", "–", "< 5 ms", None, "skipped")

    ctl = scale.get("control")
    if ctl and ctl.get("tokens_per_sec") is not None:
        t.add("token issuance, 16 TLS clients", f"{ctl['tokens_per_sec']:,.0f}/s", "≥ 5,000/s",
              ctl["tokens_per_sec"] >= 5000, "examples/control_bench")
    else:
        t.add("token issuance, 16 TLS clients", "–", "≥ 5,000/s", None, "skipped")

    md = []
    md.append(f"# sandgate benchmark — {meta.get('date', '?')}")
    md.append("")
    md.append(f"`bash bench/run.sh` on {meta.get('cpu', '?')} ({meta.get('cores', '?')} cores), "
              f"{meta.get('kernel', '?')}; sandgate {meta.get('commit', '?')}. "
              f"Load generator, proxy and backend share the cores: compare rows of one run only.")
    if meta.get("knobs"):
        md.append("")
        md.append(f"Knobs: `{meta['knobs']}`")
    md.append("")
    md.append("## Targets")
    md.append("")
    md.append(t.markdown())

    if rows:
        md.append("")
        md.append("## Side by side (bench/peers.sh, same run)")
        md.append("")
        md.append("cpu% = load generator / proxy / backend, 100 = one core.")
        md.append("")
        md.append("| peer | mode | req/s | p50 ms | p99 ms | bad | cpu% gen/px/be | note |")
        md.append("|---|---|---:|---:|---:|---:|---|---|")
        for k in order:
            r = rows[k]
            md.append(f"| {k[0]} | {k[1]} | {fmt(r['rps'])} | {fmt(r['p50'], 2)} | {fmt(r['p99'], 2)} | "
                      f"{r['bad']} | {r['cpu']} | {r['note']} |")
        for line in meta.get("tools", []):
            md.append("")
            md.append(line)
        md.append("")
        md.append("![req/s by mode](chart.svg)")

    if scale:
        md.append("")
        md.append("## Scale runs (bench/scale.sh)")
        md.append("")
        md.append("| run | result | cpu% gateway | cpu% load generator |")
        md.append("|---|---|---:|---:|")
        if routes:
            for name, key in (("wrk h1, 1 sandbox registered", "before"),
                              (f"wrk h1, {routes['sandboxes'] + 1:,} registered", "after")):
                w = routes[key]
                md.append(f"| {name} | {fmt(w['rps'])} req/s, p50 {fmt(w['p50_ms'], 2)} ms, p99 {fmt(w['p99_ms'], 2)} ms, "
                          f"{w['bad']} bad | {w['cpu']['gateway_pct']} | {w['cpu']['gen_pct']} |")
            reg = routes["register"]
            md.append(f"| register {reg['created']:,} sandboxes (API, {meta.get('scale_concurrency', 32)} in flight) | "
                      f"{reg['per_sec']:,.0f}/s, {reg['failed']} failed; gateway RSS "
                      f"{routes['rss_before_kib'] / 1024:.0f} → {routes['rss_after_kib'] / 1024:.0f} MiB | "
                      f"{reg['cpu']['gateway_pct']} | {reg['cpu']['gen_pct']} |")
        if ws:
            oc, ec = ws["open_cpu"], ws["echo_cpu"]
            md.append(f"| open {ws['opened']:,} WebSockets | {ws['open_secs']:.1f} s, {ws['per_conn_kib']:.1f} KiB RSS each "
                      f"(echo backend {oc.get('echo_pct')}%) | {oc['gateway_pct']:.0f} | {oc['client_pct']:.0f} |")
            md.append(f"| {ws['rate']}/s echoes over them | RTT p50 {ws['rtt_p50_ms']:.2f} ms, p99 {ws['rtt_p99_ms']:.2f} ms "
                      f"(echo backend {ec.get('echo_pct')}%) | {ec['gateway_pct']:.0f} | {ec['client_pct']:.0f} |")
        if ctl:
            c = ctl["cpu_whole_run"]
            md.append(f"| control_bench (whole run) | {fmt(ctl.get('tokens_per_sec'))} tokens/s; create-to-running "
                      f"{fmt(ctl.get('create_to_running_ms'), 1)} ms; exec {fmt(ctl.get('exec_ms'), 1)} ms | "
                      f"{c['gateway_pct']} | {c['gen_pct']} |")

    text = "\n".join(md) + "\n"
    open(os.path.join(d, "results.md"), "w").write(text)
    if rows:
        open(os.path.join(d, "chart.svg"), "w").write(svg(rows, order))
    sys.stdout.write(text)


def svg(rows, order):
    """Grouped bars: one group per mode, one bar per peer, height = req/s."""
    modes = [m for m in ("h1", "h1new", "h2") if any(k[1] == m for k in order)]
    peers = []
    for p, _ in order:
        if p not in peers:
            peers.append(p)
    colors = {"backend": "#9e9e9e", "haproxy-es256": "#e57373", "haproxy-hs256": "#f0a07a", "haproxy-tls": "#ffb74d",
              "nginx": "#81c784", "caddy": "#64b5f6", "ours": "#3949ab"}
    bw, gap, left, top, h = 26, 30, 70, 40, 260
    gw = len(peers) * bw
    width = left + len(modes) * (gw + gap) + 170
    height = top + h + 60
    vmax = max((rows[k]["rps"] or 0) for k in rows if k[1] in modes) or 1
    step = 10 ** math.floor(math.log10(vmax))
    vmax = math.ceil(vmax / step) * step
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">requests/s by mode (same run; higher is better)</text>']
    for i in range(6):
        v = vmax * i / 5
        y = top + h - h * i / 5
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{width - 170}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    for gi, m in enumerate(modes):
        x0 = left + gi * (gw + gap) + gap / 2
        for pi, p in enumerate(peers):
            r = rows.get((p, m))
            if not r or not r["rps"]:
                continue
            bh = h * r["rps"] / vmax
            x = x0 + pi * bw
            out.append(f'<rect x="{x:.1f}" y="{top + h - bh:.1f}" width="{bw - 3}" height="{bh:.1f}" '
                       f'fill="{colors.get(p, "#777")}"><title>{escape(p)} {m}: {r["rps"]:,.0f} req/s</title></rect>')
            out.append(f'<text x="{x + (bw - 3) / 2:.1f}" y="{top + h - bh - 3:.1f}" text-anchor="middle" font-size="8">'
                       f'{r["rps"] / 1000:.1f}k</text>')
        out.append(f'<text x="{x0 + gw / 2:.1f}" y="{top + h + 18}" text-anchor="middle" font-size="12">{m}</text>')
    lx = width - 150
    for pi, p in enumerate(peers):
        y = top + 10 + pi * 18
        out.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="12" fill="{colors.get(p, "#777")}"/>')
        out.append(f'<text x="{lx + 18}" y="{y + 1}">{escape(p)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
