//! The product catalog: metadata in `products.jsonl` (one JSON object per line, in the
//! order of the embedding rows) and embeddings in `embeddings.npy` (float32, one row per
//! product). A PyTorch or NumPy user writes the same two files to bring their own model.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayView1, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

pub const PRODUCTS_FILE: &str = "products.jsonl";
pub const EMBEDDINGS_FILE: &str = "embeddings.npy";
/// Alternative to `products.jsonl` for imported models: one product id per line, in row
/// order (titles default to the id, every product available).
pub const IDS_FILE: &str = "ids.txt";
/// Written by the trainer; its `version` names the model in every list.
pub const MODEL_METADATA_FILE: &str = "metadata.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    pub product_id: String,
    pub title: String,
    pub category: String,
    #[serde(default = "available_by_default")]
    pub available: bool,
}

fn available_by_default() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read {path}: {source} (generate a catalog with `recpipe-admin catalog generate --out {dir}`)", dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default(), path = .path.display())]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}", path = .path.display())]
    BadProduct {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}", path = .path.display())]
    BadEmbeddings { path: PathBuf, message: String },
    #[error("{products} products in {PRODUCTS_FILE} but {rows} rows in {EMBEDDINGS_FILE}: they must match row for row")]
    CountMismatch { products: usize, rows: usize },
    #[error("the catalog is empty")]
    Empty,
    #[error("cannot write the catalog: {0}")]
    Write(String),
}

/// Products with unit-length embeddings, and the look-ups the services need.
#[derive(Debug)]
pub struct Catalog {
    model_version: Option<String>,
    embeddings_id: String,
    products: Vec<Product>,
    embeddings: Array2<f32>,
    /// foldhash rather than SipHash: every list looks up 60–100 ids here. It is
    /// seeded per process, and the map is built from the catalog only.
    by_id: HashMap<String, usize, foldhash::fast::RandomState>,
    by_token: HashMap<String, Vec<usize>>,
}

impl Catalog {
    /// Builds a catalog, checking shapes and values, and normalising rows to unit length.
    pub fn new(
        products: Vec<Product>,
        mut embeddings: Array2<f32>,
    ) -> Result<Catalog, CatalogError> {
        let path = PathBuf::from(EMBEDDINGS_FILE);
        if products.is_empty() {
            return Err(CatalogError::Empty);
        }
        if products.len() != embeddings.nrows() {
            return Err(CatalogError::CountMismatch {
                products: products.len(),
                rows: embeddings.nrows(),
            });
        }
        if embeddings.ncols() == 0 {
            return Err(CatalogError::BadEmbeddings {
                path,
                message: "embeddings have zero columns".into(),
            });
        }
        for (i, mut row) in embeddings.axis_iter_mut(Axis(0)).enumerate() {
            if let Some(j) = row.iter().position(|v| !v.is_finite()) {
                return Err(CatalogError::BadEmbeddings {
                    path,
                    message: format!(
                        "row {i} ({}) has a non-finite value at column {j}",
                        products[i].product_id
                    ),
                });
            }
            let norm = row.dot(&row).sqrt();
            if norm == 0.0 {
                return Err(CatalogError::BadEmbeddings {
                    path,
                    message: format!("row {i} ({}) is all zeros", products[i].product_id),
                });
            }
            // Rows already of unit length are kept bit for bit, so save → load is exact.
            if (norm - 1.0).abs() > 1e-6 {
                row.mapv_inplace(|v| v / norm);
            }
        }
        // Row-major and contiguous, so the index can read a row as a plain slice.
        let embeddings = if embeddings.is_standard_layout() {
            embeddings
        } else {
            embeddings.as_standard_layout().into_owned()
        };
        let mut by_id = HashMap::with_capacity_and_hasher(
            products.len(),
            foldhash::fast::RandomState::default(),
        );
        let mut by_token: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in products.iter().enumerate() {
            if by_id.insert(p.product_id.clone(), i).is_some() {
                return Err(CatalogError::BadProduct {
                    path: PathBuf::from(PRODUCTS_FILE),
                    line: i + 1,
                    message: format!("duplicate product_id {:?}", p.product_id),
                });
            }
            let mut tokens = tokenize(&p.title);
            tokens.extend(tokenize(&p.category));
            tokens.sort();
            tokens.dedup();
            for t in tokens {
                by_token.entry(t).or_default().push(i);
            }
        }
        Ok(Catalog {
            model_version: None,
            embeddings_id: embeddings_fingerprint(&products, &embeddings),
            products,
            embeddings,
            by_id,
            by_token,
        })
    }

