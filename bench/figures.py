#!/usr/bin/env python3
"""The generated section of docs/PERFORMANCE.md (issue 9): bench/figures.sh runs the
benchmarks into a results directory, this file turns them into the table between the
markers, and checks a document that has one.

  figures.py render RESULTS DOC OUT   DOC with its section rewritten from RESULTS, to OUT
  figures.py check [--quick] FILE GROUP...
                                      FILE has the markers and every row of GROUP... (all
                                      by default), each with a number in its dynup and ratio
                                      cells; --quick: and the QUICK banner
  figures.py selftest                 the checker accepts a rendered section and rejects
                                      broken ones

Groups that RESULTS holds no run of keep their rows and commands from DOC's section, so
`ONLY=...` refreshes some rows and leaves the others as they were.
"""
import json
import os
import re
import sys

BEGIN = "<!-- figures:begin -->"
END = "<!-- figures:end -->"
GROUPS = ["publisher", "policies", "upstream", "latency", "lua", "nginx", "proxy"]
QUICK_BANNER = "**QUICK run: not figures to quote.**"
POLICIES = ["round_robin", "random", "least_request", "ewma", "ring_hash", "maglev"]
# The pick targets at 10 000 peers, from the policies issue (docs/PERFORMANCE.md).
PICK_TARGET_NS = {"ring_hash": 60.0}
DEFAULT_PICK_TARGET_NS = 25.0
BUILD_PUBLISH_TARGET_MS = 5.0


class Missing(Exception):
    """A figure the results should hold and do not."""


# --- formatting ---------------------------------------------------------------------------

def group_digits(n):
    return f"{n:,.0f}".replace(",", " ")


def sig(x):
    """About three significant figures, as the hand-written tables have them."""
    if x >= 100:
        return group_digits(x)
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(a, b):
    r = a / b
    return f"{r:.2f}×" if r >= 10 else f"{r:.3f}×"


# --- reading the results ------------------------------------------------------------------

UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def read_benchmark(path):
    """Google Benchmark JSON: run name -> real time in ns (the median of the repetitions,
    or the single run's time when there was one repetition)."""
    with open(path) as f:
        doc = json.load(f)
    times, medians = {}, {}
    for b in doc.get("benchmarks", []):
        if b.get("error_occurred"):
            raise Missing(f"{b.get('name')}: {b.get('error_message')}")
        ns = b["real_time"] * UNIT_NS[b.get("time_unit", "ns")]
        name = b.get("run_name", b["name"])
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = ns
        else:
            times.setdefault(name, ns)
    times.update(medians)
    return times


