"""hnswlib on the vectors and queries recpipe's ANN benchmark wrote, and the comparison.

Reads DIR/vectors.npy, DIR/queries-{one,two}.npy and DIR/recpipe.jsonl (recpipe's points:
queries/s and recall@10 per ef_search), builds hnswlib with the same M and
ef_construction, measures queries/s with one thread (best of three passes, as recpipe's side) and recall@10 against exact search
(numpy), and prints, for each query set, the best queries/s of each library at
recall@10 >= 0.95 and their ratio (recpipe / hnswlib).
"""
import json
import sys
import time

import hnswlib
import numpy as np

K = 10
M = 32
EF_CONSTRUCTION = 200
TARGET = 0.95
PASSES = 3


def main(directory):
    vectors = np.load(f"{directory}/vectors.npy").astype(np.float32)
    recpipe = [json.loads(line) for line in open(f"{directory}/recpipe.jsonl")]
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=M, ef_construction=EF_CONSTRUCTION, random_seed=1)
    started = time.perf_counter()
    index.add_items(vectors, np.arange(len(vectors)), num_threads=2)
    print(f"  hnswlib {hnswlib.__version__ if hasattr(hnswlib, '__version__') else ''} (M={M}, ef_construction={EF_CONSTRUCTION}) built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    index.set_num_threads(1)
    rows = []
    for name in ["one-interest", "two-interest"]:
        queries = np.load(f"{directory}/queries-{name.split('-')[0]}.npy").astype(np.float32)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        truth = np.argsort(-(unit @ vectors.T), axis=1)[:, :K]
        for ef in [10, 16, 32, 64, 128, 256]:
            index.set_ef(max(ef, K))
            seconds = float("inf")
            for _ in range(PASSES):  # best of a few, as recpipe's side does
                started = time.perf_counter()
                labels, _ = index.knn_query(unit, k=K, num_threads=1)
                seconds = min(seconds, time.perf_counter() - started)
            hits = sum(len(set(l) & set(t)) for l, t in zip(labels, truth))
            rows.append({"queries": name, "ef_search": ef, "recall_at_10": hits / (len(unit) * K),
                         "queries_per_sec": len(unit) / seconds})
    with open(f"{directory}/hnswlib.jsonl", "w") as out:
        for r in rows:
            out.write(json.dumps(r) + "\n")
    print(f"{'queries':<14} {'library':<9} {'ef':>4} {'recall@10':>9} {'queries/s':>10}")
    for name in ["one-interest", "two-interest"]:
        for lib, points in [("recpipe", recpipe), ("hnswlib", rows)]:
            for p in points:
                if p["queries"] == name:
                    print(f"{name:<14} {lib:<9} {p['ef_search']:>4} {p['recall_at_10']:>9.3f} {p['queries_per_sec']:>10.0f}")
    print()
    for name in ["one-interest", "two-interest"]:
        def best(points):
            ok = [p for p in points if p["queries"] == name and p["recall_at_10"] >= TARGET]
            return max(ok, key=lambda p: p["queries_per_sec"]) if ok else None
        r, h = best(recpipe), best(rows)
        if r and h:
            print(f"{name}: recpipe {r['queries_per_sec']:.0f} q/s (ef {r['ef_search']}, recall {r['recall_at_10']:.3f}) vs "
                  f"hnswlib {h['queries_per_sec']:.0f} q/s (ef {h['ef_search']}, recall {h['recall_at_10']:.3f}): "
                  f"ratio {r['queries_per_sec'] / h['queries_per_sec']:.2f}")
        else:
            print(f"{name}: recall@10 >= {TARGET} not reached by " + ", ".join(
                lib for lib, p in [("recpipe", r), ("hnswlib", h)] if p is None))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/ann-bench")