    /// Reads `products.jsonl` (or `ids.txt`) and `embeddings.npy` from `dir`, and the
    /// model version from `metadata.json` when present.
    pub fn load(dir: &Path) -> Result<Catalog, CatalogError> {
        let products_path = dir.join(PRODUCTS_FILE);
        let ids_path = dir.join(IDS_FILE);
        let products = if !products_path.exists() && ids_path.exists() {
            Self::read_ids(&ids_path)?
        } else {
            Self::read_products(&products_path)?
        };
        let emb_path = dir.join(EMBEDDINGS_FILE);
        let file = std::fs::File::open(&emb_path).map_err(|source| CatalogError::Missing {
            path: emb_path.clone(),
            source,
        })?;
        let embeddings: Array2<f32> =
            ndarray_npy::ReadNpyExt::read_npy(file).map_err(|e| CatalogError::BadEmbeddings {
                path: emb_path.clone(),
                message: format!("{e} (expected a 2-D float32 array, one row per product)"),
            })?;
        let mut catalog = Catalog::new(products, embeddings).map_err(|e| match e {
            CatalogError::BadEmbeddings { message, .. } => CatalogError::BadEmbeddings {
                path: emb_path,
                message,
            },
            other => other,
        })?;
        catalog.model_version = read_model_version(dir)?;
        Ok(catalog)
    }

    fn read_ids(path: &Path) -> Result<Vec<Product>, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Missing {
            path: path.to_path_buf(),
            source,
        })?;
        text.lines()
            .enumerate()
            .map(|(i, line)| {
                let id = line.trim();
                if id.is_empty() {
                    return Err(CatalogError::BadProduct {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: "missing id (empty line)".into(),
                    });
                }
                Ok(Product {
                    product_id: id.to_string(),
                    title: id.to_string(),
                    category: String::new(),
                    available: true,
                })
            })
            .collect()
    }

    fn read_products(path: &Path) -> Result<Vec<Product>, CatalogError> {
        let file = std::fs::File::open(path).map_err(|source| CatalogError::Missing {
            path: path.to_path_buf(),
            source,
        })?;
        let mut products = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let bad = |message: String| CatalogError::BadProduct {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = line.map_err(|e| bad(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            products.push(serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?);
        }
        Ok(products)
    }

    /// The version named by the model's `metadata.json`, if it has one.
    pub fn model_version(&self) -> Option<&str> {
        self.model_version.as_deref()
    }

    /// Identifies the embedding set (a hash of the product ids and the unit vectors): a
    /// user vector built with one set is usable by every model with the same id.
    pub fn embeddings_id(&self) -> &str {
        &self.embeddings_id
    }

    /// The same products with embeddings blurred by Gaussian noise of norm `noise` per
    /// row (then renormalised): a weaker model, for trying experiments and swaps.
    pub fn with_noise(&self, noise: f32, seed: u64) -> Catalog {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut embeddings = self.embeddings.clone();
        for mut row in embeddings.axis_iter_mut(Axis(0)) {
            let g: Array1<f32> = (0..row.len())
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect();
            let n = g.dot(&g).sqrt().max(1e-6);
            row.scaled_add(noise / n, &g);
        }
        Catalog::new(self.products.clone(), embeddings).expect("noisy rows stay valid")
    }

    /// Writes `metadata.json` naming the model version (what lists will say).
    pub fn save_version(dir: &Path, version: &str) -> Result<(), CatalogError> {
        let text = serde_json::json!({ "version": version }).to_string();
        std::fs::write(dir.join(MODEL_METADATA_FILE), text)
            .map_err(|e| CatalogError::Write(format!("{}: {e}", dir.display())))
    }

    /// Writes the two files into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<(), CatalogError> {
        let w = |e: &dyn std::fmt::Display| CatalogError::Write(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| w(&e))?;
        let file = std::fs::File::create(dir.join(PRODUCTS_FILE)).map_err(|e| w(&e))?;
        let mut out = BufWriter::new(file);
        for p in &self.products {
            serde_json::to_writer(&mut out, p).map_err(|e| w(&e))?;
            out.write_all(b"\n").map_err(|e| w(&e))?;
        }
        out.flush().map_err(|e| w(&e))?;
        let file = std::fs::File::create(dir.join(EMBEDDINGS_FILE)).map_err(|e| w(&e))?;
        ndarray_npy::WriteNpyExt::write_npy(&self.embeddings, BufWriter::new(file))
            .map_err(|e| w(&e))
    }

    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.embeddings.ncols()
    }

    pub fn products(&self) -> &[Product] {
        &self.products
    }

    pub fn product(&self, index: usize) -> &Product {
        &self.products[index]
    }

    pub fn index_of(&self, product_id: &str) -> Option<usize> {
        self.by_id.get(product_id).copied()
    }

    pub fn get(&self, product_id: &str) -> Option<&Product> {
        self.index_of(product_id).map(|i| &self.products[i])
    }

    /// Unit-length embeddings, one row per product.
    pub fn embeddings(&self) -> &Array2<f32> {
        &self.embeddings
    }

    /// The embeddings as one row-major slice (`len() × dim()` floats).
    pub fn embeddings_slice(&self) -> &[f32] {
        self.embeddings
            .as_slice()
            .expect("Catalog::new keeps the embeddings in standard layout")
    }

    pub fn embedding(&self, index: usize) -> ArrayView1<'_, f32> {
        self.embeddings.row(index)
    }

    /// Products whose title or category contain the most of the query's terms (at most
    /// `limit`, in catalog order among equals). Empty when no term matches.
    pub fn search(&self, query: &str, limit: usize) -> Vec<usize> {
        let mut hits: HashMap<usize, usize> = HashMap::new();
        for term in tokenize(query) {
            for &i in self
                .by_token
                .get(&term)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                *hits.entry(i).or_default() += 1;
            }
        }
        let best = hits.values().copied().max().unwrap_or(0);
        let mut top: Vec<usize> = hits
            .into_iter()
            .filter(|&(_, n)| n == best)
            .map(|(i, _)| i)
            .collect();
        top.sort_unstable();
        top.truncate(limit);
        top
    }
}

