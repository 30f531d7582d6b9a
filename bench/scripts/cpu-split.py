#!/usr/bin/env python3
"""Where the CPU goes while a benchmark runs: every second, the CPU time (in % of one core)
each group of processes used: postgres (live backends, plus the exited ones the postmaster
reaped), rabbit (the Erlang VM), bench (producers, in-process relay and load generator),
relay, consumer, gateway, build (rustc, cargo) and other.

    bench/scripts/cpu-split.py -- ./target/release/bench latency

runs the command, passes its output through, prints one line per second while it runs and, at
the end, the mean of each group per phase: a scenario marks its phases with lines
`# phase NAME` (the `latency` scenario marks `relay_stopped` and `relay_running`, its two kinds
of producer rounds, and `idle` between them).
"""

import os
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")
GROUPS = [
    ("postgres", ("postgres", "postmaster")),
    ("rabbit", ("beam", "erl_child_setup", "epmd")),
    ("bench", ("bench",)),
    ("relay", ("outbox-relay",)),
    ("consumer", ("inventory", "fault-consumer")),
    ("gateway", ("gateway",)),
    ("build", ("rustc", "cargo", "clippy-driver", "cc", "ld")),
]


def group_of(comm):
    for name, prefixes in GROUPS:
        if comm.startswith(prefixes):
            return name
    return "other"


def sample():
    """CPU seconds used so far, per group."""
    used = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = map(int, fields[11:15])
        seconds = utime + stime
        group = group_of(comm)
        # The postmaster reaps backends: their CPU moves into its children's time at exit.
        if group == "postgres" and ppid == 1:
            seconds += cutime + cstime
        used[group] = used.get(group, 0.0) + seconds / HZ
    return used


def main():
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit(__doc__)
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = ["start"]

    def relay_output():
        for line in child.stdout:
            print(line, end="", flush=True)
            if line.startswith("# phase "):
                phase[0] = line.split()[2]

    reader = threading.Thread(target=relay_output, daemon=True)
    reader.start()
    prev, start = sample(), time.time()
    by_phase = {}
    while child.poll() is None:
        time.sleep(1)
        cur = sample()
        delta = {g: 100 * (cur.get(g, 0) - prev.get(g, 0)) for g in set(cur) | set(prev)}
        prev = cur
        # A process that exits between samples takes its time away from its group.
        delta = {g: max(v, 0.0) for g, v in delta.items()}
        line = " ".join(f"{g}={v:.0f}" for g, v in sorted(delta.items()) if v >= 1)
        print(f"# cpu t={time.time() - start:.0f}s phase={phase[0]} {line}", flush=True)
        by_phase.setdefault(phase[0], []).append(delta)
    reader.join()
    for name, seconds in by_phase.items():
        groups = sorted({g for d in seconds for g in d})
        mean = {g: sum(d.get(g, 0) for d in seconds) / len(seconds) for g in groups}
        shown = sorted(((g, v) for g, v in mean.items() if v >= 1), key=lambda kv: -kv[1])
        line = " ".join(f"{g}={v:.0f}" for g, v in shown)
        print(f"# cpu phase {name} ({len(seconds)} s, % of one core): {line}")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