def read_summary(path):
    """A compare script's SUMMARY file: `mode metric value` lines."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                out[f"{parts[0]}.{parts[1]}"] = float(parts[2])
    return out


def collect(results):
    """Every figure RESULTS holds, by key; groups without a run are absent."""
    v = {}

    def path(name):
        p = os.path.join(results, name)
        return p if os.path.exists(p) else None

    if path("publisher.json"):
        b = read_benchmark(path("publisher.json"))
        for key, name in [("pub.snap1", "BM_SnapshotUnchanged/real_time/threads:1"),
                          ("pub.snap2", "BM_SnapshotUnchanged/real_time/threads:2"),
                          ("pub.atomic1", "BM_AtomicSharedPtrLoad/real_time/threads:1"),
                          ("pub.atomic2", "BM_AtomicSharedPtrLoad/real_time/threads:2"),
                          ("pub.build", "BM_BuildAndPublish/10000")]:
            if name in b:
                v[key] = b[name]
    if path("policies.json"):
        b = read_benchmark(path("policies.json"))
        for p in POLICIES:
            name = f"BM_Pick/{p}/10000/real_time/threads:1"
            if name in b:
                v[f"pol.{p}"] = b[name]
        name = "BM_PickWeight1/ring_hash/10000/real_time/threads:1"
        if name in b:
            v["pol.ring_hash_w1"] = b[name]
    if path("upstream.json"):
        b = read_benchmark(path("upstream.json"))
        for kind, prefix in [("bare", "BM_PickReportBare"), ("up", "BM_PickReportUpstream")]:
            for n, threads in [(100, 1), (10000, 1), (10000, 2)]:
                name = f"{prefix}/{n}/threads:{threads}"
                if name in b:
                    v[f"up.{kind}.{n}.{threads}"] = b[name]
    if path("latency.json"):
        with open(path("latency.json")) as f:
            doc = json.load(f)
        for row in doc.get("propagation_us", []):
            s = row["scenario"]
            key = None
            if s.startswith("consul double, spaced"):
                key = "consul"
            elif s.startswith("etcd, spaced"):
                key = "etcd"
            elif s.startswith("etcd put round trip"):
                key = "put"
            elif s.startswith("file") and "spaced" in s:
                key = "file"
            if key:
                v[f"lat.{key}.p50"] = float(row["p50"])
                v[f"lat.{key}.p99"] = float(row["p99"])
    for group, name in [("lua", "lua.summary"), ("nginx", "nginx.summary"), ("pin", "nginx-pin.summary"),
                        ("proxy", "proxy.summary")]:
        if path(name):
            for k, x in read_summary(path(name)).items():
                v[f"{group}.{k}"] = x
    return v


# --- the rows -----------------------------------------------------------------------------

def need(v, *keys):
    for k in keys:
        if k not in v:
            raise Missing(k)
    return [v[k] for k in keys]


def times_row(v, mine, theirs, unit_ns, unit, what):
    a, b = need(v, mine, theirs)
    return f"{sig(a / unit_ns)} {unit}", f"{what}: {sig(b / unit_ns)} {unit}", ratio(a, b)


def target_row(v, mine, target, unit_ns, unit):
    (a,) = need(v, mine)
    return f"{sig(a / unit_ns)} {unit}", f"target ≤ {sig(target)} {unit}", ratio(a / unit_ns, target)


def latency_row(v, src, against=None):
    p50, p99 = need(v, f"lat.{src}.p50", f"lat.{src}.p99")
    mine = f"{group_digits(p50)} / {group_digits(p99)} µs"
    if against is None:
        return mine, "—", "—"
    q50, q99 = need(v, f"lat.{against}.p50", f"lat.{against}.p99")
    return (mine, f"the etcd put's own round trip: {group_digits(q50)} / {group_digits(q99)} µs",
            f"{ratio(p50, q50)} / {ratio(p99, q99)}")


def rps_row(v, run, mine, theirs, what):
    a, b = need(v, f"{run}.{mine}.rps", f"{run}.{theirs}.rps")
    return f"{group_digits(a)} req/s", f"{what}: {group_digits(b)} req/s", ratio(a, b)


def cpu_row(v, run, mine, theirs, what):
    a, b = need(v, f"{run}.{mine}.cpu_us", f"{run}.{theirs}.cpu_us")
    return f"{sig(a)} µs", f"{what}: {sig(b)} µs", ratio(a, b)


def instructions_row(v, run, mine, theirs, what):
    a, b = need(v, f"{run}.{mine}.instructions", f"{run}.{theirs}.instructions")
    return f"{group_digits(a)}", f"{what}: {group_digits(b)}", ratio(a, b)


def reload_row(v):
    m, mf, r, rf, rr, s = need(v, "nginx.module.rps", "nginx.module.failed", "nginx.reload.rps",
                               "nginx.reload.failed", "nginx.reload.requests", "nginx.static.rps")
    return (f"{group_digits(m)} req/s, {group_digits(mf)} failed",
            f"nginx reloaded once a second (no dynup): {group_digits(r)} req/s = {ratio(r, s)} static's, "
            f"{group_digits(rf)} failed of {group_digits(rr)}", ratio(m, r))


def pick_rows():
    rows = []
    for p in POLICIES:
        t = PICK_TARGET_NS.get(p, DEFAULT_PICK_TARGET_NS)
        rows.append(("policies", "policies", f"`{p}` pick, 10 000 peers, weights 1..10, 1 thread",
                     lambda v, p=p, t=t: target_row(v, f"pol.{p}", t, 1.0, "ns")))
    rows.append(("policies", "policies", "`ring_hash` pick, 10 000 peers, all weight 1, 1 thread",
                 lambda v: target_row(v, "pol.ring_hash_w1", PICK_TARGET_NS["ring_hash"], 1.0, "ns")))
    return rows


def lua_rows():
    dynup, bare = "OpenResty `resty.dynup`", "a bare `balancer_by_lua` round robin"
    static = ("static", "static upstream")
    table = [  # figure, row function, mode, the mode it is compared to and its name
        (f"{dynup} vs a static upstream, requests/s", rps_row, "dynup", *static),
        (f"{bare} (no dynup) vs a static upstream, requests/s", rps_row, "lua_rr", *static),
        (f"{dynup} vs the article's approach, requests/s", rps_row, "dynup", "article", "the article's balancer"),
        (f"{dynup} vs a static upstream, proxy CPU per request", cpu_row, "dynup", *static),
        (f"{bare} vs a static upstream, proxy CPU per request", cpu_row, "lua_rr", *static),
        (f"{dynup} vs a static upstream, user-space instructions per request", instructions_row, "dynup", *static),
        (f"{bare} vs a static upstream, instructions per request", instructions_row, "lua_rr", *static),
    ]
    return [("lua", "lua", figure, lambda v, f=f, m=m, t=t, w=w: f(v, "lua", m, t, w))
            for figure, f, m, t, w in table]


# (group, command key, figure, function of the values -> (dynup, compared to, ratio))
ROWS = [
    ("publisher", "publisher", "`snapshot()` with nothing changed, 1 thread, per call",
     lambda v: times_row(v, "pub.snap1", "pub.atomic1", 1.0, "ns", "`atomic_load` of a `shared_ptr`")),
    ("publisher", "publisher", "`snapshot()` with nothing changed, 2 threads at once, per call in total",
     lambda v: times_row(v, "pub.snap2", "pub.atomic2", 1.0, "ns", "`atomic_load` of a `shared_ptr`, 2 threads")),
    ("publisher", "publisher", "build and publish 10 000 peers",
     lambda v: target_row(v, "pub.build", BUILD_PUBLISH_TARGET_MS, 1e6, "ms")),
    *pick_rows(),
    ("upstream", "upstream", "`Upstream` pick + report, 100 peers, 1 thread",
     lambda v: times_row(v, "up.up.100.1", "up.bare.100.1", 1.0, "ns", "the bare picker")),
    ("upstream", "upstream", "`Upstream` pick + report, 10 000 peers, 1 thread",
     lambda v: times_row(v, "up.up.10000.1", "up.bare.10000.1", 1.0, "ns", "the bare picker")),
    ("upstream", "upstream", "`Upstream` pick + report, 10 000 peers, 2 threads",
     lambda v: times_row(v, "up.up.10000.2", "up.bare.10000.2", 1.0, "ns", "the bare picker")),
    ("latency", "latency", "Consul double: change → published, p50 / p99 (spaced 100 ms)",
     lambda v: latency_row(v, "consul")),
    ("latency", "latency", "etcd: put → published, p50 / p99 (spaced 100 ms)",
     lambda v: latency_row(v, "etcd", "put")),
    ("latency", "latency", "file: rename → published, p50 / p99 (spaced 100 ms; includes the 20 ms settle)",
     lambda v: latency_row(v, "file")),
    *lua_rows(),
    ("nginx", "nginx-pin", "native nginx module vs a static upstream, requests/s (proxy pinned to a CPU)",
     lambda v: rps_row(v, "pin", "module", "static", "static upstream")),
    ("nginx", "nginx-pin", "native nginx module vs a static upstream, proxy CPU per request (pinned)",
     lambda v: cpu_row(v, "pin", "module", "static", "static upstream")),
    ("nginx", "nginx", "native nginx module vs reloading nginx, requests/s and failed requests",
     reload_row),
    ("proxy", "proxy", "dynup-proxy vs straight to its backend, requests/s",
     lambda v: rps_row(v, "proxy", "proxy", "direct", "wrk straight to the backend")),
]
NO_COMPARISON = {r[2] for r in ROWS if r[2].startswith(("Consul double:", "file:"))}


# --- the section --------------------------------------------------------------------------

CMD_LINE = re.compile(r"^(\d+)\. ([\w-]+) — (.+?): `(.*)`$")
ROW_LINE = re.compile(r"^\| (.+?) \| (.*?) \| (.*?) \| (.*?) \| (\d+) \|$")


def split_doc(text, where):
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"figures: {where} needs exactly one '{BEGIN}' line and, after it, one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    return head, body, tail


def parse_section(body):
    """The rows and commands of an existing section: {figure: (dynup, vs, ratio, n)},
    {n: (key, when, command)}."""
    rows, cmds = {}, {}
    for line in body.splitlines():
        m = ROW_LINE.match(line)
        if m and m.group(5).isdigit():
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4), int(m.group(5)))
        m = CMD_LINE.match(line)
        if m:
            cmds[int(m.group(1))] = (m.group(2), m.group(3), m.group(4))
    return rows, cmds


def read_meta(results):
    meta = {}
    with open(os.path.join(results, "meta")) as f:
        for line in f:
            k, _, val = line.rstrip("\n").partition("=")
            meta[k] = val
    return meta


def render_section(meta, values, commands, old_body, ran):
    """commands: {key: (when, command)} of this run; ran: the groups this run measured."""
    old_rows, old_cmds = parse_section(old_body or "")
    cmd_numbers, cmd_lines, table = {}, [], []

    def number(key, when, cmd):
        if key not in cmd_numbers:
            cmd_numbers[key] = len(cmd_numbers) + 1
            cmd_lines.append(f"{cmd_numbers[key]}. {key} — {when}: `{cmd}`")
        return cmd_numbers[key]

    for group, key, figure, make in ROWS:
        if group in ran:
            try:
                cells = make(values)
            except Missing as e:
                raise SystemExit(f"figures: no figure for '{figure}' in this run's results ({e})")
            when, cmd = commands[key]
        elif figure in old_rows and old_rows[figure][3] in old_cmds:
            cells = old_rows[figure][:3]
            _, when, cmd = old_cmds[old_rows[figure][3]]
        else:
            continue
        table.append(f"| {figure} | {' | '.join(cells)} | {number(key, when, cmd)} |")

    quick = any(when.endswith(", QUICK") for line in cmd_lines for when in [CMD_LINE.match(line).group(3)])
    out = ["",
           "<!-- Generated by bench/figures.sh: edit the script, not this section. -->",
           "## The figures, measured by one command",
           ""]
    if quick:
        out += [QUICK_BANNER + " Some rows below come from shortened runs (`QUICK=1`) that only show "
                "the script works; run `bench/figures.sh` on a quiet machine for figures.", ""]
    partial = "" if set(ran) == set(GROUPS) else (
        f" It measured {', '.join(ran) or 'nothing'}; the other rows are from earlier runs, dated in the "
        "command list.")
    out += [f"Last run {meta['date']} on {meta['machine']}; load average before it {meta['load']}; "
            f"{meta['build']}.{partial}",
            "",
            "Ratio = dynup ÷ the comparison: for times, below 1 is faster; for requests/s, above 1 is "
            "faster; against a target, at most 1 meets it. Times are Google Benchmark's median real "
            "time; requests/s and CPU are medians over the repetitions; latencies are µs, nearest rank.",
            "",
            "| figure | dynup | compared to | ratio | command |",
            "| --- | --- | --- | --- | --- |",
            *table,
            "",
            "Commands, from the repository's root (group — when it ran, load average before it):",
            "",
            *cmd_lines,
            ""]
    return "\n".join(out) + "\n"


def render(results, doc, out):
    with open(doc) as f:
        text = f.read()
    head, body, tail = split_doc(text, doc)
    meta = read_meta(results)
    commands = {}
    for name in sorted(os.listdir(results)):
        if name.endswith(".cmd"):
            with open(os.path.join(results, name)) as f:
                when, _, cmd = f.read().strip().partition("\n")
            commands[name[:-4]] = (when, cmd)
    ran = [g for g in GROUPS if g in meta.get("groups", "").split()]
    section = render_section(meta, collect(results), commands, body, ran)
    with open(out, "w") as f:
        f.write(head + BEGIN + section + END + tail)


# --- the check ----------------------------------------------------------------------------

NUMBER = re.compile(r"^\**\d[\d ]*(\.\d+)?")


def check_text(text, groups, quick=False):
    """The problems of a document's generated section, as a list of strings (empty: fine)."""
    try:
        _, body, _ = split_doc(text, "the document")
    except SystemExit as e:
        return [str(e)]
    problems = []
    rows, cmds = parse_section(body)
    for group, _, figure, _ in ROWS:
        if group not in groups:
            continue
        if figure not in rows:
            problems.append(f"no row '{figure}'")
            continue
        dynup, _, r, n = rows[figure]
        if not NUMBER.match(dynup):
            problems.append(f"'{figure}': no number in the dynup cell ({dynup!r})")
        if figure in NO_COMPARISON:
            if r != "—":
                problems.append(f"'{figure}': ratio {r!r} where there is no comparison")
        elif not NUMBER.match(r):
            problems.append(f"'{figure}': no number in the ratio cell ({r!r})")
        if n not in cmds:
            problems.append(f"'{figure}': command {n} is not in the list")
    if quick and QUICK_BANNER not in body:
        problems.append("a QUICK run without the QUICK banner")
    return problems