/// Lower-case alphanumeric words.
pub fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The version a model directory's `metadata.json` names (None without the file).
pub fn read_model_version(dir: &Path) -> Result<Option<String>, CatalogError> {
    let metadata_path = dir.join(MODEL_METADATA_FILE);
    if !metadata_path.exists() {
        return Ok(None);
    }
    let bad = |message: String| CatalogError::BadProduct {
        path: metadata_path.clone(),
        line: 1,
        message,
    };
    let text = std::fs::read_to_string(&metadata_path).map_err(|e| bad(e.to_string()))?;
    let meta: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let version = meta["version"]
        .as_str()
        .ok_or_else(|| bad("no \"version\" string".into()))?;
    Ok(Some(version.to_string()))
}

fn embeddings_fingerprint(products: &[Product], embeddings: &Array2<f32>) -> String {
    let mut h = crate::stable_hash::Fnv64::new();
    for p in products {
        h.write(p.product_id.as_bytes());
        h.write(&[0]);
    }
    for v in embeddings.iter() {
        h.write(&v.to_le_bytes());
    }
    format!("emb-{:016x}", h.finish())
}

/// Query sets for nearest-neighbour benchmarks over a generated catalog, deterministic:
/// "one-interest" queries (a product's embedding plus a little noise, the usual ANN
/// query) and "two-interest" queries (the sum of two products of different categories —
/// the generator deals categories round — as the vector of a user with two interests).
pub fn benchmark_queries(catalog: &Catalog, n: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let products = catalog.len();
    let one = (0..n)
        .map(|q| {
            catalog
                .embedding(q * 37 % products)
                .iter()
                .map(|v| v + 0.05 * rng.sample::<f32, _>(StandardNormal))
                .collect()
        })
        .collect();
    let two = (0..n)
        .map(|q| {
            (&catalog.embedding(q * 37 % products) + &catalog.embedding((q * 37 + 1) % products))
                .to_vec()
        })
        .collect();
    (one, two)
}

/// Parameters of a synthetic catalog.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticCatalog {
    pub products: usize,
    pub dim: usize,
    pub seed: u64,
    /// Share of products marked unavailable.
    pub unavailable_share: f64,
}

impl Default for SyntheticCatalog {
    fn default() -> Self {
        SyntheticCatalog {
            products: 2_000,
            dim: 32,
            seed: 42,
            unavailable_share: 0.03,
        }
    }
}

