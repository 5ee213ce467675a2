"""recpipe against the peer: the usual Python design of this pipeline
(../shared/bench/peer_pipeline.py: one process per stage, numpy, hnswlib, sqlite,
confluent-kafka, JSON), both draining the same backlog on the same kind of broker, in one
script, alternated round by round.

Each run gets a fresh tansu broker (memory engine) in a directory of its own, creates the
topics, and has the peer's own `produce` stage write the backlog: N events of U users over
P products, so both pipelines read the very same events. Then the clock starts and the
pipeline's stages start, start-up included (the peer builds its hnswlib index at start;
recpipe's HNSW graph is built beforehand with `recpipe-admin catalog index`, as a model
is made, and read at start; that build's time is reported apart):
- peer: `update`, `gen` and `save` until `save` has persisted N recommendation rows;
- recpipe: update-embeddings, gen-recommendations and save-worker until each has
  committed to the end of what it reads (save-worker: events, user states and lists),
  which it does only once what it read is written.
recpipe reads the peer's products as a catalog (`ids.txt` and `embeddings.npy`, the same
vectors). The peer's lists hold 10 products and its save-worker stores one row per user;
recpipe's hold 20 and it stores every event, every user's state and every list (history),
so recpipe does more work per event. Each run checks that every user got a list.

recpipe runs twice per round: with its defaults, whose `model.hnsw.ef_search` 0 is the
smallest that reaches recall@10 0.95 on this catalog (`recpipe-admin catalog index`
calibrates it on the graph it builds and keeps it beside the graph, outside the clock,
and gen-recommendations reads it at start), and with the fixed 128 that was the default
before 2026-12-03.

Usage: peer_vs_recpipe.py --peer ../shared/bench/peer_pipeline.py --bin target/release
       --tansu .tools/bin/tansu [--events 50000] [--rounds 2] [--partitions 1]
       [--only peer,recpipe,recpipe-ef-128]
Writes a line per run and a JSON summary (--out).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

# The peer's sizes (peer_pipeline.py: D, P, U and its generator's seed).
DIMS, PRODUCTS, USERS, SEED = 64, 20000, 5000, 3
TIMEOUT = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, what, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited at start (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {seconds} s")


def cpu_seconds(rusage):
    return rusage.ru_utime + rusage.ru_stime


def reap(proc, sig=signal.SIGTERM, grace=10):
    """Stops `proc` (if still running) and returns its CPU seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    deadline = time.monotonic() + grace
    while True:
        pid, _, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0
            return cpu_seconds(rusage)
        if time.monotonic() > deadline:
            proc.kill()
            _, _, rusage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return cpu_seconds(rusage)
        time.sleep(0.02)


class Broker:
    def __init__(self, tansu, workdir):
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        os.makedirs(workdir)
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                            # The services' log level: tansu at info logs every request.
                            "RUST_LOG")}
        self.log = open(os.path.join(workdir, "tansu.log"), "w")
        self.proc = subprocess.Popen(
            [tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, "tansu")

    def stop(self):
        cpu = reap(self.proc)
        self.log.close()
        return cpu


def create_topics(bootstrap, names, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, future in admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]).items():
        future.result(30)


def produce_backlog(python, peer, bootstrap, n):
    out = subprocess.run([python, peer, "produce", bootstrap, str(n)],
                         capture_output=True, text=True, timeout=TIMEOUT)
    if out.returncode != 0:
        sys.exit(f"the peer's producer failed:\n{out.stderr}")


def users_of_backlog(n):
    """The users the peer's producer writes (its generator, replayed)."""
    rng = np.random.default_rng(SEED)
    rng.normal(size=(PRODUCTS, DIMS))
    users = set()
    for _ in range(n):
        users.add(int(rng.integers(0, USERS)))
        rng.integers(0, PRODUCTS)
    return len(users)


