"""recpipe's HNSW against hnswlib on the same vectors, queries and k, one thread each.

    ann_vs_hnswlib.py DIR RECPIPE_LOADTEST [ANN_ARGS...]

Starts `RECPIPE_LOADTEST ann --out DIR --serve-passes ANN_ARGS...` (e.g. --products N), which writes the vectors
and queries to DIR as .npy, builds recpipe's HNSW and then runs one timed pass over a
query set each time it is asked. This script builds hnswlib with the same M and
ef_construction on those vectors and, for each query set and ef_search, alternates
hnswlib's passes with recpipe's: on a shared machine the host's noise comes and goes
within seconds, and passes measured minutes apart (as the two libraries once were) met
different noise. Each side's fastest pass counts. Recall@10 is against exact search
(numpy for hnswlib, recpipe's own exact search for recpipe). Prints both tables and,
for each query set, the best queries/s of each library at recall@10 >= 0.95 and their
ratio (recpipe / hnswlib); writes DIR/recpipe.jsonl and DIR/hnswlib.jsonl.
"""
import json
import subprocess
import sys
import time

import hnswlib
import numpy as np

K = 10
M = 32
EF_CONSTRUCTION = 200
TARGET = 0.95
EF_SEARCH = [10, 16, 32, 64, 128, 256]
# Alternated passes per query set and ef_search, for each library.
PASSES = 7
SETS = ["one-interest", "two-interest"]


class Recpipe:
    """recpipe's side: the load tester serving timed passes over stdin/stdout."""

    def __init__(self, directory, loadtest, ann_args):
        command = [loadtest, "ann", "--out", directory, "--serve-passes"] + ann_args
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            sys.exit(f"{' '.join(command)} did not start (exit {self.process.wait()})")

    def timed_pass(self, name, ef):
        self.process.stdin.write(f"{name} {ef}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"recpipe's pass server ended (exit {self.process.wait()})")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main(directory, loadtest, ann_args):
    recpipe = Recpipe(directory, loadtest, ann_args)
    vectors = np.load(f"{directory}/vectors.npy").astype(np.float32)
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
    started = time.perf_counter()
    index.add_items(vectors, np.arange(len(vectors)), num_threads=2)
    print(f"  hnswlib {getattr(hnswlib, '__version__', '')} (M={M}, ef_construction={EF_CONSTRUCTION}) built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    index.set_num_threads(1)
    rows = {"recpipe": [], "hnswlib": []}
    for name in SETS:
        queries = np.load(f"{directory}/queries-{name.split('-')[0]}.npy").astype(np.float32)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        truth = np.argsort(-(unit @ vectors.T), axis=1)[:, :K]
        for ef in EF_SEARCH:
            index.set_ef(max(ef, K))

            def hnswlib_pass():
                started = time.perf_counter()
                labels, _ = index.knn_query(unit, k=K, num_threads=1)
                seconds = time.perf_counter() - started
                hits = sum(len(set(l) & set(t)) for l, t in zip(labels, truth))
                return {"seconds": seconds, "recall_at_10": hits / (len(unit) * K)}

            best = {}
            for i in range(PASSES):
                # Each goes first in turn, so neither always follows the other's pass.
                sides = [("hnswlib", hnswlib_pass), ("recpipe", lambda: recpipe.timed_pass(name, ef))]
                for lib, timed_pass in (sides if i % 2 == 0 else sides[::-1]):
                    p = timed_pass()
                    if lib not in best or p["seconds"] < best[lib]["seconds"]:
                        best[lib] = p
            for lib, p in best.items():
                rows[lib].append({"queries": name, "ef_search": ef, "recall_at_10": p["recall_at_10"],
                                  "queries_per_sec": len(unit) / p["seconds"]})
    recpipe.close()
    for lib, points in rows.items():
        with open(f"{directory}/{lib}.jsonl", "w") as out:
            for r in points:
                out.write(json.dumps(r) + "\n")
    print(f"{'queries':<14} {'library':<9} {'ef':>4} {'recall@10':>9} {'queries/s':>10}")
    for name in SETS:
        for lib, points in rows.items():
            for p in points:
                if p["queries"] == name:
                    print(f"{name:<14} {lib:<9} {p['ef_search']:>4} {p['recall_at_10']:>9.3f} {p['queries_per_sec']:>10.0f}")
    print()
    for name in SETS:
        def best_at_target(points):
            ok = [p for p in points if p["queries"] == name and p["recall_at_10"] >= TARGET]
            return max(ok, key=lambda p: p["queries_per_sec"]) if ok else None
        r, h = best_at_target(rows["recpipe"]), best_at_target(rows["hnswlib"])
        if r and h:
            print(f"{name}: recpipe {r['queries_per_sec']:.0f} q/s (ef {r['ef_search']}, recall {r['recall_at_10']:.3f}) vs "
                  f"hnswlib {h['queries_per_sec']:.0f} q/s (ef {h['ef_search']}, recall {h['recall_at_10']:.3f}): "
                  f"ratio {r['queries_per_sec'] / h['queries_per_sec']:.2f}")
        else:
            print(f"{name}: recall@10 >= {TARGET} not reached by " + ", ".join(
                lib for lib, p in [("recpipe", r), ("hnswlib", h)] if p is None))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