/// Categories and the kinds of product in each: readable names for the demo.
pub const CATEGORIES: &[(&str, &[&str])] = &[
    (
        "kitchen",
        &[
            "Saucepan",
            "Skillet",
            "Kettle",
            "Chef Knife",
            "Cutting Board",
            "Colander",
            "Whisk",
            "Dutch Oven",
        ],
    ),
    (
        "garden",
        &[
            "Trowel",
            "Watering Can",
            "Hose Reel",
            "Pruning Shears",
            "Planter",
            "Rake",
            "Seed Tray",
            "Wheelbarrow",
        ],
    ),
    (
        "outdoor",
        &[
            "Tent",
            "Sleeping Bag",
            "Headlamp",
            "Backpack",
            "Camping Stove",
            "Trekking Poles",
            "Water Filter",
            "Hammock",
        ],
    ),
    (
        "fitness",
        &[
            "Yoga Mat",
            "Dumbbell",
            "Kettlebell",
            "Jump Rope",
            "Resistance Band",
            "Foam Roller",
            "Pull-up Bar",
            "Exercise Ball",
        ],
    ),
    (
        "audio",
        &[
            "Headphones",
            "Earbuds",
            "Bookshelf Speaker",
            "Soundbar",
            "Turntable",
            "Microphone",
            "Amplifier",
            "Radio",
        ],
    ),
    (
        "office",
        &[
            "Desk Lamp",
            "Notebook",
            "Fountain Pen",
            "Monitor Stand",
            "Desk Chair",
            "Stapler",
            "Paper Tray",
            "Whiteboard",
        ],
    ),
    (
        "toys",
        &[
            "Puzzle",
            "Building Blocks",
            "Teddy Bear",
            "Kite",
            "Board Game",
            "Toy Train",
            "Yo-yo",
            "Marble Run",
        ],
    ),
    (
        "bath",
        &[
            "Towel",
            "Bath Mat",
            "Soap Dish",
            "Shower Caddy",
            "Toothbrush Holder",
            "Bathrobe",
            "Loofah",
            "Mirror",
        ],
    ),
    (
        "pets",
        &[
            "Dog Bed",
            "Cat Tree",
            "Leash",
            "Pet Bowl",
            "Chew Toy",
            "Litter Box",
            "Bird Feeder",
            "Aquarium",
        ],
    ),
    (
        "coffee",
        &[
            "Espresso Machine",
            "Grinder",
            "French Press",
            "Pour-over Kettle",
            "Mug",
            "Milk Frother",
            "Coffee Scale",
            "Moka Pot",
        ],
    ),
];

const ADJECTIVES: &[&str] = &[
    "Classic",
    "Compact",
    "Deluxe",
    "Eco",
    "Essential",
    "Premium",
    "Pro",
    "Rustic",
    "Smart",
    "Vintage",
    "Ultra",
    "Everyday",
];
const FINISHES: &[&str] = &[
    "Oak", "Steel", "Copper", "Ceramic", "Blue", "Black", "Red", "Green", "Walnut", "Bamboo",
    "White", "Slate",
];