def write_catalog(directory):
    """The peer's product embeddings as a recpipe catalog: ids in row order, vectors."""
    rng = np.random.default_rng(SEED)
    emb = rng.normal(size=(PRODUCTS, DIMS)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    os.makedirs(directory)
    with open(os.path.join(directory, "ids.txt"), "w") as f:
        f.write("".join(f"p{j}\n" for j in range(PRODUCTS)))
    np.save(os.path.join(directory, "embeddings.npy"), emb)


def run_peer(args, workdir, users):
    broker = Broker(args.tansu, os.path.join(workdir, "broker"))
    try:
        create_topics(broker.bootstrap, ["events", "user-vectors", "recommendations"], args.partitions)
        produce_backlog(args.python, args.peer, broker.bootstrap, args.events)
        db = os.path.join(workdir, "peer.db")
        logs = {s: open(os.path.join(workdir, f"peer-{s}.log"), "w") for s in ("update", "gen", "save")}
        started = time.monotonic()
        procs = {}
        for stage in ("update", "gen", "save"):
            cmd = [args.python, args.peer, stage, broker.bootstrap, str(args.events)]
            if stage == "save":
                cmd.append(db)
            procs[stage] = subprocess.Popen(cmd, cwd=workdir, stdout=logs[stage], stderr=subprocess.STDOUT)
        cpu = {}
        while True:
            pid, status, rusage = os.wait4(procs["save"].pid, os.WNOHANG)
            if pid:
                seconds = time.monotonic() - started
                procs["save"].returncode = os.waitstatus_to_exitcode(status)
                cpu["save"] = cpu_seconds(rusage)
                break
            for stage in ("update", "gen"):
                if procs[stage].poll() is not None:
                    sys.exit(f"the peer's {stage} stage exited early: see {logs[stage].name}")
            if time.monotonic() - started > TIMEOUT:
                sys.exit(f"the peer did not finish within {TIMEOUT} s: see {workdir}")
            time.sleep(0.02)
        for stage in ("update", "gen"):
            cpu[stage] = reap(procs[stage])
        for f in logs.values():
            f.close()
        if procs["save"].returncode != 0:
            sys.exit(f"the peer's save stage failed: see {logs['save'].name}")
        with sqlite3.connect(db) as c:
            listed = c.execute("SELECT COUNT(*) FROM recs").fetchone()[0]
    finally:
        cpu_broker = broker.stop()
    if listed != users:
        sys.exit(f"the peer stored lists for {listed} users of {users}")
    return {"seconds": seconds, "cpu": cpu, "broker_cpu": cpu_broker, "users_listed": listed}


RECPIPE_SERVICES = ("update-embeddings", "gen-recommendations", "save-worker")
# What each service's consumer group reads (configuration/base.yaml's topic names).
READS = {
    "update-embeddings": ["events"],
    "gen-recommendations": ["user-vectors"],
    "save-worker": ["events", "user-vectors", "recommendations"],
}


class Progress:
    """Whether each of recpipe's consumer groups has committed to the end of what it
    reads. One client per group, made once: a new one at every look (every 20 ms) cost
    the broker and this script CPU that the pipeline's two cores were short of."""

    def __init__(self, bootstrap):
        self.clients = {
            s: Consumer({"bootstrap.servers": bootstrap, "group.id": f"recpipe-{s}",
                         "enable.auto.commit": False})
            for s in RECPIPE_SERVICES}

    def behind(self, service):
        """Partitions `service`'s group has not committed to the end of."""
        c = self.clients[service]
        ends = []
        for topic in READS[service]:
            meta = c.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ends.append(TopicPartition(topic, p, high))
        committed = c.committed([TopicPartition(t.topic, t.partition) for t in ends], timeout=10)
        return [e for e, at in zip(ends, committed) if max(at.offset, 0) < e.offset]

    def close(self):
        for c in self.clients.values():
            c.close()


# recpipe's runs: its defaults (ef_search calibrated on the catalog to recall@10 0.95: 48
# here), and the fixed ef_search 128 that was the default before. On these vectors, hnswlib
# (2026-12-03, 2,000 of the peer's users' final vectors) finds 0.895 of the true 10
# nearest at the peer's M 16, ef 64; at recpipe's M 32, 0.956 at ef 32 and 0.997 at 128,
# which takes 4.4 times as long.
RECPIPE_VARIANTS = {
    "recpipe": {},
    "recpipe-ef-128": {"RECPIPE_MODEL__HNSW__EF_SEARCH": "128"},
}


def build_catalog(args, directory):
    """The peer's products as recpipe's catalog, with its HNSW graph built and its
    ef_search calibrated: once per script, before any clock (a graph is built when a model
    is made, not at each start: model building is apart from serving). Returns the
    build's seconds."""
    write_catalog(directory)
    indexed = time.monotonic()
    subprocess.run([os.path.join(args.bin, "recpipe-admin"), "catalog", "index"],
                   env=dict(os.environ, RECPIPE_CATALOG__DIR=directory),
                   check=True, capture_output=True, timeout=TIMEOUT)
    return time.monotonic() - indexed


def run_recpipe(args, workdir, users, settings):
    broker = Broker(args.tansu, os.path.join(workdir, "broker"))
    procs = {}
    try:
        env = dict(os.environ,
                   RECPIPE_KAFKA__BROKERS=broker.bootstrap,
                   RECPIPE_KAFKA__PARTITIONS=str(args.partitions),
                   RECPIPE_STORE__URL="sqlite://" + os.path.join(workdir, "recpipe.db"),
                   RECPIPE_CATALOG__DIR=os.path.join(workdir, "catalog"),
                   **settings)
        shutil.copytree(args.catalog, env["RECPIPE_CATALOG__DIR"])
        subprocess.run([os.path.join(args.bin, "recpipe-admin"), "topics", "create"],
                       env=env, check=True, capture_output=True, timeout=60)
        produce_backlog(args.python, args.peer, broker.bootstrap, args.events)
        logs = {s: open(os.path.join(workdir, f"{s}.log"), "w") for s in RECPIPE_SERVICES}
        progress = Progress(broker.bootstrap)
        started = time.monotonic()
        # The clock's start in the services' log time (UTC), to read a kept run's timeline.
        now = time.time()
        with open(os.path.join(workdir, "clock-started.txt"), "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:] + "Z\n")
        for service in RECPIPE_SERVICES:
            service_env = dict(env, RECPIPE_TELEMETRY__ADMIN_ADDRESS=f"127.0.0.1:{free_port()}")
            procs[service] = subprocess.Popen([os.path.join(args.bin, service)], env=service_env,
                                              stdout=logs[service], stderr=subprocess.STDOUT)
        # Upstream first: once a service has committed to the end of its input, its
        # outputs are all written, so the ends read next are final.
        while True:
            for service, p in procs.items():
                if p.poll() is not None:
                    sys.exit(f"{service} exited (code {p.returncode}): see {logs[service].name}")
            if not any(progress.behind(s) for s in RECPIPE_SERVICES):
                seconds = time.monotonic() - started
                break
            if time.monotonic() - started > TIMEOUT:
                sys.exit(f"recpipe did not finish within {TIMEOUT} s: see {workdir}")
            time.sleep(0.02)
        progress.close()
        cpu = {s: reap(p) for s, p in procs.items()}
        for f in logs.values():
            f.close()
        with sqlite3.connect(env["RECPIPE_STORE__URL"][len("sqlite://"):]) as c:
            listed = c.execute("SELECT COUNT(DISTINCT user_id) FROM recommendations").fetchone()[0]
            # Events wait in staged tables before they move into `events` in bulk
            # (schemas/sqlite/V9__events_staged.sql); no event was delivered twice here.
            staged = [t for (t,) in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'events_staged_%'")]
            events = sum(c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                          for t in ["events", *staged])
    finally:
        for p in procs.values():
            if p.poll() is None:
                reap(p)
        cpu_broker = broker.stop()
    # The popularity list is stored under a user of its own.
    if listed < users:
        sys.exit(f"recpipe stored lists for {listed} users of {users}")
    if events != args.events:
        sys.exit(f"recpipe stored {events} events of {args.events}")
    with open(os.path.join(workdir, "gen-recommendations.log")) as f:
        gen_log = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
    calibrated = re.search(r"ef_search (?:calibrated|read from its calibration file).*? "
                           r"ef_search=(\d+) recall_at_10=([0-9.]+)", gen_log)
    return {"seconds": seconds, "cpu": cpu, "broker_cpu": cpu_broker,
            "users_listed": listed, "events_stored": events, "settings": settings,
            "ef_search": int(calibrated.group(1)) if calibrated else None,
            "calibrated_recall_at_10": float(calibrated.group(2)) if calibrated else None}


def run_rounds(args, users, wanted):
    """Every round: the chosen pipelines, alternating which goes first."""
    runs = []
    for r in range(args.rounds):
        # Alternate the order, so no pipeline always gets the fresher machine.
        order = [n for n in ("peer", *RECPIPE_VARIANTS) if n in wanted]
        if r % 2:
            order.reverse()
        for name in order:
            workdir = tempfile.mkdtemp(prefix=f"recpipe-peer-{name}-")
            if name == "peer":
                result = run_peer(args, workdir, users)
            else:
                result = run_recpipe(args, workdir, users, RECPIPE_VARIANTS[name])
            if os.environ.get("RECPIPE_PEER_KEEP"):
                print(f"  (kept {workdir})")
            else:
                shutil.rmtree(workdir)
            result.update(pipeline=name, round=r + 1, events_per_sec=args.events / result["seconds"])
            cpu = sum(result["cpu"].values())
            print(f"  round {r + 1} {name:15} {result['seconds']:6.2f} s  "
                  f"{result['events_per_sec']:8,.0f} events/s  stages' CPU {cpu:5.2f} s "
                  f"({' / '.join(f'{k} {v:.2f}' for k, v in result['cpu'].items())}), "
                  f"broker {result['broker_cpu']:.2f} s"
                  + (f"; ef_search calibrated to {result['ef_search']} "
                     f"(recall@10 {result['calibrated_recall_at_10']:.3f})"
                     if result.get("ef_search") else ""), flush=True)
            runs.append(result)
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True)
    ap.add_argument("--bin", required=True, help="directory of recpipe's release binaries")
    ap.add_argument("--tansu", required=True)
    ap.add_argument("--python", default=sys.executable, help="runs the peer (numpy, hnswlib, confluent-kafka)")
    ap.add_argument("--events", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--out", default="target/peer-bench/summary.json")
    ap.add_argument("--only", default="peer,recpipe,recpipe-ef-128",
                    help="run only these, comma-separated (e.g. one side, to profile it)")
    args = ap.parse_args()
    args.catalog = None
    # Each process runs in a directory of its own.
    for name in ("peer", "bin", "tansu", "python"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    users = users_of_backlog(args.events)
    print(f"{args.events:,} events of {users:,} users over {PRODUCTS:,} products × {DIMS}, "
          f"{args.partitions} partition(s) per topic, {args.rounds} round(s)", flush=True)
    wanted = args.only.split(",")
    unknown = set(wanted) - {"peer", *RECPIPE_VARIANTS}
    if unknown:
        sys.exit(f"--only: unknown {sorted(unknown)}; choose from peer, {', '.join(RECPIPE_VARIANTS)}")
    index_seconds = None
    if any(v in wanted for v in RECPIPE_VARIANTS):
        args.catalog = os.path.join(tempfile.mkdtemp(prefix="recpipe-peer-catalog-"), "catalog")
        index_seconds = build_catalog(args, args.catalog)
        print(f"  recpipe's HNSW graph of the peer's products built beforehand in {index_seconds:.1f} s",
              flush=True)
    try:
        runs = run_rounds(args, users, wanted)
    finally:
        # Also when a run fails (sys.exit): the catalog and its graph are tens of MB.
        if args.catalog:
            shutil.rmtree(os.path.dirname(args.catalog))
    speedups = {}
    if "peer" in wanted:
        for variant in RECPIPE_VARIANTS:
            if variant not in wanted:
                continue
            per_round = []
            for r in range(args.rounds):
                peer = next(x for x in runs if x["round"] == r + 1 and x["pipeline"] == "peer")
                ours = next(x for x in runs if x["round"] == r + 1 and x["pipeline"] == variant)
                per_round.append(peer["seconds"] / ours["seconds"])
            speedups[variant] = {"per_round": per_round, "median": statistics.median(per_round)}
    summary = {
        "events": args.events, "users": users, "products": PRODUCTS, "dims": DIMS,
        "partitions": args.partitions, "machine": machine(), "index_seconds": index_seconds,
        "runs": runs, "speedups": speedups,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    for variant, x in speedups.items():
        print(f"{variant} drains the backlog {x['median']:.2f}× as fast as the peer "
              f"(median of {args.rounds}; per round {', '.join(f'{v:.2f}' for v in x['per_round'])}); "
              f"target ≥ 5")
    print(f"Summary: {args.out}")


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"


if __name__ == "__main__":
    main()
