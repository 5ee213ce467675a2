//! The HNSW graph `hnsw_rs` builds, frozen into flat arrays for serving.
//!
//! `hnsw_rs` builds the graph (in parallel, with its pruning heuristic), but its search
//! takes a lock per neighbour list, allocates an `Arc` per visited point and keeps the
//! visited set in a `HashMap`: at 100k × 64 it answered 8× slower than hnswlib. Once the
//! catalog is loaded the graph never changes, so the serving side needs none of that: the
//! neighbour lists become one array of `u32` (layer 0 at a fixed stride, as hnswlib lays it
//! out), the vectors stay in the catalog's contiguous matrix, and a search reuses its
//! visited marks and heaps from a thread-local scratch space.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use hnsw_rs::prelude::{Distance, Hnsw};

/// A node id and its distance to the query, ordered by distance (ties by id, so results
/// are deterministic).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    distance: f32,
    node: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Nearest first when popped from a `BinaryHeap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Nearest(Candidate);

impl Ord for Nearest {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.cmp(&self.0)
    }
}

impl PartialOrd for Nearest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Per-thread search state, kept between searches so a search allocates nothing.
#[derive(Default)]
struct Scratch {
    /// `visited[node] == epoch` marks a node seen in the current search.
    visited: Vec<u32>,
    epoch: u32,
    candidates: BinaryHeap<Nearest>,
    results: BinaryHeap<Candidate>,
    /// The current node's neighbours not seen before.
    fresh: Vec<u32>,
}

/// Neighbours ahead of the one being scored whose rows a search asks the cache for.
const PREFETCH_AHEAD: usize = 4;

impl Scratch {
    fn start(&mut self, nodes: usize) {
        if self.visited.len() < nodes {
            self.visited.resize(nodes, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Wrapped: old marks could collide with the new epoch.
            self.visited.fill(0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }

    /// Marks `node` visited; false if it already was.
    fn visit(&mut self, node: u32) -> bool {
        let mark = &mut self.visited[node as usize];
        if *mark == self.epoch {
            false
        } else {
            *mark = self.epoch;
            true
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One search's arguments.
#[derive(Clone, Copy)]
struct Request<'a> {
    vectors: &'a [f32],
    query: &'a [f32],
    k: usize,
    ef: usize,
    allowed: &'a dyn Fn(usize) -> bool,
}

/// The graph's upper layers (few nodes each): a node's neighbours by node id.
type UpperLayer = HashMap<u32, Box<[u32]>>;

/// What a graph file was built from: it is used only for the same embeddings and build
/// settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GraphKey {
    /// [`crate::catalog::Catalog::embeddings_id`]: the products and their vectors.
    pub embeddings_id: String,
    pub max_connections: usize,
    pub ef_construction: usize,
}

/// Why a graph file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GraphFileError {
    #[error("not a graph file")]
    NotAGraph,
    #[error("written in format {0}, this build reads format {GRAPH_FORMAT}")]
    OtherFormat(u32),
    #[error("built for {file:?}, not {wanted:?}")]
    OtherModel { file: GraphKey, wanted: GraphKey },
    #[error("damaged: {0}")]
    Damaged(String),
}

/// A graph file's first bytes.
const GRAPH_MAGIC: &[u8; 8] = b"RPHNSW\r\n";
/// Bumped when the layout below changes: a file of another format is rebuilt.
const GRAPH_FORMAT: u32 = 1;

/// A graph file's header (JSON, after the magic and its length). Then, little-endian
/// `u32`s: layer 0 (`nodes * stride`), each upper layer's entries in node order (node,
/// neighbour count, neighbours); then an FNV-1a checksum (`u64`) of all that precedes it.
#[derive(serde::Serialize, serde::Deserialize)]
struct GraphHeader {
    format: u32,
    key: GraphKey,
    nodes: usize,
    dim: usize,
    stride: usize,
    entry: u32,
    /// Entries of each upper layer, lowest first.
    upper: Vec<usize>,
}

/// Reads little-endian words off the front of a byte slice.
struct Words<'a>(&'a [u8]);

impl<'a> Words<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
}

/// A built HNSW graph over `nodes` vectors of `dim` floats, searched by cosine distance
/// (`1 - dot`, vectors of unit length) against a row-major matrix the caller passes.
#[derive(Debug, PartialEq)]
pub struct FlatHnsw {
    dim: usize,
    nodes: usize,
    entry: u32,
    /// Layer 0: node `i`'s neighbour count at `i * stride`, its neighbours after it.
    base: Vec<u32>,
    stride: usize,
    /// Layers 1 and up, lowest first.
    upper: Vec<UpperLayer>,
}

impl FlatHnsw {
    /// Copies the graph out of `hnsw`, whose data ids must be the row numbers `0..nodes`
    /// of the matrix later searched.
    pub fn freeze<D: Distance<f32> + Send + Sync>(
        hnsw: &Hnsw<'_, f32, D>,
        nodes: usize,
        dim: usize,
    ) -> Self {
        let indexation = hnsw.get_point_indexation();
        let top = indexation.get_max_level_observed() as usize;
        let mut neighbours: Vec<Vec<Vec<u32>>> = vec![Vec::new(); nodes];
        let mut entry = None;
        for point in indexation {
            let id = point.get_origin_id();
            assert!(id < nodes, "data id {id} outside 0..{nodes}");
            let level = point.get_point_id().0 as usize;
            if level == top && entry.is_none() {
                entry = Some(id as u32);
            }
            neighbours[id] = point
                .get_neighborhood_id()
                .into_iter()
                .take(level + 1)
                .map(|layer| layer.iter().map(|n| n.d_id as u32).collect())
                .collect();
        }
        let degree = neighbours
            .iter()
            .filter_map(|layers| layers.first().map(Vec::len))
            .max()
            .unwrap_or(0);
        let stride = degree + 1;
        let mut base = vec![0u32; nodes * stride];
        for (id, layers) in neighbours.iter().enumerate() {
            if let Some(layer0) = layers.first() {
                let slot = &mut base[id * stride..(id + 1) * stride];
                slot[0] = layer0.len() as u32;
                slot[1..=layer0.len()].copy_from_slice(layer0);
            }
        }
        let upper = (1..=top)
            .map(|layer| {
                neighbours
                    .iter()
                    .enumerate()
                    .filter_map(|(id, layers)| {
                        layers
                            .get(layer)
                            .map(|l| (id as u32, l.clone().into_boxed_slice()))
                    })
                    .collect()
            })
            .collect();
        FlatHnsw {
            dim,
            nodes,
            entry: entry.unwrap_or(0),
            base,
            stride,
            upper,
        }
    }

    /// Writes the graph as a file [`FlatHnsw::read`] takes back, for the catalog and
    /// settings `key` names.
    pub fn write(&self, key: &GraphKey, out: &mut impl std::io::Write) -> std::io::Result<()> {
        // In node order, so the same graph always gives the same bytes.
        let upper: Vec<Vec<(u32, &[u32])>> = self
            .upper
            .iter()
            .map(|layer| {
                let mut entries: Vec<_> = layer.iter().map(|(n, l)| (*n, &l[..])).collect();
                entries.sort_unstable_by_key(|(node, _)| *node);
                entries
            })
            .collect();
        let header = GraphHeader {
            format: GRAPH_FORMAT,
            key: key.clone(),
            nodes: self.nodes,
            dim: self.dim,
            stride: self.stride,
            entry: self.entry,
            upper: upper.iter().map(Vec::len).collect(),
        };
        let header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        let mut bytes = Vec::with_capacity(16 + header.len() + 4 * self.base.len());
        bytes.extend_from_slice(GRAPH_MAGIC);
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        for v in &self.base {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        for layer in upper {
            for (node, neighbours) in layer {
                bytes.extend_from_slice(&node.to_le_bytes());
                bytes.extend_from_slice(&(neighbours.len() as u32).to_le_bytes());
                for n in neighbours.iter() {
                    bytes.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        let mut sum = crate::stable_hash::Fnv64::new();
        sum.write(&bytes);
        bytes.extend_from_slice(&sum.finish().to_le_bytes());
        out.write_all(&bytes)
    }

    /// A graph [`FlatHnsw::write`] wrote for `key`; an error says why it cannot be used
    /// (another catalog or settings, another format, damaged).
    pub fn read(key: &GraphKey, bytes: &[u8]) -> Result<FlatHnsw, GraphFileError> {
        let damaged = |what: &str| GraphFileError::Damaged(what.to_string());
        let body = bytes
            .strip_prefix(GRAPH_MAGIC.as_slice())
            .ok_or(GraphFileError::NotAGraph)?;
        let (body, sum) = body
            .split_at_checked(body.len().saturating_sub(8))
            .ok_or_else(|| damaged("too short"))?;
        let mut expected = crate::stable_hash::Fnv64::new();
        expected.write(&bytes[..bytes.len() - 8]);
        if sum.len() != 8 || u64::from_le_bytes(sum.try_into().unwrap()) != expected.finish() {
            return Err(damaged("checksum mismatch"));
        }
        let mut words = Words(body);
        let header_len = words.u32().ok_or_else(|| damaged("no header"))? as usize;
        let header = words
            .take(header_len)
            .ok_or_else(|| damaged("header cut short"))?;
        let header: GraphHeader =
            serde_json::from_slice(header).map_err(|e| damaged(&format!("header: {e}")))?;
        if header.format != GRAPH_FORMAT {
            return Err(GraphFileError::OtherFormat(header.format));
        }
        if header.key != *key {
            return Err(GraphFileError::OtherModel {
                file: header.key,
                wanted: key.clone(),
            });
        }
        let (nodes, stride) = (header.nodes, header.stride);
        let in_range = |n: u32| (n as usize) < nodes;
        if stride == 0 || (nodes > 0 && !in_range(header.entry)) {
            return Err(damaged("entry point or stride out of range"));
        }
        let base_len = nodes.checked_mul(stride).ok_or_else(|| damaged("size"))?;
        // Checked before allocating: a header must not make the reader ask for more
        // memory than the file could fill.
        if base_len.saturating_mul(4) > words.0.len() {
            return Err(damaged("layer 0 cut short"));
        }
        let mut base = Vec::with_capacity(base_len);
        for _ in 0..base_len {
            base.push(words.u32().ok_or_else(|| damaged("layer 0 cut short"))?);
        }
        for slot in base.chunks(stride) {
            let count = slot[0] as usize;
            if count >= stride || !slot[1..=count].iter().all(|&n| in_range(n)) {
                return Err(damaged("layer 0 neighbour out of range"));
            }
        }
        let mut upper = Vec::with_capacity(header.upper.len());
        for &entries in &header.upper {
            let mut layer = UpperLayer::with_capacity(entries.min(nodes));
            for _ in 0..entries {
                let node = words
                    .u32()
                    .ok_or_else(|| damaged("upper layer cut short"))?;
                let len = words
                    .u32()
                    .ok_or_else(|| damaged("upper layer cut short"))?
                    as usize;
                let mut neighbours = Vec::with_capacity(len.min(stride));
                for _ in 0..len {
                    let n = words
                        .u32()
                        .ok_or_else(|| damaged("upper layer cut short"))?;
                    neighbours.push(n);
                }
                if !in_range(node) || !neighbours.iter().all(|&n| in_range(n)) {
                    return Err(damaged("upper layer node out of range"));
                }
                layer.insert(node, neighbours.into_boxed_slice());
            }
            upper.push(layer);
        }
        if !words.0.is_empty() {
            return Err(damaged("bytes after the graph"));
        }
        Ok(FlatHnsw {
            dim: header.dim,
            nodes,
            entry: header.entry,
            base,
            stride,
            upper,
        })
    }

    pub fn len(&self) -> usize {
        self.nodes
    }

    /// Floats per vector searched.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    fn base_neighbours(&self, node: u32) -> &[u32] {
        let slot = &self.base[node as usize * self.stride..(node as usize + 1) * self.stride];
        &slot[1..=slot[0] as usize]
    }

    /// The `k` nodes nearest to `query` (unit length) that `allowed` accepts, nearest
    /// first, as `(node, distance)`. Examines at least `ef` candidates on layer 0; nodes
    /// `allowed` rejects are still walked through, only not returned.
    pub fn search(
        &self,
        vectors: &[f32],
        query: &[f32],
        k: usize,
        ef: usize,
        allowed: &dyn Fn(usize) -> bool,
    ) -> Vec<(usize, f32)> {
        assert_eq!(
            vectors.len(),
            self.nodes * self.dim,
            "vectors of another shape"
        );
        assert_eq!(query.len(), self.dim, "query of another dimension");
        let request = Request {
            vectors,
            query,
            k,
            ef,
            allowed,
        };
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            return self.search_avx2(&request);
        }
        self.search_with(&request, dot16, |_| {}, |_| {})
    }

    /// The same search compiled for AVX2 and FMA: the inlined dot product works with
    /// 256-bit fused multiply-adds (the portable build targets SSE2 only), and rows are
    /// prefetched.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn search_avx2(&self, request: &Request<'_>) -> Vec<(usize, f32)> {
        #[target_feature(enable = "avx2,fma")]
        fn compiled_for_avx2(graph: &FlatHnsw, request: &Request<'_>) -> Vec<(usize, f32)> {
            // The closures, defined here, are compiled with AVX2 and FMA, and `dot_avx2` is
            // inlined into them (a function item passed instead was not, and ran 5× slower).
            graph.search_with(
                request,
                // SAFETY: this function is compiled for, and only called on, AVX2 and FMA.
                |a, b| unsafe { dot_avx2(a, b) },
                // A row a few neighbours ahead, and the next node's neighbour list, asked
                // for while one is scored, so their misses overlap the scoring.
                |row: &[f32]| prefetch_lines(row),
                |slot: &[u32]| prefetch_lines(slot),
            )
        }
        // SAFETY: `search` calls this only after detecting AVX2 and FMA on this CPU.
        unsafe { compiled_for_avx2(self, request) }
    }

    #[inline(always)]
    fn search_with(
        &self,
        request: &Request<'_>,
        dot: impl Fn(&[f32], &[f32]) -> f32,
        prefetch: impl Fn(&[f32]),
        prefetch_slot: impl Fn(&[u32]),
    ) -> Vec<(usize, f32)> {
        let Request {
            vectors,
            query,
            k,
            ef,
            allowed,
        } = *request;
        if self.nodes == 0 || k == 0 {
            return Vec::new();
        }
        let row = |node: u32| &vectors[node as usize * self.dim..(node as usize + 1) * self.dim];
        let distance = |node: u32| 1.0 - dot(query, row(node));
        // Greedy descent through the upper layers to the closest entry into layer 0.
        let mut at = Candidate {
            node: self.entry,
            distance: distance(self.entry),
        };
        for layer in self.upper.iter().rev() {
            loop {
                let mut moved = false;
                for &n in layer.get(&at.node).map(|n| &n[..]).unwrap_or_default() {
                    let d = distance(n);
                    if d < at.distance {
                        at = Candidate {
                            node: n,
                            distance: d,
                        };
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        let ef = ef.max(k);
        SCRATCH.with(|scratch| {
            let scratch = &mut *scratch.borrow_mut();
            scratch.start(self.nodes);
            scratch.visit(at.node);
            scratch.candidates.push(Nearest(at));
            // The farthest result kept: candidates beyond it cannot improve the results.
            let mut bound = f32::INFINITY;
            if allowed(at.node as usize) {
                scratch.results.push(at);
                bound = at.distance;
            }
            while let Some(Nearest(current)) = scratch.candidates.pop() {
                // With a filter the results may still be short of ef; walk on until full.
                if current.distance > bound && scratch.results.len() >= ef {
                    break;
                }
                // The neighbours not seen yet, marked as seen, then scored in order, the
                // rows of the next few asked for while one is scored: asked for all at
                // once (up to 64 rows of 4 cache lines), the requests queued behind the
                // CPU's few outstanding misses and the prefetches themselves stalled.
                let mut fresh = std::mem::take(&mut scratch.fresh);
                fresh.clear();
                fresh.extend(
                    self.base_neighbours(current.node)
                        .iter()
                        .copied()
                        .filter(|&n| scratch.visit(n)),
                );
                // The node most likely searched next (often it is, unless one of these
                // neighbours comes closer): its neighbour list, read first thing then,
                // waited on memory for 11 % of a search's samples.
                if let Some(Nearest(next)) = scratch.candidates.peek() {
                    let at = next.node as usize * self.stride;
                    prefetch_slot(&self.base[at..at + self.stride]);
                }
                for &n in fresh.iter().take(PREFETCH_AHEAD) {
                    prefetch(row(n));
                }
                for (j, &n) in fresh.iter().enumerate() {
                    if let Some(&ahead) = fresh.get(j + PREFETCH_AHEAD) {
                        prefetch(row(ahead));
                    }
                    let d = distance(n);
                    if scratch.results.len() < ef || d < bound {
                        let found = Candidate {
                            node: n,
                            distance: d,
                        };
                        scratch.candidates.push(Nearest(found));
                        if allowed(n as usize) {
                            scratch.results.push(found);
                            if scratch.results.len() > ef {
                                scratch.results.pop();
                            }
                        }
                        if let Some(worst) = scratch.results.peek() {
                            bound = worst.distance;
                        }
                    }
                }
                scratch.fresh = fresh;
            }
            let mut found: Vec<Candidate> = scratch.results.drain().collect();
            found.sort_unstable();
            found.truncate(k);
            found
                .into_iter()
                .map(|c| (c.node as usize, c.distance))
                .collect()
        })
    }
}

/// Asks the cache for every 64-byte line of `items`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn prefetch_lines<T>(items: &[T]) {
    for line in items.chunks((64 / std::mem::size_of::<T>()).max(1)) {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast());
    }
}

/// Whether this CPU has AVX2 and FMA (the answer is cached by the standard library).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The dot product of `query` with every row of `vectors` (rows of `query.len()`), into
/// `scores`: exact search's one pass over the catalog. On x86-64 with AVX2 and FMA a copy
/// compiled for them runs.
pub fn score_rows(vectors: &[f32], query: &[f32], scores: &mut Vec<f32>) {
    #[inline(always)]
    fn score_with(
        vectors: &[f32],
        query: &[f32],
        scores: &mut Vec<f32>,
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) {
        scores.clear();
        scores.extend(vectors.chunks_exact(query.len()).map(|row| dot(row, query)));
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    {
        #[target_feature(enable = "avx2,fma")]
        fn compiled_for_avx2(vectors: &[f32], query: &[f32], scores: &mut Vec<f32>) {
            // SAFETY: this function is compiled for, and only called on, AVX2 and FMA.
            score_with(vectors, query, scores, |a, b| unsafe { dot_avx2(a, b) })
        }
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were just detected on this CPU.
            return unsafe { compiled_for_avx2(vectors, query, scores) };
        }
    }
    score_with(vectors, query, scores, dot16)
}

/// Products per block of [`Columns`]: eight registers of eight floats.
const BLOCK: usize = 64;

/// A catalog's embeddings stored for exact search in blocks of 64 products, each block by
/// column: `values[(b * dim + d) * 64 + j]` is product `64 b + j`'s value in dimension
/// `d` (the last block padded with zeros). Scoring a query ([`Columns::score`]) is then a
/// multiply-add of each dimension's 64 values into 64 scores at once, with no horizontal
/// sum per product, over one block after another: the pass reads memory in order, as the
/// row pass does. (Whole columns one after another, tried first, were faster only while
/// the catalog stayed in the cache: a list's other work evicts it.)
pub struct Columns {
    rows: usize,
    dim: usize,
    values: Vec<f32>,
}

impl Columns {
    /// `vectors` holds rows of `dim` values each, one after another.
    pub fn from_rows(vectors: &[f32], dim: usize) -> Columns {
        let rows = vectors.len().checked_div(dim).unwrap_or(0);
        let mut values = vec![0.0f32; rows.div_ceil(BLOCK) * BLOCK * dim];
        for (i, row) in vectors.chunks_exact(dim.max(1)).take(rows).enumerate() {
            let (b, j) = (i / BLOCK, i % BLOCK);
            for (d, &v) in row.iter().enumerate() {
                values[(b * dim + d) * BLOCK + j] = v;
            }
        }
        Columns { rows, dim, values }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The dot product of `query` (of `dim` values) with every product, into `scores`.
    /// Each product's score is summed over the dimensions in order, one fused
    /// multiply-add each where the CPU has them, so equal vectors score equal bit for bit
    /// wherever they sit in the catalog.
    pub fn score(&self, query: &[f32], scores: &mut Vec<f32>) {
        assert_eq!(query.len(), self.dim, "a query of the catalog's dimension");
        scores.clear();
        scores.resize(self.rows, 0.0);
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were just detected on this CPU.
            return unsafe { self.score_avx2(query, scores) };
        }
        self.score_portable(query, scores);
    }

    fn score_portable(&self, query: &[f32], scores: &mut [f32]) {
        for (b, out) in scores.chunks_mut(BLOCK).enumerate() {
            let block = &self.values[b * self.dim * BLOCK..(b + 1) * self.dim * BLOCK];
            let mut acc = [0.0f32; BLOCK];
            for (column, &q) in block.chunks_exact(BLOCK).zip(query) {
                for (a, &c) in acc.iter_mut().zip(column) {
                    *a += q * c;
                }
            }
            out.copy_from_slice(&acc[..out.len()]);
        }
    }

    /// [`Columns::score`] a block at a time in eight registers of eight: each dimension
    /// is one broadcast of the query's value and eight independent fused multiply-adds.
    ///
    /// # Safety
    /// Only on a CPU with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn score_avx2(&self, query: &[f32], scores: &mut [f32]) {
        use std::arch::x86_64::*;
        const LANES: usize = 8;
        for (b, out) in scores.chunks_mut(BLOCK).enumerate() {
            let block = &self.values[b * self.dim * BLOCK..(b + 1) * self.dim * BLOCK];
            let mut acc = [_mm256_setzero_ps(); BLOCK / LANES];
            for (column, &q) in block.chunks_exact(BLOCK).zip(query) {
                let q = _mm256_set1_ps(q);
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: k * LANES + LANES <= BLOCK, the column's length.
                    let c = unsafe { _mm256_loadu_ps(column.as_ptr().add(k * LANES)) };
                    *a = _mm256_fmadd_ps(c, q, *a);
                }
            }
            let mut all = [0.0f32; BLOCK];
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: k * LANES + LANES <= BLOCK, the buffer's length.
                unsafe { _mm256_storeu_ps(all.as_mut_ptr().add(k * LANES), *a) };
            }
            out.copy_from_slice(&all[..out.len()]);
        }
    }
}

/// Dot product in 16 independent lanes, so consecutive adds do not wait on each other;
/// portable, without `unsafe` (x86-64 with AVX2 and FMA uses `dot_avx2`).
#[inline(always)]
pub(crate) fn dot16(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// [`dot16`] in two 256-bit registers of fused multiply-adds, summed in the same order.
/// Written with intrinsics: from the portable code the compiler made eight 64-bit-wide
/// multiply-adds per 16 floats. Exact search's scan is about a fifth faster with this
/// (18.8 → 15.0 µs at 2,000 × 32); HNSW search, bound by its memory accesses, did not
/// change.
///
/// # Safety
/// Only on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n - n % 16;
    let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    while i < whole {
        // SAFETY: i + 16 <= n, within both slices.
        unsafe {
            low = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), low);
            high = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                high,
            );
        }
        i += 16;
    }
    let tail: f32 = a[whole..n]
        .iter()
        .zip(&b[whole..n])
        .map(|(x, y)| x * y)
        .sum();
    // The tree of `dot_lanes`: 8 lanes, then 4, then 2, then 1.
    let half = _mm256_add_ps(low, high);
    let quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    let pair = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
    _mm_cvtss_f32(one) + tail
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    // Summed as a tree (8 + 4 + 2 + 1 adds, each level's independent) rather than left to
    // right (15 adds in a row), in the order `dot_avx2` sums its registers.
    let mut half = [0.0f32; 8];
    for i in 0..8 {
        half[i] = lanes[i] + lanes[i + 8];
    }
    let quarter = [
        half[0] + half[4],
        half[1] + half[5],
        half[2] + half[6],
        half[3] + half[7],
    ];
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]) + tail
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::catalog::{generate, Catalog, SyntheticCatalog};
    use crate::model::recommender::dot;
    use crate::model::recommender::UnitDot;

    fn built(products: usize) -> (Catalog, Hnsw<'static, f32, UnitDot>, FlatHnsw) {
        let catalog = generate(SyntheticCatalog {
            products,
            dim: 32,
            seed: 3,
            unavailable_share: 0.0,
        });
        let hnsw = Hnsw::<f32, UnitDot>::new(16, products, 16, 100, UnitDot);
        for (i, row) in catalog.embeddings().rows().into_iter().enumerate() {
            hnsw.insert_slice((row.as_slice().unwrap(), i));
        }
        let flat = FlatHnsw::freeze(&hnsw, catalog.len(), catalog.dim());
        (catalog, hnsw, flat)
    }

    /// The `k` smallest distances from `query` to any product, ascending.
    fn exact(catalog: &Catalog, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        let mut all: Vec<(usize, f32)> = (0..catalog.len())
            .map(|i| {
                (
                    i,
                    1.0 - dot(query, catalog.embedding(i).as_slice().unwrap()),
                )
            })
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    /// Two answers are the same up to rounding: equal distances rank for rank (products at
    /// the same distance, such as the two a query is the sum of, may come in either order).
    fn assert_same_answer(got: &[(usize, f32)], want: &[(usize, f32)], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g.1 - w.1).abs() < 1e-5, "{what}: {got:?} vs {want:?}");
        }
    }

    fn query(catalog: &Catalog, i: usize) -> Vec<f32> {
        let v = &catalog.embedding(i) + &catalog.embedding((i * 7 + 3) % catalog.len());
        let norm = v.dot(&v).sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    #[test]
    fn frozen_graph_keeps_every_neighbour_list_of_the_built_one() {
        let (_, hnsw, flat) = built(1_500);
        let mut upper_lists = 0;
        for point in hnsw.get_point_indexation() {
            let id = point.get_origin_id() as u32;
            let level = point.get_point_id().0 as usize;
            let lists = point.get_neighborhood_id();
            let ids =
                |layer: usize| -> Vec<u32> { lists[layer].iter().map(|n| n.d_id as u32).collect() };
            assert_eq!(flat.base_neighbours(id), &ids(0)[..], "node {id}, layer 0");
            for layer in 1..=level {
                assert_eq!(&flat.upper[layer - 1][&id][..], &ids(layer)[..]);
                upper_lists += 1;
            }
        }
        assert!(upper_lists > 0, "a 1,500-node graph has upper layers");
        assert_eq!(
            flat.upper.len(),
            hnsw.get_point_indexation().get_max_level_observed() as usize
        );
    }

    fn key(embeddings_id: &str) -> GraphKey {
        GraphKey {
            embeddings_id: embeddings_id.into(),
            max_connections: 16,
            ef_construction: 100,
        }
    }

    #[test]
    fn a_graph_read_back_from_its_file_is_the_graph_written() {
        let (catalog, _, flat) = built(1_500);
        let mut bytes = Vec::new();
        flat.write(&key("e1"), &mut bytes).unwrap();
        let read = FlatHnsw::read(&key("e1"), &bytes).unwrap();
        assert_eq!(read, flat);
        assert!(!read.upper.is_empty());
        let vectors = catalog.embeddings_slice();
        for i in (0..catalog.len()).step_by(97) {
            let q = query(&catalog, i);
            assert_eq!(
                read.search(vectors, &q, 10, 32, &|_| true),
                flat.search(vectors, &q, 10, 32, &|_| true)
            );
        }
        // Written twice, the same bytes (upper layers in node order, not hash order).
        let mut again = Vec::new();
        read.write(&key("e1"), &mut again).unwrap();
        assert_eq!(again, bytes);
    }

    #[test]
    fn a_graph_file_of_another_model_or_damaged_is_refused_with_the_reason() {
        let (_, _, flat) = built(300);
        let mut bytes = Vec::new();
        flat.write(&key("e1"), &mut bytes).unwrap();
        let refused = |bytes: &[u8], k: &GraphKey| FlatHnsw::read(k, bytes).unwrap_err();
        assert!(matches!(
            refused(&bytes, &key("e2")),
            GraphFileError::OtherModel { .. }
        ));
        let other_settings = GraphKey {
            max_connections: 32,
            ..key("e1")
        };
        assert!(matches!(
            refused(&bytes, &other_settings),
            GraphFileError::OtherModel { .. }
        ));
        assert!(matches!(
            refused(b"products.jsonl", &key("e1")),
            GraphFileError::NotAGraph
        ));
        // Any byte changed, or the file cut anywhere, is caught.
        for at in [8, 12, 40, bytes.len() / 2, bytes.len() - 9, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(
                matches!(refused(&flipped, &key("e1")), GraphFileError::Damaged(_)),
                "byte {at} changed"
            );
        }
        for len in [0, 8, 11, 100, bytes.len() - 1] {
            assert!(
                FlatHnsw::read(&key("e1"), &bytes[..len]).is_err(),
                "cut at {len}"
            );
        }
        // A neighbour out of range is refused even with a checksum that matches.
        let mut wrong = flat;
        let stride = wrong.stride;
        wrong.base[stride + 1] = 300;
        let mut bytes = Vec::new();
        wrong.write(&key("e1"), &mut bytes).unwrap();
        assert!(matches!(
            refused(&bytes, &key("e1")),
            GraphFileError::Damaged(_)
        ));
    }

    #[test]
    fn a_search_as_wide_as_the_catalog_finds_the_exact_neighbours() {
        let (catalog, _, flat) = built(1_500);
        let vectors = catalog.embeddings_slice();
        for i in (0..catalog.len()).step_by(50) {
            let q = query(&catalog, i);
            let found = flat.search(vectors, &q, 10, catalog.len(), &|_| true);
            assert_same_answer(&found, &exact(&catalog, &q, 10), &format!("query {i}"));
            // Each distance reported is the product's true distance.
            for (node, distance) in found {
                let truth = 1.0 - dot(&q, catalog.embedding(node).as_slice().unwrap());
                assert!((distance - truth).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn the_default_width_reaches_high_recall_and_returns_sorted_distances() {
        let (catalog, _, flat) = built(1_500);
        let vectors = catalog.embeddings_slice();
        let (mut hits, mut total) = (0, 0);
        for i in (0..catalog.len()).step_by(10) {
            let q = query(&catalog, i);
            let found = flat.search(vectors, &q, 10, 64, &|_| true);
            assert_eq!(found.len(), 10);
            assert!(found.windows(2).all(|w| w[0].1 <= w[1].1), "{found:?}");
            let truth: HashSet<usize> = exact(&catalog, &q, 10).iter().map(|x| x.0).collect();
            hits += found.iter().filter(|x| truth.contains(&x.0)).count();
            total += 10;
        }
        let recall = hits as f64 / total as f64;
        assert!(recall >= 0.95, "recall@10 {recall}");
    }

    #[test]
    fn rejected_nodes_are_walked_through_but_never_returned() {
        let (catalog, _, flat) = built(1_500);
        let vectors = catalog.embeddings_slice();
        for i in (0..catalog.len()).step_by(100) {
            let q = query(&catalog, i);
            // Reject the 40 nearest: the search must pass them to reach the rest.
            let banned: HashSet<usize> = exact(&catalog, &q, 40).iter().map(|x| x.0).collect();
            let found = flat.search(vectors, &q, 10, 64, &|n| !banned.contains(&n));
            assert_eq!(found.len(), 10);
            assert!(found.iter().all(|x| !banned.contains(&x.0)));
            // Rejecting everything leaves nothing, after walking the whole graph.
            assert!(flat.search(vectors, &q, 10, 64, &|_| false).is_empty());
        }
    }

    #[test]
    fn visited_marks_survive_the_epoch_wrapping_around() {
        let (catalog, _, flat) = built(300);
        let vectors = catalog.embeddings_slice();
        let q = query(&catalog, 5);
        let before = flat.search(vectors, &q, 10, 300, &|_| true);
        SCRATCH.with(|s| s.borrow_mut().epoch = u32::MAX - 1);
        for _ in 0..4 {
            assert_eq!(flat.search(vectors, &q, 10, 300, &|_| true), before);
        }
        assert!(SCRATCH.with(|s| s.borrow().epoch) < 10);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn the_avx2_dot_product_is_the_portable_one() {
        if !has_avx2_fma() {
            return;
        }
        for n in [0, 1, 5, 16, 17, 32, 33, 64, 100, 128] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            // SAFETY: AVX2 and FMA were detected above.
            let avx2 = unsafe { dot_avx2(&a, &b) };
            let portable = dot16(&a, &b);
            assert!(
                (avx2 as f64 - plain).abs() < 1e-4,
                "n={n}: {avx2} vs {plain}"
            );
            assert!(
                (portable as f64 - plain).abs() < 1e-4,
                "n={n}: {portable} vs {plain}"
            );
        }
    }

    #[test]
    fn scores_by_column_are_the_dot_products_and_the_same_wherever_a_product_sits() {
        // Five distinct vectors repeated over whole blocks of 64 and a last one in part.
        for dim in [1, 3, 5, 64] {
            let base: Vec<Vec<f32>> = (0..5)
                .map(|b| {
                    (0..dim)
                        .map(|d| (((b * 31 + d * 7) % 17) as f32 - 8.0) / 9.0)
                        .collect()
                })
                .collect();
            let query: Vec<f32> = (0..dim)
                .map(|d| ((d * 5 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let plain =
                |v: &[f32]| -> f64 { v.iter().zip(&query).map(|(a, b)| (a * b) as f64).sum() };
            for rows in [0, 1, 7, 8, 63, 64, 65, 139] {
                let vectors: Vec<f32> = (0..rows).flat_map(|i| base[i % 5].clone()).collect();
                let columns = Columns::from_rows(&vectors, dim);
                assert_eq!(columns.rows(), rows);
                let mut scores = vec![f32::NAN; 3];
                columns.score(&query, &mut scores);
                assert_eq!(scores.len(), rows, "dim {dim}, {rows} rows");
                let mut portable = vec![0.0; rows];
                columns.score_portable(&query, &mut portable);
                for (i, (&s, &p)) in scores.iter().zip(&portable).enumerate() {
                    let want = plain(&base[i % 5]);
                    for (pass, got) in [("dispatched", s), ("portable", p)] {
                        let off = (got as f64 - want).abs();
                        assert!(off < 1e-4, "{pass}, dim {dim}, row {i}: {got} vs {want}");
                    }
                    // Bit for bit: exact search ranks equal scores by index.
                    assert_eq!(s.to_bits(), scores[i % 5].to_bits(), "dim {dim}, row {i}");
                }
            }
        }
    }

    #[test]
    fn the_portable_and_the_avx2_search_agree() {
        let (catalog, _, flat) = built(1_500);
        let vectors = catalog.embeddings_slice();
        for i in (0..catalog.len()).step_by(25) {
            let q = query(&catalog, i);
            let request = Request {
                vectors,
                query: &q,
                k: 10,
                ef: 64,
                allowed: &|_| true,
            };
            let portable = flat.search_with(&request, dot16, |_| {}, |_| {});
            // On a CPU without AVX2 `search` takes the portable path: equal trivially.
            let dispatched = flat.search(vectors, &q, 10, 64, &|_| true);
            assert_same_answer(&dispatched, &portable, &format!("query {i}"));
        }
    }
}