/// A deterministic catalog of clustered embeddings: products of a category lie near the
/// category's centre, and products of the same kind nearer still.
pub fn generate(spec: SyntheticCatalog) -> Catalog {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let dim = spec.dim.max(2);
    let gaussian = |rng: &mut ChaCha8Rng, scale: f32| -> Array1<f32> {
        let v: Array1<f32> = (0..dim)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let n = v.dot(&v).sqrt().max(1e-6);
        v * (scale / n)
    };
    let centres: Vec<Array1<f32>> = CATEGORIES.iter().map(|_| gaussian(&mut rng, 1.0)).collect();
    let kinds: Vec<Vec<Array1<f32>>> = CATEGORIES
        .iter()
        .map(|(_, nouns)| nouns.iter().map(|_| gaussian(&mut rng, 0.45)).collect())
        .collect();
    let mut products = Vec::with_capacity(spec.products);
    let mut embeddings = Array2::<f32>::zeros((spec.products, dim));
    for i in 0..spec.products {
        let c = i % CATEGORIES.len();
        let (category, nouns) = CATEGORIES[c];
        let k = rng.random_range(0..nouns.len());
        let title = format!(
            "{} {} {}",
            ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
            FINISHES[rng.random_range(0..FINISHES.len())],
            nouns[k]
        );
        let v = &centres[c] + &kinds[c][k] + &gaussian(&mut rng, 0.3);
        embeddings.row_mut(i).assign(&v);
        products.push(Product {
            product_id: format!("p-{i:05}"),
            title,
            category: category.to_string(),
            available: !rng.random_bool(spec.unavailable_share),
        });
    }
    Catalog::new(products, embeddings).expect("generated catalog is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_catalog_saves_and_loads_the_same() {
        let catalog = generate(SyntheticCatalog {
            products: 300,
            dim: 16,
            ..Default::default()
        });
        let dir = tempfile::tempdir().unwrap();
        catalog.save(dir.path()).unwrap();
        let loaded = Catalog::load(dir.path()).unwrap();
        assert_eq!(loaded.products(), catalog.products());
        assert_eq!(loaded.embeddings(), catalog.embeddings());
        assert_eq!(loaded.dim(), 16);
    }

    #[test]
    fn generation_is_deterministic_and_clustered() {
        let a = generate(SyntheticCatalog::default());
        let b = generate(SyntheticCatalog::default());
        assert_eq!(a.embeddings(), b.embeddings());
        // Same-category pairs are much more similar than cross-category pairs.
        let (mut same, mut other, mut n_same, mut n_other) = (0.0, 0.0, 0, 0);
        for i in 0..200 {
            for j in (i + 1)..200 {
                let s = a.embedding(i).dot(&a.embedding(j));
                if a.product(i).category == a.product(j).category {
                    same += s;
                    n_same += 1;
                } else {
                    other += s;
                    n_other += 1;
                }
            }
        }
        let (same, other) = (same / n_same as f32, other / n_other as f32);
        assert!(same > other + 0.3, "same-category {same} vs other {other}");
    }

    #[test]
    fn search_finds_products_by_title_and_category() {
        let c = generate(SyntheticCatalog::default());
        let hits = c.search("espresso machine", 50);
        assert!(!hits.is_empty());
        for i in hits {
            assert!(
                c.product(i).title.contains("Espresso Machine"),
                "{:?}",
                c.product(i)
            );
        }
        assert!(c.search("zzzz", 10).is_empty());
    }

    #[test]
    fn an_imported_model_needs_only_ids_and_embeddings() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDS_FILE), "a\nb\nc\n").unwrap();
        let e = ndarray::arr2(&[[1.0f32, 0.0], [0.0, 2.0], [3.0, 4.0]]);
        ndarray_npy::write_npy(dir.path().join(EMBEDDINGS_FILE), &e).unwrap();
        let c = Catalog::load(dir.path()).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("c").unwrap().title, "c");
        assert!(
            (c.embedding(2)[0] - 0.6).abs() < 1e-6,
            "rows are normalised"
        );
        assert_eq!(c.model_version(), None);
        std::fs::write(
            dir.path().join(MODEL_METADATA_FILE),
            r#"{"version": "imported-1"}"#,
        )
        .unwrap();
        assert_eq!(
            Catalog::load(dir.path()).unwrap().model_version(),
            Some("imported-1")
        );
        // A blank line is a missing id, reported with its line.
        std::fs::write(dir.path().join(IDS_FILE), "a\n\nc\n").unwrap();
        let err = Catalog::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("missing id"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_give_errors_that_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let err = Catalog::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("products.jsonl") && err.contains("recpipe-admin catalog generate"),
            "{err}"
        );

        let c = generate(SyntheticCatalog {
            products: 10,
            dim: 4,
            ..Default::default()
        });
        c.save(dir.path()).unwrap();
        // One product fewer than embedding rows.
        let text = std::fs::read_to_string(dir.path().join(PRODUCTS_FILE)).unwrap();
        let short: Vec<&str> = text.lines().take(9).collect();
        std::fs::write(dir.path().join(PRODUCTS_FILE), short.join("\n")).unwrap();
        let err = Catalog::load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                CatalogError::CountMismatch {
                    products: 9,
                    rows: 10
                }
            ),
            "{err}"
        );

        // A NaN in the embeddings.
        std::fs::write(dir.path().join(PRODUCTS_FILE), text).unwrap();
        let mut e = c.embeddings().clone();
        e[[3, 1]] = f32::NAN;
        ndarray_npy::write_npy(dir.path().join(EMBEDDINGS_FILE), &e).unwrap();
        let err = Catalog::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("row 3") && err.contains("non-finite"), "{err}");

        // Wrong dtype / shape.
        let flat = ndarray::Array1::<f64>::zeros(5);
        ndarray_npy::write_npy(dir.path().join(EMBEDDINGS_FILE), &flat).unwrap();
        let err = Catalog::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("2-D float32"), "{err}");
    }
}