def check(path, groups, quick):
    with open(path) as f:
        problems = check_text(f.read(), groups, quick)
    for p in problems:
        print(f"figures check: {path}: {p}", file=sys.stderr)
    if not problems:
        print(f"figures check: {path}: markers, and every row of {' '.join(groups)} with its numbers")
    return 1 if problems else 0


def selftest():
    values = {k: 1000.0 for k in
              ["pub.snap1", "pub.snap2", "pub.atomic1", "pub.atomic2", "pub.build", "pol.ring_hash_w1",
               *[f"pol.{p}" for p in POLICIES],
               *[f"up.{k}.{n}.{t}" for k in ("bare", "up") for n, t in [(100, 1), (10000, 1), (10000, 2)]],
               *[f"lat.{s}.{p}" for s in ("consul", "etcd", "put", "file") for p in ("p50", "p99")],
               *[f"lua.{m}.instructions" for m in ("static", "lua_rr", "dynup")],
               *[f"{r}.{m}.{x}" for r, modes in [("lua", ("static", "lua_rr", "dynup", "article")),
                                                 ("pin", ("static", "module")),
                                                 ("nginx", ("static", "module", "reload")),
                                                 ("proxy", ("direct", "proxy"))]
                 for m in modes for x in ("rps", "cpu_us", "failed", "requests")]]}
    meta = {"date": "2026-01-01 00:00 UTC", "machine": "2 CPUs (test)", "load": "0.00 0.00 0.00",
            "build": "Release build (build/bench)"}
    commands = {key: ("2026-01-01 00:00 UTC, load 0.00 0.00 0.00, QUICK", f"run {key}")
                for key in {r[1] for r in ROWS}}
    doc = "intro\n" + BEGIN + render_section(meta, values, commands, "", GROUPS) + END + "\nrest\n"
    failures = []
    if check_text(doc, GROUPS, quick=True):
        failures.append(f"a rendered section fails the check: {check_text(doc, GROUPS, quick=True)}")
    # ONLY: a run of one group keeps the other groups' rows.
    _, body, _ = split_doc(doc, "selftest")
    partial = {k: x for k, x in values.items() if k.startswith("proxy.")}
    again = "intro\n" + BEGIN + render_section(meta, partial, commands, body, ["proxy"]) + END + "\n"
    if check_text(again, GROUPS, quick=True):
        failures.append(f"a run of one group lost the others' rows: {check_text(again, GROUPS, quick=True)}")
    figure = ROWS[0][2]
    broken = {
        "no end marker": doc.replace(END, ""),
        "two begin markers": doc.replace(END, BEGIN + END),
        "a row missing": "\n".join(l for l in doc.splitlines() if not l.startswith(f"| {figure} |")),
        "a dash in a dynup cell": doc.replace(f"| {figure} | 1 000 ns |", f"| {figure} | — |"),
        "a dash in a ratio cell": doc.replace("| 1.000× | 1 |", "| — | 1 |", 1),
        "a ratio where none is compared": doc.replace("| — | — |", "| — | 1.000× |", 1),
        "no QUICK banner": doc.replace(QUICK_BANNER, ""),
    }
    for what, text in broken.items():
        if text == doc:
            failures.append(f"selftest could not make '{what}'")
        elif not check_text(text, GROUPS, quick=True):
            failures.append(f"the check accepts a section with {what}")
    for f in failures:
        print(f"figures selftest: {f}", file=sys.stderr)
    if not failures:
        print(f"figures selftest: a rendered section passes; {len(broken)} broken ones are rejected")
    return 1 if failures else 0


def main(argv):
    if len(argv) == 4 and argv[0] == "render":
        render(*argv[1:])
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        quick = argv[1] == "--quick"
        args = argv[2:] if quick else argv[1:]
        unknown = [g for g in args[1:] if g not in GROUPS]
        if not args or unknown:
            raise SystemExit(f"figures: check needs a file and known groups ({' '.join(unknown)})")
        return check(args[0], args[1:] or GROUPS, quick)
    if argv == ["selftest"]:
        return selftest()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
